//! Running a model over MCQ items: one [`Prediction`] per item, appended to `predictions.jsonl` as it is
//! made, then `report.json` and `confusion-<key>.png` computed from the whole file.
//!
//! Three scoring modes ([`Scoring`]):
//! * `generate` (the reference's): the question ([`question_prompt`]) goes through the model's chat
//!   template with the image, greedy decoding with the KV cache (at most 50 new tokens; the image token is
//!   never chosen, see [`generate_answer`]), then the strict
//!   parse (the metric) and the lenient parse (reported beside it).
//! * `likelihood`: for each option letter X, the log-likelihood of the continuation
//!   `"The correct answer is X."` ([`likelihood_continuation`], the answer the prompt asks for, tokenized on
//!   its own without special tokens) after the same prompt; the prediction is the argmax (ties to the
//!   earliest letter). The prompt is prefilled once per item, the continuation tokens shared by every
//!   option (`"The correct answer is"`) are fed once, and each option's remaining tokens are fed on a
//!   clone of that cache ([`option_loglikelihoods`]).
//! * `likelihood-text`: the same, with each option's *text* as the assistant's whole answer; the score
//!   is its summed log-likelihood divided by its length in UTF-8 bytes (lm-evaluation-harness'
//!   `acc_norm`), so that long options (SKINCON's concept combinations) are not penalised for their
//!   length. It asks which description the model finds most plausible, free of letter bias.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, IndexOp, Tensor, D};

use super::confusion::{file_stem, plot_confusion, Confusion};
use super::mcq::{letter, question_prompt, McqItem};
use super::parse::{parse_lenient, parse_strict};
use super::report::{metric_description, summarize, Report};
use crate::error::{Error, Result};
use crate::model::VisionLanguageModel;
use crate::session::{Prompt, Session};
use crate::train::checkpoint::write_atomic;

/// Generation budget of `generate` mode (the reference's).
pub const MAX_NEW_TOKENS: usize = 50;

/// How an item's answer is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scoring {
    Generate,
    Likelihood,
    #[serde(rename = "likelihood-text")]
    LikelihoodText,
}

impl Scoring {
    pub fn name(self) -> &'static str {
        match self {
            Scoring::Generate => "generate",
            Scoring::Likelihood => "likelihood",
            Scoring::LikelihoodText => "likelihood-text",
        }
    }
}

/// The continuation scored for option letter `l` in `likelihood` mode.
pub fn likelihood_continuation(l: char) -> String {
    format!("The correct answer is {l}.")
}

/// One line of `predictions.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Prediction {
    pub id: String,
    pub key: String,
    pub image: String,
    pub options: Vec<String>,
    /// Correct letter.
    pub answer: char,
    /// The letter the metric uses: the strict parse (generate) or the argmax (likelihood); `null` when
    /// the generation could not be read.
    pub predicted: Option<char>,
    /// Generated text (generate mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// Strict parse of `raw` (generate mode; `null` when unparsed or in likelihood mode).
    #[serde(default)]
    pub strict: Option<char>,
    /// Lenient parse of `raw` (generate mode).
    #[serde(default)]
    pub lenient: Option<char>,
    /// Per-option score, likelihood modes: the log-likelihood (natural log, summed over the
    /// continuation's tokens); in `likelihood-text` divided by the option's length in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<Vec<f64>>,
}

impl Prediction {
    fn fits(&self, scoring: Scoring) -> bool {
        match scoring {
            Scoring::Generate => self.raw.is_some(),
            Scoring::Likelihood | Scoring::LikelihoodText => self.scores.is_some(),
        }
    }
}

/// Log-probability of `token` under `logits: [1, vocab]`.
fn token_logprob(logits: &Tensor, token: u32) -> Result<f64> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(candle_core::DType::F32)?, D::Minus1)?;
    Ok(logp.i((0, token as usize))?.to_scalar::<f32>()? as f64)
}

