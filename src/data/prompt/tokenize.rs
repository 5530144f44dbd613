//! [`TextProcessor`]: `tokenizer.json` plus `LlavaProcessor`'s image-token expansion, special
//! token ids and the BOS/EOS post-processor rules of `transformers`.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

use super::files::read_json_opt;
use super::special::{token_string, SpecialTokens};
use super::PromptDefaults;
use crate::error::{Error, Result};

/// `tokenizer.json` plus the image-token expansion rule of `LlavaProcessor`.
#[derive(Clone)]
pub struct TextProcessor {
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    special: SpecialTokens,
    image_token: String,
    image_token_id: u32,
    num_image_tokens: usize,
    eos_token_ids: Vec<u32>,
    eos_origin: EosOrigin,
    bos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    clean_up_tokenization_spaces: bool,
}

/// Where the EOS ids came from: a file and the key in it.
#[derive(Debug, Clone)]
struct EosOrigin(PathBuf, String);

impl fmt::Debug for TextProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextProcessor")
            .field("tokenizer_path", &self.tokenizer_path)
            .field("special", &self.special)
            .field("image_token", &self.image_token)
            .field("image_token_id", &self.image_token_id)
            .field("num_image_tokens", &self.num_image_tokens)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("bos_token_id", &self.bos_token_id)
            .field("pad_token_id", &self.pad_token_id)
            .finish_non_exhaustive()
    }
}

impl TextProcessor {
    /// Load `tokenizer.json` from `dir` and check the image token against the model config.
    ///
    /// The image token string is, in `LlavaProcessor`'s order: the tokenizer's `image_token`
    /// (`tokenizer_config.json` `extra_special_tokens.image_token` or `image_token`), then
    /// `processor_config.json` `image_token`, then `<image>`; if `<image>` is not a token but
    /// an added token has id `image_token_id`, that token. It must encode to exactly one token
    /// whose id is `image_token_id` (the model config's `image_token_index`).
    ///
    /// Llama/Gemma tokenizers whose `tokenizer_config.json` sets `add_bos_token` /
    /// `add_eos_token` get their post-processor rebuilt from those flags, as
    /// `LlamaTokenizerFast.update_post_processor` does. `clean_up_tokenization_spaces`
    /// (default false) is applied by [`TextProcessor::decode`].
    pub fn from_model_dir(
        dir: &Path,
        image_token_id: u32,
        num_image_tokens: usize,
    ) -> Result<Self> {
        Self::from_model_dir_with(
            dir,
            image_token_id,
            num_image_tokens,
            &PromptDefaults::LLAVA,
        )
    }

