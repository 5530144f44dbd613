//! Chat template rendering and template discovery in model directories.

use super::{fixture_dir, write};
use crate::data::prompt::{ChatTemplate, SpecialTokens, TemplateSource, Turn};
use crate::error::{Error, Result};

/// chat_template.json of llava-hf/llava-1.5-7b-hf, verbatim.
const LLAVA15_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

/// Mistral-Instruct-v0.1 style tokenizer template (string content, role alternation check).
const MISTRAL_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

fn llama_special() -> SpecialTokens {
    SpecialTokens {
        bos: Some("<s>".into()),
        eos: Some("</s>".into()),
        unk: Some("<unk>".into()),
        pad: Some("<pad>".into()),
    }
}

fn llava15() -> ChatTemplate {
    ChatTemplate::from_source(
        LLAVA15_TEMPLATE.into(),
        TemplateSource::ProcessorJson,
        llama_special(),
    )
    .unwrap()
}

fn render_str(template: &str, source: TemplateSource, turns: &[Turn]) -> Result<String> {
    ChatTemplate::from_source(template.into(), source, llama_special())?.render(turns, true)
}

#[test]
fn llava15_golden_single_turn() {
    let t = llava15();
    assert_eq!(
        t.render_user_prompt("What is shown?").unwrap(),
        "USER: <image>\nWhat is shown? ASSISTANT:"
    );
    assert_eq!(
        t.render(&[Turn::user("What is shown?", false)], false)
            .unwrap(),
        "USER: What is shown? "
    );
}

#[test]
fn llava15_golden_multi_turn_and_system() {
    let t = llava15();
    let turns = [
        Turn::system("Be brief."),
        Turn::user("What is shown?", true),
        Turn::assistant("A cell."),
        Turn::user("Which kind?", false),
    ];
    // The {% generation %} block renders its body unchanged.
    assert_eq!(
        t.render(&turns, true).unwrap(),
        "Be brief. USER: <image>\nWhat is shown? ASSISTANT: A cell. USER: Which kind? ASSISTANT:"
    );
    assert_eq!(
        t.render(&turns[1..3], false).unwrap(),
        "USER: <image>\nWhat is shown? ASSISTANT: A cell. "
    );
}

#[test]
fn processor_content_is_structured_tokenizer_content_is_string() {
    let src = "{% for m in messages %}{{ m['content'] | tojson }};{% endfor %}";
    let turns = [Turn::user("hi", true), Turn::assistant("ok")];
    assert_eq!(
            render_str(src, TemplateSource::ProcessorJinja, &turns).unwrap(),
            "[{\"type\": \"image\"}, {\"type\": \"text\", \"text\": \"hi\"}];[{\"type\": \"text\", \"text\": \"ok\"}];"
        );
    assert_eq!(
        render_str(src, TemplateSource::TokenizerConfig, &turns).unwrap(),
        "\"<image>\\nhi\";\"ok\";"
    );
}

#[test]
fn mistral_tokenizer_template_and_raise_exception() {
    let turns = [
        Turn::user("What is shown?", true),
        Turn::assistant("A cell."),
        Turn::user("Sure?", false),
    ];
    assert_eq!(
        render_str(MISTRAL_TEMPLATE, TemplateSource::TokenizerConfig, &turns).unwrap(),
        "<s>[INST] <image>\nWhat is shown? [/INST]A cell.</s> [INST] Sure? [/INST]"
    );
    let bad = [Turn::user("a", false), Turn::user("b", false)];
    match render_str(MISTRAL_TEMPLATE, TemplateSource::TokenizerConfig, &bad) {
        Err(Error::Template(msg)) => assert_eq!(
            msg,
            "Conversation roles must alternate user/assistant/user/assistant/..."
        ),
        other => panic!("expected a template error, got {other:?}"),
    }
    let system = [Turn::system("s")];
    match render_str(MISTRAL_TEMPLATE, TemplateSource::TokenizerConfig, &system) {
        Err(Error::Template(msg)) => {
            assert_eq!(
                msg,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            )
        }
        other => panic!("expected a template error, got {other:?}"),
    }
}

