//! `chorus data tokenizer`, `pretrain`, `score`, `train` and `eval`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::backend::Autodiff;
use burn::prelude::*;
use chorus_data::{Example, Split, Task, fetch::cache_dir, load_examples};
use chorus_lm::{Lm, Tokenizer};
use chorus_model::{Assistant, LocalLm, RemoteAssistant};
use chorus_train::{
    AssistantScores, ChunkedRows, DataConfig, DataSection, EvalReport, EvalSet, PretrainConfig,
    Progress, RouterRecord, TOKEN_CONVENTION, TargetLogProbs, TextFile, TrainConfig,
    assistant_scores, encode_examples, evaluate_chorus, evaluate_composition, evaluate_lm,
    evaluate_oracle, load_chorus, load_config, load_task_examples, uncacheable_assistants,
};

use crate::progress::Offset;

/// Passages of a `--text-file` evaluated at a time: memory holds one chunk's text and tokens, and
/// MI is estimated per chunk (N = 256 posteriors, like a split's 200 examples per task).
const TEXT_FILE_CHUNK: usize = 256;

/// The examples of an evaluation, a chunk at a time.
type ExampleChunks = Box<dyn Iterator<Item = Result<Vec<Example>, chorus_train::TrainError>>>;

/// `chorus data tokenizer`: a byte-level BPE trained on the training split of the three tasks.
pub fn tokenizer(vocab_size: usize, out: &Path) -> Result<()> {
    // Where it goes first, so that an unwritable output fails before minutes of training.
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let examples = load_examples(&cache_dir())?;
    // Targets of every task, plus contexts where they are not earlier targets (dialogue contexts
    // are previous turns).
    let texts: Vec<&str> = examples
        .iter()
        .filter(|e| e.split == Split::Train)
        .flat_map(|e| {
            let context =
                (e.task != Task::Dialogue && !e.context.is_empty()).then_some(e.context.as_str());
            std::iter::once(e.target.as_str()).chain(context)
        })
        .collect();
    eprintln!("training a {vocab_size}-token BPE on {} texts", texts.len());
    let tokenizer = Tokenizer::train_bpe(texts.into_iter(), vocab_size, &["<|endoftext|>"])?;
    tokenizer.save(out)?;
    println!(
        "wrote {} ({} tokens)",
        out.display(),
        tokenizer.vocab_size()
    );
    Ok(())
}

pub fn pretrain<B: Backend>(
    config: Option<&Path>,
    sets: &[String],
    out: &Path,
    resume: bool,
    device: &B::Device,
) -> Result<()> {
    let config: PretrainConfig = load_config(config, sets)?;
    save_config(out, &config)?;
    let summary = chorus_train::pretrain::<Autodiff<B>>(
        &config,
        out,
        resume,
        device,
        &mut crate::progress::Bar::default(),
    )?;
    println!("pretrained {summary}");
    Ok(())
}

pub fn score<B: Backend>(
    config: Option<&Path>,
    sets: &[String],
    out: &Path,
    remotes: &[String],
    device: &B::Device,
) -> Result<()> {
    let config: TrainConfig = load_config(config, sets)?;
    let (n_train, n_valid) = chorus_train::score::<B>(
        &config,
        remotes,
        out,
        device,
        &mut crate::progress::Bar::default(),
    )?;
    println!(
        "scored {} assistants on {n_train} train and {n_valid} valid examples: {}",
        if remotes.is_empty() {
            config.assistants.len()
        } else {
            remotes.len()
        },
        out.display()
    );
    Ok(())
}

pub fn train<B: Backend>(
    config: Option<&Path>,
    sets: &[String],
    out: &Path,
    resume: bool,
    device: &B::Device,
) -> Result<()> {
    let config: TrainConfig = load_config(config, sets)?;
    save_config(out, &config)?;
    let summary = chorus_train::train::<Autodiff<B>>(
        &config,
        out,
        resume,
        device,
        &mut crate::progress::Bar::default(),
    )?;
    println!("trained {summary}");
    Ok(())
}

