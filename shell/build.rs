//! On Linux the shell links the MLX CPU library from the `mlx-cpu` wheel that `cargo xtask setup` unpacks
//! (see tools/mlx). Point the linker at it and record an rpath so the binary finds it at run time; the
//! wheel's own layout is kept because libmlx finds its bundled BLAS through `$ORIGIN`.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=EDGECHAT_MLX_DIR");
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
