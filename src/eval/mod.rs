//! Evaluation stage: multiple-choice VQA items and the scoring of generations.
//!
//! [`mcq`] holds the item format that `prepare` writes and `eval` reads (JSONL, one [`mcq::McqItem`] a
//! line) and the reference's verbatim question prompt. [`parse`] turns a generation into a chosen option:
//! [`parse::parse_strict`] is the reference's scoring (the reported metric), [`parse::parse_lenient`] a
//! forgiving reading reported beside it to show how much accuracy is lost to answer formatting alone.

pub mod confusion;
pub mod item_lengths;
pub mod mcq;
pub mod model_states;
pub mod parse;
pub mod provenance;
pub mod report;
pub mod run;