    /// [`TextProcessor::from_model_dir`] for a family whose default image token (used when
    /// the directory names none) is `defaults.image_token`.
    pub fn from_model_dir_with(
        dir: &Path,
        image_token_id: u32,
        num_image_tokens: usize,
        defaults: &PromptDefaults,
    ) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tok_err = |reason: String| Error::Tokenizer {
            path: tokenizer_path.clone(),
            reason,
        };
        if !tokenizer_path.is_file() {
            return Err(tok_err(
                "file not found (only the fast-tokenizer tokenizer.json format is supported)"
                    .into(),
            ));
        }
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| tok_err(e.to_string()))?;
        if num_image_tokens == 0 {
            return Err(Error::Config {
                path: dir.to_path_buf(),
                key: "num_image_tokens".into(),
                reason: "the processor must insert at least one image token".into(),
            });
        }

        let special = SpecialTokens::from_model_dir(dir)?;
        let tok_cfg_path = dir.join("tokenizer_config.json");
        let tok_cfg = read_json_opt(&tok_cfg_path)?.unwrap_or(Json::Null);
        apply_llama_post_processor(
            &mut tokenizer,
            &tok_cfg,
            &tok_cfg_path,
            &special,
            &tokenizer_path,
        )?;
        let clean_up_tokenization_spaces = tok_cfg
            .get("clean_up_tokenization_spaces")
            .and_then(Json::as_bool)
            .unwrap_or(false);

        let (image_token, origin) = resolve_image_token(
            dir,
            &tokenizer,
            &tok_cfg,
            image_token_id,
            defaults.image_token,
        )?;
        let id = tokenizer.token_to_id(&image_token).ok_or_else(|| {
            tok_err(format!(
                "image token {image_token:?} (from {origin}) is not in the vocabulary"
            ))
        })?;
        let encoded = tokenizer
            .encode(image_token.as_str(), false)
            .map_err(|e| tok_err(e.to_string()))?;
        if encoded.get_ids() != [id] {
            return Err(tok_err(format!(
                "image token {image_token:?} (from {origin}) does not encode to a single token \
                 (got ids {:?}); it must be an added token",
                encoded.get_ids()
            )));
        }
        if id != image_token_id {
            return Err(tok_err(format!(
                "image token {image_token:?} (from {origin}) has id {id}, but the model config's \
                 image_token_index is {image_token_id}"
            )));
        }

        let gen_path = dir.join("generation_config.json");
        let gen = read_json_opt(&gen_path)?.unwrap_or(Json::Null);
        let gen_ids = |key: &str| -> Result<Option<Vec<u32>>> {
            match gen.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(v) => json_token_ids(v).map(Some).ok_or_else(|| Error::Config {
                    path: gen_path.clone(),
                    key: key.into(),
                    reason: format!("expected a token id or a list of token ids, found {v}"),
                }),
            }
        };
        let lookup =
            |token: &Option<String>| token.as_deref().and_then(|t| tokenizer.token_to_id(t));

        let vocab = tokenizer.get_vocab_size(true);
        let (mut eos_token_ids, eos_origin) = match gen_ids("eos_token_id")? {
            Some(ids) => {
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(Error::Config {
                        path: gen_path.clone(),
                        key: "eos_token_id".into(),
                        reason: format!(
                            "{id} is outside the vocabulary: {} has {vocab} tokens (ids 0..{vocab})",
                            tokenizer_path.display()
                        ),
                    });
                }
                (ids, EosOrigin(gen_path.clone(), "eos_token_id".into()))
            }
            None => {
                // special_tokens_map.json overrides tokenizer_config.json (SpecialTokens).
                let map = dir.join("special_tokens_map.json");
                let from_map = read_json_opt(&map)?.is_some_and(|j| j.get("eos_token").is_some());
                let path = if from_map { map } else { tok_cfg_path.clone() };
                (
                    lookup(&special.eos).into_iter().collect(),
                    EosOrigin(path, "eos_token".into()),
                )
            }
        };
        let mut seen = std::collections::HashSet::new();
        eos_token_ids.retain(|id| seen.insert(*id));
        let bos_token_id = match lookup(&special.bos) {
            Some(id) => Some(id),
            None => gen_ids("bos_token_id")?.and_then(|ids| ids.first().copied()),
        };
        let pad_token_id = match lookup(&special.pad) {
            Some(id) => Some(id),
            None => gen_ids("pad_token_id")?.and_then(|ids| ids.first().copied()),
        };

        Ok(TextProcessor {
            tokenizer,
            tokenizer_path,
            special,
            image_token,
            image_token_id,
            num_image_tokens,
            eos_token_ids,
            eos_origin,
            bos_token_id,
            pad_token_id,
            clean_up_tokenization_spaces,
        })
    }

    fn tok_err(&self, e: impl fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.tokenizer_path.clone(),
            reason: e.to_string(),
        }
    }

    /// `LlavaProcessor` semantics: every occurrence of the image token string is replaced by
    /// `num_image_tokens` copies, then the text is tokenized with special tokens (BOS through
    /// the post-processor) unless it already starts with the BOS string, as
    /// `ProcessorMixin.apply_chat_template` does to avoid a double BOS.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let add_special_tokens = !self
            .special
            .bos
            .as_deref()
            .is_some_and(|bos| !bos.is_empty() && text.starts_with(bos));
        let expanded = self.expand_image_tokens(text);
        let encoding = self
            .tokenizer
            .encode(expanded.as_ref(), add_special_tokens)
            .map_err(|e| self.tok_err(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The processor's string expansion of the image token, without tokenizing.
    pub fn expand_image_tokens<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if text.contains(self.image_token.as_str()) {
            Cow::Owned(text.replace(
                self.image_token.as_str(),
                &self.image_token.repeat(self.num_image_tokens),
            ))
        } else {
            Cow::Borrowed(text)
        }
    }

    /// Tokenize a continuation/description on its own, without special tokens and without
    /// image-token expansion.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| self.tok_err(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decode ids to text, applying `clean_up_tokenization_spaces` when the tokenizer config
    /// asks for it (as `transformers`' `decode` does).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.tok_err(e))?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn image_token(&self) -> &str {
        &self.image_token
    }

    pub fn image_token_id(&self) -> u32 {
        self.image_token_id
    }

    pub fn num_image_tokens(&self) -> usize {
        self.num_image_tokens
    }

    /// `generation_config.json` `eos_token_id` (an id or a list) when present, otherwise the
    /// tokenizer's EOS token; empty when neither is known. Deduplicated, order kept.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_ids.clone()
    }

    /// Refuse EOS ids the model can never produce (`id >= model_vocab`, the size of its output
    /// layer): generation would then only stop at its length limit. The error names the file and
    /// key the ids came from, the id and both sizes.
    pub fn check_eos_within(&self, model_vocab: usize, model_config: &Path) -> Result<()> {
        match self
            .eos_token_ids
            .iter()
            .find(|&&id| id as usize >= model_vocab)
        {
            None => Ok(()),
            Some(&id) => Err(Error::Config {
                path: self.eos_origin.0.clone(),
                key: self.eos_origin.1.clone(),
                reason: format!(
                    "EOS id {id} is outside the model's vocabulary: {} has text_config.vocab_size \
                     {model_vocab} (ids 0..{model_vocab}), so generation would never stop at it",
                    model_config.display()
                ),
            }),
        }
    }

    /// The BOS token's id (tokenizer config, else `generation_config.json`).
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The PAD token's id (tokenizer config, else `generation_config.json`).
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    /// Vocabulary size including added tokens (`len(tokenizer)` in Python). The model's
    /// embedding matrix may be larger (padded).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn tokenizer_path(&self) -> &Path {
        &self.tokenizer_path
    }
}

