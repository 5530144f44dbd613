//! Running a model over MCQ items: one [`Prediction`] per item, appended to `predictions.jsonl` as it is
//! made, then `report.json` and `confusion-<key>.png` computed from the whole file.
//!
//! Three scoring modes ([`Scoring`]):
//! * `generate` (the reference's): the question ([`question_prompt`]) goes through the model's chat
//!   template with the image, greedy decoding with the KV cache (at most 50 new tokens, see
//!   [`predict_batch`]), then the strict
//!   parse (the metric) and the lenient parse (reported beside it).
//! * `likelihood`: for each option letter X, the log-likelihood of the continuation
//!   `"The correct answer is X."` ([`likelihood_continuation`], the answer the prompt asks for, tokenized on
//!   its own without special tokens) after the same prompt; the prediction is the argmax (ties to the
//!   earliest letter). The prompt is prefilled once per item (its prefix with the image once per
//!   picture, see [`predict_batch`]), then every option's continuation is fed at once, one row each
//!   of a batch on copies of that cache ([`option_loglikelihoods_after`]).
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
pub use super::item_lengths::check_item_lengths;
use super::mcq::{letter, question_prompt, McqItem};
pub use super::model_states::{find_model_states, ModelState};
use super::parse::{parse_lenient, parse_strict};
use super::provenance::check_resume;
pub use super::provenance::{fingerprint, RunInfo, RUN_INFO};
use super::report::{metric_description, summarize, Report};
use crate::error::{Error, Result};
use crate::model::generate::{greedy_batch, prefill, prefill_shared, Prefilled};
use crate::model::{KvCache, LogitRows, VisionInput, VisionLanguageModel};
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
/// the prompt is prefilled once, then [`option_loglikelihoods_after`].
pub fn option_loglikelihoods(
    model: &dyn VisionLanguageModel,
    prompt: &[u32],
    vision: Option<&VisionInput>,
    continuations: &[Vec<u32>],
    device: &Device,
) -> Result<Vec<f64>> {
    if prompt.is_empty() {
        return Err(Error::Model(
            "scoring needs a non-empty prompt and non-empty continuations".into(),
        ));
    }
    let start = prefill(model, prompt, vision, device)?;
    option_loglikelihoods_after(model, &start, continuations, device)
}

