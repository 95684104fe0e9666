//! On Linux the shell links the MLX CPU library from the `mlx-cpu` wheel that `cargo xtask setup` unpacks
//! (see tools/mlx). Point the linker at it and record an rpath so the binary finds it at run time; the
//! wheel's own layout is kept because libmlx finds its bundled BLAS through `$ORIGIN`.
//!
//! ggml (the cpu backend) is shared libraries beside the binary (llama-cpp-sys-2 links them into the
//! target directory), found through an `$ORIGIN` rpath, and one kernel module per processor generation,
//! which `host/tensor/cpu/kernels.rs` looks for beside the binary and then where this build put them.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=EDGECHAT_MLX_DIR");
    let modules = PathBuf::from(std::env::var("DEP_LLAMA_BACKENDS_DIR").expect("llama-cpp-sys-2 with dynamic-backends"));
    println!("cargo:rustc-env=EDGECHAT_GGML_MODULES={}", modules.display());
    if std::env::var("CARGO_CFG_TARGET_FAMILY").as_deref() == Ok("unix") {
        // The build's own libraries first (the copies beside the binary are not replaced when ggml is
        // rebuilt), then those beside the binary (an installed build).
        let built = modules.parent().unwrap().join("lib");
        let origin = if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") { "@loader_path" } else { "$ORIGIN" };
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", built.display());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{origin}");
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    if packs_relative_relocations() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    let mlx_dir = std::env::var_os("EDGECHAT_MLX_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../.toolchain/mlx-cpu")
    });
    let lib = mlx_dir.join("mlx/lib");
    if !lib.join("libmlx.so").exists() {
        panic!("libmlx.so not found in {}: run `cargo xtask setup` first", lib.display());
    }
    let lib = lib.canonicalize().unwrap();
    println!("cargo:rerun-if-changed={}", lib.join("libmlx.so").display());
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}

/// Whether to link the binaries with packed relative relocations (DT_RELR). The shell has ~70000 of
/// them: as a 1.6 MB table the loader read whole at every start, it stayed resident for the whole run;
/// packed it is 20 KB. Only for a glibc build whose own glibc (2.36 on) can load such a binary, built
/// for the machine it runs on (`cargo run`).
fn packs_relative_relocations() -> bool {
    let native = std::env::var("HOST").ok() == std::env::var("TARGET").ok();
    if !native || std::env::var("CARGO_CFG_TARGET_ENV").as_deref() != Ok("gnu") {
        return false;
    }
    // "glibc 2.36"
    let Ok(out) = std::process::Command::new("getconf").arg("GNU_LIBC_VERSION").output() else { return false };
    let version = String::from_utf8_lossy(&out.stdout);
    let mut numbers = version.trim().trim_start_matches("glibc ").split('.').map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (2, 36)
}
