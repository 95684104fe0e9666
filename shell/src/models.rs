//! Models on disk: what a model directory (or GGUF file) holds, the imported models under
//! `<data dir>/Models/<id>/` with their `manifest.json`, and resolving what the user named.

use crate::shell::Shell;
use crate::host::weights::gguf::GgufCheckpoint;
use crate::host::weights::safetensors::SafetensorsCheckpoint;
use crate::host::weights::{Checkpoint, OpenCheckpoint, Precision};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The record kept beside an imported model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub adapter: String,
    pub architecture: String,
    /// "gguf" or "safetensors".
    pub format: String,
    /// The precision `run` uses unless told otherwise.
    pub dtype: String,
    pub source: String,
    /// The resolved revision (hub commit) of a downloaded model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    pub files: Vec<FileRecord>,
    /// When it was imported or downloaded, in seconds since the Unix epoch.
    pub imported_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// The file's modification time (ns since the epoch) when its hash was last verified; while it is
    /// unchanged the hash need not be recomputed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_mtime: Option<u128>,
}

impl FileRecord {
    /// Records `path` (relative to `dir`) as verified now.
    pub fn verified(dir: &Path, path: &str, sha256: String) -> Result<FileRecord> {
        let meta = std::fs::metadata(dir.join(path)).with_context(|| format!("reading {}", dir.join(path).display()))?;
        Ok(FileRecord { path: path.to_owned(), size: meta.len(), sha256, verified_mtime: mtime(&meta) })
    }

    /// Whether the file in `dir` is present with the recorded size and hash (rehashing only if it was
    /// modified since it was verified).
    pub fn is_intact(&self, dir: &Path) -> bool {
        let path = dir.join(&self.path);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() == self.size => {
                (self.verified_mtime.is_some() && mtime(&meta) == self.verified_mtime)
                    || crate::download::sha256_of(&path).is_ok_and(|h| h == self.sha256)
            }
            _ => false,
        }
    }
}

fn mtime(meta: &std::fs::Metadata) -> Option<u128> {
    meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_nanos())
}

pub enum Weights {
    Gguf(PathBuf),
    Safetensors(PathBuf),
}

/// Everything needed to run a model.
pub struct ModelFiles {
    pub weights: Weights,
    /// config.json `model_type` or GGUF `general.architecture`.
    pub architecture: String,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<String>,
    pub manifest: Option<Manifest>,
}

impl ModelFiles {
    /// Reads a model directory (config.json + safetensors, or a single .gguf) or a .gguf file.
    pub fn inspect(path: &Path) -> Result<ModelFiles> {
        let (dir, gguf) = if path.is_file() {
            (path.parent().unwrap_or(Path::new(".")).to_owned(), Some(path.to_owned()))
        } else if path.is_dir() {
            let ggufs: Vec<PathBuf> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect();
            if ggufs.len() > 1 && !path.join("config.json").exists() {
                bail!("{} holds several .gguf files; name the one to use", path.display());
            }
            (path.to_owned(), if path.join("config.json").exists() { None } else { ggufs.into_iter().next() })
        } else {
            bail!("{} does not exist", path.display());
        };
        let (weights, architecture) = match gguf {
            Some(file) => {
                let checkpoint = GgufCheckpoint::open(&file)?;
                let arch = checkpoint.architecture().with_context(|| format!("{} has no general.architecture", file.display()))?.to_owned();
                (Weights::Gguf(file), arch)
            }
            None => {
                let config_path = dir.join("config.json");
                let text = crate::paths::read_capped(&config_path, crate::paths::MAX_CONFIG_BYTES).with_context(|| format!("{} has neither a .gguf file nor a readable config.json", dir.display()))?;
                let config: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", config_path.display()))?;
                let arch = config.get("model_type").and_then(|t| t.as_str()).with_context(|| format!("{} has no model_type", config_path.display()))?;
                (Weights::Safetensors(dir.clone()), arch.to_owned())
            }
        };
        let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.exists());
        let tokenizer_config = crate::paths::read_capped(&dir.join("tokenizer_config.json"), crate::paths::MAX_JSON_BYTES).ok();
        let manifest = std::fs::read_to_string(dir.join("manifest.json")).ok().and_then(|m| serde_json::from_str(&m).ok());
        Ok(ModelFiles { weights, architecture, tokenizer, tokenizer_config, manifest })
    }

    pub fn open(&self, precision: Precision) -> Result<OpenCheckpoint> {
        let checkpoint: Box<dyn Checkpoint> = match &self.weights {
            Weights::Gguf(file) => Box::new(GgufCheckpoint::open(file)?),
            Weights::Safetensors(dir) => Box::new(SafetensorsCheckpoint::open(dir)?),
        };
        Ok(OpenCheckpoint::new(checkpoint, precision))
    }

    /// The longest sequence the model was trained for: config.json `max_position_embeddings`, or GGUF
    /// `<arch>.context_length`.
    pub fn context_length(&self) -> Option<usize> {
        let config: serde_json::Value = match &self.weights {
            Weights::Gguf(file) => serde_json::from_str(&GgufCheckpoint::open(file).ok()?.config()).ok()?,
            Weights::Safetensors(dir) => serde_json::from_str(&crate::paths::read_capped(&dir.join("config.json"), crate::paths::MAX_CONFIG_BYTES).ok()?).ok()?,
        };
        let from_gguf = config.get(format!("{}.context_length", self.architecture));
        let text_config = config.get("text_config").and_then(|t| t.get("max_position_embeddings"));
        let length = from_gguf.or(config.get("max_position_embeddings")).or(text_config)?.as_u64()?;
        usize::try_from(length).ok().filter(|&n| n > 0)
    }

    pub fn tokenizer(&self) -> Result<Option<crate::tokenizer::Tokenizer>> {
        self.tokenizer
            .as_ref()
            .map(|p| crate::tokenizer::load(p))
            .transpose()
    }

    /// The precision to run at: the user's choice, else what the import recorded, else the default.
    pub fn precision(&self, requested: Option<Precision>) -> Result<Precision> {
        match (requested, &self.manifest) {
            (Some(p), _) => Ok(p),
            (None, Some(m)) => m.dtype.parse().map_err(anyhow::Error::msg),
            (None, None) => Ok(DEFAULT_PRECISION),
        }
    }
}

