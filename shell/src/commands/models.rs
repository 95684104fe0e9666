//! `edgechat models`: the catalog as the adapters describe it, and what is on disk.

use crate::catalog::runtime_label;
use crate::models::local_state;
use crate::shell::Shell;
use crate::text::{human_bytes, human_count};
use anyhow::Result;

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

pub fn run(json: bool) -> Result<()> {
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
