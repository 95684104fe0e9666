//! Loading, verifying and running adapters (WebAssembly components) in a sandbox.
//!
//! A component is accepted only if it imports nothing but our own interfaces (no WASI: no files, clock,
//! sockets or environment) at a contract version this shell knows, and exports the whole adapter world.
//! Every call runs with a fuel budget, a wall-clock deadline (epoch interruption, host time included), a
//! memory cap and caps on tensor handles; a call that traps — or that makes the shell itself panic in a
//! host call — discards the instance (its state may be corrupt) and is reported as an error naming the
//! adapter. The next call gets a fresh instance, so the shell keeps working.

pub mod bindings;
mod compiled;

use crate::host::{HostState, Limits};
use anyhow::{bail, Context, Result};
use bindings::exports::edgechat::adapter::{catalog, prompt};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, Store};

/// Contract versions this shell implements (see wit/).
pub const KNOWN_CONTRACTS: &[&str] = &["0.1.0", "0.2.0", "0.3.0"];
const PACKAGE: &str = "edgechat:adapter";
const IMPORTS: &[&str] = &["log", "tensor", "weights", "net"];
const EXPORTS: &[&str] = &["info", "catalog", "prompt", "runtime"];

/// One engine and linker for all adapters of this process.
#[derive(Clone)]
pub struct AdapterHost {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    limits: Limits,
    /// Where compiled components are cached; None disables the cache.
    cache_dir: Option<PathBuf>,
}

/// How a component's machine code was obtained.
#[derive(Debug, Clone, Copy)]
pub enum CodeSource {
    Compiled(Duration),
    Cached(Duration),
}

/// What an adapter says about itself (`info.get`), checked against what its component declares.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterInfo {
    pub name: String,
    pub version: String,
    pub contract_version: String,
    pub families: Vec<String>,
    pub architectures: Vec<String>,
    pub allowed_hosts: Vec<String>,
}

/// Where an adapter came from, which decides whether it may run (see [`crate::registry`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Origin {
    /// Shipped with this build: trusted as part of it.
    BuiltIn,
    /// A signed package, installed; `signer` is the id of the key that signed it.
    Installed { signer: String },
    /// An unsigned component in `<data dir>/adapters/`, loaded only with EDGECHAT_DEV_ADAPTERS=1.
    Development,
}

/// A verified, compiled adapter, ready to instantiate.
#[derive(Clone)]
pub struct Adapter {
    pub info: AdapterInfo,
    pub origin: Origin,
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub code: CodeSource,
    component: Component,
    host: AdapterHost,
}

/// An error from inside an adapter call, naming the adapter and what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The adapter returned an error value: its own, well-formed complaint (e.g. a template error).
    #[error("{0}")]
    Refused(String),
    /// The adapter trapped or hit a sandbox limit; its instance was discarded.
    #[error("adapter `{adapter}` was stopped during {call}: {reason}")]
    Trapped { adapter: String, call: String, reason: String },
}

/// How often the epoch advances: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// What runs adapter code: "cranelift" (machine code) or "pulley" (wasmtime's interpreter).
pub fn engine_kind() -> &'static str {
    if std::env::var("EDGECHAT_ADAPTER_ENGINE").as_deref() == Ok("pulley") { "pulley" } else { "cranelift" }
}

/// The process's one wasmtime engine, and the thread that advances its epoch for deadlines.
fn shared_engine() -> Result<Engine> {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    if let Some(engine) = ENGINE.get() {
        return Ok(engine.clone());
    }
    let mut config = Config::new();
    config.wasm_component_model(true).consume_fuel(true).epoch_interruption(true);
    // EDGECHAT_ADAPTER_ENGINE=pulley runs adapters on wasmtime's Pulley interpreter instead of machine
    // code from Cranelift: how they run where JIT is forbidden (iOS), measured by `edgechat bench`.
    match std::env::var("EDGECHAT_ADAPTER_ENGINE").as_deref() {
        Ok("pulley") => {
            config.target(if cfg!(target_pointer_width = "64") { "pulley64" } else { "pulley32" })?;
        }
        Ok("cranelift") | Ok("") | Err(_) => {}
        Ok(other) => anyhow::bail!("EDGECHAT_ADAPTER_ENGINE={other:?}: expected cranelift or pulley"),
    }
    let engine = Engine::new(&config)?;
    let engine = ENGINE.get_or_init(|| {
        let ticking = engine.clone();
        std::thread::Builder::new()
            .name("adapter-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(EPOCH_TICK);
                ticking.increment_epoch();
            })
            .expect("spawning the epoch thread");
        engine
    });
    Ok(engine.clone())
}

