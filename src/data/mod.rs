//! Data stage: image decoding and processors, prompts and tokenization. Never touches model tensors.

pub mod batch;
pub mod collate;
pub mod csv_line;
pub mod csv_strict;
pub mod dicom;
pub mod feature_cache;
pub mod image;
pub mod loader;
pub mod pairs;
pub mod paths;
pub mod processor;
pub mod prompt;
pub mod shuffle;
pub mod synthetic;
