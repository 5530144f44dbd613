//! Per-key confusion matrices (counts and a PNG): rows = the correct option, columns = the predicted
//! option, plus a final `none` column for answers that could not be read.
//!
//! When every item of the key shows the same options in the same order (WBCAtt, fixed-option keys) the
//! rows are labelled `A. text`; otherwise (shuffled options) rows and columns are option letters.

use crate::plot::{register_font, write_png, FONT_FAMILY};
use std::io;
use std::path::Path;

use super::mcq::letter;
use super::run::Prediction;
use crate::error::{Error, Result};

/// Counts of (truth, prediction) for one key.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Confusion {
    pub key: String,
    /// Row labels, one per option index (`A. text` or `A`).
    pub labels: Vec<String>,
    /// `counts[truth][pred]`, `pred == labels.len()` being `none`.
    pub counts: Vec<Vec<usize>>,
}

impl Confusion {
    /// Build from the predictions of one key (`preds` may mix option counts; the matrix is as wide as
    /// the largest).
    pub fn from_predictions(key: &str, preds: &[&Prediction]) -> Self {
        let n = preds.iter().map(|p| p.options.len()).max().unwrap_or(0);
        let fixed = preds
            .first()
            .filter(|first| preds.iter().all(|p| p.options == first.options));
        let labels: Vec<String> = match fixed {
            Some(first) => first
                .options
                .iter()
                .enumerate()
                .map(|(i, o)| format!("{}. {}", letter(i), shorten(o, 28)))
                .collect(),
            None => (0..n).map(|i| letter(i).to_string()).collect(),
        };
        let mut counts = vec![vec![0usize; n + 1]; n];
        for p in preds {
            let t = (p.answer as u8 - b'A') as usize;
            let c = p
                .predicted
                .map(|c| (c as u8 - b'A') as usize)
                .filter(|&c| c < n)
                .unwrap_or(n);
            if t < n {
                counts[t][c] += 1;
            }
        }
        Self {
            key: key.to_string(),
            labels,
            counts,
        }
    }

    pub fn total(&self) -> usize {
        self.counts.iter().flatten().sum()
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

fn plot_error(out: &Path, what: impl std::fmt::Display) -> Error {
    Error::io(
        out,
        io::Error::other(format!("cannot draw confusion matrix: {what}")),
    )
}

fn ensure_font(out: &Path) -> Result<()> {
    if register_font() {
        Ok(())
    } else {
        Err(plot_error(out, "the embedded font is invalid"))
    }
}

/// Draw the matrix as a PNG (cells shaded by row-normalised count, counts written in), atomically.
pub fn plot_confusion(c: &Confusion, title: &str, out: &Path) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    ensure_font(out)?;
    let n = c.labels.len();
    let cols = n + 1;
    let cell: i32 = if cols > 12 { 40 } else { 60 };
    let max_label = c
        .labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(1) as i32;
    let left = (max_label * 8 + 30).clamp(60, 300);
    let top = 90;
    let w = (left + cell * cols as i32 + 30).max(360) as u32;
    let h = (top + cell * n.max(1) as i32 + 50) as u32;
    let mut pixels = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(out, e))?;
        let centre = Pos::new(HPos::Center, VPos::Center);
        let right = Pos::new(HPos::Right, VPos::Center);
        let title_style =
            TextStyle::from((FONT_FAMILY, 18).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Text::new(
            format!("{title} (n = {})", c.total()),
            (w as i32 / 2, 8),
            title_style,
        ))
        .map_err(|e| plot_error(out, e))?;
        let axis = TextStyle::from((FONT_FAMILY, 14).into_font());
        root.draw(&Text::new(
            "predicted",
            (left + cell * cols as i32 / 2, top - 45),
            axis.clone().pos(centre),
        ))
        .map_err(|e| plot_error(out, e))?;
        root.draw(&Text::new(
            "rows: correct option",
            (8, h as i32 - 20),
            axis.clone().pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(|e| plot_error(out, e))?;
        for j in 0..cols {
            let label = if j == n {
                "none".to_string()
            } else {
                letter(j).to_string()
            };
            root.draw(&Text::new(
                label,
                (left + cell * j as i32 + cell / 2, top - 15),
                axis.clone().pos(centre),
            ))
            .map_err(|e| plot_error(out, e))?;
        }
        for (i, row) in c.counts.iter().enumerate() {
            let y = top + cell * i as i32;
            root.draw(&Text::new(
                c.labels[i].clone(),
                (left - 8, y + cell / 2),
                axis.clone().pos(right),
            ))
            .map_err(|e| plot_error(out, e))?;
            let row_total: usize = row.iter().sum();
            for (j, &v) in row.iter().enumerate() {
                let x = left + cell * j as i32;
                let frac = if row_total == 0 {
                    0.0
                } else {
                    v as f64 / row_total as f64
                };
                let shade = |base: u8| (255.0 - (255.0 - base as f64) * frac).round() as u8;
                let fill = if j == n {
                    RGBColor(shade(214), shade(39), shade(40))
                } else {
                    RGBColor(shade(31), shade(119), shade(180))
                };
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    fill.filled(),
                ))
                .map_err(|e| plot_error(out, e))?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    RGBColor(160, 160, 160).stroke_width(1),
                ))
                .map_err(|e| plot_error(out, e))?;
                let ink = if frac > 0.5 { WHITE } else { BLACK };
                root.draw(&Text::new(
                    v.to_string(),
                    (x + cell / 2, y + cell / 2),
                    TextStyle::from((FONT_FAMILY, 14).into_font())
                        .color(&ink)
                        .pos(centre),
                ))
                .map_err(|e| plot_error(out, e))?;
                if i == j {
                    root.draw(&Rectangle::new(
                        [(x + 1, y + 1), (x + cell - 1, y + cell - 1)],
                        BLACK.stroke_width(2),
                    ))
                    .map_err(|e| plot_error(out, e))?;
                }
            }
        }
        root.present().map_err(|e| plot_error(out, e))?;
    }
    write_png(out, &pixels, w, h)
}

/// A file-name-safe form of a key (`confusion-<key>.png`).
pub fn file_stem(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(options: &[&str], answer: char, predicted: Option<char>) -> Prediction {
        Prediction {
            id: "x".into(),
            key: "k".into(),
            image: "x.png".into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            answer,
            predicted,
            raw: None,
            strict: None,
            lenient: None,
            scores: None,
        }
    }

    #[test]
    fn counts_and_labels() {
        let a = p(&["big", "small"], 'A', Some('A'));
        let b = p(&["big", "small"], 'B', None);
        let c = p(&["big", "small"], 'B', Some('A'));
        let m = Confusion::from_predictions("cell_size", &[&a, &b, &c]);
        assert_eq!(m.labels, vec!["A. big", "B. small"]);
        assert_eq!(m.counts, vec![vec![1, 0, 0], vec![1, 0, 1]]);
        let d = p(&["x", "y", "z"], 'C', Some('C'));
        let m = Confusion::from_predictions("k", &[&a, &d]);
        assert_eq!(m.labels, vec!["A", "B", "C"]);
        assert_eq!(m.counts[2][2], 1);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("c.png");
        plot_confusion(&m, "k", &out).unwrap();
        let img = image::open(&out).unwrap();
        assert!(img.width() >= 360);
        assert_eq!(file_stem("mass margins/x"), "mass_margins_x");
    }
}
