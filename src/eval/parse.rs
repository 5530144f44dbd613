//! Reading the chosen option out of a generation.
//!
//! [`parse_strict`] is the reference's scoring and the reported metric. [`parse_lenient`] is reported beside
//! it: the gap between the two is accuracy lost to answer formatting rather than to the answer itself.

use super::mcq::MAX_OPTIONS;

/// The phrase the prompt asks the model to start with.
pub const ANSWER_PHRASE: &str = "The correct answer is";

/// End-of-turn markers removed before reading an answer.
pub const END_OF_TURN_MARKERS: [&str; 4] = ["<|eot_id|>", "</s>", "<|end_of_text|>", "<|im_end|>"];

fn remove_end_of_turn(s: &str) -> String {
    let mut out = s.to_string();
    for m in END_OF_TURN_MARKERS {
        out = out.replace(m, "");
    }
    out
}

/// Index of an option letter, if it names one of the first `n_options` options.
fn letter_index(c: char, n_options: usize) -> Option<usize> {
    if !c.is_ascii_alphabetic() {
        return None;
    }
    let i = (c.to_ascii_uppercase() as u8 - b'A') as usize;
    (i < n_options.min(MAX_OPTIONS)).then_some(i)
}

/// The reference's strict parse: take the text after the LAST occurrence of `"The correct answer is"`
/// (case-sensitive); remove every occurrence of the characters `.`, `*`, `[`, `]` and of the end-of-turn
/// markers ([`END_OF_TURN_MARKERS`]), then surrounding whitespace, and upper-case what remains (the
/// reference's `.strip().upper()`); the result must be exactly one of the option letters →
/// `Some(index)`, else `None`. No occurrence → `None`.
///
/// So `"The correct answer is [B]."`, `"**The correct answer is B**"` and `"The correct answer is b."`
/// score B, while `"The correct answer is B because ..."`, `"the correct answer is b"` (the phrase is
/// case-sensitive) and a letter past the last option do not score at all.
pub fn parse_strict(generation: &str, n_options: usize) -> Option<usize> {
    let at = generation.rfind(ANSWER_PHRASE)?;
    let mut rest = remove_end_of_turn(&generation[at + ANSWER_PHRASE.len()..]);
    rest.retain(|c| !matches!(c, '.' | '*' | '[' | ']'));
    let upper = rest.trim().to_uppercase();
    let mut chars = upper.chars();
    let c = chars.next()?;
    if chars.next().is_some() || !c.is_ascii_uppercase() {
        return None;
    }
    letter_index(c, n_options)
}

/// A lenient parse reported beside the strict one. End-of-turn markers are removed first, then the first
/// rule that gives an answer wins:
///
/// 1. **Answer phrase**, case-insensitive: `answer is X` or `answer: X` (the last such phrase that is
///    followed by a letter). Whitespace and opening `(`, `[`, `*`, `"`, `'` before the letter are skipped;
///    the letter (either case) must be a whole token (not followed by a letter or digit), must name an
///    option, and must not begin a list of letters (`"[A or B]"`, an echo of the prompt, is not an answer).
///    `"Answer: (c)"` → C, `"the correct answer is b"` → B.
/// 2. **Leading letter**: the text (after leading whitespace and `*`) starts with a letter token: `B`, `B.`,
///    `(B)`, `[B]`, `B)`, `B:`, `B,`, or `B` followed by a newline. A bare letter followed by a space
///    (`"A neutrophil"`) is not taken, as it reads as a word.
/// 3. **One letter mentioned**: exactly one distinct option letter appears as a standalone uppercase token
///    (a maximal run of ASCII letters and digits). `A` and `I` are not counted where they start a sentence
///    and are followed by a space and a word (`"A neutrophil"`, `"I think"`).
/// 4. **Option text**: exactly one option's text appears in the generation (case-insensitive, on word
///    boundaries), where an occurrence lying inside an occurrence of a longer option does not count
///    (`"light blue"` names `light blue`, not `blue`).
///
/// Otherwise (nothing found, or ambiguous at rules 3 and 4) → `None`.
pub fn parse_lenient(generation: &str, options: &[String]) -> Option<usize> {
    let n = options.len().min(MAX_OPTIONS);
    let text = remove_end_of_turn(generation);
    answer_phrase(&text, n)
        .or_else(|| leading_letter(&text, n))
        .or_else(|| single_letter_token(&text, n))
        .or_else(|| single_option_text(&text, options))
}