/// [`option_loglikelihoods`] after a prompt already run through the cache. Every continuation
/// is fed at once, as one row of a batch on copies of the prompt's cache (rows right-padded:
/// causal attention keeps the padding out of every scored position), one forward pass for all
/// options.
pub fn option_loglikelihoods_after(
    model: &dyn VisionLanguageModel,
    start: &Prefilled,
    continuations: &[Vec<u32>],
    device: &Device,
) -> Result<Vec<f64>> {
    if continuations.iter().any(|c| c.is_empty()) {
        return Err(Error::Model(
            "scoring needs a non-empty prompt and non-empty continuations".into(),
        ));
    }
    let n = continuations.len();
    let longest = continuations.iter().map(Vec::len).max().unwrap_or(0);
    // The first token of each continuation is scored by the prompt's last logits; the rest by
    // the fed tokens before them, so only `longest - 1` positions need feeding.
    let first: Vec<f64> = continuations
        .iter()
        .map(|c| token_logprob(&start.logits, c[0]))
        .collect::<Result<_>>()?;
    if longest <= 1 {
        return Ok(first);
    }
    let fed = longest - 1;
    let mut ids = Vec::with_capacity(n * fed);
    for c in continuations {
        let body = &c[..c.len() - 1];
        ids.extend_from_slice(body);
        ids.extend(std::iter::repeat_n(c[0], fed - body.len()));
    }
    let copies = vec![start.cache.clone(); n];
    let mut cache = if n == 1 {
        start.cache.clone()
    } else {
        KvCache::stack(&copies)?
    };
    drop(copies);
    let tokens = Tensor::from_vec(ids, (n, fed), device)?;
    let logits = model.step_rows(&tokens, &mut cache, LogitRows::All)?; // [n, fed, vocab]
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(candle_core::DType::F32)?, D::Minus1)?;
    let mut out = first;
    for (i, c) in continuations.iter().enumerate() {
        let targets: Vec<u32> = c[1..].to_vec();
        let k = targets.len();
        if k == 0 {
            continue;
        }
        let rows = logp.i(i)?.narrow(0, 0, k)?;
        let idx = Tensor::from_vec(targets, (k, 1), device)?;
        let picked = rows.gather(&idx, 1)?.to_dtype(candle_core::DType::F64)?;
        out[i] += picked.sum_all()?.to_scalar::<f64>()?;
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

/// Predict one item (see [`predict_batch`]).
pub fn predict(
    session: &Session,
    item: &McqItem,
    data_dir: &Path,
    scoring: Scoring,
) -> Result<Prediction> {
    let mut preds = predict_batch(session, &[item], data_dir, scoring)?;
    preds
        .pop()
        .ok_or_else(|| Error::Model("no prediction made".into()))
}

/// Predict several items at once, in order. Items about the same image share its vision features
/// and the prompt prefix up to the question ([`prefill_shared`]); in `generate` mode all items
/// then decode as one batch ([`greedy_batch`]: at most [`MAX_NEW_TOKENS`] each, stopping at and
/// including an end-of-sequence token, decoded with special tokens skipped). Each item's answer
/// is what it gets alone, up to float rounding.
pub fn predict_batch(
    session: &Session,
    items: &[&McqItem],
    data_dir: &Path,
    scoring: Scoring,
) -> Result<Vec<Prediction>> {
    let model = session.model.as_ref();
    let mut prompts = Vec::with_capacity(items.len());
    for item in items {
        let ids = session.prompt_ids(&Prompt::Chat(question_prompt(&item.key, &item.options)))?;
        if scoring == Scoring::Generate {
            session.check_generation_length(ids.len(), MAX_NEW_TOKENS)?;
        }
        prompts.push(ids);
    }
    // Items grouped by image, first appearance first; each group prefilled together.
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match groups.iter_mut().find(|(img, _)| *img == item.image) {
            Some((_, members)) => members.push(i),
            None => groups.push((&item.image, vec![i])),
        }
    }
    let mut starts: Vec<Option<Prefilled>> = vec![None; items.len()];
    for (image, members) in &groups {
        let vision = session.vision_input(&resolve_image(data_dir, image))?;
        let group_prompts: Vec<Vec<u32>> = members.iter().map(|&i| prompts[i].clone()).collect();
        let prefilled = prefill_shared(model, &group_prompts, Some(&vision), &session.device)?;
        for (&i, p) in members.iter().zip(prefilled) {
            starts[i] = Some(p);
        }
    }
    let starts: Vec<Prefilled> = starts.into_iter().flatten().collect();
    let mut preds: Vec<Prediction> = items
        .iter()
        .map(|item| Prediction {
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
        })
        .collect();
    match scoring {
        Scoring::Generate => {
            let eos = session.text.eos_token_ids();
            let generated = greedy_batch(model, starts, MAX_NEW_TOKENS, &eos, &session.device)?;
            for ((pred, item), ids) in preds.iter_mut().zip(items).zip(generated) {
                let text = session.text.decode(&ids, true)?;
                let n = item.options.len();
                pred.strict = parse_strict(&text, n).map(letter);
                pred.lenient = parse_lenient(&text, &item.options).map(letter);
                pred.predicted = pred.strict;
                pred.raw = Some(text);
            }
        }
        Scoring::Likelihood | Scoring::LikelihoodText => {
            for ((pred, item), start) in preds.iter_mut().zip(items).zip(&starts) {
                let n = item.options.len();
                let texts: Vec<String> = match scoring {
                    Scoring::Likelihood => {
                        (0..n).map(|i| likelihood_continuation(letter(i))).collect()
                    }
                    _ => item.options.clone(),
                };
                let conts = texts
                    .iter()
                    .map(|t| session.text.encode_plain(t))
                    .collect::<Result<Vec<_>>>()?;
                let mut scores =
                    option_loglikelihoods_after(model, start, &conts, &session.device)?;
                if scoring == Scoring::LikelihoodText {
                    for (s, t) in scores.iter_mut().zip(&texts) {
                        *s /= t.len().max(1) as f64;
                    }
                }
                pred.predicted = argmax(&scores).map(letter);
                pred.scores = Some(scores);
            }
        }
    }
    Ok(preds)
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
    /// `--max-image-tiles`, if given.
    pub max_image_tiles: Option<usize>,
    /// Items predicted together ([`predict_batch`]): they share each weight read while decoding
    /// and, when about one image, its features and prompt prefix. 1 predicts item by item.
    pub batch_size: usize,
    /// Keep predictions already in `predictions.jsonl` and skip their items.
    pub resume: bool,
    /// No progress bar.
    pub quiet: bool,
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
    let mut made = 0usize;
    for chunk in todo.chunks(opts.batch_size.max(1)) {
        for p in predict_batch(session, chunk, data_dir, opts.scoring)? {
            correct += usize::from(p.predicted == Some(p.answer));
            made += 1;
            let mut line = serde_json::to_vec(&p).map_err(|e| Error::json(&pred_path, e))?;
            line.push(b'\n');
            file.write_all(&line)
                .and_then(|_| file.flush())
                .map_err(|e| Error::io(&pred_path, e))?;
            preds.push(p);
        }
        bar.set_message(format!("acc={:.3}", correct as f64 / made as f64));
        bar.inc(chunk.len() as u64);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_ties_first() {
        assert_eq!(argmax(&[-1.0, -0.5, -0.5]), Some(1));
        assert_eq!(argmax(&[]), None);
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
