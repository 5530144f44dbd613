//! Response shuffling (METHOD.md "Response shuffling"): a description is split into pieces on a
//! separator, each piece is trimmed, empty pieces are dropped, and the pieces are permuted
//! uniformly at random and re-joined. It is applied to every sample every time it is loaded, so
//! each epoch sees a fresh order, in both training stages.
//!
//! The permutation is a pure function of `(seed, epoch, index)`: nothing else (thread, load order,
//! how many samples came before) enters it, so a resumed or re-run training sees the same
//! descriptions. The generator is a ChaCha8 stream whose 256-bit key is the three numbers written
//! out verbatim (little-endian `seed`, `epoch`, `index`) followed by the domain tag
//! `b"shuffle\0"`. That key is injective in `(seed, epoch, index)` (no hash collisions are
//! possible, unlike a 64-bit mix) and the tag keeps this stream apart from any other ChaCha stream
//! the crate derives from the same seed. The permutation is rand's Fisher–Yates
//! ([`SliceRandom::shuffle`]), which is uniform over all orders.

use std::fmt;
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// Where a description is cut into the pieces that get permuted.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Separator {
    /// Split on `,`; pieces are re-joined with `", "` (the method's default).
    #[default]
    Comma,
    /// Split into sentences after `.`, `!` or `?` followed by whitespace (the punctuation stays
    /// with its sentence); pieces are re-joined with `" "`.
    Sentence,
    /// No shuffling: the description is only trimmed.
    None,
}

impl Separator {
    pub fn as_str(self) -> &'static str {
        match self {
            Separator::Comma => "comma",
            Separator::Sentence => "sentence",
            Separator::None => "none",
        }
    }
}

impl fmt::Display for Separator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Separator {
    type Err = Error;

    /// `comma`, `sentence` or `none` (ASCII case-insensitive, surrounding whitespace ignored).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "comma" => Ok(Separator::Comma),
            "sentence" => Ok(Separator::Sentence),
            "none" => Ok(Separator::None),
            _ => Err(Error::Config {
                path: "shuffle".into(),
                key: "separator".into(),
                reason: format!("unknown separator `{s}` (expected comma, sentence or none)"),
            }),
        }
    }
}

/// Split `text` on the separator, trim each piece, drop empty pieces, permute uniformly at random
/// with a generator seeded from `(seed, epoch, index)` only (see the module docs), and re-join:
/// comma → `", "`, sentence → `" "` (pieces are sentences split after `.`, `!` or `?` followed by
/// whitespace; each sentence keeps its terminal punctuation), none → text unchanged (trimmed).
///
/// A text with no non-empty piece gives `""`. In sentence mode a last sentence without terminal
/// punctuation is kept as it is, so when it lands before another sentence the output reads as
/// one run-on sentence (nothing is added to the description).
pub fn shuffle_description(
    text: &str,
    sep: Separator,
    seed: u64,
    epoch: u64,
    index: u64,
) -> String {
    let (mut pieces, joiner) = match sep {
        Separator::None => return text.trim().to_string(),
        Separator::Comma => (split_comma(text), ", "),
        Separator::Sentence => (split_sentences(text), " "),
    };
    if pieces.len() > 1 {
        pieces.shuffle(&mut shuffle_rng(seed, epoch, index));
    }
    pieces.join(joiner)
}

/// The generator for one `(seed, epoch, index)`: ChaCha8 keyed by the three numbers verbatim plus
/// a domain tag (see the module docs).
fn shuffle_rng(seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..32].copy_from_slice(b"shuffle\0");
    ChaCha8Rng::from_seed(key)
}

