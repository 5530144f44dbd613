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
pub use super::item_lengths::check_item_lengths;
use super::mcq::{letter, question_prompt, McqItem};
pub use super::model_states::{find_model_states, ModelState};
use super::parse::{parse_lenient, parse_strict};
use super::provenance::check_resume;
pub use super::provenance::{fingerprint, RunInfo, RUN_INFO};
use super::report::{metric_description, summarize, Report};
use crate::error::{Error, Result};
use crate::model::{VisionInput, VisionLanguageModel};
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
    vision: Option<&VisionInput>,
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
    let mut logits = model.prefill(&ids, vision, &mut cache)?;
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
            let vision = session.vision_input(&image)?;
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
                session.model.as_ref(),
                &prompt_ids,
                Some(&vision),
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
    /// `--max-image-tiles`, if given.
    pub max_image_tiles: Option<usize>,
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
