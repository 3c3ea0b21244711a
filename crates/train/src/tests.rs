//! Tests of the data pipeline (truncation, length-sorted and uniformly shuffled epochs, each task's
//! subset), the schedule, the loop (loss goes down, exact resume, NaN stop), checkpoints
//! (interrupted and truncated writes, `best/` after a kill), score caches and configs.

use std::path::Path;

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::prelude::*;
use chorus_data::{Example, Split, Task};
use chorus_lm::{LlamaConfig, Lm, LmConfig, Tokenizer};
use chorus_model::{Assistant, Chorus, ChorusConfig, LocalLm};

use crate::run::{Loop, run_loop};
use crate::{
    DataConfig, Encoded, OptimConfig, PretrainConfig, ScoreCache, TokenBatch, TrainConfig,
    TrainError, encode_examples, epoch_batches, latest_checkpoint, learning_rate, list_checkpoints,
    load_chorus, load_config, load_task_examples, read_state, score_assistants,
};

type B = NdArray<f32>;
type AD = Autodiff<B>;

const VOCAB: usize = 24;

/// burn-ndarray's RNG is one global: tests that train (and so draw random numbers) take turns, or
/// their draws would interleave and runs would not be reproducible.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn tokenizer() -> Tokenizer {
    let texts = [
        "the cat sat on the mat.",
        "a dog ran to the log!",
        "what did the cat see?",
    ];
    Tokenizer::train_bpe(texts.iter().cycle().take(60), 300, &["<|endoftext|>"]).unwrap()
}

fn llama(vocab: usize) -> LmConfig {
    LmConfig::Llama(LlamaConfig {
        vocab_size: vocab,
        d_model: 16,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        d_ff: 32,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        max_seq_len: 64,
    })
}

/// Arithmetic sequences mod (VOCAB − 1) over ids 1.., stride 1–3 (a per-sequence latent), with a
/// 2-token context; EOS = 0 opens and closes each row.
fn synthetic(n: usize, offset: usize) -> Vec<Encoded> {
    (0..n)
        .map(|i| {
            let i = i + offset;
            let stride = 1 + i % 3;
            let start = (i * 7) % (VOCAB - 1);
            let len = 6 + i % 5;
            let mut tokens = vec![0u32];
            tokens.extend((0..len).map(|t| 1 + ((start + t * stride) % (VOCAB - 1)) as u32));
            tokens.push(0);
            Encoded {
                task: [Task::Story, Task::Dialogue][i % 2],
                tokens,
                context_len: 2,
                target_bytes: 3 * len,
            }
        })
        .collect()
}

fn optim(steps: u64) -> OptimConfig {
    OptimConfig {
        steps,
        lr: 1e-2,
        warmup_steps: 2,
        log_every: 5,
        eval_every: 0,
        iw_samples: 2,
        checkpoint_every: 0,
        ..OptimConfig::default()
    }
}

fn joint(config: ChorusConfig, n_assistants: usize) -> (Chorus<AD>, Vec<String>) {
    joint_seeded(config, n_assistants, 7)
}

/// A joint model initialised from `seed` (callers hold [`rng_lock`]).
fn joint_seeded(config: ChorusConfig, n_assistants: usize, seed: u64) -> (Chorus<AD>, Vec<String>) {
    let device = Default::default();
    AD::seed(&device, seed);
    let base = llama(VOCAB).init::<AD>(&device).unwrap();
    let assistants: Vec<Lm<AD>> = (0..n_assistants)
        .map(|_| llama(VOCAB).init::<AD>(&device).unwrap())
        .collect();
    let sources = Vec::<String>::new();
    (
        Chorus::new(config, base, assistants, &device).unwrap(),
        sources,
    )
}

fn z_config() -> ChorusConfig {
    ChorusConfig {
        d_latent: 4,
        ..ChorusConfig::default()
    }
}

#[allow(clippy::too_many_arguments)]
fn fit(
    model: Chorus<AD>,
    sources: Vec<String>,
    train: &[Encoded],
    valid: &[Encoded],
    optim: &OptimConfig,
    out: &Path,
    resume: bool,
) -> Result<crate::TrainSummary, TrainError> {
    fit_with(model, sources, train, valid, optim, 4, out, resume, None)
}

#[allow(clippy::too_many_arguments)]
fn fit_with(
    model: Chorus<AD>,
    sources: Vec<String>,
    train: &[Encoded],
    valid: &[Encoded],
    optim: &OptimConfig,
    batch_size: usize,
    out: &Path,
    resume: bool,
    gradient_hook: Option<&crate::step::GradientHook>,
) -> Result<crate::TrainSummary, TrainError> {
    let tok = tokenizer();
    run_loop(
        Loop {
            sources,
            tokenizer: &tok,
            train,
            valid,
            train_scores: None,
            valid_scores: None,
            optim,
            batch_size,
            out,
            resume,
            gradient_hook,
            progress: &mut crate::Silent,
        },
        model,
        &Default::default(),
    )
}

/// Every float parameter of a saved joint model, in module order.
fn parameters(dir: &Path) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl burn::module::ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0
                .extend(param.val().into_data().to_vec::<f32>().unwrap());
        }
    }
    let (saved, _) = load_chorus::<B>(dir, &Default::default()).unwrap();
    let model = saved.model;
    let mut c = Collect(Vec::new());
    burn::module::Module::visit(&model, &mut c);
    c.0
}

fn metric_rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn batches_mask_exactly_the_target_and_never_leak_it_into_the_context() {
    let tok = tokenizer();
    let eos = tok.token_to_id("<|endoftext|>").unwrap();
    let examples = vec![
        Example {
            task: Task::Dialogue,
            document: "d".into(),
            split: Split::Train,
            context: "the cat sat on the mat.".into(),
            target: " a dog ran!".into(),
        },
        Example {
            task: Task::OpenEnded,
            document: "e".into(),
            split: Split::Train,
            context: String::new(),
            target: "what did the cat see?".into(),
        },
    ];
    let encoded = encode_examples(&examples, &tok, "<|endoftext|>", 64).unwrap();
    let refs: Vec<&Encoded> = encoded.iter().collect();
    let batch = TokenBatch::new(&refs);
    let seq = batch.seq;
    assert_eq!(seq, encoded.iter().map(Encoded::input_len).max().unwrap());
    for (r, (e, ex)) in encoded.iter().zip(&examples).enumerate() {
        let row = |v: &Vec<f32>| v[r * seq..(r + 1) * seq].to_vec();
        let padding = &batch.padding[r * seq..(r + 1) * seq];
        // Padding exactly after the row's input length.
        assert_eq!(padding.iter().filter(|p| !**p).count(), e.input_len());
        assert!(padding[..e.input_len()].iter().all(|p| !p));
        // Context positions hold exactly the context's tokens.
        let context: Vec<u32> = (0..seq)
            .filter(|&t| row(&batch.context_mask)[t] > 0.0)
            .map(|t| batch.tokens[r * seq + t] as u32)
            .collect();
        assert_eq!(context, tok.encode(&ex.context).unwrap());
        // Scored targets are exactly the target's tokens and its EOS.
        let scored: Vec<u32> = (0..seq)
            .filter(|&t| row(&batch.target_mask)[t] > 0.0)
            .map(|t| batch.targets[r * seq + t] as u32)
            .collect();
        let mut want = tok.encode(&ex.target).unwrap();
        want.push(eos);
        assert_eq!(scored, want);
        assert_eq!(scored.len(), e.n_targets());
        // No scored target is readable at or before its own position, and the context (what the
        // prior reads) ends before the first scored target is an input.
        for t in 0..seq {
            if row(&batch.target_mask)[t] > 0.0 {
                // The target at t is the row's token t + 1 (read from the encoded row, not
                // from the batch, whose next slot may be padding or the next row).
                assert_eq!(batch.targets[r * seq + t], i64::from(e.tokens[t + 1]));
                for u in 0..=t {
                    assert!(row(&batch.context_mask)[u] == 0.0 || u <= e.context_len);
                }
                assert!(t >= e.context_len, "target at {t} inside the context");
            }
        }
    }
}

#[test]
fn long_rows_are_truncated_within_the_budget() {
    let tok = tokenizer();
    let long = "the cat sat on the mat. ".repeat(20);
    let examples = vec![Example {
        task: Task::Story,
        document: "d".into(),
        split: Split::Train,
        context: long.clone(),
        target: long,
    }];
    let e = &encode_examples(&examples, &tok, "<|endoftext|>", 16).unwrap()[0];
    assert_eq!(e.input_len(), 16);
    assert_eq!(e.context_len, 16 / 4);
    let eos = tok.token_to_id("<|endoftext|>").unwrap();
    assert_ne!(*e.tokens.last().unwrap(), eos, "a cut target loses its EOS");
    // The cut target's bytes are those of the text its kept tokens decode to.
    let kept = &e.tokens[1 + e.context_len..];
    assert_eq!(e.target_bytes, tok.decode(kept).unwrap().len());
    assert!(e.target_bytes > 0 && e.target_bytes < examples[0].target.len());
    let short = vec![Example {
        target: "the cat.".into(),
        context: String::new(),
        ..examples[0].clone()
    }];
    let whole = &encode_examples(&short, &tok, "<|endoftext|>", 16).unwrap()[0];
    assert_eq!(whole.target_bytes, "the cat.".len());
    let err = encode_examples(&examples, &tok, "<eos>", 16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("<eos>"), "{err}");
}

#[test]
fn epoch_batches_cover_every_example_once_deterministically() {
    let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 50).collect();
    let a = epoch_batches(&lengths, 8, 1, 0);
    assert_eq!(a, epoch_batches(&lengths, 8, 1, 0));
    assert_ne!(a, epoch_batches(&lengths, 8, 1, 1));
    let mut all: Vec<usize> = a.iter().flatten().copied().collect();
    all.sort();
    assert_eq!(all, (0..103).collect::<Vec<_>>());
    assert!(a.iter().all(|b| b.len() <= 8));
}

#[test]
fn over_long_rows_lose_the_oldest_context_first_then_the_end_of_the_target() {
    let tok = tokenizer();
    let eos = tok.token_to_id("<|endoftext|>").unwrap();
    let example = |context: &str, target: &str| Example {
        task: Task::Story,
        document: "d".into(),
        split: Split::Train,
        context: context.into(),
        target: target.into(),
    };
    let encode = |e: &Example, budget: usize| {
        encode_examples(std::slice::from_ref(e), &tok, "<|endoftext|>", budget).unwrap()[0].clone()
    };
    let row = |context: &[u32], target: &[u32]| {
        let mut row = vec![eos];
        row.extend_from_slice(context);
        row.extend_from_slice(target);
        row
    };

    let e = example(
        &"the cat sat on the mat. a dog ran to the log!".repeat(2),
        &" what did the cat see?".repeat(3),
    );
    let context = tok.encode(&e.context).unwrap();
    let mut target = tok.encode(&e.target).unwrap();
    target.push(eos);
    let (lc, lx) = (context.len(), target.len());
    // A row of exactly the budget is kept whole.
    let whole = encode(&e, lc + lx);
    assert_eq!(whole.tokens, row(&context, &target));
    assert_eq!(
        (whole.context_len, whole.target_bytes),
        (lc, e.target.len())
    );
    // One token over: the context's first token goes, the target stays whole with its EOS.
    let cut = encode(&e, lc + lx - 1);
    assert_eq!(cut.tokens, row(&context[1..], &target));
    assert_eq!(
        (cut.context_len, cut.target_bytes),
        (lc - 1, e.target.len())
    );
    // The context keeps its most recent tokens, down to a quarter of the budget; then the target
    // is cut from the right.
    let budget = 16;
    let min_c = budget / 4;
    assert!(lc > min_c && lx > budget - min_c);
    let cut = encode(&e, budget);
    let keep_x = budget - min_c;
    assert_eq!(cut.tokens, row(&context[lc - min_c..], &target[..keep_x]));
    assert_eq!(cut.context_len, min_c);
    assert_eq!(
        cut.target_bytes,
        tok.decode(&target[..keep_x]).unwrap().len()
    );

    // A context shorter than a quarter of the budget is kept whole; the target takes the rest.
    let long_target = " the cat sat on the mat.".repeat(8);
    let e = example("the cat.", &long_target);
    let context = tok.encode(&e.context).unwrap();
    let target = tok.encode(&long_target).unwrap();
    let budget = 16;
    assert!(context.len() < budget / 4 && target.len() > budget);
    let cut = encode(&e, budget);
    assert_eq!(cut.tokens, row(&context, &target[..budget - context.len()]));
    assert_eq!(cut.context_len, context.len());
    // No context (open-ended text): the target takes the whole budget.
    let cut = encode(&example("", &long_target), budget);
    assert_eq!(cut.tokens, row(&[], &target[..budget]));
    assert_eq!(cut.context_len, 0);

    // Four inputs are the shortest row; three are refused, naming the setting.
    assert_eq!(encode(&e, 4).input_len(), 4);
    let err = encode_examples(&[e], &tok, "<|endoftext|>", 3)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data.max_seq_len") && err.contains('3'),
        "{err}"
    );
}

#[test]
fn an_epoch_batches_rows_of_neighbouring_lengths_in_shuffled_order() {
    // 103 distinct lengths (a permutation of 0..103) fit one window of 50 batches of 8: sorted by
    // length, the batches hold lengths 0–7, 8–15, …, 96–102, and come in shuffled order.
    let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 103).collect();
    let batches = epoch_batches(&lengths, 8, 1, 0);
    let mut spans: Vec<Vec<usize>> = batches
        .iter()
        .map(|b| {
            let mut l: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
            l.sort();
            l
        })
        .collect();
    let in_order: Vec<usize> = spans.iter().map(|l| l[0]).collect();
    spans.sort();
    let want: Vec<Vec<usize>> = (0..103)
        .collect::<Vec<_>>()
        .chunks(8)
        .map(<[usize]>::to_vec)
        .collect();
    assert_eq!(spans, want);
    let mut sorted = in_order.clone();
    sorted.sort();
    assert_ne!(in_order, sorted, "the batches are shuffled");
    // Each (seed, epoch) its own order of the same batches: 16 seeds × 3 epochs, 48 orders.
    let mut orders = std::collections::HashSet::new();
    for seed in 0..16 {
        for epoch in 0..3 {
            let other = epoch_batches(&lengths, 8, seed, epoch);
            assert_eq!(other.len(), batches.len());
            assert!(
                orders.insert(other),
                "seed {seed}, epoch {epoch}: an order seen before"
            );
        }
    }
}

/// Fisher–Yates draws every order with probability 1/n!. Over 6,000 seeds, each of the 6 orders of
/// 3 examples of one length (batches of one, so the epoch is two shuffles) comes 1,000 ± 150 times
/// (σ ≈ 29). Drawing j from 0..i instead of 0..=i (Sattolo's cycles) would never swap just two.
#[test]
fn an_epoch_draws_every_order_of_its_examples_equally_often() {
    let mut counts = std::collections::BTreeMap::<Vec<usize>, usize>::new();
    for seed in 0..6000 {
        let order: Vec<usize> = epoch_batches(&[5, 5, 5], 1, seed, 0)
            .into_iter()
            .flatten()
            .collect();
        *counts.entry(order).or_default() += 1;
    }
    assert_eq!(counts.len(), 6, "{counts:?}");
    for (order, n) in &counts {
        assert!(
            (850..=1150).contains(n),
            "{order:?} came {n} times of 6,000"
        );
    }
}

#[test]
fn each_task_keeps_a_fixed_subset_chosen_by_the_hash_of_document_and_position() {
    use chorus_data::rng::stable_hash;
    let example = |task, split, document: &str, n: usize| Example {
        task,
        document: document.into(),
        split,
        context: format!("context {n}"),
        target: format!("target {n}"),
    };
    let mut all = Vec::new();
    for n in 0..7 {
        all.push(example(Task::Story, Split::Train, "novel", n));
        all.push(example(Task::Dialogue, Split::Train, "chat", n));
        all.push(example(Task::OpenEnded, Split::Valid, "wiki", n));
    }
    all.push(example(Task::Story, Split::Valid, "novel", 99));
    let config = DataConfig {
        tasks: vec![Task::Dialogue, Task::Story],
        ..DataConfig::default()
    };
    let targets = |v: &[Example]| -> Vec<String> { v.iter().map(|e| e.target.clone()).collect() };
    let of = |task| -> Vec<Example> {
        all.iter()
            .filter(|e| e.task == task && e.split == Split::Train)
            .cloned()
            .collect()
    };
    // 0 = all, and a limit at or above the count keeps all: tasks in the config's order, each
    // in corpus order.
    let every = [of(Task::Dialogue), of(Task::Story)].concat();
    for limit in [0, 7, 8] {
        let got = load_task_examples(&all, &config, Split::Train, limit).unwrap();
        assert_eq!(targets(&got), targets(&every), "limit {limit}");
    }
    // A limit keeps, per task, the examples whose hash of "document#position" is smallest.
    let smallest = |task, k: usize| -> Vec<Example> {
        let mut v: Vec<(u64, Example)> = of(task)
            .into_iter()
            .enumerate()
            .map(|(i, e)| (stable_hash(&format!("{}#{i}", e.document)), e))
            .collect();
        v.sort_by_key(|(h, _)| *h);
        v.into_iter().take(k).map(|(_, e)| e).collect()
    };
    for limit in [1, 3, 6] {
        let got = load_task_examples(&all, &config, Split::Train, limit).unwrap();
        let want = [
            smallest(Task::Dialogue, limit),
            smallest(Task::Story, limit),
        ]
        .concat();
        assert_eq!(targets(&got), targets(&want), "limit {limit}");
    }
    assert_ne!(
        targets(&smallest(Task::Story, 3)),
        targets(&of(Task::Story)[..3]),
        "the fixture must tell the hash's choice from the first examples"
    );
    // A task without examples in the split is an error naming it.
    let err = load_task_examples(&all, &config, Split::Valid, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dialogue") && err.contains("no examples"),
        "{err}"
    );
}

