//! Which backend a run computes on: `--backend cpu|mlx` or EDGECHAT_BACKEND, by default MLX on Apple
//! Silicon (Metal) and ggml's CPU backend everywhere else. The choice is made once per process; every
//! store then holds arrays of that backend only.

use super::cpu::{self, CpuBackend};
use super::mlx::MlxBackend;
use super::{Backend, DType, Mask, OpResult, Rope};
use memmap2::Mmap;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Mlx,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "mlx" => Ok(BackendKind::Mlx),
            other => Err(format!("unknown backend {other:?} (cpu, mlx)")),
        }
    }
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Mlx => "mlx",
        }
    }

    /// The platform's fastest engine: MLX on Apple Silicon (Metal), else the cpu backend where this
    /// processor can run it.
    pub fn platform_default() -> BackendKind {
        Self::default_given(cpu_unavailable().is_none())
    }

    fn default_given(cpu_runs_here: bool) -> BackendKind {
        if cfg!(all(target_os = "macos", target_arch = "aarch64")) || !cpu_runs_here { BackendKind::Mlx } else { BackendKind::Cpu }
    }
}

/// Why the cpu backend cannot run here, if it cannot: ggml's kernels are chosen for this processor
/// when the process starts (`cpu/kernels.rs`), and only a missing or broken install leaves none.
pub fn cpu_unavailable() -> Option<String> {
    super::cpu::kernels::kernels().err()
}

static CHOSEN: OnceLock<BackendKind> = OnceLock::new();

/// Fixes the process's backend (the CLI calls this first). Later calls cannot change it.
pub fn choose(kind: BackendKind) -> BackendKind {
    *CHOSEN.get_or_init(|| kind)
}

/// The process's backend: as chosen, else EDGECHAT_BACKEND, else the platform default. An unknown
/// EDGECHAT_BACKEND value is refused by the CLI before anything runs (see `from_env`).
pub fn chosen() -> BackendKind {
    *CHOSEN.get_or_init(|| from_env().ok().flatten().unwrap_or_else(BackendKind::platform_default))
}

pub fn from_env() -> Result<Option<BackendKind>, String> {
    match std::env::var("EDGECHAT_BACKEND") {
        Ok(v) if !v.is_empty() => v.parse().map(Some).map_err(|e| format!("EDGECHAT_BACKEND: {e}")),
        _ => Ok(None),
    }
}

/// One backend of either kind.
pub enum ActiveBackend {
    Cpu(CpuBackend),
    Mlx(MlxBackend),
}

impl Default for ActiveBackend {
    fn default() -> Self {
        ActiveBackend::of(chosen())
    }
}

impl ActiveBackend {
    pub fn of(kind: BackendKind) -> Self {
        match kind {
            BackendKind::Cpu => ActiveBackend::Cpu(CpuBackend),
            BackendKind::Mlx => ActiveBackend::Mlx(MlxBackend),
        }
    }

    pub fn kind(&self) -> BackendKind {
        match self {
            ActiveBackend::Cpu(_) => BackendKind::Cpu,
            ActiveBackend::Mlx(_) => BackendKind::Mlx,
        }
    }
}

#[derive(Clone)]
pub enum AnyArray {
    Cpu(cpu::Array),
    Mlx(mlx_rs::Array),
}

const MIXED: &str = "arrays of different backends cannot be combined";

/// Forwards a trait method to the backend in use, unwrapping array arguments of the same kind.
macro_rules! dispatch {
    ($self:ident, |$be:ident| $cpu:expr, $mlx:expr) => {
        match $self {
            ActiveBackend::Cpu($be) => $cpu,
            ActiveBackend::Mlx($be) => $mlx,
        }
    };
}

fn cpu_array(a: &AnyArray) -> OpResult<&cpu::Array> {
    match a {
        AnyArray::Cpu(x) => Ok(x),
        AnyArray::Mlx(_) => Err(MIXED.into()),
    }
}

