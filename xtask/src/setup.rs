//! `cargo xtask setup`: what a fresh machine needs before `cargo build` works.
//!
//! Linux: the MLX CPU library from the PyPI `mlx-cpu` wheel (unpacked into .toolchain/mlx-cpu, which
//! tools/mlx wires into mlx-sys), plus cmake and libclang for mlx-sys's build script. Everywhere: a
//! wasm32 toolchain for the adapters (see guests.rs).

use crate::{apt_install, guests, run_checked};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// 0.32.4 changed `gather_qmm`, which mlx-c 0.7.0 (mlx-sys 0.7.0) calls with the old signature.
const MLX_CPU_WHEEL: &str = "mlx-cpu==0.32.2";

pub fn run(root: &Path) -> Result<()> {
    if cfg!(target_os = "linux") {
        let mut missing = Vec::new();
        if which("cmake").is_none() {
            missing.push("cmake");
        }
        if !has_libclang() {
            missing.push("libclang-dev");
        }
        if !Path::new(OPENBLAS).exists() {
            missing.push("libopenblas0-pthread");
        }
        if !missing.is_empty() {
            apt_install(&missing, "mlx-sys builds mlx-c with cmake and bindgen (libclang); MLX's CPU matmuls use OpenBLAS")?;
        }
        install_mlx_cpu(root)?;
        use_openblas(root)?;
    }
    let toolchain = guests::Toolchain::find_or_install()?;
    python_env(root)?;
    eprintln!("xtask: setup done; adapters build with {}", toolchain.describe());
    Ok(())
}

/// What the server's tests run with: the official `openai` client and pytest, pinned, in a virtual
/// environment of their own (`.toolchain/venv`).
const PYTHON_TOOLS: &[&str] = &["openai==3.57.0", "pytest==9.2.0", "httpx==0.28.1"];

pub fn venv_python(root: &Path) -> std::path::PathBuf {
    root.join(".toolchain/venv/bin/python")
}

fn python_env(root: &Path) -> Result<()> {
    let venv = root.join(".toolchain/venv");
    let marker = venv.join(".installed");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == PYTHON_TOOLS.join(" ")) {
        return Ok(());
    }
    let python = which("python3").context("python3 is needed for the server's tests (the openai client)")?;
    let created = Command::new(&python).args(["-m", "venv", "--clear"]).arg(&venv).status().is_ok_and(|s| s.success());
    if !created {
        apt_install(&["python3-venv"], "the server's tests run the openai client in a virtual environment")?;
        run_checked(Command::new(&python).args(["-m", "venv", "--clear"]).arg(&venv))?;
    }
    run_checked(Command::new(venv_python(root)).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(PYTHON_TOOLS))?;
    std::fs::write(&marker, PYTHON_TOOLS.join(" "))?;
    Ok(())
}

fn install_mlx_cpu(root: &Path) -> Result<()> {
    let dest = root.join(".toolchain/mlx-cpu");
    let marker = dest.join(".installed");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == MLX_CPU_WHEEL) {
        return Ok(());
    }
    let python = which("python3").context("python3 (with pip) is needed to fetch the MLX CPU wheel")?;
    let download = root.join(".toolchain/download");
    let _ = std::fs::remove_dir_all(&download);
    eprintln!("xtask: fetching {MLX_CPU_WHEEL}");
    run_checked(Command::new(&python).args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", "-d"]).arg(&download).arg(MLX_CPU_WHEEL))?;
    let wheel = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    let _ = std::fs::remove_dir_all(&dest);
    // Keep the wheel's layout: libmlx.so finds its bundled BLAS through $ORIGIN/../../mlx_cpu.libs.
    run_checked(Command::new(&python).args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&dest))?;
    if !dest.join("mlx/lib/libmlx.so").exists() {
        bail!("{} has no mlx/lib/libmlx.so", wheel.display());
    }
    std::fs::write(&marker, MLX_CPU_WHEEL)?;
    let _ = std::fs::remove_dir_all(&download);
    eprintln!("xtask: MLX CPU library in {}", dest.display());
    Ok(())
}

/// Debian's multithreaded OpenBLAS (BLAS + CBLAS interface).
const OPENBLAS: &str = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3";

/// The wheel bundles netlib's reference BLAS, which makes f32 matmuls 3-10x slower than OpenBLAS
/// (docs/benchmarks.md). libmlx finds its BLAS by file name through $ORIGIN, so the bundled file is
/// replaced by a link to the system's OpenBLAS, which exports the same symbols.
fn use_openblas(root: &Path) -> Result<()> {
    let libs = root.join(".toolchain/mlx-cpu/mlx_cpu.libs");
    let Some(bundled) = std::fs::read_dir(&libs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libblas-") && !n.to_string_lossy().ends_with(".netlib")))
    else {
        bail!("no bundled libblas in {}", libs.display());
    };
    if std::fs::read_link(&bundled).is_ok_and(|target| target == Path::new(OPENBLAS)) || !Path::new(OPENBLAS).exists() {
        return Ok(());
    }
    let mut kept = bundled.clone().into_os_string();
    kept.push(".netlib");
    std::fs::rename(&bundled, &kept)?;
    std::os::unix::fs::symlink(OPENBLAS, &bundled)?;
    eprintln!("xtask: MLX uses OpenBLAS ({OPENBLAS})");
    Ok(())
}

fn has_libclang() -> bool {
    ["/usr/lib/llvm-14/lib", "/usr/lib/llvm-15/lib", "/usr/lib/llvm-16/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu"]
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("libclang.so"))
}

pub fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}
