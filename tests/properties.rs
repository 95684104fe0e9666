//! Property tests: whatever message list a user (or a file) supplies, formatting through a real adapter
//! component either succeeds or fails with the template's own error; it never traps the adapter or
//! panics the host.

mod common;

use edgechat::adapter::bindings::exports::edgechat::adapter::prompt::{FormatOptions, Message};
use edgechat::adapter::AdapterError;
use proptest::prelude::*;

fn role() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("user".to_owned()),
        Just("assistant".to_owned()),
        Just("system".to_owned()),
        Just("tool".to_owned()),
        ".{0,12}",
    ]
}

fn messages() -> impl Strategy<Value = Vec<Message>> {
    prop::collection::vec((role(), any::<String>()).prop_map(|(role, content)| Message { role, content }), 0..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_messages_never_crash_an_adapter(messages in messages(), add_generation_prompt: bool) {
        for name in ["gemma", "leap"] {
            let mut session = common::load(name).instantiate().unwrap();
            let options = FormatOptions { add_generation_prompt, tokenizer_config: None };
            match session.format(&messages, &options) {
                Ok(formatted) => {
                    let bos = if name == "gemma" { "<bos>" } else { "<|startoftext|>" };
                    prop_assert!(formatted.text.starts_with(bos));
                    // Content reaches the prompt verbatim (Gemma trims, as its template says).
                    for m in messages.iter().filter(|m| m.role != "system") {
                        let content = if name == "gemma" { m.content.trim_matches(adapter_whitespace) } else { m.content.as_str() };
                        prop_assert!(formatted.text.contains(content));
                    }
                }
                Err(AdapterError::Refused(_)) => {}
                Err(trap @ AdapterError::Trapped { .. }) => prop_assert!(false, "{name} trapped: {trap}"),
            }
        }
    }

    #[test]
    fn arbitrary_tokenizer_configs_never_crash_an_adapter(config in ".{0,64}", template in ".{0,48}") {
        let one = [Message { role: "user".into(), content: "hi".into() }];
        for tokenizer_config in [config.clone(), serde_json::json!({ "chat_template": template }).to_string()] {
            let mut session = common::load("gemma").instantiate().unwrap();
            let options = FormatOptions { add_generation_prompt: true, tokenizer_config: Some(tokenizer_config) };
            if let Err(trap @ AdapterError::Trapped { .. }) = session.format(&one, &options) {
                prop_assert!(false, "trapped: {trap}");
            }
        }
    }
}

/// Python's `str.strip()` whitespace, which Gemma's template `trim` follows.
fn adapter_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}
