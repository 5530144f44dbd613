//! `TextProcessor`: encoding, decoding, special token ids and image-token validation.

use std::path::Path;

use serde_json::Value as Json;

use super::{fixture_dir, write};
use crate::data::prompt::{ChatTemplate, TextProcessor};
use crate::error::Error;

/// A word-level tokenizer: `<unk> <s> </s> <pad> <image>` = ids 0..4 (added, special),
/// whitespace pre-tokenizer, `<s> $A` post-processor.
fn write_word_tokenizer(dir: &Path) {
    let words = [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
        "<image>",
        "USER",
        ":",
        "What",
        "is",
        "shown",
        "?",
        "ASSISTANT",
        "a",
        "cell",
        ".",
        ",",
        "round",
        "<tag>",
    ];
    let vocab: serde_json::Map<String, Json> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), Json::from(i)))
        .collect();
    let added: Vec<Json> = words[..5]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            serde_json::json!({"id": i, "content": w, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    write(dir, "tokenizer.json", &tokenizer.to_string());
    write(
        dir,
        "tokenizer_config.json",
        r#"{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}"#,
    );
}

#[test]
fn encode_prompt_expands_image_and_adds_bos_once() {
    let dir = tempfile::tempdir().unwrap();
    write_word_tokenizer(dir.path());
    let p = TextProcessor::from_model_dir(dir.path(), 4, 3).unwrap();
    assert_eq!(p.image_token(), "<image>");
    assert_eq!(p.image_token_id(), 4);
    assert_eq!(p.num_image_tokens(), 3);
    assert_eq!(p.bos_token_id(), Some(1));
    assert_eq!(p.pad_token_id(), Some(3));
    assert_eq!(p.eos_token_ids(), vec![2]);
    assert_eq!(p.vocab_size(), 18);
    assert_eq!(p.token_id("cell"), Some(13));
    assert_eq!(p.token_id("nope"), None);

    let text = "USER: <image>\nWhat is shown? ASSISTANT:";
    let ids = p.encode_prompt(text).unwrap();
    assert_eq!(ids, vec![1, 5, 6, 4, 4, 4, 7, 8, 9, 10, 11, 6]);
    assert_eq!(ids.iter().filter(|&&i| i == 4).count(), 3);

    // A template that already emits BOS gets no second one.
    let with_bos = p.encode_prompt(&format!("<s>{text}")).unwrap();
    assert_eq!(with_bos, ids);
    assert_eq!(with_bos.iter().filter(|&&i| i == 1).count(), 1);

    // Two images: each expanded.
    let two = p.encode_prompt("<image><image> a").unwrap();
    assert_eq!(two, vec![1, 4, 4, 4, 4, 4, 4, 12]);

    // Continuations: no BOS, no expansion.
    assert_eq!(
        p.encode_plain(" a round cell.").unwrap(),
        vec![12, 16, 13, 14]
    );
    assert_eq!(p.encode_plain("").unwrap(), Vec::<u32>::new());

    assert_eq!(p.decode(&[1, 12, 13, 2], true).unwrap(), "a cell");
    assert_eq!(p.decode(&[1, 12, 13, 2], false).unwrap(), "<s> a cell </s>");
}

#[test]
fn generation_config_ids_and_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_word_tokenizer(d);
    write(
        d,
        "generation_config.json",
        r#"{"eos_token_id": [2, 17, 2], "bos_token_id": 1}"#,
    );
    write(
        d,
        "tokenizer_config.json",
        r#"{"bos_token": "<s>", "eos_token": "</s>", "clean_up_tokenization_spaces": true}"#,
    );
    let p = TextProcessor::from_model_dir(d, 4, 2).unwrap();
    assert_eq!(p.eos_token_ids(), vec![2, 17]);
    assert_eq!(p.pad_token_id(), None);
    assert_eq!(p.decode(&[12, 13, 15, 14], true).unwrap(), "a cell,.");

    write(
        d,
        "generation_config.json",
        r#"{"eos_token_id": 17, "pad_token_id": 3}"#,
    );
    let p = TextProcessor::from_model_dir(d, 4, 2).unwrap();
    assert_eq!(p.eos_token_ids(), vec![17]);
    assert_eq!(p.pad_token_id(), Some(3));

    write(d, "generation_config.json", r#"{"eos_token_id": "x"}"#);
    let err = TextProcessor::from_model_dir(d, 4, 2).unwrap_err();
    assert!(
        matches!(&err, Error::Config { path, key, .. } if key == "eos_token_id" && path.ends_with("generation_config.json")),
        "{err}"
    );
}

#[test]
fn eos_ids_outside_the_vocabulary_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_word_tokenizer(d);
    write(d, "tokenizer_config.json", r#"{"eos_token": "<tag>"}"#);
    // 18 tokens: 18 is one past the end.
    write(d, "generation_config.json", r#"{"eos_token_id": [2, 18]}"#);
    let err = TextProcessor::from_model_dir(d, 4, 2).unwrap_err();
    assert!(
        matches!(&err, Error::Config { path, key, reason } if key == "eos_token_id"
            && path.ends_with("generation_config.json") && reason.contains("18 is outside")
            && reason.contains("18 tokens")),
        "{err}"
    );
    // The tokenizer's own EOS (`<tag>` = 17) is in its vocabulary but past a 17-row model.
    write(d, "generation_config.json", "{}");
    let p = TextProcessor::from_model_dir(d, 4, 2).unwrap();
    assert_eq!(p.eos_token_ids(), vec![17]);
    p.check_eos_within(18, Path::new("m/config.json")).unwrap();
    let err = p
        .check_eos_within(17, Path::new("m/config.json"))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config { path, key, reason } if key == "eos_token"
            && path.ends_with("tokenizer_config.json") && reason.contains("EOS id 17")
            && reason.contains("vocab_size 17") && reason.contains("m/config.json")),
        "{err}"
    );
}

