//! Host-side build tasks.
//!
//! `cargo xtask setup`     installs or locates what the build needs (MLX CPU library on Linux, a wasm32 toolchain)
//! `cargo xtask adapters`  builds every guest crate to a core module and wraps it as a component in target/adapters
//! `cargo xtask demo-model` fetches the real Gemma 3 270M and its tokenizer and imports them
//! `cargo xtask test`      setup + adapters + `cargo test` + the server's openai-client tests: the one
//!                         command CI and newcomers run

mod demo;
mod guests;
mod setup;

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("setup") => setup::run(&root),
        Some("adapters") => guests::build_all(&root),
        Some("demo-model") => demo::run(&root),
        Some("test") => {
            setup::run(&root)?;
            guests::build_all(&root)?;
            // The guest kit's own unit tests run natively; everything else runs against the built components.
            let kit = root.join("adapters/kit/Cargo.toml");
            let kit_target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target")).join("kit-native");
            run_checked(Command::new(cargo()).current_dir(&root).arg("test").arg("--manifest-path").arg(&kit).arg("--target-dir").arg(&kit_target))?;
            // The shell package alone (the default member), as `cargo run` builds it: with xtask in the build
            // its dependencies' features would differ, and a cold build would compile wasmtime and ggml twice.
            run_checked(Command::new(cargo()).current_dir(&root).args(["test", "-p", "edgechat"]).args(&args[1..]))?;
            // The suite above runs on the platform's default backend; the fidelity suite runs on the other too.
            let other = if cfg!(all(target_os = "macos", target_arch = "aarch64")) { "cpu" } else { "mlx" };
            run_checked(
                Command::new(cargo())
                    .current_dir(&root)
                    .env("EDGECHAT_BACKEND", other)
                    .args(["test", "-p", "edgechat", "--test", "fidelity", "--test", "real_model", "--test", "loading"]),
            )?;
            // The OpenAI-compatible server, through the official openai client, against the built binary.
            let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
            run_checked(
                Command::new(setup::venv_python(&root))
                    .current_dir(&root)
                    .env("EDGECHAT_BIN", target.join("debug/edgechat"))
                    .args(["-m", "pytest", "-q", "tests/server"]),
            )
        }
        _ => {
            eprintln!("usage: cargo xtask <setup | adapters | demo-model | test [cargo test args]>");
            std::process::exit(2);
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The cargo that runs us (rustup's proxy or a plain install).
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs a command, failing with its command line when it fails.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().map_err(|e| anyhow::anyhow!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Installs Debian packages when we may (root with apt-get), else says what to install.
pub fn apt_install(packages: &[&str], why: &str) -> Result<()> {
    if !(is_root() && Path::new("/usr/bin/apt-get").exists()) {
        bail!("{why}: install the Debian packages {} (sudo apt-get install {0})", packages.join(" "));
    }
    eprintln!("xtask: installing {} ({why})", packages.join(" "));
    run_checked(Command::new("apt-get").arg("update").arg("-qq"))?;
    run_checked(
        Command::new("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y", "-qq"]).args(packages),
    )
}
