//! The evaluation report: accuracy overall and per key with 95% Wilson score intervals, next to the
//! two chance baselines computed from the same items.
//!
//! * **Accuracy** is the reported metric: in `generate` mode the reference's strict parse
//!   ([`crate::eval::parse::parse_strict`]), with the lenient parse reported beside it; in `likelihood`
//!   mode the option with the highest continuation log-likelihood. An unparsed answer counts as wrong.
//! * **Majority baseline**: for each key, always answer that key's most frequent correct option index
//!   (ties to the lowest index), counted on the same items. Overall = total such hits / total items.
//! * **Uniform baseline**: the expected accuracy of guessing uniformly among an item's options, i.e. the
//!   mean of `1 / n_options`.

use std::collections::BTreeMap;

use super::run::{Prediction, Scoring};

/// z for a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// Wilson score interval `(low, high)` of a binomial proportion `k / n` at normal quantile `z`.
/// `n == 0` gives the uninformative `(0, 1)`.
pub fn wilson_interval(k: usize, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = k as f64 / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// `correct / n` with its 95% Wilson interval.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Accuracy {
    pub correct: usize,
    pub n: usize,
    /// `correct / n` (0 when `n == 0`).
    pub accuracy: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
}

impl Accuracy {
    pub fn new(correct: usize, n: usize) -> Self {
        let (lo, hi) = wilson_interval(correct, n, Z95);
        Self {
            correct,
            n,
            accuracy: if n == 0 {
                0.0
            } else {
                correct as f64 / n as f64
            },
            ci95_low: lo,
            ci95_high: hi,
        }
    }
}

/// Statistics over one group of items (one key, or all of them).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupStats {
    pub n_items: usize,
    /// The reported metric: strict parse (generate) or argmax log-likelihood (likelihood).
    pub accuracy: Accuracy,
    /// Lenient parse (generate mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lenient_accuracy: Option<Accuracy>,
    /// Items the strict parse could not read (generate mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unparsed_strict: Option<usize>,
    /// Items the lenient parse could not read (generate mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unparsed_lenient: Option<usize>,
    /// Always answering each key's most frequent correct letter.
    pub majority_baseline: f64,
    /// For a single key: that most frequent letter (ties to the earliest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub majority_letter: Option<char>,
    /// Mean of `1 / n_options`.
    pub uniform_baseline: f64,
}

/// `report.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub benchmark: String,
    pub split: String,
    pub scoring: Scoring,
    pub model: String,
    #[serde(default)]
    pub adapter: Option<String>,
    /// The items file evaluated.
    pub items_file: String,
    /// Items in the items file (after `--limit`).
    pub n_items_selected: usize,
    /// Predictions the report is computed from (the whole `predictions.jsonl`).
    pub n_predictions: usize,
    /// Items predicted by this invocation (the rest came from an earlier run, `--resume`).
    pub n_new: usize,
    /// Wall time and throughput of this invocation's new items.
    pub elapsed_s: f64,
    pub items_per_sec: f64,
    /// What `accuracy` means in this report.
    pub metric: String,
    pub overall: GroupStats,
    pub per_key: BTreeMap<String, GroupStats>,
}

fn majority(preds: &[&Prediction]) -> (usize, Option<char>) {
    let mut counts: BTreeMap<char, usize> = BTreeMap::new();
    for p in preds {
        *counts.entry(p.answer).or_default() += 1;
    }
    // BTreeMap iterates letters in order; `max_by_key` keeps the last maximum, so scan by hand.
    let mut best: Option<(char, usize)> = None;
    for (&l, &c) in &counts {
        if best.is_none_or(|(_, bc)| c > bc) {
            best = Some((l, c));
        }
    }
    match best {
        Some((l, c)) => (c, Some(l)),
        None => (0, None),
    }
}

/// Statistics over `preds` (all of one key when `single_key`, else the whole set, where the majority
/// baseline sums each key's majority hits).
pub fn group_stats(preds: &[&Prediction], scoring: Scoring, single_key: bool) -> GroupStats {
    let n = preds.len();
    let correct = preds
        .iter()
        .filter(|p| p.predicted == Some(p.answer))
        .count();
    let (lenient_accuracy, unparsed_strict, unparsed_lenient) = match scoring {
        Scoring::Generate => {
            let lc = preds.iter().filter(|p| p.lenient == Some(p.answer)).count();
            let us = preds.iter().filter(|p| p.strict.is_none()).count();
            let ul = preds.iter().filter(|p| p.lenient.is_none()).count();
            (Some(Accuracy::new(lc, n)), Some(us), Some(ul))
        }
        Scoring::Likelihood | Scoring::LikelihoodText => (None, None, None),
    };
    let (majority_hits, majority_letter) = if single_key {
        majority(preds)
    } else {
        let mut by_key: BTreeMap<&str, Vec<&Prediction>> = BTreeMap::new();
        for p in preds {
            by_key.entry(p.key.as_str()).or_default().push(p);
        }
        let hits = by_key.values().map(|v| majority(v).0).sum();
        (hits, None)
    };
    let frac = |x: f64| if n == 0 { 0.0 } else { x / n as f64 };
    GroupStats {
        n_items: n,
        accuracy: Accuracy::new(correct, n),
        lenient_accuracy,
        unparsed_strict,
        unparsed_lenient,
        majority_baseline: frac(majority_hits as f64),
        majority_letter,
        uniform_baseline: frac(
            preds
                .iter()
                .map(|p| 1.0 / p.options.len().max(1) as f64)
                .sum(),
        ),
    }
}

