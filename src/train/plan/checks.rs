//! Checks of a stage against the model it loads, before anything is sized from the recipe's
//! numbers: sequence lengths within `max_position_embeddings`, every trainable choice training
//! something, and recipe-keyed errors for what the model bounds.

use std::path::Path;

use super::TrainParam;
use crate::config::{InstructionMode, StageSpec, TrainConfig};
use crate::error::{Error, Result};
use crate::model::lora::TargetModules;
use crate::model::weights::WeightStore;

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
    model_dir: &Path,
    max_positions: usize,
    image_tokens: usize,
) -> Result<()> {
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
                    model_dir.join("config.json").display()
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

/// Every trainable choice of the stage must train something: LoRA targets that match no module
/// are an error even when other groups train (else the adapter written would be empty).
pub(super) fn check_every_choice_trains(
    cfg: &TrainConfig,
    stage: &StageSpec,
    params: &[TrainParam],
    store: &WeightStore,
    model_dir: &Path,
) -> Result<()> {
    let has = |group: &dyn Fn(&str) -> bool| params.iter().any(|p| group(&p.group));
    if stage.train_lora && !has(&|g| g == "lora") {
        let targets = store
            .lora()
            .map(|l| {
                let excluded = match &l.spec.exclude_modules {
                    Some(ex) => format!(" minus the excluded {}", describe_targets(ex)),
                    None => String::new(),
                };
                format!("{}{excluded}", describe_targets(&l.spec.target_modules))
            })
            .unwrap_or_default();
        return Err(Error::Config {
            path: cfg.source.clone(),
            key: "lora.target_modules".into(),
            reason: format!(
                "{targets} matches no linear layer of {} (stage `{}` trains lora); module \
                 names look like `model.language_model.layers.0.self_attn.q_proj`",
                model_dir.display(),
                stage.name
            ),
        });
    }
    if stage.train_full && !has(&|g| g != "lora" && g != "proxy") {
        return Err(Error::Config {
            path: cfg.source.clone(),
            key: "full.groups".into(),
            reason: format!(
                "the groups hold no weights of {} (stage `{}` trains full)",
                model_dir.display(),
                stage.name
            ),
        });
    }
    if params.is_empty() {
        return Err(Error::Model(format!(
            "stage `{}` has no trainable parameters",
            stage.name
        )));
    }
    Ok(())
}

/// `target_modules` as the recipe writes it: a list or a quoted regex.
pub(super) fn describe_targets(t: &TargetModules) -> String {
    match t {
        TargetModules::Suffixes(v) => format!("{v:?}"),
        TargetModules::Pattern(p) => format!("{p:?}"),
    }
}

/// A rank error from the LoRA factory is about the recipe's `lora.r` when the adapter is fresh.
pub(super) fn recipe_lora_error(cfg: &TrainConfig, e: Error) -> Error {
    match e {
        Error::Config { path, key, reason } if path.as_os_str() == "lora" => Error::Config {
            path: cfg.source.clone(),
            key: format!("lora.{key}"),
            reason,
        },
        other => other,
    }
}