/// Summed log-probability of each continuation in `continuations` after `prompt` (with the image), the
/// same quantity as summing [`crate::model::generate::continuation_logprobs`], computed with the KV cache:
/// the prompt is prefilled once, the tokens every continuation starts with are fed once, and each
/// continuation's remaining tokens are fed one at a time on its own clone of the cache.
pub fn option_loglikelihoods(
    model: &dyn VisionLanguageModel,
    prompt: &[u32],
    pixel_values: Option<&Tensor>,
    continuations: &[Vec<u32>],
    device: &Device,
) -> Result<Vec<f64>> {
    if prompt.is_empty() || continuations.iter().any(|c| c.is_empty()) {
        return Err(Error::Model(
            "scoring needs a non-empty prompt and non-empty continuations".into(),
        ));
    }
    if continuations.is_empty() {
        return Ok(Vec::new());
    }
    let first = &continuations[0];
    let mut shared_len = first.len();
    for c in &continuations[1..] {
        shared_len = shared_len.min(first.iter().zip(c).take_while(|(a, b)| a == b).count());
    }
    let mut cache = model.new_cache();
    let ids = Tensor::from_slice(prompt, (1, prompt.len()), device)?;
    let mut logits = model.prefill(&ids, pixel_values, &mut cache)?;
    let mut shared = 0.0f64;
    for &t in &first[..shared_len] {
        shared += token_logprob(&logits, t)?;
        logits = model.step(&Tensor::from_slice(&[t], (1, 1), device)?, &mut cache)?;
    }
    let mut out = Vec::with_capacity(continuations.len());
    for c in continuations {
        let rest = &c[shared_len..];
        let mut total = shared;
        let mut own_cache = cache.clone();
        let mut lg = logits.clone();
        for (k, &t) in rest.iter().enumerate() {
            total += token_logprob(&lg, t)?;
            if k + 1 < rest.len() {
                lg = model.step(&Tensor::from_slice(&[t], (1, 1), device)?, &mut own_cache)?;
            }
        }
        out.push(total);
    }
    Ok(out)
}

/// Index of the largest score; ties to the lowest index.
fn argmax(scores: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &s) in scores.iter().enumerate() {
        if best.is_none_or(|b| s > scores[b]) {
            best = Some(i);
        }
    }
    best
}

/// Where an item's image is: absolute as written, or relative to the data directory.
pub fn resolve_image(data_dir: &Path, image: &str) -> PathBuf {
    let p = Path::new(image);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        data_dir.join(p)
    }
}

/// Greedy decoding with the KV cache (at most [`MAX_NEW_TOKENS`], stopping at and including an
/// end-of-sequence token), decoded with special tokens skipped.
pub fn generate_answer(session: &Session, image: &Path, prompt: &Prompt) -> Result<String> {
    Ok(session.generate(image, prompt, MAX_NEW_TOKENS)?.text)
}

/// Check, before any model call, that every item fits in the model's `max_position_embeddings`:
/// its prompt plus [`MAX_NEW_TOKENS`] (generate), or plus its longest scored continuation
/// (likelihood modes). The error names the items file, the item and the numbers.
pub fn check_item_lengths(
    session: &Session,
    items: &[&McqItem],
    items_file: &Path,
    scoring: Scoring,
) -> Result<()> {
    let limit = session.model.max_positions();
    for item in items {
        let prompt = Prompt::Chat(question_prompt(&item.key, &item.options));
        let prompt_len = session.prompt_ids(&prompt)?.len();
        let (extra, what) = match scoring {
            Scoring::Generate => (MAX_NEW_TOKENS, "new tokens (generate scoring)".to_string()),
            Scoring::Likelihood | Scoring::LikelihoodText => {
                let mut longest = 0;
                for i in 0..item.options.len() {
                    let text = match scoring {
                        Scoring::Likelihood => likelihood_continuation(letter(i)),
                        _ => item.options[i].clone(),
                    };
                    longest = longest.max(session.text.encode_plain(&text)?.len());
                }
                (longest, "tokens of its longest scored answer".to_string())
            }
        };
        if prompt_len + extra > limit {
            return Err(Error::Config {
                path: items_file.to_path_buf(),
                key: format!("item {}", item.id),
                reason: format!(
                    "its prompt is {prompt_len} tokens; with {extra} {what} the sequence would be \
                     {} tokens, past the model's max_position_embeddings {limit} ({}); nothing \
                     was evaluated",
                    prompt_len + extra,
                    session.dir.join("config.json").display()
                ),
            });
        }
    }
    Ok(())
}