#[test]
fn fallback_rendering() {
    let t = ChatTemplate::fallback();
    assert_eq!(t.source(), TemplateSource::Fallback);
    assert_eq!(
        t.render_user_prompt("What is shown?").unwrap(),
        "USER: <image>\nWhat is shown? ASSISTANT:"
    );
    let turns = [
        Turn::system("You are a pathologist."),
        Turn::user("q1", true),
        Turn::assistant("a1"),
        Turn::user("q2", false),
    ];
    assert_eq!(
        t.render(&turns, true).unwrap(),
        "You are a pathologist. USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    );
    assert_eq!(
        t.render(&turns[1..3], false).unwrap(),
        "USER: <image>\nq1 ASSISTANT: a1</s>"
    );
}

#[test]
fn compile_error_names_source() {
    let err = ChatTemplate::from_source(
        "{% for m in messages %}".into(),
        TemplateSource::TokenizerConfig,
        SpecialTokens::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Template(_)));
    assert!(text.contains("tokenizer_config.json"), "{text}");
}

#[test]
fn render_error_is_template_error() {
    let t = ChatTemplate::from_source(
        "{{ messages[0].content.nope.deeper }}".into(),
        TemplateSource::TokenizerConfig,
        SpecialTokens::default(),
    )
    .unwrap();
    let err = t.render(&[Turn::user("x", false)], false).unwrap_err();
    assert!(
        matches!(err, Error::Template(ref m) if m.contains("cannot render")),
        "{err}"
    );
}

#[test]
fn special_tokens_and_tools_in_context() {
    let src = "[{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ tools is none }}|{{ documents is none }}|{{ add_generation_prompt }}]";
    assert_eq!(
        render_str(src, TemplateSource::TokenizerConfig, &[]).unwrap(),
        "[<s>|</s>|<unk>|<pad>|True|True|True]"
    );
    // Unknown special tokens are undefined: they print as nothing.
    let t = ChatTemplate::from_source(
        "[{{ bos_token }}]{% if bos_token is defined %}x{% endif %}".into(),
        TemplateSource::TokenizerConfig,
        SpecialTokens::default(),
    )
    .unwrap();
    assert_eq!(t.render(&[], false).unwrap(), "[]");
}

#[test]
fn python_methods_and_printing() {
    let src = "{% for m in messages %}{{ m['content'].strip().startswith('hi') }} {% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}{% endfor %}|{{ none }}|{{ 1.0 }}|{{ 1e16 }}|{{ [1, 'a', none] }}";
    assert_eq!(
        render_str(
            src,
            TemplateSource::TokenizerConfig,
            &[Turn::user("  hi x ", false)]
        )
        .unwrap(),
        "True role=user;content=  hi x ;|None|1.0|1e+16|[1, 'a', None]"
    );
    // Structured content prints as Python containers.
    let src = "{{ messages[0]['content'] }}";
    assert_eq!(
        render_str(
            src,
            TemplateSource::ProcessorJson,
            &[Turn::user("it's", true)]
        )
        .unwrap(),
        "[{'type': 'image'}, {'type': 'text', 'text': \"it's\"}]"
    );
}

#[test]
fn trim_and_lstrip_blocks_like_hf() {
    let src = "{% for m in messages %}\n    {% if true %}\n{{ m['content'] }}\n    {% endif %}\n{% endfor %}\n";
    assert_eq!(
        render_str(
            src,
            TemplateSource::TokenizerConfig,
            &[Turn::user("a", false), Turn::user("b", false)]
        )
        .unwrap(),
        "a\nb\n"
    );
}

#[test]
fn tojson_matches_python_json_dumps() {
    let t = |src: &str| render_str(src, TemplateSource::ProcessorJson, &[]).unwrap();
    assert_eq!(
        t("{{ {'a': 1, 'b': [1, 2.5, 'x\"<y>'], 'c': none, 'd': true} | tojson }}"),
        "{\"a\": 1, \"b\": [1, 2.5, \"x\\\"<y>\"], \"c\": null, \"d\": true}"
    );
    assert_eq!(
        t("{{ {'a': [1, {}], 'b': []} | tojson(indent=2) }}"),
        "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}"
    );
    assert_eq!(t("{{ 'é\\n' | tojson }}"), "\"é\\n\"");
    assert_eq!(
        t("{{ 'é😀' | tojson(ensure_ascii=true) }}"),
        "\"\\u00e9\\ud83d\\ude00\""
    );
    assert_eq!(
        t("{{ {'b': 1, 'a': 2} | tojson(separators=[',', ':'], sort_keys=true) }}"),
        "{\"a\":2,\"b\":1}"
    );
    // Message dicts keep Python's insertion order (role before content).
    assert_eq!(
        render_str(
            "{{ messages | tojson }}",
            TemplateSource::ProcessorJson,
            &[Turn::user("hi", false)]
        )
        .unwrap(),
        "[{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"hi\"}]}]"
    );
    let err = render_str("{{ nothing | tojson }}", TemplateSource::ProcessorJson, &[]);
    assert!(matches!(err, Err(Error::Template(_))));
}

