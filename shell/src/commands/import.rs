//! `edgechat import`: copy a GGUF file or a model directory into the data dir, after checking that an
//! adapter runs it and that it loads, and register it for `models` and `run`.

use crate::shell::Shell;
use crate::host::weights::Precision;
use crate::models::{self, FileRecord, Manifest, ModelFiles, Weights};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub struct ImportArgs {
    pub source: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub id: Option<String>,
    pub dtype: Option<Precision>,
}

pub fn import(args: ImportArgs) -> Result<()> {
    let shell = Shell::open()?;
    let files = ModelFiles::inspect(&args.source)?;
    let adapter = shell.registry.for_architecture(&files.architecture)?;
    let id = match &args.id {
        Some(id) => id.clone(),
        None => args.source.file_stem().map(|s| s.to_string_lossy().into_owned()).context("cannot name the model: use --id")?,
    };
    if id.is_empty() || id.starts_with('.') || id.contains(['/', '\\']) {
        bail!("{id:?} is not a usable model id");
    }
    let dest = shell.paths.models().join(&id);
    if dest.exists() {
        bail!("a model named {id} is already imported at {}", dest.display());
    }

    let mut to_copy: Vec<(PathBuf, String)> = match &files.weights {
        Weights::Gguf(file) => vec![(file.clone(), "model.gguf".into())],
        Weights::Safetensors(dir) => std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors") || p.file_name().is_some_and(|n| n == "config.json"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (p, name)
            })
            .collect(),
    };
    let tokenizer_dir = args.tokenizer.clone().or_else(|| files.tokenizer.as_ref().and_then(|t| t.parent().map(Path::to_owned)));
    if let Some(dir) = &tokenizer_dir {
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if path.exists() {
                to_copy.push((path, name.into()));
            } else if name == "tokenizer.json" {
                bail!("{} has no tokenizer.json", dir.display());
            }
        }
    }

    // Prove it runs before taking it in.
    let precision = args.dtype.unwrap_or(models::DEFAULT_PRECISION);
    crate::engine::Model::load(adapter, files.open(precision)?)
        .with_context(|| format!("{} does not load with the {} adapter", args.source.display(), adapter.name()))?;

    let staging = shell.paths.models().join(format!(".{id}.importing"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let copied = copy_all(&to_copy, &staging);
    let records = match copied {
        Ok(records) => records,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    let manifest = Manifest {
        id: id.clone(),
        adapter: adapter.name().to_owned(),
        architecture: files.architecture.clone(),
        format: match files.weights {
            Weights::Gguf(_) => "gguf".into(),
            Weights::Safetensors(_) => "safetensors".into(),
        },
        dtype: format!("{precision:?}").to_lowercase(),
        source: args.source.display().to_string(),
        revision: None,
        files: records,
        imported_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    };
    std::fs::write(staging.join("manifest.json"), serde_json::to_string_pretty(&manifest)?)?;
    std::fs::rename(&staging, &dest).with_context(|| format!("moving the import into {}", dest.display()))?;
    println!("imported {id} ({} via adapter `{}`, {}) into {}", manifest.architecture, manifest.adapter, manifest.dtype, dest.display());
    Ok(())
}

fn copy_all(files: &[(PathBuf, String)], dest: &Path) -> Result<Vec<FileRecord>> {
    files
        .iter()
        .map(|(from, name)| {
            let to = dest.join(name);
            std::fs::copy(from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            FileRecord::verified(dest, name, crate::download::sha256_of(&to)?)
        })
        .collect()
}