#[test]
fn learning_rate_warms_up_then_follows_the_cosine() {
    // lr and m away from 0 and 1, so that a product swapped for a quotient or a sum shows.
    let (lr, m) = (0.003, 0.2);
    let config = |warmup_steps, steps| OptimConfig {
        steps,
        lr,
        warmup_steps,
        min_lr_ratio: m,
        ..OptimConfig::default()
    };
    let close = |got: f64, want: f64, what: &str| {
        assert!((got - want).abs() <= 1e-15, "{what}: {got} vs {want}");
    };
    // W = 4, S = 11: warm-up at steps 0–3, then p = (s − 4) / 6 for s = 4…10, so the cosine is read
    // where cos(π p) is known exactly: p = 0, 1/3, 1/2, 2/3, 1.
    let c = config(4, 11);
    for s in 0..4 {
        close(learning_rate(&c, s), lr * (s + 1) as f64 / 4.0, "warm-up");
    }
    for (s, cos) in [(4, 1.0), (6, 0.5), (7, 0.0), (8, -0.5), (10, -1.0)] {
        let want = lr * (m + (1.0 - m) * (1.0 + cos) / 2.0);
        close(learning_rate(&c, s), want, &format!("cosine at step {s}"));
    }
    // Strictly decreasing after the warm-up; past the last step it stays at m · lr.
    for s in 4..10 {
        assert!(learning_rate(&c, s + 1) < learning_rate(&c, s), "step {s}");
    }
    for s in [11, 12, 1000] {
        close(learning_rate(&c, s), m * lr, "past the end");
    }
    // No warm-up starts at lr; one step is all lr.
    close(learning_rate(&config(0, 11), 0), lr, "W = 0");
    close(learning_rate(&config(0, 1), 0), lr, "S = 1");
    // A warm-up as long as the run: it ends at lr at its last step, then decays over one step.
    let c = config(5, 5);
    close(learning_rate(&c, 4), lr, "the last warm-up step");
    close(learning_rate(&c, 5), lr, "p = 0 after it");
    close(learning_rate(&c, 6), m * lr, "p = 1 one step later");
}

#[test]
fn the_loop_drives_the_loss_down_on_a_synthetic_task() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let train = synthetic(64, 0);
    let valid = synthetic(8, 1000);
    let (model, sources) = joint(
        ChorusConfig {
            d_latent: 0,
            ..ChorusConfig::default()
        },
        0,
    );
    let summary = fit(
        model,
        sources,
        &train,
        &valid,
        &optim(60),
        dir.path(),
        false,
    )
    .unwrap();
    let rows: Vec<f64> = metric_rows(dir.path())
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["nll_per_token"].as_f64().unwrap())
        .collect();
    let (first, last) = (rows[0], *rows.last().unwrap());
    assert!(first > 2.5, "starts near log(24) ≈ 3.2: {first}");
    assert!(last < 0.6 * first, "loss {first} → {last}");
    let (_, best) = summary.best_valid_nll.unwrap();
    assert!(best < 0.7 * (VOCAB as f64).ln(), "valid NLL {best}");
    // The CSV mirrors the JSONL: its header, then each row's values in the header's order (empty
    // where the row has none).
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header[..4], ["step", "kind", "lr", "loss"]);
    let jsonl_rows = metric_rows(dir.path());
    assert_eq!(lines.clone().count(), jsonl_rows.len());
    for (line, row) in lines.zip(&jsonl_rows) {
        let expected: Vec<String> = header
            .iter()
            .map(|column| match &row[*column] {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s.clone(),
                value => value.to_string(),
            })
            .collect();
        assert_eq!(line.split(',').collect::<Vec<_>>(), expected, "{row}");
    }
}

/// A model with the bag-of-words term logs `bow_nll_per_token` (−log p_bow per target token) in
/// each training row and the CSV, and training lowers it: the head learns the words from z. A
/// model without the term logs no such value.
#[test]
fn the_bag_of_words_term_is_logged_and_learned() {
    let _rng = rng_lock();
    let train = synthetic(64, 0);
    let valid = synthetic(8, 1000);
    for bag_of_words in [1.0, 0.0] {
        let dir = tempfile::tempdir().unwrap();
        let (model, sources) = joint(
            ChorusConfig {
                bag_of_words,
                ..z_config()
            },
            0,
        );
        fit(
            model,
            sources,
            &train,
            &valid,
            &optim(40),
            dir.path(),
            false,
        )
        .unwrap();
        let bow: Vec<Option<f64>> = metric_rows(dir.path())
            .iter()
            .filter(|r| r["kind"] == "train")
            .map(|r| r["bow_nll_per_token"].as_f64())
            .collect();
        let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        let last_column: Vec<&str> = csv
            .lines()
            .filter(|l| l.contains(",train,"))
            .map(|l| l.rsplit(',').next().unwrap())
            .collect();
        if bag_of_words > 0.0 {
            let bow: Vec<f64> = bow.into_iter().map(Option::unwrap).collect();
            let (first, last) = (bow[0], *bow.last().unwrap());
            assert!(
                first.is_finite() && last < first,
                "bow nll/token {first} → {last}"
            );
            assert!(
                last_column.iter().all(|c| c.parse::<f64>().is_ok()),
                "{csv}"
            );
        } else {
            assert!(bow.iter().all(Option::is_none), "{bow:?}");
            assert!(last_column.iter().all(|c| c.is_empty()), "{csv}");
        }
    }
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let train = synthetic(24, 0);
    let valid = synthetic(4, 500);
    let optim = OptimConfig {
        checkpoint_every: 3,
        keep_last: 5,
        accumulation: 2,
        ..optim(6)
    };
    let config = z_config();
    let (model, sources) = joint(config.clone(), 1);
    let summary = fit(
        model,
        sources.clone(),
        &train,
        &valid,
        &optim,
        dir.path(),
        false,
    )
    .unwrap();
    // 6 steps of 2 micro-batches of 4 rows are 2 epochs of the 24 examples: each target token
    // trained on twice.
    let targets_of_two_epochs = 2 * train.iter().map(|e| e.n_targets() as u64).sum::<u64>();
    assert_eq!(summary.tokens_seen, targets_of_two_epochs);
    let steps: Vec<u64> = list_checkpoints(dir.path()).iter().map(|c| c.0).collect();
    assert_eq!(steps, vec![3, 6]);
    let final_dir = latest_checkpoint(dir.path()).unwrap();
    let uninterrupted = parameters(&final_dir);
    let uninterrupted_bytes = std::fs::read(final_dir.join("model.mpk")).unwrap();
    // A second uninterrupted run writes the same bytes: parameter ids are numbered, not random.
    let again = tempfile::tempdir().unwrap();
    let (model, _) = joint(config.clone(), 1);
    fit(
        model,
        sources.clone(),
        &train,
        &valid,
        &optim,
        again.path(),
        false,
    )
    .unwrap();
    let again_final = latest_checkpoint(again.path()).unwrap();
    assert!(std::fs::read(again_final.join("model.mpk")).unwrap() == uninterrupted_bytes);
    let without_rate = |rows: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        rows.into_iter()
            .map(|mut r| {
                r.as_object_mut().unwrap().remove("tokens_per_s");
                r
            })
            .collect()
    };
    let uninterrupted_rows = without_rate(metric_rows(dir.path()));
    // "Crash" after step 3: the later checkpoint never happened, and the kill tore a metrics line.
    std::fs::remove_dir_all(&final_dir).unwrap();
    let mut jsonl = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("metrics.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut jsonl, b"{\"step\": 4, \"kind\": \"tr").unwrap();
    // A fresh model from another random init resumes from step 3: only the checkpoint can make
    // it end where the uninterrupted run ended.
    let (fresh, _) = joint_seeded(config, 1, 99);
    let summary = fit(fresh, sources, &train, &valid, &optim, dir.path(), true).unwrap();
    assert_eq!((summary.steps, summary.steps_run), (6, 3));
    assert_eq!(
        summary.tokens_seen, targets_of_two_epochs,
        "tokens seen across the resume"
    );
    let resumed_dir = latest_checkpoint(dir.path()).unwrap();
    // Bitwise equal parameters after 3 more steps also means the AdamW moments, the data order,
    // the z noise and the schedules were restored exactly (the optimizer file itself is a hash map
    // serialised in arbitrary order, so its bytes are not compared).
    let resumed = parameters(&resumed_dir);
    assert_eq!(resumed.len(), uninterrupted.len());
    assert!(resumed == uninterrupted, "parameters differ after resume");
    // And the run did move: step 3's parameters are different.
    assert!(parameters(&dir.path().join("checkpoints/step-00000003")) != resumed);
    // The resumed checkpoint is the same file, byte for byte.
    assert!(std::fs::read(resumed_dir.join("model.mpk")).unwrap() == uninterrupted_bytes);
    // The metrics were rewritten, not duplicated, the torn line is gone, and the rows (whose
    // windows span the crash) equal the uninterrupted run's but for the wall-clock rate.
    assert_eq!(without_rate(metric_rows(dir.path())), uninterrupted_rows);
    let steps: Vec<u64> = uninterrupted_rows
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![5, 6]);
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + uninterrupted_rows.len());
}

/// Two steps of a joint model with z and one assistant on `synthetic(16, 0)`, validated on
/// `synthetic(4, 500)` and checkpointed at step 2 under `out`; returns the run's optimiser config.
fn checkpointed_run(out: &Path) -> OptimConfig {
    let optim = OptimConfig {
        checkpoint_every: 2,
        ..optim(2)
    };
    let (model, sources) = joint(z_config(), 1);
    let (train, valid) = (synthetic(16, 0), synthetic(4, 500));
    fit(model, sources, &train, &valid, &optim, out, false).unwrap();
    optim
}

#[test]
fn interrupted_or_truncated_checkpoints_never_replace_the_last_good_one() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    checkpointed_run(dir.path());
    let good = latest_checkpoint(dir.path()).unwrap();
    // Killed between the temp write and the rename: a partial temp directory is left behind.
    let partial = dir.path().join("checkpoints/.tmp-step-00000004");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("model.mpk"), b"partial").unwrap();
    assert_eq!(latest_checkpoint(dir.path()).unwrap(), good);
    load_chorus::<B>(&good, &Default::default()).unwrap();
    // A truncated file inside a checkpoint is a clear error naming it.
    let model_file = good.join("model.mpk");
    let bytes = std::fs::read(&model_file).unwrap();
    std::fs::write(&model_file, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_state(&good).unwrap_err().to_string();
    assert!(
        err.contains("model.mpk") && err.contains("truncated"),
        "{err}"
    );
    let err = load_chorus::<B>(&good, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");
    // Without state.json (never committed), a directory is not a checkpoint.
    std::fs::remove_file(good.join("state.json")).unwrap();
    assert!(
        read_state(&good)
            .unwrap_err()
            .to_string()
            .contains("incomplete")
    );
}

/// `state.json` holds the sha256 of every other file of a checkpoint — `tokenizer_config.json`
/// too, which a tokenizer with a BOS token writes — and damage to any of them is named.
#[test]
fn every_file_of_a_checkpoint_is_checksummed() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    // A tokenizer with a BOS: saved, given a tokenizer_config.json, read back.
    let tok_dir = dir.path().join("tokenizer");
    std::fs::create_dir_all(&tok_dir).unwrap();
    tokenizer().save(tok_dir.join("tokenizer.json")).unwrap();
    write(
        &tok_dir,
        chorus_lm::TOKENIZER_CONFIG,
        r#"{"bos_token": "<|endoftext|>"}"#,
    );
    let tok = Tokenizer::from_file(tok_dir.join("tokenizer.json")).unwrap();
    assert!(tok.bos_id().is_some());
    let (model, sources) = joint(z_config(), 1);
    let optimizer = crate::AdamW::default().init::<AD, Chorus<AD>>();
    let state = crate::checkpoint::CheckpointState::at_step(1, 2);
    let out = dir.path().join("out");
    let ckpt =
        crate::checkpoint::save_checkpoint(&out, &model, &optimizer, &sources, &tok, state, 1)
            .unwrap();
    let mut on_disk: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f != "state.json")
        .collect();
    on_disk.sort();
    let recorded: Vec<String> = read_state(&ckpt).unwrap().files.into_keys().collect();
    assert_eq!(recorded, on_disk);
    assert!(on_disk.iter().any(|f| f == chorus_lm::TOKENIZER_CONFIG));
    write(
        &ckpt,
        chorus_lm::TOKENIZER_CONFIG,
        r#"{"bos_token": "the"}"#,
    );
    let err = read_state(&ckpt).unwrap_err().to_string();
    assert!(
        err.contains(chorus_lm::TOKENIZER_CONFIG) && err.contains("corrupt"),
        "{err}"
    );
}

/// `--resume` continues only the run that wrote the checkpoint: another seed, base, assistant,
/// chorus setting or source list is refused, each with the checkpoint named.
#[test]
fn resume_refuses_a_checkpoint_of_other_models_or_another_seed() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let optim = checkpointed_run(dir.path());
    let (train, valid) = (synthetic(16, 0), synthetic(4, 500));
    let resume = |model: Chorus<AD>, sources: Vec<String>, optim: &OptimConfig| {
        let optim = OptimConfig {
            steps: 4,
            ..optim.clone()
        };
        fit(model, sources, &train, &valid, &optim, dir.path(), true)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let other_seed = OptimConfig {
        seed: optim.seed + 1,
        ..optim.clone()
    };
    let (model, sources) = joint(z_config(), 1);
    let e = resume(model, sources, &other_seed);
    assert!(e.contains("step-00000002") && e.contains("seed"), "{e}");
    let device = Default::default();
    let wider = || {
        LmConfig::Llama(LlamaConfig {
            d_model: 24,
            ..match llama(VOCAB) {
                LmConfig::Llama(c) => c,
                LmConfig::Gpt2(_) => unreachable!("the fixture is a llama"),
            }
        })
        .init::<AD>(&device)
        .unwrap()
    };
    let plain = || llama(VOCAB).init::<AD>(&device).unwrap();
    let models: [(&str, Chorus<AD>, Vec<String>); 4] = [
        (
            "another base",
            Chorus::new(z_config(), wider(), vec![plain()], &device).unwrap(),
            Vec::new(),
        ),
        (
            "another assistant",
            Chorus::new(z_config(), plain(), vec![wider()], &device).unwrap(),
            Vec::new(),
        ),
        (
            "another chorus setting",
            joint(
                ChorusConfig {
                    d_latent: 2,
                    ..z_config()
                },
                1,
            )
            .0,
            Vec::new(),
        ),
        (
            "other sources",
            joint(z_config(), 1).0,
            vec!["base".into(), "assistant".into()],
        ),
    ];
    for (what, model, sources) in models {
        let e = resume(model, sources, &optim);
        assert!(
            e.contains("step-00000002") && e.contains("differ from the config"),
            "{what}: {e}"
        );
    }
}

#[test]
fn divergence_stops_training_and_keeps_the_last_good_checkpoint() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let train = synthetic(16, 0);
    let optim = OptimConfig {
        lr: 1e30,
        warmup_steps: 0,
        grad_clip: 0.0,
        checkpoint_every: 1,
        keep_last: 10,
        ..optim(20)
    };
    let (model, sources) = joint(
        ChorusConfig {
            d_latent: 0,
            ..ChorusConfig::default()
        },
        0,
    );
    let err = fit(model, sources, &train, &[], &optim, dir.path(), false).unwrap_err();
    let TrainError::NonFinite {
        step, last_good, ..
    } = &err
    else {
        panic!("expected NonFinite, got {err}");
    };
    let message = err.to_string();
    assert!(message.contains("non-finite"), "{message}");
    let last_good = last_good.as_ref().expect("a checkpoint was written before");
    assert_eq!(read_state(last_good).unwrap().step, *step);
    assert_eq!(latest_checkpoint(dir.path()).unwrap(), *last_good);
    load_chorus::<B>(last_good, &Default::default()).unwrap();
}