impl AdapterHost {
    pub fn new(limits: Limits, cache_dir: Option<PathBuf>) -> Result<Self> {
        let engine = shared_engine()?;
        let mut linker = Linker::new(&engine);
        bindings::add_to_linker(&mut linker)?;
        Ok(AdapterHost { engine, linker: Arc::new(linker), limits, cache_dir })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Reads, verifies and compiles (or loads from cache) one component file, as a built-in adapter.
    pub fn load(&self, path: &Path) -> Result<Adapter> {
        let bytes = std::fs::read(path).with_context(|| format!("reading adapter {}", path.display()))?;
        self.load_bytes(&bytes, path, Origin::BuiltIn)
    }

    /// Verifies and compiles a component already in memory; `path` names where it came from.
    pub fn load_bytes(&self, bytes: &[u8], path: &Path, origin: Origin) -> Result<Adapter> {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let started = Instant::now();
        let (component, cached) = compiled::load_or_compile(&self.engine, bytes, &sha256, self.cache_dir.as_deref())
            .with_context(|| format!("{} is not a valid WebAssembly component", path.display()))?;
        let elapsed = started.elapsed();
        let code = if cached { CodeSource::Cached(elapsed) } else { CodeSource::Compiled(elapsed) };
        let contract = verify_world(&self.engine, &component).with_context(|| format!("refusing adapter {}", path.display()))?;

        let placeholder = AdapterInfo {
            name: path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            version: String::new(),
            contract_version: contract.clone(),
            families: vec![],
            architectures: vec![],
            allowed_hosts: vec![],
        };
        let mut adapter =
            Adapter { info: placeholder, origin, path: path.to_owned(), sha256, size: bytes.len() as u64, code, component, host: self.clone() };
        let info = adapter.instantiate()?.info()?;
        check_info(&info).with_context(|| format!("refusing adapter {}", path.display()))?;
        if info.contract_version != contract {
            bail!(
                "refusing adapter {}: it reports contract {} but its component implements {contract}",
                path.display(),
                info.contract_version
            );
        }
        adapter.info = info;
        Ok(adapter)
    }
}

/// What an adapter says about itself is printed and used as a key: its name must be a plain identifier,
/// every other string short and printable (no terminal escapes).
fn check_info(info: &AdapterInfo) -> Result<()> {
    let name_ok = !info.name.is_empty()
        && info.name.len() <= 32
        && info.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !name_ok {
        bail!("its name {:?} is not a plain identifier (a-z, 0-9, - and _, up to 32)", crate::text::printable(&info.name, 40));
    }
    let strings = [&info.version, &info.contract_version].into_iter().chain(&info.families).chain(&info.architectures).chain(&info.allowed_hosts);
    for s in strings {
        if s.is_empty() || s.chars().count() > 128 || s.chars().any(char::is_control) {
            bail!("adapter {}: {:?} in its info is empty, too long or not printable", info.name, crate::text::printable(s, 40));
        }
    }
    if info.families.len() + info.architectures.len() + info.allowed_hosts.len() > 256 {
        bail!("adapter {}: its info lists too many entries", info.name);
    }
    Ok(())
}

/// Checks imports and exports by name before anything runs; returns the contract version.
fn verify_world(engine: &Engine, component: &Component) -> Result<String> {
    let ty = component.component_type();
    let mut version: Option<String> = None;
    let mut check = |name: &str, allowed: &[&str], direction: &str| -> Result<()> {
        let (interface, v) = name
            .strip_prefix(PACKAGE)
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|rest| rest.split_once('@'))
            .filter(|(interface, _)| allowed.contains(interface))
            .with_context(|| {
                format!("it {direction} `{name}`; adapters may use only the {PACKAGE} interfaces (no WASI, no other host APIs)")
            })?;
        if !KNOWN_CONTRACTS.contains(&v) {
            bail!("its {interface} interface is contract {v}; this edgechat supports {}", KNOWN_CONTRACTS.join(", "));
        }
        match &version {
            Some(seen) if seen != v => bail!("it mixes contract versions {seen} and {v}"),
            _ => version = Some(v.to_owned()),
        }
        Ok(())
    };
    for (name, _) in ty.imports(engine) {
        check(name, IMPORTS, "imports")?;
    }
    let mut exported = Vec::new();
    for (name, _) in ty.exports(engine) {
        check(name, EXPORTS, "exports")?;
        exported.push(name.to_owned());
    }
    let version = version.context("it exports nothing")?;
    for interface in EXPORTS {
        let name = format!("{PACKAGE}/{interface}@{version}");
        if !exported.contains(&name) {
            bail!("it does not export {name}");
        }
    }
    Ok(version)
}

