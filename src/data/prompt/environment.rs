//! The minijinja environment chat templates are compiled in, configured like `transformers`'
//! jinja2 sandbox, plus the rewrite of HF's `{% generation %}` tags.

use std::borrow::Cow;
use std::fmt;
use std::fmt::Write as _;

use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};

use super::pycompat::{python_formatter, strftime_utc, tojson_filter};

/// The marker attached to errors raised by the template's `raise_exception`.
#[derive(Debug)]
struct RaisedException(String);

impl fmt::Display for RaisedException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// The message of a `raise_exception` call somewhere in this error's chain.
pub(super) fn raised_message(err: &minijinja::Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return Some(raised.0.clone());
        }
        current = e.source();
    }
    None
}

/// A minijinja environment configured like `transformers`' `_compile_jinja_template`:
/// `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with loop controls,
/// `raise_exception`, `strftime_now` and a `json.dumps`-based `tojson`.
pub(super) fn new_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    // jinja2's default `Undefined`: prints as "", iterates as empty, fails on attribute access.
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_function(
        "raise_exception",
        |msg: Option<Value>| -> std::result::Result<Value, minijinja::Error> {
            let msg = match msg {
                Some(v) => v.as_str().map_or_else(|| v.to_string(), str::to_string),
                None => "raise_exception called".to_string(),
            };
            Err(
                minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone())
                    .with_source(RaisedException(msg)),
            )
        },
    );
    env.add_function("strftime_now", |format: String| -> String {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        strftime_utc(&format, secs)
    });
    env.add_filter("tojson", tojson_filter);
    env
}

/// Rewrite HF's `{% generation %}` / `{% endgeneration %}` block tags (an extension
/// `transformers` registers to track assistant tokens; it renders its body unchanged) into
/// `{% if true %}` / `{% endif %}`, which minijinja understands. Replacing rather than deleting
/// the tags keeps their whitespace control (`{%-`, `-%}`, and `trim_blocks`/`lstrip_blocks`,
/// which apply to block tags) exactly as jinja2 applies it to the original tags.
pub(super) fn neutralize_generation_tags(src: &str) -> Cow<'_, str> {
    if !src.contains("generation") {
        return Cow::Borrowed(src);
    }
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match parse_generation_tag(tag) {
            Some((len, open_marker, close_marker, is_end)) => {
                let body = if is_end { "endif" } else { "if true" };
                let _ = write!(out, "{{%{open_marker} {body} {close_marker}%}}");
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Parse `{%[-+]? generation|endgeneration [-+]?%}` at the start of `s`.
/// Returns (length, opening marker, closing marker, is_end).
fn parse_generation_tag(s: &str) -> Option<(usize, &str, &str, bool)> {
    let mut i = 2; // past "{%"
    let bytes = s.as_bytes();
    let open = match bytes.get(i) {
        Some(b'-') => "-",
        Some(b'+') => "+",
        _ => "",
    };
    i += open.len();
    while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    let word_start = i;
    while bytes
        .get(i)
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
    {
        i += 1;
    }
    let is_end = match s.get(word_start..i)? {
        "generation" => false,
        "endgeneration" => true,
        _ => return None,
    };
    while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    let close = match bytes.get(i) {
        Some(b'-') => "-",
        Some(b'+') => "+",
        _ => "",
    };
    i += close.len();
    if s.get(i..i + 2)? != "%}" {
        return None;
    }
    Some((i + 2, open, close, is_end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::prompt::{ChatTemplate, SpecialTokens, TemplateSource, Turn};

    #[test]
    fn generation_tags_keep_whitespace_control() {
        assert_eq!(
            neutralize_generation_tags("a{% generation %}b{%- endgeneration -%}c"),
            "a{% if true %}b{%- endif -%}c"
        );
        assert_eq!(
            neutralize_generation_tags("{%+generation%}{%endgeneration+%}"),
            "{%+ if true %}{% endif +%}"
        );
        // Not a generation tag: untouched.
        let other = "{% if generation %}{{ generation }}{% endif %}{% generations %}";
        assert_eq!(neutralize_generation_tags(other), other);
        assert_eq!(neutralize_generation_tags("{% generation"), "{% generation");

        // trim_blocks removes the newline after the tag, as jinja2 does for the original tag.
        let src = "{% for m in messages %}{% generation %}\n{{ m['content'] }}\n{% endgeneration %}\n{% endfor %}";
        let t = ChatTemplate::from_source(
            src.into(),
            TemplateSource::TokenizerConfig,
            SpecialTokens::default(),
        )
        .unwrap();
        assert_eq!(
            t.render(&[Turn::user("x", false), Turn::assistant("y")], false)
                .unwrap(),
            "x\ny\n"
        );
    }
}