/// Predict one item.
pub fn predict(
    session: &Session,
    item: &McqItem,
    data_dir: &Path,
    scoring: Scoring,
) -> Result<Prediction> {
    let image = resolve_image(data_dir, &item.image);
    let prompt = Prompt::Chat(question_prompt(&item.key, &item.options));
    let n = item.options.len();
    let mut pred = Prediction {
        id: item.id.clone(),
        key: item.key.clone(),
        image: item.image.clone(),
        options: item.options.clone(),
        answer: item.answer_letter(),
        predicted: None,
        raw: None,
        strict: None,
        lenient: None,
        scores: None,
    };
    match scoring {
        Scoring::Generate => {
            let text = generate_answer(session, &image, &prompt)?;
            pred.strict = parse_strict(&text, n).map(letter);
            pred.lenient = parse_lenient(&text, &item.options).map(letter);
            pred.predicted = pred.strict;
            pred.raw = Some(text);
        }
        Scoring::Likelihood | Scoring::LikelihoodText => {
            let pixels = session.pixel_values(&image)?;
            let prompt_ids = session.prompt_ids(&prompt)?;
            let texts: Vec<String> = match scoring {
                Scoring::Likelihood => (0..n).map(|i| likelihood_continuation(letter(i))).collect(),
                _ => item.options.clone(),
            };
            let conts = texts
                .iter()
                .map(|t| session.text.encode_plain(t))
                .collect::<Result<Vec<_>>>()?;
            let mut scores = option_loglikelihoods(
                &session.model,
                &prompt_ids,
                Some(&pixels),
                &conts,
                &session.device,
            )?;
            if scoring == Scoring::LikelihoodText {
                for (s, t) in scores.iter_mut().zip(&texts) {
                    *s /= t.len().max(1) as f64;
                }
            }
            pred.predicted = argmax(&scores).map(letter);
            pred.scores = Some(scores);
        }
    }
    Ok(pred)
}

/// Read `predictions.jsonl`. A last line cut short (no trailing newline and not valid JSON, from an
/// interrupted run) is dropped; any other bad line is an error naming the line.
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Prediction>(line) {
            Ok(p) => out.push(p),
            Err(_) if i + 1 == lines.len() => {
                tracing::warn!("{}: dropping a torn last line", path.display())
            }
            Err(e) => {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    key: format!("line {}", i + 1),
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(out)
}

fn jsonl(preds: &[Prediction]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    for p in preds {
        serde_json::to_writer(&mut buf, p).map_err(|e| Error::json("predictions.jsonl", e))?;
        buf.push(b'\n');
    }
    Ok(buf)
}

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub benchmark: String,
    pub split: String,
    pub scoring: Scoring,
    /// Model and adapter as given (recorded in the report).
    pub model: String,
    pub adapter: Option<String>,
    /// Fully trained weights file, as given.
    pub full_weights: Option<String>,
    /// Weight dtype and image-aspect mode as named on the command line (`f32`, `pad`, ...).
    pub dtype: String,
    pub image_aspect: String,
    /// Keep predictions already in `predictions.jsonl` and skip their items.
    pub resume: bool,
    /// No progress bar.
    pub quiet: bool,
}

/// `run.json` in an eval output directory: what produced its `predictions.jsonl`. `--resume`
/// continues only a run with the same record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub benchmark: String,
    pub split: String,
    pub scoring: String,
    /// The model directory (canonical path; a Hub id as given when it is not a local path).
    pub model: String,
    pub adapter: Option<String>,
    /// [`fingerprint`] of `adapter_config.json` + `adapter_model.safetensors`.
    pub adapter_fingerprint: Option<String>,
    pub full_weights: Option<String>,
    pub full_weights_fingerprint: Option<String>,
    pub dtype: String,
    pub image_aspect: String,
}

pub const RUN_INFO: &str = "run.json";

/// FNV-1a (64-bit) over the bytes of `files` in order, with each file's length mixed in: a
/// content fingerprint (not a cryptographic hash) telling two adapters or weight files apart.
pub fn fingerprint(files: &[PathBuf]) -> Result<String> {
    use std::io::Read;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        let mut len = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io(f, e))?;
            if n == 0 {
                break;
            }
            eat(&buf[..n]);
            len += n as u64;
        }
        eat(&len.to_le_bytes());
    }
    Ok(format!("fnv1a64:{h:016x}"))
}

fn canonical(p: &str) -> String {
    std::fs::canonicalize(p)
        .map(|c| c.display().to_string())
        .unwrap_or_else(|_| p.to_string())
}

