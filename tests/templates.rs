//! Chat templates rendered inside the adapters (as components under wasmtime) against goldens made with
//! Hugging Face transformers (tests/fixtures/make_template_goldens.py).

mod common;

use edgechat::adapter::bindings::exports::edgechat::adapter::prompt::{FormatOptions, Message};
use edgechat::adapter::AdapterError;
use serde_json::Value;

fn goldens() -> Vec<Value> {
    serde_json::from_str(&std::fs::read_to_string(common::fixture("template_goldens.json")).unwrap()).unwrap()
}

fn messages(case: &Value) -> Vec<Message> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message { role: m["role"].as_str().unwrap().into(), content: m["content"].as_str().unwrap().into() })
        .collect()
}

fn check(adapter: &str, key: &str, tokenizer_config: Option<String>) {
    let mut session = common::load(adapter).instantiate().unwrap();
    let cases = goldens();
    assert!(cases.len() >= 16, "goldens are missing");
    for case in &cases {
        let name = format!("{adapter} {} (generation prompt: {})", case["name"], case["add_generation_prompt"]);
        let options = FormatOptions {
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            tokenizer_config: tokenizer_config.clone(),
        };
        let result = session.format(&messages(case), &options);
        match (&case[key], &case[format!("{key}_error")]) {
            (Value::String(expected), _) => {
                let got = result.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(&got.text, expected, "{name}");
            }
            (_, Value::String(error)) => match result {
                Err(AdapterError::Refused(message)) => assert_eq!(&message, error, "{name}"),
                other => panic!("{name}: expected the template error {error:?}, got {other:?}"),
            },
            _ => panic!("{name}: golden has no expectation"),
        }
    }
}

#[test]
fn gemma_matches_transformers_with_the_models_own_template() {
    let config = std::fs::read_to_string(common::fixture("gemma3-chat/tokenizer_config.json")).unwrap();
    check("gemma", "gemma", Some(config));
}

#[test]
fn gemma_builtin_template_matches_transformers() {
    check("gemma", "gemma", None);
}

#[test]
fn lfm2_matches_its_chatml_format() {
    check("leap", "lfm2", None);
}

#[test]
fn stop_sequences_come_from_the_adapters() {
    let one = [Message { role: "user".into(), content: "hi".into() }];
    let options = FormatOptions { add_generation_prompt: true, tokenizer_config: None };
    let gemma = common::load("gemma").instantiate().unwrap().format(&one, &options).unwrap();
    assert_eq!(gemma.stop_sequences, ["<end_of_turn>", "<eos>"]);
    let leap = common::load("leap").instantiate().unwrap().format(&one, &options).unwrap();
    assert_eq!(leap.stop_sequences, ["<|im_end|>", "<|endoftext|>"]);
}

#[test]
fn a_snapshots_own_template_wins_for_lfm2() {
    let config = r#"{"bos_token": "<|startoftext|>", "chat_template": "{{ bos_token }}custom:{% for m in messages %}{{ m.content }}{% endfor %}"}"#;
    let options = FormatOptions { add_generation_prompt: false, tokenizer_config: Some(config.into()) };
    let out = common::load("leap")
        .instantiate()
        .unwrap()
        .format(&[Message { role: "user".into(), content: "x".into() }], &options)
        .unwrap();
    assert_eq!(out.text, "<|startoftext|>custom:x");
}

#[test]
fn lfm2_refuses_unknown_roles_and_bad_configs() {
    let mut session = common::load("leap").instantiate().unwrap();
    let options = FormatOptions { add_generation_prompt: true, tokenizer_config: None };
    let err = session.format(&[Message { role: "wizard".into(), content: "x".into() }], &options).unwrap_err();
    assert!(err.to_string().contains("Unknown role 'wizard'"), "{err}");
    let bad = FormatOptions { add_generation_prompt: true, tokenizer_config: Some("{not json".into()) };
    let err = session.format(&[Message { role: "user".into(), content: "x".into() }], &bad).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json is not valid JSON"), "{err}");
}