/// The resolved config next to the run's outputs, for the record.
fn save_config<T: serde::Serialize>(out: &Path, config: &T) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join("config.toml");
    std::fs::write(&path, toml::to_string(config)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// What `chorus eval` was asked to evaluate.
pub struct EvalArgs<'a> {
    pub models: &'a [String],
    /// `[NAME=]BASE+ASSISTANT[+…][@τ]` specs.
    pub compositions: &'a [String],
    pub config: Option<&'a Path>,
    pub sets: &'a [String],
    pub split: Split,
    pub text_file: Option<&'a Path>,
    /// `None`: 200 examples per task of a split, every passage of a text file.
    pub max_examples: Option<usize>,
    pub iw_samples: usize,
    pub members: bool,
    /// Add the per-token oracle over the single LMs.
    pub oracle: bool,
    /// Score cache directory for joint models' frozen local assistants.
    pub scores: Option<&'a Path>,
    /// Write the first joint model's router posterior per target token here (JSON lines).
    pub routing: Option<&'a Path>,
    pub json: Option<&'a Path>,
}

enum Loaded<B: Backend> {
    /// A joint model, its sources as saved and the servers of its remote assistants.
    Joint(
        Box<chorus_model::Chorus<B>>,
        Vec<String>,
        Vec<RemoteAssistant>,
    ),
    Single(Box<Lm<B>>),
    /// A training-free composition and its confidence threshold τ.
    Composition(Box<chorus_model::Chorus<B>>, f64),
}

/// One evaluated chunk of examples, the first being example `offset` of the evaluation.
struct RoutedChunk<'a> {
    examples: &'a [chorus_data::Example],
    encoded: &'a [chorus_train::Encoded],
    offset: usize,
}

