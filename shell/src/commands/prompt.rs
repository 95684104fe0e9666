//! `edgechat prompt`: the exact prompt text the model sees for a chat.

use crate::adapter::bindings::exports::edgechat::adapter::prompt;
use crate::adapter::Adapter;
use crate::chat::read_messages;
use crate::shell::Shell;
use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::path::Path;

/// Picks the adapter and the model's own tokenizer config for a catalog id or a model directory.
pub fn resolve_for_prompt<'a>(shell: &'a Shell, model: &str) -> Result<(&'a Adapter, Option<String>)> {
    let dir = Path::new(model);
    if dir.is_dir() {
        let config = crate::paths::read_capped(&dir.join("config.json"), crate::paths::MAX_CONFIG_BYTES).with_context(|| format!("{} has no readable config.json", dir.display()))?;
        let config: serde_json::Value = serde_json::from_str(&config).with_context(|| format!("{}/config.json is not valid JSON", dir.display()))?;
        let model_type = config.get("model_type").and_then(|t| t.as_str()).with_context(|| format!("{}/config.json has no model_type", dir.display()))?;
        let adapter = shell.registry.for_architecture(model_type)?;
        return Ok((adapter, read_optional(&dir.join("tokenizer_config.json"))?));
    }
    let entry = shell.catalog.get(model).with_context(|| {
        let ids: Vec<&str> = shell.catalog.models.iter().map(|m| m.id.as_str()).collect();
        format!("unknown model `{model}` (catalog: {}; or give a model directory)", ids.join(", "))
    })?;
    let adapter = shell.registry.get(&entry.adapter)?;
    let tokenizer_config = read_optional(&shell.model_dir(&entry.source).join("tokenizer_config.json"))?;
    Ok((adapter, tokenizer_config))
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn run(model: &str, messages: &Path, add_generation_prompt: bool) -> Result<()> {
    let text = if messages == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading messages from stdin")?;
        s
    } else {
        std::fs::read_to_string(messages).with_context(|| format!("reading {}", messages.display()))?
    };
    let messages = read_messages(&text).with_context(|| format!("in {}", messages.display()))?;
    let shell = Shell::open()?;
    let (adapter, tokenizer_config) = resolve_for_prompt(&shell, model)?;
    let options = prompt::FormatOptions { add_generation_prompt, tokenizer_config };
    let formatted = adapter.instantiate()?.format(&messages, &options).with_context(|| format!("cannot format the chat for {model}"))?;
    let mut out = std::io::stdout().lock();
    out.write_all(formatted.text.as_bytes())?;
    out.flush()?;
    Ok(())
}
