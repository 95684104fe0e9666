//! Hugging Face style checkpoints: a directory with config.json and one or more *.safetensors files,
//! dense (f32/f16/bf16) or MLX-quantized (`name.weight` u32 + `name.scales` + `name.biases`, with the
//! group size and bits in config.json's `quantization`). Files are memory-mapped; a tensor is copied
//! into the backend only when the adapter asks for it.

use super::{Checkpoint, Loaded};
use crate::adapter::bindings::edgechat::adapter::weights::CheckpointFormat;
use crate::host::tensor::{ActiveBackend, Backend, DType};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

struct File {
    path: PathBuf,
    map: Mmap,
    /// Where tensor data starts (after the header).
    data_start: usize,
}

pub struct SafetensorsCheckpoint {
    config: String,
    files: Vec<File>,
    tensors: BTreeMap<String, (usize, TensorInfo)>,
    /// MLX quantization from config.json: (group_size, bits).
    quantization: Option<(u32, u32)>,
}

impl SafetensorsCheckpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = crate::paths::read_capped(&config_path, crate::paths::MAX_CONFIG_BYTES)?;
        let parsed: serde_json::Value =
            serde_json::from_str(&config).with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        let quantization = parsed.get("quantization").map(|q| {
            let field = |k: &str, default: u64| q.get(k).and_then(|v| v.as_u64()).unwrap_or(default) as u32;
            (field("group_size", 64), field("bits", 4))
        });
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            bail!("{} has no .safetensors files", dir.display());
        }
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for path in paths {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the mapping is read-only; the checkpoint is the user's file under the data dir,
            // which edgechat never writes while a model is open.
            let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&map).map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
            let index = files.len();
            for (name, info) in metadata.tensors() {
                tensors.insert(name, (index, info.clone()));
            }
            files.push(File { path, map, data_start: 8 + header_len });
        }
        Ok(SafetensorsCheckpoint { config, files, tensors, quantization })
    }

    fn read(&self, backend: &ActiveBackend, name: &str) -> Result<crate::host::tensor::BackendArray, String> {
        let (index, info) = self.tensors.get(name).ok_or_else(|| format!("checkpoint has no tensor {name}"))?;
        let file = &self.files[*index];
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::U32 => DType::U32,
            Dtype::I32 => DType::I32,
            Dtype::U8 => DType::U8,
            other => return Err(format!("{}: tensor {name} has unsupported dtype {other:?}", file.path.display())),
        };
        let (start, end) = info.data_offsets;
        let bytes = file
            .map
            .get(file.data_start.saturating_add(start)..file.data_start.saturating_add(end))
            .ok_or_else(|| format!("{}: tensor {name} lies outside the file (truncated?)", file.path.display()))?;
        let shape = info
            .shape
            .iter()
            .map(|&d| i32::try_from(d).ok().filter(|&d| d > 0))
            .collect::<Option<Vec<i32>>>()
            .ok_or_else(|| format!("{}: tensor {name} has shape {:?}: a zero or oversized dimension", file.path.display(), info.shape))?;
        backend.from_bytes(dtype, bytes, &shape).map_err(|e| format!("{}: tensor {name}: {e}", file.path.display()))
    }
}

impl Checkpoint for SafetensorsCheckpoint {
    fn format(&self) -> CheckpointFormat {
        CheckpointFormat::Safetensors
    }

    fn config(&self) -> String {
        self.config.clone()
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().filter(|n| !n.ends_with(".scales") && !n.ends_with(".biases")).cloned().collect()
    }

    fn stored_bytes(&self) -> u64 {
        self.tensors.values().fold(0u64, |total, (_, info)| total.saturating_add(info.data_offsets.1.saturating_sub(info.data_offsets.0) as u64))
    }

    fn get(&self, backend: &ActiveBackend, name: &str) -> Result<Loaded, String> {
        let stem = name.strip_suffix(".weight");
        let companions = stem.map(|s| (format!("{s}.scales"), format!("{s}.biases")));
        match (companions, self.quantization) {
            (Some((scales, biases)), Some((group_size, bits))) if self.tensors.contains_key(&scales) => Ok(Loaded::Quantized {
                weight: self.read(backend, name)?,
                scales: self.read(backend, &scales)?,
                biases: self.read(backend, &biases)?,
                group_size,
                bits,
            }),
            _ => Ok(Loaded::Dense(self.read(backend, name)?)),
        }
    }
}
