//! `edgechat select`: remember the model to use.

use crate::adapter::bindings::exports::edgechat::adapter::catalog::RuntimeKind;
use crate::catalog::runtime_label;
use crate::shell::Shell;
use anyhow::{bail, Result};

/// `edgechat select`: remember the model to use, with the adapter and runtime that run it.
pub fn run(model: &str) -> Result<()> {
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
