//! Training metrics: a crash-safe JSONL log, a terminal progress bar, and a loss-curve PNG.
//!
//! Non-finite numbers (a diverged loss, say) are written to `metrics.jsonl` as `null`, which JSON
//! readers (Python's `json`, pandas) accept, and read back as NaN.

use crate::plot::{register_font, write_png, FONT_FAMILY};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::train::checkpoint::write_atomic;

/// Serde for f64 fields: non-finite values as `null`, `null` read back as NaN.
mod finite_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// One optimizer step's metrics: one line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub stage: String,
    pub step: u64,
    #[serde(with = "finite_or_null")]
    pub epoch: f64,
    #[serde(with = "finite_or_null")]
    pub loss: f64,
    #[serde(with = "finite_or_null")]
    pub lr: f64,
    #[serde(with = "finite_or_null")]
    pub grad_norm: f64,
    #[serde(with = "finite_or_null")]
    pub tokens_per_sec: f64,
    #[serde(with = "finite_or_null")]
    pub elapsed_sec: f64,
    /// Wall seconds of this step alone (data wait, forward, backward, optimizer; not the
    /// checkpoint written after it): what benchmarks take their median of.
    #[serde(default)]
    pub step_sec: f64,
    /// Seconds the step waited for its data (prefetching should keep this near zero).
    #[serde(default)]
    pub data_wait_sec: f64,
    /// Steps of the stage so far dropped for a non-finite loss or gradient
    /// (`train.on_nonfinite = "skip"`); a skipped step's loss is `null`.
    #[serde(default)]
    pub skipped_nonfinite: u64,
}

/// A JSON error for `line` of a file, with the line number of the file rather than of the line.
fn line_error(path: &Path, line: usize, e: serde_json::Error) -> Error {
    let msg = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    let base = msg.strip_suffix(&position).unwrap_or(&msg);
    let located = <serde_json::Error as serde::de::Error>::custom(format!(
        "line {line}, column {}: {base}",
        e.column()
    ));
    Error::json(path, located)
}

/// Appends one JSON object per line to metrics.jsonl and flushes each line (a crash loses nothing
/// written).
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Open `path` for appending, creating its parent directory if needed.
    ///
    /// `resume_step = None` starts fresh (the file is truncated). `Some((stage, step))` keeps the
    /// file's lines up to the first line of `stage` with a step above `step`, dropping that line
    /// and everything after it (lines written after it belong to the abandoned run), so a resumed
    /// run does not duplicate steps. A torn last line (no newline, not valid JSON: a crash
    /// mid-write) is dropped; any other unparsable line is an error naming the file and line. The
    /// kept prefix is rewritten atomically.
    pub fn open(path: &Path, resume_step: Option<(String, u64)>) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let kept = match resume_step {
            None => String::new(),
            Some((stage, step)) => match fs::read_to_string(path) {
                Ok(content) => truncate_for_resume(path, &content, &stage, step)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(Error::io(path, e)),
            },
        };
        write_atomic(path, kept.as_bytes())?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `m` as one line, written with a single `write` call and flushed.
    pub fn write(&mut self, m: &StepMetrics) -> Result<()> {
        let mut line = serde_json::to_string(m).map_err(|e| Error::json(&self.path, e))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Every line of a metrics file (blank lines skipped). Errors name the file and the line.
    pub fn read_all(path: &Path) -> Result<Vec<StepMetrics>> {
        let content = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        content
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| line_error(path, i + 1, e)))
            .collect()
    }
}

/// The lines of `content` to keep when resuming `stage` at `step` (see [`MetricsLog::open`]).
fn truncate_for_resume(path: &Path, content: &str, stage: &str, step: u64) -> Result<String> {
    let mut kept = String::with_capacity(content.len());
    let lines: Vec<&str> = content.split_inclusive('\n').collect();
    for (i, raw) in lines.iter().enumerate() {
        let line = raw.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<StepMetrics>(line) {
            Ok(m) if m.stage == stage && m.step > step => break,
            Ok(_) => {
                kept.push_str(line);
                kept.push('\n');
            }
            Err(_) if i + 1 == lines.len() && !raw.ends_with('\n') => {
                tracing::warn!(
                    "{}: dropping torn last line {} (a crash mid-write)",
                    path.display(),
                    i + 1
                );
            }
            Err(e) => return Err(line_error(path, i + 1, e)),
        }
    }
    Ok(kept)
}

/// indicatif bar: `{stage} [bar] step/total loss=.. lr=.. tok/s=.. ETA`; hidden when stderr is
/// not a terminal or when `quiet`.
#[derive(Debug, Clone)]
pub struct TrainProgress {
    bar: ProgressBar,
}

impl TrainProgress {
    /// `start_step`: where a resumed run starts; the ETA counts only steps taken from there.
    pub fn new(stage: &str, total_steps: u64, start_step: u64, quiet: bool) -> Self {
        let target = if quiet || !io::stderr().is_terminal() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(Some(total_steps), target);
        let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(stage.to_string());
        bar.set_position(start_step);
        bar.reset_eta();
        Self { bar }
    }