impl RunInfo {
    /// The record of a run with `opts`, fingerprints computed from the files.
    pub fn of(opts: &EvalOptions) -> Result<Self> {
        let adapter_fingerprint = match &opts.adapter {
            Some(a) => {
                let dir = Path::new(a);
                Some(fingerprint(&[
                    dir.join(crate::adapter::ADAPTER_CONFIG),
                    dir.join(crate::adapter::ADAPTER_WEIGHTS),
                ])?)
            }
            None => None,
        };
        let full_weights_fingerprint = match &opts.full_weights {
            Some(f) => Some(fingerprint(&[PathBuf::from(f)])?),
            None => None,
        };
        Ok(Self {
            benchmark: opts.benchmark.clone(),
            split: opts.split.clone(),
            scoring: opts.scoring.name().to_string(),
            model: canonical(&opts.model),
            adapter: opts.adapter.as_deref().map(canonical),
            adapter_fingerprint,
            full_weights: opts.full_weights.as_deref().map(canonical),
            full_weights_fingerprint,
            dtype: opts.dtype.clone(),
            image_aspect: opts.image_aspect.clone(),
        })
    }

    /// What differs from `old`, one `field: old -> new` per line; adapters and full weights are
    /// compared by content (a copy at another path is the same).
    pub fn differences(&self, old: &RunInfo) -> Vec<String> {
        fn show(v: &Option<String>) -> String {
            v.clone().unwrap_or_else(|| "none".into())
        }
        let mut out = Vec::new();
        let mut cmp = |name: &str, o: String, n: String| {
            if o != n {
                out.push(format!("{name}: `{o}` before, `{n}` now"));
            }
        };
        cmp("benchmark", old.benchmark.clone(), self.benchmark.clone());
        cmp("split", old.split.clone(), self.split.clone());
        cmp("scoring", old.scoring.clone(), self.scoring.clone());
        cmp("model", old.model.clone(), self.model.clone());
        if old.adapter_fingerprint != self.adapter_fingerprint {
            cmp(
                "adapter",
                format!(
                    "{} ({})",
                    show(&old.adapter),
                    show(&old.adapter_fingerprint)
                ),
                format!(
                    "{} ({})",
                    show(&self.adapter),
                    show(&self.adapter_fingerprint)
                ),
            );
        }
        if old.full_weights_fingerprint != self.full_weights_fingerprint {
            cmp(
                "full_weights",
                format!(
                    "{} ({})",
                    show(&old.full_weights),
                    show(&old.full_weights_fingerprint)
                ),
                format!(
                    "{} ({})",
                    show(&self.full_weights),
                    show(&self.full_weights_fingerprint)
                ),
            );
        }
        cmp("dtype", old.dtype.clone(), self.dtype.clone());
        cmp(
            "image_aspect",
            old.image_aspect.clone(),
            self.image_aspect.clone(),
        );
        out
    }
}

/// With `--resume` and predictions already in `out_dir`: refuse unless `run.json` says they
/// were made the same way as `now`.
fn check_resume(out_dir: &Path, n_kept: usize, now: &RunInfo) -> Result<()> {
    let path = out_dir.join(RUN_INFO);
    let redo = "rerun without --resume to replace them, or evaluate into another --out";
    let old: RunInfo = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::json(&path, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Config {
                path,
                key: "--resume".into(),
                reason: format!(
                    "file missing: nothing records what made the {n_kept} prediction(s) in \
                     predictions.jsonl, so they cannot be resumed safely; {redo}"
                ),
            })
        }
        Err(e) => return Err(Error::io(&path, e)),
    };
    let diff = now.differences(&old);
    if diff.is_empty() {
        return Ok(());
    }
    Err(Error::Config {
        path,
        key: "--resume".into(),
        reason: format!(
            "the {n_kept} prediction(s) in predictions.jsonl were made by another run ({}); {redo}",
            diff.join("; ")
        ),
    })
}

