//! The build for each platform, checked here without building it: on Apple Silicon MLX must be compiled
//! with Metal and Accelerate (mlx-rs's defaults, which the shell turns off elsewhere), and the Linux-only
//! workarounds for linking the MLX CPU wheel must leave a Mac build alone.

mod common;

use std::process::Command;

/// `cargo tree` of the features that reach mlx-sys when building edgechat for `target` (resolution
/// only: nothing is compiled for that target).
fn mlx_features(target: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(common::workspace())
        .args(["tree", "-p", "edgechat", "--target", target, "-e", "features", "-i", "mlx-sys", "--prefix", "none"])
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn apple_silicon_builds_mlx_with_metal_and_accelerate() {
    let tree = mlx_features("aarch64-apple-darwin");
    assert!(tree.contains("mlx-sys feature \"metal\""), "{tree}");
    assert!(tree.contains("mlx-sys feature \"accelerate\""), "{tree}");
}

#[test]
fn linux_builds_mlx_for_the_cpu_only() {
    let tree = mlx_features("x86_64-unknown-linux-gnu");
    assert!(tree.contains("mlx-sys v0.7.0"), "{tree}");
    assert!(!tree.contains("feature \"metal\"") && !tree.contains("feature \"accelerate\""), "{tree}");
}

/// Runs tools/mlx/rustc-wrapper with `echo` as rustc and `uname -s` answering `os`: what rustc would get.
fn wrapped_args(os: &str, args: &[&str]) -> String {
    let bin = tempfile::tempdir().unwrap();
    let uname = bin.path().join("uname");
    std::fs::write(&uname, format!("#!/bin/sh\necho {os}\n")).unwrap();
    std::fs::set_permissions(&uname, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let wrapper = common::workspace().join("tools/mlx/rustc-wrapper");
    let out = Command::new(&wrapper).arg("echo").args(args).env("PATH", path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn the_linux_link_rewrites_pass_a_mac_build_through_untouched() {
    let args = ["--crate-name", "mlx_sys", "-l", "static=mlx", "-l", "framework=Metal"];
    assert_eq!(wrapped_args("Darwin", &args), args.join(" "));
    // On Linux the same arguments are rewritten (the wheel's shared library, no Apple frameworks).
    let linux = wrapped_args("Linux", &args);
    assert!(linux.contains("-l dylib=mlx") && !linux.contains("framework=Metal"), "{linux}");
}

#[test]
fn the_other_linux_workarounds_are_guarded_by_platform() {
    let root = common::workspace();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    // The cmake toolchain file does everything inside a Linux-host guard.
    let cmake = read("tools/mlx/linux-cpu.cmake");
    let code: Vec<&str> = cmake.lines().filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty()).collect();
    assert_eq!(code.first(), Some(&"if(CMAKE_HOST_SYSTEM_NAME STREQUAL \"Linux\")"));
    assert_eq!(code.last(), Some(&"endif()"));
    // The bindgen shim only adds float16 typedefs where the compiler lacks them (not on aarch64).
    assert!(read("tools/mlx/include/edgechat_mlx_bindgen.h").contains("#if !defined(__aarch64__)"));
    // The build script links the wheel only when the target is Linux.
    assert!(read("shell/build.rs").contains("if std::env::var(\"CARGO_CFG_TARGET_OS\").as_deref() != Ok(\"linux\") {\n        return;"));
}