    pub fn update(&self, m: &StepMetrics) {
        self.bar.set_position(m.step);
        self.bar.set_message(format!(
            "loss={:.4} lr={:.2e} tok/s={:.0}",
            m.loss, m.lr, m.tokens_per_sec
        ));
    }

    /// Leaves the final state on screen.
    pub fn finish(&self) {
        self.bar.finish();
    }

    /// Whether the bar draws nothing (quiet, or stderr is not a terminal).
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Run `f` (e.g. printing a log line) with the bar cleared, then redraw it.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }
}

/// Loss-plot size in pixels.
const PLOT_SIZE: (u32, u32) = (800, 500);
/// matplotlib's tab10, so curves look like the Python reference's.
const PALETTE: [plotters::style::RGBColor; 8] = {
    use plotters::style::RGBColor;
    [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ]
};

fn plot_error(out: &Path, what: impl std::fmt::Display) -> Error {
    Error::io(
        out,
        io::Error::other(format!("cannot draw loss plot: {what}")),
    )
}

fn ensure_font(out: &Path) -> Result<()> {
    if register_font() {
        Ok(())
    } else {
        Err(plot_error(out, "the embedded font is invalid"))
    }
}

/// A range around `[lo, hi]` with a little margin, never empty.
fn padded(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    let span = hi - lo;
    let pad = if span > 0.0 && span.is_finite() {
        span * frac
    } else {
        (hi.abs() * 0.1).max(1e-3)
    };
    let (a, b) = (lo - pad, hi + pad);
    if a.is_finite() && b.is_finite() && a < b {
        (a, b)
    } else if hi > lo {
        (lo, hi)
    } else {
        (lo - 1.0, lo + 1.0)
    }
}

/// A short tick label: plain decimals with trailing zeros trimmed, scientific when extreme.
fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    if v.abs() >= 1e5 || v.abs() < 1e-3 {
        return format!("{v:.2e}");
    }
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Loss curve PNG (x = step, y = loss; one line per stage in order of first appearance, legend,
/// axis labels, title), 800x500, written atomically.
///
/// Non-finite losses are skipped and counted in the title ("… (3 non-finite losses skipped)").
/// With no finite point at all an empty chart titled "… (no data)" is written rather than an
/// error, so a run that logged nothing can still finish; a single point is drawn as a marker.
pub fn plot_loss(metrics: &[StepMetrics], out: &Path, title: &str) -> Result<()> {
    use plotters::prelude::*;

    ensure_font(out)?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut skipped = 0usize;
    for m in metrics {
        if !m.loss.is_finite() {
            skipped += 1;
            continue;
        }
        let i = *index.entry(m.stage.as_str()).or_insert_with(|| {
            series.push((m.stage.clone(), Vec::new()));
            series.len() - 1
        });
        series[i].1.push((m.step as f64, m.loss));
    }
    for (_, points) in &mut series {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let all = || series.iter().flat_map(|(_, p)| p.iter());
    let caption = if all().next().is_none() {
        format!("{title} (no data)")
    } else if skipped > 0 {
        let s = if skipped == 1 { "" } else { "es" };
        format!("{title} ({skipped} non-finite loss{s} skipped)")
    } else {
        title.to_string()
    };
    let ((x0, x1), (y0, y1)) = if all().next().is_none() {
        ((0.0, 1.0), (0.0, 1.0))
    } else {
        let fold = |f: fn(&(f64, f64)) -> f64| {
            all()
                .map(f)
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(v), hi.max(v))
                })
        };
        let (xl, xh) = fold(|p| p.0);
        let (yl, yh) = fold(|p| p.1);
        let x = if xh > xl {
            (xl, xh)
        } else {
            (xl - 1.0, xh + 1.0)
        };
        (x, padded(yl, yh, 0.05))
    };

    let (w, h) = PLOT_SIZE;
    let mut pixels = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(out, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, (FONT_FAMILY, 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| plot_error(out, e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style((FONT_FAMILY, 14))
            .axis_desc_style((FONT_FAMILY, 16))
            // Steps are integers: label only integral ticks.
            .x_label_formatter(&|x| {
                if x.fract() != 0.0 {
                    String::new()
                } else if x.abs() >= 1e7 {
                    format!("{x:.1e}")
                } else {
                    format!("{x:.0}")
                }
            })
            .y_label_formatter(&|y| tick_label(*y))
            .light_line_style(TRANSPARENT)
            .draw()
            .map_err(|e| plot_error(out, e))?;
        for (i, (stage, points)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| plot_error(out, e))?
                .label(stage.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            if points.len() == 1 {
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| plot_error(out, e))?;
            }
        }
        if !series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font((FONT_FAMILY, 14))
                .draw()
                .map_err(|e| plot_error(out, e))?;
        }
        root.present().map_err(|e| plot_error(out, e))?;
    }

    write_png(out, &pixels, w, h)
}

#[cfg(test)]
mod tests;