/// Rule 1 of [`parse_lenient`].
fn answer_phrase(text: &str, n: usize) -> Option<usize> {
    // ASCII lower-casing keeps byte offsets.
    let lower = text.to_ascii_lowercase();
    let starts: Vec<usize> = lower.match_indices("answer").map(|(i, _)| i).collect();
    starts.into_iter().rev().find_map(|i| {
        let after = lower[i + "answer".len()..].trim_start();
        let after = if let Some(r) = after.strip_prefix("is") {
            if r.chars().next().is_some_and(|c| c.is_alphanumeric()) {
                return None;
            }
            r
        } else {
            after.strip_prefix(':')?
        };
        let after = after.trim_start_matches(|c: char| {
            c.is_whitespace() || matches!(c, '(' | '[' | '*' | '"' | '\'')
        });
        let mut chars = after.chars();
        let c = chars.next()?;
        let rest = chars.as_str();
        if rest.chars().next().is_some_and(|c| c.is_alphanumeric()) {
            return None;
        }
        // "[A or B]": a list of letters, not a choice.
        if let Some(r) = rest.trim_start().strip_prefix("or") {
            if !r.chars().next().is_some_and(|c| c.is_alphanumeric()) {
                return None;
            }
        }
        letter_index(c, n)
    })
}

/// Rule 2 of [`parse_lenient`].
fn leading_letter(text: &str, n: usize) -> Option<usize> {
    let s = text.trim_start_matches(|c: char| c.is_whitespace() || c == '*');
    let (open, s) = match s.chars().next()? {
        '(' => (Some(')'), &s[1..]),
        '[' => (Some(']'), &s[1..]),
        _ => (None, s),
    };
    let mut chars = s.chars();
    let c = chars.next()?;
    let mut rest = chars.as_str();
    if let Some(close) = open {
        rest = rest.strip_prefix(close)?;
    }
    let ok = match rest.chars().next() {
        None => true,
        Some(next) => {
            matches!(next, '.' | ')' | ']' | ':' | ',' | '*' | '\n' | '\r')
                || (open.is_some() && next.is_whitespace())
        }
    };
    if ok {
        letter_index(c, n)
    } else {
        None
    }
}

/// Rule 3 of [`parse_lenient`].
fn single_letter_token(text: &str, n: usize) -> Option<usize> {
    let mut found: Option<usize> = None;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_alphanumeric() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphanumeric() {
            i += 1;
        }
        if i - start != 1 || !bytes[start].is_ascii_uppercase() {
            continue;
        }
        let c = bytes[start] as char;
        let Some(idx) = letter_index(c, n) else {
            continue;
        };
        if matches!(c, 'A' | 'I') && reads_as_word(text, start) {
            continue;
        }
        match found {
            None => found = Some(idx),
            Some(prev) if prev == idx => {}
            Some(_) => return None,
        }
    }
    found
}

/// Whether the one-letter token at byte `at` starts a sentence and is followed by a space and a word.
fn reads_as_word(text: &str, at: usize) -> bool {
    let before = text[..at].trim_end();
    let sentence_start = before.is_empty() || before.ends_with(['.', '!', '?', '\n']);
    let after = &text[at + 1..];
    let followed_by_word =
        after.starts_with(' ') && after[1..].chars().next().is_some_and(|c| c.is_alphabetic());
    sentence_start && followed_by_word
}

