//! The CLI commands. Each opens a [`Shell`] (paths, adapter host, discovered adapters) and does one thing.

pub mod adapters;
pub mod bench;
pub mod doctor;
pub mod import;
pub mod pull;
pub mod run;

use crate::adapter::bindings::exports::edgechat::adapter::{catalog::RuntimeKind, prompt};
use crate::adapter::{Adapter, AdapterHost};
use crate::registry::Registry;
use crate::catalog::{Catalog, Source};
use crate::host::Limits;
use crate::paths::Paths;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::Path;

pub struct Shell {
    pub paths: Paths,
    pub host: AdapterHost,
    pub registry: Registry,
    pub catalog: Catalog,
    pub db: crate::db::Db,
}

impl Shell {
    pub fn open() -> Result<Shell> {
        let paths = Paths::resolve()?;
        let host = AdapterHost::new(Limits::default(), Some(paths.compiled_adapters()))?;
        let db = crate::db::Db::open(&paths.database())?;
        let registry = Registry::discover(&host, &paths, &db);
        for (path, problem) in registry.refused() {
            tracing::warn!("skipped adapter {}: {problem}", path.display());
        }
        Ok(Shell { paths, host, registry, catalog: Catalog::builtin(), db })
    }

    /// Where a downloaded model lives: `Models/<org>--<name>/` for hub snapshots, `Models/<slug>-<quant>.bundle/`
    /// (holding the one bundle file) for Leap bundles.
    pub fn model_dir(&self, source: &Source) -> std::path::PathBuf {
        match source {
            Source::Hub { repo, .. } => self.paths.models().join(repo.replace('/', "--")),
            Source::Leap { slug, quantization } => self.paths.models().join(format!("{slug}-{quantization}.bundle")),
        }
    }
}

pub fn runtime_label(kind: RuntimeKind) -> &'static str {
    match kind {
        RuntimeKind::MlxSafetensors => "MLX (safetensors)",
        RuntimeKind::MlxGguf => "MLX (GGUF)",
        RuntimeKind::MlxLeapBundle => "MLX (Leap bundle)",
    }
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

fn human_count(n: u64) -> String {
    if n >= 950_000_000 { format!("{:.2}B", n as f64 / 1e9) } else { format!("{:.0}M", n as f64 / 1e6) }
}

/// Whether a model directory holds every file its manifest lists with the recorded size and hash, its
/// bytes on disk, its revision.
pub fn local_state(dir: &Path) -> Option<(bool, u64, Option<String>)> {
    let manifest: crate::models::Manifest = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).ok()?).ok()?;
    let bytes = manifest.files.iter().filter_map(|f| std::fs::metadata(dir.join(&f.path)).ok()).map(|m| m.len()).sum();
    let complete = manifest.files.iter().all(|f| f.is_intact(dir));
    Some((complete, bytes, manifest.revision))
}

fn state_label(state: &Option<(bool, u64, Option<String>)>) -> String {
    match state {
        Some((true, bytes, revision)) => {
            let rev = revision.as_deref().map(|r| format!(" @{}", &r[..r.len().min(7)])).unwrap_or_default();
            format!("{}{rev}", human_bytes(*bytes))
        }
        Some((false, _, _)) => "incomplete".into(),
        None => "-".into(),
    }
}

