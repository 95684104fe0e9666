//! `edgechat rm`: delete exactly one model's files (those its manifest lists), nothing else.

use super::pull::parse_target;
use crate::download::{partials_of, ModelLock};
use crate::models::{self, Manifest};
use crate::shell::Shell;
use crate::text::human_bytes;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Deletes exactly one model's files (and their partials), then its directory if that leaves it empty.
pub fn run(name: &str) -> Result<()> {
    let shell = Shell::open()?;
    let dir: PathBuf = match parse_target(&shell, name) {
        Ok(target) => shell.model_dir(&target.source),
        Err(_) => match models::imported(&shell).into_iter().find(|(_, m)| m.id == name) {
            Some((dir, _)) => dir,
            None => bail!("no downloaded or imported model `{name}`"),
        },
    };
    let manifest_path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path).with_context(|| format!("{name} is not downloaded (no {})", manifest_path.display()))?;
    let manifest: Manifest = serde_json::from_str(&text).with_context(|| format!("{} is malformed", manifest_path.display()))?;
    let _lock = ModelLock::acquire(&ModelLock::path_for(&dir))?;
    let mut freed = 0;
    for file in &manifest.files {
        let path = dir.join(&file.path);
        if !path.starts_with(&dir) || file.path.contains("..") {
            bail!("{} lists a path outside the model: {}", manifest_path.display(), file.path);
        }
        for p in partials_of(&path).into_iter().chain([path]) {
            if let Ok(meta) = std::fs::metadata(&p) {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                freed += meta.len();
            }
        }
    }
    std::fs::remove_file(&manifest_path)?;
    let _ = std::fs::remove_dir(&dir); // only if now empty; never a parent
    let _ = std::fs::remove_file(ModelLock::path_for(&dir));
    println!("removed {name} ({} freed)", human_bytes(freed));
    Ok(())
}
