//! The `tensor` import: lazy array operations the adapters call to build model graphs.
//!
//! Everything backend-specific sits behind [`Backend`]; [`mlx`] is the one backend today. This module
//! owns what the sandbox needs regardless of backend: handles in the store's `ResourceTable`, and caps
//! on live handles and their bytes, so an adapter cannot exhaust the host through tensors.

pub mod mlx;

use crate::adapter::bindings::edgechat::adapter::tensor as wit;
use crate::host::HostState;
use wasmtime::component::Resource;

pub use mlx::MlxBackend as ActiveBackend;
pub type BackendArray = <ActiveBackend as Backend>::Array;

/// Element types crossing the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    U32,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }
}

pub enum Mask<'a, A> {
    None,
    Causal,
    /// See the WIT `window-mask`.
    SlidingWindow { window: i32, query_offset: i32, key_offset: i32 },
    Explicit(&'a A),
}

/// Rotary embedding parameters (see the WIT `rope-params`).
#[derive(Debug, Clone, Copy)]
pub struct Rope {
    pub dims: i32,
    pub traditional: bool,
    pub base: f32,
    pub scale: f32,
    pub offset: i32,
}

pub type OpResult<A> = Result<A, String>;

/// A tensor backend: lazy ops over its own array type. Shapes use i32 as MLX does.
pub trait Backend {
    type Array: Send + 'static;

    fn name(&self) -> String;
    fn from_f32(&self, data: &[f32], shape: &[i32]) -> OpResult<Self::Array>;
    fn from_i32(&self, data: &[i32], shape: &[i32]) -> OpResult<Self::Array>;
    /// An array from little-endian raw element bytes (checkpoint data; need not be aligned).
    fn from_bytes(&self, dtype: DType, bytes: &[u8], shape: &[i32]) -> OpResult<Self::Array>;
    fn shape(&self, a: &Self::Array) -> Vec<i32>;
    fn dtype(&self, a: &Self::Array) -> DType;