/// A live instance of an adapter. A trap discards the instance; the next call makes a new one.
pub struct Session {
    adapter: Adapter,
    live: Option<(Store<HostState>, bindings::Instance)>,
    /// Counts instances made; resources (models, caches) belong to the instance that made them.
    instance: u64,
}

impl Adapter {
    pub fn instantiate(&self) -> Result<Session> {
        let mut session = Session { adapter: self.clone(), live: None, instance: 0 };
        session.ensure_live()?;
        Ok(session)
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }
}

impl Session {
    fn ensure_live(&mut self) -> Result<()> {
        if self.live.is_none() {
            let host = &self.adapter.host;
            let mut state = HostState::new(&self.adapter.info.name, &host.limits);
            state.net = crate::host::net::NetPolicy::new(&self.adapter.info.name, &self.adapter.info.allowed_hosts);
            let mut store = Store::new(&host.engine, state);
            store.limiter(|s| &mut s.limits);
            store.set_fuel(host.limits.fuel_per_call)?;
            store.set_epoch_deadline(epoch_ticks(host.limits.deadlines.quick));
            let bindings = bindings::Instance::instantiate(&mut store, &self.adapter.component, &host.linker, &self.adapter.info.contract_version)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("instantiating adapter {}", self.adapter.path.display()))?;
            self.live = Some((store, bindings));
            self.instance += 1;
        }
        Ok(())
    }

    /// Which instance is live now; a trap replaces it, invalidating the resources it held.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// The live instance's host state (its tensors, its open checkpoint).
    pub fn state_mut(&mut self) -> Result<&mut HostState> {
        self.ensure_live()?;
        Ok(self.live.as_mut().expect("instance is live").0.data_mut())
    }

    /// The live instance's host state, if there is one (a trap discards it).
    pub fn state(&self) -> Option<&HostState> {
        self.live.as_ref().map(|(store, _)| store.data())
    }

    /// Runs one export under a fresh fuel budget. A trap (including any sandbox limit) discards the
    /// instance and becomes [`AdapterError::Trapped`]; an `Err` the adapter returns becomes `Refused`.
    pub fn call<T>(
        &mut self,
        call: &str,
        f: impl FnOnce(&mut Store<HostState>, &bindings::Instance) -> wasmtime::Result<Result<T, String>>,
    ) -> Result<T, AdapterError> {
        let adapter = self.adapter.info.name.clone();
        let trapped = |reason: String| AdapterError::Trapped { adapter: adapter.clone(), call: call.to_owned(), reason };
        self.ensure_live().map_err(|e| trapped(format!("{e:#}")))?;
        let limits = &self.adapter.host.limits;
        let allowed = limits.deadlines.for_call(call);
        let (store, bindings) = self.live.as_mut().expect("instance is live");
        store.data_mut().deadline = Some(Instant::now() + allowed);
        store.set_epoch_deadline(epoch_ticks(allowed));
        // A panic in a host call (a shell bug, or one deep in a dependency) unwinds out of wasmtime to
        // here: it is this adapter call's failure, not the process's.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| store.set_fuel(limits.fuel_per_call).and_then(|_| f(store, bindings))));
        store.data_mut().deadline = None;
        match outcome {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(message))) => Err(AdapterError::Refused(crate::text::printable(&message, 2000))),
            Ok(Err(trap)) => {
                self.live = None;
                Err(trapped(describe_trap(&trap, limits, call)))
            }
            Err(panic) => {
                self.live = None;
                let what = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("");
                Err(trapped(format!("the shell failed while serving it (an edgechat bug, contained): {what}")))
            }
        }
    }

    pub fn info(&mut self) -> Result<AdapterInfo, AdapterError> {
        self.call("info.get", |store, b| {
            let i = b.info(store)?;
            Ok(Ok(AdapterInfo {
                name: i.name,
                version: i.version,
                contract_version: i.contract_version,
                families: i.families,
                architectures: i.architectures,
                allowed_hosts: i.allowed_hosts,
            }))
        })
    }

    pub fn describe(&mut self, source: &catalog::Source) -> Result<catalog::Description, AdapterError> {
        self.call("catalog.describe", |store, b| b.describe(store, source))
    }

    pub fn manifest(&mut self, source: &catalog::Source) -> Result<catalog::DownloadManifest, AdapterError> {
        self.call("catalog.manifest", |store, b| b.manifest(store, source))
    }

    pub fn format(&mut self, messages: &[prompt::Message], options: &prompt::FormatOptions) -> Result<prompt::Formatted, AdapterError> {
        self.call("prompt.format", |store, b| b.format(store, messages, options))
    }

    pub fn self_test(&mut self, a: &[f32], b: &[f32], n: u32) -> Result<Vec<Vec<f32>>, AdapterError> {
        self.call("runtime.self-test", |store, bi| bi.self_test(store, a, b, n))
    }

    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }
}

