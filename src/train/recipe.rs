//! Running a recipe: its stages in order, each in its own output directory, each continuing from
//! the previous one's outputs (adapter, fully trained weights, proxy vectors). A finished stage
//! leaves a `COMPLETE` marker; `--resume` skips finished stages and continues the first
//! unfinished one from its newest (or the given) checkpoint.
//!
//! With several data-parallel ranks every rank runs the recipe; rank 0 alone holds the output
//! lock, writes the resolved recipe, clears leftovers and writes each stage's outputs, and the
//! others wait for it (a barrier) wherever they next read what it wrote.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::Serialize;

use crate::config::{StageSpec, TrainConfig};
use crate::error::{Error, Result};
use crate::train::checkpoint::{resolve_resume, write_atomic, CheckpointManager};
use crate::train::distributed::{Collective, Solo};
use crate::train::lock::OutputLock;
use crate::train::metrics::{plot_loss, MetricsLog};
use crate::train::plan::TrainPlan;
use crate::train::trainer::{TrainOutcome, Trainer};

const COMPLETE: &str = "COMPLETE";

/// How to continue a recipe.
#[derive(Debug, Clone)]
pub enum Resume {
    /// Start from scratch (finished stages are re-run).
    No,
    /// Skip finished stages; continue the first unfinished one from its newest checkpoint.
    Latest,
    /// Continue from this checkpoint directory (of some stage); earlier stages must be finished.
    Checkpoint(PathBuf),
}

#[derive(Serialize)]
struct StageSummary<'a> {
    stage: &'a str,
    steps: u64,
    final_loss: Option<f64>,
}

/// Print every stage's plan (from each model's `config.json`; no weight is read, nothing trained)
/// for a run of `world_size` data-parallel ranks.
pub fn describe_recipe(cfg: &TrainConfig, world_size: usize) -> Result<String> {
    let mut out = String::new();
    let stages = cfg.stage_specs();
    for (i, stage) in stages.iter().enumerate() {
        // A later stage's inputs do not exist before a run: plan it from the base model.
        let previous = i
            .checked_sub(1)
            .map(|j| stages[j].output_dir.clone())
            .filter(|p| p.join(COMPLETE).is_file());
        out.push_str(&format!("== stage {}/{}\n", i + 1, stages.len()));
        out.push_str(
            &TrainPlan::build_for_dry_run(cfg, stage, previous.as_deref(), world_size)?
                .describe()?,
        );
    }
    Ok(out)
}

/// Run the recipe alone; returns the outcome of every stage that ran.
pub fn run_recipe(cfg: &TrainConfig, resume: Resume, quiet: bool) -> Result<Vec<TrainOutcome>> {
    run_recipe_on(cfg, resume, quiet, Rc::new(Solo))
}

/// Run the recipe as one rank of `collective` (every rank calls this with the same recipe).
pub fn run_recipe_on(
    cfg: &TrainConfig,
    resume: Resume,
    quiet: bool,
    collective: Rc<dyn Collective>,
) -> Result<Vec<TrainOutcome>> {
    let rank0 = collective.rank() == 0;
    let _lock = if rank0 {
        Some(prepare_output(cfg)?)
    } else {
        None
    };
    collective.barrier()?;
    let outcomes = run_stages(cfg, resume, quiet || !rank0, &collective, rank0);
    if outcomes.is_ok() {
        // The others return only once rank 0 has written everything.
        collective.barrier()?;
    }
    outcomes
}

/// Rank 0 before any stage: take the output lock (held until the recipe returns: a second run
/// into this directory fails naming this one), write the resolved recipe, clear what a killed
/// run left.
fn prepare_output(cfg: &TrainConfig) -> Result<OutputLock> {
    let lock = OutputLock::acquire(&cfg.train.output_dir)?;
    let resolved = toml::to_string_pretty(cfg)
        .map_err(|e| Error::Model(format!("cannot serialise the recipe: {e}")))?;
    write_atomic(
        &cfg.train.output_dir.join("config.toml"),
        resolved.as_bytes(),
    )?;
    // Holding the lock, what a killed run left (half-written checkpoints, prunes, temp files)
    // is ours to clear, before `--resume latest` looks for the newest checkpoint.
    for stage in &cfg.stage_specs() {
        let checkpoints = CheckpointManager::new(&stage.output_dir.join("checkpoints"), None);
        for path in checkpoints
            .clean_stale()?
            .into_iter()
            .chain(clean_stale_outputs(&stage.output_dir)?)
        {
            tracing::info!(
                "cleared the leftover {} of an interrupted run",
                path.display()
            );
        }
    }
    Ok(lock)
}

