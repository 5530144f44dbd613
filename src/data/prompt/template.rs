//! Chat templates: where a model directory's template is found, the conversation types it
//! renders ([`Turn`], [`Role`]), and how turns are shaped into the messages `transformers`
//! hands to the template.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{Environment, Value};
use serde_json::Value as Json;

use super::environment::{neutralize_generation_tags, new_environment, raised_message};
use super::files::{read_json_opt, read_text_opt};
use super::special::SpecialTokens;
use super::PromptDefaults;
use crate::error::{Error, Result};

/// The LLaVA-1.5 prompt used when a model directory ships no chat template:
/// `USER: <image>\n{prompt} ASSISTANT:`.
///
/// Multi-turn conversations follow LLaVA's `vicuna_v1` separator style: a system turn is
/// written as `{text} `, a user turn as `USER: {text} ` (with `<image>\n` before the text when
/// the turn has an image), an assistant turn as `ASSISTANT: {text}{eos}` (`eos` is the
/// tokenizer's EOS string, `</s>` when unknown), and the generation prompt is `ASSISTANT:`.
/// So a two-turn chat renders as `USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:`.
/// Content reaches this template as strings (like a tokenizer template).
pub(super) const LLAVA_FALLBACK_TEMPLATE: &str = "{% for message in messages %}\
{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}\
{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}\
{% else %}{{ 'ASSISTANT: ' + message['content'] }}{{ eos_token if eos_token else '</s>' }}\
{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

/// Llama 3's chat format, for a Llama-3.2-Vision directory without a chat template: every turn
/// is `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>` after the BOS, and the
/// generation prompt opens an assistant header. Content arrives as strings (`<|image|>` + text
/// for an image turn, as the official template writes it).
pub(super) const LLAMA3_FALLBACK_TEMPLATE: &str = "{{ bos_token if bos_token else '' }}\
{% for message in messages %}\
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// The name the single template is registered under in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Where a chat template came from; decides how message content is shaped.
///
/// Processor templates (`chat_template.json`, `chat_template.jinja`, or the legacy
/// `processor_config.json` `"chat_template"` key, reported as [`TemplateSource::ProcessorJson`])
/// receive structured content (`[{"type": "image"}, {"type": "text", "text": ...}]`), as
/// `ProcessorMixin.apply_chat_template` passes it. Tokenizer templates
/// (`tokenizer_config.json`) and the fallback receive string content (`"<image>\n" + text`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TemplateSource {
    /// `chat_template.json` (`{"chat_template": "..."}`), or `processor_config.json`'s
    /// legacy `"chat_template"` key.
    ProcessorJson,
    /// `chat_template.jinja`.
    ProcessorJinja,
    /// `tokenizer_config.json` `"chat_template"` (a string, or a list of `{name, template}`
    /// from which `"default"` is taken).
    TokenizerConfig,
    /// The built-in LLaVA-1.5 prompt, see [`ChatTemplate::fallback`].
    Fallback,
}

impl TemplateSource {
    /// Whether this source's templates expect structured (list-of-items) message content.
    pub fn structured_content(self) -> bool {
        matches!(
            self,
            TemplateSource::ProcessorJson | TemplateSource::ProcessorJinja
        )
    }
}

impl fmt::Display for TemplateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TemplateSource::ProcessorJson => "processor chat template (chat_template.json)",
            TemplateSource::ProcessorJinja => "processor chat template (chat_template.jinja)",
            TemplateSource::TokenizerConfig => "tokenizer chat template (tokenizer_config.json)",
            TemplateSource::Fallback => "built-in LLaVA-1.5 fallback template",
        })
    }
}

/// The speaker of a conversation turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role name templates see (`"system"`, `"user"`, `"assistant"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One conversation turn: who speaks, what they say, and whether an image is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub text: String,
    pub image: bool,
}

impl Turn {
    pub fn new(role: Role, text: impl Into<String>, image: bool) -> Self {
        Turn {
            role,
            text: text.into(),
            image,
        }
    }
    pub fn system(text: impl Into<String>) -> Self {
        Turn::new(Role::System, text, false)
    }
    pub fn user(text: impl Into<String>, image: bool) -> Self {
        Turn::new(Role::User, text, image)
    }
    pub fn assistant(text: impl Into<String>) -> Self {
        Turn::new(Role::Assistant, text, false)
    }
}

