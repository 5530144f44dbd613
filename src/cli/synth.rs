//! `lvlm-ift synth-pairs --out DIR [--count N] [--image-size PX] [--seed S]` (hidden: tests, demos)

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use crate::data::synthetic::{
    write_synthetic_pairs, SynthSpec, MAX_COUNT, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE,
};

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output directory: images/*.png, pairs.jsonl and pairs.csv are written into it.
    #[arg(long)]
    out: PathBuf,
    /// Number of image-description pairs (at most 1000000).
    #[arg(long, default_value_t = 200,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(0..=MAX_COUNT as u64))]
    count: usize,
    /// Side of the square images in pixels (16 to 4096).
    #[arg(long, default_value_t = 224,
          value_parser = clap::value_parser!(u32)
              .range(MIN_IMAGE_SIZE as i64..=MAX_IMAGE_SIZE as i64))]
    image_size: u32,
    /// Random seed; the same seed writes byte-identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let spec = SynthSpec {
        count: args.count,
        image_size: args.image_size,
        seed: args.seed,
    };
    let start = Instant::now();
    let samples = write_synthetic_pairs(&args.out, &spec)
        .with_context(|| format!("writing synthetic pairs to {}", args.out.display()))?;
    eprintln!(
        "wrote {} synthetic pair(s) of {px}x{px} px (seed {}) to {} in {:.2}s: pairs.jsonl, pairs.csv",
        samples.len(),
        spec.seed,
        args.out.display(),
        start.elapsed().as_secs_f64(),
        px = spec.image_size,
    );
    Ok(())
}