/// Rule 4 of [`parse_lenient`].
fn single_option_text(text: &str, options: &[String]) -> Option<usize> {
    let lower = text.to_lowercase();
    let boundary = |c: Option<char>| !c.is_some_and(|c| c.is_alphanumeric());
    // (option, start, end) of every word-bounded occurrence.
    let mut occ: Vec<(usize, usize, usize)> = Vec::new();
    for (k, opt) in options.iter().enumerate().take(MAX_OPTIONS) {
        let pat = opt.trim().to_lowercase();
        if pat.is_empty() {
            continue;
        }
        for (s, m) in lower.match_indices(&pat) {
            let e = s + m.len();
            if boundary(lower[..s].chars().next_back()) && boundary(lower[e..].chars().next()) {
                occ.push((k, s, e));
            }
        }
    }
    let mut found: Option<usize> = None;
    for &(k, s, e) in &occ {
        let covered = occ
            .iter()
            .any(|&(k2, s2, e2)| k2 != k && s2 <= s && e <= e2 && e2 - s2 > e - s);
        if covered {
            continue;
        }
        match found {
            None => found = Some(k),
            Some(prev) if prev == k => {}
            Some(_) => return None,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// (generation, strict, lenient) with options [Basophil, Eosinophil, Monocyte, Neutrophil] (A-D).
    const TABLE: &[(&str, Option<usize>, Option<usize>)] = &[
        ("The correct answer is B.", Some(1), Some(1)),
        ("The correct answer is [B].", Some(1), Some(1)),
        ("**The correct answer is B**", Some(1), Some(1)),
        // Strict takes the last case-sensitive phrase: here the first one, followed by "A Wait, ...".
        (
            "The correct answer is A. Wait, the correct answer is C.",
            None,
            Some(2),
        ),
        (
            "The correct answer is A. Wait, The correct answer is C.",
            Some(2),
            Some(2),
        ),
        // Strict is case-sensitive on both phrase and letter.
        ("the correct answer is b", None, Some(1)),
        ("The correct answer is b.", Some(1), Some(1)),
        // Anything left beside the letter fails the strict parse, as in the reference.
        (
            "The correct answer is B because it has granules.",
            None,
            Some(1),
        ),
        ("The correct answer is B, Eosinophil.", None, Some(1)),
        ("The correct answer is B. Eosinophil", None, Some(1)),
        // A letter past the last option (4 options) is no answer.
        ("The correct answer is E", None, None),
        ("The correct answer is D", Some(3), Some(3)),
        ("B", None, Some(1)),
        ("B.", None, Some(1)),
        ("(B)", None, Some(1)),
        ("B)", None, Some(1)),
        ("B. Eosinophil", None, Some(1)),
        ("Answer: (c)", None, Some(2)),
        ("It is a Neutrophil", None, Some(3)),
        ("A neutrophil.", None, Some(3)),
        ("I think it is option D.", None, Some(3)),
        ("Option A or option C", None, None),
        ("The correct answer is C</s>", Some(2), Some(2)),
        ("</s>", None, None),
        ("The correct answer is B<|eot_id|>", Some(1), Some(1)),
        ("The correct answer is [A]<|im_end|>", Some(0), Some(0)),
        ("The correct answer is B.<|end_of_text|>", Some(1), Some(1)),
        ("The correct answer is \n B \n", Some(1), Some(1)),
        // An echo of the prompt's template is no answer.
        ("The correct answer is [A or B or C or D].", None, None),
        ("Basophil or Monocyte", None, None),
        ("", None, None),
    ];

    #[test]
    fn table() {
        let options = opts(&["Basophil", "Eosinophil", "Monocyte", "Neutrophil"]);
        for &(generation, strict, lenient) in TABLE {
            assert_eq!(
                parse_strict(generation, options.len()),
                strict,
                "strict: {generation:?}"
            );
            assert_eq!(
                parse_lenient(generation, &options),
                lenient,
                "lenient: {generation:?}"
            );
        }
    }

    #[test]
    fn strict_respects_option_count() {
        assert_eq!(parse_strict("The correct answer is C", 2), None);
        assert_eq!(parse_strict("The correct answer is B", 2), Some(1));
        assert_eq!(parse_strict("The correct answer is Z", 26), Some(25));
        assert_eq!(parse_strict("The correct answer is A", 0), None);
    }

    #[test]
    fn lenient_option_text_prefers_longest_match() {
        let colours = opts(&["blue", "light blue", "purple blue"]);
        assert_eq!(
            parse_lenient("The cytoplasm is light blue.", &colours),
            Some(1)
        );
        assert_eq!(parse_lenient("It looks blue", &colours), Some(0));
        assert_eq!(parse_lenient("blue or purple blue", &colours), None);
        let shapes = opts(&["segmented-bilobed", "unsegmented-band", "unsegmented-round"]);
        assert_eq!(
            parse_lenient("an unsegmented-band nucleus", &shapes),
            Some(1)
        );
        // Word boundaries: "round" is not found inside "around".
        let size = opts(&["big", "round"]);
        assert_eq!(parse_lenient("around the big cell", &size), Some(0));
    }

    #[test]
    fn lenient_answer_phrase_wins_over_mentions() {
        let options = opts(&["big", "small"]);
        assert_eq!(
            parse_lenient("A is wrong, so the answer is B (small)", &options),
            Some(1)
        );
        assert_eq!(parse_lenient("The answer is small", &options), Some(1));
    }
}
