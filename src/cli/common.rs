//! Flags shared by the commands that load a model.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use clap::{Args, ValueEnum};

use crate::data::feature_cache::{gib_to_bytes, CacheLocation};
use crate::data::processor::AspectMode;
use crate::session::{Prompt, Session, SessionOptions};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AspectArg {
    /// HF processor as is: shortest-edge resize, center crop.
    Resize,
    /// LLaVA `image_aspect_ratio: pad`: pad to a square of the mean colour first.
    Pad,
    /// The reference recipe: resize straight to the processor's square size (aspect not kept,
    /// no crop, no padding).
    Squash,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Checkpoint directory (HF layout: LLaVA or Llama-3.2-Vision) or Hub repo id (org/name).
    #[arg(long)]
    pub model: String,
    /// Weight dtype. f32 is the only sensible choice on CPU.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// How non-square images are fitted.
    #[arg(long, value_enum, default_value = "resize")]
    pub image_aspect: AspectArg,
    /// At most this many tiles per image (Llama-3.2-Vision; the reference recipe uses 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_image_tiles: Option<u64>,
    /// PEFT LoRA adapter directory to apply (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Fully trained weights to use instead of the base ones (`full_weights.safetensors` of a
    /// run, or `trainable.safetensors` of a checkpoint).
    #[arg(long)]
    pub full_weights: Option<PathBuf>,
    /// Frozen-vision feature cache folder, e.g. a training run's `vision-cache`: pictures whose
    /// states it holds for exactly this model (weights, adapter, dtype, processor) skip decoding
    /// and the vision tower; the others are computed and stored. LLaVA models.
    #[arg(long, value_name = "DIR")]
    pub vision_cache: Option<PathBuf>,
    /// At most this many GiB in --vision-cache (every model's entries together).
    #[arg(long, value_name = "GIB", default_value_t = 8.0)]
    pub vision_cache_gib: f64,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Session> {
        let opts = SessionOptions {
            device: crate::model::parse_device(&self.device)?,
            dtype: match self.dtype {
                DTypeArg::F32 => DType::F32,
                DTypeArg::Bf16 => DType::BF16,
                DTypeArg::F16 => DType::F16,
            },
            aspect: match self.image_aspect {
                AspectArg::Resize => AspectMode::Resize,
                AspectArg::Pad => AspectMode::Pad,
                AspectArg::Squash => AspectMode::Squash,
            },
            max_tiles: self.max_image_tiles.map(|n| n as usize),
            adapter: self.adapter.clone(),
            full_weights: self.full_weights.clone(),
            vision_cache: self.vision_cache.clone().map(|dir| CacheLocation {
                dir,
                max_bytes: gib_to_bytes(self.vision_cache_gib),
            }),
        };
        let gib = self.vision_cache_gib;
        if !(gib.is_finite() && gib > 0.0) {
            anyhow::bail!("--vision-cache-gib {gib}: expected a positive size in GiB");
        }
        Session::load(&self.model, opts).with_context(|| format!("loading model {}", self.model))
    }
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false, id = "prompt_text")]
pub struct PromptText {
    /// Question for the user turn, rendered through the model's chat template with the image.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt used literally; write the image placeholder (e.g. `<image>`) where the image goes.
    #[arg(long)]
    pub raw_prompt: Option<String>,
}

impl PromptText {
    pub fn to_prompt(&self) -> Prompt {
        match (&self.prompt, &self.raw_prompt) {
            (Some(p), _) => Prompt::Chat(p.clone()),
            (None, Some(r)) => Prompt::Raw(r.clone()),
            (None, None) => unreachable!("clap requires one of --prompt/--raw-prompt"),
        }
    }
}

#[derive(Debug, Args)]
pub struct ImageArg {
    /// Image file (PNG/JPEG/TIFF/BMP/WebP; any mode is converted to RGB).
    #[arg(long)]
    pub image: PathBuf,
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