#[test]
fn missing_tokenizer_names_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = TextProcessor::from_model_dir(dir.path(), 4, 3).unwrap_err();
    match &err {
        Error::Tokenizer { path, .. } => assert_eq!(path, &dir.path().join("tokenizer.json")),
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("tokenizer.json"));

    write(dir.path(), "tokenizer.json", "{\"model\": 1}");
    let err = TextProcessor::from_model_dir(dir.path(), 4, 3).unwrap_err();
    assert!(matches!(err, Error::Tokenizer { .. }), "{err}");
}

#[test]
fn image_token_validation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_word_tokenizer(d);

    let err = TextProcessor::from_model_dir(d, 7, 3).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Tokenizer { .. }));
    assert!(
        text.contains("<image>") && text.contains("7") && text.contains("tokenizer.json"),
        "{text}"
    );

    let err = TextProcessor::from_model_dir(d, 4, 0).unwrap_err();
    assert!(
        matches!(&err, Error::Config { key, .. } if key == "num_image_tokens"),
        "{err}"
    );

    // processor_config.json names a token the tokenizer does not have.
    write(d, "processor_config.json", r#"{"image_token": "<img>"}"#);
    let err = TextProcessor::from_model_dir(d, 4, 3).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("<img>") && text.contains("processor_config.json"),
        "{text}"
    );

    // A vocabulary word that is not an added token is not split out of text.
    write(d, "processor_config.json", r#"{"image_token": "<tag>"}"#);
    let err = TextProcessor::from_model_dir(d, 17, 3).unwrap_err();
    assert!(err.to_string().contains("single token"), "{err}");

    // tokenizer_config's image_token takes precedence over processor_config's.
    write(
        d,
        "tokenizer_config.json",
        r#"{"bos_token": "<s>", "extra_special_tokens": {"image_token": "<image>"}}"#,
    );
    let p = TextProcessor::from_model_dir(d, 4, 3).unwrap();
    assert_eq!(p.image_token(), "<image>");
}

