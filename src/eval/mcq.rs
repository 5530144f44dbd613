//! Multiple-choice items and the reference's question prompt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The most options an item may have: one per letter `A`..=`Z`.
pub const MAX_OPTIONS: usize = 26;

/// One multiple-choice item (what `prepare` writes as JSONL, what `eval` reads).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct McqItem {
    /// Unique within a file; results are keyed by it.
    pub id: String,
    /// Image path (as written by `prepare`; relative paths are resolved by the caller).
    pub image: String,
    /// The attribute asked, e.g. `cell_size`; see [`question_prompt`] for how it is phrased.
    pub key: String,
    /// Option texts, in the order shown (letter `A` first).
    pub options: Vec<String>,
    /// Index of the correct option in `options`.
    pub answer: usize,
    /// Where the item came from (benchmark, split, source row), free text.
    #[serde(default)]
    pub source: Option<String>,
}

impl McqItem {
    /// The letter of the correct option (`answer` 0 -> `'A'`). Call [`McqItem::validate`] first: panics if
    /// `answer` is 26 or more.
    pub fn answer_letter(&self) -> char {
        letter(self.answer)
    }

    /// Checks the item can be asked and scored: 2 to 26 options, `answer` in range, no duplicate option
    /// texts. The error names the item's id.
    pub fn validate(&self) -> Result<()> {
        match self.problem() {
            None => Ok(()),
            Some((key, reason)) => Err(Error::Config {
                path: PathBuf::from(format!("MCQ item `{}`", self.id)),
                key: key.to_string(),
                reason,
            }),
        }
    }

    /// The first problem found, as (field, reason).
    fn problem(&self) -> Option<(&'static str, String)> {
        let n = self.options.len();
        if n < 2 {
            return Some(("options", format!("needs at least 2 options, found {n}")));
        }
        if n > MAX_OPTIONS {
            return Some((
                "options",
                format!("at most {MAX_OPTIONS} options (letters A-Z), found {n}"),
            ));
        }
        if self.answer >= n {
            return Some((
                "answer",
                format!("index {} is out of range for {n} options", self.answer),
            ));
        }
        for (i, opt) in self.options.iter().enumerate() {
            if let Some(j) = self.options[..i].iter().position(|o| o == opt) {
                return Some((
                    "options",
                    format!(
                        "duplicate option {opt:?} at {} and {}",
                        letter(j),
                        letter(i)
                    ),
                ));
            }
        }
        None
    }
}

/// The option letter for an index: 0 -> `'A'`, 25 -> `'Z'`. Panics for 26 or more
/// ([`McqItem::validate`] rejects such items).
pub fn letter(i: usize) -> char {
    assert!(
        i < MAX_OPTIONS,
        "option index {i} has no letter (at most {MAX_OPTIONS} options)"
    );
    (b'A' + i as u8) as char
}

/// How a key is phrased in the question: underscores become spaces, and "mass margins" is asked as
/// "mass margin" (as the reference does).
pub fn key_phrase(key: &str) -> String {
    let phrase = key.replace('_', " ");
    if phrase == "mass margins" {
        "mass margin".to_string()
    } else {
        phrase
    }
}

/// The reference prompt, verbatim:
/// `"What is the {key}?\nA. {opt1}\nB. {opt2}\nResponse with only the letter of the correct choice, starting with \"The correct answer is [A or B].\"."`
/// The key's underscores become spaces and "mass margins" is asked as "mass margin" ([`key_phrase`]).
/// The bracket lists the letters joined by " or ". No trailing newline.
pub fn question_prompt(key: &str, options: &[String]) -> String {
    let mut s = format!("What is the {}?\n", key_phrase(key));
    for (i, opt) in options.iter().enumerate() {
        s.push(letter(i));
        s.push_str(". ");
        s.push_str(opt);
        s.push('\n');
    }
    let letters: Vec<String> = (0..options.len()).map(|i| letter(i).to_string()).collect();
    s.push_str(
        "Response with only the letter of the correct choice, starting with \"The correct answer is [",
    );
    s.push_str(&letters.join(" or "));
    s.push_str("].\".");
    s
}

