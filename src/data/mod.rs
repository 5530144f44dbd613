//! Data stage: image decoding and processors, prompts and tokenization. Never touches model tensors.

pub mod image;
pub mod processor;
pub mod prompt;