/// `--routing FILE`: one JSON line per example — its task, context and target text, the models
/// (`sources`), and per target token its text and the router posterior `r_t(j)` at z = E q.
fn write_routing(
    out: &mut impl std::io::Write,
    name: &str,
    sources: &[String],
    chunk: &RoutedChunk<'_>,
    tokenizer: &Tokenizer,
    record: &RouterRecord,
) -> Result<()> {
    for (&index, posteriors) in &record.by_example {
        let e = &chunk.encoded[index];
        let tokens: Vec<serde_json::Value> = e
            .target_positions()
            .zip(posteriors)
            .map(|(t, r)| {
                let text = tokenizer.decode(&[e.tokens[t + 1]]).unwrap_or_default();
                serde_json::json!({ "text": text, "r": r })
            })
            .collect();
        let line = serde_json::json!({
            "model": name,
            "models": sources,
            "task": e.task.name(),
            "example": chunk.offset + index,
            "context": chunk.examples[index].context,
            "target": chunk.examples[index].target,
            "tokens": tokens,
        });
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// `[NAME=]BASE+ASSISTANT[+ASSISTANT…][@τ]` → name, member paths, τ (default 0.5).
fn parse_composition(spec: &str) -> Result<(String, Vec<PathBuf>, f64)> {
    let (name, rest) = match spec.split_once('=') {
        Some((name, rest)) if !name.is_empty() => (name.to_string(), rest),
        _ => (spec.to_string(), spec),
    };
    let (members, tau) = match rest.rsplit_once('@') {
        Some((members, tau)) => {
            let tau: f64 = tau
                .parse()
                .ok()
                .filter(|t| (0.0..=1.0).contains(t))
                .with_context(|| {
                    format!("--composition {spec}: τ after `@` must be a number in [0, 1]")
                })?;
            (members, tau)
        }
        None => (rest, 0.5),
    };
    let paths: Vec<PathBuf> = members.split('+').map(PathBuf::from).collect();
    if paths.len() < 2 || paths.iter().any(|p| p.as_os_str().is_empty()) {
        bail!("--composition {spec}: expected BASE+ASSISTANT[+ASSISTANT…][@τ]");
    }
    Ok((name, paths, tau))
}

/// `NAME=PATH` or `PATH` (then the name is the path).
fn parse_model(spec: &str) -> (String, PathBuf) {
    match spec.split_once('=') {
        Some((name, path)) if !name.is_empty() => (name.to_string(), PathBuf::from(path)),
        _ => (spec.to_string(), PathBuf::from(spec)),
    }
}

pub fn eval<B: Backend>(args: EvalArgs<'_>, device: &B::Device) -> Result<()> {
    if args.models.is_empty() && args.compositions.is_empty() {
        bail!("give at least one --model (a joint checkpoint directory or an LM) or --composition");
    }
    // Rows, the paired comparisons and `chorus eval-mean` tell the models apart by name.
    let mut names = std::collections::BTreeSet::new();
    for spec in args.models {
        let (name, _) = parse_model(spec);
        if !names.insert(name.clone()) {
            bail!(
                "two models named `{name}`: name each one, e.g. --model a={name} --model b={name}"
            );
        }
    }
    for spec in args.compositions {
        let (name, _, _) = parse_composition(spec)?;
        if !names.insert(name.clone()) {
            bail!("two models named `{name}`: name the composition, e.g. --composition c=…");
        }
    }
    let data: DataConfig = match args.config {
        Some(_) => load_config::<TrainConfig>(args.config, args.sets)?.data,
        None => load_config::<DataSection>(None, args.sets)?.data,
    };
    let mut tokenizer: Option<Tokenizer> = None;
    let mut loaded = Vec::new();
    for spec in args.models {
        let (name, path) = parse_model(spec);
        let (model, tok) = if path.join("chorus.json").is_file() {
            let (saved, state) = load_chorus::<B>(&path, device)?;
            eprintln!(
                "{name}: joint model, K = {}, step {}",
                saved.model.n_models(),
                state.step
            );
            let remotes = crate::generate::connect_remotes(
                &saved.model,
                &saved.manifest.sources,
                &saved.tokenizer,
            )?;
            (
                Loaded::Joint(Box::new(saved.model), saved.manifest.sources, remotes),
                saved.tokenizer,
            )
        } else {
            let (lm, tok) = crate::generate::open_lm::<B>(&path, device, false)?;
            (Loaded::Single(Box::new(lm)), tok)
        };
        match &tokenizer {
            None => tokenizer = Some(tok),
            Some(first) => first.check_same(&tok)?,
        }
        loaded.push((name, model));
    }
    for spec in args.compositions {
        let (name, paths, tau) = parse_composition(spec)?;
        let (model, _, tok) =
            crate::generate::load_composition::<B>(&paths[0], &paths[1..], device, false)?;
        eprintln!(
            "{name}: composition of {} models, confidence:{tau}",
            model.n_models()
        );
        match &tokenizer {
            None => tokenizer = Some(tok),
            Some(first) => first.check_same(&tok)?,
        }
        loaded.push((name, Loaded::Composition(Box::new(model), tau)));
    }
    let tokenizer = tokenizer.expect("at least one model");
    // A split is evaluated in one piece; a text file in chunks of passages (bounded memory).
    let (source, what, total) = match args.text_file {
        Some(file) => {
            let text = TextFile::open(file)?;
            let all = text.passages();
            let limit = args.max_examples.filter(|&n| n > 0 && n < all);
            let what = match limit {
                Some(n) => format!("{}, first {n} of {all} passages", file.display()),
                None => file.display().to_string(),
            };
            let chunks: ExampleChunks = Box::new(text.chunks(TEXT_FILE_CHUNK, limit)?);
            (chunks, what, limit.unwrap_or(all))
        }
        None => {
            let all = load_examples(&data.cache_dir())?;
            let examples =
                load_task_examples(&all, &data, args.split, args.max_examples.unwrap_or(200))?;
            let total = examples.len();
            let chunks: ExampleChunks = Box::new(std::iter::once(Ok(examples)));
            (
                chunks,
                format!("{:?} split", args.split).to_lowercase(),
                total,
            )
        }
    };
    // Rows are cut to the shortest context window among the models (and data.max_seq_len).
    let context = loaded
        .iter()
        .flat_map(|(_, m)| match m {
            Loaded::Joint(m, _, _) | Loaded::Composition(m, _) => std::iter::once(&m.base)
                .chain(&m.assistants)
                .map(|lm| lm.dims().max_seq_len)
                .collect::<Vec<_>>(),
            Loaded::Single(lm) => vec![lm.dims().max_seq_len],
        })
        .fold(data.max_seq_len, usize::min);
    let singles = loaded
        .iter()
        .filter(|(_, m)| matches!(m, Loaded::Single(_)))
        .count();
    if args.oracle && singles < 2 {
        bail!(
            "--oracle picks the best of the single LMs at each token: give at least two (found {singles})"
        );
    }
    // Flags for joint models, refused where no model given can use them.
    let joints: Vec<&chorus_model::Chorus<B>> = loaded
        .iter()
        .filter_map(|(_, m)| match m {
            Loaded::Joint(m, _, _) => Some(m.as_ref()),
            _ => None,
        })
        .collect();
    if args.members && joints.is_empty() {
        bail!("--members: no joint model among --model, so there are no members to evaluate alone");
    }
    if let Some(dir) = args.scores
        && !joints.iter().any(|m| uncacheable_assistants(m).is_none())
    {
        bail!(
            "--scores {}: no joint model among --model has assistants that are frozen and read no \
             z, whose log-probs the cache would hold",
            dir.display()
        );
    }
    // Evaluations per example: each model, and each member of a joint model with --members.
    let evaluations: usize = loaded
        .iter()
        .map(|(_, m)| match m {
            Loaded::Joint(m, _, remotes) if args.members => 1 + m.n_local() + remotes.len(),
            _ => 1,
        })
        .sum();
    // The router posteriors come from the first joint model with assistants.
    let routed = args.routing.and_then(|path| {
        let first = loaded
            .iter()
            .position(|(_, m)| matches!(m, Loaded::Joint(m, _, _) if m.n_models() > 1))?;
        Some((first, path))
    });
    if let (Some(path), None) = (args.routing, routed) {
        bail!(
            "--routing {}: no joint model with assistants among --model, so there is no router \
             to record",
            path.display()
        );
    }
    let mut routing_out = match routed {
        Some((_, path)) => Some((
            std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            ),
            path,
        )),
        None => None,
    };
    let phase = format!("evaluating {} models", loaded.len());
    let units = (total * evaluations) as u64;
    let mut bar = crate::progress::Bar::default();
    bar.begin(&phase, units, 0);
    let mut done = 0u64;
    let mut rows = ChunkedRows::default();
    let mut offset = 0;
    for (chunk_index, examples) in source.enumerate() {
        let examples = examples?;
        let encoded = encode_examples(&examples, &tokenizer, &data.eos_token, context)?;
        let set = EvalSet {
            data: &encoded,
            batch_size: data.batch_size,
            device,
        };
        // A split's examples keep the cache key they always had; a file's chunk adds its range.
        let label = if args.text_file.is_some() {
            format!("{what}, passages {offset}..{}", offset + encoded.len())
        } else {
            what.clone()
        };
        let mut chunk_rows = Vec::new();
        let mut single_tokens: Vec<TargetLogProbs> = Vec::new();
        for (i, (name, model)) in loaded.iter().enumerate() {
            if chunk_index == 0 {
                bar.line(&format!("evaluating {name} on {total} examples ({what})"));
            }
            match model {
                Loaded::Joint(m, sources, remotes) => {
                    let servers: Vec<&dyn Assistant<B>> =
                        remotes.iter().map(|r| r as &dyn Assistant<B>).collect();
                    let cache = match args.scores {
                        // Only assistants that are frozen and read no z have one score per token.
                        Some(dir) if uncacheable_assistants(m.as_ref()).is_none() => {
                            let ids = sources.join("\n");
                            let dir = dir.join(format!(
                                "{:016x}",
                                chorus_data::rng::stable_hash(&format!("{label}\n{ids}"))
                            ));
                            let cache = assistant_scores(
                                m.as_ref(),
                                sources,
                                &encoded,
                                &dir,
                                data.batch_size * 4,
                                device,
                                &mut bar,
                            )?;
                            bar.begin(&phase, units, done);
                            Some(cache)
                        }
                        _ => None,
                    };
                    let assistants = match (&cache, servers.is_empty()) {
                        (Some(cache), _) => AssistantScores::Cache(cache),
                        (None, true) => AssistantScores::Local,
                        (None, false) => AssistantScores::Servers(&servers),
                    };
                    let mut record = RouterRecord::default();
                    let first_joint = routed.is_some_and(|(first, _)| first == i);
                    chunk_rows.extend(evaluate_chorus(
                        m.as_ref(),
                        name,
                        &set,
                        assistants,
                        args.iw_samples,
                        &mut Offset::new(&mut bar, &mut done),
                        (first_joint && routing_out.is_some()).then_some(&mut record),
                    )?);
                    if let (true, Some((out, path))) = (first_joint, routing_out.as_mut()) {
                        let chunk = RoutedChunk {
                            examples: &examples,
                            encoded: &encoded,
                            offset,
                        };
                        write_routing(out, name, sources, &chunk, &tokenizer, &record)
                            .with_context(|| format!("writing {}", path.display()))?;
                    }
                    if args.members {
                        let locals: Vec<LocalLm<'_, B>> =
                            (0..m.n_local()).map(|j| m.member(j)).collect();
                        let members = locals
                            .iter()
                            .map(|l| l as &dyn Assistant<B>)
                            .chain(remotes.iter().map(|r| r as &dyn Assistant<B>));
                        for (j, member) in members.enumerate() {
                            let role = if j == 0 {
                                "base without z".to_string()
                            } else {
                                format!("assistant {j}")
                            };
                            let member_name = format!("{name}: {role}");
                            chunk_rows.extend(evaluate_lm(
                                member,
                                &member_name,
                                &set,
                                &mut Offset::new(&mut bar, &mut done),
                                None,
                            )?);
                        }
                    }
                }
                Loaded::Single(lm) => {
                    let mut kept = TargetLogProbs::default();
                    let keep = args.oracle.then_some(&mut kept);
                    chunk_rows.extend(evaluate_lm(
                        &LocalLm::new(lm),
                        name,
                        &set,
                        &mut Offset::new(&mut bar, &mut done),
                        keep,
                    )?);
                    if args.oracle {
                        single_tokens.push(kept);
                    }
                }
                Loaded::Composition(m, tau) => chunk_rows.extend(evaluate_composition(
                    m.as_ref(),
                    *tau,
                    name,
                    &set,
                    &mut Offset::new(&mut bar, &mut done),
                )?),
            }
        }
        if args.oracle {
            let members: Vec<&TargetLogProbs> = single_tokens.iter().collect();
            chunk_rows.extend(evaluate_oracle(
                &format!("oracle (best of {singles} single LMs per token)"),
                &encoded,
                &members,
            )?);
        }
        if chunk_index > 0 || args.text_file.is_some() {
            bar.line(&format!(
                "evaluated passages {offset}..{} of {total}",
                offset + encoded.len()
            ));
        }
        rows.add(chunk_rows, offset);
        offset += encoded.len();
        crate::release_freed_memory();
    }
    bar.end(true);
    if let Some((mut out, path)) = routing_out {
        use std::io::Write;
        out.flush()
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote the router posteriors to {}", path.display());
    }
    let rows = rows.into_rows();
    // Rows of one task come in model order, each scoring the same examples.
    let report = EvalReport::new(what, args.iw_samples, rows, 1000, 0)?;
    print_and_write(&report, args.json)
}

/// Prints an evaluation's tables and writes it as JSON to `json`, if given.
fn print_and_write(report: &EvalReport, json: Option<&Path>) -> Result<()> {
    println!("{}", report.table());
    if !report.paired.is_empty() {
        println!("{}", report.paired_table());
    }
    println!(
        "NLL: nats {TOKEN_CONVENTION}; joint models: importance-weighted bound with {} samples of z ~ q.",
        report.iw_samples
    );
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `chorus eval-mean`: the mean of `chorus eval --json` reports ([`EvalReport::mean_of`]).
pub fn eval_mean(evaluations: &[PathBuf], json: Option<&Path>) -> Result<()> {
    let sources = evaluations
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let report: EvalReport = serde_json::from_str(&text).with_context(|| {
                format!("{}: not a `chorus eval --json` report", path.display())
            })?;
            Ok((path.display().to_string(), report))
        })
        .collect::<Result<Vec<_>>>()?;
    let report = EvalReport::mean_of(&sources, 1000, 0)?;
    println!("The mean of {} evaluations:\n", sources.len());
    print_and_write(&report, json)
}
