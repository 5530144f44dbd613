//! `lvlm-ift eval`: multiple-choice VQA evaluation on a prepared benchmark.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use super::common::ModelArgs;
use crate::eval::mcq::read_items;
use crate::eval::run::{evaluate, find_model_states, EvalOptions, Scoring};
use crate::train::checkpoint::write_atomic;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BenchmarkArg {
    Wbcatt,
    Cbis,
    Skincon,
    #[value(name = "mimic-cxr")]
    MimicCxr,
}

impl BenchmarkArg {
    fn name(self) -> &'static str {
        match self {
            BenchmarkArg::Wbcatt => "wbcatt",
            BenchmarkArg::Cbis => "cbis",
            BenchmarkArg::Skincon => "skincon",
            BenchmarkArg::MimicCxr => "mimic-cxr",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SplitArg {
    Val,
    Test,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScoringArg {
    /// Greedy generation (max 50 new tokens), strict parse (the metric) and lenient parse.
    Generate,
    /// Argmax over options of log P("The correct answer is X." | prompt).
    Likelihood,
    /// Argmax over options of log P(option text | prompt) / its length in bytes.
    LikelihoodText,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Outputs in --out: predictions.jsonl (one prediction per item), report.json \
(accuracy overall and per key with 95% Wilson intervals, majority-class and uniform baselines) and \
confusion-<key>.png.\n\n--checkpoints RUN_DIR evaluates every trained state found recursively under \
RUN_DIR — each training checkpoint (checkpoints/checkpoint-N: its adapter/ and trainable.safetensors) and \
each stage's final outputs (adapter/, full_weights.safetensors) — each into OUT/<its path relative to \
RUN_DIR>/, and writes OUT/checkpoints.json: the reference's \"evaluate every epoch\" in one command."
)]
pub struct EvalArgs {
    /// Which benchmark the items come from (recorded in the report).
    #[arg(long, value_enum)]
    benchmark: BenchmarkArg,
    /// Directory `prepare` wrote (holds mcq_val.jsonl / mcq_test.jsonl; relative image paths are
    /// resolved against it).
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_enum, default_value = "test")]
    split: SplitArg,
    #[arg(long, value_enum, default_value = "generate")]
    scoring: ScoringArg,
    /// Evaluate only the first N items.
    #[arg(long)]
    limit: Option<usize>,
    /// Items predicted together: items about one image share its features and prompt prefix, and
    /// a batch decodes together (one weight read per generated position for all its items).
    /// Answers are those of item-by-item evaluation up to float rounding; 1 turns batching off.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Output directory [default: DATA/eval-<split>-<scoring>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the predictions already in OUT/predictions.jsonl and evaluate only the missing items;
    /// refused unless OUT/run.json shows they were made with the same model, adapter and full
    /// weights (by content), scoring, split, benchmark, dtype and image aspect.
    #[arg(long)]
    resume: bool,
    /// Evaluate every checkpoint and stage output under RUN_DIR (see below); conflicts with --adapter.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["adapter", "full_weights"])]
    checkpoints: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

fn split_name(s: SplitArg) -> &'static str {
    match s {
        SplitArg::Val => "val",
        SplitArg::Test => "test",
    }
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let split = split_name(args.split);
    let scoring = match args.scoring {
        ScoringArg::Generate => Scoring::Generate,
        ScoringArg::Likelihood => Scoring::Likelihood,
        ScoringArg::LikelihoodText => Scoring::LikelihoodText,
    };
    let items_file = args.data.join(format!("mcq_{split}.jsonl"));
    let mut items = read_items(&items_file)
        .with_context(|| format!("reading MCQ items {}", items_file.display()))?;
    if let Some(n) = args.limit {
        items.truncate(n);
    }
    if items.is_empty() {
        bail!("no items to evaluate (--limit 0?)");
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.data.join(format!("eval-{split}-{}", scoring.name())));
    let name = |v: Option<clap::builder::PossibleValue>| {
        v.map(|p| p.get_name().to_string()).unwrap_or_default()
    };
    let dtype = name(args.model.dtype.to_possible_value());
    let image_aspect = name(args.model.image_aspect.to_possible_value());
    let opts = |adapter: Option<&Path>, full_weights: Option<&Path>| EvalOptions {
        benchmark: args.benchmark.name().to_string(),
        split: split.to_string(),
        scoring,
        model: args.model.model.clone(),
        adapter: adapter.map(|a| a.display().to_string()),
        full_weights: full_weights.map(|f| f.display().to_string()),
        dtype: dtype.clone(),
        image_aspect: image_aspect.clone(),
        max_image_tiles: args.model.max_image_tiles.map(|n| n as usize),
        batch_size: args.batch_size as usize,
        resume: args.resume,
        quiet: args.quiet,
    };

