//! Prompt rendering and tokenization for LLaVA-family (llava-hf layout) models.
//!
//! One renderer and one tokenizer wrapper shared by scoring, generation, training and evaluation,
//! so that every stage feeds the model exactly the token ids that Hugging Face's
//! `LlavaProcessor` + `apply_chat_template` would produce.
//!
//! * [`ChatTemplate`] renders a conversation with the model's own Jinja chat template, compiled
//!   by minijinja with the settings `transformers` uses (`trim_blocks`, `lstrip_blocks`, no
//!   trailing newline, `raise_exception`, a Python-`json.dumps` `tojson`, `strftime_now`,
//!   Python string/dict methods through `minijinja_contrib::pycompat`, Python-style printing of
//!   `True`/`False`/`None`/floats/containers).
//! * [`TextProcessor`] wraps `tokenizer.json` and applies the processor's image-token expansion
//!   (the image token string is repeated `num_image_tokens` times *before* tokenizing).

mod environment;
mod files;
mod pycompat;
mod special;
mod template;
mod tokenize;

#[cfg(test)]
mod tests;

pub use special::SpecialTokens;
pub use template::{ChatTemplate, Role, TemplateSource, Turn};
pub use tokenize::TextProcessor;

/// Default image placeholder of `LlavaProcessor`.
pub const DEFAULT_IMAGE_TOKEN: &str = "<image>";

/// What a model family assumes when its model directory does not say: the image placeholder
/// string, and the chat template used when the directory has none. Each family in
/// `model::family` names its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptDefaults {
    pub image_token: &'static str,
    /// What precedes the text of an image turn when a template receives string content
    /// (tokenizer templates and the fallback): `<image>\n` for LLaVA, `<|image|>` for Mllama.
    pub image_prefix: &'static str,
    /// Jinja source; receives string content.
    pub fallback_template: &'static str,
}

impl PromptDefaults {
    /// LLaVA-1.5: `<image>` and the `USER: <image>\n{prompt} ASSISTANT:` prompt.
    pub const LLAVA: PromptDefaults = PromptDefaults {
        image_token: DEFAULT_IMAGE_TOKEN,
        image_prefix: "<image>\n",
        fallback_template: template::LLAVA_FALLBACK_TEMPLATE,
    };

    /// Llama-3.2-Vision: `<|image|>` right before the text, Llama-3 headers.
    pub const MLLAMA: PromptDefaults = PromptDefaults {
        image_token: "<|image|>",
        image_prefix: "<|image|>",
        fallback_template: template::LLAMA3_FALLBACK_TEMPLATE,
    };
}