/// Read items from a JSONL file, one [`McqItem`] a line; blank lines are skipped. Every malformed line
/// (bad JSON, missing field, an item failing [`McqItem::validate`], an id seen on an earlier line) is
/// reported as `file:line: problem`, all of them in one [`Error::Config`] (key `items`). A file with no
/// items is an error too.
pub fn read_items(path: &Path) -> Result<Vec<McqItem>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut items = Vec::new();
    let mut problems = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let shown = path.display();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let item: McqItem = match serde_json::from_str(line) {
            Ok(item) => item,
            Err(e) => {
                problems.push(format!("{shown}:{lineno}: {e}"));
                continue;
            }
        };
        if let Some((key, reason)) = item.problem() {
            problems.push(format!(
                "{shown}:{lineno}: item `{}`: `{key}`: {reason}",
                item.id
            ));
            continue;
        }
        if let Some(first) = seen.insert(item.id.clone(), lineno) {
            problems.push(format!(
                "{shown}:{lineno}: duplicate id `{}` (first on line {first})",
                item.id
            ));
            continue;
        }
        items.push(item);
    }
    if problems.is_empty() && items.is_empty() {
        problems.push(format!("{shown}: no items"));
    }
    if problems.is_empty() {
        Ok(items)
    } else {
        Err(Error::Config {
            path: path.to_path_buf(),
            key: "items".to_string(),
            reason: format!("{} problem(s):\n{}", problems.len(), problems.join("\n")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn item(id: &str, options: &[&str], answer: usize) -> McqItem {
        McqItem {
            id: id.into(),
            image: "img.png".into(),
            key: "cell_size".into(),
            options: opts(options),
            answer,
            source: None,
        }
    }

    #[test]
    fn letters() {
        assert_eq!(letter(0), 'A');
        assert_eq!(letter(2), 'C');
        assert_eq!(letter(25), 'Z');
        assert_eq!(item("x", &["a", "b", "c"], 2).answer_letter(), 'C');
    }

    #[test]
    #[should_panic]
    fn letter_past_z_panics() {
        letter(26);
    }

    #[test]
    fn prompt_golden_three_options() {
        let p = question_prompt(
            "cytoplasm_colour",
            &opts(&["blue", "light blue", "purple blue"]),
        );
        let want = "What is the cytoplasm colour?\nA. blue\nB. light blue\nC. purple blue\n\
                    Response with only the letter of the correct choice, starting with \
                    \"The correct answer is [A or B or C].\".";
        assert_eq!(p, want);
        assert_eq!(p.as_bytes(), want.as_bytes());
        assert!(p.ends_with("[A or B or C].\"."));
    }

    #[test]
    fn prompt_golden_two_options_and_key_phrases() {
        let p = question_prompt("mass_margins", &opts(&["circumscribed", "spiculated"]));
        assert_eq!(
            p,
            "What is the mass margin?\nA. circumscribed\nB. spiculated\nResponse with only the letter \
             of the correct choice, starting with \"The correct answer is [A or B].\"."
        );
        assert_eq!(key_phrase("mass margins"), "mass margin");
        assert_eq!(
            key_phrase("nuclear_cytoplasmic_ratio"),
            "nuclear cytoplasmic ratio"
        );
        assert_eq!(key_phrase("calc distribution"), "calc distribution");
    }

    #[test]
    fn validate_rules() {
        assert!(item("ok", &["a", "b"], 1).validate().is_ok());
        let bad = [
            item("one", &["a"], 0),
            item("range", &["a", "b"], 2),
            item("dup", &["a", "b", "a"], 0),
        ];
        for it in &bad {
            let msg = it.validate().unwrap_err().to_string();
            assert!(msg.contains(&format!("`{}`", it.id)), "{msg}");
        }
        let many: Vec<String> = (0..27).map(|i| format!("o{i}")).collect();
        let mut it = item("many", &["a", "b"], 0);
        it.options = many;
        assert!(it.validate().is_err());
        it.options.pop();
        assert!(it.validate().is_ok());
    }

    #[test]
    fn json_roundtrip_source_optional() {
        let line =
            r#"{"id":"q1","image":"a.png","key":"cell_size","options":["big","small"],"answer":1}"#;
        let it: McqItem = serde_json::from_str(line).unwrap();
        assert_eq!(it.source, None);
        assert_eq!(it.answer_letter(), 'B');
        let mut it2 = it.clone();
        it2.source = Some("wbcatt/test".into());
        let back: McqItem = serde_json::from_str(&serde_json::to_string(&it2).unwrap()).unwrap();
        assert_eq!(back, it2);
    }

    fn write(lines: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(lines.as_bytes()).unwrap();
        f
    }

    #[test]
    fn read_items_ok() {
        let a = serde_json::to_string(&item("a", &["x", "y"], 0)).unwrap();
        let b = serde_json::to_string(&item("b", &["x", "y", "z"], 2)).unwrap();
        let f = write(&format!("{a}\n\n{b}\n"));
        let items = read_items(f.path()).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].answer, 2);
    }

    #[test]
    fn read_items_collects_all_problems() {
        let good = serde_json::to_string(&item("a", &["x", "y"], 0)).unwrap();
        let out_of_range = serde_json::to_string(&item("r", &["x", "y"], 5)).unwrap();
        let f = write(&format!(
            "{good}\nnot json\n{out_of_range}\n{{\"id\":\"m\"}}\n{good}\n"
        ));
        let msg = read_items(f.path()).unwrap_err().to_string();
        let shown = f.path().display().to_string();
        for line in [2, 3, 4, 5] {
            assert!(msg.contains(&format!("{shown}:{line}:")), "{msg}");
        }
        assert!(!msg.contains(&format!("{shown}:1:")), "{msg}");
        assert!(msg.contains("4 problem(s)"), "{msg}");
        assert!(msg.contains("duplicate id `a`"), "{msg}");
    }

    #[test]
    fn read_items_empty_and_missing() {
        let f = write("\n");
        assert!(read_items(f.path())
            .unwrap_err()
            .to_string()
            .contains("no items"));
        let err = read_items(Path::new("/nonexistent/items.jsonl")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
    }
}
