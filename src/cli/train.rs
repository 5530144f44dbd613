//! `lvlm-ift train --config recipe.toml [--set key=value]... [--dry-run] [--resume latest|DIR]
//! [--devices 0,1,…]`
//!
//! Under a launcher (torchrun, Slurm, or `--devices`, which starts one process per GPU) each
//! process is one data-parallel rank: it reads its place from the environment and joins the
//! others over NCCL.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::launch;
use crate::config::TrainConfig;
use crate::train::distributed::{join, World};
use crate::train::recipe::{describe_recipe, parse_resume, run_recipe, run_recipe_on};

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
    /// Train data-parallel on these GPUs of this machine (e.g. `0,1,2,3`): one process per GPU,
    /// gradients summed over NCCL, each step's batch `train.batch_size` per GPU. Across
    /// machines, start one process per GPU with torchrun's or Slurm's variables instead.
    #[arg(long, value_name = "GPUS")]
    devices: Option<String>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let cfg = TrainConfig::load(&args.config, &args.overrides)
        .with_context(|| format!("reading recipe {}", args.config.display()))?;
    let devices = args
        .devices
        .as_deref()
        .map(launch::parse_devices)
        .transpose()?;
    let world = World::from_env().context("reading the launcher's environment")?;
    if args.dry_run {
        let ranks = devices.as_ref().map_or(world.world_size, Vec::len);
        eprint!(
            "{}",
            describe_recipe(&cfg, ranks).context("preparing the training run")?
        );
        return Ok(());
    }
    if let Some(devices) = devices {
        return launch::launch(&devices);
    }
    let resume = parse_resume(&cfg, args.resume.as_deref())?;
    let outcomes = if world.is_single() {
        run_recipe(&cfg, resume, args.quiet).context("training")?
    } else {
        let mut cfg = cfg;
        let (device, collective) = join(&world, &cfg.model.device).with_context(|| {
            format!(
                "joining the run as rank {} of {}",
                world.rank, world.world_size
            )
        })?;
        cfg.model.device = device;
        let outcomes = run_recipe_on(&cfg, resume, args.quiet, collective)
            .with_context(|| format!("training (rank {} of {})", world.rank, world.world_size))?;
        if world.rank != 0 {
            return Ok(());
        }
        outcomes
    };
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
