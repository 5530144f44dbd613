//! `lvlm-ift prepare --benchmark B --source DIR --out DIR [--image-cache PX]
//! [--mimic-uncertain exclude|negative|positive] [--mimic-yes-no] [--skincon-index-as-concept]`: turn
//! a benchmark's released label files into training pairs and MCQ sets (layout:
//! `crate::bench::prepare`). The `--mimic-*` and `--skincon-*` flags apply to their benchmark only;
//! with another one they are an error.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::bench::mimic_cxr::{MimicOptions, Uncertain};
use crate::bench::prepare::{PrepareOptions, PrepareSummary};
use crate::bench::skincon::SkinconOptions;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Benchmark {
    Wbcatt,
    Cbis,
    Skincon,
    MimicCxr,
}

/// `--mimic-uncertain`: what an uncertain (`-1.0`) CheXpert label means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MimicUncertain {
    /// No `findings` question for the study, no yes/no question for that finding (default).
    Exclude,
    /// Uncertain = negative.
    Negative,
    /// Uncertain = positive.
    Positive,
}

impl From<MimicUncertain> for Uncertain {
    fn from(u: MimicUncertain) -> Self {
        match u {
            MimicUncertain::Exclude => Uncertain::ExcludeFromQuestions,
            MimicUncertain::Negative => Uncertain::Negative,
            MimicUncertain::Positive => Uncertain::Positive,
        }
    }
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Which benchmark's released files `--source` holds.
    #[arg(long, value_enum)]
    benchmark: Benchmark,
    /// Directory with the released label files (and images). skincon: the release's names
    /// (annotations_fitzpatrick17k.csv, images/) or the reference's (fitzpatrick17k_anno.csv,
    /// fitzpatrick17k/).
    #[arg(long)]
    source: PathBuf,
    /// Output directory: train.jsonl, val.jsonl, mcq_val.jsonl, mcq_test.jsonl, summary.json.
    #[arg(long)]
    out: PathBuf,
    /// Also write letterboxed PX×PX copies of the images to OUT/images/ and point the outputs at
    /// them (METHOD uses 560).
    #[arg(long, value_name = "PX", value_parser = clap::value_parser!(u32).range(1..=8192))]
    image_cache: Option<u32>,
    /// mimic-cxr only: what an uncertain (-1.0) CheXpert label means [default: exclude].
    #[arg(long, value_enum, value_name = "POLICY")]
    mimic_uncertain: Option<MimicUncertain>,
    /// mimic-cxr only: also ask one yes/no question per CheXpert finding of each val/test study
    /// (key "presence of {finding}").
    #[arg(long)]
    mimic_yes_no: bool,
    /// skincon only: read the annotation file's leading index column as a concept `unnamed: 0`,
    /// as the reference did, to reproduce its descriptions, pool and options exactly.
    #[arg(long)]
    skincon_index_as_concept: bool,
}

/// The value name of a benchmark as typed on the command line.
fn benchmark_name(b: Benchmark) -> String {
    b.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| format!("{b:?}"))
}

/// An error naming the first benchmark-specific flag given for another benchmark.
fn refuse_foreign_flags(args: &PrepareArgs) -> anyhow::Result<()> {
    let given = [
        (
            Benchmark::MimicCxr,
            "--mimic-uncertain",
            args.mimic_uncertain.is_some(),
        ),
        (Benchmark::MimicCxr, "--mimic-yes-no", args.mimic_yes_no),
        (
            Benchmark::Skincon,
            "--skincon-index-as-concept",
            args.skincon_index_as_concept,
        ),
    ];
    if let Some((owner, flag, _)) = given
        .iter()
        .find(|(owner, _, on)| *on && *owner != args.benchmark)
    {
        anyhow::bail!(
            "{flag} applies only to --benchmark {}, not --benchmark {}; drop it",
            benchmark_name(*owner),
            benchmark_name(args.benchmark)
        );
    }
    Ok(())
}

/// The MIMIC settings from the flags.
fn mimic_options(args: &PrepareArgs) -> MimicOptions {
    MimicOptions {
        uncertain: args
            .mimic_uncertain
            .map(Uncertain::from)
            .unwrap_or_default(),
        yes_no: args.mimic_yes_no,
    }
}

pub fn run(args: PrepareArgs) -> anyhow::Result<()> {
    refuse_foreign_flags(&args)?;
    let mimic = mimic_options(&args);
    let skin = SkinconOptions {
        index_as_concept: args.skincon_index_as_concept,
    };
    let opts = PrepareOptions {
        image_cache: args.image_cache,
    };
    let start = Instant::now();
    let (src, out) = (args.source.as_path(), args.out.as_path());
    let summary = match args.benchmark {
        Benchmark::Cbis => crate::bench::cbis::prepare(src, out, &opts),
        Benchmark::MimicCxr => crate::bench::mimic_cxr::prepare_with(src, out, &opts, &mimic),
        Benchmark::Wbcatt => crate::bench::wbcatt::prepare(src, out, &opts),
        Benchmark::Skincon => crate::bench::skincon::prepare_with(src, out, &opts, &skin),
    }
    .with_context(|| {
        format!(
            "preparing {:?} from {} into {}",
            args.benchmark,
            src.display(),
            out.display()
        )
    })?;
    eprint!("{}", render(&summary));
    eprintln!(
        "wrote {} in {:.2}s",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The summary as printed: pairs and items per split, items per key, option-count histogram,
/// skipped rows (first 20 listed).
pub fn render(s: &PrepareSummary) -> String {
    let mut o = format!("benchmark {}\n", s.benchmark);
    if let Some(layout) = &s.layout {
        o.push_str(&format!("  source layout: {layout}\n"));
    }
    for (split, n) in &s.pairs {
        o.push_str(&format!("  pairs {split}: {n}\n"));
    }
    for (split, n) in &s.items {
        o.push_str(&format!("  mcq {split}: {n} item(s)\n"));
        if let Some(keys) = s.items_per_key.get(split) {
            for (k, c) in keys {
                o.push_str(&format!("    {k}: {c}\n"));
            }
        }
        if let Some(h) = s.option_counts.get(split) {
            let hist: Vec<String> = h.iter().map(|(k, c)| format!("{k} options x{c}")).collect();
            o.push_str(&format!("    {}\n", hist.join(", ")));
        }
    }
    o.push_str(&format!("  skipped: {}\n", s.skipped.len()));
    for sk in s.skipped.iter().take(20) {
        o.push_str(&format!("    {}: {}\n", sk.source, sk.reason));
    }
    if s.skipped.len() > 20 {
        o.push_str(&format!(
            "    ... {} more in summary.json\n",
            s.skipped.len() - 20
        ));
    }
    o
}