#[test]
fn training_on_the_score_cache_equals_live_assistants_with_several_z_samples() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let config = ChorusConfig {
        n_samples: 3,
        assistant_adapters: false,
        ..z_config()
    };
    let (model, _) = joint(config, 2);
    let data = synthetic(9, 0);
    // The real path: `score_assistants` writes the cache, `ScoreCache::open` maps it, and
    // `TokenBatch::with_scores` fills a batch of examples in an order other than the cache's.
    let inner = model.valid();
    let fp = crate::scores::fingerprint(&data, &["a".into(), "b".into()]);
    let members: Vec<LocalLm<B>> = inner.assistants.iter().map(LocalLm::new).collect();
    let members: Vec<&dyn Assistant<B>> = members.iter().map(|m| m as &dyn Assistant<B>).collect();
    score_assistants(&members, &data, &fp, 4, dir.path(), &device, |_| {}).unwrap();
    let cache = ScoreCache::open(dir.path(), &fp).unwrap();
    let ids = [7usize, 2, 5, 0];
    let refs: Vec<&Encoded> = ids.iter().map(|&i| &data[i]).collect();
    let live_batch = TokenBatch::new(&refs);
    let cached_batch = TokenBatch::new(&refs).with_scores(&cache, &ids).unwrap();
    let eps = Tensor::<AD, 3>::random(
        [3, 4, 4],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let loss = |batch: TokenBatch| {
        let out = model
            .forward_elbo_with_noise(&batch.to_device::<AD>(&device), 1.0, Some(eps.clone()))
            .unwrap();
        (
            out.terms.loss.into_scalar(),
            out.router.into_data().to_vec::<f32>().unwrap(),
        )
    };
    let (live, live_router) = loss(live_batch);
    let (cached, cached_router) = loss(cached_batch);
    assert!(
        (live - cached).abs() < 1e-5 * live.abs(),
        "{live} vs {cached}"
    );
    // The router posterior at every scored position (padding is cached as 0).
    let mask = TokenBatch::new(&refs).target_mask;
    let k = 3;
    for (i, m) in mask.iter().enumerate() {
        for j in 0..k {
            let (a, b) = (live_router[i * k + j], cached_router[i * k + j]);
            assert!(*m == 0.0 || (a - b).abs() < 1e-5, "router {a} vs {b}");
        }
    }
}

#[test]
fn concurrent_writers_of_one_score_cache_leave_the_same_cache_as_one_writer() {
    let _rng = rng_lock();
    let device = Default::default();
    let data = synthetic(24, 0);
    let lm = llama(VOCAB).init::<B>(&device).unwrap();
    let fp = crate::scores::fingerprint(&data, &["a".into()]);
    let write = |dir: &Path| {
        score_assistants(
            &[&LocalLm::new(&lm) as &dyn Assistant<B>],
            &data,
            &fp,
            2,
            dir,
            &device,
            |_| {},
        )
    };
    let alone = tempfile::tempdir().unwrap();
    write(alone.path()).unwrap();
    let shared = tempfile::tempdir().unwrap();
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| write(shared.path())))
            .collect();
        for w in writers {
            w.join().unwrap().unwrap();
        }
    });
    let (a, b) = (
        ScoreCache::open(alone.path(), &fp).unwrap(),
        ScoreCache::open(shared.path(), &fp).unwrap(),
    );
    for i in 0..data.len() {
        assert_eq!(a.example(i).unwrap(), b.example(i).unwrap(), "example {i}");
    }
}

#[test]
fn score_cache_round_trips_and_rejects_other_data() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let data = synthetic(10, 0);
    let lm = llama(VOCAB).init::<B>(&device).unwrap();
    let fp = crate::scores::fingerprint(&data, &["a".into()]);
    score_assistants(
        &[&LocalLm::new(&lm) as &dyn Assistant<B>],
        &data,
        &fp,
        3,
        dir.path(),
        &device,
        |_| {},
    )
    .unwrap();
    let cache = ScoreCache::open(dir.path(), &fp).unwrap();
    // The cached values equal a direct forward pass.
    let refs: Vec<&Encoded> = data.iter().collect();
    let batch = TokenBatch::new(&refs).to_device::<B>(&device);
    let logits = lm
        .forward(
            chorus_lm::LmInput::new(batch.tokens.clone()).with_padding(batch.padding),
            None,
        )
        .unwrap()
        .logits;
    let direct = chorus_elbo::token_log_probs(logits, batch.targets)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let seq = batch.tokens.dims()[1];
    for (i, e) in data.iter().enumerate() {
        let cached = cache.example(i).unwrap();
        assert_eq!(cached.len(), e.input_len());
        for (t, v) in cached.iter().enumerate() {
            let d = direct[i * seq + t];
            assert!(
                (v - d).abs() < 1e-4 * d.abs().max(1.0),
                "{i} {t}: {v} vs {d}"
            );
        }
    }
    let other = crate::scores::fingerprint(&synthetic(10, 1), &["a".into()]);
    let err = ScoreCache::open(dir.path(), &other)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rerun `chorus score`"), "{err}");
    // A truncated data file is caught.
    let data_file = dir.path().join("scores.f32");
    let bytes = std::fs::read(&data_file).unwrap();
    std::fs::write(&data_file, &bytes[..bytes.len() - 4]).unwrap();
    assert!(
        ScoreCache::open(dir.path(), &fp)
            .unwrap_err()
            .to_string()
            .contains("truncated")
    );
    // A corrupt index: no assistants, or offsets and lengths of different counts.
    std::fs::write(&data_file, &bytes).unwrap();
    let index_file = dir.path().join("scores.json");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_file).unwrap()).unwrap();
    let open_with = |bad: &serde_json::Value| {
        std::fs::write(&index_file, bad.to_string()).unwrap();
        ScoreCache::open(dir.path(), &fp).unwrap_err().to_string()
    };
    let mut bad = index.clone();
    bad["n_assistants"] = 0.into();
    let err = open_with(&bad);
    assert!(
        err.contains("0 assistants, 10 offsets for 10 examples"),
        "{err}"
    );
    let mut bad = index.clone();
    bad["offsets"].as_array_mut().unwrap().pop();
    let err = open_with(&bad);
    assert!(
        err.contains("1 assistants, 9 offsets for 10 examples"),
        "{err}"
    );
    std::fs::write(&index_file, index.to_string()).unwrap();
    ScoreCache::open(dir.path(), &fp).unwrap();
}

/// An assistant that scores as its LM does until its `fail_from`-th call (counting from 0), then
/// fails; it counts its calls.
struct Flaky<'a> {
    inner: LocalLm<'a, B>,
    fail_from: usize,
    calls: std::cell::Cell<usize>,
}

impl<'a> Flaky<'a> {
    fn new(lm: &'a Lm<B>, fail_from: usize) -> Self {
        Self {
            inner: LocalLm::new(lm),
            fail_from,
            calls: std::cell::Cell::new(0),
        }
    }
}

impl Assistant<B> for Flaky<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn max_seq_len(&self) -> usize {
        self.inner.max_seq_len()
    }

    fn token_log_probs(
        &self,
        rows: &chorus_model::ScoreRows<B>,
        z: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>, chorus_model::ModelError> {
        let call = self.calls.get();
        self.calls.set(call + 1);
        if call >= self.fail_from {
            return Err(chorus_model::ModelError::InvalidInput {
                input: "rows",
                reason: "the assistant failed (on purpose)".into(),
            });
        }
        self.inner.token_log_probs(rows, z)
    }

    fn decoder<'a>(
        &'a self,
        rows: usize,
        z: Option<Tensor<B, 2>>,
        update: chorus_model::AssistantUpdate,
        device: &burn::backend::ndarray::NdArrayDevice,
    ) -> Box<dyn chorus_model::AssistantDecoder + 'a> {
        self.inner.decoder(rows, z, update, device)
    }
}

