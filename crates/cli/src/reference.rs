//! `chorus check-reference`: chorus against a reference implementation on the same GGUF file.
//!
//! The reference JSON (scripts/llama_cpp_reference.py for llama.cpp, scripts/numpy_reference.py for
//! an f32 numpy forward) holds, per prompt, the reference's token ids, its full next-token logits
//! after the prompt and its greedy continuation; per tricky string, its token ids; and its load time
//! and tokens/s. This command recomputes all of it with chorus and prints the two side by side.
//!
//! A reference may instead hold only the `top` logits of each prompt (id, value), as the small
//! fixtures committed under `crates/cli/tests/fixtures/` do; then |Δlogit| is taken over those ids.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use chorus_lm::{GgufFile, KvCache, Lm, LmInput, Tokenizer};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
struct Reference {
    /// The largest |Δlogit| the reference's own arithmetic allows against an exact f32 forward:
    /// 1e-3 for numpy's f32 forward, 1.0 for llama.cpp (8-bit activations in its quantised
    /// products); the default of `--tolerance`.
    logit_tolerance: Option<f32>,
    prompts: Vec<PromptReference>,
    tokenizer: Vec<TokenizerCase>,
    /// Absent from fixtures (they are not for timing).
    timing: Option<Timing>,
}

#[derive(Debug, Deserialize)]
struct PromptReference {
    text: String,
    tokens: Vec<u32>,
    /// Every next-token logit after the prompt, or
    #[serde(default)]
    logits: Vec<f32>,
    /// only the largest ones, as (token id, logit), largest first.
    #[serde(default)]
    top: Vec<(u32, f32)>,
    greedy: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct TokenizerCase {
    text: String,
    tokens: Vec<u32>,
}

#[derive(Debug, Deserialize, Serialize)]
struct Timing {
    load_s: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    peak_rss_mb: f64,
}

#[derive(Debug, Serialize)]
struct PromptResult {
    text: String,
    same_tokens: bool,
    top1_chorus: u32,
    top1_reference: u32,
    /// The reference's largest logit less its logit of chorus's top-1 (0 where the two agree;
    /// absent where chorus's top-1 is not among the reference's `top` ids).
    top1_gap: Option<f32>,
    max_abs_diff: f32,
    mean_abs_diff: f32,
    greedy_agree: usize,
    greedy_len: usize,
    greedy_chorus: String,
    greedy_reference: String,
}

#[derive(Debug, Serialize)]
struct Report {
    /// The |Δlogit| accepted.
    tolerance: f32,
    prompts: Vec<PromptResult>,
    tokenizer_cases: usize,
    tokenizer_mismatches: Vec<String>,
    chorus: Timing,
    reference: Option<Timing>,
}

/// Peak resident memory of this process in MB (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

fn last_logits<B: Backend>(logits: Tensor<B, 3>) -> Vec<f32> {
    let [_, seq, vocab] = logits.dims();
    logits
        .narrow(1, seq - 1, 1)
        .reshape([vocab])
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32")
}

fn tokens_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let n = ids.len();
    Tensor::from_data(TensorData::new(ids, [1, n]), device)
}

/// Whether chorus's top-1 agrees with the reference's up to its precision: the same token, or a
/// near tie — the reference's logit of chorus's choice at most `2 · tolerance` below its largest.
/// (Were every |Δlogit| ≤ tolerance, the two choices could differ only so.)
fn top1_agrees(top1_gap: Option<f32>, tolerance: f32) -> bool {
    top1_gap.is_some_and(|gap| gap <= 2.0 * tolerance)
}