    fn matmul(&self, a: &Self::Array, b: &Self::Array) -> OpResult<Self::Array>;
    #[allow(clippy::too_many_arguments)]
    fn quantized_matmul(&self, x: &Self::Array, w: &Self::Array, scales: &Self::Array, biases: &Self::Array, transpose: bool, group_size: i32, bits: i32) -> OpResult<Self::Array>;
    fn dequantize(&self, w: &Self::Array, scales: &Self::Array, biases: &Self::Array, group_size: i32, bits: i32) -> OpResult<Self::Array>;
    /// MLX affine quantization of a float matrix: (packed weight, scales, biases).
    fn quantize(&self, w: &Self::Array, group_size: i32, bits: i32) -> OpResult<(Self::Array, Self::Array, Self::Array)>;
    fn add(&self, a: &Self::Array, b: &Self::Array) -> OpResult<Self::Array>;
    fn subtract(&self, a: &Self::Array, b: &Self::Array) -> OpResult<Self::Array>;
    fn multiply(&self, a: &Self::Array, b: &Self::Array) -> OpResult<Self::Array>;
    fn divide(&self, a: &Self::Array, b: &Self::Array) -> OpResult<Self::Array>;
    fn scale(&self, a: &Self::Array, factor: f32) -> OpResult<Self::Array>;
    fn add_scalar(&self, a: &Self::Array, value: f32) -> OpResult<Self::Array>;
    fn tanh(&self, a: &Self::Array) -> OpResult<Self::Array>;
    fn sigmoid(&self, a: &Self::Array) -> OpResult<Self::Array>;
    fn silu(&self, a: &Self::Array) -> OpResult<Self::Array>;
    fn gelu_tanh(&self, a: &Self::Array) -> OpResult<Self::Array>;
    fn astype(&self, a: &Self::Array, dtype: DType) -> OpResult<Self::Array>;
    fn reshape(&self, a: &Self::Array, shape: &[i32]) -> OpResult<Self::Array>;
    fn transpose(&self, a: &Self::Array, axes: &[i32]) -> OpResult<Self::Array>;
    fn slice(&self, a: &Self::Array, start: &[i32], stop: &[i32]) -> OpResult<Self::Array>;
    fn slice_update(&self, a: &Self::Array, update: &Self::Array, start: &[i32], stop: &[i32]) -> OpResult<Self::Array>;
    fn concatenate(&self, arrays: &[&Self::Array], axis: i32) -> OpResult<Self::Array>;
    fn take(&self, a: &Self::Array, indices: &Self::Array, axis: i32) -> OpResult<Self::Array>;
    fn softmax(&self, a: &Self::Array, axis: i32) -> OpResult<Self::Array>;
    fn rms_norm(&self, x: &Self::Array, weight: &Self::Array, eps: f32) -> OpResult<Self::Array>;
    fn rope(&self, x: &Self::Array, params: Rope) -> OpResult<Self::Array>;
    fn attention(&self, q: &Self::Array, k: &Self::Array, v: &Self::Array, scale: f32, mask: Mask<'_, Self::Array>) -> OpResult<Self::Array>;
    fn conv1d_depthwise(&self, x: &Self::Array, weight: &Self::Array) -> OpResult<Self::Array>;
    fn eval(&self, arrays: &[&Self::Array]) -> OpResult<()>;
    fn read_f32(&self, a: &Self::Array) -> OpResult<Vec<f32>>;
}

/// Largest read-back: results, not weights, cross the boundary.
pub const MAX_READ_ELEMENTS: usize = 16 << 20;

/// A live array handle, with the bytes it was charged.
pub struct TensorHandle {
    pub array: BackendArray,
    bytes: u64,
}

/// Per-store tensor state: the backend and the caps.
pub struct Tensors {
    pub backend: ActiveBackend,
    pub live_handles: usize,
    pub live_bytes: u64,
    pub max_handles: usize,
    pub max_bytes: u64,
}

impl Tensors {
    pub fn new(max_handles: usize, max_bytes: u64) -> Self {
        Tensors { backend: ActiveBackend::default(), live_handles: 0, live_bytes: 0, max_handles, max_bytes }
    }
}

fn shape_u32_to_i32(shape: &[u32]) -> OpResult<Vec<i32>> {
    shape.iter().map(|&d| i32::try_from(d).map_err(|_| format!("dimension {d} is too large"))).collect()
}

fn to_dtype(d: wit::Dtype) -> DType {
    match d {
        wit::Dtype::Float32 => DType::F32,
        wit::Dtype::Float16 => DType::F16,
        wit::Dtype::Bfloat16 => DType::BF16,
        wit::Dtype::Int32 => DType::I32,
        wit::Dtype::Uint32 => DType::U32,
        wit::Dtype::Uint8 => DType::U8,
    }
}

fn from_dtype(d: DType) -> wit::Dtype {
    match d {
        DType::F32 => wit::Dtype::Float32,
        DType::F16 => wit::Dtype::Float16,
        DType::BF16 => wit::Dtype::Bfloat16,
        DType::I32 => wit::Dtype::Int32,
        DType::U32 => wit::Dtype::Uint32,
        DType::U8 => wit::Dtype::Uint8,
    }
}

pub(crate) type Handle = Resource<TensorHandle>;
type Outcome<T> = wasmtime::Result<Result<T, String>>;

impl HostState {
    pub(crate) fn array(&self, h: &Handle) -> wasmtime::Result<&BackendArray> {
        Ok(&self.table.get(h)?.array)
    }

    /// Registers a new array, enforcing the caps. Exceeding one traps: the adapter is misbehaving or
    /// leaking, and stopping the call is the only safe answer.
    pub(crate) fn adopt(&mut self, result: OpResult<BackendArray>) -> Outcome<Handle> {
        let array = match result {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        let t = &mut self.tensors;
        let shape = t.backend.shape(&array);
        let elements: u64 = shape.iter().map(|&d| d.max(0) as u64).product();
        let bytes = elements * t.backend.dtype(&array).size() as u64;
        if t.live_handles >= t.max_handles {
            wasmtime::bail!("adapter exceeded the limit of {} live tensor handles", t.max_handles);
        }
        if t.live_bytes + bytes > t.max_bytes {
            wasmtime::bail!(
                "adapter exceeded the tensor memory limit ({} MiB live, {} MiB more requested, limit {} MiB)",
                t.live_bytes >> 20,
                bytes >> 20,
                t.max_bytes >> 20
            );
        }
        t.live_handles += 1;
        t.live_bytes += bytes;
        Ok(Ok(self.table.push(TensorHandle { array, bytes })?))
    }

    fn unary(&mut self, a: Handle, op: impl FnOnce(&ActiveBackend, &BackendArray) -> OpResult<BackendArray>) -> Outcome<Handle> {
        let result = op(&self.tensors.backend, self.array(&a)?);
        self.adopt(result)
    }

    fn binary(
        &mut self,
        a: Handle,
        b: Handle,
        op: impl FnOnce(&ActiveBackend, &BackendArray, &BackendArray) -> OpResult<BackendArray>,
    ) -> Outcome<Handle> {
        let result = op(&self.tensors.backend, self.array(&a)?, self.array(&b)?);
        self.adopt(result)
    }
}

impl wit::HostArray for HostState {
    fn from_f32(&mut self, data: Vec<f32>, shape: Vec<u32>) -> Outcome<Handle> {
        let shape = match shape_u32_to_i32(&shape) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let result = self.tensors.backend.from_f32(&data, &shape);
        self.adopt(result)
    }

