//! Command-line interface: one file per command, no logic of its own beyond turning flags into
//! library calls and printing results.

mod common;
mod eval;
mod generate;
mod launch;
mod merge;
mod prepare;
mod score;
mod synth;
mod train;

use clap::{Parser, Subcommand};

/// Fine-tune vision-language models on medical image-description pairs without instruction data,
/// and evaluate them on multiple-choice VQA.
#[derive(Debug, Parser)]
#[command(name = "lvlm-ift", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v info, -vv debug). `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Log-probability of a continuation given an image and a prompt.
    Score(score::ScoreArgs),
    /// Greedy answer of the model to an image and a prompt.
    Generate(generate::GenerateArgs),
    /// Fine-tune (LoRA and/or full module groups) from a TOML recipe.
    Train(train::TrainArgs),
    /// Multiple-choice VQA evaluation of a model (and adapter) on a prepared benchmark.
    Eval(eval::EvalArgs),
    /// Fold a LoRA adapter (and/or fully trained weights) into a copy of the base checkpoint.
    Merge(merge::MergeArgs),
    /// Turn a benchmark's released label files into training pairs and MCQ sets.
    Prepare(prepare::PrepareArgs),
    /// Write a synthetic image-description pair set (tests, demos).
    #[command(hide = true)]
    SynthPairs(synth::SynthArgs),
}

/// Parse the process arguments and run the chosen command.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    common::init_logging(cli.verbose);
    match cli.command {
        Command::Score(args) => score::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Prepare(args) => prepare::run(args),
        Command::SynthPairs(args) => synth::run(args),
    }
}