/// Evaluate `items` (images relative to `data_dir`) into `out_dir`: `predictions.jsonl` (appended item by
/// item, then rewritten atomically), `report.json` and `confusion-<key>.png`.
///
/// Without `resume` an existing `predictions.jsonl` is replaced. With it, items whose id is already
/// there are skipped and the report covers the whole file — only when `run.json` ([`RunInfo`],
/// written atomically before the first prediction) shows they were made by the same model,
/// adapter and full weights (by content), scoring, split, benchmark, dtype and image aspect;
/// otherwise an error lists what differs.
pub fn evaluate(
    session: &Session,
    items: &[McqItem],
    items_file: &Path,
    data_dir: &Path,
    out_dir: &Path,
    opts: &EvalOptions,
) -> Result<Report> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let pred_path = out_dir.join("predictions.jsonl");
    let mut preds = if opts.resume && pred_path.exists() {
        read_predictions(&pred_path)?
    } else {
        Vec::new()
    };
    let run = RunInfo::of(opts)?;
    if !preds.is_empty() {
        check_resume(out_dir, preds.len(), &run)?;
    }
    if let Some(bad) = preds.iter().find(|p| !p.fits(opts.scoring)) {
        return Err(Error::Config {
            path: pred_path.clone(),
            key: "scoring".into(),
            reason: format!(
                "prediction `{}` was not made in `{}` mode; resume into another --out",
                bad.id,
                opts.scoring.name()
            ),
        });
    }
    let done: HashSet<String> = preds.iter().map(|p| p.id.clone()).collect();
    let todo: Vec<&McqItem> = items.iter().filter(|i| !done.contains(&i.id)).collect();
    check_item_lengths(session, &todo, items_file, opts.scoring)?;
    // Record what makes the predictions, then start the file from what is kept (drops a torn
    // line, or the old file without --resume).
    let json = serde_json::to_vec_pretty(&run).map_err(|e| Error::json(RUN_INFO, e))?;
    write_atomic(&out_dir.join(RUN_INFO), &json)?;
    write_atomic(&pred_path, &jsonl(&preds)?)?;

    let target = if opts.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressDrawTarget::hidden()
    } else {
        indicatif::ProgressDrawTarget::stderr()
    };
    let bar = indicatif::ProgressBar::with_draw_target(Some(todo.len() as u64), target);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("eval {}", opts.scoring.name()));

    let mut file = OpenOptions::new()
        .append(true)
        .open(&pred_path)
        .map_err(|e| Error::io(&pred_path, e))?;
    let start = Instant::now();
    let mut correct = 0usize;
    for (i, item) in todo.iter().enumerate() {
        let p = predict(session, item, data_dir, opts.scoring)?;
        correct += usize::from(p.predicted == Some(p.answer));
        let mut line = serde_json::to_vec(&p).map_err(|e| Error::json(&pred_path, e))?;
        line.push(b'\n');
        file.write_all(&line)
            .and_then(|_| file.flush())
            .map_err(|e| Error::io(&pred_path, e))?;
        preds.push(p);
        bar.set_message(format!("acc={:.3}", correct as f64 / (i + 1) as f64));
        bar.inc(1);
    }
    bar.finish_and_clear();
    drop(file);
    let elapsed = start.elapsed().as_secs_f64();
    write_atomic(&pred_path, &jsonl(&preds)?)?;

    let (overall, per_key) = summarize(&preds, opts.scoring);
    let report = Report {
        benchmark: opts.benchmark.clone(),
        split: opts.split.clone(),
        scoring: opts.scoring,
        model: opts.model.clone(),
        adapter: opts.adapter.clone(),
        items_file: items_file.display().to_string(),
        n_items_selected: items.len(),
        n_predictions: preds.len(),
        n_new: todo.len(),
        elapsed_s: elapsed,
        items_per_sec: if elapsed > 0.0 {
            todo.len() as f64 / elapsed
        } else {
            0.0
        },
        metric: metric_description(opts.scoring),
        overall,
        per_key,
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| Error::json("report.json", e))?;
    write_atomic(&out_dir.join("report.json"), &json)?;

    let mut keys: Vec<&str> = preds.iter().map(|p| p.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let of_key: Vec<&Prediction> = preds.iter().filter(|p| p.key == key).collect();
        let m = Confusion::from_predictions(key, &of_key);
        let title = format!("{} {} {}", opts.benchmark, key, opts.scoring.name());
        plot_confusion(
            &m,
            &title,
            &out_dir.join(format!("confusion-{}.png", file_stem(key))),
        )?;
    }
    Ok(report)
}

/// A trained model state found under a run directory: a checkpoint or a stage's final outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelState {
    pub dir: PathBuf,
    /// `adapter/` (PEFT) when LoRA was trained.
    pub adapter: Option<PathBuf>,
    /// `full_weights.safetensors` (stage outputs) or `trainable.safetensors` (checkpoints) when
    /// module groups were trained in full.
    pub full_weights: Option<PathBuf>,
}

