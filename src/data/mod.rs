//! Data stage: image decoding and processors, prompts and tokenization. Never touches model tensors.

pub mod collate;
pub mod image;
pub mod pairs;
pub mod processor;
pub mod prompt;