/// Scoring with two local assistants (batches of 2 of 7 examples: 4 calls each) that stops when one
/// fails continues after the listed examples on a rerun and leaves the bytes one run writes; a
/// half-written cache of other assistants (another fingerprint, or another count) is started
/// over, and a complete cache is left alone.
#[test]
fn scoring_resumes_where_it_stopped_and_leaves_a_complete_cache_alone() {
    let _rng = rng_lock();
    let device = Default::default();
    let data = synthetic(7, 0);
    let lms = [
        llama(VOCAB).init::<B>(&device).unwrap(),
        llama(VOCAB).init::<B>(&device).unwrap(),
    ];
    let fp = crate::scores::fingerprint(&data, &["a".into(), "b".into()]);
    // Scores with the two LMs (the second failing from its `fail_from`-th call) under `fp`;
    // returns each one's calls and the error, if any.
    let run = |dir: &Path, fp: &str, n: usize, fail_from: usize| {
        let a = Flaky::new(&lms[0], usize::MAX);
        let b = Flaky::new(&lms[1], fail_from);
        let assistants = [&a as &dyn Assistant<B>, &b][..n].to_vec();
        let result = score_assistants(&assistants, &data, fp, 2, dir, &device, |_| {});
        let calls = (a.calls.get(), b.calls.get());
        (calls, result.err().map(|e| e.to_string()))
    };
    let reference = tempfile::tempdir().unwrap();
    assert_eq!(run(reference.path(), &fp, 2, usize::MAX), ((4, 4), None));
    let expected = std::fs::read(reference.path().join("scores.f32")).unwrap();

    // The second assistant fails at its third batch: the first two (4 examples) are listed.
    let dir = tempfile::tempdir().unwrap();
    let (_, err) = run(dir.path(), &fp, 2, 2);
    assert!(err.unwrap().contains("failed (on purpose)"));
    let open = ScoreCache::open(dir.path(), &fp).unwrap_err().to_string();
    assert!(open.contains("scoring stopped after 4 examples"), "{open}");
    // The rerun scores the 3 examples left, in 2 batches, and writes what one run writes.
    assert_eq!(run(dir.path(), &fp, 2, usize::MAX), ((2, 2), None));
    assert_eq!(
        std::fs::read(dir.path().join("scores.f32")).unwrap(),
        expected
    );
    assert_eq!(ScoreCache::open(dir.path(), &fp).unwrap().n_assistants(), 2);
    // Complete: a rerun asks nobody.
    assert_eq!(run(dir.path(), &fp, 2, usize::MAX), ((0, 0), None));

    // Half-written for another fingerprint, or for one assistant: started over.
    let other_fp = crate::scores::fingerprint(&data, &["a".into(), "c".into()]);
    for (what, fp_before, n_before) in [("fingerprint", &other_fp, 2), ("count", &fp, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let (_, err) = run(dir.path(), fp_before, n_before, 2);
        if n_before == 1 {
            // Alone, the first assistant completes; its files renamed back make a half-written
            // cache that lists all 7 examples.
            assert!(err.is_none());
            std::fs::rename(
                dir.path().join("scores.f32"),
                dir.path().join("scores.f32.partial"),
            )
            .unwrap();
            std::fs::rename(
                dir.path().join("scores.json"),
                dir.path().join("scores.partial.json"),
            )
            .unwrap();
        } else {
            assert!(err.is_some());
        }
        assert_eq!(
            run(dir.path(), &fp, 2, usize::MAX),
            ((4, 4), None),
            "{what}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("scores.f32")).unwrap(),
            expected,
            "{what}"
        );
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_configs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base = "tokenizer = \"t.json\"\nbase = \"b\"\n";
    let load = |text: &str, sets: &[&str]| {
        let p = write(dir.path(), "c.toml", text);
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        load_config::<TrainConfig>(Some(&p), &sets)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = load(&format!("{base}[train]\nlrr = 1e-3\n"), &[]);
    assert!(
        e.contains("c.toml") && e.contains("unknown field `lrr`"),
        "{e}"
    );
    let e = load(base, &["train.lr=-1"]);
    assert!(e.contains("train.lr = -1"), "{e}");
    let e = load(
        &format!("{base}[train.kl_schedule]\nkind = \"constant\"\nbeta = -0.5\n"),
        &[],
    );
    assert!(e.contains("beta = -0.5"), "{e}");
    let e = load(
        &format!(
            "{base}[train.kl_schedule]\nkind = \"cyclical\"\ntotal_steps = 10\nn_cycles = 2\nratio = 1.5\n"
        ),
        &[],
    );
    assert!(e.contains("ratio"), "{e}");
    let e = load(
        &format!(
            "{base}[train]\nsteps = 100\n[train.kl_schedule]\nkind = \"cyclical\"\ntotal_steps = 10\nn_cycles = 2\nratio = 0.5\n"
        ),
        &[],
    );
    assert!(
        e.contains("total_steps = 10") && e.contains("train.steps = 100"),
        "{e}"
    );
    // Assistants behind servers: after the local ones, trained from a score cache, and
    // `chorus.remote_assistants` is derived from them.
    let e = load(base, &["assistants=[\"http://127.0.0.1:8080\"]"]);
    assert!(
        e.contains("http://127.0.0.1:8080") && e.contains("chorus score"),
        "{e}"
    );
    let e = load(
        base,
        &[
            "assistants=[\"http://127.0.0.1:8080\", \"out/expert\"]",
            "scores=\"s\"",
            "chorus.assistant_adapters=false",
        ],
    );
    assert!(
        e.contains("out/expert") && e.contains("local assistants come before"),
        "{e}"
    );
    let e = load(base, &["chorus.remote_assistants=1"]);
    assert!(e.contains("chorus.remote_assistants = 1"), "{e}");
    let e = load(base, &["train.epsilon=0"]);
    assert!(e.contains("train.epsilon = 0"), "{e}");
    let e = load(base, &["train.selector_lr_scale=0"]);
    assert!(e.contains("train.selector_lr_scale = 0"), "{e}");
    let e = load(base, &["data.batch_size=0"]);
    assert!(e.contains("batch_size"), "{e}");
    let e = load(base, &["train.steps"]);
    assert!(e.contains("key.path=value"), "{e}");
    let e = load(&format!("{base}[train]\nsteps = \"many\"\n"), &[]);
    assert!(e.contains("steps"), "{e}");
    // The selector's first phase needs an assistant; cached log-probs need assistants that read
    // no z (either no z, or no assistant adapters).
    let e = load(base, &["train.selector_init_steps=1"]);
    assert!(
        e.contains("train.selector_init_steps = 1") && e.contains("at least one assistant"),
        "{e}"
    );
    let e = load(base, &["scores=\"s\""]);
    assert!(e.contains("there are no assistants"), "{e}");
    let e = load(base, &["assistants=[\"a\"]", "scores=\"s\""]);
    assert!(e.contains("chorus.assistant_adapters = false"), "{e}");
    let accepted = |sets: &[&str]| {
        let p = write(dir.path(), "ok.toml", base);
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        if let Err(e) = load_config::<TrainConfig>(Some(&p), &sets) {
            panic!("{sets:?}: {e}");
        }
    };
    accepted(&["assistants=[\"a\"]", "train.selector_init_steps=1"]);
    accepted(&[
        "assistants=[\"a\"]",
        "scores=\"s\"",
        "chorus.assistant_adapters=false",
    ]);
    accepted(&["assistants=[\"a\"]", "scores=\"s\"", "chorus.d_latent=0"]);
    // Overrides reach nested tables, with TOML-typed values.
    let p = write(dir.path(), "ok.toml", base);
    let c: TrainConfig = load_config(
        Some(&p),
        &[
            "train.lr=0.5".into(),
            "chorus.d_latent=0".into(),
            "data.tasks=[\"story\"]".into(),
        ],
    )
    .unwrap();
    assert_eq!(
        (c.train.lr, c.chorus.d_latent, c.data.tasks),
        (0.5, 0, vec![Task::Story])
    );
}

/// Every range of `[train]` and `[data]` at its edges: the edge itself and a value just inside
/// are accepted, a value just outside is refused naming its key (the rest of the config is the
/// default).
#[test]
fn every_range_is_checked_at_its_edges() {
    use crate::config::{DataConfig, OptimConfig};
    let optim: &[EdgeCase<OptimConfig>] = &[
        ("lr tiny", |c| c.lr = 1e-30, None),
        ("lr 0", |c| c.lr = 0.0, Some("train.lr")),
        ("lr ∞", |c| c.lr = f64::INFINITY, Some("train.lr")),
        ("lr NaN", |c| c.lr = f64::NAN, Some("train.lr")),
        ("steps 1", |c| c.steps = 1, None),
        ("steps 0", |c| c.steps = 0, Some("train.steps")),
        ("min_lr_ratio 0", |c| c.min_lr_ratio = 0.0, None),
        ("min_lr_ratio 1", |c| c.min_lr_ratio = 1.0, None),
        (
            "min_lr_ratio < 0",
            |c| c.min_lr_ratio = -1e-9,
            Some("train.min_lr_ratio"),
        ),
        (
            "min_lr_ratio > 1",
            |c| c.min_lr_ratio = 1.0 + 1e-9,
            Some("train.min_lr_ratio"),
        ),
        ("weight_decay 0", |c| c.weight_decay = 0.0, None),
        (
            "weight_decay < 0",
            |c| c.weight_decay = -1e-9,
            Some("train.weight_decay"),
        ),
        (
            "weight_decay ∞",
            |c| c.weight_decay = f64::INFINITY,
            Some("train.weight_decay"),
        ),
        ("beta1 0", |c| c.beta1 = 0.0, None),
        ("beta1 near 1", |c| c.beta1 = 1.0 - 1e-9, None),
        ("beta1 1", |c| c.beta1 = 1.0, Some("train.beta1")),
        ("beta1 < 0", |c| c.beta1 = -1e-9, Some("train.beta1")),
        ("beta2 0", |c| c.beta2 = 0.0, None),
        ("beta2 near 1", |c| c.beta2 = 1.0 - 1e-9, None),
        ("beta2 1", |c| c.beta2 = 1.0, Some("train.beta2")),
        ("beta2 < 0", |c| c.beta2 = -1e-9, Some("train.beta2")),
        ("epsilon tiny", |c| c.epsilon = 1e-30, None),
        ("epsilon 0", |c| c.epsilon = 0.0, Some("train.epsilon")),
        (
            "epsilon ∞",
            |c| c.epsilon = f64::INFINITY,
            Some("train.epsilon"),
        ),
        ("grad_clip 0", |c| c.grad_clip = 0.0, None),
        (
            "grad_clip < 0",
            |c| c.grad_clip = -1e-9,
            Some("train.grad_clip"),
        ),
        (
            "grad_clip ∞",
            |c| c.grad_clip = f64::INFINITY,
            Some("train.grad_clip"),
        ),
        (
            "selector_lr_scale tiny",
            |c| c.selector_lr_scale = 1e-30,
            None,
        ),
        (
            "selector_lr_scale 0",
            |c| c.selector_lr_scale = 0.0,
            Some("train.selector_lr_scale"),
        ),
        (
            "selector_lr_scale ∞",
            |c| c.selector_lr_scale = f64::INFINITY,
            Some("train.selector_lr_scale"),
        ),
        ("accumulation 1", |c| c.accumulation = 1, None),
        (
            "accumulation 0",
            |c| c.accumulation = 0,
            Some("train.accumulation"),
        ),
        ("iw_samples 1", |c| c.iw_samples = 1, None),
        (
            "iw_samples 0",
            |c| c.iw_samples = 0,
            Some("train.iw_samples"),
        ),
        ("log_every 1", |c| c.log_every = 1, None),
        ("log_every 0", |c| c.log_every = 0, Some("train.log_every")),
        ("keep_last 1", |c| c.keep_last = 1, None),
        ("keep_last 0", |c| c.keep_last = 0, Some("train.keep_last")),
        (
            "selector_init_steps = steps − 1",
            |c| c.selector_init_steps = c.steps - 1,
            None,
        ),
        (
            "selector_init_steps = steps",
            |c| c.selector_init_steps = c.steps,
            Some("train.selector_init_steps"),
        ),
    ];
    check_edges(optim, OptimConfig::validate);
    let data: &[EdgeCase<DataConfig>] = &[
        ("max_seq_len 4", |c| c.max_seq_len = 4, None),
        (
            "max_seq_len 3",
            |c| c.max_seq_len = 3,
            Some("data.max_seq_len"),
        ),
        ("batch_size 1", |c| c.batch_size = 1, None),
        (
            "batch_size 0",
            |c| c.batch_size = 0,
            Some("data.batch_size"),
        ),
        ("no tasks", |c| c.tasks.clear(), Some("data.tasks")),
    ];
    check_edges(data, DataConfig::validate);
}

/// A case of [`check_edges`]: what it is, the edit of the default config, the key it is refused
/// by (`None`: accepted).
type EdgeCase<'a, C> = (&'a str, fn(&mut C), Option<&'a str>);

/// Each case edits the default config and expects it accepted (`None`) or refused naming the key.
fn check_edges<C: Default>(
    cases: &[EdgeCase<'_, C>],
    validate: fn(&C) -> Result<(), crate::config::ConfigError>,
) {
    for (what, edit, refused) in cases {
        let mut c = C::default();
        edit(&mut c);
        match (validate(&c), refused) {
            (Ok(()), None) => {}
            (Err(e), Some(key)) => assert!(e.to_string().starts_with(key), "{what}: {e}"),
            (got, _) => panic!("{what}: {got:?}"),
        }
    }
}

/// The defaults `[train]` and `[data]` take are the ones their fields' doc comments state
/// ("Default 1e-3."), which is where a user reads them (`cargo doc`, and the configs' comments
/// copy them): every scalar field of the serialised defaults has a stated default, equal to it.
#[test]
fn the_defaults_are_the_ones_the_doc_comments_state() {
    use crate::config::{DataConfig, OptimConfig};
    let source = include_str!("config.rs");
    let stated = |name: &str| stated_defaults(source, name);
    let check = |name: &str, defaults: toml::Value, stated: Vec<(String, String)>| {
        let table = defaults.as_table().expect("a table");
        let mut checked = 0;
        for (field, value) in table {
            let text = match value {
                toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::String(_) => value,
                _ => continue,
            };
            let (_, doc) = stated
                .iter()
                .find(|(f, _)| f == field)
                .unwrap_or_else(|| panic!("{name}.{field}: no \"Default …\" in its doc comment"));
            let equal = match text {
                toml::Value::String(s) => doc.trim_matches('`') == s,
                number => {
                    let number = number
                        .as_float()
                        .or_else(|| number.as_integer().map(|i| i as f64));
                    doc.parse::<f64>().ok() == number
                }
            };
            assert!(
                equal,
                "{name}.{field}: the doc comment says {doc}, the default is {text}"
            );
            checked += 1;
        }
        checked
    };
    let optim = toml::Value::try_from(OptimConfig::default()).unwrap();
    let data = toml::Value::try_from(DataConfig::default()).unwrap();
    // Every number of [train] and of [data], and [data]'s end-of-text token.
    assert_eq!(check("train", optim, stated("OptimConfig")), 18);
    assert_eq!(check("data", data, stated("DataConfig")), 5);
    // The two that are not scalars, by their doc comments' words.
    assert!(source.contains("Tasks to train and validate on. Default: all three."));
    assert_eq!(DataConfig::default().tasks, Task::ALL.to_vec());
    assert_eq!(Task::ALL.len(), 3);
    assert!(source.contains("Default constant 1."));
    assert_eq!(
        OptimConfig::default().kl_schedule,
        chorus_elbo::KlSchedule::Constant { beta: 1.0 }
    );
    assert_eq!(DataConfig::default().cache, None);
    // No `data.cache`: the corpus cache of `$CHORUS_CACHE` or `~/.cache/chorus`; else the one set.
    assert_eq!(
        DataConfig::default().cache_dir(),
        chorus_data::fetch::cache_dir()
    );
    let set = DataConfig {
        cache: Some("/elsewhere/corpora".into()),
        ..DataConfig::default()
    };
    assert_eq!(set.cache_dir(), Path::new("/elsewhere/corpora"));
}

/// `(field, default)` for each field of `pub struct NAME` in `source` whose doc comment says
/// "Default X." (X up to the first period that ends a sentence).
fn stated_defaults(source: &str, name: &str) -> Vec<(String, String)> {
    let start = source
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("no struct {name}"));
    let body = &source[start..];
    let body = &body[..body.find("\n}").expect("the struct ends")];
    let mut out = Vec::new();
    let mut doc = String::new();
    for line in body.lines().skip(1).map(str::trim) {
        if let Some(text) = line.strip_prefix("///") {
            doc.push(' ');
            doc.push_str(text.trim());
        } else if let Some(field) = line.strip_prefix("pub ") {
            let field = field.split(':').next().unwrap_or_default().to_string();
            if let Some(at) = doc.find("Default ") {
                let rest = &doc[at + "Default ".len()..];
                let end = rest
                    .char_indices()
                    .find(|&(i, c)| {
                        c == '.' && rest[i + 1..].chars().next().is_none_or(|n| n == ' ')
                    })
                    .map_or(rest.len(), |(i, _)| i);
                out.push((field, rest[..end].to_string()));
            }
            doc.clear();
        }
    }
    out
}

/// What a score cache records of its local assistants — and so what makes a cache scored with
/// other weights at the same path refused — is the sha256 of each one's weights file, in the
/// config's order; models that share the base's vocabulary open together.
#[test]
fn local_assistants_are_identified_by_their_weights() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let tok = tokenizer();
    tok.save(dir.path().join("tokenizer.json")).unwrap();
    for name in ["base", "a", "b"] {
        llama(tok.vocab_size())
            .init::<B>(&device)
            .unwrap()
            .save(dir.path().join(name))
            .unwrap();
    }
    let t = write(
        dir.path(),
        "joint.toml",
        &format!(
            "tokenizer = {:?}\nbase = {:?}\nassistants = [{:?}, {:?}]\n",
            dir.path().join("tokenizer.json"),
            dir.path().join("base"),
            dir.path().join("b"),
            dir.path().join("a"),
        ),
    );
    let config: TrainConfig = load_config(Some(&t), &[]).unwrap();
    let models = crate::run::open_models::<B>(&config, &device).unwrap();
    assert_eq!(models.assistants.len(), 2);
    let sha = |name: &str| {
        chorus_data::fetch::sha256_file(&dir.path().join(name).join(chorus_lm::WEIGHTS_FILE))
            .unwrap()
    };
    assert_ne!(sha("a"), sha("b"), "two draws of weights");
    assert_eq!(models.identities().unwrap(), [sha("b"), sha("a")]);
}

/// Each step of a run seeds the backend's generator (z's noise, dropout) with its own seed, and
/// two runs' seeds give two runs' draws: 10,000 steps of three seeds, no seed twice.
#[test]
fn every_step_of_every_run_seeds_its_own_draws() {
    let mut seen = std::collections::HashSet::new();
    for seed in [0, 1, 42] {
        for step in 0..10_000 {
            assert!(
                seen.insert(crate::run::step_seed(seed, step)),
                "seed {seed}, step {step} repeats an earlier step's seed"
            );
        }
    }
}

/// The count a run reports as trainable leaves out exactly the frozen models' parameters.
#[test]
fn the_trainable_count_leaves_out_the_frozen_models() {
    let _rng = rng_lock();
    let config = ChorusConfig {
        train_base: false,
        ..z_config()
    };
    let (model, _) = joint(config, 1);
    let frozen = model.base.num_params() + model.assistants[0].num_params();
    assert_eq!(
        crate::run::trainable_params(&model),
        model.num_params() - frozen
    );
    let (model, _) = joint(z_config(), 1);
    assert_eq!(
        crate::run::trainable_params(&model),
        model.num_params() - model.assistants[0].num_params(),
        "the base trains by default, the assistants do not"
    );
}

/// The line `chorus train` ends with: steps, time, tokens, the best validation NLL and its step
/// (a dash before any validation), the exported model.
#[test]
fn a_summary_reads_as_one_line() {
    let summary = crate::TrainSummary {
        steps: 120,
        steps_run: 20,
        last_checkpoint: "out/checkpoints/step-120".into(),
        model: "out/model".into(),
        best_valid_nll: Some((100, 2.345_67)),
        tokens_seen: 9_000,
        seconds: 61.6,
    };
    assert_eq!(
        summary.to_string(),
        "120 steps (20 in this run) in 62 s (9000 target tokens); best valid NLL/token 2.3457 \
         (step 100); model: out/model"
    );
    let unvalidated = crate::TrainSummary {
        best_valid_nll: None,
        ..summary
    };
    assert!(
        unvalidated.to_string().contains("best valid NLL/token –;"),
        "{unvalidated}"
    );
}

#[test]
fn vocab_mismatch_and_missing_corpus_are_clear_errors() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let tok = tokenizer();
    tok.save(dir.path().join("tokenizer.json")).unwrap();
    // Pre-training a model whose vocabulary is not the tokenizer's.
    let p = write(
        dir.path(),
        "pre.toml",
        &format!(
            "tokenizer = {:?}\n[model]\nfamily = \"llama\"\nvocab_size = 100\nd_model = 16\nn_layers = 1\nn_heads = 2\nn_kv_heads = 1\nd_ff = 32\nmax_seq_len = 32\n",
            dir.path().join("tokenizer.json")
        ),
    );
    let config: PretrainConfig = load_config(Some(&p), &[]).unwrap();
    let err = crate::pretrain::<AD>(
        &config,
        &dir.path().join("out"),
        false,
        &device,
        &mut crate::Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("model.vocab_size") && err.contains("100"),
        "{err}"
    );
    // With the right vocabulary but an empty corpus cache.
    let vocab = tok.vocab_size();
    let config: PretrainConfig = load_config(
        Some(&p),
        &[
            format!("model.vocab_size={vocab}"),
            format!(
                "data.cache={:?}",
                dir.path().join("empty-cache").display().to_string()
            ),
        ],
    )
    .unwrap();
    let err = crate::pretrain::<AD>(
        &config,
        &dir.path().join("out"),
        false,
        &device,
        &mut crate::Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("chorus data fetch"), "{err}");
    // A base and an assistant with different vocabularies.
    llama(vocab)
        .init::<B>(&device)
        .unwrap()
        .save(dir.path().join("base"))
        .unwrap();
    llama(vocab + 5)
        .init::<B>(&device)
        .unwrap()
        .save(dir.path().join("assistant"))
        .unwrap();
    // `chorus train` with the shared tokenizer, a base and these assistants: its error.
    let train_error_with = |base: &str, assistants: &[&str]| -> String {
        let list: Vec<String> = assistants
            .iter()
            .map(|a| format!("{:?}", dir.path().join(a)))
            .collect();
        let t = write(
            dir.path(),
            "joint.toml",
            &format!(
                "tokenizer = {:?}\nbase = {:?}\nassistants = [{}]\n[data]\ncache = {:?}\n",
                dir.path().join("tokenizer.json"),
                dir.path().join(base),
                list.join(", "),
                dir.path().join("empty-cache"),
            ),
        );
        let config: TrainConfig = load_config(Some(&t), &[]).unwrap();
        crate::train::<AD>(
            &config,
            &dir.path().join("out2"),
            false,
            &device,
            &mut crate::Silent,
        )
        .unwrap_err()
        .to_string()
    };
    let train_error = |assistants: &[&str]| train_error_with("base", assistants);
    let err = train_error(&["assistant"]);
    assert!(err.contains("vocabular"), "{err}");
    // A model with fewer ids than the tokenizer has tokens is refused by name; one with more
    // (a vocabulary padded past the tokenizer's, as SmolLM2's is not but many are) is not, and
    // the run goes on to its data (none here).
    llama(vocab - 1)
        .init::<B>(&device)
        .unwrap()
        .save(dir.path().join("small"))
        .unwrap();
    let err = train_error_with("small", &[]);
    assert!(
        err.contains("base") && err.contains("small") && err.contains("do not belong together"),
        "{err}"
    );
    let err = train_error_with("assistant", &[]);
    assert!(err.contains("chorus data fetch"), "{err}");
    // A base whose own tokenizer.json has the same vocabulary and merges but a normaliser of
    // its own: refused before training, naming both files and the part that differs.
    let shared: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap())
            .unwrap();
    let mut lowercasing = shared.clone();
    lowercasing["normalizer"] = serde_json::json!({"type": "Lowercase"});
    let own = dir.path().join("base/tokenizer.json");
    std::fs::write(&own, lowercasing.to_string()).unwrap();
    let err = train_error(&[]);
    assert!(
        err.contains("normalizer differs") && err.contains("base/tokenizer.json"),
        "{err}"
    );
    assert!(!dir.path().join("out2/checkpoints").exists());
}

/// Guards the workspace's burn-ndarray feature choice: with its `simd` feature, f32 `recip` (used
/// by the backward of `log` and `/`) is approximate on the aligned part of a buffer, and gradients
/// change from call to call.
#[test]
fn gradients_are_bitwise_reproducible() {
    let _rng = rng_lock();
    let device = Default::default();
    let (model, _) = joint(z_config(), 1);
    let train = synthetic(8, 0);
    let refs: Vec<&Encoded> = train.iter().collect();
    let batch = TokenBatch::new(&refs).to_device::<AD>(&device);
    let embedding = match &model.base {
        Lm::Llama(m) => m.embed_tokens.weight.clone(),
        Lm::Gpt2(_) => unreachable!("a llama base"),
    };
    let grads: Vec<Vec<f32>> = (0..3)
        .map(|_| {
            AD::seed(&device, 1);
            let loss = model.forward_elbo(&batch, 1.0).unwrap().terms.loss;
            let g = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
            g.get::<B, 2>(embedding.id)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        })
        .collect();
    assert!(grads[0] == grads[1] && grads[1] == grads[2]);
}

/// Rows of one length, so that any grouping into batches pads nothing.
fn same_length(n: usize) -> Vec<Encoded> {
    synthetic(5 * n, 0).into_iter().step_by(5).collect()
}

#[test]
fn accumulating_two_batches_equals_one_batch_of_twice_the_size() {
    let _rng = rng_lock();
    let train = same_length(8);
    assert!(train.iter().all(|e| e.input_len() == train[0].input_len()));
    let no_z = ChorusConfig {
        d_latent: 0,
        ..ChorusConfig::default()
    };
    let run = |batch_size: usize, accumulation: usize| {
        let dir = tempfile::tempdir().unwrap();
        let optim = OptimConfig {
            accumulation,
            log_every: 1,
            grad_clip: 0.0,
            ..optim(2)
        };
        let (model, sources) = joint(no_z.clone(), 1);
        fit_with(
            model,
            sources,
            &train,
            &[],
            &optim,
            batch_size,
            dir.path(),
            false,
            None,
        )
        .unwrap();
        let rows = metric_rows(dir.path());
        let params = parameters(&latest_checkpoint(dir.path()).unwrap());
        (rows, params)
    };
    // 8 rows per step either way: one batch of 8, or two of 4 whose losses are averaged.
    let (one, one_params) = run(8, 1);
    let (two, two_params) = run(4, 2);
    for (a, b) in one.iter().zip(&two) {
        for key in ["loss", "nll_per_token", "grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() < 1e-5 * x.abs().max(1.0), "{key}: {x} vs {y}");
        }
    }
    let worst = one_params
        .iter()
        .zip(&two_params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "parameters differ by {worst}");
}

/// The selector's weight then bias, flattened.
fn selector_values(model: &Chorus<B>) -> Vec<f32> {
    let proj = &model.selector.as_ref().unwrap().proj;
    let mut values: Vec<f32> = proj.weight.val().into_data().to_vec().unwrap();
    values.extend(
        proj.bias
            .as_ref()
            .unwrap()
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap(),
    );
    values
}