#[test]
fn llama_flags_rebuild_post_processor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_word_tokenizer(d);
    write(
        d,
        "tokenizer_config.json",
        r#"{"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "add_bos_token": true, "add_eos_token": true}"#,
    );
    let p = TextProcessor::from_model_dir(d, 4, 1).unwrap();
    assert_eq!(p.encode_prompt("a cell").unwrap(), vec![1, 12, 13, 2]);
    assert_eq!(p.encode_plain("a cell").unwrap(), vec![12, 13]);

    write(
        d,
        "tokenizer_config.json",
        r#"{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "add_bos_token": false}"#,
    );
    let p = TextProcessor::from_model_dir(d, 4, 1).unwrap();
    assert_eq!(p.encode_prompt("a cell").unwrap(), vec![12, 13]);

    // Other classes keep tokenizer.json's post-processor.
    write(
        d,
        "tokenizer_config.json",
        r#"{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "add_bos_token": false}"#,
    );
    let p = TextProcessor::from_model_dir(d, 4, 1).unwrap();
    assert_eq!(p.encode_prompt("a cell").unwrap(), vec![1, 12, 13]);
}

/// Token ids recorded from transformers (`LlavaProcessor` + `apply_chat_template`) for the
/// tiny fixtures, if they are present.
#[test]
fn fixture_parity_with_transformers() {
    for name in ["tiny-llava", "tiny-llava-mistral"] {
        let dir = fixture_dir(name);
        let parity = fixture_dir("parity");
        let (Ok(meta), Ok(bytes)) = (
            std::fs::read_to_string(parity.join(format!("{name}.json"))),
            std::fs::read(parity.join(format!("{name}.safetensors"))),
        ) else {
            continue;
        };
        if !dir.join("tokenizer.json").is_file() {
            continue;
        }
        let meta: Json = serde_json::from_str(&meta).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let ids = |key: &str| -> Vec<u32> {
            tensors
                .tensor(key)
                .unwrap()
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
                .collect()
        };
        let image_token_id = meta["image_token_id"].as_u64().unwrap() as u32;
        let n = meta["num_image_tokens"].as_u64().unwrap() as usize;
        let p = TextProcessor::from_model_dir(&dir, image_token_id, n).unwrap();
        assert_eq!(
            p.bos_token_id(),
            meta["bos_token_id"].as_u64().map(|v| v as u32)
        );
        assert_eq!(
            p.pad_token_id(),
            meta["pad_token_id"].as_u64().map(|v| v as u32)
        );
        assert_eq!(
            p.eos_token_ids(),
            vec![meta["eos_token_id"].as_u64().unwrap() as u32]
        );

        let template = ChatTemplate::from_model_dir(&dir).unwrap();
        let user = meta["prompts"]["chat_user_text"].as_str().unwrap();
        let chat = template.render_user_prompt(user).unwrap();
        assert_eq!(chat, meta["chat_text"].as_str().unwrap(), "{name}");
        assert_eq!(
            p.encode_prompt(&chat).unwrap(),
            ids("input_ids.chat"),
            "{name}"
        );

        let continuation = meta["continuation"].as_str().unwrap();
        assert_eq!(
            p.encode_plain(continuation).unwrap(),
            ids("continuation_ids"),
            "{name}"
        );

        // Batch rows are right-padded with pad_token_id.
        let batch = ids("batch.input_ids");
        let prompts: Vec<&str> = meta["prompts"]["batch"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let width = batch.len() / prompts.len();
        for (row, prompt) in batch.chunks(width).zip(prompts) {
            let encoded = p.encode_prompt(prompt).unwrap();
            assert_eq!(
                &row[..encoded.len()],
                encoded.as_slice(),
                "{name}: {prompt}"
            );
            assert!(row[encoded.len()..]
                .iter()
                .all(|&id| Some(id) == p.pad_token_id()));
        }
    }
}
