//! `lvlm-ift generate`: greedy decoding with the KV cache.

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
    /// Stop after this many new tokens (or at EOS).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Print JSON (`text`, `token_ids`).
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let session = args.model.load()?;
    let out = session.generate(
        &args.image.image,
        &args.prompt.to_prompt(),
        args.max_new_tokens,
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", out.text);
    }
    Ok(())
}
