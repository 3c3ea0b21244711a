//! `chorus generate` and `chorus calibrate`: collaborative decoding with provenance.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use chorus_lm::Tokenizer;
use chorus_model::{
    Assistant, AssistantUpdate, Chorus, DecodeConfig, Decoded, EtaCalibration, RemoteAssistant,
    RemoteSettings, WriterStrategy, ZSource, is_server_url,
};
use serde::Serialize;

/// Where z comes from (`--z`; [`ZSource`] with the references and seed filled in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ZChoice {
    /// A sample of the prior p(z | c).
    Prior,
    /// The prior's mean.
    PriorMean,
    /// The posterior mean of `--reference` (reconstruction).
    Posterior,
    /// Between the posterior means of two `--reference` texts, at `--alpha`.
    Interpolate,
}

/// When to colour the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Color {
    /// When stdout is a terminal.
    Auto,
    /// Always (ANSI escapes).
    Always,
    /// Never.
    Never,
}

pub struct GenerateArgs<'a> {
    pub model: ModelSource<'a>,
    pub prompt: Option<&'a str>,
    pub prompt_file: Option<&'a Path>,
    pub strategy: Option<&'a str>,
    /// `None`: the prior (a sample of it).
    pub z: Option<ZChoice>,
    pub references: &'a [String],
    /// `None`: 0.5.
    pub alpha: Option<f64>,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub seed: u64,
    pub max_tokens: usize,
    pub stop: &'a [String],
    pub samples: usize,
    pub color: Color,
    pub json: Option<&'a Path>,
    pub html: Option<&'a Path>,
    /// `None`: lazy.
    pub assistants: Option<AssistantUpdate>,
    /// GGUF members keep their quantised blocks for decoding (on host devices).
    pub gguf_blocks: bool,
}

/// ANSI colours per model: the base plain, assistants cyan, magenta, yellow, green, blue.
const ANSI: [&str; 6] = [
    "", "\x1b[36m", "\x1b[35m", "\x1b[33m", "\x1b[32m", "\x1b[34m",
];
/// HTML background colours per model.
const HTML: [&str; 6] = [
    "#f4f4f4", "#cdeefd", "#f6d5f3", "#fbefc0", "#d4f5d0", "#d9e0fb",
];

/// A display name per model, from where it was loaded (`out/expert-story/lm` → `expert-story`).
fn model_names(sources: &[String], k: usize) -> Vec<String> {
    (0..k)
        .map(|j| {
            let role = if j == 0 {
                "base".to_string()
            } else {
                format!("assistant {j}")
            };
            let path = sources.get(j).map(PathBuf::from);
            let stem = path.as_ref().and_then(|p| {
                let last = p.file_name()?.to_string_lossy().to_string();
                if last == "lm" || last == "model" || last == "best" {
                    p.parent()?
                        .file_name()
                        .map(|s| s.to_string_lossy().to_string())
                } else {
                    Some(last)
                }
            });
            match stem {
                Some(s) if s != role => format!("{role} ({s})"),
                _ => role,
            }
        })
        .collect()
}

fn read_prompt(args: &GenerateArgs<'_>) -> Result<String> {
    Ok(match (args.prompt, args.prompt_file) {
        (Some(_), Some(_)) => {
            bail!("give the prompt as an argument or with --prompt-file, not both")
        }
        (Some("-"), None) => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from stdin")?;
            s
        }
        (Some(p), None) => p.to_string(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("reading the prompt from {}", file.display()))?,
        (None, None) => String::new(),
    })
}

#[derive(Serialize)]
struct TokenOut {
    id: u32,
    text: String,
    writer: usize,
    pi: Vec<f32>,
}

#[derive(Serialize)]
struct SampleOut {
    /// The sample's z (absent for a model without z).
    #[serde(skip_serializing_if = "Option::is_none")]
    z: Option<Vec<f32>>,
    text: String,
    tokens: Vec<TokenOut>,
    counts: Vec<usize>,
    deferral_rate: f64,
}

