//! Token ids of prompts equal the HF processor's exactly: raw prompts (image placeholder expanded,
//! BOS from the post-processor) and chat-templated ones.

mod common;

use common::{fixtures, Expected, MODELS};
use lvlm_ift::session::{Prompt, Session, SessionOptions};

#[test]
fn prompt_token_ids_equal_hf() {
    for model in MODELS {
        let exp = Expected::load(model);
        let s = Session::load(
            fixtures().join(model).to_str().unwrap(),
            SessionOptions::default(),
        )
        .unwrap();
        let raw = exp.meta["prompts"]["raw"].as_str().unwrap().to_string();
        assert_eq!(
            s.prompt_ids(&Prompt::Raw(raw)).unwrap(),
            exp.ids("input_ids.raw"),
            "{model} raw"
        );
        let q = exp.meta["prompts"]["chat_user_text"]
            .as_str()
            .unwrap()
            .to_string();
        let chat_text = s.template.render_user_prompt(&q).unwrap();
        assert_eq!(
            chat_text,
            exp.meta["chat_text"].as_str().unwrap(),
            "{model} chat text"
        );
        assert_eq!(
            s.prompt_ids(&Prompt::Chat(q)).unwrap(),
            exp.ids("input_ids.chat"),
            "{model} chat"
        );
        // Batch prompts (no padding here; HF padded them on the right).
        let batch_ids = exp.ids("batch.input_ids");
        let mask = exp.ids("batch.attention_mask");
        let width = batch_ids.len() / 2;
        for (b, p) in exp.meta["prompts"]["batch"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let ids = s
                .prompt_ids(&Prompt::Raw(p.as_str().unwrap().into()))
                .unwrap();
            let n = mask[b * width..(b + 1) * width]
                .iter()
                .filter(|&&m| m == 1)
                .count();
            assert_eq!(
                ids,
                batch_ids[b * width..b * width + n].to_vec(),
                "{model} batch {b}"
            );
        }
        // Continuations are tokenized on their own, without special tokens.
        let cont = s
            .text
            .encode_plain(exp.meta["continuation"].as_str().unwrap())
            .unwrap();
        assert_eq!(cont, exp.ids("continuation_ids"), "{model} continuation");
    }
}