fn mlx_array(a: &AnyArray) -> OpResult<&mlx_rs::Array> {
    match a {
        AnyArray::Mlx(x) => Ok(x),
        AnyArray::Cpu(_) => Err(MIXED.into()),
    }
}

/// `$method(arrays..., extra...)` on the active backend, unwrapping the arrays and rewrapping the result.
macro_rules! forward {
    ($self:ident . $method:ident ( $($a:ident),* ) $(, $extra:expr)*) => {
        match $self {
            ActiveBackend::Cpu(be) => be.$method($(cpu_array($a)?,)* $($extra),*).map(AnyArray::Cpu),
            ActiveBackend::Mlx(be) => be.$method($(mlx_array($a)?,)* $($extra),*).map(AnyArray::Mlx),
        }
    };
}

impl Backend for ActiveBackend {
    type Array = AnyArray;

    fn name(&self) -> String {
        dispatch!(self, |be| be.name(), be.name())
    }

    fn from_f32(&self, data: &[f32], shape: &[i32]) -> OpResult<AnyArray> {
        dispatch!(self, |be| be.from_f32(data, shape).map(AnyArray::Cpu), be.from_f32(data, shape).map(AnyArray::Mlx))
    }

    fn from_i32(&self, data: &[i32], shape: &[i32]) -> OpResult<AnyArray> {
        dispatch!(self, |be| be.from_i32(data, shape).map(AnyArray::Cpu), be.from_i32(data, shape).map(AnyArray::Mlx))
    }

    fn from_bytes(&self, dtype: DType, bytes: &[u8], shape: &[i32]) -> OpResult<AnyArray> {
        dispatch!(self, |be| be.from_bytes(dtype, bytes, shape).map(AnyArray::Cpu), be.from_bytes(dtype, bytes, shape).map(AnyArray::Mlx))
    }

    fn affine_as_blocks(&self, w: &AnyArray, scales: &AnyArray, biases: &AnyArray, group_size: i32, bits: i32) -> OpResult<Option<AnyArray>> {
        dispatch!(
            self,
            |be| Ok(be.affine_as_blocks(cpu_array(w)?, cpu_array(scales)?, cpu_array(biases)?, group_size, bits)?.map(AnyArray::Cpu)),
            Ok(be.affine_as_blocks(mlx_array(w)?, mlx_array(scales)?, mlx_array(biases)?, group_size, bits)?.map(AnyArray::Mlx))
        )
    }

    fn from_blocks(&self, ggml_type: u32, map: &Arc<Mmap>, range: Range<usize>, shape: &[i32]) -> OpResult<Option<AnyArray>> {
        dispatch!(self, |be| Ok(be.from_blocks(ggml_type, map, range, shape)?.map(AnyArray::Cpu)), Ok(be.from_blocks(ggml_type, map, range, shape)?.map(AnyArray::Mlx)))
    }

