//! The `weights` import: the one checkpoint the shell opened for the model an adapter is loading.
//! Each format's reader implements [`Checkpoint`]; [`Precision`] is applied on the way in, so adapters
//! see the dtype (or MLX quantization) the user chose. Outside a model load no checkpoint is open, and an
//! adapter asking for weights then is stopped.

pub mod gguf;
pub mod safetensors;

use crate::adapter::bindings::edgechat::adapter::weights::{CheckpointFormat, Entry, Host, QuantizedEntry};
use crate::host::tensor::{ActiveBackend, Backend, BackendArray, DType};
use crate::host::HostState;

/// A tensor as read from a checkpoint.
pub enum Loaded {
    Dense(BackendArray),
    Quantized { weight: BackendArray, scales: BackendArray, biases: BackendArray, group_size: u32, bits: u32 },
}

pub trait Checkpoint: Send {
    fn format(&self) -> CheckpointFormat;
    fn config(&self) -> String;
    fn names(&self) -> Vec<String>;
    /// The tensors' bytes as stored (what the memory goal measures against: no headers).
    fn stored_bytes(&self) -> u64;
    /// Reads one tensor. Errors name the file and the tensor.
    fn get(&self, backend: &ActiveBackend, name: &str) -> Result<Loaded, String>;
    /// A block-quantized tensor kept in its stored format, when the format has blocks and the backend
    /// multiplies them (ggml's, on the cpu backend). None: read it with `get`.
    fn get_blocks(&self, _backend: &ActiveBackend, _name: &str) -> Result<Option<Loaded>, String> {
        Ok(None)
    }
}

/// The precision a model runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Block-quantized GGUF tensors as stored on the cpu backend (ggml multiplies the blocks); f32 for
    /// everything else and on MLX.
    Auto,
    F32,
    F16,
    BF16,
    /// MLX affine 4-bit (group 64) matrices, bf16 elsewhere.
    Q4,
    /// MLX affine 8-bit (group 64) matrices, bf16 elsewhere.
    Q8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Precision::Auto,
            "f32" => Precision::F32,
            "f16" => Precision::F16,
            "bf16" => Precision::BF16,
            "q4" => Precision::Q4,
            "q8" => Precision::Q8,
            other => return Err(format!("unknown dtype {other:?} (auto, bf16, f16, f32, q4, q8)")),
        })
    }
}

impl Precision {
    fn float(self) -> DType {
        match self {
            Precision::Auto | Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            _ => DType::BF16,
        }
    }

    fn bits(self) -> Option<i32> {
        match self {
            Precision::Q4 => Some(4),
            Precision::Q8 => Some(8),
            _ => None,
        }
    }

    /// Casts float tensors, and quantizes matrices whose rows split into whole groups.
    fn apply(self, backend: &ActiveBackend, loaded: Loaded) -> Result<Loaded, String> {
        const GROUP: i32 = 64;
        // An MLX-quantized checkpoint at `auto`: as blocks where the backend multiplies them fast.
        if let (Precision::Auto, Loaded::Quantized { weight, scales, biases, group_size, bits }) = (self, &loaded) {
            if let Some(blocks) = backend.affine_as_blocks(weight, scales, biases, *group_size as i32, *bits as i32)? {
                return Ok(Loaded::Dense(blocks));
            }
        }
        let Loaded::Dense(array) = loaded else { return Ok(loaded) };
        if !matches!(backend.dtype(&array), DType::F32 | DType::F16 | DType::BF16) {
            return Ok(Loaded::Dense(array));
        }
        let shape = backend.shape(&array);
        if let Some(bits) = self.bits() {
            if shape.len() == 2 && shape[1] % GROUP == 0 {
                let array = backend.astype(&array, DType::BF16)?;
                let (weight, scales, biases) = backend.quantize(&array, GROUP, bits)?;
                return Ok(Loaded::Quantized { weight, scales, biases, group_size: GROUP as u32, bits: bits as u32 });
            }
        }
        let target = self.float();
        Ok(Loaded::Dense(if backend.dtype(&array) == target { array } else { backend.astype(&array, target)? }))
    }
}

/// What a model load gives the adapter: the checkpoint and the precision to deliver it at.
pub struct OpenCheckpoint {
    pub checkpoint: Box<dyn Checkpoint>,
    pub precision: Precision,
    /// Names the adapter asked for: a load that leaves any tensor unused is refused (strict loading).
    pub used: std::collections::BTreeSet<String>,
}

impl OpenCheckpoint {
    pub fn new(checkpoint: Box<dyn Checkpoint>, precision: Precision) -> Self {
        OpenCheckpoint { checkpoint, precision, used: Default::default() }
    }

    /// Tensors the checkpoint holds that the adapter never loaded: a graph that ignores weights computes
    /// something else than the model, so this is an error, not a partial load.
    pub fn unused(&self) -> Vec<String> {
        self.checkpoint.names().into_iter().filter(|n| !self.used.contains(n)).collect()
    }
}

impl HostState {
    fn open_checkpoint(&self) -> wasmtime::Result<&OpenCheckpoint> {
        self.weights.as_ref().ok_or_else(|| wasmtime::format_err!("adapter asked for weights outside of a model load"))
    }
}

impl Host for HostState {
    fn format(&mut self) -> wasmtime::Result<CheckpointFormat> {
        Ok(self.open_checkpoint()?.checkpoint.format())
    }

    fn config(&mut self) -> wasmtime::Result<String> {
        Ok(self.open_checkpoint()?.checkpoint.config())
    }

    fn names(&mut self) -> wasmtime::Result<Vec<String>> {
        Ok(self.open_checkpoint()?.checkpoint.names())
    }

    fn get(&mut self, name: String) -> wasmtime::Result<Result<Entry, String>> {
        self.check_deadline()?;
        let open = self.weights.as_mut().ok_or_else(|| wasmtime::format_err!("adapter asked for weights outside of a model load"))?;
        open.used.insert(name.clone());
        let open = self.open_checkpoint()?;
        let backend = &self.tensors.backend;
        let blocks = match open.precision {
            Precision::Auto => open.checkpoint.get_blocks(backend, &name),
            _ => Ok(None),
        };
        let loaded = match blocks.and_then(|b| match b {
            Some(loaded) => Ok(loaded),
            None => open.checkpoint.get(backend, &name).and_then(|l| open.precision.apply(backend, l)),
        }) {
            Ok(loaded) => loaded,
            Err(e) => return Ok(Err(e)),
        };
        Ok(match loaded {
            Loaded::Dense(array) => self.adopt(Ok(array))?.map(Entry::Dense),
            Loaded::Quantized { weight, scales, biases, group_size, bits } => {
                let weight = self.adopt(Ok(weight))?;
                let scales = self.adopt(Ok(scales))?;
                let biases = self.adopt(Ok(biases))?;
                match (weight, scales, biases) {
                    (Ok(weight), Ok(scales), Ok(biases)) => Ok(Entry::Quantized(QuantizedEntry { weight, scales, biases, group_size, bits })),
                    _ => Err("quantized tensor could not be registered".into()),
                }
            }
        })
    }
}
