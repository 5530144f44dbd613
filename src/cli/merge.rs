//! `lvlm-ift merge --model DIR --adapter DIR [--full-weights FILE] --out DIR`

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args;

use crate::adapter::{check_adapter_fits, merge_into_copy, merge_output_problem, read_adapter};
use crate::model::checkpoint::resolve_model;
use crate::model::family::family_of;
use crate::train::checkpoint::load_float_safetensors;

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base checkpoint (directory or Hub repo id).
    #[arg(long)]
    model: String,
    /// PEFT LoRA adapter to fold into the weights.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Fully trained weights (`full_weights.safetensors` of a run) replacing the base ones.
    #[arg(long)]
    full_weights: Option<PathBuf>,
    /// Output directory: must not exist or be empty (merge never overwrites); built in a temp
    /// dir and renamed into place, so a failed merge leaves nothing there.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    if args.adapter.is_none() && args.full_weights.is_none() {
        anyhow::bail!("nothing to merge: pass --adapter and/or --full-weights");
    }
    // Before anything is read or written: never replace what the user has at --out.
    if let Some(problem) = merge_output_problem(&args.out) {
        anyhow::bail!("--out {problem}");
    }
    let base = resolve_model(&args.model)?;
    let (spec, lora) = match &args.adapter {
        Some(dir) => {
            let key_map = family_of(&base)?.key_map();
            let a = read_adapter(dir, &Device::Cpu, key_map)
                .with_context(|| format!("reading adapter {}", dir.display()))?;
            check_adapter_fits(&a, &base)?;
            (Some(a.spec), a.weights)
        }
        None => (None, HashMap::new()),
    };
    let replaced = match &args.full_weights {
        Some(f) => load_float_safetensors(f, &Device::Cpu)?,
        None => HashMap::new(),
    };
    let report = merge_into_copy(&base, &args.out, spec.as_ref(), &lora, &replaced)
        .with_context(|| format!("merging into {}", args.out.display()))?;
    eprintln!(
        "merged {} LoRA weight(s), replaced {} weight(s) -> {}",
        report.merged,
        report.replaced,
        args.out.display()
    );
    Ok(())
}
