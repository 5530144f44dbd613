//! `lvlm-ift generate`: greedy decoding with the KV cache.

use anyhow::Context;
use clap::Args;

use super::common::{ImageArg, ModelArgs, PromptText};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    image: ImageArg,
    #[command(flatten)]
    prompt: PromptText,
    /// Stop after this many new tokens (or at EOS); at least 1, and prompt + N must fit in the
    /// model's `max_position_embeddings` (an error up front otherwise).
    #[arg(long, default_value_t = 64,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_new_tokens: usize,
    /// Print JSON (`text`, `token_ids`).
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let session = args.model.load()?;
    let out = session
        .generate(
            &args.image.image,
            &args.prompt.to_prompt(),
            args.max_new_tokens,
        )
        .with_context(|| format!("generate --max-new-tokens {}", args.max_new_tokens))?;
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", out.text);
    }
    Ok(())
}
