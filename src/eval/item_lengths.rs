//! Pre-flight check that every MCQ item fits in the model's context window.

use std::path::Path;

use super::mcq::{letter, question_prompt, McqItem};
use super::run::{likelihood_continuation, Scoring, MAX_NEW_TOKENS};
use crate::error::{Error, Result};
use crate::session::{Prompt, Session};

/// Check, before any model call, that every item fits in the model's `max_position_embeddings`:
/// its prompt plus [`MAX_NEW_TOKENS`] (generate), or plus its longest scored continuation
/// (likelihood modes). The error names the items file, the item and the numbers.
pub fn check_item_lengths(
    session: &Session,
    items: &[&McqItem],
    items_file: &Path,
    scoring: Scoring,
) -> Result<()> {
    let limit = session.model.max_positions();
    for item in items {
        let prompt = Prompt::Chat(question_prompt(&item.key, &item.options));
        let prompt_len = session.prompt_ids(&prompt)?.len();
        let (extra, what) = match scoring {
            Scoring::Generate => (MAX_NEW_TOKENS, "new tokens (generate scoring)".to_string()),
            Scoring::Likelihood | Scoring::LikelihoodText => {
                let mut longest = 0;
                for i in 0..item.options.len() {
                    let text = match scoring {
                        Scoring::Likelihood => likelihood_continuation(letter(i)),
                        _ => item.options[i].clone(),
                    };
                    longest = longest.max(session.text.encode_plain(&text)?.len());
                }
                (longest, "tokens of its longest scored answer".to_string())
            }
        };
        if prompt_len + extra > limit {
            return Err(Error::Config {
                path: items_file.to_path_buf(),
                key: format!("item {}", item.id),
                reason: format!(
                    "its prompt is {prompt_len} tokens; with {extra} {what} the sequence would be \
                     {} tokens, past the model's max_position_embeddings {limit} ({}); nothing \
                     was evaluated",
                    prompt_len + extra,
                    session.dir.join("config.json").display()
                ),
            });
        }
    }
    Ok(())
}
