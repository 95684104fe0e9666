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
