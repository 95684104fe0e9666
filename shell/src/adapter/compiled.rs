//! Cache of compiled adapters. Compiling a component with cranelift takes tens of milliseconds to
//! seconds; loading its serialized machine code takes well under a millisecond. Entries are keyed by
//! the component's sha256 and the engine's compatibility hash, and written atomically.

use anyhow::Result;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use wasmtime::component::Component;
use wasmtime::Engine;

/// Returns the component and whether it came from the cache.
pub fn load_or_compile(engine: &Engine, bytes: &[u8], sha256: &str, cache_dir: Option<&Path>) -> Result<(Component, bool)> {
    let Some(dir) = cache_dir else {
        return Ok((Component::from_binary(engine, bytes)?, false));
    };
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let path = dir.join(format!("{sha256}-{:016x}.cwasm", hasher.finish()));
    // Read into memory rather than mmap the file: a cache file rewritten underneath a mapping would
    // crash the process (SIGBUS) instead of failing cleanly.
    if let Ok(serialized) = std::fs::read(&path) {
        // SAFETY: the file was written by `Component::serialize` of this same engine configuration (the
        // key includes its compatibility hash) into the user's own cache directory; wasmtime checks its
        // header and version. A file that fails to deserialize is recompiled below.
        match unsafe { Component::deserialize(engine, &serialized) } {
            Ok(component) => return Ok((component, true)),
            Err(e) => tracing::warn!("recompiling {}: cached code unusable ({e})", path.display()),
        }
    }
    let component = Component::from_binary(engine, bytes)?;
    if let Err(e) = store(dir, &path, &component) {
        tracing::warn!("could not cache compiled adapter at {}: {e:#}", path.display());
    }
    Ok((component, false))
}

fn store(dir: &Path, path: &Path, component: &Component) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, component.serialize()?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
