//! Shared by the integration tests: the built components, loaded through the real adapter host.
#![allow(dead_code)]

use edgechat::adapter::{Adapter, AdapterHost};
use edgechat::host::Limits;
use std::path::{Path, PathBuf};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn fixture(path: &str) -> PathBuf {
    workspace().join("tests/fixtures").join(path)
}

/// A component built by `cargo xtask adapters`: an adapter, or a test guest from tests/guests.
pub fn component(name: &str) -> PathBuf {
    let root = workspace().join("target");
    let path = [root.join("adapters"), root.join("test-adapters")]
        .into_iter()
        .map(|dir| dir.join(format!("{name}.wasm")))
        .find(|p| p.exists());
    path.unwrap_or_else(|| panic!("component {name}.wasm is not built: run `cargo xtask adapters` (or `cargo xtask test`)"))
}

pub fn host_with(limits: Limits) -> AdapterHost {
    // Compiled code is cached across test binaries; the key is the component hash and engine.
    AdapterHost::new(limits, Some(workspace().join("target/test-compiled-adapters"))).unwrap()
}

pub fn load(name: &str) -> Adapter {
    host_with(Limits::default()).load(&component(name)).unwrap_or_else(|e| panic!("loading {name}: {e:#}"))
}