    fn from_i32(&mut self, data: Vec<i32>, shape: Vec<u32>) -> Outcome<Handle> {
        let shape = match shape_u32_to_i32(&shape) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let result = self.tensors.backend.from_i32(&data, &shape);
        self.adopt(result)
    }

    fn shape(&mut self, a: Handle) -> wasmtime::Result<Vec<u32>> {
        Ok(self.tensors.backend.shape(self.array(&a)?).into_iter().map(|d| d as u32).collect())
    }

    fn dtype(&mut self, a: Handle) -> wasmtime::Result<wit::Dtype> {
        Ok(from_dtype(self.tensors.backend.dtype(self.array(&a)?)))
    }

    fn drop(&mut self, a: Handle) -> wasmtime::Result<()> {
        let handle = self.table.delete(a)?;
        self.tensors.live_handles -= 1;
        self.tensors.live_bytes -= handle.bytes;
        Ok(())
    }
}

impl wit::Host for HostState {
    fn matmul(&mut self, a: Handle, b: Handle) -> Outcome<Handle> {
        self.binary(a, b, |be, a, b| be.matmul(a, b))
    }

    fn quantized_matmul(
        &mut self,
        x: Handle,
        w: Handle,
        scales: Handle,
        biases: Handle,
        transpose: bool,
        group_size: u32,
        bits: u32,
    ) -> Outcome<Handle> {
        let be = &self.tensors.backend;
        let result = be.quantized_matmul(
            self.array(&x)?,
            self.array(&w)?,
            self.array(&scales)?,
            self.array(&biases)?,
            transpose,
            group_size as i32,
            bits as i32,
        );
        self.adopt(result)
    }

    fn dequantize(&mut self, w: Handle, scales: Handle, biases: Handle, group_size: u32, bits: u32) -> Outcome<Handle> {
        let be = &self.tensors.backend;
        let result = be.dequantize(self.array(&w)?, self.array(&scales)?, self.array(&biases)?, group_size as i32, bits as i32);
        self.adopt(result)
    }

    fn add(&mut self, a: Handle, b: Handle) -> Outcome<Handle> {
        self.binary(a, b, |be, a, b| be.add(a, b))
    }

    fn subtract(&mut self, a: Handle, b: Handle) -> Outcome<Handle> {
        self.binary(a, b, |be, a, b| be.subtract(a, b))
    }

    fn multiply(&mut self, a: Handle, b: Handle) -> Outcome<Handle> {
        self.binary(a, b, |be, a, b| be.multiply(a, b))
    }

    fn divide(&mut self, a: Handle, b: Handle) -> Outcome<Handle> {
        self.binary(a, b, |be, a, b| be.divide(a, b))
    }

    fn scale(&mut self, a: Handle, factor: f32) -> Outcome<Handle> {
        self.unary(a, |be, a| be.scale(a, factor))
    }

    fn add_scalar(&mut self, a: Handle, value: f32) -> Outcome<Handle> {
        self.unary(a, |be, a| be.add_scalar(a, value))
    }

    fn tanh(&mut self, a: Handle) -> Outcome<Handle> {
        self.unary(a, |be, a| be.tanh(a))
    }

    fn sigmoid(&mut self, a: Handle) -> Outcome<Handle> {
        self.unary(a, |be, a| be.sigmoid(a))
    }

