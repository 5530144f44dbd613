//! lvlm-ift: instruction-free tuning of vision-language models for medical image understanding.
//!
//! Layered by stage; a stage only imports from the ones before it:
//! `data` (files → samples) → `model` (architectures, weights) → `session` (one checkpoint with
//! its processor and tokenizer) → `cli` (commands).

pub mod adapter;
pub mod bench;
pub mod civil_time;
pub mod cli;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod malloc_tuning;
pub mod method;
pub mod model;
pub mod plot;
pub mod session;
pub mod train;

pub use error::{Error, Result};
