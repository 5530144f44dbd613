//! `lvlm-ift score`: log-probability of a continuation.

use clap::Args;

use super::common::{ImageArg, ModelArgs, PromptText};

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    image: ImageArg,
    #[command(flatten)]
    prompt: PromptText,
    /// Text whose probability is computed; tokenized on its own, without special tokens.
    #[arg(long)]
    continuation: String,
    /// Print JSON (`logprob`, `token_logprobs`, `token_ids`, `tokens`).
    #[arg(long)]
    json: bool,
}

pub fn run(args: ScoreArgs) -> anyhow::Result<()> {
    let session = args.model.load()?;
    let out = session.score(
        &args.image.image,
        &args.prompt.to_prompt(),
        &args.continuation,
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("logprob\t{:.6}", out.logprob);
        for ((id, tok), lp) in out
            .token_ids
            .iter()
            .zip(&out.tokens)
            .zip(&out.token_logprobs)
        {
            println!("{id}\t{tok:?}\t{lp:.6}");
        }
    }
    Ok(())
}
