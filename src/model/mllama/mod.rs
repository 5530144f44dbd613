//! The Llama-3.2-Vision family (HF `MllamaForConditionalGeneration`): a tiled vision encoder
//! whose features the text model reads through gated cross-attention layers. `model` holds the
//! differentiable model (`vision` and `text` its halves), `config` its `config.json`, `family`
//! what the family boundary needs.

mod config;
mod family;
#[cfg(test)]
mod gradcheck;
mod model;
mod text;
mod vision;

pub use config::{MllamaConfig, MllamaVisionConfig};
pub use family::{canonical_name, is_unused_weight, param_shapes, MllamaFamily};
pub use model::MllamaModel;