/// A token id or a list of token ids.
fn json_token_ids(v: &Json) -> Option<Vec<u32>> {
    let one = |v: &Json| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match v {
        Json::Array(items) => items.iter().map(one).collect(),
        v => one(v).map(|id| vec![id]),
    }
}

/// Pick the image token string; returns it and where it came from.
fn resolve_image_token(
    dir: &Path,
    tokenizer: &Tokenizer,
    tok_cfg: &Json,
    image_token_id: u32,
    default_token: &str,
) -> Result<(String, String)> {
    let tok_cfg_path = dir.join("tokenizer_config.json");
    if let Some(v) = tok_cfg
        .get("extra_special_tokens")
        .and_then(|m| m.get("image_token"))
    {
        if let Some(t) = token_string(v, &tok_cfg_path, "extra_special_tokens.image_token")? {
            return Ok((t, format!("{}", tok_cfg_path.display())));
        }
    }
    if let Some(v) = tok_cfg.get("image_token") {
        if let Some(t) = token_string(v, &tok_cfg_path, "image_token")? {
            return Ok((t, format!("{}", tok_cfg_path.display())));
        }
    }
    let proc_path = dir.join("processor_config.json");
    if let Some(proc) = read_json_opt(&proc_path)? {
        if let Some(v) = proc.get("image_token") {
            if let Some(t) = token_string(v, &proc_path, "image_token")? {
                return Ok((t, format!("{}", proc_path.display())));
            }
        }
    }
    if tokenizer.token_to_id(default_token).is_none() {
        if let Some(added) = tokenizer.get_added_tokens_decoder().get(&image_token_id) {
            return Ok((
                added.content.clone(),
                format!("the added token with id {image_token_id}"),
            ));
        }
    }
    Ok((default_token.to_string(), "the default".to_string()))
}

