//! `lvlm-ift train --config recipe.toml [--set key=value]... [--dry-run] [--resume latest|DIR]`

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::config::TrainConfig;
use crate::train::recipe::{describe_recipe, parse_resume, run_recipe};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The recipe (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Override a recipe value, e.g. `--set optim.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Print the resolved plan of every stage (trainable parameters, steps, memory, a rendered
    /// sample with its loss mask) and stop.
    #[arg(long)]
    dry_run: bool,
    /// Continue: `latest` (skip finished stages, newest checkpoint of the first unfinished one)
    /// or a checkpoint directory.
    #[arg(long)]
    resume: Option<String>,
    /// No progress bar and no plan printout.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let cfg = TrainConfig::load(&args.config, &args.overrides)
        .with_context(|| format!("reading recipe {}", args.config.display()))?;
    if args.dry_run {
        eprint!(
            "{}",
            describe_recipe(&cfg).context("preparing the training run")?
        );
        return Ok(());
    }
    let resume = parse_resume(&cfg, args.resume.as_deref())?;
    let outcomes = run_recipe(&cfg, resume, args.quiet).context("training")?;
    for out in outcomes {
        eprintln!(
            "{}: {} steps, final loss {}, outputs in {}",
            if out.complete { "done" } else { "halted" },
            out.steps,
            out.final_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
            out.output_dir.display()
        );
    }
    Ok(())
}