/// Every directory under `root` (itself included) holding a trained state, in natural order
/// (`checkpoint-2` before `checkpoint-10`): one with `adapter/adapter_config.json`,
/// `full_weights.safetensors` or `trainable.safetensors`.
pub fn find_model_states(root: &Path) -> Result<Vec<ModelState>> {
    fn walk(dir: &Path, out: &mut Vec<ModelState>) -> Result<()> {
        let adapter = Some(dir.join("adapter")).filter(|a| a.join("adapter_config.json").is_file());
        let full_weights = [
            dir.join("full_weights.safetensors"),
            dir.join("trainable.safetensors"),
        ]
        .into_iter()
        .find(|f| f.is_file());
        if adapter.is_some() || full_weights.is_some() {
            out.push(ModelState {
                dir: dir.to_path_buf(),
                adapter,
                full_weights,
            });
        }
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(dir, e))?;
            let ft = e.file_type().map_err(|err| Error::io(e.path(), err))?;
            if ft.is_dir() && e.file_name() != "adapter" {
                walk(&e.path(), out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, &mut out)?;
    out.sort_by_key(|s| natural_key(&s.dir.to_string_lossy()));
    Ok(out)
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Chunk {
    Num(u128, usize),
    Text(String),
}

/// Splits digits runs from text so that numbers compare by value.
fn natural_key(s: &str) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut digits = false;
    for c in s.chars() {
        if c.is_ascii_digit() != digits && !buf.is_empty() {
            out.push(chunk(&buf, digits));
            buf.clear();
        }
        digits = c.is_ascii_digit();
        buf.push(c);
    }
    if !buf.is_empty() {
        out.push(chunk(&buf, digits));
    }
    out
}

fn chunk(s: &str, digits: bool) -> Chunk {
    match (digits, s.parse::<u128>()) {
        (true, Ok(n)) => Chunk::Num(n, s.len()),
        _ => Chunk::Text(s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_ties_first() {
        assert_eq!(argmax(&[-1.0, -0.5, -0.5]), Some(1));
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn natural_order_and_adapter_discovery() {
        let d = tempfile::tempdir().unwrap();
        for rel in [
            "main/checkpoint-10",
            "main/checkpoint-2",
            "warmup/checkpoint-1",
            "x",
        ] {
            std::fs::create_dir_all(d.path().join(rel)).unwrap();
        }
        for rel in ["main/checkpoint-10", "main/checkpoint-2"] {
            let a = d.path().join(rel).join("adapter");
            std::fs::create_dir_all(&a).unwrap();
            std::fs::write(a.join("adapter_config.json"), "{}").unwrap();
        }
        // A full-training-only checkpoint (no adapter) is found through its trainable tensors.
        std::fs::write(
            d.path().join("warmup/checkpoint-1/trainable.safetensors"),
            "x",
        )
        .unwrap();
        let found = find_model_states(d.path()).unwrap();
        assert!(found[0].adapter.is_some() && found[0].full_weights.is_none());
        assert!(found[2].adapter.is_none() && found[2].full_weights.is_some());
        let rel: Vec<String> = found
            .iter()
            .map(|s| s.dir.strip_prefix(d.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(
            rel,
            vec![
                "main/checkpoint-2",
                "main/checkpoint-10",
                "warmup/checkpoint-1"
            ]
        );
    }

    #[test]
    fn torn_last_line_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = Prediction {
            id: "a".into(),
            key: "k".into(),
            image: "i.png".into(),
            options: vec!["x".into(), "y".into()],
            answer: 'A',
            predicted: Some('B'),
            raw: Some("The correct answer is B.".into()),
            strict: Some('B'),
            lenient: Some('B'),
            scores: None,
        };
        let mut bytes = jsonl(std::slice::from_ref(&p)).unwrap();
        bytes.extend_from_slice(b"{\"id\":\"b\",\"ke");
        let f = d.path().join("predictions.jsonl");
        std::fs::write(&f, &bytes).unwrap();
        assert_eq!(read_predictions(&f).unwrap(), vec![p]);
        std::fs::write(&f, b"nope\n{}\n").unwrap();
        assert!(read_predictions(&f).is_err());
    }
}