#[test]
fn the_selector_steps_at_its_own_learning_rate_and_everything_else_at_lr() {
    let _rng = rng_lock();
    let train = same_length(8);
    let no_z = ChorusConfig {
        d_latent: 0,
        ..ChorusConfig::default()
    };
    // After one AdamW step (bias-corrected moments: the update is lr · g/(|g| + ε)), the
    // selector moved `scale` times as far as at scale 1 and every other parameter the same.
    let run = |scale: f64| {
        let dir = tempfile::tempdir().unwrap();
        let optim = OptimConfig {
            steps: 1,
            warmup_steps: 0,
            weight_decay: 0.0,
            grad_clip: 0.0,
            selector_lr_scale: scale,
            ..optim(2)
        };
        let (model, sources) = joint(no_z.clone(), 1);
        fit_with(
            model,
            sources,
            &train,
            &[],
            &optim,
            8,
            dir.path(),
            false,
            None,
        )
        .unwrap();
        let (saved, _) =
            load_chorus::<B>(&latest_checkpoint(dir.path()).unwrap(), &Default::default()).unwrap();
        (
            selector_values(&saved.model),
            parameters(&latest_checkpoint(dir.path()).unwrap()),
        )
    };
    let initial = selector_values(&joint(no_z.clone(), 1).0.valid());
    let (one, one_all) = run(1.0);
    let (ten, ten_all) = run(10.0);
    let mut compared = 0;
    for ((a, b), c) in one.iter().zip(&ten).zip(&initial) {
        let (d1, d10) = (a - c, b - c);
        if d1.abs() > 1e-6 {
            assert!((d10 / d1 - 10.0).abs() < 1e-3, "{d1} vs {d10}");
            compared += 1;
        }
    }
    assert!(compared > 0, "the selector did not move");
    // Everything but the selector: the same values (the selector's are a small part).
    let differing = one_all
        .iter()
        .zip(&ten_all)
        .filter(|(a, b)| (*a - *b).abs() > 1e-7)
        .count();
    assert_eq!(
        differing,
        one.len(),
        "only the selector's parameters differ"
    );
}

#[test]
fn clipping_scales_every_gradient_by_max_norm_over_the_global_norm() {
    let _rng = rng_lock();
    let device = Default::default();
    let (model, _) = joint(z_config(), 1);
    let train = synthetic(4, 0);
    let refs: Vec<&Encoded> = train.iter().collect();
    let batch = TokenBatch::new(&refs).to_device::<AD>(&device);
    // The same gradients each call (the z noise is reseeded).
    let fresh_grads = || {
        AD::seed(&device, 5);
        let loss = model.forward_elbo(&batch, 1.0).unwrap().terms.loss;
        burn::optim::GradientsParams::from_grads(loss.backward(), &model)
    };
    let grads = fresh_grads();
    // Every gradient, flattened, in module order.
    let flat = |g: &burn::optim::GradientsParams| {
        struct Collect<'a>(&'a burn::optim::GradientsParams, Vec<f64>);
        impl burn::module::ModuleVisitor<AD> for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<AD, D>>) {
                if let Some(g) = self.0.get::<B, D>(p.id) {
                    let v = g.into_data().to_vec::<f32>().unwrap();
                    self.1.extend(v.into_iter().map(f64::from));
                }
            }
        }
        let mut c = Collect(g, Vec::new());
        burn::module::Module::visit(&model, &mut c);
        c.1
    };
    let before = flat(&grads);
    let norm = before.iter().map(|g| g * g).sum::<f64>().sqrt();
    assert!(norm > 0.1, "{norm}");
    // Below the norm: every gradient times max_norm / (‖g‖ + 1e-6); the reported norm is ‖g‖.
    let mut clipped = fresh_grads();
    let reported = crate::grads::clip_global_norm(&model, &mut clipped, norm / 4.0);
    assert!(
        (reported - norm).abs() < 1e-5 * norm,
        "{reported} vs {norm}"
    );
    let factor = (norm / 4.0) / (norm + 1e-6);
    for (a, b) in flat(&clipped).iter().zip(&before) {
        assert!(
            (a - b * factor).abs() <= 1e-6 * b.abs().max(1e-3),
            "{a} vs {b} · {factor}"
        );
    }
    let after = flat(&clipped).iter().map(|g| g * g).sum::<f64>().sqrt();
    assert!((after - norm / 4.0).abs() < 1e-4 * norm, "{after}");
    // Near a tiny norm the 1e-6 counts: ‖g‖ = 1e-6 and a limit of 1.5e-6, above the norm,
    // still scale by 1.5e-6 / 2e-6 = 0.75, as torch does.
    let mut tiny = fresh_grads();
    crate::grads::scale(&model, &mut tiny, 1e-6 / norm);
    let tiny_before = flat(&tiny);
    let tiny_norm = crate::grads::global_norm(&model, &tiny);
    assert!((tiny_norm - 1e-6).abs() < 1e-9, "{tiny_norm}");
    crate::grads::clip_global_norm(&model, &mut tiny, 1.5 * tiny_norm);
    let factor = 1.5 * tiny_norm / (tiny_norm + 1e-6);
    assert!((factor - 0.75).abs() < 1e-3, "{factor}");
    for (a, b) in flat(&tiny).iter().zip(&tiny_before) {
        assert!(
            (a - b * factor).abs() <= 1e-6 * b.abs().max(1e-12),
            "{a} vs {b} · {factor}"
        );
    }
    // Above the norm, or off (0): untouched.
    for max_norm in [2.0 * norm, 0.0] {
        let mut same = fresh_grads();
        crate::grads::clip_global_norm(&model, &mut same, max_norm);
        assert_eq!(flat(&same), before, "max_norm {max_norm}");
    }
}

/// Run at two learning rates: at 3e-2 an early validation stays the lowest, so `best/` outlives
/// the pruning of its step's checkpoint; at 1e-2 later steps improve on the first, so `best/`
/// moves on.
#[test]
fn keep_last_prunes_old_checkpoints_and_best_holds_the_lowest_validation_nll() {
    let _rng = rng_lock();
    let train = synthetic(32, 0);
    let valid = synthetic(6, 700);
    for (lr, lowest_pruned) in [(3e-2, true), (1e-2, false)] {
        let dir = tempfile::tempdir().unwrap();
        let optim = OptimConfig {
            checkpoint_every: 1,
            eval_every: 1,
            keep_last: 2,
            lr,
            ..optim(6)
        };
        let (model, sources) = joint(z_config(), 1);
        let summary = fit(model, sources, &train, &valid, &optim, dir.path(), false).unwrap();
        let steps: Vec<u64> = list_checkpoints(dir.path()).iter().map(|c| c.0).collect();
        assert_eq!(steps, vec![5, 6], "keep_last = 2");
        let valid_rows: Vec<(u64, f64)> = metric_rows(dir.path())
            .iter()
            .filter(|r| r["kind"] == "valid")
            .map(|r| {
                (
                    r["step"].as_u64().unwrap(),
                    r["valid_nll"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(valid_rows.len(), 6);
        let lowest = valid_rows
            .iter()
            .copied()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        if lowest_pruned {
            assert!(
                lowest.0 < 5,
                "lr {lr}: the lowest is kept by keep_last: {valid_rows:?}"
            );
        } else {
            assert!(
                lowest.0 > 1,
                "lr {lr}: no step improves on the first: {valid_rows:?}"
            );
        }
        assert_eq!(summary.best_valid_nll, Some(lowest));
        let best = crate::best_dir(dir.path());
        let state = read_state(&best).unwrap();
        assert_eq!((state.step, state.valid_nll), (lowest.0, Some(lowest.1)));
        // best/ holds that step's parameters, loadable without its optimizer file.
        assert!(!best.join("optimizer.mpk").exists());
        let (loaded, _) = load_chorus::<B>(&best, &Default::default()).unwrap();
        assert_eq!(summary.model, best);
        // Its validation NLL is per target token of the whole valid set: the loaded model evaluated
        // again, each task's NLL weighted by its tokens (the two tasks have different counts).
        let set = crate::EvalSet {
            data: &valid,
            batch_size: 4,
            device: &Default::default(),
        };
        let rows = crate::evaluate_chorus(
            &loaded.model,
            "valid",
            &set,
            crate::AssistantScores::Local,
            optim.iw_samples,
            &mut crate::Silent,
            None,
        )
        .unwrap();
        assert_eq!(rows.len(), 2, "two tasks");
        assert_ne!(rows[0].tokens, rows[1].tokens);
        let tokens: usize = rows.iter().map(|r| r.tokens).sum();
        let per_token = rows.iter().map(|r| r.nll * r.tokens as f64).sum::<f64>() / tokens as f64;
        assert!(
            (per_token - lowest.1).abs() < 1e-9 * per_token.abs(),
            "{per_token} vs {}",
            lowest.1
        );
    }
}

/// `best/` is replaced in four moves (`.tmp-best` written, `best → .old-best`, `.tmp-best → best`,
/// then `.old-best` removed). A kill between the two renames leaves no `best/`: `--resume` puts the
/// old one back. A kill after them leaves both: the new one stays.
#[test]
fn resume_puts_back_a_best_moved_aside_by_a_kill_and_keeps_one_already_renamed_in() {
    let _rng = rng_lock();
    let train = synthetic(32, 0);
    let valid = synthetic(8, 1000);
    let dir = tempfile::tempdir().unwrap();
    let optim = OptimConfig {
        checkpoint_every: 1,
        eval_every: 1,
        keep_last: 10,
        ..optim(3)
    };
    let (model, sources) = joint(z_config(), 1);
    fit(model, sources, &train, &valid, &optim, dir.path(), false).unwrap();
    let best = crate::best_dir(dir.path());
    let old = dir.path().join("checkpoints").join(".old-best");
    let best_state = read_state(&best).unwrap();
    let best_model = std::fs::read(best.join("model.mpk")).unwrap();
    let resume = || {
        let (model, sources) = joint(z_config(), 1);
        fit(model, sources, &train, &valid, &optim, dir.path(), true).unwrap()
    };

    std::fs::rename(&best, &old).unwrap();
    let summary = resume();
    assert_eq!(summary.model, best, "best/ is back and is the run's model");
    assert!(!old.exists());
    assert_eq!(read_state(&best).unwrap(), best_state);
    assert_eq!(std::fs::read(best.join("model.mpk")).unwrap(), best_model);

    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("model.mpk"), b"the best before the last").unwrap();
    let summary = resume();
    assert_eq!(summary.model, best);
    assert_eq!(read_state(&best).unwrap(), best_state);
    assert_eq!(std::fs::read(best.join("model.mpk")).unwrap(), best_model);
}

/// Trains with a checkpoint after every step until step 3 or 4 turns something non-finite; checks
/// that the error says what, and that the last checkpoint written before it is the latest, is
/// complete and loads.
fn assert_stops_with_last_good_intact(
    what: &str,
    model: Chorus<AD>,
    sources: Vec<String>,
    train: &[Encoded],
    valid: &[Encoded],
    eval_every: u64,
    hook: Option<&crate::step::GradientHook>,
) {
    let dir = tempfile::tempdir().unwrap();
    let optim = OptimConfig {
        checkpoint_every: 1,
        eval_every,
        keep_last: 10,
        ..optim(6)
    };
    let err = fit_with(
        model,
        sources,
        train,
        valid,
        &optim,
        4,
        dir.path(),
        false,
        hook,
    )
    .unwrap_err();
    let message = err.to_string();
    let TrainError::NonFinite {
        step, last_good, ..
    } = &err
    else {
        panic!("{what}: expected NonFinite, got {message}");
    };
    assert!(message.contains(what), "{message}");
    let last_good = last_good.as_ref().expect("a checkpoint was written before");
    assert_eq!(*last_good, latest_checkpoint(dir.path()).unwrap());
    let state = read_state(last_good).unwrap();
    assert_eq!(state.step, 3, "{what}: {message} (failed at step {step})");
    load_chorus::<B>(last_good, &Default::default()).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{what}: partial files {leftovers:?}");
}

/// A K = 1 model without z whose untied base has a NaN embedding row for token `VOCAB` (an id no
/// synthetic row uses): rows that read it give a NaN loss, all others train normally.
fn nan_row_model() -> (Chorus<AD>, Vec<String>) {
    let no_z = ChorusConfig {
        d_latent: 0,
        ..ChorusConfig::default()
    };
    let device = Default::default();
    let mut config = llama(VOCAB + 1);
    if let LmConfig::Llama(l) = &mut config {
        l.tie_embeddings = false;
    }
    let mut base = config.init::<AD>(&device).unwrap();
    if let Lm::Llama(l) = &mut base {
        let w = l.embed_tokens.weight.val();
        let [vocab, d] = w.dims();
        let mut values = w.into_data().to_vec::<f32>().unwrap();
        values[VOCAB * d..].fill(f32::NAN);
        l.embed_tokens.weight = burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(values, [vocab, d]),
            &device,
        ));
    }
    let sources = Vec::<String>::new();
    (
        Chorus::new(no_z, base, Vec::new(), &device).unwrap(),
        sources,
    )
}

#[test]
fn every_non_finite_branch_stops_and_keeps_the_last_good_checkpoint() {
    let _rng = rng_lock();
    let train = synthetic(16, 0);
    assert!(
        train
            .iter()
            .flat_map(|e| &e.tokens)
            .all(|&t| t < VOCAB as u32)
    );
    // The loss: a row of step 3's batch reads the NaN embedding.
    let (model, sources) = nan_row_model();
    let lengths: Vec<usize> = train.iter().map(Encoded::input_len).collect();
    let step_3 = &epoch_batches(&lengths, 4, OptimConfig::default().seed, 0)[3];
    let mut poisoned = train.clone();
    poisoned[step_3[0]].tokens[2] = VOCAB as u32;
    assert_stops_with_last_good_intact("loss", model, sources, &poisoned, &[], 0, None);
    // The gradient: step 3's embedding gradient multiplied by +∞.
    let (model, sources) = joint(
        ChorusConfig {
            d_latent: 0,
            ..ChorusConfig::default()
        },
        0,
    );
    let embedding = match &model.base {
        Lm::Llama(m) => m.embed_tokens.weight.id,
        Lm::Gpt2(_) => unreachable!("a llama base"),
    };
    let infinite = move |step: u64, grads: &mut burn::optim::GradientsParams| {
        if step == 3 {
            let g = grads.remove::<B, 2>(embedding).unwrap();
            grads.register::<B, 2>(embedding, g.mul_scalar(f32::INFINITY));
        }
    };
    assert_stops_with_last_good_intact(
        "gradient norm",
        model,
        sources,
        &train,
        &[],
        0,
        Some(&infinite),
    );
    // The validation NLL: the first validation (after step 4) reads the NaN embedding, which
    // no training row does.
    let (model, sources) = nan_row_model();
    let mut valid = synthetic(4, 300);
    valid[0].tokens[2] = VOCAB as u32;
    assert_stops_with_last_good_intact("validation NLL", model, sources, &train, &valid, 4, None);
}

/// Every float parameter of `module` set to zero.
fn zeroed<M: burn::module::Module<B>>(module: M) -> M {
    struct Zero;
    impl burn::module::ModuleMapper<B> for Zero {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<B, D>>,
        ) -> burn::module::Param<Tensor<B, D>> {
            param.map(|t| t.zeros_like())
        }
    }
    module.map(&mut Zero)
}

/// The closed-form tests' assistant logits over the vocabulary: `((v · m mod 23) − 11) / 5`.
fn assistant_logits(m: usize) -> Vec<f32> {
    (0..VOCAB)
        .map(|v| ((v * m % 23) as f32 - 11.0) / 5.0)
        .collect()
}

/// The scored target ids of the examples of `task` in `data`, in order.
fn task_targets(data: &[Encoded], task: &str) -> Vec<usize> {
    data.iter()
        .filter(|e| e.task.to_string() == task)
        .flat_map(scored_targets)
        .collect()
}

/// A K = 2 joint model without z whose likelihood is known in closed form: the base is a llama
/// with every weight zero (its final RMSNorm outputs 0, so P_base(x) = 1/V at every position); the
/// assistant a gpt2 with every weight zero but the final LayerNorm's bias e_0 and an untied output
/// matrix whose first row is `assistant_logits` (it reads nothing and predicts
/// q = softmax(assistant_logits) everywhere); the selector has zero weights and bias `selector_bias`,
/// so π is the same at every position.
fn closed_form_model(assistant_logits: &[f32], selector_bias: [f32; 2]) -> Chorus<B> {
    let device = Default::default();
    let base = zeroed(llama(VOCAB).init::<B>(&device).unwrap());
    let gpt2 = LmConfig::Gpt2(chorus_lm::Gpt2Config {
        vocab_size: VOCAB,
        d_model: 8,
        n_layers: 1,
        n_heads: 2,
        d_ff: 16,
        max_seq_len: 64,
        norm_eps: 1e-5,
        tie_embeddings: false,
    });
    let mut assistant = zeroed(gpt2.init::<B>(&device).unwrap());
    let mut beta = vec![0.0f32; 8];
    beta[0] = 1.0;
    let mut w = vec![0.0f32; 8 * VOCAB];
    w[..VOCAB].copy_from_slice(assistant_logits);
    if let Lm::Gpt2(g) = &mut assistant {
        g.ln_f.beta = Some(burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(beta, [8]),
            &device,
        )));
        g.lm_head.as_mut().unwrap().weight = burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(w, [8, VOCAB]),
            &device,
        ));
    }
    let config = ChorusConfig {
        d_latent: 0,
        ..ChorusConfig::default()
    };
    let mut model = Chorus::new(config, base, vec![assistant], &device).unwrap();
    model.selector.as_mut().unwrap().proj.bias = Some(burn::module::Param::from_tensor(
        Tensor::from_data(selector_bias, &device),
    ));
    model
}