/// Chosen from measurements on the MLX CPU backend (docs/benchmarks.md).
pub const DEFAULT_PRECISION: Precision = Precision::Auto;

/// Imported models, sorted by id.
pub fn imported(shell: &Shell) -> Vec<(PathBuf, Manifest)> {
    on_disk(&shell.paths.models())
}

/// Every model under `models_dir` with its manifest (imported or pulled), by id.
pub fn on_disk(models_dir: &Path) -> Vec<(PathBuf, Manifest)> {
    let Ok(entries) = std::fs::read_dir(models_dir) else { return Vec::new() };
    let mut found: Vec<(PathBuf, Manifest)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|dir| {
            let text = std::fs::read_to_string(dir.join("manifest.json")).ok()?;
            serde_json::from_str::<Manifest>(&text).ok().map(|m| (dir, m))
        })
        .collect();
    found.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    found
}

/// Resolves what the user named: a path, an imported model id, or a downloaded catalog model.
pub fn resolve(shell: &Shell, name: &str) -> Result<ModelFiles> {
    let path = Path::new(name);
    if path.exists() {
        return ModelFiles::inspect(path);
    }
    if let Some((dir, _)) = imported(shell).into_iter().find(|(_, m)| m.id == name) {
        return ModelFiles::inspect(&dir);
    }
    if let Some(entry) = shell.catalog.get(name) {
        let dir = shell.model_dir(&entry.source);
        if dir.exists() {
            return ModelFiles::inspect(&dir);
        }
        bail!("{name} is in the catalog but not downloaded (expected in {})", dir.display());
    }
    let ids: Vec<String> = imported(shell).into_iter().map(|(_, m)| m.id).collect();
    bail!(
        "no model `{name}`: not a path, not an imported model ({}), not in the catalog",
        if ids.is_empty() { "none imported; see `edgechat import`".to_owned() } else { ids.join(", ") }
    )
}

/// Whether a model directory holds every file its manifest lists with the recorded size and hash, its
/// bytes on disk, its revision.
pub fn local_state(dir: &Path) -> Option<(bool, u64, Option<String>)> {
    let manifest: Manifest = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).ok()?).ok()?;
    let bytes = manifest.files.iter().filter_map(|f| std::fs::metadata(dir.join(&f.path)).ok()).map(|m| m.len()).sum();
    let complete = manifest.files.iter().all(|f| f.is_intact(dir));
    Some((complete, bytes, manifest.revision))
}