/// A compiled chat template plus the special tokens it is rendered with.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: TemplateSource,
    special: SpecialTokens,
    /// Human-readable origin for error messages (a file path or the source kind).
    origin: String,
    text: String,
    /// Written before the text of an image turn when content reaches the template as strings.
    image_prefix: &'static str,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("origin", &self.origin)
            .field("special", &self.special)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Find the chat template of a model directory.
    ///
    /// Order (`ProcessorMixin.get_processor_dict`, then the tokenizer's): `chat_template.json`
    /// (the legacy file wins over `chat_template.jinja` when both exist, as in `transformers`),
    /// `chat_template.jinja`, `processor_config.json` `"chat_template"`, `tokenizer_config.json`
    /// `"chat_template"`; otherwise [`ChatTemplate::fallback`]. Templates under
    /// `additional_chat_templates/` are not used.
    /// Special tokens come from `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        Self::from_model_dir_with(dir, &PromptDefaults::LLAVA)
    }

    /// [`ChatTemplate::from_model_dir`] for a family whose image token and fallback template
    /// are `defaults`.
    pub fn from_model_dir_with(dir: &Path, defaults: &PromptDefaults) -> Result<Self> {
        let mut template = Self::find_in_dir(dir, defaults)?;
        template.image_prefix = defaults.image_prefix;
        Ok(template)
    }

    fn find_in_dir(dir: &Path, defaults: &PromptDefaults) -> Result<Self> {
        let special = SpecialTokens::from_model_dir(dir)?;

        let json_path = dir.join("chat_template.json");
        if let Some(json) = read_json_opt(&json_path)? {
            let value = json.get("chat_template").ok_or_else(|| Error::Config {
                path: json_path.clone(),
                key: "chat_template".into(),
                reason: "missing".into(),
            })?;
            let text = template_text(value, &json_path)?;
            return Self::compile(text, TemplateSource::ProcessorJson, special, &json_path);
        }

        let jinja = dir.join("chat_template.jinja");
        if let Some(text) = read_text_opt(&jinja)? {
            return Self::compile(text, TemplateSource::ProcessorJinja, special, &jinja);
        }

        let proc_path = dir.join("processor_config.json");
        if let Some(json) = read_json_opt(&proc_path)? {
            match json.get("chat_template") {
                None | Some(Json::Null) => {}
                Some(value) => {
                    let text = template_text(value, &proc_path)?;
                    return Self::compile(text, TemplateSource::ProcessorJson, special, &proc_path);
                }
            }
        }

        let tok_path = dir.join("tokenizer_config.json");
        if let Some(json) = read_json_opt(&tok_path)? {
            match json.get("chat_template") {
                None | Some(Json::Null) => {}
                Some(value) => {
                    let text = template_text(value, &tok_path)?;
                    return Self::compile(
                        text,
                        TemplateSource::TokenizerConfig,
                        special,
                        &tok_path,
                    );
                }
            }
        }

        let mut fallback = Self::fallback_of(defaults);
        fallback.special = special;
        Ok(fallback)
    }

    /// Compile `template` now; a syntax error is an [`Error::Template`] naming `source`.
    pub fn from_source(
        template: String,
        source: TemplateSource,
        special: SpecialTokens,
    ) -> Result<Self> {
        let origin = source.to_string();
        Self::build(template, source, special, origin)
    }

    /// The LLaVA-1.5 prompt `USER: <image>\n{prompt} ASSISTANT:` (see [`LLAVA_FALLBACK_TEMPLATE`]'s
    /// documentation for multi-turn conversations), with no special tokens known.
    pub fn fallback() -> Self {
        Self::fallback_of(&PromptDefaults::LLAVA)
    }

    /// A family's fallback template, with no special tokens known.
    pub fn fallback_of(defaults: &PromptDefaults) -> Self {
        match Self::build(
            defaults.fallback_template.to_string(),
            TemplateSource::Fallback,
            SpecialTokens::default(),
            TemplateSource::Fallback.to_string(),
        ) {
            Ok(t) => Self {
                image_prefix: defaults.image_prefix,
                ..t
            },
            // The constant template is covered by tests; this arm cannot be reached.
            Err(e) => unreachable!("built-in fallback template does not compile: {e}"),
        }
    }

    fn compile(
        template: String,
        source: TemplateSource,
        special: SpecialTokens,
        path: &Path,
    ) -> Result<Self> {
        let origin = format!("{source} at {}", path.display());
        Self::build(template, source, special, origin)
    }

    fn build(
        template: String,
        source: TemplateSource,
        special: SpecialTokens,
        origin: String,
    ) -> Result<Self> {
        let mut env = new_environment();
        let prepared = neutralize_generation_tags(&template).into_owned();
        env.add_template_owned(TEMPLATE_NAME, prepared)
            .map_err(|e| Error::Template(format!("cannot compile {origin}: {e}")))?;
        Ok(ChatTemplate {
            env,
            source,
            special,
            origin,
            text: template,
            image_prefix: PromptDefaults::LLAVA.image_prefix,
        })
    }

    pub fn source(&self) -> TemplateSource {
        self.source
    }

    /// The special tokens passed to the template as `bos_token`, `eos_token`, ...
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The template text as found (before `{% generation %}` tags are neutralised).
    pub fn template_text(&self) -> &str {
        &self.text
    }

    /// Render a conversation. With `add_generation_prompt` the template appends the assistant
    /// prefix (e.g. `ASSISTANT:`), as in `apply_chat_template(add_generation_prompt=True)`.
    ///
    /// A template's `raise_exception(msg)` becomes `Error::Template(msg)`; other render
    /// failures are `Error::Template` naming the template's origin.
    pub fn render(&self, turns: &[Turn], add_generation_prompt: bool) -> Result<String> {
        let structured = self.source.structured_content();
        let messages: Vec<Value> = turns
            .iter()
            .map(|turn| message_value(turn, structured, self.image_prefix))
            .collect();

        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            // transformers passes these explicitly as None; `tools is not none` must be false.
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        for (key, token) in [
            ("bos_token", &self.special.bos),
            ("eos_token", &self.special.eos),
            ("unk_token", &self.special.unk),
            ("pad_token", &self.special.pad),
        ] {
            if let Some(token) = token {
                ctx.push((key, Value::from(token.as_str())));
            }
        }
        let ctx: Value = ctx.into_iter().collect();

        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template(format!("{}: {e}", self.origin)))?;
        template.render(ctx).map_err(|e| match raised_message(&e) {
            Some(msg) => Error::Template(msg),
            None => Error::Template(format!("cannot render {}: {e}", self.origin)),
        })
    }

    /// One user turn carrying the image and `prompt`, with the generation prompt added.
    pub fn render_user_prompt(&self, prompt: &str) -> Result<String> {
        self.render(&[Turn::user(prompt, true)], true)
    }
}

