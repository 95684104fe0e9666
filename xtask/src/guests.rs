//! `cargo xtask adapters`: guest crates -> wasm32 core modules -> components.
//!
//! Adapters live in `adapters/<name>` and land in `target/adapters/<name>.wasm`; test guests live in
//! `tests/guests/<name>` and land in `target/test-adapters/<name>.wasm`. All guests share one cargo target
//! dir, so the wasm std is compiled once.

use crate::{apt_install, run_checked, setup::which, workspace_root};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const TARGET: &str = "wasm32-unknown-unknown";

/// How guests get compiled on this machine.
pub enum Toolchain {
    /// rustup with the wasm32 target installed (e.g. a Mac set up with `rustup target add`).
    Rustup,
    /// Debian's rustc-web/cargo-web + rust-web-src + lld: no prebuilt wasm32 std, so std is built from
    /// source with the nightly-only `-Zbuild-std` (RUSTC_BOOTSTRAP) and linked with wasm-ld.
    DebianWeb,
}

impl Toolchain {
    fn find() -> Option<Self> {
        let rustup = Command::new("rustup").args(["target", "list", "--installed"]).output();
        if rustup.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == TARGET)) {
            return Some(Self::Rustup);
        }
        let debian = Path::new("/usr/bin/cargo").exists()
            && Path::new("/usr/bin/rustc").exists()
            && Path::new("/usr/lib/rustlib/src/rust/library").exists()
            && which("wasm-ld").is_some();
        debian.then_some(Self::DebianWeb)
    }

    pub fn find_or_install() -> Result<Self> {
        if let Some(t) = Self::find() {
            return Ok(t);
        }
        if cfg!(target_os = "linux") && Path::new("/usr/bin/apt-get").exists() {
            apt_install(&["rustc-web", "cargo-web", "rust-web-src", "lld"], "adapters are compiled to wasm32")?;
            if let Some(t) = Self::find() {
                return Ok(t);
            }
        }
        bail!("no wasm32 toolchain: run `rustup target add {TARGET}` (or on Debian install rustc-web cargo-web rust-web-src lld)")
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Self::Rustup => "rustup's wasm32-unknown-unknown target",
            Self::DebianWeb => "Debian's rustc-web with -Zbuild-std",
        }
    }

    fn cargo_build(&self, manifest: &Path, target_dir: &Path) -> Command {
        let mut cmd = match self {
            Self::Rustup => Command::new(crate::cargo()),
            Self::DebianWeb => {
                let mut cmd = Command::new("/usr/bin/cargo");
                let path = std::env::var("PATH").unwrap_or_default();
                cmd.env("PATH", format!("/usr/bin:{path}"))
                    .env("RUSTC", "/usr/bin/rustc")
                    .env("RUSTC_BOOTSTRAP", "1")
                    .env("RUSTFLAGS", "-C linker=wasm-ld")
                    .env_remove("RUSTUP_TOOLCHAIN")
                    .env_remove("CARGO_ENCODED_RUSTFLAGS");
                cmd
            }
        };
        // The workspace's rustc wrapper only concerns the host's mlx-sys.
        cmd.env("RUSTC_WRAPPER", "").args(["build", "--quiet", "--release", "--target", TARGET]);
        if let Self::DebianWeb = self {
            cmd.arg("-Zbuild-std=std,panic_abort");
        }
        cmd.arg("--manifest-path").arg(manifest).arg("--target-dir").arg(target_dir);
        cmd
    }
}

struct Guest {
    dir: PathBuf,
    /// Component file name stem: the directory name.
    name: String,
    /// Cargo package name, which names the core module.
    package: String,
    out_dir: PathBuf,
}

fn guests(root: &Path) -> Result<Vec<Guest>> {
    let mut found = Vec::new();
    for (parent, out) in [("adapters", "target/adapters"), ("tests/guests", "target/test-adapters")] {
        let Ok(entries) = std::fs::read_dir(root.join(parent)) else { continue };
        let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        dirs.sort();
        for dir in dirs {
            let Ok(manifest) = std::fs::read_to_string(dir.join("Cargo.toml")) else { continue };
            if !manifest.contains("cdylib") {
                continue; // a helper library such as adapters/kit
            }
            let package = manifest
                .lines()
                .find_map(|l| l.trim().strip_prefix("name = \"").and_then(|r| r.strip_suffix('"')))
                .with_context(|| format!("no package name in {}", dir.join("Cargo.toml").display()))?
                .to_owned();
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            found.push(Guest { dir, name, package, out_dir: root.join(out) });
        }
    }
    Ok(found)
}

pub fn build_all(root: &Path) -> Result<()> {
    let toolchain = Toolchain::find_or_install()?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("wasm-guests");
    for guest in guests(root)? {
        let started = Instant::now();
        run_checked(&mut toolchain.cargo_build(&guest.dir.join("Cargo.toml"), &target_dir))
            .with_context(|| format!("building guest {}", guest.name))?;
        let core_path = target_dir.join(TARGET).join("release").join(format!("{}.wasm", guest.package.replace('-', "_")));
        let core = std::fs::read(&core_path).with_context(|| format!("reading {}", core_path.display()))?;
        let component = wit_component::ComponentEncoder::default()
            .module(&core)
            .and_then(|e| e.validate(true).encode())
            .with_context(|| format!("making {} a component", guest.name))?;
        std::fs::create_dir_all(&guest.out_dir)?;
        let out = guest.out_dir.join(format!("{}.wasm", guest.name));
        std::fs::write(&out, &component)?;
        eprintln!(
            "xtask: {:<40} {:>8} bytes  sha256 {}  ({:.1}s)",
            out.strip_prefix(root).unwrap_or(&out).display(),
            component.len(),
            &hex::encode(Sha256::digest(&component))[..16],
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