/// Rebuild a Llama/Gemma tokenizer's post-processor from `add_bos_token`/`add_eos_token`, as
/// `LlamaTokenizerFast.__init__` (via `update_post_processor`) does in `transformers`.
/// Only done when the config names such a class and sets at least one flag.
fn apply_llama_post_processor(
    tokenizer: &mut Tokenizer,
    tok_cfg: &Json,
    tok_cfg_path: &Path,
    special: &SpecialTokens,
    tokenizer_path: &Path,
) -> Result<()> {
    let class = tok_cfg
        .get("tokenizer_class")
        .and_then(Json::as_str)
        .unwrap_or_default();
    let class = class.strip_suffix("Fast").unwrap_or(class);
    if !matches!(
        class,
        "LlamaTokenizer" | "CodeLlamaTokenizer" | "GemmaTokenizer"
    ) {
        return Ok(());
    }
    let add_bos = tok_cfg.get("add_bos_token").and_then(Json::as_bool);
    let add_eos = tok_cfg.get("add_eos_token").and_then(Json::as_bool);
    if add_bos.is_none() && add_eos.is_none() {
        return Ok(());
    }
    let (add_bos, add_eos) = (add_bos.unwrap_or(true), add_eos.unwrap_or(false));

    let mut special_tokens: Vec<(String, u32)> = Vec::new();
    let mut resolve = |flag: bool, token: &Option<String>, key: &str| -> Result<Option<String>> {
        if !flag {
            return Ok(None);
        }
        let token = token.clone().ok_or_else(|| Error::Config {
            path: tok_cfg_path.to_path_buf(),
            key: format!("add_{key}"),
            reason: format!("is true but no {key} is defined"),
        })?;
        let id = tokenizer
            .token_to_id(&token)
            .ok_or_else(|| Error::Tokenizer {
                path: tokenizer_path.to_path_buf(),
                reason: format!("{key} {token:?} is not in the vocabulary"),
            })?;
        special_tokens.push((token.clone(), id));
        Ok(Some(token))
    };
    let bos = resolve(add_bos, &special.bos, "bos_token")?;
    let eos = resolve(add_eos, &special.eos, "eos_token")?;

    let mut single: Vec<String> = Vec::new();
    let mut pair: Vec<String> = Vec::new();
    if let Some(bos) = &bos {
        single.push(format!("{bos}:0"));
    }
    single.push("$A:0".into());
    if let Some(eos) = &eos {
        single.push(format!("{eos}:0"));
    }
    pair.extend(single.iter().cloned());
    if let Some(bos) = &bos {
        pair.push(format!("{bos}:1"));
    }
    pair.push("$B:1".into());
    if let Some(eos) = &eos {
        pair.push(format!("{eos}:1"));
    }
    let err = |e: String| Error::Tokenizer {
        path: tokenizer_path.to_path_buf(),
        reason: format!("cannot build the BOS/EOS post-processor: {e}"),
    };
    let processor = TemplateProcessing::builder()
        .try_single(single)
        .map_err(|e| err(e.to_string()))?
        .try_pair(pair)
        .map_err(|e| err(e.to_string()))?
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| err(e.to_string()))?;
    tokenizer.with_post_processor(Some(processor));
    Ok(())
}

/// `transformers`' `clean_up_tokenization`.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