fn split_comma(text: &str) -> Vec<&str> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// Sentences end after `.`, `!` or `?` when whitespace follows; a run such as `?!` or `...` ends
/// at its last mark. Text after the last such break (with or without punctuation) is the last
/// sentence.
fn split_sentences(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if matches!(c, '.' | '!' | '?') {
            if let Some(&(_, next)) = chars.peek() {
                if next.is_whitespace() {
                    let end = i + c.len_utf8();
                    pieces.push(&text[start..end]);
                    start = end;
                }
            }
        }
    }
    pieces.push(&text[start..]);
    pieces
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn sorted(v: Vec<&str>) -> Vec<&str> {
        let mut v = v;
        v.sort_unstable();
        v
    }

    #[test]
    fn separator_parses_and_names_bad_values() {
        assert_eq!("comma".parse::<Separator>().unwrap(), Separator::Comma);
        assert_eq!(
            "Sentence".parse::<Separator>().unwrap(),
            Separator::Sentence
        );
        assert_eq!(" none ".parse::<Separator>().unwrap(), Separator::None);
        let err = "semicolon".parse::<Separator>().unwrap_err().to_string();
        assert!(err.contains("semicolon"), "{err}");
        assert_eq!(Separator::default(), Separator::Comma);
        for s in [Separator::Comma, Separator::Sentence, Separator::None] {
            assert_eq!(s.to_string().parse::<Separator>().unwrap(), s);
        }
    }

    #[test]
    fn separator_serde_is_lowercase() {
        let json = serde_json::to_string(&Separator::Sentence).unwrap();
        assert_eq!(json, "\"sentence\"");
        let back: Separator = serde_json::from_str("\"comma\"").unwrap();
        assert_eq!(back, Separator::Comma);
        assert!(serde_json::from_str::<Separator>("\"Comma\"").is_err());
    }

    #[test]
    fn deterministic_for_same_seed_epoch_index() {
        let text = "big cell size, round cell shape, segmented-bilobed nucleus shape, low ratio, Eosinophil";
        for index in 0..50 {
            let a = shuffle_description(text, Separator::Comma, 7, 3, index);
            let b = shuffle_description(text, Separator::Comma, 7, 3, index);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn different_epochs_give_different_permutations() {
        // 5 pieces: 120 orders, so two independent draws agree with probability 1/120.
        let text = "a, b, c, d, e";
        let n = 500;
        let differ_epoch = (0..n)
            .filter(|&i| {
                shuffle_description(text, Separator::Comma, 0, 0, i)
                    != shuffle_description(text, Separator::Comma, 0, 1, i)
            })
            .count();
        assert!(differ_epoch as f64 >= 0.95 * n as f64, "{differ_epoch}/{n}");
        let differ_seed = (0..n)
            .filter(|&i| {
                shuffle_description(text, Separator::Comma, 0, 0, i)
                    != shuffle_description(text, Separator::Comma, 1, 0, i)
            })
            .count();
        assert!(differ_seed as f64 >= 0.95 * n as f64, "{differ_seed}/{n}");
        let differ_index = (0..n)
            .filter(|&i| {
                shuffle_description(text, Separator::Comma, 0, 0, i)
                    != shuffle_description(text, Separator::Comma, 0, 0, i + n)
            })
            .count();
        assert!(differ_index as f64 >= 0.95 * n as f64, "{differ_index}/{n}");
    }

    #[test]
    fn output_is_a_permutation_of_trimmed_pieces() {
        let text = "  alpha ,beta,  gamma delta ,epsilon  ";
        let expected = sorted(vec!["alpha", "beta", "gamma delta", "epsilon"]);
        for index in 0..200 {
            let out = shuffle_description(text, Separator::Comma, 11, 2, index);
            let pieces: Vec<&str> = out.split(", ").collect();
            assert_eq!(sorted(pieces), expected, "{out}");
        }
    }

    #[test]
    fn permutations_are_roughly_uniform() {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for index in 0..6000 {
            *counts
                .entry(shuffle_description(
                    "x, y, z",
                    Separator::Comma,
                    42,
                    0,
                    index,
                ))
                .or_default() += 1;
        }
        assert_eq!(counts.len(), 6, "{counts:?}");
        for (order, &n) in &counts {
            assert!((850..=1150).contains(&n), "{order}: {n} (all: {counts:?})");
        }
    }

    #[test]
    fn sentence_mode_keeps_punctuation() {
        let text = "The cell is big.  The nucleus is round!\nIs it a monocyte? Granules are pink";
        let sentences = [
            "The cell is big.",
            "The nucleus is round!",
            "Is it a monocyte?",
            "Granules are pink",
        ];
        assert_eq!(split_sentences(text), sentences);
        // All 24 orders, joined by single spaces.
        let mut orders = std::collections::HashSet::new();
        for a in 0..4 {
            for b in 0..4 {
                for c in 0..4 {
                    for d in 0..4 {
                        let idx = [a, b, c, d];
                        let distinct = (0..4).all(|k| (0..k).all(|m| idx[m] != idx[k]));
                        if distinct {
                            orders.insert(idx.map(|k| sentences[k]).join(" "));
                        }
                    }
                }
            }
        }
        assert_eq!(orders.len(), 24);
        let mut seen = std::collections::HashSet::new();
        for index in 0..200 {
            let out = shuffle_description(text, Separator::Sentence, 1, 0, index);
            assert!(orders.contains(&out), "{out}");
            seen.insert(out);
        }
        assert!(seen.len() > 12, "{}", seen.len());
        // A mark not followed by whitespace (a decimal, a run of marks) is no break.
        assert_eq!(
            split_sentences("Size 3.5 um. Done?! ok"),
            vec!["Size 3.5 um.", "Done?!", "ok"]
        );
    }

    #[test]
    fn none_mode_only_trims() {
        let text = "  c, b, a. Second sentence.  ";
        for index in 0..20 {
            assert_eq!(
                shuffle_description(text, Separator::None, 5, index, index),
                "c, b, a. Second sentence."
            );
        }
    }

    #[test]
    fn single_piece_is_trimmed_and_unchanged() {
        assert_eq!(
            shuffle_description("  only one  ", Separator::Comma, 0, 0, 0),
            "only one"
        );
        assert_eq!(
            shuffle_description(" Just this. ", Separator::Sentence, 0, 0, 0),
            "Just this."
        );
        assert_eq!(shuffle_description(" , ,, ", Separator::Comma, 0, 0, 0), "");
        assert_eq!(shuffle_description("", Separator::Sentence, 0, 0, 0), "");
    }

    #[test]
    fn extra_spaces_and_empty_pieces_are_dropped() {
        let expected = sorted(vec!["a", "b", "c"]);
        let mut seen = std::collections::HashSet::new();
        for index in 0..100 {
            let out = shuffle_description("a,, b ,c", Separator::Comma, 3, 0, index);
            assert_eq!(sorted(out.split(", ").collect()), expected, "{out}");
            seen.insert(out);
        }
        assert_eq!(seen.len(), 6, "{seen:?}");
    }
}