#[derive(Serialize)]
struct Report {
    prompt: String,
    models: Vec<String>,
    strategy: String,
    z: String,
    temperature: f64,
    top_k: usize,
    top_p: f64,
    seed: u64,
    samples: Vec<SampleOut>,
    deferral_rate: f64,
    tokens_per_second: f64,
}

/// Cuts a sample at its first stop string (and its EOS), returning the kept tokens' texts.
fn token_texts(tokenizer: &Tokenizer, d: &Decoded, eos: u32) -> Result<Vec<String>> {
    let mut texts = Vec::with_capacity(d.tokens.len());
    let mut previous = String::new();
    for i in 0..d.tokens.len() {
        if d.tokens[i] == eos {
            texts.push(String::new());
            continue;
        }
        let ids: Vec<u32> = d.tokens[..=i]
            .iter()
            .copied()
            .filter(|&t| t != eos)
            .collect();
        let text = tokenizer.decode(&ids)?;
        let piece = text.get(previous.len()..).unwrap_or("").to_string();
        previous = text;
        texts.push(piece);
    }
    Ok(texts)
}

/// What `chorus generate` decodes with.
#[derive(Debug, Clone, Copy)]
pub enum ModelSource<'a> {
    /// `--model`: a joint checkpoint or a single LM.
    One(&'a Path),
    /// `--base A --assistant B …`: LMs that share a tokenizer, composed without training.
    Composition {
        /// The base.
        base: &'a Path,
        /// The assistants, in order (models 1, 2, …).
        assistants: &'a [PathBuf],
    },
}

/// One LM in any format chorus reads (GGUF file, Hugging Face directory, chorus LM directory) and
/// the tokenizer that comes with it. With `gguf_blocks`, a GGUF file also keeps its quantised
/// blocks, which its few-row products read ([`chorus_lm::Lm::open_for_decoding`]).
pub(crate) fn open_lm<B: Backend>(
    path: &Path,
    device: &B::Device,
    gguf_blocks: bool,
) -> Result<(chorus_lm::Lm<B>, Tokenizer)> {
    let lm = if gguf_blocks {
        chorus_lm::Lm::<B>::open_for_decoding(path, device)?
    } else {
        chorus_lm::Lm::<B>::open(path, device)?
    };
    let tokenizer = Tokenizer::open(path)
        .with_context(|| format!("{}: no tokenizer next to the model", path.display()))?;
    Ok((lm, tokenizer))
}

/// Connects a saved joint model's remote assistants: the last `remote_assistants` of the sources
/// its manifest lists, each checked to tokenize like `tokenizer`.
pub(crate) fn connect_remotes<B: Backend>(
    model: &Chorus<B>,
    sources: &[String],
    tokenizer: &Tokenizer,
) -> Result<Vec<RemoteAssistant>> {
    let n = model.config.remote_assistants;
    let urls = &sources[sources.len().saturating_sub(n)..];
    if urls.len() != n || !urls.iter().all(is_server_url) {
        bail!(
            "the model has {n} remote assistants but its manifest names {urls:?} as the last sources"
        );
    }
    urls.iter()
        .map(|url| {
            RemoteAssistant::connect(url, tokenizer, RemoteSettings::default())
                .with_context(|| format!("connecting the model's remote assistant {url}"))
        })
        .collect()
}

