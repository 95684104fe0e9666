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
    if path.exists() {
        // Mapped, not read: only the code an adapter runs is then resident (Gemma's: 1.7 MiB of its
        // 4.3 MB), where a copy in memory kept all of it for the whole run.
        // SAFETY: the file was written by `Component::serialize` of this same engine configuration (the
        // key includes its compatibility hash) into the user's own cache directory, and wasmtime checks
        // its header and version; a file that fails to deserialize is recompiled below. Entries are
        // only ever replaced by a rename (`store`), which leaves a mapped file intact; a file truncated
        // in place by some other program would stop the process (SIGBUS), but whoever can write this
        // directory can already replace the machine code we run.
        match unsafe { Component::deserialize_file(engine, &path) } {
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