    let Some(run_dir) = &args.checkpoints else {
        let session = args.model.load()?;
        let report = evaluate(
            &session,
            &items,
            &items_file,
            &args.data,
            &out,
            &opts(
                args.model.adapter.as_deref(),
                args.model.full_weights.as_deref(),
            ),
        )?;
        print_summary(&report, &out);
        return Ok(());
    };

    let states = find_model_states(run_dir)?;
    if states.is_empty() {
        bail!(
            "no trained state (adapter/, full_weights.safetensors or trainable.safetensors) under {}",
            run_dir.display()
        );
    }
    let mut summary = Vec::new();
    for state in &states {
        let dir = &state.dir;
        let rel = dir.strip_prefix(run_dir).unwrap_or(dir);
        let sub = out.join(rel);
        let model = ModelArgs {
            model: args.model.model.clone(),
            dtype: args.model.dtype,
            device: args.model.device.clone(),
            image_aspect: args.model.image_aspect,
            max_image_tiles: args.model.max_image_tiles,
            adapter: state.adapter.clone(),
            full_weights: state.full_weights.clone(),
            vision_cache: args.model.vision_cache.clone(),
            vision_cache_gib: args.model.vision_cache_gib,
        };
        let session = model.load()?;
        let report = evaluate(
            &session,
            &items,
            &items_file,
            &args.data,
            &sub,
            &opts(state.adapter.as_deref(), state.full_weights.as_deref()),
        )
        .with_context(|| format!("evaluating {}", dir.display()))?;
        print_summary(&report, &sub);
        summary.push(serde_json::json!({
            "checkpoint": rel.display().to_string(),
            "adapter": state.adapter.as_ref().map(|a| a.display().to_string()),
            "full_weights": state.full_weights.as_ref().map(|f| f.display().to_string()),
            "out": sub.display().to_string(),
            "n_items": report.overall.n_items,
            "accuracy": report.overall.accuracy,
            "lenient_accuracy": report.overall.lenient_accuracy,
        }));
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_vec_pretty(&serde_json::json!({
        "benchmark": args.benchmark.name(),
        "split": split,
        "scoring": scoring.name(),
        "model": args.model.model,
        "run_dir": run_dir.display().to_string(),
        "checkpoints": summary,
    }))?;
    write_atomic(&out.join("checkpoints.json"), &json)?;
    println!("wrote {}", out.join("checkpoints.json").display());
    Ok(())
}

fn print_summary(r: &crate::eval::report::Report, out: &Path) {
    let a = &r.overall.accuracy;
    print!(
        "{} {} {}: accuracy {:.4} [{:.4}, {:.4}] ({}/{})",
        r.benchmark,
        r.split,
        r.scoring.name(),
        a.accuracy,
        a.ci95_low,
        a.ci95_high,
        a.correct,
        a.n
    );
    if let Some(l) = &r.overall.lenient_accuracy {
        print!(", lenient {:.4}", l.accuracy);
    }
    println!(
        "; majority {:.4}, uniform {:.4}; {:.2} items/s; {}",
        r.overall.majority_baseline,
        r.overall.uniform_baseline,
        r.items_per_sec,
        out.display()
    );
}