    fn shape<'a>(&self, a: &'a AnyArray) -> &'a [i32] {
        match a {
            AnyArray::Cpu(x) => CpuBackend.shape(x),
            AnyArray::Mlx(x) => MlxBackend.shape(x),
        }
    }

    fn blocks(&self, a: &AnyArray) -> Option<u32> {
        match a {
            AnyArray::Cpu(x) => CpuBackend.blocks(x),
            AnyArray::Mlx(_) => None,
        }
    }

    fn dtype(&self, a: &AnyArray) -> DType {
        match a {
            AnyArray::Cpu(x) => CpuBackend.dtype(x),
            AnyArray::Mlx(x) => MlxBackend.dtype(x),
        }
    }

    fn matmul(&self, a: &AnyArray, b: &AnyArray) -> OpResult<AnyArray> {
        forward!(self.matmul(a, b))
    }

    fn quantized_matmul(&self, x: &AnyArray, w: &AnyArray, s: &AnyArray, b: &AnyArray, transpose: bool, group_size: i32, bits: i32) -> OpResult<AnyArray> {
        forward!(self.quantized_matmul(x, w, s, b), transpose, group_size, bits)
    }

    fn dequantize(&self, w: &AnyArray, s: &AnyArray, b: &AnyArray, group_size: i32, bits: i32) -> OpResult<AnyArray> {
        forward!(self.dequantize(w, s, b), group_size, bits)
    }

    fn quantize(&self, w: &AnyArray, group_size: i32, bits: i32) -> OpResult<(AnyArray, AnyArray, AnyArray)> {
        match (self, w) {
            (ActiveBackend::Cpu(be), AnyArray::Cpu(w)) => be.quantize(w, group_size, bits).map(|(a, b, c)| (AnyArray::Cpu(a), AnyArray::Cpu(b), AnyArray::Cpu(c))),
            (ActiveBackend::Mlx(be), AnyArray::Mlx(w)) => be.quantize(w, group_size, bits).map(|(a, b, c)| (AnyArray::Mlx(a), AnyArray::Mlx(b), AnyArray::Mlx(c))),
            _ => Err(MIXED.into()),
        }
    }

    fn add(&self, a: &AnyArray, b: &AnyArray) -> OpResult<AnyArray> {
        forward!(self.add(a, b))
    }

    fn subtract(&self, a: &AnyArray, b: &AnyArray) -> OpResult<AnyArray> {
        forward!(self.subtract(a, b))
    }

    fn multiply(&self, a: &AnyArray, b: &AnyArray) -> OpResult<AnyArray> {
        forward!(self.multiply(a, b))
    }

    fn divide(&self, a: &AnyArray, b: &AnyArray) -> OpResult<AnyArray> {
        forward!(self.divide(a, b))
    }

    fn scale(&self, a: &AnyArray, factor: f32) -> OpResult<AnyArray> {
        forward!(self.scale(a), factor)
    }

    fn add_scalar(&self, a: &AnyArray, value: f32) -> OpResult<AnyArray> {
        forward!(self.add_scalar(a), value)
    }

    fn tanh(&self, a: &AnyArray) -> OpResult<AnyArray> {
        forward!(self.tanh(a))
    }

    fn sigmoid(&self, a: &AnyArray) -> OpResult<AnyArray> {
        forward!(self.sigmoid(a))
    }

    fn silu(&self, a: &AnyArray) -> OpResult<AnyArray> {
        forward!(self.silu(a))
    }

    fn gelu_tanh(&self, a: &AnyArray) -> OpResult<AnyArray> {
        forward!(self.gelu_tanh(a))
    }

    fn astype(&self, a: &AnyArray, dtype: DType) -> OpResult<AnyArray> {
        forward!(self.astype(a), dtype)
    }

    fn reshape(&self, a: &AnyArray, shape: &[i32]) -> OpResult<AnyArray> {
        forward!(self.reshape(a), shape)
    }

    fn transpose(&self, a: &AnyArray, axes: &[i32]) -> OpResult<AnyArray> {
        forward!(self.transpose(a), axes)
    }

    fn slice(&self, a: &AnyArray, start: &[i32], stop: &[i32]) -> OpResult<AnyArray> {
        forward!(self.slice(a), start, stop)
    }

    fn slice_update(&self, a: &AnyArray, update: &AnyArray, start: &[i32], stop: &[i32]) -> OpResult<AnyArray> {
        forward!(self.slice_update(a, update), start, stop)
    }

    fn concatenate(&self, arrays: &[&AnyArray], axis: i32) -> OpResult<AnyArray> {
        match self {
            ActiveBackend::Cpu(be) => {
                let parts = arrays.iter().map(|a| cpu_array(a)).collect::<OpResult<Vec<_>>>()?;
                be.concatenate(&parts, axis).map(AnyArray::Cpu)
            }
            ActiveBackend::Mlx(be) => {
                let parts = arrays.iter().map(|a| mlx_array(a)).collect::<OpResult<Vec<_>>>()?;
                be.concatenate(&parts, axis).map(AnyArray::Mlx)
            }
        }
    }

    fn take(&self, a: &AnyArray, indices: &AnyArray, axis: i32) -> OpResult<AnyArray> {
        forward!(self.take(a, indices), axis)
    }

    fn softmax(&self, a: &AnyArray, axis: i32) -> OpResult<AnyArray> {
        forward!(self.softmax(a), axis)
    }

    fn rms_norm(&self, x: &AnyArray, weight: &AnyArray, eps: f32) -> OpResult<AnyArray> {
        forward!(self.rms_norm(x, weight), eps)
    }

    fn rope(&self, x: &AnyArray, params: Rope) -> OpResult<AnyArray> {
        forward!(self.rope(x), params)
    }

    fn attention(&self, q: &AnyArray, k: &AnyArray, v: &AnyArray, scale: f32, mask: Mask<'_, AnyArray>) -> OpResult<AnyArray> {
        match self {
            ActiveBackend::Cpu(be) => {
                let mask = mask.try_map(cpu_array)?;
                be.attention(cpu_array(q)?, cpu_array(k)?, cpu_array(v)?, scale, mask).map(AnyArray::Cpu)
            }
            ActiveBackend::Mlx(be) => {
                let mask = mask.try_map(mlx_array)?;
                be.attention(mlx_array(q)?, mlx_array(k)?, mlx_array(v)?, scale, mask).map(AnyArray::Mlx)
            }
        }
    }

    fn conv1d_depthwise(&self, x: &AnyArray, weight: &AnyArray) -> OpResult<AnyArray> {
        forward!(self.conv1d_depthwise(x, weight))
    }

    fn eval(&self, arrays: &[&AnyArray]) -> OpResult<()> {
        match self {
            ActiveBackend::Cpu(be) => {
                let parts = arrays.iter().map(|a| cpu_array(a)).collect::<OpResult<Vec<_>>>()?;
                be.eval(&parts)
            }
            ActiveBackend::Mlx(be) => {
                let parts = arrays.iter().map(|a| mlx_array(a)).collect::<OpResult<Vec<_>>>()?;
                be.eval(&parts)
            }
        }
    }

    fn discard(&self, a: AnyArray) -> OpResult<()> {
        match (self, a) {
            (ActiveBackend::Cpu(be), AnyArray::Cpu(a)) => be.discard(a),
            (ActiveBackend::Mlx(be), AnyArray::Mlx(a)) => be.discard(a),
            _ => Err(MIXED.into()),
        }
    }

    fn read_f32(&self, a: &AnyArray) -> OpResult<Vec<f32>> {
        dispatch!(self, |be| be.read_f32(cpu_array(a)?), be.read_f32(mlx_array(a)?))
    }

    fn with_f32<R>(&self, a: &AnyArray, f: impl FnOnce(&[f32]) -> R) -> OpResult<R> {
        dispatch!(self, |be| be.with_f32(cpu_array(a)?, f), be.with_f32(mlx_array(a)?, f))
    }

    fn int_range(&self, a: &AnyArray) -> OpResult<Option<(i64, i64)>> {
        dispatch!(self, |be| be.int_range(cpu_array(a)?), be.int_range(mlx_array(a)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_without_the_cpu_kernels_gets_mlx() {
        assert_eq!(BackendKind::default_given(false), BackendKind::Mlx);
        let expected = if cfg!(all(target_os = "macos", target_arch = "aarch64")) { BackendKind::Mlx } else { BackendKind::Cpu };
        assert_eq!(BackendKind::default_given(true), expected);
        // This machine builds and tests the cpu backend, so it must be able to run it.
        assert_eq!(cpu_unavailable(), None);
    }
}
