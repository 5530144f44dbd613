//! Checks of a stage against the model it loads, before anything is sized from the recipe's
//! numbers: sequence lengths within `max_position_embeddings`, every trainable choice training
//! something, and recipe-keyed errors for what the model bounds.

use std::collections::BTreeMap;

use super::{StageLora, TrainPlan};
use crate::config::{InstructionMode, StageSpec, TrainConfig};
use crate::error::{Error, Result};
use crate::model::family::LinearModule;
use crate::model::lora::TargetModules;
use crate::model::ModelLayout;

/// The recipe key that set a stage's epochs, for error messages.
pub(super) fn epochs_key(cfg: &TrainConfig, stage: &StageSpec) -> String {
    cfg.stages
        .iter()
        .position(|s| s.name == stage.name && s.epochs.is_some())
        .map(|i| format!("stages[{i}].epochs"))
        .unwrap_or_else(|| "train.epochs".into())
}

/// Lengths the model bounds, checked before anything is sized from them: the proxy vectors and
/// `data.max_len` must fit `max_position_embeddings` next to the image tokens.
pub(super) fn check_sequence_bounds(
    cfg: &TrainConfig,
    stage: &StageSpec,
    layout: &ModelLayout,
) -> Result<()> {
    let (max_positions, image_tokens) = (layout.max_positions, layout.num_image_tokens);
    let bad = |key: &str, reason: String| Error::Config {
        path: cfg.source.clone(),
        key: key.into(),
        reason,
    };
    if let Some(n) = cfg.data.max_len {
        if n > max_positions {
            return Err(bad(
                "data.max_len",
                format!(
                    "{n} exceeds the model's max_position_embeddings ({max_positions}, {})",
                    layout.config_path().display()
                ),
            ));
        }
    }
    if stage.instruction_mode == InstructionMode::Proxy
        && cfg.proxy.tokens + image_tokens >= max_positions
    {
        return Err(bad(
            "proxy.tokens",
            format!(
                "{} proxy vectors and {image_tokens} image tokens leave no room for text within \
                 the model's max_position_embeddings ({max_positions})",
                cfg.proxy.tokens
            ),
        ));
    }
    Ok(())
}

/// `lora.r` at most min(in, out) of every adapted layer, checked before any LoRA tensor is
/// allocated (a rank above it adds nothing but memory).
pub(super) fn check_lora_ranks(
    cfg: &TrainConfig,
    lora: &StageLora,
    modules: &BTreeMap<String, LinearModule>,
) -> Result<()> {
    let r = lora.spec.r;
    let Some((module, m)) = modules.iter().find(|(_, m)| r > m.in_dim.min(m.out_dim)) else {
        return Ok(());
    };
    let reason = format!(
        "r = {r} exceeds the rank of `{module}` ({}x{}); at most {}",
        m.out_dim,
        m.in_dim,
        m.in_dim.min(m.out_dim)
    );
    Err(match &lora.from {
        None => Error::Config {
            path: cfg.source.clone(),
            key: "lora.r".into(),
            reason,
        },
        Some(dir) => Error::Config {
            path: dir.join(crate::adapter::ADAPTER_CONFIG),
            key: "r".into(),
            reason,
        },
    })
}

/// Every trainable choice of the stage must train something: LoRA targets that match no module
/// are an error even when other groups train (else the adapter written would be empty).
pub(super) fn check_every_choice_trains(plan: &TrainPlan) -> Result<()> {
    let (cfg, stage) = (&plan.cfg, &plan.stage);
    let counts = plan.trainable_counts();
    let model_dir = plan.model_dir();
    if stage.train_lora && !counts.contains_key("lora") {
        let targets = plan
            .lora
            .as_ref()
            .map(|l| {
                let excluded = match &l.spec.exclude_modules {
                    Some(ex) => format!(" minus the excluded {}", describe_targets(ex)),
                    None => String::new(),
                };
                format!("{}{excluded}", describe_targets(&l.spec.target_modules))
            })
            .unwrap_or_default();
        let example = plan
            .layout
            .linear_modules
            .keys()
            .find(|m| m.contains(".layers.0."))
            .or_else(|| plan.layout.linear_modules.keys().next())
            .cloned()
            .unwrap_or_default();
        return Err(Error::Config {
            path: cfg.source.clone(),
            key: "lora.target_modules".into(),
            reason: format!(
                "{targets} matches no linear layer of {} (stage `{}` trains lora); module \
                 names look like `{example}`",
                model_dir.display(),
                stage.name
            ),
        });
    }
    if stage.train_full {
        if let Some(g) = plan
            .full_groups
            .iter()
            .find(|g| !counts.contains_key(g.name))
        {
            return Err(Error::Config {
                path: cfg.source.clone(),
                key: "full.groups".into(),
                reason: format!(
                    "group `{}` holds no weights that {} runs (stage `{}` trains full)",
                    g.name,
                    model_dir.display(),
                    stage.name
                ),
            });
        }
    }
    if counts.values().sum::<usize>() == 0 {
        return Err(Error::Model(format!(
            "stage `{}` has no trainable parameters",
            stage.name
        )));
    }
    Ok(())
}

/// `target_modules` as the recipe writes it: a list or a quoted regex.
pub(crate) fn describe_targets(t: &TargetModules) -> String {
    match t {
        TargetModules::Suffixes(v) => format!("{v:?}"),
        TargetModules::Pattern(p) => format!("{p:?}"),
    }
}

/// A rank error from the LoRA factory is about the recipe's `lora.r` when the adapter is fresh.
pub(crate) fn recipe_lora_error(cfg: &TrainConfig, e: Error) -> Error {
    match e {
        Error::Config { path, key, reason } if path.as_os_str() == "lora" => Error::Config {
            path: cfg.source.clone(),
            key: format!("lora.{key}"),
            reason,
        },
        other => other,
    }
}