/// LMs in any format chorus reads, composed without training ([`Chorus::compose`]) after checking
/// that every assistant's tokenizer is the base's. Returns the model, its members' sources and the
/// tokenizer. `gguf_blocks` as in [`open_lm`].
pub(crate) fn load_composition<B: Backend>(
    base: &Path,
    assistants: &[PathBuf],
    device: &B::Device,
    gguf_blocks: bool,
) -> Result<(Chorus<B>, Vec<String>, Tokenizer)> {
    if let Some(url) = assistants.iter().find(|p| is_server_url(p)) {
        anyhow::bail!(
            "{}: remote assistants take part in `chorus generate` and `chorus score` only",
            url.display()
        );
    }
    let (base_lm, tokenizer) = open_lm::<B>(base, device, gguf_blocks)?;
    let mut lms = Vec::with_capacity(assistants.len());
    for path in assistants {
        let (lm, other) = open_lm::<B>(path, device, gguf_blocks)?;
        tokenizer.check_same(&other).with_context(|| {
            format!(
                "assistant {} does not share the base's tokenizer ({})",
                path.display(),
                base.display()
            )
        })?;
        lms.push(lm);
    }
    let model = Chorus::compose(base_lm, lms, device)?;
    let sources = std::iter::once(base)
        .chain(assistants.iter().map(PathBuf::as_path))
        .map(|p| p.display().to_string())
        .collect();
    Ok((model, sources, tokenizer))
}

/// A joint checkpoint (a directory with chorus.json), or a single LM in any format chorus reads (a
/// GGUF file, a Hugging Face directory, a chorus LM directory) as a chorus of one model without z.
/// Returns the model, its members' sources and the tokenizer. `gguf_blocks` as in [`open_lm`].
fn load_model<B: Backend>(
    path: &Path,
    device: &B::Device,
    gguf_blocks: bool,
) -> Result<(Chorus<B>, Vec<String>, Tokenizer)> {
    if path.join(chorus_model::MANIFEST_FILE).is_file() || path.join("state.json").is_file() {
        let mut saved = Chorus::<B>::load(path, device)?;
        if gguf_blocks {
            for note in saved.attach_gguf_blocks() {
                eprintln!("note: {note}");
            }
        }
        return Ok((saved.model, saved.manifest.sources, saved.tokenizer));
    }
    let (lm, tokenizer) = open_lm::<B>(path, device, gguf_blocks)?;
    let single = chorus_model::ChorusConfig {
        d_latent: 0,
        ..Default::default()
    };
    let model = Chorus::new(single, lm, Vec::new(), device)?;
    Ok((model, vec![path.display().to_string()], tokenizer))
}

/// Refuses a flag that the model cannot read, rather than decoding as if it had not been given:
/// writer strategies and assistant updates without assistants (`k` models in all), a choice of z
/// for a model without z (or one that fixes z at the prior mean), references and `--alpha` that
/// the chosen z does not read.
fn refuse_flags_that_cannot_apply(
    args: &GenerateArgs<'_>,
    config: &chorus_model::ChorusConfig,
    k: usize,
) -> Result<()> {
    if k == 1 {
        if let Some(strategy) = args.strategy {
            bail!(
                "--strategy {strategy}: a model without assistants (a single LM, or a joint model \
                 of one) writes every token itself; writer strategies are for models with \
                 assistants and for --base with --assistant"
            );
        }
        if args.assistants.is_some() {
            bail!("--assistant-update: the model has no assistants to update");
        }
    }
    let name = |choice: ZChoice| {
        clap::ValueEnum::to_possible_value(&choice)
            .map_or_else(|| format!("{choice:?}"), |v| v.get_name().to_string())
    };
    if let Some(choice) = args.z {
        if !config.has_z() {
            bail!(
                "--z {}: the model has no latent z (a single LM, a composition, or a joint model \
                 trained without z)",
                name(choice)
            );
        }
        if config.z_at_prior_mean && choice != ZChoice::PriorMean {
            bail!(
                "--z {}: the model fixes z at the prior mean E p(z | c) \
                 (chorus.z_at_prior_mean), the only z it reads",
                name(choice)
            );
        }
    }
    let z = args.z.unwrap_or(ZChoice::Prior);
    if !args.references.is_empty() && !matches!(z, ZChoice::Posterior | ZChoice::Interpolate) {
        bail!(
            "--reference: read only by --z posterior and --z interpolate (z is the {})",
            name(z)
        );
    }
    if args.alpha.is_some() && z != ZChoice::Interpolate {
        bail!(
            "--alpha: the weight of --z interpolate, not of --z {}",
            name(z)
        );
    }
    Ok(())
}