fn run_stages(
    cfg: &TrainConfig,
    resume: Resume,
    quiet: bool,
    collective: &Rc<dyn Collective>,
    rank0: bool,
) -> Result<Vec<TrainOutcome>> {
    let stages = cfg.stage_specs();
    let explicit = match &resume {
        Resume::Checkpoint(dir) => Some(stage_of_checkpoint(&stages, dir)?),
        _ => None,
    };
    let mut outcomes = Vec::new();
    let mut previous: Option<PathBuf> = None;
    for (i, stage) in stages.iter().enumerate() {
        let done = stage.output_dir.join(COMPLETE).is_file();
        let from: Option<PathBuf> = match (&resume, explicit) {
            (Resume::No, _) => None,
            (Resume::Latest, _) if done => {
                tracing::info!("stage {} already complete, skipping", stage.name);
                previous = Some(stage.output_dir.clone());
                continue;
            }
            (Resume::Latest, _) => {
                CheckpointManager::new(&stage.output_dir.join("checkpoints"), None).latest()?
            }
            (Resume::Checkpoint(dir), Some(k)) if i < k => {
                if !done {
                    return Err(Error::Model(format!(
                        "cannot resume stage `{}` from {}: the earlier stage `{}` is not complete",
                        stages[k].name,
                        dir.display(),
                        stage.name
                    )));
                }
                previous = Some(stage.output_dir.clone());
                continue;
            }
            (Resume::Checkpoint(dir), Some(k)) if i == k => Some(dir.clone()),
            _ => None,
        };
        if from.is_none() && rank0 {
            // A fresh start of this stage must not inherit a stale completion marker.
            let marker = stage.output_dir.join(COMPLETE);
            if marker.exists() {
                std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
            }
        }
        let plan =
            TrainPlan::build_for_world(cfg, stage, previous.as_deref(), collective.world_size())?;
        if !quiet {
            eprint!("== stage {}/{}\n{}", i + 1, stages.len(), plan.describe()?);
        }
        let outcome =
            Trainer::with_collective(plan, collective.clone())?.run(from.as_deref(), quiet)?;
        let halted = !outcome.complete;
        if !halted && rank0 {
            let summary = StageSummary {
                stage: &stage.name,
                steps: outcome.steps,
                final_loss: outcome.final_loss,
            };
            let json = serde_json::to_string_pretty(&summary)
                .map_err(|e| Error::json(stage.output_dir.join(COMPLETE), e))?;
            write_atomic(&stage.output_dir.join(COMPLETE), json.as_bytes())?;
        }
        // The next stage (on every rank) starts from the outputs rank 0 has just written.
        collective.barrier()?;
        previous = Some(stage.output_dir.clone());
        outcomes.push(outcome);
        if halted {
            break;
        }
    }
    if stages.len() > 1 && rank0 {
        let mut all = Vec::new();
        for s in &stages {
            let path = s.output_dir.join("metrics.jsonl");
            if path.is_file() {
                all.extend(MetricsLog::read_all(&path)?);
            }
        }
        if !all.is_empty() {
            plot_loss(
                &all,
                &cfg.train.output_dir.join("loss.png"),
                "training loss (all stages)",
            )?;
        }
    }
    Ok(outcomes)
}

/// Temp files and directories of interrupted atomic writes in a stage's output directory
/// (`.name.tmp-*` files, `.tmp-*` / `.old-*` directories of the adapter): each stage rewrites
/// every output at its end, so none of them is needed.
fn clean_stale_outputs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let is_dir = path.is_dir();
        let stale_dir = is_dir && (name.starts_with(".tmp-") || name.starts_with(".old-"));
        let stale_file = !is_dir && name.starts_with('.') && name.contains(".tmp-");
        if stale_dir {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
            removed.push(path);
        } else if stale_file {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// `--resume DIR`: which stage's checkpoints directory holds DIR.
fn stage_of_checkpoint(stages: &[StageSpec], dir: &Path) -> Result<usize> {
    let dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    for (i, s) in stages.iter().enumerate() {
        if let Ok(root) = s.output_dir.join("checkpoints").canonicalize() {
            if dir.parent() == Some(root.as_path()) {
                return Ok(i);
            }
        }
    }
    Err(Error::Model(format!(
        "{} is not a checkpoint of any stage of this recipe (expected <output_dir>/<stage>/checkpoints/checkpoint-N)",
        dir.display()
    )))
}

/// `--resume` argument: `latest` or a checkpoint directory.
pub fn parse_resume(cfg: &TrainConfig, spec: Option<&str>) -> Result<Resume> {
    Ok(match spec {
        None => Resume::No,
        Some("latest") => Resume::Latest,
        Some(path) => {
            // Relative names like `checkpoint-40` are looked up under the first stage too.
            let first = cfg.stage_specs()[0].output_dir.join("checkpoints");
            Resume::Checkpoint(resolve_resume(&first, path)?)
        }
    })
}
