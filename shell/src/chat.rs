//! Conversations with a loaded model.

use crate::adapter::bindings::exports::edgechat::adapter::prompt;
use anyhow::{bail, Context, Result};

/// Reads an OpenAI-style message list.
pub fn read_messages(text: &str) -> Result<Vec<prompt::Message>> {
    let value: serde_json::Value = serde_json::from_str(text).context("messages are not valid JSON")?;
    let list = value.as_array().context("messages must be a JSON list of {\"role\", \"content\"} objects")?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |name: &str| -> Result<String> {
                match m.get(name) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(_) => bail!("message {i}: `{name}` must be a string"),
                    None => bail!("message {i}: `{name}` is missing"),
                }
            };
            Ok(prompt::Message { role: field("role")?, content: field("content")? })
        })
        .collect()
}