// ----- model directories ----------------------------------------------------------------
#[test]
fn from_model_dir_search_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let t = ChatTemplate::from_model_dir(d).unwrap();
    assert_eq!(t.source(), TemplateSource::Fallback);
    assert_eq!(t.special_tokens(), &SpecialTokens::default());

    write(
        d,
        "tokenizer_config.json",
        r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>", "pad_token": null,
                "chat_template": "T{{ messages[0]['content'] }}{{ eos_token }}"}"#,
    );
    write(
        d,
        "special_tokens_map.json",
        r#"{"eos_token": {"content": "<eos>"}, "unk_token": "<unk>"}"#,
    );
    let t = ChatTemplate::from_model_dir(d).unwrap();
    assert_eq!(t.source(), TemplateSource::TokenizerConfig);
    assert_eq!(
        t.special_tokens(),
        &SpecialTokens {
            bos: Some("<s>".into()),
            eos: Some("<eos>".into()),
            unk: Some("<unk>".into()),
            pad: None
        }
    );
    assert_eq!(t.render_user_prompt("x").unwrap(), "T<image>\nx<eos>");

    write(
        d,
        "processor_config.json",
        r#"{"chat_template": "P{{ messages[0]['content'][1]['text'] }}"}"#,
    );
    let t = ChatTemplate::from_model_dir(d).unwrap();
    assert_eq!(t.source(), TemplateSource::ProcessorJson);
    assert_eq!(t.render_user_prompt("x").unwrap(), "Px");

    write(
        d,
        "chat_template.json",
        &serde_json::json!({"chat_template": LLAVA15_TEMPLATE}).to_string(),
    );
    let t = ChatTemplate::from_model_dir(d).unwrap();
    assert_eq!(t.source(), TemplateSource::ProcessorJson);
    assert_eq!(t.template_text(), LLAVA15_TEMPLATE);
    assert_eq!(
        t.render_user_prompt("x").unwrap(),
        "USER: <image>\nx ASSISTANT:"
    );

    // chat_template.json wins over chat_template.jinja, as in transformers.
    write(d, "chat_template.jinja", "J{{ messages | length }}\n");
    let t = ChatTemplate::from_model_dir(d).unwrap();
    assert_eq!(t.source(), TemplateSource::ProcessorJson);
    std::fs::remove_file(d.join("chat_template.json")).unwrap();
    let t = ChatTemplate::from_model_dir(d).unwrap();
    assert_eq!(t.source(), TemplateSource::ProcessorJinja);
    assert_eq!(t.render_user_prompt("x").unwrap(), "J1");
}

#[test]
fn tokenizer_config_named_templates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "tokenizer_config.json",
        r#"{"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "D{{ messages[0]['content'] }}"}]}"#,
    );
    let t = ChatTemplate::from_model_dir(d).unwrap();
    assert_eq!(t.render_user_prompt("x").unwrap(), "D<image>\nx");

    write(
        d,
        "tokenizer_config.json",
        r#"{"chat_template": [{"name": "tool_use", "template": "tools"}]}"#,
    );
    let err = ChatTemplate::from_model_dir(d).unwrap_err();
    assert!(
        matches!(&err, Error::Config { key, .. } if key == "chat_template"),
        "{err}"
    );
    assert!(err.to_string().contains("tool_use"), "{err}");

    write(
        d,
        "tokenizer_config.json",
        r#"{"chat_template": "{% if %}"}"#,
    );
    let err = ChatTemplate::from_model_dir(d).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    write(d, "tokenizer_config.json", "{not json");
    let err = ChatTemplate::from_model_dir(d).unwrap_err();
    assert!(matches!(&err, Error::Json { path, .. } if path.ends_with("tokenizer_config.json")));

    write(d, "tokenizer_config.json", r#"{"bos_token": 3}"#);
    let err = ChatTemplate::from_model_dir(d).unwrap_err();
    assert!(
        matches!(&err, Error::Config { key, .. } if key == "bos_token"),
        "{err}"
    );
}

#[test]
fn fixture_template_renders_parity_text() {
    let dir = fixture_dir("tiny-llava");
    if !dir.join("chat_template.jinja").is_file() {
        return;
    }
    let t = ChatTemplate::from_model_dir(&dir).unwrap();
    assert_eq!(t.source(), TemplateSource::ProcessorJinja);
    assert_eq!(
        t.render_user_prompt("What is shown?").unwrap(),
        "USER: <image>\nWhat is shown? ASSISTANT:"
    );
}