    fn silu(&mut self, a: Handle) -> Outcome<Handle> {
        self.unary(a, |be, a| be.silu(a))
    }

    fn gelu_tanh(&mut self, a: Handle) -> Outcome<Handle> {
        self.unary(a, |be, a| be.gelu_tanh(a))
    }

    fn astype(&mut self, a: Handle, dtype: wit::Dtype) -> Outcome<Handle> {
        self.unary(a, |be, a| be.astype(a, to_dtype(dtype)))
    }

    fn reshape(&mut self, a: Handle, shape: Vec<i32>) -> Outcome<Handle> {
        self.unary(a, |be, a| be.reshape(a, &shape))
    }

    fn transpose(&mut self, a: Handle, axes: Vec<u32>) -> Outcome<Handle> {
        let axes: Vec<i32> = axes.into_iter().map(|x| x as i32).collect();
        self.unary(a, |be, a| be.transpose(a, &axes))
    }

    fn slice(&mut self, a: Handle, start: Vec<i32>, stop: Vec<i32>) -> Outcome<Handle> {
        self.unary(a, |be, a| be.slice(a, &start, &stop))
    }

    fn slice_update(&mut self, a: Handle, update: Handle, start: Vec<i32>, stop: Vec<i32>) -> Outcome<Handle> {
        self.binary(a, update, |be, a, u| be.slice_update(a, u, &start, &stop))
    }

    fn concatenate(&mut self, arrays: Vec<Handle>, axis: i32) -> Outcome<Handle> {
        let refs = arrays.iter().map(|h| self.array(h)).collect::<wasmtime::Result<Vec<_>>>()?;
        let result = self.tensors.backend.concatenate(&refs, axis);
        self.adopt(result)
    }

    fn take(&mut self, a: Handle, indices: Handle, axis: i32) -> Outcome<Handle> {
        self.binary(a, indices, |be, a, i| be.take(a, i, axis))
    }

    fn softmax(&mut self, a: Handle, axis: i32) -> Outcome<Handle> {
        self.unary(a, |be, a| be.softmax(a, axis))
    }

    fn rms_norm(&mut self, x: Handle, weight: Handle, eps: f32) -> Outcome<Handle> {
        self.binary(x, weight, |be, x, w| be.rms_norm(x, w, eps))
    }

    fn rope(&mut self, x: Handle, p: wit::RopeParams) -> Outcome<Handle> {
        let params = Rope { dims: p.dims as i32, traditional: p.traditional, base: p.base, scale: p.scale, offset: p.offset as i32 };
        self.unary(x, |be, x| be.rope(x, params))
    }

    fn attention(&mut self, q: Handle, k: Handle, v: Handle, scale: f32, mask: wit::Mask) -> Outcome<Handle> {
        let mask = match &mask {
            wit::Mask::None => Mask::None,
            wit::Mask::Causal => Mask::Causal,
            wit::Mask::SlidingWindow(w) => {
                Mask::SlidingWindow { window: w.window as i32, query_offset: w.query_offset as i32, key_offset: w.key_offset as i32 }
            }
            wit::Mask::Explicit(m) => Mask::Explicit(self.array(m)?),
        };
        let result = self.tensors.backend.attention(self.array(&q)?, self.array(&k)?, self.array(&v)?, scale, mask);
        self.adopt(result)
    }

    fn conv1d_depthwise(&mut self, x: Handle, weight: Handle) -> Outcome<Handle> {
        self.binary(x, weight, |be, x, w| be.conv1d_depthwise(x, w))
    }

    fn eval(&mut self, arrays: Vec<Handle>) -> Outcome<()> {
        let refs = arrays.iter().map(|h| self.array(h)).collect::<wasmtime::Result<Vec<_>>>()?;
        Ok(self.tensors.backend.eval(&refs))
    }

    fn read_f32(&mut self, a: Handle) -> Outcome<Vec<f32>> {
        let be = &self.tensors.backend;
        let array = self.array(&a)?;
        let elements: i64 = be.shape(array).iter().map(|&d| d as i64).product();
        if elements as usize > MAX_READ_ELEMENTS {
            return Ok(Err(format!("read-f32 of {elements} elements refused (limit {MAX_READ_ELEMENTS})")));
        }
        Ok(be.read_f32(array))
    }
}