pub fn run<B: Backend>(
    gguf: &Path,
    reference: &Path,
    tolerance: Option<f32>,
    json: Option<&Path>,
    report_only: bool,
    gguf_blocks: bool,
    device: &B::Device,
) -> Result<()> {
    let text = std::fs::read_to_string(reference)
        .with_context(|| format!("cannot read {}", reference.display()))?;
    let path = reference;
    let reference: Reference = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a reference file", path.display()))?;
    let (tolerance, from) = match (tolerance, reference.logit_tolerance) {
        (Some(t), _) => (t, "--tolerance".to_string()),
        (None, Some(t)) => (t, format!("{}: logit_tolerance", path.display())),
        (None, None) => bail!(
            "{} states no logit_tolerance (written by scripts/llama_cpp_reference.py and \
             scripts/numpy_reference.py); pass --tolerance",
            path.display()
        ),
    };
    if !(tolerance.is_finite() && tolerance >= 0.0) {
        bail!("{from} must be a finite |Δlogit| ≥ 0, got {tolerance}");
    }

    let start = Instant::now();
    let file = GgufFile::open(gguf)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    // Decoding on the CPU reads the quantised blocks, as `chorus generate` does.
    let model = if gguf_blocks {
        Lm::<B>::from_gguf_for_decoding(&file, device)?
    } else {
        Lm::<B>::from_gguf(&file, device)?
    };
    drop(file);
    let load_s = start.elapsed().as_secs_f64();

    let mut prompts = Vec::new();
    let (mut prefill_tokens, mut prefill_s, mut decode_tokens, mut decode_s) =
        (0usize, 0.0, 0usize, 0.0);
    for p in &reference.prompts {
        let ours = tokenizer.encode(&p.text)?;
        // Always run llama.cpp's ids, so a tokenizer difference does not hide a model difference.
        let t0 = Instant::now();
        let mut cache: KvCache<B> = model.new_cache();
        let out = model.forward(
            LmInput::new(tokens_tensor::<B>(&p.tokens, device)),
            Some(&mut cache),
        )?;
        let logits = last_logits(out.logits);
        prefill_s += t0.elapsed().as_secs_f64();
        prefill_tokens += p.tokens.len();
        let top1_chorus = argmax(&logits);
        // (ours, theirs) at every compared id, the reference's top-1, and its logit of ours.
        let (pairs, top1_reference, reference_of_ours): (Vec<(f32, f32)>, u32, Option<f32>) =
            if p.logits.is_empty() {
                let Some(&(top1, _)) = p.top.first() else {
                    bail!("{:?}: the reference has neither logits nor top", p.text);
                };
                let mut pairs = Vec::with_capacity(p.top.len());
                for &(id, value) in &p.top {
                    let Some(&ours) = logits.get(id as usize) else {
                        bail!(
                            "{:?}: reference token id {id} is outside the vocabulary",
                            p.text
                        );
                    };
                    pairs.push((ours, value));
                }
                let of_ours = p.top.iter().find(|(id, _)| *id == top1_chorus);
                (pairs, top1, of_ours.map(|&(_, value)| value))
            } else if logits.len() != p.logits.len() {
                bail!(
                    "reference logits have {} entries, the model {}",
                    p.logits.len(),
                    logits.len()
                );
            } else {
                let pairs = logits.iter().copied().zip(p.logits.iter().copied());
                let of_ours = p.logits[top1_chorus as usize];
                (pairs.collect(), argmax(&p.logits), Some(of_ours))
            };
        let reference_top = pairs
            .iter()
            .map(|&(_, theirs)| theirs)
            .fold(f32::MIN, f32::max);
        let top1_gap = reference_of_ours.map(|value| reference_top - value);
        let diffs: Vec<f32> = pairs.iter().map(|(a, b)| (a - b).abs()).collect();
        // NaN anywhere (a broken forward or reference) makes the maximum NaN, which no tolerance
        // accepts; `f32::max` would skip it.
        let max_abs_diff = diffs.iter().copied().fold(0.0, |m: f32, d| {
            if m.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        });
        let mean_abs_diff = diffs.iter().sum::<f32>() / diffs.len() as f32;

        let t0 = Instant::now();
        let mut greedy = vec![top1_chorus];
        while greedy.len() < p.greedy.len() {
            let out = model.forward(
                LmInput::new(tokens_tensor::<B>(&greedy[greedy.len() - 1..], device)),
                Some(&mut cache),
            )?;
            greedy.push(argmax(&last_logits(out.logits)));
        }
        decode_s += t0.elapsed().as_secs_f64();
        decode_tokens += greedy.len().saturating_sub(1);
        let greedy_agree = greedy
            .iter()
            .zip(&p.greedy)
            .take_while(|(a, b)| a == b)
            .count();
        prompts.push(PromptResult {
            text: p.text.clone(),
            same_tokens: ours == p.tokens,
            top1_chorus,
            top1_reference,
            top1_gap,
            max_abs_diff,
            mean_abs_diff,
            greedy_agree,
            greedy_len: p.greedy.len(),
            greedy_chorus: tokenizer.decode(&greedy)?,
            greedy_reference: tokenizer.decode(&p.greedy)?,
        });
    }
    let mut tokenizer_mismatches = Vec::new();
    for case in &reference.tokenizer {
        let ours = tokenizer.encode(&case.text)?;
        if ours != case.tokens {
            tokenizer_mismatches.push(format!(
                "{:?}: chorus {:?}, reference {:?}",
                case.text, ours, case.tokens
            ));
        }
    }
    let report = Report {
        tolerance,
        prompts,
        tokenizer_cases: reference.tokenizer.len(),
        tokenizer_mismatches,
        chorus: Timing {
            load_s,
            prefill_tokens_per_s: prefill_tokens as f64 / prefill_s,
            decode_tokens_per_s: decode_tokens as f64 / decode_s,
            peak_rss_mb: peak_rss_mb(),
        },
        reference: reference.timing,
    };

    println!(
        "prompt                                    tokens  top-1 (chorus/reference)  max|Δ|     mean|Δ|    greedy agree"
    );
    for p in &report.prompts {
        let short: String = p
            .text
            .chars()
            .take(40)
            .collect::<String>()
            .replace('\n', "⏎");
        println!(
            "{short:<42}{:<8}{:>8} / {:<14}{:>9.2e} {:>9.2e}  {}/{}",
            if p.same_tokens { "same" } else { "DIFFER" },
            p.top1_chorus,
            p.top1_reference,
            p.max_abs_diff,
            p.mean_abs_diff,
            p.greedy_agree,
            p.greedy_len
        );
    }
    for p in report
        .prompts
        .iter()
        .filter(|p| p.top1_chorus != p.top1_reference)
    {
        let verdict = match p.top1_gap {
            Some(gap) if top1_agrees(p.top1_gap, tolerance) => {
                format!("{gap:.3} below its top: a near tie (≤ 2 × tolerance)")
            }
            Some(gap) => format!("{gap:.3} below its top: more than 2 × tolerance"),
            None => "not among its top ids".to_string(),
        };
        println!(
            "\n{:?}: top-1 {} where the reference has {}; the reference puts {} {verdict}",
            p.text, p.top1_chorus, p.top1_reference, p.top1_chorus
        );
    }
    for p in report
        .prompts
        .iter()
        .filter(|p| p.greedy_agree < p.greedy_len)
    {
        println!(
            "\n{:?}\n  chorus:    {:?}\n  reference: {:?}",
            p.text, p.greedy_chorus, p.greedy_reference
        );
    }
    println!(
        "\ntokenizer: {}/{} strings give identical ids",
        report.tokenizer_cases - report.tokenizer_mismatches.len(),
        report.tokenizer_cases
    );
    for m in &report.tokenizer_mismatches {
        println!("  {m}");
    }
    println!("\n                 load s   prefill tok/s   decode tok/s   peak RSS MB");
    let ours = format!("chorus ({})", B::name(device));
    for (name, t) in std::iter::once((ours.as_str(), &report.chorus))
        .chain(report.reference.as_ref().map(|t| ("reference", t)))
    {
        println!(
            "{name:<17}{:>6.2}   {:>13.1}   {:>12.1}   {:>11.0}",
            t.load_s, t.prefill_tokens_per_s, t.decode_tokens_per_s, t.peak_rss_mb
        );
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failures: Vec<String> = report
        .prompts
        .iter()
        .filter(|p| {
            !top1_agrees(p.top1_gap, tolerance)
                || p.max_abs_diff.is_nan()
                || p.max_abs_diff > tolerance
                || !p.same_tokens
        })
        .map(|p| format!("{:?}", p.text))
        .collect();
    // Token ids must always agree; --report-only relaxes the logits only.
    let token_failures = report.prompts.iter().filter(|p| !p.same_tokens).count()
        + report.tokenizer_mismatches.len();
    if token_failures > 0 || (!report_only && !failures.is_empty()) {
        bail!(
            "disagreement with the reference: {} prompt(s) off in top-1 by more than a near tie or |Δlogit| > {tolerance} ({}){}, {} prompt(s) and {} tokenizer string(s) tokenized differently",
            failures.len(),
            failures.join(", "),
            if report_only { " (reported only)" } else { "" },
            report.prompts.iter().filter(|p| !p.same_tokens).count(),
            report.tokenizer_mismatches.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::top1_agrees;

    /// "def fibonacci(n):": llama.cpp's logit of chorus's top-1 is 0.117 below its own top-1's.
    #[test]
    fn a_top1_differs_only_by_a_near_tie_of_twice_the_tolerance() {
        assert!(top1_agrees(Some(0.0), 0.0));
        assert!(top1_agrees(Some(0.117), 1.0));
        assert!(top1_agrees(Some(0.117), 0.06));
        assert!(!top1_agrees(Some(0.117), 0.05));
        // chorus's choice is not among the reference's top ids: far from any tie.
        assert!(!top1_agrees(None, 1.0));
    }
}