/// Overall and per-key statistics of a prediction set.
pub fn summarize(
    preds: &[Prediction],
    scoring: Scoring,
) -> (GroupStats, BTreeMap<String, GroupStats>) {
    let all: Vec<&Prediction> = preds.iter().collect();
    let mut by_key: BTreeMap<String, Vec<&Prediction>> = BTreeMap::new();
    for p in preds {
        by_key.entry(p.key.clone()).or_default().push(p);
    }
    let per_key = by_key
        .into_iter()
        .map(|(k, v)| (k, group_stats(&v, scoring, true)))
        .collect();
    (group_stats(&all, scoring, false), per_key)
}

/// What `accuracy` means for a scoring mode (written into the report).
pub fn metric_description(scoring: Scoring) -> String {
    match scoring {
        Scoring::Generate => "strict parse of a greedy generation (the reference's scoring); \
                              lenient_accuracy: forgiving parse of the same generation"
            .to_string(),
        Scoring::Likelihood => format!(
            "argmax over options of the log-likelihood of the continuation \"{}\" given the prompt",
            super::run::likelihood_continuation('X')
        ),
        Scoring::LikelihoodText => {
            "argmax over options of the log-likelihood of the option text as \
                                    the answer, divided by its length in bytes (acc_norm)"
                .to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(key: &str, n_opt: usize, answer: char, predicted: Option<char>) -> Prediction {
        Prediction {
            id: format!("{key}-{answer}-{predicted:?}"),
            key: key.into(),
            image: "x.png".into(),
            options: (0..n_opt).map(|i| format!("o{i}")).collect(),
            answer,
            predicted,
            raw: Some(String::new()),
            strict: predicted,
            lenient: predicted.or(Some('A')),
            scores: None,
        }
    }

    #[test]
    fn wilson_known_values() {
        let (lo, hi) = wilson_interval(8, 10, 1.96);
        assert!((lo - 0.4902).abs() < 5e-4, "{lo}");
        assert!((hi - 0.9433).abs() < 5e-4, "{hi}");
        assert_eq!(wilson_interval(0, 0, Z95), (0.0, 1.0));
        let (lo, hi) = wilson_interval(0, 10, Z95);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.2775).abs() < 5e-4, "{hi}");
        let (lo, hi) = wilson_interval(10, 10, Z95);
        assert!((lo - 0.7225).abs() < 5e-4, "{lo}");
        assert!((hi - 1.0).abs() < 1e-12, "{hi}");
    }

    #[test]
    fn baselines_and_counts() {
        let preds = vec![
            p("a", 2, 'A', Some('A')),
            p("a", 2, 'A', Some('B')),
            p("a", 2, 'B', None),
            p("b", 4, 'C', Some('C')),
        ];
        let (all, per) = summarize(&preds, Scoring::Generate);
        assert_eq!(all.n_items, 4);
        assert_eq!(all.accuracy.correct, 2);
        assert_eq!(all.unparsed_strict, Some(1));
        // key a: majority A (2 of 3); key b: C (1 of 1).
        assert!((all.majority_baseline - 0.75).abs() < 1e-12);
        assert!((all.uniform_baseline - (0.5 * 3.0 + 0.25) / 4.0).abs() < 1e-12);
        assert_eq!(per["a"].majority_letter, Some('A'));
        assert!((per["a"].majority_baseline - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(per["b"].accuracy.accuracy, 1.0);
        // Lenient: the None item reads as 'A' (wrong, truth B).
        assert_eq!(all.lenient_accuracy.as_ref().unwrap().correct, 2);
        let (lik, _) = summarize(&preds, Scoring::Likelihood);
        assert!(lik.lenient_accuracy.is_none());
    }

    #[test]
    fn majority_ties_go_to_earliest_letter() {
        let preds = [p("a", 3, 'B', None), p("a", 3, 'A', None)];
        let refs: Vec<&Prediction> = preds.iter().collect();
        assert_eq!(majority(&refs), (1, Some('A')));
    }
}