/// softmax of `logits` in f64.
fn softmax64(logits: &[f32]) -> Vec<f64> {
    let norm: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
    logits.iter().map(|&l| f64::from(l).exp() / norm).collect()
}

/// The scored target tokens of `e`.
fn scored_targets(e: &Encoded) -> Vec<usize> {
    let batch = TokenBatch::new(&[e]);
    (0..batch.seq)
        .filter(|&t| batch.target_mask[t] > 0.0)
        .map(|t| batch.targets[t] as usize)
        .collect()
}

#[test]
fn evaluation_matches_a_joint_model_whose_likelihood_is_known_in_closed_form() {
    let _rng = rng_lock();
    let device = Default::default();
    let logits = assistant_logits(37);
    let q = softmax64(&logits);
    let model = closed_form_model(&logits, [0.4, -0.7]);
    let pi = softmax64(&[0.4, -0.7]);
    let data = synthetic(10, 0);
    let set = crate::EvalSet {
        data: &data,
        batch_size: 4,
        device: &device,
    };
    /// Records what evaluation reports.
    #[derive(Default)]
    struct Recorder(Vec<String>);
    impl crate::Progress for Recorder {
        fn begin(&mut self, phase: &str, total: u64, done: u64) {
            self.0.push(format!("begin {phase} {total} {done}"));
        }
        fn update(&mut self, done: u64, _status: &str) {
            self.0.push(format!("update {done}"));
        }
        fn end(&mut self, completed: bool) {
            self.0.push(format!("end {completed}"));
        }
    }
    let mut recorder = Recorder::default();
    let mut routing = crate::RouterRecord::default();
    let rows = crate::evaluate_chorus(
        &model,
        "closed form",
        &set,
        crate::AssistantScores::Local,
        3,
        &mut recorder,
        Some(&mut routing),
    )
    .unwrap();
    // Every target token's router posterior, in order: r(1) = π_1 q[x] / (π_0 / V + π_1 q[x]).
    assert_eq!(routing.by_example.len(), data.len());
    for (index, e) in data.iter().enumerate() {
        let r = &routing.by_example[&index];
        let targets = scored_targets(e);
        assert_eq!(r.len(), targets.len());
        for (r, &x) in r.iter().zip(&targets) {
            let p = pi[0] / VOCAB as f64 + pi[1] * q[x];
            assert!((r[1] - pi[1] * q[x] / p).abs() < 1e-5, "{r:?}");
            assert!((r[0] + r[1] - 1.0).abs() < 1e-6);
        }
    }
    assert_eq!(rows.len(), 2, "two tasks");
    // Progress in examples: one phase, counted up to every example, ended as completed.
    let calls = &recorder.0;
    assert_eq!(calls.first().unwrap(), "begin evaluating closed form 10 0");
    assert_eq!(calls[calls.len() - 2], "update 10");
    assert_eq!(calls.last().unwrap(), "end true");
    for row in &rows {
        // By hand: −Σ_t log(π_0 / V + π_1 q[x_t]) over the scored tokens, and the posterior share
        // of the assistant, π_1 q / (π_0 / V + π_1 q), averaged over them.
        let (mut nll, mut deferral, mut tokens, mut examples, mut bytes) = (0.0, 0.0, 0, 0, 0);
        for e in data.iter().filter(|e| e.task.to_string() == row.task) {
            for x in scored_targets(e) {
                let p = pi[0] / VOCAB as f64 + pi[1] * q[x];
                nll -= p.ln();
                deferral += pi[1] * q[x] / p;
                tokens += 1;
            }
            examples += 1;
            bytes += e.target_bytes;
        }
        // Bits per byte: the same total in bits over the target text's bytes.
        let want = nll / (std::f64::consts::LN_2 * bytes as f64);
        assert_eq!(row.bytes, bytes, "{}", row.task);
        assert!(
            (row.bits_per_byte - want).abs() < 1e-5,
            "{}: bits/byte {} vs {want}",
            row.task,
            row.bits_per_byte
        );
        assert_eq!(
            (row.examples, row.tokens),
            (examples, tokens),
            "{}",
            row.task
        );
        let want = nll / tokens as f64;
        assert!(
            (row.nll - want).abs() < 1e-5,
            "{}: NLL {} vs {want}",
            row.task,
            row.nll
        );
        assert!(
            (row.ppl - want.exp()).abs() < 1e-4 * want.exp(),
            "{}: PPL",
            row.task
        );
        let want = deferral / tokens as f64;
        let got = row.deferral.unwrap();
        assert!(
            (got - want).abs() < 1e-5,
            "{}: deferral {got} vs {want}",
            row.task
        );
        assert!(row.kl.is_none() && row.mi.is_none() && row.active_units.is_none());
    }
}

#[test]
fn the_oracle_takes_the_best_model_at_each_token_and_cached_assistants_score_as_live_ones() {
    let _rng = rng_lock();
    let device = Default::default();
    let logits = assistant_logits(37);
    let q = softmax64(&logits);
    let model = closed_form_model(&logits, [0.4, -0.7]);
    let data = synthetic(10, 0);
    let set = crate::EvalSet {
        data: &data,
        batch_size: 4,
        device: &device,
    };
    // The base predicts 1/V everywhere and the assistant q: the oracle scores token x with
    // max(1/V, q[x]).
    let mut kept = [
        crate::TargetLogProbs::default(),
        crate::TargetLogProbs::default(),
    ];
    for (j, k) in kept.iter_mut().enumerate() {
        let rows = crate::evaluate_lm(
            &model.member(j),
            "member",
            &set,
            &mut crate::Silent,
            Some(k),
        )
        .unwrap();
        // Each model on its own: the base log V, the assistant −mean log q[x].
        for row in &rows {
            let targets = task_targets(&data, &row.task);
            let want = match j {
                0 => (VOCAB as f64).ln(),
                _ => -targets.iter().map(|&x| q[x].ln()).sum::<f64>() / targets.len() as f64,
            };
            assert_eq!(row.tokens, targets.len());
            assert!(
                (row.nll - want).abs() < 1e-5,
                "{j} {}: {} vs {want}",
                row.task,
                row.nll
            );
        }
    }
    let rows = crate::evaluate_oracle("oracle", &data, &[&kept[0], &kept[1]]).unwrap();
    assert_eq!(rows.len(), 2, "two tasks");
    for row in &rows {
        let (mut nll, mut tokens) = (0.0, 0);
        for e in data.iter().filter(|e| e.task.to_string() == row.task) {
            for x in scored_targets(e) {
                nll -= (1.0 / VOCAB as f64).max(q[x]).ln();
                tokens += 1;
            }
        }
        assert_eq!(row.tokens, tokens);
        let want = nll / tokens as f64;
        assert!(
            (row.nll - want).abs() < 1e-5,
            "{}: {} vs {want}",
            row.task,
            row.nll
        );
    }
    // A missing model's scores are an error, not a silently partial oracle.
    let partial = crate::TargetLogProbs::default();
    assert!(crate::evaluate_oracle("oracle", &data, &[&kept[0], &partial]).is_err());

    // The assistant's log-probs from a score cache (written on first use, from its saved file)
    // give the same evaluation as running it.
    let dir = tempfile::tempdir().unwrap();
    let assistant_dir = dir.path().join("assistant");
    model.assistants[0].save(&assistant_dir).unwrap();
    let sources = vec!["base".to_string(), assistant_dir.display().to_string()];
    let cache_dir = dir.path().join("scores");
    let live = crate::evaluate_chorus(
        &model,
        "live",
        &set,
        crate::AssistantScores::Local,
        2,
        &mut crate::Silent,
        None,
    )
    .unwrap();
    for _ in 0..2 {
        let cache = crate::assistant_scores(
            &model,
            &sources,
            &data,
            &cache_dir,
            3,
            &device,
            &mut crate::Silent,
        )
        .unwrap();
        let cached = crate::evaluate_chorus(
            &model,
            "cached",
            &set,
            crate::AssistantScores::Cache(&cache),
            2,
            &mut crate::Silent,
            None,
        )
        .unwrap();
        for (a, b) in live.iter().zip(&cached) {
            assert!(
                (a.nll - b.nll).abs() < 1e-6,
                "{}: {} vs {}",
                a.task,
                a.nll,
                b.nll
            );
            assert!((a.deferral.unwrap() - b.deferral.unwrap()).abs() < 1e-6);
        }
    }
    // Sources that do not name the assistants are refused.
    assert!(
        crate::assistant_scores(
            &model,
            &sources[..1],
            &data,
            &cache_dir,
            3,
            &device,
            &mut crate::Silent
        )
        .is_err()
    );
}

#[test]
fn calibration_finds_the_known_optimum_of_hard_routing() {
    let _rng = rng_lock();
    let device = Default::default();
    let data = synthetic(12, 0);
    let targets: Vec<usize> = data.iter().flat_map(scored_targets).collect();
    // An assistant that predicts the targets' own unigram distribution beats the uniform base on
    // every scored token on average (Gibbs); one that bets on token 0 (EOS, rare in targets) loses.
    let mut counts = [1.0f32; VOCAB];
    for &x in &targets {
        counts[x] += 1.0;
    }
    let unigram: Vec<f32> = counts.iter().map(|c| c.ln()).collect();
    let mut eos_only = vec![-4.0f32; VOCAB];
    eos_only[0] = 6.0;
    let uniform_nll = (VOCAB as f64).ln();
    for (logits, assistant_wins) in [(unigram, true), (eos_only, false)] {
        let q = softmax64(&logits);
        let assistant_nll = -targets.iter().map(|&x| q[x].ln()).sum::<f64>() / targets.len() as f64;
        assert_eq!(assistant_nll < uniform_nll, assistant_wins);
        // π(assistant) = 0.25 at every token: hard routing defers all tokens or none, and the
        // best of the two is known. π* is the same everywhere, so only η < 0.25 defers.
        let model = closed_form_model(&logits, [0.0, -(3.0f32).ln()]);
        let batches = data.chunks(4).map(|chunk| {
            let rows: Vec<&Encoded> = chunk.iter().collect();
            TokenBatch::new(&rows).to_device(&device)
        });
        let c = model.calibrate_eta(batches).unwrap();
        assert_eq!(c.tokens, targets.len());
        let chosen = c.candidates.iter().find(|k| k.eta == c.eta).unwrap();
        let (want_nll, want_deferral) = if assistant_wins {
            (assistant_nll, 1.0)
        } else {
            (uniform_nll, 0.0)
        };
        assert!(
            (chosen.nll - want_nll).abs() < 1e-5,
            "{chosen:?} vs {want_nll}"
        );
        assert_eq!(chosen.deferral, want_deferral, "{c:?}");
        assert!(c.candidates.iter().all(|k| k.nll >= chosen.nll));
    }
}

/// Metric sums and validation NLLs go through state.json on resume: f64 → JSON → f64 must be
/// exact (serde_json's default float parser can be one ulp off; the workspace enables its
/// `float_roundtrip` feature).
#[test]
fn checkpoint_state_round_trips_floats_exactly() {
    // Seen one ulp off without `float_roundtrip`, in `cargo xtask crash-test`'s metrics.
    let awkward = [
        0.011493308935314417,
        0.1 + 0.2,
        1.0 / 3.0,
        6.923605363921257,
        194.14421677155485,
        2.2250738585072014e-308,
        9007199254740993.0,
    ];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let random = (0..2000).map(|_| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        f64::from_bits((rng >> 2) | 0x3000_0000_0000_0000) // normal values of many magnitudes
    });
    for value in awkward.into_iter().chain(random) {
        let window = crate::MetricWindow {
            kl: value,
            ..Default::default()
        };
        let text = serde_json::to_string(&window).unwrap();
        let back: crate::MetricWindow = serde_json::from_str(&text).unwrap();
        assert_eq!(back.kl.to_bits(), value.to_bits(), "{value:e} → {text}");
    }
}

/// `chorus pretrain`'s config and the `[data]`-only one (`chorus eval`, `chorus calibrate`) check
/// their tables as `chorus train`'s does, and pretraining refuses the selector's first phase.
#[test]
fn pretrain_and_data_only_configs_check_their_tables() {
    let dir = tempfile::tempdir().unwrap();
    let pretrain = "tokenizer = \"t.json\"\n[model]\nfamily = \"llama\"\nvocab_size = 100\n\
                    d_model = 16\nn_layers = 1\nn_heads = 2\nn_kv_heads = 1\nd_ff = 32\n\
                    max_seq_len = 32\n";
    let p = write(dir.path(), "pre.toml", pretrain);
    let pretrain_err = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        load_config::<PretrainConfig>(Some(&p), &sets)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    load_config::<PretrainConfig>(Some(&p), &[]).unwrap();
    let e = pretrain_err(&["train.selector_init_steps=1"]);
    assert!(e.contains("pretrain has none"), "{e}");
    let e = pretrain_err(&["data.batch_size=0"]);
    assert!(e.contains("data.batch_size = 0"), "{e}");
    let e = pretrain_err(&["train.lr=0"]);
    assert!(e.contains("train.lr = 0"), "{e}");
    let e = pretrain_err(&["model.n_heads=3"]);
    assert!(e.contains("n_heads"), "{e}");
    load_config::<crate::config::DataSection>(None, &[]).unwrap();
    let e = load_config::<crate::config::DataSection>(None, &["data.max_seq_len=3".into()])
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.max_seq_len = 3"), "{e}");
}

