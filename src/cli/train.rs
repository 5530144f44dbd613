//! `lvlm-ift train --config recipe.toml [--set key=value]... [--dry-run] [--resume latest|DIR]`

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::config::TrainConfig;
use crate::train::checkpoint::resolve_resume;
use crate::train::trainer::TrainPlan;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The recipe (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Override a recipe value, e.g. `--set optim.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Print the resolved plan (trainable parameters, steps, memory, a rendered sample) and stop.
    #[arg(long)]
    dry_run: bool,
    /// Continue from a checkpoint: `latest` (newest under the output dir) or a checkpoint directory.
    #[arg(long)]
    resume: Option<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let cfg = TrainConfig::load(&args.config, &args.overrides)
        .with_context(|| format!("reading recipe {}", args.config.display()))?;
    let plan = TrainPlan::build(cfg).context("preparing the training run")?;
    eprint!("{}", plan.describe()?);
    if args.dry_run {
        return Ok(());
    }
    let resume = match &args.resume {
        Some(spec) => Some(resolve_resume(
            &plan.cfg.train.output_dir.join("checkpoints"),
            spec,
        )?),
        None => None,
    };
    let out = plan.run(resume.as_deref(), args.quiet)?;
    eprintln!(
        "done: {} steps, final loss {}, outputs in {}",
        out.steps,
        out.final_loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or_else(|| "-".into()),
        out.output_dir.display()
    );
    Ok(())
}
