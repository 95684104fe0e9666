//! Which adapters this shell runs. Three places, in order of precedence for a given adapter name:
//!
//! 1. development components, unsigned `.wasm` files in `<data dir>/adapters/` — only when
//!    `EDGECHAT_DEV_ADAPTERS=1` is set; otherwise they are listed as refused;
//! 2. installed packages, the active version of each (see [`crate::updates`]) — re-verified on every
//!    start against the keys trusted *now*, so untrusting a key refuses what it signed;
//! 3. built-in components, shipped beside the executable or built in the checkout.
//!
//! The first that loads wins; the rest are listed as shadowed, and everything refused says why.

use crate::adapter::{Adapter, AdapterHost, Origin};
use crate::db::Db;
use crate::paths::Paths;
use crate::updates;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// Set to 1 to run unsigned adapters from `<data dir>/adapters/` (adapter development).
pub const DEV_ADAPTERS_VAR: &str = "EDGECHAT_DEV_ADAPTERS";

pub struct Registry {
    /// The adapter that runs for each name.
    pub adapters: Vec<Adapter>,
    /// Everything found, in order of precedence, with its state: what `adapters list` shows.
    pub listed: Vec<Listed>,
}

/// One component found, whether or not it runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    /// The adapter's name; for a component that could not be loaded, its file name.
    pub name: String,
    pub version: Option<String>,
    pub contract: Option<String>,
    pub families: Vec<String>,
    pub origin: Origin,
    pub path: PathBuf,
    pub sha256: Option<String>,
    pub state: State,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "reason")]
pub enum State {
    Active,
    /// Loads, but a component earlier in precedence has the same name.
    Shadowed,
    /// An installed version kept for `rollback`.
    Kept,
    Refused(String),
}

impl Listed {
    fn loaded(adapter: &Adapter) -> Listed {
        Listed {
            name: adapter.info.name.clone(),
            version: Some(adapter.info.version.clone()),
            contract: Some(adapter.info.contract_version.clone()),
            families: adapter.info.families.clone(),
            origin: adapter.origin.clone(),
            path: adapter.path.clone(),
            sha256: Some(adapter.sha256.clone()),
            state: State::Active,
        }
    }

    /// A component listed without being loaded: refused, or kept for rollback.
    fn unloaded(name: String, version: Option<String>, origin: Origin, path: &Path, state: State) -> Listed {
        Listed { name, version, contract: None, families: Vec::new(), origin, path: path.to_owned(), sha256: None, state }
    }

    fn refused(name: String, version: Option<String>, origin: Origin, path: &Path, reason: String) -> Listed {
        Self::unloaded(name, version, origin, path, State::Refused(reason))
    }
}

pub fn dev_adapters_enabled() -> bool {
    std::env::var(DEV_ADAPTERS_VAR).is_ok_and(|v| v == "1")
}

impl Registry {
    pub fn discover(host: &AdapterHost, paths: &Paths, db: &Db) -> Registry {
        let mut found: Vec<Result<Adapter, Listed>> = Vec::new();
        for path in wasm_files(&paths.user_adapters()) {
            let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            found.push(if dev_adapters_enabled() {
                std::fs::read(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|bytes| host.load_bytes(&bytes, &path, Origin::Development))
                    .map_err(|e| Listed::refused(file_name, None, Origin::Development, &path, format!("{e:#}")))
            } else {
                Err(Listed::refused(
                    file_name,
                    None,
                    Origin::Development,
                    &path,
                    format!("unsigned; set {DEV_ADAPTERS_VAR}=1 to run development adapters, or install a signed package"),
                ))
            });
        }
        let kept = Self::installed_into(host, &updates::Store::new(paths, db), &mut found);
        Self::builtin_into(host, &Paths::builtin_adapters(), &mut found);
        let mut registry = Self::resolve(found);
        registry.listed.extend(kept);
        registry
    }

