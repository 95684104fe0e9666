//! What every edgechat adapter shares: the bindings of the adapter world, the export glue ([`adapter`]:
//! an adapter is a `Family` and a `Graph`), neural-network blocks ([`nn`]), hub listings ([`hub`]) and
//! chat templates.
//!
//! Chat templates are rendered the way Hugging Face transformers' `apply_chat_template` renders them, so a
//! model's own Jinja template produces byte-identical prompts: `trim_blocks` and `lstrip_blocks` on, no
//! trailing newline kept, a `raise_exception` function, the tokenizer's special tokens in the context, and
//! Python's string methods (`.strip()`, `.startswith()`, ...) available on values.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

pub mod wit {
    //! Bindings for the whole adapter world: the host imports the graph code calls, and the exports
    //! [`adapter`](crate::adapter) implements once for every adapter.
    wit_bindgen::generate!({
        path: "../../wit/v0.3.0",
        world: "edgechat:adapter/adapter@0.3.0",
        pub_export_macro: true,
        generate_all,
        // Decode steps are compared op for op before one becomes a template (see `step`); the types
        // holding arrays (handles) are not compared.
        additional_derives: [PartialEq],
        additional_derives_ignore: ["mask", "entry", "quantized-entry"],
    });
}

pub mod adapter;
pub mod hub;
pub mod nn;
pub mod ops;
pub mod selftest;
pub mod step;

/// One chat message as the template sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What a model's tokenizer_config.json contributes to prompt formatting.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

impl TokenizerConfig {
    /// Reads the fields that matter from tokenizer_config.json text. Special tokens may be plain strings or
    /// `{"content": ...}` objects; the chat template may be a string or a list of named templates, of which
    /// the one named "default" is used.
    pub fn parse(json: &str) -> Result<Self, String> {
        // Only these fields are read into values. Gemma 3's file is 1.1 MB, nearly all of it 6415
        // added tokens, and this memory (the adapter's) never shrinks: read as one `Value`, a run's peak
        // RSS was 2.3 MB higher.
        #[derive(serde::Deserialize)]
        struct Fields {
            chat_template: Option<serde_json::Value>,
            bos_token: Option<serde_json::Value>,
            eos_token: Option<serde_json::Value>,
            unk_token: Option<serde_json::Value>,
            pad_token: Option<serde_json::Value>,
        }
        let fields: Fields = match serde_json::from_str(json) {
            Ok(fields) => fields,
            Err(e) if e.is_data() => return Err(format!("tokenizer_config.json: {e}")),
            Err(e) => return Err(format!("tokenizer_config.json is not valid JSON: {e}")),
        };
        let token = |field: &Option<serde_json::Value>| match field {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
            _ => None,
        };
        let chat_template = match &fields.chat_template {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            Some(_) => return Err("tokenizer_config.json: chat_template is neither a string nor a list".into()),
        };
        Ok(Self {
            chat_template,
            bos_token: token(&fields.bos_token),
            eos_token: token(&fields.eos_token),
            unk_token: token(&fields.unk_token),
            pad_token: token(&fields.pad_token),
        })
    }
}

/// Renders `template` for `messages`. Errors raised by the template itself (`raise_exception`) come back
/// as their message, so the user sees e.g. "Conversation roles must alternate user/assistant/...".
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    tokens: &TokenizerConfig,
) -> Result<String, String> {
    if messages.is_empty() {
        // As transformers does, before any template runs.
        return Err("Cannot apply chat template to an empty conversation. Provide at least one message.".into());
    }
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_filter("trim", python_strip);
    env.add_template("chat", template).map_err(|e| format!("chat template does not parse: {}", describe(&e)))?;
    let context = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        tools => Value::from(()),
        documents => Value::from(()),
        bos_token => tokens.bos_token.as_deref().unwrap_or(""),
        eos_token => tokens.eos_token.as_deref().unwrap_or(""),
        unk_token => tokens.unk_token.as_deref(),
        pad_token => tokens.pad_token.as_deref(),
    };
    env.get_template("chat")
        .and_then(|t| t.render(context))
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation if is_raised(&e) => e.detail().unwrap_or_default()[RAISED.len()..].to_owned(),
            _ => format!("chat template failed: {}", describe(&e)),
        })
}

const RAISED: &str = "raise_exception: ";

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
}

fn is_raised(e: &Error) -> bool {
    e.detail().is_some_and(|d| d.starts_with(RAISED))
}

fn describe(e: &Error) -> String {
    let detail = e.detail().map(|d| d.strip_prefix(RAISED).unwrap_or(d));
    match (detail, e.line()) {
        (Some(d), Some(line)) => format!("{} (line {line}): {d}", e.kind()),
        (Some(d), None) => format!("{}: {d}", e.kind()),
        (None, _) => e.to_string(),
    }
}

/// Jinja's `trim` in transformers is Python's `str.strip()`, whose notion of whitespace is slightly wider
/// than Rust's (it includes the ASCII separators U+001C..U+001F).
fn python_strip(value: String) -> String {
    value.trim_matches(is_python_whitespace).to_owned()
}

pub fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    #[test]
    fn raise_exception_surfaces_its_message() {
        let tpl = "{% if messages[0].content == 'bad' %}{{ raise_exception('bad message') }}{% endif %}ok";
        let err = render_chat_template(tpl, &[msg("user", "bad")], false, &TokenizerConfig::default()).unwrap_err();
        assert_eq!(err, "bad message");
        assert_eq!(render_chat_template(tpl, &[msg("user", "x")], false, &Default::default()).unwrap(), "ok");
    }

    #[test]
    fn trim_is_python_strip() {
        assert_eq!(python_strip("\u{1c} a b \u{3000}\n".into()), "a b");
    }

    #[test]
    fn parses_object_tokens_and_named_templates() {
        let cfg = TokenizerConfig::parse(
            r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]}"#,
        )
        .unwrap();
        assert_eq!(cfg.bos_token.as_deref(), Some("<s>"));
        assert_eq!(cfg.eos_token.as_deref(), Some("</s>"));
        assert_eq!(cfg.chat_template.as_deref(), Some("y"));
    }

    #[test]
    fn other_fields_are_skipped_and_wrong_types_named() {
        let cfg = TokenizerConfig::parse(
            r#"{"added_tokens_decoder": {"0": {"content": "<pad>", "special": true}}, "pad_token": null,
                "unk_token": 7, "chat_template": "t", "model_max_length": 1e30}"#,
        )
        .unwrap();
        assert_eq!((cfg.pad_token, cfg.unk_token, cfg.chat_template.as_deref()), (None, None, Some("t")));
        let err = TokenizerConfig::parse(r#"{"chat_template": 3}"#).unwrap_err();
        assert!(err.contains("chat_template is neither a string nor a list"), "{err}");
        let err = TokenizerConfig::parse("3").unwrap_err();
        assert!(err.starts_with("tokenizer_config.json: invalid type"), "{err}");
        let err = TokenizerConfig::parse("{not json").unwrap_err();
        assert!(err.contains("tokenizer_config.json is not valid JSON"), "{err}");
    }
}
