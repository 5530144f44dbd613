//! The LLaVA family (HF `LlavaForConditionalGeneration`): CLIP vision tower → MLP projector →
//! Llama / Mistral. `model` holds the differentiable model; `family` what the family boundary
//! needs (key layouts, module groups, shapes from `config.json`, unused weights, processor).

mod family;
mod model;

pub use family::{canonical_name, is_unused_weight, LlavaFamily};
pub use model::{LlavaModel, Projector};