pub fn generate<B: Backend>(args: GenerateArgs<'_>, device: &B::Device) -> Result<()> {
    if args.stop.iter().any(String::is_empty) {
        bail!("--stop \"\": an empty stop string is found before the first token");
    }
    let mut remotes = Vec::new();
    let (model, sources, tokenizer, calibration) = match args.model {
        ModelSource::One(path) => {
            let (model, sources, tokenizer) = load_model::<B>(path, device, args.gguf_blocks)?;
            remotes = connect_remotes(&model, &sources, &tokenizer)?;
            (model, sources, tokenizer, EtaCalibration::load(path)?)
        }
        ModelSource::Composition { base, assistants } => {
            // Local assistants join the chorus; servers follow them as models K, K + 1, ….
            let (remote_urls, local): (Vec<PathBuf>, Vec<PathBuf>) =
                assistants.iter().cloned().partition(|p| is_server_url(p));
            let (model, mut sources, tokenizer) =
                load_composition::<B>(base, &local, device, args.gguf_blocks)?;
            for url in &remote_urls {
                let url = url.display().to_string();
                let remote = RemoteAssistant::connect(&url, &tokenizer, RemoteSettings::default())?;
                sources.push(url);
                remotes.push(remote);
            }
            (model, sources, tokenizer, None)
        }
    };
    let remote_refs: Vec<&dyn Assistant<B>> =
        remotes.iter().map(|r| r as &dyn Assistant<B>).collect();
    let k = model.n_local() + remotes.len();
    refuse_flags_that_cannot_apply(&args, &model.config, k)?;
    let z_choice = args.z.unwrap_or(ZChoice::Prior);
    let alpha = args.alpha.unwrap_or(0.5);
    let names = model_names(&sources, k);
    let strategy: WriterStrategy = match args.strategy {
        Some("threshold") => WriterStrategy::Threshold {
            eta: calibration.as_ref().map_or(0.5, |c| c.eta),
        },
        Some(s) => s.parse().map_err(anyhow::Error::msg)?,
        None if k == 1 => WriterStrategy::Greedy,
        None if model.selector.is_none() => WriterStrategy::Confidence { tau: 0.5 },
        None => WriterStrategy::Threshold {
            eta: calibration.as_ref().map_or(0.5, |c| c.eta),
        },
    };
    if let (WriterStrategy::Threshold { eta }, None, ModelSource::One(path)) =
        (strategy, &calibration, args.model)
        && k > 1
    {
        eprintln!(
            "note: no decoding.json in {} (run `chorus calibrate`): using η = {eta}",
            path.display()
        );
    }
    let eos = tokenizer
        .token_to_id("<|endoftext|>")
        .context("the tokenizer has no <|endoftext|> token")?;
    let prompt_text = read_prompt(&args)?;
    let mut prompt = vec![eos];
    prompt.extend(tokenizer.encode(&prompt_text)?);
    let rows = args.samples;
    let encode_reference = |text: &str| -> Result<Vec<u32>> {
        let mut ids = tokenizer.encode(text)?;
        ids.push(eos);
        Ok(ids)
    };
    let references = args
        .references
        .iter()
        .map(|r| encode_reference(r))
        .collect::<Result<Vec<_>>>()?;
    let (source, z_description) = match (z_choice, references.as_slice()) {
        (ZChoice::Prior, _) => (
            ZSource::PriorSample { seed: args.seed },
            "prior sample".into(),
        ),
        (ZChoice::PriorMean, _) => (ZSource::PriorMean, "prior mean".into()),
        (ZChoice::Posterior, [reference]) => (
            ZSource::Posterior { reference },
            format!("posterior mean of {:?}", args.references[0]),
        ),
        (ZChoice::Posterior, _) => bail!("--z posterior needs exactly one --reference TEXT"),
        (ZChoice::Interpolate, [from, to]) => (
            ZSource::Interpolate { from, to, alpha },
            format!(
                "(1 − {0}) · q({1:?}) + {0} · q({2:?})",
                alpha, args.references[0], args.references[1]
            ),
        ),
        (ZChoice::Interpolate, _) => bail!("--z interpolate needs two --reference TEXT"),
    };
    let z = model.decoding_z(&source, &prompt, rows, device)?;
    let z_description = if z.is_none() {
        "none (the model has no z)".to_string()
    } else if model.config.z_at_prior_mean {
        "prior mean (the model fixes z there: chorus.z_at_prior_mean)".to_string()
    } else {
        z_description
    };
    // Each row's z on the host, for the report.
    let z_rows: Vec<Option<Vec<f32>>> = match &z {
        Some(z) => {
            let values = z.clone().into_data().convert::<f32>().to_vec::<f32>()?;
            let d_latent = values.len() / rows;
            values
                .chunks(d_latent)
                .map(|row| Some(row.to_vec()))
                .collect()
        }
        None => vec![None; rows],
    };
    let config = DecodeConfig {
        strategy,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        max_new_tokens: args.max_tokens,
        eos: Some(eos),
        seed: args.seed,
        assistants: args.assistants.unwrap_or_default(),
    };
    let color = match args.color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => std::io::stdout().is_terminal(),
    };
    let stream = rows == 1;
    let mut stdout = std::io::stdout();
    if color && k > 1 {
        let legend: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(j, n)| format!("{}{n}\x1b[0m", ANSI[j % ANSI.len()]))
            .collect();
        eprintln!("writers: {}", legend.join(" · "));
    }
    // The prompt is streamed before the first new token (or after none), so that a request
    // `generate_with` refuses prints only its error.
    let mut prompt_shown = !stream;
    // Streaming and stop strings need the text so far: decode the row's tokens at each step.
    let mut so_far: Vec<Vec<u32>> = vec![Vec::new(); rows];
    let mut printed: Vec<usize> = vec![0; rows];
    let started = Instant::now();
    let decoded = model.generate_with(
        &remote_refs,
        &prompt,
        rows,
        z,
        &config,
        device,
        |r, token, writer| {
            if !prompt_shown {
                let _ = write!(stdout, "{prompt_text}");
                prompt_shown = true;
            }
            if token == eos {
                return false;
            }
            so_far[r].push(token);
            let text = tokenizer.decode(&so_far[r]).unwrap_or_default();
            let stop_at = args.stop.iter().filter_map(|s| text.find(s.as_str())).min();
            if stream {
                let end = stop_at.unwrap_or(text.len());
                if let Some(piece) = text.get(printed[r]..end) {
                    let (on, off) = if color && writer > 0 {
                        (ANSI[writer % ANSI.len()], "\x1b[0m")
                    } else {
                        ("", "")
                    };
                    let _ = write!(stdout, "{on}{piece}{off}");
                    let _ = stdout.flush();
                    printed[r] = end;
                }
            }
            stop_at.is_none()
        },
    )?;
    let seconds = started.elapsed().as_secs_f64();
    if stream {
        if !prompt_shown {
            write!(stdout, "{prompt_text}")?;
        }
        writeln!(stdout)?;
    }
    let mut samples = Vec::with_capacity(rows);
    for d in &decoded {
        let texts = token_texts(&tokenizer, d, eos)?;
        let mut text = texts.concat();
        if let Some(cut) = args.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
        if !stream {
            let mut line = prompt_text.clone();
            for (piece, &w) in texts.iter().zip(&d.writers) {
                if color && w > 0 {
                    line.push_str(&format!("{}{piece}\x1b[0m", ANSI[w % ANSI.len()]));
                } else {
                    line.push_str(piece);
                }
            }
            println!("--- sample {} ---\n{line}", samples.len() + 1);
        }
        samples.push(SampleOut {
            z: z_rows[samples.len()].clone(),
            text,
            tokens: d
                .tokens
                .iter()
                .zip(&texts)
                .zip(d.writers.iter().zip(&d.pi))
                .map(|((&id, t), (&writer, pi))| TokenOut {
                    id,
                    text: t.clone(),
                    writer,
                    pi: pi.clone(),
                })
                .collect(),
            counts: d.counts(k),
            deferral_rate: d.deferral_rate(),
        });
    }
    let total: usize = decoded.iter().map(|d| d.tokens.len()).sum();
    let deferred: usize = decoded
        .iter()
        .map(|d| d.writers.iter().filter(|&&w| w != 0).count())
        .sum();
    let deferral = deferred as f64 / total.max(1) as f64;
    eprintln!(
        "{total} tokens in {seconds:.2} s ({:.1} tokens/s); written by assistants: {:.1} %",
        total as f64 / seconds.max(1e-9),
        100.0 * deferral
    );
    let report = Report {
        prompt: prompt_text,
        models: names,
        strategy: strategy.to_string(),
        z: z_description,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        samples,
        deferral_rate: deferral,
        tokens_per_second: total as f64 / seconds.max(1e-9),
    };
    if let Some(path) = args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = args.html {
        std::fs::write(path, html(&report))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained page: a legend, each sample with one span per token tinted by its writer
/// (hover for π), and the writers' shares.
fn html(report: &Report) -> String {
    let mut s = String::from(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>chorus: who wrote what</title>\n<style>\n\
body{font:16px/1.6 Georgia,serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#222}\n\
h1{font:600 1.3rem system-ui,sans-serif}.meta{font:13px system-ui,sans-serif;color:#666}\n\
.legend span,.bar span{display:inline-block;padding:.1rem .5rem;margin-right:.4rem;border-radius:.3rem;font:13px system-ui,sans-serif}\n\
.sample{margin:1.5rem 0;padding:1rem 1.2rem;border:1px solid #e3e3e3;border-radius:.5rem;white-space:pre-wrap}\n\
.prompt{color:#777}.t{border-radius:.2rem}.t:hover{outline:1px solid #888}\n\
.bar{margin-top:.6rem}\n</style></head><body>\n<h1>Who wrote what</h1>\n",
    );
    s.push_str(&format!(
        "<p class=\"meta\">strategy {} · z: {} · temperature {} · top-k {} · top-p {} · seed {} · {:.1} tokens/s</p>\n<p class=\"legend\">",
        escape(&report.strategy),
        escape(&report.z),
        report.temperature,
        report.top_k,
        report.top_p,
        report.seed,
        report.tokens_per_second
    ));
    for (j, name) in report.models.iter().enumerate() {
        s.push_str(&format!(
            "<span style=\"background:{}\">{}</span>",
            HTML[j % HTML.len()],
            escape(name)
        ));
    }
    s.push_str("</p>\n");
    for (i, sample) in report.samples.iter().enumerate() {
        s.push_str(&format!(
            "<div class=\"sample\" id=\"sample-{i}\"><span class=\"prompt\">{}</span>",
            escape(&report.prompt)
        ));
        for t in &sample.tokens {
            let pi: Vec<String> = t.pi.iter().map(|p| format!("{p:.2}")).collect();
            s.push_str(&format!(
                "<span class=\"t\" style=\"background:{}\" title=\"{} · π = [{}]\">{}</span>",
                HTML[t.writer % HTML.len()],
                escape(&report.models[t.writer]),
                pi.join(", "),
                escape(&t.text)
            ));
        }
        s.push_str("<div class=\"bar\">");
        let n: usize = sample.counts.iter().sum();
        for (j, c) in sample.counts.iter().enumerate() {
            s.push_str(&format!(
                "<span style=\"background:{}\">{}: {c} tokens ({:.0} %)</span>",
                HTML[j % HTML.len()],
                escape(&report.models[j]),
                100.0 * *c as f64 / n.max(1) as f64
            ));
        }
        s.push_str("</div></div>\n");
    }
    s.push_str(&format!(
        "<p class=\"meta\">Decode-time deferral rate (share of tokens written by assistants): {:.1} %</p>\n</body></html>\n",
        100.0 * report.deferral_rate
    ));
    s
}