/// Validation errors are typed: the variant names the key and carries the value as given.
#[test]
fn config_errors_name_the_key_and_the_value() {
    let optim = crate::OptimConfig {
        lr: -1.0,
        ..Default::default()
    };
    match optim.validate() {
        Err(crate::ConfigError::OutOfRange { key, value, .. }) => {
            assert_eq!((key, value.as_str()), ("train.lr", "-1"));
        }
        other => panic!("{other:?}"),
    }
    let optim = crate::OptimConfig {
        steps: 5,
        selector_init_steps: 5,
        ..Default::default()
    };
    match optim.validate() {
        Err(crate::ConfigError::Conflict { key, value, reason }) => {
            assert_eq!((key, value.as_str()), ("train.selector_init_steps", "5"));
            assert!(reason.contains("train.steps = 5"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

/// A story row of `model` with the given (tokens, log p) per example, indexed in order (only the
/// per-example scores are filled in).
fn score_row(model: &str, scores: Vec<(usize, f64)>) -> crate::EvalRow {
    crate::EvalRow {
        model: model.into(),
        task: "story".into(),
        examples: scores.len(),
        tokens: scores.iter().map(|s| s.0).sum(),
        nll: 0.0,
        ppl: 0.0,
        bytes: 0,
        bits_per_byte: 0.0,
        kl: None,
        mi: None,
        active_units: None,
        deferral: None,
        posterior_means: None,
        per_example: scores
            .into_iter()
            .enumerate()
            .map(|(index, (tokens, log_p))| crate::ExampleScore {
                index,
                tokens,
                log_p,
            })
            .collect(),
    }
}

/// A report's two Markdown tables, character for character: the rows sorted by task (stable, so
/// each task's models keep their order), missing columns as "–", deferral in percent; and the
/// paired comparison of the first model with the other, better by exactly 0.5 nats a token in
/// both examples, so every resample gives −0.5. A report without pairs has no paired table.
#[test]
fn a_report_reads_as_two_markdown_tables() {
    use crate::EvalReport;
    let mut chorus = score_row("chorus", vec![(4, -6.0), (6, -9.0)]);
    (chorus.nll, chorus.ppl, chorus.bits_per_byte) = (1.5, 1.5f64.exp(), 0.5);
    (chorus.kl, chorus.mi) = (Some(1.25), Some(0.5));
    (chorus.active_units, chorus.deferral) = (Some(3), Some(0.125));
    let mut single = score_row("SmolLM2", vec![(4, -8.0), (6, -12.0)]);
    (single.nll, single.ppl) = (2.0, 2f64.exp());
    let mut report = EvalReport::new("test split".into(), 1, vec![chorus, single], 100, 0).unwrap();
    let mut dialogue = score_row("SmolLM2", vec![(3, -3.0)]);
    (dialogue.task, dialogue.nll, dialogue.ppl) = ("dialogue".into(), 1.0, 1f64.exp());
    report.rows.push(dialogue);
    assert_eq!(
        report.table(),
        "| task | model | examples | tokens | NLL/token | PPL | bits/byte | KL | MI | AU | deferral |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n\
         | dialogue | SmolLM2 | 1 | 3 | 1.0000 | 2.72 | 0.0000 | – | – | – | – |\n\
         | story | chorus | 2 | 10 | 1.5000 | 4.48 | 0.5000 | 1.250 | 0.500 | 3 | 12.5 % |\n\
         | story | SmolLM2 | 2 | 10 | 2.0000 | 7.39 | 0.0000 | – | – | – | – |\n"
    );
    assert_eq!(
        report.paired_table(),
        "Paired, per example (Δ = NLL/token of the first model − the other's; 95 % percentile \
         bootstrap interval over examples, 100 resamples):\n\n\
         | task | model | against | examples | Δ NLL/token | 95 % interval |\n\
         |---|---|---|---|---|---|\n\
         | story | chorus | SmolLM2 | 2 | -0.5000 | [-0.5000, -0.5000] |\n"
    );
    report.paired.clear();
    assert_eq!(report.paired_table(), "");
}

/// A text file of 22 sentences in two paragraphs holds 5 passages of 4 (the last 2 sentences make
/// none); read 2 passages at a time it gives chunks of 2, 2 and 1 passages, and with a limit of 3,
/// of 2 and 1; every passage is a test example, in the file's order, even ones with no context and
/// odd ones with the first sentence as context, the file's path as its document. A file of fewer
/// than 4 sentences is refused, naming it.
#[test]
fn a_text_file_is_read_in_chunks_of_its_passages() {
    use crate::TextFile;
    let dir = tempfile::tempdir().unwrap();
    // A file whose own split (a hash of its path, the examples' document) is not the test split,
    // so that the test split seen below is the one a text file's passages are given.
    let path = (0..)
        .map(|i| dir.path().join(format!("novel{i}.txt")))
        .find(|p| {
            let document = p.display().to_string();
            let split = chorus_data::split_of(
                &document,
                chorus_data::tasks::VALID_FRACTION,
                chorus_data::tasks::TEST_FRACTION,
            );
            split != Split::Test
        })
        .unwrap();
    let sentence = |i: usize| format!("Sentence {i} goes here.");
    let paragraph = |r: std::ops::Range<usize>| r.map(sentence).collect::<Vec<_>>().join(" ");
    std::fs::write(
        &path,
        format!("{}\n\n{}\n", paragraph(0..10), paragraph(10..22)),
    )
    .unwrap();
    let file = || TextFile::open(&path).unwrap();
    assert_eq!(file().passages(), 5);
    let passage = |k: usize| -> (String, String) {
        let s: Vec<String> = (4 * k..4 * k + 4).map(sentence).collect();
        if k.is_multiple_of(2) {
            (String::new(), s.join(" "))
        } else {
            (s[0].clone(), format!(" {}", s[1..].join(" ")))
        }
    };
    for (limit, sizes) in [(None, vec![2, 2, 1]), (Some(3), vec![2, 1])] {
        let chunks: Vec<Vec<Example>> = file()
            .chunks(2, limit)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), sizes);
        for (k, e) in chunks.iter().flatten().enumerate() {
            assert_eq!(
                (e.context.clone(), e.target.clone()),
                passage(k),
                "passage {k}"
            );
            assert_eq!(
                (e.task, e.split),
                (Task::OpenEnded, Split::Test),
                "passage {k}"
            );
            assert_eq!(e.document, path.display().to_string());
        }
    }
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "One. Two. Three.\n").unwrap();
    let err = TextFile::open(&short).err().unwrap().to_string();
    assert!(
        err.contains("short.txt") && err.contains("fewer than 4 sentences"),
        "{err}"
    );
}

/// An example's IW seed is a function of its tokens and of where its target starts: the same
/// example always gets the same one, another token or another context length another, and a
/// field that does not change the scored text (the target's bytes) none.
#[test]
fn an_examples_iw_seed_is_that_of_its_tokens_and_its_context_length() {
    use crate::eval::iw_seed;
    let example = Encoded {
        task: Task::Story,
        tokens: vec![0, 5, 9, 7, 0],
        context_len: 1,
        target_bytes: 11,
    };
    let seed = iw_seed(&example);
    assert_eq!(iw_seed(&example.clone()), seed);
    let other_token = Encoded {
        tokens: vec![0, 5, 9, 8, 0],
        ..example.clone()
    };
    let other_context = Encoded {
        context_len: 2,
        ..example.clone()
    };
    let seeds = [seed, iw_seed(&other_token), iw_seed(&other_context)];
    assert!(
        seeds[0] != seeds[1] && seeds[0] != seeds[2] && seeds[1] != seeds[2],
        "{seeds:?}"
    );
    let other_bytes = Encoded {
        target_bytes: 12,
        ..example
    };
    assert_eq!(iw_seed(&other_bytes), seed);
}

/// A z model's KL column is, per task, the mean over its examples of KL(q(z | x, c) ‖ p(z | c)),
/// here written out for diagonal Gaussians from each example's q and p alone:
/// `½ Σ_d (σ_q² / σ_p² + (μ_q − μ_p)² / σ_p² − 1 + log σ_p² − log σ_q²)`. A model with no
/// assistant (K = 1) has no deferral column; one with an assistant has.
#[test]
fn a_z_models_kl_is_the_mean_over_examples_of_each_examples_kl() {
    let _rng = rng_lock();
    let device = Default::default();
    let data = synthetic(11, 0);
    let values = |t: Tensor<B, 2>| t.into_data().convert::<f64>().to_vec::<f64>().unwrap();
    for n_assistants in [0, 1] {
        let model = joint(z_config(), n_assistants).0.valid();
        let rows = evaluate_locally(&model, &data, 3, 2);
        for row in &rows {
            assert_eq!(row.deferral.is_some(), n_assistants > 0, "{n_assistants}");
            let (mut sum, mut n) = (0.0, 0);
            for e in data.iter().filter(|e| e.task.to_string() == row.task) {
                let batch = TokenBatch::new(&[e]).to_device::<B>(&device);
                let latent = model
                    .evaluate_batch(&batch, 1, &[0])
                    .unwrap()
                    .latent
                    .unwrap();
                let (mq, lq) = (
                    values(latent.posterior.mean),
                    values(latent.posterior.log_var),
                );
                let (mp, lp) = (values(latent.prior.mean), values(latent.prior.log_var));
                for d in 0..mq.len() {
                    let (vq, vp) = (lq[d].exp(), lp[d].exp());
                    sum += 0.5 * (vq / vp + (mq[d] - mp[d]).powi(2) / vp - 1.0 + lp[d] - lq[d]);
                }
                n += 1;
            }
            let (kl, want) = (row.kl.unwrap(), sum / n as f64);
            assert!(want > 1e-3, "{}: a KL of {want} tells nothing", row.task);
            assert!(
                (kl - want).abs() <= 1e-4 * want,
                "{}: KL {kl} vs {want}",
                row.task
            );
        }
    }
}

/// A training-free composition's evaluation, in closed form: the base predicts 1/V everywhere,
/// the assistant q. With τ = 0 the base's top-1 probability 1/V always clears the threshold, so
/// the base writes every token (NLL = log V, deferral 0); with τ = 0.5 it never does, so the
/// assistant writes every token (NLL = −mean log q[x], deferral 1).
#[test]
fn a_composition_is_evaluated_as_its_confidence_rule_routes() {
    let _rng = rng_lock();
    let device = Default::default();
    let logits = assistant_logits(37);
    let q = softmax64(&logits);
    let members = closed_form_model(&logits, [0.0, 0.0]);
    let model = Chorus::compose(members.base, members.assistants, &device).unwrap();
    let data = synthetic(10, 0);
    let set = crate::EvalSet {
        data: &data,
        batch_size: 4,
        device: &device,
    };
    for (tau, deferral) in [(0.0, 0.0), (0.5, 1.0)] {
        let rows =
            crate::evaluate_composition(&model, tau, "composed", &set, &mut crate::Silent).unwrap();
        assert_eq!(rows.len(), 2, "two tasks");
        for row in &rows {
            let targets = task_targets(&data, &row.task);
            let nll = if deferral == 0.0 {
                (VOCAB as f64).ln()
            } else {
                -targets.iter().map(|&x| q[x].ln()).sum::<f64>() / targets.len() as f64
            };
            assert_eq!(row.tokens, targets.len(), "{tau} {}", row.task);
            assert!(
                (row.nll - nll).abs() < 1e-5,
                "{tau} {}: {} vs {nll}",
                row.task,
                row.nll
            );
            assert_eq!(row.deferral, Some(deferral), "{tau} {}", row.task);
        }
    }
}

/// Evaluation with a score cache reads the assistants' log-probs from it instead of running
/// them: a cache scored by another assistant (the closed-form model with other logits) makes the
/// first model's evaluation that of the second.
#[test]
fn an_evaluation_with_a_score_cache_reads_the_assistants_from_it() {
    let _rng = rng_lock();
    let device = Default::default();
    let model = closed_form_model(&assistant_logits(37), [0.4, -0.7]);
    let other = closed_form_model(&assistant_logits(11), [0.4, -0.7]);
    let data = synthetic(10, 0);
    let set = crate::EvalSet {
        data: &data,
        batch_size: 4,
        device: &device,
    };
    let dir = tempfile::tempdir().unwrap();
    let assistant_dir = dir.path().join("other-assistant");
    other.assistants[0].save(&assistant_dir).unwrap();
    let sources = vec!["base".to_string(), assistant_dir.display().to_string()];
    let cache = crate::assistant_scores(
        &other,
        &sources,
        &data,
        &dir.path().join("scores"),
        3,
        &device,
        &mut crate::Silent,
    )
    .unwrap();
    let evaluate = |model: &Chorus<B>, scores| {
        crate::evaluate_chorus(model, "m", &set, scores, 1, &mut crate::Silent, None).unwrap()
    };
    let own = evaluate(&model, crate::AssistantScores::Local);
    let others = evaluate(&other, crate::AssistantScores::Local);
    let cached = evaluate(&model, crate::AssistantScores::Cache(&cache));
    for ((own, other), cached) in own.iter().zip(&others).zip(&cached) {
        assert!(
            (cached.nll - other.nll).abs() < 1e-6,
            "{}: {} with the cache, {} by the other model",
            cached.task,
            cached.nll,
            other.nll
        );
        assert!((own.nll - other.nll).abs() > 1e-3, "{}", own.task);
    }
}

/// A joint model's assistants can be scored once into a cache only when they exist, are local,
/// frozen and read no z; each other case says why not.
#[test]
fn only_frozen_local_z_blind_assistants_can_be_cached() {
    let _rng = rng_lock();
    let why = |config: ChorusConfig, n_assistants: usize| {
        crate::uncacheable_assistants(&joint(config, n_assistants).0)
    };
    let no_z = ChorusConfig {
        d_latent: 0,
        ..ChorusConfig::default()
    };
    assert_eq!(why(no_z.clone(), 1), None, "no z");
    let z_blind = ChorusConfig {
        assistant_adapters: false,
        ..z_config()
    };
    assert_eq!(why(z_blind, 1), None, "z that only the base reads");
    let cases = [
        (no_z.clone(), 0, "no assistants"),
        (z_config(), 1, "read z"),
        (
            ChorusConfig {
                train_assistants: true,
                ..no_z.clone()
            },
            1,
            "trained",
        ),
        (
            ChorusConfig {
                remote_assistants: 1,
                ..no_z
            },
            1,
            "remote",
        ),
    ];
    for (config, n_assistants, reason) in cases {
        let why = why(config, n_assistants);
        assert!(why.is_some_and(|w| w.contains(reason)), "{reason}: {why:?}");
    }
}

/// The mean of three seeds' evaluations ([`crate::EvalReport::mean_of`]): each example's score is
/// the mean of its three scores, the NLL and the paired Δ the means of the seeds' (exactly), and
/// the interval that of the seed-mean differences: seed noise that cancels across seeds leaves a
/// zero-width interval at the true edge while each seed's own interval is wide. Reports of other
/// examples, or without a row of the first, are refused, naming the source.
#[test]
fn the_mean_of_seed_evaluations_pairs_the_seed_mean_scores() {
    use crate::EvalReport;
    let mut rng = chorus_data::rng::SplitMix64(11);
    let baseline: Vec<(usize, f64)> = (0..120)
        .map(|i| (4 + i % 9, -2.5 * (4 + i % 9) as f64 * (1.0 + rng.uniform())))
        .collect();
    let noise: Vec<f64> = (0..120).map(|_| 6.0 * rng.uniform() - 3.0).collect();
    let edge = 0.2;
    // Seed s: chorus better by `edge` per token, plus noise · (1, −1, 0)[s] per example.
    let report = |s: usize| {
        let sign = [1.0, -1.0, 0.0][s];
        let chorus = baseline
            .iter()
            .zip(&noise)
            .map(|(&(t, lp), e)| (t, lp + edge * t as f64 + sign * e))
            .collect();
        let rows = vec![
            score_row("chorus", chorus),
            score_row("SmolLM2", baseline.clone()),
        ];
        EvalReport::new("test split".into(), 10, rows, 1000, 0).unwrap()
    };
    // The joint model's KL, MI and deferral: 1 + s, s / 2 and (s + 1) / 10 for seed s.
    let sources: Vec<(String, EvalReport)> = (0..3)
        .map(|s| {
            let mut r = report(s);
            let f = s as f64;
            (r.rows[0].kl, r.rows[0].mi) = (Some(1.0 + f), Some(f / 2.0));
            r.rows[0].deferral = Some((f + 1.0) / 10.0);
            (format!("seed-{s}.json"), r)
        })
        .collect();
    let own_width = |r: &EvalReport| r.paired[0].interval.1 - r.paired[0].interval.0;
    assert!(own_width(&sources[0].1) > 0.05, "{:?}", sources[0].1.paired);
    let mean = EvalReport::mean_of(&sources, 1000, 0).unwrap();
    for (k, row) in mean.rows.iter().enumerate() {
        for (i, e) in row.per_example.iter().enumerate() {
            let expected = sources
                .iter()
                .map(|(_, r)| r.rows[k].per_example[i].log_p)
                .sum::<f64>()
                / 3.0;
            assert!((e.log_p - expected).abs() < 1e-9);
        }
        let nll = |r: &crate::EvalRow| {
            -r.per_example.iter().map(|e| e.log_p).sum::<f64>() / r.tokens as f64
        };
        let nll_mean = sources.iter().map(|(_, r)| nll(&r.rows[k])).sum::<f64>() / 3.0;
        assert!((row.nll - nll_mean).abs() < 1e-9, "{} {nll_mean}", row.nll);
    }
    let close = |v: Option<f64>, want: f64| v.is_some_and(|v| (v - want).abs() < 1e-12);
    let joint = &mean.rows[0];
    assert!(close(joint.kl, 2.0) && close(joint.mi, 0.5), "{joint:?}");
    assert!(close(joint.deferral, 0.2), "{joint:?}");
    let single = &mean.rows[1];
    assert_eq!((single.kl, single.mi, single.deferral), (None, None, None));
    let paired = &mean.paired[0];
    let delta_mean = sources
        .iter()
        .map(|(_, r)| r.paired[0].nll_difference)
        .sum::<f64>()
        / 3.0;
    assert!((paired.nll_difference - delta_mean).abs() < 1e-9);
    assert!((paired.nll_difference + edge).abs() < 1e-9, "{paired:?}");
    assert!(
        (paired.interval.0 + edge).abs() < 1e-9 && (paired.interval.1 + edge).abs() < 1e-9,
        "{paired:?}"
    );
    // Refusals name the source.
    let mut shifted = sources.clone();
    shifted[2].1.rows[0].per_example[3].tokens += 1;
    let err = EvalReport::mean_of(&shifted, 10, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("seed-2.json") && err.contains("other examples"),
        "{err}"
    );
    let mut missing = sources.clone();
    missing[1].1.rows.pop();
    let err = EvalReport::mean_of(&missing, 10, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("seed-1.json") && err.contains("no row of SmolLM2"),
        "{err}"
    );
    // So do reports of another split, or with another number of IW samples, each on its own.
    let mut other_data = sources.clone();
    other_data[1].1.data = "valid split".into();
    let mut other_iw = sources.clone();
    other_iw[2].1.iw_samples = 100;
    for (mismatched, name) in [(other_data, "seed-1.json"), (other_iw, "seed-2.json")] {
        let err = EvalReport::mean_of(&mismatched, 10, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains(name) && err.contains("IW samples"), "{err}");
    }
    assert!(EvalReport::mean_of(&[], 10, 0).is_err());
}

/// A paired comparison: a model better by exactly c nats at every token differs by −c with a
/// zero-width interval; on noisy differences the interval holds the full-sample estimate, is
/// reproducible from its seed and narrows as examples are added; rows of other examples are refused.
#[test]
fn paired_bootstrap_intervals_behave_as_the_statistics_say() {
    use crate::{EvalRow, paired_difference};
    let row = |model: &str, scores: Vec<(usize, f64)>| score_row(model, scores);
    let mut rng = chorus_data::rng::SplitMix64(5);
    let baseline: Vec<(usize, f64)> = (0..200)
        .map(|i| (5 + i % 7, -3.0 * (5 + i % 7) as f64 * (1.0 + rng.uniform())))
        .collect();
    let c = 0.25;
    let better: Vec<(usize, f64)> = baseline
        .iter()
        .map(|&(t, lp)| (t, lp + c * t as f64))
        .collect();
    let d = paired_difference(&row("a", better), &row("b", baseline.clone()), 500, 1).unwrap();
    assert!((d.nll_difference + c).abs() < 1e-12, "{d:?}");
    assert!(
        (d.interval.0 + c).abs() < 1e-12 && (d.interval.1 + c).abs() < 1e-12,
        "{d:?}"
    );
    // Noise: a ± 1 nat per example on top of a −0.1 per-token edge.
    let noisy = |n: usize| -> (EvalRow, EvalRow) {
        let b: Vec<(usize, f64)> = baseline.iter().cycle().take(n).copied().collect();
        let mut rng = chorus_data::rng::SplitMix64(9);
        let a = b
            .iter()
            .map(|&(t, lp)| (t, lp + 0.1 * t as f64 + 2.0 * rng.uniform() - 1.0))
            .collect();
        (row("a", a), row("b", b))
    };
    let (a, b) = noisy(40);
    let small = paired_difference(&a, &b, 1000, 3).unwrap();
    assert!(small.interval.0 <= small.nll_difference && small.nll_difference <= small.interval.1);
    assert_eq!(small, paired_difference(&a, &b, 1000, 3).unwrap());
    assert_ne!(
        small.interval,
        paired_difference(&a, &b, 1000, 4).unwrap().interval
    );
    let (a, b) = noisy(4000);
    let large = paired_difference(&a, &b, 1000, 3).unwrap();
    let width = |d: &crate::PairedDifference| d.interval.1 - d.interval.0;
    assert!(width(&large) < width(&small) / 4.0, "{small:?} {large:?}");
    assert!(
        large.interval.1 < 0.0,
        "a real edge is resolved with enough examples: {large:?}"
    );
    // A few resamples (none counts as one), where a quantile index off by one or two reads past
    // the end: an ordered interval, of zero width for one resample.
    for resamples in [0, 1, 3] {
        let d = paired_difference(&a, &b, resamples, 2).unwrap();
        assert_eq!(d.resamples, resamples.max(1));
        assert!(d.interval.0 <= d.interval.1, "{d:?}");
        if resamples < 2 {
            assert_eq!(d.interval.0, d.interval.1, "{d:?}");
        }
    }
    // Rows of other examples are refused, and so is an example scored over other tokens.
    let (a, _) = noisy(40);
    let (_, b) = noisy(41);
    assert!(paired_difference(&a, &b, 10, 0).is_err());
    let (a, mut b) = noisy(40);
    b.per_example[7].tokens += 1;
    let err = paired_difference(&a, &b, 10, 0).unwrap_err().to_string();
    assert!(err.contains("example 7 is not scored alike"), "{err}");
}

/// An evaluation run chunk by chunk and merged ([`crate::ChunkedRows`], as `chorus eval
/// --text-file` runs) reports what one run over all examples reports: counts, NLL, bits per byte,
/// deferral and every example's score (a model without sampling); KL, the posterior-mean moments
/// and active units of a z model; MI as the examples-weighted mean of the chunks' estimates.
/// `evaluate_chorus` of `model` over `data` on the CPU, assistants scored live, no progress.
fn evaluate_locally(
    model: &Chorus<B>,
    data: &[Encoded],
    batch_size: usize,
    iw_samples: usize,
) -> Vec<crate::EvalRow> {
    let set = crate::EvalSet {
        data,
        batch_size,
        device: &Default::default(),
    };
    crate::evaluate_chorus(
        model,
        "m",
        &set,
        crate::AssistantScores::Local,
        iw_samples,
        &mut crate::Silent,
        None,
    )
    .unwrap()
}

#[test]
fn a_chunked_evaluation_merges_into_the_evaluation_of_all_examples() {
    use crate::EvalRow;
    let _rng = rng_lock();
    let logits = assistant_logits(37);
    let closed = closed_form_model(&logits, [0.4, -0.7]);
    let z_model = joint(z_config(), 1).0.valid();
    let data = synthetic(11, 0);
    let by_task = |rows: &[EvalRow], task: &str| rows.iter().find(|r| r.task == task).cloned();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * (1.0 + a.abs());
    for cut in [1, 4, 10] {
        let mut merged = [crate::ChunkedRows::default(), crate::ChunkedRows::default()];
        let mut chunks: Vec<Vec<EvalRow>> = Vec::new();
        let mut whole: Vec<Vec<EvalRow>> = Vec::new();
        // Both models' rows in one evaluation, renamed apart; the second chunk's rows come in
        // the reverse order, so each must find the row of its own model and task.
        let mut both = crate::ChunkedRows::default();
        let mut both_second = Vec::new();
        for (m, model) in [&closed, &z_model].into_iter().enumerate() {
            let eval = |data: &[Encoded]| evaluate_locally(model, data, 3, 2);
            let (first, second) = (eval(&data[..cut]), eval(&data[cut..]));
            merged[m].add(first.clone(), 0);
            merged[m].add(second.clone(), cut);
            let named = |rows: &[EvalRow]| -> Vec<EvalRow> {
                let mut rows = rows.to_vec();
                rows.iter_mut().for_each(|r| r.model = format!("m{m}"));
                rows
            };
            both.add(named(&first), 0);
            both_second.extend(named(&second));
            chunks.push([first, second].concat());
            whole.push(eval(&data));
        }
        both_second.reverse();
        both.add(both_second, cut);
        let both = both.into_rows();
        assert_eq!(both.len(), 4, "{cut}: one row per model and task");
        for (m, whole) in whole.iter().enumerate() {
            for task in ["story", "dialogue"] {
                let a = both
                    .iter()
                    .find(|r| r.model == format!("m{m}") && r.task == task)
                    .unwrap();
                let b = by_task(whole, task).unwrap();
                assert_eq!((a.examples, a.tokens), (b.examples, b.tokens), "{cut} m{m}");
                assert!(close(a.nll, b.nll), "{cut} m{m} {task}");
            }
        }
        let [closed_rows, z_rows] = merged.map(|m| m.into_rows());
        for task in ["story", "dialogue"] {
            let (a, b) = (
                by_task(&closed_rows, task).unwrap(),
                by_task(&whole[0], task).unwrap(),
            );
            assert_eq!(
                (a.examples, a.tokens, a.bytes),
                (b.examples, b.tokens, b.bytes),
                "{cut} {task}"
            );
            assert!(close(a.nll, b.nll), "{cut} {task}: {} vs {}", a.nll, b.nll);
            assert!(close(a.bits_per_byte, b.bits_per_byte), "{cut} {task}");
            assert!(close(a.ppl, b.ppl), "{cut} {task}");
            assert!(
                close(a.deferral.unwrap(), b.deferral.unwrap()),
                "{cut} {task}: {:?} vs {:?}",
                a.deferral,
                b.deferral
            );
            let scores = |r: &EvalRow| {
                let mut s: Vec<(usize, usize, f64)> = r
                    .per_example
                    .iter()
                    .map(|e| (e.index, e.tokens, e.log_p))
                    .collect();
                s.sort_by_key(|e| e.0);
                s
            };
            let (sa, sb) = (scores(&a), scores(&b));
            assert_eq!(sa.len(), sb.len());
            for (x, y) in sa.iter().zip(&sb) {
                assert_eq!((x.0, x.1), (y.0, y.1), "{cut} {task}: example indices");
                assert!(close(x.2, y.2), "{cut} {task}: {x:?} vs {y:?}");
            }
            // The z model: KL and the posterior-mean moments (deterministic) as over all examples.
            let (a, b) = (
                by_task(&z_rows, task).unwrap(),
                by_task(&whole[1], task).unwrap(),
            );
            assert!(
                close(a.kl.unwrap(), b.kl.unwrap()),
                "{cut} {task}: KL {:?} vs {:?}",
                a.kl,
                b.kl
            );
            let (ma, mb) = (a.posterior_means.unwrap(), b.posterior_means.unwrap());
            assert_eq!(ma.n, mb.n);
            for d in 0..ma.mean.len() {
                assert!(
                    close(ma.mean[d], mb.mean[d]) && close(ma.m2[d], mb.m2[d]),
                    "{cut}"
                );
            }
            assert_eq!(a.active_units, b.active_units);
            // MI: the chunks' estimates weighted by their examples.
            let parts: Vec<&EvalRow> = chunks[1].iter().filter(|r| r.task == task).collect();
            let n: usize = parts.iter().map(|r| r.examples).sum();
            let want: f64 = parts
                .iter()
                .map(|r| r.mi.unwrap() * r.examples as f64)
                .sum::<f64>()
                / n as f64;
            assert!(close(a.mi.unwrap(), want), "{cut} {task}");
        }
    }
}

#[test]
fn an_examples_iw_bound_and_the_mi_estimate_are_the_same_in_every_run_and_batch() {
    use crate::EvalRow;
    let _rng = rng_lock();
    let z_model = joint(z_config(), 1).0.valid();
    let data = synthetic(11, 0);
    let eval =
        |batch_size: usize, data: &[Encoded]| evaluate_locally(&z_model, data, batch_size, 4);
    // Per example: its tokens and its bound (as the per-example score).
    let scores = |rows: &[EvalRow]| {
        let mut s: Vec<(usize, f64)> = rows
            .iter()
            .flat_map(|r| r.per_example.iter().map(|e| (e.tokens, e.log_p)))
            .collect();
        s.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        s
    };
    let first = scores(&eval(3, &data));
    // Another run: the same draws, bit for bit.
    assert_eq!(first, scores(&eval(3, &data)));
    // Other batches (other padding, other neighbours) and the examples reversed: the same draws.
    let reversed: Vec<Encoded> = data.iter().rev().cloned().collect();
    for other in [scores(&eval(4, &data)), scores(&eval(1, &reversed))] {
        assert_eq!(first.len(), other.len());
        for (a, b) in first.iter().zip(&other) {
            assert_eq!(a.0, b.0);
            assert!((a.1 - b.1).abs() <= 1e-5 * a.1.abs(), "{a:?} vs {b:?}");
        }
    }
    // The MI estimate too: its draws come from the examples' seeds, and the estimator is
    // symmetric in the examples, so neither the run, the batches nor their order change it.
    let mi = |rows: &[EvalRow]| {
        let mut m: Vec<(String, f64)> = rows
            .iter()
            .map(|r| (r.task.clone(), r.mi.unwrap()))
            .collect();
        m.sort_by(|a, b| a.0.cmp(&b.0));
        m
    };
    let first = mi(&eval(3, &data));
    assert_eq!(first, mi(&eval(3, &data)), "another run");
    for other in [mi(&eval(4, &data)), mi(&eval(1, &reversed))] {
        for (a, b) in first.iter().zip(&other) {
            assert_eq!(a.0, b.0);
            assert!(
                (a.1 - b.1).abs() <= 1e-5 * (1.0 + a.1.abs()),
                "{a:?} vs {b:?}"
            );
        }
    }
}

/// A metrics row's means, from sums whose every quotient is exact in binary: loss per
/// micro-batch (steps × accumulation), NLL and deferral per target token, KL per row, gradient
/// norm per step, bag-of-words NLL per token; and the rate, tokens over the seconds since the
/// window started, bounded on both sides without timing anything tight.
#[test]
fn a_metrics_row_holds_the_windows_means() {
    let window = crate::MetricWindow {
        loss: 12.0,
        log_px: -4800.0,
        kl: 6.0,
        rows: 4,
        tokens: 6400,
        deferral: 1600.0,
        beta: 0.5,
        grad_norm: 3.0,
        steps: 2,
        bag_of_words: Some(-3200.0),
        started: Some(std::time::Instant::now() - std::time::Duration::from_secs(2)),
    };
    let (row, line) = window.row(7, 1e-3, false, 3);
    let get = |key: &str| {
        row[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} in {row}"))
    };
    assert_eq!(row["step"], 7);
    assert_eq!(row["kind"], "train");
    assert_eq!(get("lr"), 1e-3);
    assert_eq!(get("loss"), 2.0); // 12 / (2 steps × 3 micro-batches)
    assert_eq!(get("nll_per_token"), 0.75); // 4800 / 6400
    assert_eq!(get("kl"), 1.5); // 6 / 4 rows
    assert_eq!(get("beta"), 0.5);
    assert_eq!(get("deferral"), 0.25); // 1600 / 6400
    assert_eq!(get("grad_norm"), 1.5); // 3 / 2 steps
    assert_eq!(get("bow_nll_per_token"), 0.5); // 3200 / 6400
    // 6,400 tokens over at least 2 s (and, on any machine running this test, less than 60 s).
    let rate = get("tokens_per_s");
    assert!(rate <= 3200.0 && rate > 6400.0 / 60.0, "{rate}");
    assert!(
        line.starts_with("loss 2.000 | nll/tok 0.750 | KL 1.50 | β 0.50 | defer 25.0% | "),
        "{line}"
    );
    assert!(line.ends_with(" tok/s | bow nll/tok 0.500"), "{line}");

    // The selector's first phase: no NLL, KL, β or bag-of-words; the deferral is the share of
    // pseudo-labels that go to assistants.
    let (row, line) = window.row(1, 1e-3, true, 3);
    assert_eq!(row["kind"], "selector_init");
    for key in ["nll_per_token", "kl", "beta"] {
        assert!(row[key].is_null(), "{key} in {row}");
    }
    assert!(row.get("bow_nll_per_token").is_none(), "{row}");
    assert_eq!(row["deferral"].as_f64(), Some(0.25));
    assert!(
        line.starts_with("selector-init loss 2.000 | pseudo-labels to assistants 25.0% | "),
        "{line}"
    );
}

/// One optimiser step adds its sums to the metrics window, on top of what it holds: per
/// micro-batch the loss, Σ log p(x | z, c), Σ KL, Σ log p_bow, the posterior deferral summed over
/// target tokens, rows and target tokens; once per step the global norm of the accumulated
/// gradient (as the gradient hook sees it, before clipping) and the step count. In the selector's
/// first phase the deferral is the pseudo-labels' share times the target tokens. The expected
/// sums come from the same forward passes run outside the step, on the same z draws.
#[test]
fn a_step_adds_its_sums_to_the_metrics_window() {
    use crate::metrics::MetricWindow;
    use crate::step::{Objective, StepSettings, optimiser_step};
    use chorus_elbo::posterior_deferral;

    let _rng = rng_lock();
    let device = Default::default();
    let config = ChorusConfig {
        bag_of_words: 0.5,
        ..z_config()
    };
    let (model, _) = joint(config, 1);
    let data = synthetic(5, 0);
    let micro_batches: Vec<TokenBatch> = [&data[..3], &data[3..]]
        .iter()
        .map(|chunk| TokenBatch::new(&chunk.iter().collect::<Vec<_>>()))
        .collect();
    let start = MetricWindow {
        loss: 1.0,
        log_px: -2.0,
        kl: 3.0,
        rows: 4,
        tokens: 5,
        deferral: 6.0,
        beta: 0.0,
        grad_norm: 7.0,
        steps: 8,
        bag_of_words: Some(-9.0),
        started: None,
    };
    let scalar = |t: Tensor<AD, 1>| t.sum().into_scalar().elem::<f64>();
    let close = |what: &str, got: f64, want: f64| {
        assert!(
            (got - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{what}: {got} in the window, {want} expected"
        );
    };
    for objective in [Objective::Elbo { beta: 0.25 }, Objective::SelectorInit] {
        // Expected: the same passes, z drawn from the same seed.
        AD::seed(&device, 11);
        let mut want = start.clone();
        for host in &micro_batches {
            let batch = host.to_device::<AD>(&device);
            let loss = match objective {
                Objective::SelectorInit => {
                    let (loss, share) = model.selector_pseudo_label_loss(&batch).unwrap();
                    want.deferral += share * host.n_targets() as f64;
                    loss
                }
                Objective::Elbo { beta } => {
                    let out = model.forward_elbo(&batch, beta).unwrap();
                    want.deferral += scalar(posterior_deferral(out.router, batch.target_mask));
                    want.log_px += scalar(out.terms.reconstruction);
                    want.kl += scalar(out.terms.kl);
                    *want.bag_of_words.as_mut().unwrap() += scalar(out.terms.bag_of_words.unwrap());
                    want.beta = beta;
                    out.terms.loss
                }
            };
            want.loss += scalar(loss);
            want.rows += host.rows;
            want.tokens += host.n_targets();
        }
        // The step, its hook reading the accumulated gradient's norm.
        let seen_norm = std::rc::Rc::new(std::cell::Cell::new(f64::NAN));
        let (seen, hook_model) = (seen_norm.clone(), model.clone());
        let hook = move |_: u64, grads: &mut burn::optim::GradientsParams| {
            seen.set(crate::grads::global_norm(&hook_model, grads));
        };
        let settings = StepSettings {
            step: 0,
            lr: 1e-3,
            selector_lr_scale: 1.0,
            grad_clip: 1e-3,
            objective,
            gradient_hook: Some(&hook),
        };
        let mut window = start.clone();
        let mut optimizer = crate::AdamW::default().init::<AD, Chorus<AD>>();
        AD::seed(&device, 11);
        optimiser_step(
            model.clone(),
            &mut optimizer,
            &micro_batches,
            &settings,
            &mut window,
            &device,
        )
        .unwrap();
        want.grad_norm += seen_norm.get();
        want.steps += 1;
        assert!(
            seen_norm.get() > 1e-3,
            "the norm {} is clipped",
            seen_norm.get()
        );
        let label = format!("{objective:?}");
        close(&format!("{label} loss"), window.loss, want.loss);
        close(&format!("{label} log_px"), window.log_px, want.log_px);
        close(&format!("{label} kl"), window.kl, want.kl);
        close(&format!("{label} deferral"), window.deferral, want.deferral);
        close(
            &format!("{label} grad_norm"),
            window.grad_norm,
            want.grad_norm,
        );
        close(
            &format!("{label} bag_of_words"),
            window.bag_of_words.unwrap(),
            want.bag_of_words.unwrap(),
        );
        assert_eq!(
            (window.rows, window.tokens, window.steps, window.beta),
            (want.rows, want.tokens, want.steps, want.beta),
            "{label}"
        );
        assert_ne!(
            window.deferral, start.deferral,
            "{label}: no deferral added"
        );
    }
}
