//! Finding adapters: user-installed ones (`<data dir>/adapters`) first, then those shipped with the
//! build. The first adapter of a given name wins, so an installed update replaces a built-in adapter.

use super::{Adapter, AdapterHost};
use crate::paths::Paths;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub struct Registry {
    pub adapters: Vec<Adapter>,
    /// Components that were refused or failed to load, with the reason; shown by `adapters list`.
    pub problems: Vec<(PathBuf, String)>,
}

impl Registry {
    pub fn discover(host: &AdapterHost, paths: &Paths) -> Registry {
        let mut dirs = vec![paths.user_adapters()];
        dirs.extend(Paths::builtin_adapters());
        Self::from_dirs(host, &dirs)
    }

    pub fn from_dirs(host: &AdapterHost, dirs: &[PathBuf]) -> Registry {
        let mut registry = Registry { adapters: Vec::new(), problems: Vec::new() };
        let mut seen_dirs: Vec<PathBuf> = Vec::new();
        for dir in dirs {
            let Ok(canonical) = dir.canonicalize() else { continue };
            if seen_dirs.contains(&canonical) {
                continue;
            }
            seen_dirs.push(canonical);
            for path in wasm_files(dir) {
                match host.load(&path) {
                    Ok(adapter) if registry.adapters.iter().any(|a| a.name() == adapter.name()) => {
                        tracing::debug!("{} is shadowed by an adapter of the same name", path.display());
                    }
                    Ok(adapter) => registry.adapters.push(adapter),
                    Err(e) => registry.problems.push((path, format!("{e:#}"))),
                }
            }
        }
        registry
    }

    pub fn get(&self, name: &str) -> Result<&Adapter> {
        match self.adapters.iter().find(|a| a.name() == name) {
            Some(a) => Ok(a),
            None => bail!("no adapter named `{name}` is installed ({})", self.names()),
        }
    }

    /// The adapter that runs a config.json `model_type` / GGUF `general.architecture`.
    pub fn for_architecture(&self, architecture: &str) -> Result<&Adapter> {
        match self.adapters.iter().find(|a| a.info.architectures.iter().any(|x| x == architecture)) {
            Some(a) => Ok(a),
            None => bail!("no installed adapter runs architecture `{architecture}` ({})", self.names()),
        }
    }

    fn names(&self) -> String {
        if self.adapters.is_empty() {
            return "no adapters found: run `cargo xtask adapters`".into();
        }
        let names: Vec<&str> = self.adapters.iter().map(|a| a.name()).collect();
        format!("installed: {}", names.join(", "))
    }
}

fn wasm_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "wasm")).collect();
    files.sort();
    files
}