pub fn models(json: bool) -> Result<()> {
    let shell = Shell::open()?;
    let selected = crate::db::Db::open(&shell.paths.database())?.selected()?.map(|s| s.model);
    if !json {
        println!(
            "  {:<16} {:<28} {:<10} {:<18} {:>7} {:>8} {:>9} {:>9}  {}",
            "ID", "NAME", "PROVIDER", "RUNTIME", "PARAMS", "CONTEXT", "DOWNLOAD", "MEMORY", "ON DISK"
        );
    }
    for entry in &shell.catalog.models {
        let mark = if selected.as_deref() == Some(&entry.id) { "*" } else { " " };
        let state = local_state(&shell.model_dir(&entry.source));
        let description = shell
            .registry
            .get(&entry.adapter)
            .and_then(|a| a.instantiate())
            .and_then(|mut s| Ok(s.describe(&entry.source.to_wit())?));
        match (description, json) {
            (Ok(d), false) => println!(
                "{mark} {:<16} {:<28} {:<10} {:<18} {:>7} {:>8} {:>9} {:>9}  {}",
                entry.id,
                d.display_name,
                d.provider,
                runtime_label(d.runtime),
                human_count(d.parameters),
                d.context_length,
                human_bytes(d.download_bytes),
                human_bytes(d.memory_bytes),
                state_label(&state),
            ),
            (Ok(d), true) => println!(
                "{}",
                serde_json::json!({
                    "id": entry.id, "adapter": entry.adapter, "source": entry.source.to_string(),
                    "name": d.display_name, "family": d.family, "provider": d.provider,
                    "runtime": runtime_label(d.runtime), "parameters": d.parameters, "context_length": d.context_length,
                    "download_bytes": d.download_bytes, "memory_bytes": d.memory_bytes,
                    "downloaded": state.as_ref().is_some_and(|s| s.0), "bytes_on_disk": state.as_ref().map(|s| s.1),
                    "revision": state.and_then(|s| s.2), "selected": selected.as_deref() == Some(&entry.id),
                })
            ),
            (Err(e), false) => println!("{mark} {:<16} (unavailable: {e:#})", entry.id),
            (Err(e), true) => println!("{}", serde_json::json!({ "id": entry.id, "error": format!("{e:#}") })),
        }
    }
    let catalog_dirs: Vec<std::path::PathBuf> = shell.catalog.models.iter().map(|m| shell.model_dir(&m.source)).collect();
    for (dir, m) in crate::models::imported(&shell).into_iter().filter(|(dir, _)| !catalog_dirs.contains(dir)) {
        let state = local_state(&dir);
        if json {
            println!(
                "{}",
                serde_json::json!({ "id": m.id, "adapter": m.adapter, "architecture": m.architecture, "source": m.source,
                    "dtype": m.dtype, "downloaded": state.as_ref().is_some_and(|s| s.0), "bytes_on_disk": state.as_ref().map(|s| s.1),
                    "revision": m.revision, "selected": selected.as_deref() == Some(&m.id) })
            );
        } else {
            let mark = if selected.as_deref() == Some(&m.id) { "*" } else { " " };
            println!("{mark} {:<16} {:<28} {:<10} {:<18} {:>7} {:>8} {:>9} {:>9}  {}", m.id, m.architecture, "", format!("{} ({})", m.format, m.dtype), "", "", "", "", state_label(&state));
        }
    }
    Ok(())
}

/// `edgechat select`: remember the model to use, with the adapter and runtime that run it.
pub fn select(model: &str) -> Result<()> {
    let shell = Shell::open()?;
    let selection = if let Some(entry) = shell.catalog.get(model) {
        let description = shell.registry.get(&entry.adapter)?.instantiate()?.describe(&entry.source.to_wit())?;
        crate::db::Selection { model: model.to_owned(), adapter: entry.adapter.clone(), runtime: runtime_label(description.runtime).to_owned() }
    } else if let Some((_, m)) = crate::models::imported(&shell).into_iter().find(|(_, m)| m.id == model) {
        let runtime = if m.format == "gguf" { RuntimeKind::MlxGguf } else { RuntimeKind::MlxSafetensors };
        crate::db::Selection { model: model.to_owned(), adapter: m.adapter, runtime: runtime_label(runtime).to_owned() }
    } else {
        bail!("no model `{model}` in the catalog or among imported models");
    };
    crate::db::Db::open(&shell.paths.database())?.select(&selection)?;
    println!("selected {} (adapter {}, {})", selection.model, selection.adapter, selection.runtime);
    Ok(())
}

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

pub fn prompt(model: &str, messages: &Path, add_generation_prompt: bool) -> Result<()> {
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