    /// The active version of each installed adapter (or why it is refused); returns the kept versions.
    fn installed_into(host: &AdapterHost, store: &updates::Store, found: &mut Vec<Result<Adapter, Listed>>) -> Vec<Listed> {
        let states = store.states().unwrap_or_else(|e| {
            tracing::warn!("installed adapters are unavailable: {e:#}");
            Vec::new()
        });
        let mut kept = Vec::new();
        for state in states {
            if let Some(active) = &state.active {
                let path = store.package_path(&state.name, active);
                found.push(store.load_version(host, &state.name, active).map_err(|e| {
                    Listed::refused(state.name.clone(), Some(active.clone()), Origin::Installed { signer: "unverified".into() }, &path, format!("{e:#}"))
                }));
            }
            if let Some(previous) = state.previous.as_ref().filter(|v| store.package_path(&state.name, v).exists()) {
                let path = store.package_path(&state.name, previous);
                kept.push(Listed::unloaded(state.name.clone(), Some(previous.clone()), Origin::Installed { signer: "unverified".into() }, &path, State::Kept));
            }
        }
        kept
    }

    /// The version each adapter name runs without development adapters: what an install must exceed.
    pub fn current(&self) -> updates::Current {
        let mut current = updates::Current::new();
        for l in &self.listed {
            if l.origin != Origin::Development && matches!(l.state, State::Active | State::Shadowed) {
                if let Some(version) = &l.version {
                    current.entry(l.name.clone()).or_insert((version.clone(), l.origin.clone()));
                }
            }
        }
        current
    }

    /// Built-in adapters only, from `dirs` (tests, and `adapters test`'s clean room).
    pub fn from_dirs(host: &AdapterHost, dirs: &[PathBuf]) -> Registry {
        let mut found = Vec::new();
        Self::builtin_into(host, dirs, &mut found);
        Self::resolve(found)
    }

    fn builtin_into(host: &AdapterHost, dirs: &[PathBuf], found: &mut Vec<Result<Adapter, Listed>>) {
        let mut seen_dirs: Vec<PathBuf> = Vec::new();
        for dir in dirs {
            let Ok(canonical) = dir.canonicalize() else { continue };
            if seen_dirs.contains(&canonical) {
                continue;
            }
            seen_dirs.push(canonical);
            for path in wasm_files(dir) {
                let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                found.push(host.load(&path).map_err(|e| Listed::refused(file_name, None, Origin::BuiltIn, &path, format!("{e:#}"))));
            }
        }
    }

    /// The first loaded component of each name runs; later ones are shadowed.
    fn resolve(found: Vec<Result<Adapter, Listed>>) -> Registry {
        let mut registry = Registry { adapters: Vec::new(), listed: Vec::new() };
        for item in found {
            match item {
                Ok(adapter) => {
                    let mut listed = Listed::loaded(&adapter);
                    if registry.adapters.iter().any(|a| a.name() == adapter.name()) {
                        listed.state = State::Shadowed;
                    } else {
                        registry.adapters.push(adapter);
                    }
                    registry.listed.push(listed);
                }
                Err(listed) => registry.listed.push(listed),
            }
        }
        registry
    }

    /// Components that were refused, with the reason.
    pub fn refused(&self) -> impl Iterator<Item = (&Path, &str)> {
        self.listed.iter().filter_map(|l| match &l.state {
            State::Refused(reason) => Some((l.path.as_path(), reason.as_str())),
            _ => None,
        })
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

    /// The adapter for `architecture`, releasing every other loaded one (its compiled code and memory
    /// image, ~6 MiB of the peak RSS each): for a process that runs one model (`run`, `bench`). `chat` and
    /// `serve` keep them all, since they may switch models. What was found stays listed.
    pub fn keep_only_for_architecture(&mut self, architecture: &str) -> Result<&Adapter> {
        let name = self.for_architecture(architecture)?.name().to_owned();
        self.adapters.retain(|a| a.name() == name);
        self.get(&name)
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
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "wasm")).collect();
    files.sort();
    files
}