fn epoch_ticks(limit: Duration) -> u64 {
    (limit.as_millis() / EPOCH_TICK.as_millis()) as u64 + 1
}

/// Turns a wasmtime trap into a sentence a user can act on.
fn describe_trap(error: &wasmtime::Error, limits: &Limits, call: &str) -> String {
    let time_limit = || {
        format!(
            "it ran past its time limit of {:.1} s for {call} (set EDGECHAT_DEADLINE_SCALE to allow more on a slow machine)",
            limits.deadlines.for_call(call).as_secs_f64()
        )
    };
    if error.downcast_ref::<crate::host::DeadlinePassed>().is_some() {
        return time_limit();
    }
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => time_limit(),
        Some(wasmtime::Trap::OutOfFuel) => {
            format!("it ran past its compute budget of {} instructions per call (an endless loop?)", limits.fuel_per_call)
        }
        Some(wasmtime::Trap::AllocationTooLarge) | Some(wasmtime::Trap::HeapMisaligned) => format!("{error}"),
        Some(trap) => format!("it trapped: {trap}"),
        None => {
            let text = format!("{error:#}");
            if text.contains("forcing trap when growing memory") {
                format!("it tried to use more than its memory limit of {} MiB", limits.memory_bytes >> 20)
            } else {
                text
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, version: &str) -> AdapterInfo {
        AdapterInfo {
            name: name.into(),
            version: version.into(),
            contract_version: "0.1.0".into(),
            families: vec!["Test".into()],
            architectures: vec!["test".into()],
            allowed_hosts: vec!["hub".into()],
        }
    }

    #[test]
    fn adapter_info_must_be_safe_to_print() {
        assert!(check_info(&info("gemma", "1.2.3")).is_ok());
        for (name, version) in [("", "1"), ("Gemma", "1"), ("a\u{1b}[2J", "1"), ("../x", "1"), ("ok", "1\u{1b}]0;x\u{7}"), ("ok", "")] {
            let err = format!("{:#}", check_info(&info(name, version)).unwrap_err());
            assert!(!err.contains('\u{1b}'), "{err}");
        }
    }
}