/// The template text of a `"chat_template"` value: a string, a list of `{name, template}`
/// (the `"default"` entry), or a `{name: template}` map (the `"default"` key).
fn template_text(value: &Json, path: &Path) -> Result<String> {
    let err = |reason: String| Error::Config {
        path: path.to_path_buf(),
        key: "chat_template".into(),
        reason,
    };
    match value {
        Json::String(s) => Ok(s.clone()),
        Json::Array(items) => {
            for item in items {
                if item.get("name").and_then(Json::as_str) == Some("default") {
                    return match item.get("template") {
                        Some(Json::String(s)) => Ok(s.clone()),
                        _ => Err(err("entry \"default\" has no string \"template\"".into())),
                    };
                }
            }
            let names: Vec<&str> = items
                .iter()
                .filter_map(|i| i.get("name").and_then(Json::as_str))
                .collect();
            Err(err(format!(
                "list of named templates has no \"default\" entry (found {names:?})"
            )))
        }
        Json::Object(map) => match map.get("default") {
            Some(Json::String(s)) => Ok(s.clone()),
            _ => Err(err(format!(
                "map of named templates has no string \"default\" entry (found {:?})",
                map.keys().collect::<Vec<_>>()
            ))),
        },
        other => Err(err(format!(
            "expected a string or a list of {{name, template}}, found {other}"
        ))),
    }
}

/// Shape one turn the way `transformers` hands it to the template.
fn message_value(turn: &Turn, structured: bool, image_prefix: &str) -> Value {
    let content = if structured {
        let mut items = Vec::with_capacity(2);
        if turn.image {
            items.push(OrderedMap::value(vec![("type", Value::from("image"))]));
        }
        items.push(OrderedMap::value(vec![
            ("type", Value::from("text")),
            ("text", Value::from(turn.text.as_str())),
        ]));
        Value::from(items)
    } else if turn.image {
        Value::from(format!("{image_prefix}{}", turn.text))
    } else {
        Value::from(turn.text.as_str())
    };
    OrderedMap::value(vec![
        ("role", Value::from(turn.role.as_str())),
        ("content", content),
    ])
}

/// A string-keyed map that keeps insertion order, like the Python dicts `transformers` builds
/// (minijinja's own maps are sorted unless its `preserve_order` feature is on). Order shows in
/// `message.items()` and `messages | tojson`.
#[derive(Debug)]
struct OrderedMap(Vec<(&'static str, Value)>);

impl OrderedMap {
    fn value(entries: Vec<(&'static str, Value)>) -> Value {
        Value::from_object(OrderedMap(entries))
    }
}

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|(k, _)| Value::from(*k)).collect())
    }
}
