//! The `tensor` import: lazy array operations the adapters call to build model graphs.
//!
//! Everything backend-specific sits behind [`Backend`]: [`cpu`] (ggml) and [`mlx`], one chosen per
//! process by [`active`]. This module
//! owns what the sandbox needs regardless of backend: handles in the store's `ResourceTable`, caps on
//! live handles and their bytes, and [`checks`]: every op's shapes are validated and its result (and
//! largest intermediate) charged to the byte cap before the backend records it; gather indices are
//! checked against the axis they index, since MLX's CPU gather does not bounds-check.

pub mod active;
pub mod batch;
pub mod checks;
pub mod cpu;
pub mod mlx;
pub mod replay;
pub mod template;

use crate::adapter::bindings::edgechat::adapter::tensor as wit;
use crate::host::HostState;
use memmap2::Mmap;
use std::ops::Range;
use std::sync::Arc;
use wasmtime::component::Resource;

pub use active::{ActiveBackend, BackendKind};
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

impl<'a, A> Mask<'a, A> {
    /// The same mask over another array type (an explicit mask's array converted by `f`).
    pub fn try_map<B>(self, f: impl FnOnce(&'a A) -> OpResult<&'a B>) -> OpResult<Mask<'a, B>> {
        Ok(match self {
            Mask::None => Mask::None,
            Mask::Causal => Mask::Causal,
            Mask::SlidingWindow { window, query_offset, key_offset } => Mask::SlidingWindow { window, query_offset, key_offset },
            Mask::Explicit(m) => Mask::Explicit(f(m)?),
        })
    }
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
    /// An array over ggml block-quantized rows (`ggml_type` as GGUF numbers it) at `range` of a mapped
    /// file, computing as the f32 values the blocks encode; None when the backend cannot multiply blocks.
    fn from_blocks(&self, ggml_type: u32, map: &Arc<Mmap>, range: Range<usize>, shape: &[i32]) -> OpResult<Option<Self::Array>>;
    fn shape<'a>(&self, a: &'a Self::Array) -> &'a [i32];
    /// The ggml block format `a` is stored in, if it is block-quantized data.
    fn blocks(&self, a: &Self::Array) -> Option<u32>;
    fn dtype(&self, a: &Self::Array) -> DType;

    fn matmul(&self, a: &Self::Array, b: &Self::Array) -> OpResult<Self::Array>;
    #[allow(clippy::too_many_arguments)]
    fn quantized_matmul(&self, x: &Self::Array, w: &Self::Array, scales: &Self::Array, biases: &Self::Array, transpose: bool, group_size: i32, bits: i32) -> OpResult<Self::Array>;
    fn dequantize(&self, w: &Self::Array, scales: &Self::Array, biases: &Self::Array, group_size: i32, bits: i32) -> OpResult<Self::Array>;
    /// MLX affine weights as block-quantized data the backend multiplies as blocks (see `from_blocks`);
    /// None when it has no block format for them.
    fn affine_as_blocks(&self, w: &Self::Array, scales: &Self::Array, biases: &Self::Array, group_size: i32, bits: i32) -> OpResult<Option<Self::Array>>;
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
    /// Drops `a` unread, computing of its graph only what others hold (a cache's new rows), where the
    /// backend can tell what that is; otherwise all of it.
    fn discard(&self, a: Self::Array) -> OpResult<()>;
    fn read_f32(&self, a: &Self::Array) -> OpResult<Vec<f32>>;
    /// `a`'s values lent to `f`, where they lie when the backend can (a decode step's 1 MB of logits,
    /// read once by the sampler instead of copied first).
    fn with_f32<R>(&self, a: &Self::Array, f: impl FnOnce(&[f32]) -> R) -> OpResult<R> {
        Ok(f(&self.read_f32(a)?))
    }
    /// The smallest and largest value of an integer array (evaluating it); None when it is empty.
    fn int_range(&self, a: &Self::Array) -> OpResult<Option<(i64, i64)>>;
}

/// Largest read-back: results, not weights, cross the boundary.
pub const MAX_READ_ELEMENTS: usize = 16 << 20;

/// A live array handle, with its dtype (read from the backend once, when it is adopted: the checks
/// consult it on every op; the shape is the array's own) and the bytes it was charged.
pub struct TensorHandle {
    pub array: BackendArray,
    dtype: DType,
    bytes: u64,
    /// Smallest and largest value, when the host saw them (`from-i32`): a gather need not evaluate them.
    known_range: Option<(i64, i64)>,
    /// The ggml block format of data kept as stored (it computes as the f32 `dtype` says).
    blocks: Option<u32>,
}

impl TensorHandle {
    /// The type the latest contract reports: the block format for stored blocks.
    fn contract_dtype(&self) -> wit::Dtype {
        match self.blocks.and_then(|b| BLOCK_FORMATS.iter().find(|(id, _)| *id == b)) {
            Some((_, format)) => *format,
            None => from_dtype(self.dtype),
        }
    }
}

/// Per-store tensor state: the backend and the caps.
pub struct Tensors {
    pub backend: ActiveBackend,
    pub live_handles: usize,
    pub live_bytes: u64,
    /// The most bytes live at once (reported by `edgechat adapters test`).
    pub peak_bytes: u64,
    pub max_handles: usize,
    pub max_bytes: u64,
    /// The results of the `record-batch` call running now (see [`batch`]).
    batch: Option<Vec<Option<TensorHandle>>>,
    /// Memory held by live templates (see [`template`]).
    template_bytes: usize,
    /// Templates run so far: the decode steps the adapter's own code did not record.
    pub template_runs: u64,
    /// Of those, the runs the shell computed without recording them either (see [`replay`]).
    pub unrecorded_runs: u64,
    /// Time spent computing inside the adapter's calls (template runs computed without being recorded,
    /// see [`replay`]), which is not graph building.
    pub computed_in_calls: std::time::Duration,
}

impl Tensors {
    pub fn new(max_handles: usize, max_bytes: u64) -> Self {
        Tensors { backend: ActiveBackend::default(), live_handles: 0, live_bytes: 0, peak_bytes: 0, max_handles, max_bytes, batch: None, template_bytes: 0, template_runs: 0, unrecorded_runs: 0, computed_in_calls: std::time::Duration::ZERO }
    }
}

/// The element type an `astype` asks for; block formats are how weights are stored, never a target.
fn to_dtype(d: wit::Dtype) -> Result<DType, String> {
    Ok(match d {
        wit::Dtype::Float32 => DType::F32,
        wit::Dtype::Float16 => DType::F16,
        wit::Dtype::Bfloat16 => DType::BF16,
        wit::Dtype::Int32 => DType::I32,
        wit::Dtype::Uint32 => DType::U32,
        wit::Dtype::Uint8 => DType::U8,
        block => return Err(format!("astype: {block:?} is a stored block format, not a type to convert to")),
    })
}

/// GGUF's block formats by ggml type id (the ones the GGUF reader accepts).
const BLOCK_FORMATS: [(u32, wit::Dtype); 8] = [
    (2, wit::Dtype::Q40),
    (3, wit::Dtype::Q41),
    (6, wit::Dtype::Q50),
    (7, wit::Dtype::Q51),
    (8, wit::Dtype::Q80),
    (12, wit::Dtype::Q4K),
    (13, wit::Dtype::Q5K),
    (14, wit::Dtype::Q6K),
];

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

/// Unwraps a shape check; a refusal becomes the op's error value (the adapter sees it, the call goes on).
macro_rules! check {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        }
    };
}

impl HostState {
    /// The array behind a handle: one in the store's table, or a result of the running batch.
    fn entry(&self, h: &Handle) -> wasmtime::Result<&TensorHandle> {
        match batch::index(h) {
            Some(i) => batch::entry(&self.tensors, i),
            None => Ok(self.table.get(h)?),
        }
    }

    pub(crate) fn array(&self, h: &Handle) -> wasmtime::Result<&BackendArray> {
        Ok(&self.entry(h)?.array)
    }

    /// The shape the checks consult (borrowed: an op reads several per call).
    fn shape_of(&self, h: &Handle) -> wasmtime::Result<&[i32]> {
        Ok(self.tensors.backend.shape(&self.entry(h)?.array))
    }

    fn dtype_of(&self, h: &Handle) -> wasmtime::Result<DType> {
        Ok(self.entry(h)?.dtype)
    }

    /// Charges `bytes` (an op's result or intermediate) against the byte cap before the op is recorded.
    /// Exceeding a cap traps: the adapter is misbehaving or leaking, and stopping the call is the only
    /// safe answer.
    fn charge(&self, op: &str, bytes: u64) -> wasmtime::Result<()> {
        self.check_deadline()?;
        let t = &self.tensors;
        if t.live_bytes.saturating_add(bytes) > t.max_bytes {
            wasmtime::bail!(
                "adapter exceeded the tensor memory limit in {op} ({} MiB live, {} MiB more requested, limit {} MiB)",
                t.live_bytes >> 20,
                bytes >> 20,
                t.max_bytes >> 20
            );
        }
        Ok(())
    }

    /// Charges an op whose result has `shape` and elements of `dtype`.
    fn charge_shape(&self, op: &str, shape: &[i32], dtype: DType) -> Outcome<()> {
        let bytes = check!(checks::bytes(shape, dtype).map_err(|e| format!("{op}: {e}")));
        self.charge(op, bytes)?;
        Ok(Ok(()))
    }

    /// Registers a new array, enforcing the caps (in checked arithmetic, on the shape the backend reports).
    pub(crate) fn adopt(&mut self, result: OpResult<BackendArray>) -> Outcome<Handle> {
        let array = check!(result);
        let t = &mut self.tensors;
        let (dtype, blocks) = (t.backend.dtype(&array), t.backend.blocks(&array));
        let bytes = match checks::bytes(t.backend.shape(&array), dtype) {
            Ok(b) => b,
            Err(e) => wasmtime::bail!("adapter produced an array the host cannot hold: {e}"),
        };
        if t.live_handles >= t.max_handles {
            wasmtime::bail!("adapter exceeded the limit of {} live tensor handles", t.max_handles);
        }
        self.charge("a new array", bytes)?;
        let t = &mut self.tensors;
        t.live_handles += 1;
        t.live_bytes += bytes;
        t.peak_bytes = t.peak_bytes.max(t.live_bytes);
        let handle = TensorHandle { array, dtype, bytes, known_range: None, blocks };
        Ok(Ok(match &mut self.tensors.batch {
            Some(results) => batch::add(results, handle),
            None => self.table.push(handle)?,
        }))
    }

    /// An op whose result has the shape and dtype of its input.
    fn unary(&mut self, op: &str, a: Handle, f: impl FnOnce(&ActiveBackend, &BackendArray) -> OpResult<BackendArray>) -> Outcome<Handle> {
        check!(self.charge_shape(op, self.shape_of(&a)?, self.dtype_of(&a)?)?);
        let result = f(&self.tensors.backend, self.array(&a)?);
        self.adopt(result)
    }

    /// An elementwise op with numpy broadcasting.
    fn broadcasting(
        &mut self,
        op: &str,
        a: Handle,
        b: Handle,
        f: impl FnOnce(&ActiveBackend, &BackendArray, &BackendArray) -> OpResult<BackendArray>,
    ) -> Outcome<Handle> {
        let shape = check!(checks::broadcast(op, self.shape_of(&a)?, self.shape_of(&b)?));
        let dtype = wider(self.dtype_of(&a)?, self.dtype_of(&b)?);
        check!(self.charge_shape(op, &shape, dtype)?);
        let result = f(&self.tensors.backend, self.array(&a)?, self.array(&b)?);
        self.adopt(result)
    }

    fn quantized_operands(&self, w: &Handle, scales: &Handle, biases: &Handle, group_size: u32, bits: u32) -> wasmtime::Result<Result<i64, String>> {
        Ok(checks::quantized(self.shape_of(w)?, self.dtype_of(w)?, self.shape_of(scales)?, self.shape_of(biases)?, group_size, bits))
    }
}

/// The larger of two element types (what a mixed op's result is charged at).
fn wider(a: DType, b: DType) -> DType {
    if a.size() >= b.size() { a } else { b }
}

impl wit::HostArray for HostState {
    fn from_f32(&mut self, data: Vec<f32>, shape: Vec<u32>) -> Outcome<Handle> {
        let shape = check!(checks::from_guest(&shape));
        let result = self.tensors.backend.from_f32(&data, &shape);
        self.adopt(result)
    }

    fn from_i32(&mut self, data: Vec<i32>, shape: Vec<u32>) -> Outcome<Handle> {
        let shape = check!(checks::from_guest(&shape));
        let result = self.tensors.backend.from_i32(&data, &shape);
        let handle = check!(self.adopt(result)?);
        let (low, high) = (data.iter().min(), data.iter().max());
        self.table.get_mut(&handle)?.known_range = low.zip(high).map(|(&l, &h)| (l as i64, h as i64));
        Ok(Ok(handle))
    }

    fn shape(&mut self, a: Handle) -> wasmtime::Result<Vec<u32>> {
        Ok(self.shape_of(&a)?.iter().map(|&d| d.max(0) as u32).collect())
    }

    fn dtype(&mut self, a: Handle) -> wasmtime::Result<wit::Dtype> {
        Ok(self.entry(&a)?.contract_dtype())
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
        let shape = check!(checks::matmul(self.shape_of(&a)?, self.shape_of(&b)?));
        check!(self.charge_shape("matmul", &shape, wider(self.dtype_of(&a)?, self.dtype_of(&b)?))?);
        let result = self.tensors.backend.matmul(self.array(&a)?, self.array(&b)?);
        self.adopt(result)
    }

    fn quantized_matmul(&mut self, x: Handle, w: Handle, scales: Handle, biases: Handle, transpose: bool, group_size: u32, bits: u32) -> Outcome<Handle> {
        let columns = check!(self.quantized_operands(&w, &scales, &biases, group_size, bits)?);
        let (xs, ws) = (self.shape_of(&x)?, self.shape_of(&w)?);
        let rows = ws[ws.len() - 2] as i64;
        // x [.., k] @ W.T [k, rows] (transpose) or x [.., rows] @ W [rows, columns].
        let (k, n) = if transpose { (columns, rows) } else { (rows, columns) };
        if xs.last().map(|&d| d as i64) != Some(k) || ws.len() != 2 {
            return Ok(Err(format!("quantized-matmul: x {xs:?} does not fit a {} weight {ws:?}", if transpose { "transposed" } else { "plain" })));
        }
        let mut out = xs.to_vec();
        *out.last_mut().expect("rank >= 1") = check!(i32::try_from(n).map_err(|_| "quantized-matmul: result too wide".to_owned()));
        check!(self.charge_shape("quantized-matmul", &out, self.dtype_of(&x)?)?);
        let be = &self.tensors.backend;
        let result = be.quantized_matmul(self.array(&x)?, self.array(&w)?, self.array(&scales)?, self.array(&biases)?, transpose, group_size as i32, bits as i32);
        self.adopt(result)
    }

    fn dequantize(&mut self, w: Handle, scales: Handle, biases: Handle, group_size: u32, bits: u32) -> Outcome<Handle> {
        let columns = check!(self.quantized_operands(&w, &scales, &biases, group_size, bits)?);
        let mut out = self.shape_of(&w)?.to_vec();
        *out.last_mut().expect("rank >= 2") = check!(i32::try_from(columns).map_err(|_| "dequantize: result too wide".to_owned()));
        check!(self.charge_shape("dequantize", &out, self.dtype_of(&scales)?)?);
        let be = &self.tensors.backend;
        let result = be.dequantize(self.array(&w)?, self.array(&scales)?, self.array(&biases)?, group_size as i32, bits as i32);
        self.adopt(result)
    }

    fn add(&mut self, a: Handle, b: Handle) -> Outcome<Handle> {
        self.broadcasting("add", a, b, |be, a, b| be.add(a, b))
    }

    fn subtract(&mut self, a: Handle, b: Handle) -> Outcome<Handle> {
        self.broadcasting("subtract", a, b, |be, a, b| be.subtract(a, b))
    }

    fn multiply(&mut self, a: Handle, b: Handle) -> Outcome<Handle> {
        self.broadcasting("multiply", a, b, |be, a, b| be.multiply(a, b))
    }

    fn divide(&mut self, a: Handle, b: Handle) -> Outcome<Handle> {
        self.broadcasting("divide", a, b, |be, a, b| be.divide(a, b))
    }

    fn scale(&mut self, a: Handle, factor: f32) -> Outcome<Handle> {
        self.unary("scale", a, |be, a| be.scale(a, factor))
    }

    fn add_scalar(&mut self, a: Handle, value: f32) -> Outcome<Handle> {
        self.unary("add-scalar", a, |be, a| be.add_scalar(a, value))
    }

    fn tanh(&mut self, a: Handle) -> Outcome<Handle> {
        self.unary("tanh", a, |be, a| be.tanh(a))
    }

    fn sigmoid(&mut self, a: Handle) -> Outcome<Handle> {
        self.unary("sigmoid", a, |be, a| be.sigmoid(a))
    }

    fn silu(&mut self, a: Handle) -> Outcome<Handle> {
        self.unary("silu", a, |be, a| be.silu(a))
    }

    fn gelu_tanh(&mut self, a: Handle) -> Outcome<Handle> {
        self.unary("gelu-tanh", a, |be, a| be.gelu_tanh(a))
    }

    fn astype(&mut self, a: Handle, dtype: wit::Dtype) -> Outcome<Handle> {
        let dtype = check!(to_dtype(dtype));
        check!(self.charge_shape("astype", self.shape_of(&a)?, dtype)?);
        let result = self.tensors.backend.astype(self.array(&a)?, dtype);
        self.adopt(result)
    }

    fn reshape(&mut self, a: Handle, shape: Vec<i32>) -> Outcome<Handle> {
        let shape = check!(checks::reshape(self.shape_of(&a)?, &shape));
        let result = self.tensors.backend.reshape(self.array(&a)?, &shape);
        self.adopt(result)
    }

    fn transpose(&mut self, a: Handle, axes: Vec<u32>) -> Outcome<Handle> {
        check!(checks::transpose(self.shape_of(&a)?, &axes));
        let axes: Vec<i32> = axes.into_iter().map(|x| x as i32).collect();
        self.unary("transpose", a, |be, a| be.transpose(a, &axes))
    }

    fn slice(&mut self, a: Handle, start: Vec<i32>, stop: Vec<i32>) -> Outcome<Handle> {
        check!(checks::slice(self.shape_of(&a)?, &start, &stop));
        self.unary("slice", a, |be, a| be.slice(a, &start, &stop))
    }

    fn slice_update(&mut self, a: Handle, update: Handle, start: Vec<i32>, stop: Vec<i32>) -> Outcome<Handle> {
        let shape = self.shape_of(&a)?;
        check!(checks::slice(shape, &start, &stop));
        check!(self.charge_shape("slice-update", shape, self.dtype_of(&a)?)?);
        let result = self.tensors.backend.slice_update(self.array(&a)?, self.array(&update)?, &start, &stop);
        self.adopt(result)
    }

    fn concatenate(&mut self, arrays: Vec<Handle>, axis: i32) -> Outcome<Handle> {
        let shapes = arrays.iter().map(|h| self.shape_of(h)).collect::<wasmtime::Result<Vec<_>>>()?;
        let shape = check!(checks::concatenate(&shapes, axis));
        let dtype = arrays.iter().map(|h| self.dtype_of(h)).collect::<wasmtime::Result<Vec<_>>>()?.into_iter().fold(DType::U8, wider);
        check!(self.charge_shape("concatenate", &shape, dtype)?);
        let refs = arrays.iter().map(|h| self.array(h)).collect::<wasmtime::Result<Vec<_>>>()?;
        let result = self.tensors.backend.concatenate(&refs, axis);
        self.adopt(result)
    }

    fn take(&mut self, a: Handle, indices: Handle, axis: i32) -> Outcome<Handle> {
        let a_shape = self.shape_of(&a)?;
        let (shape, at) = check!(checks::take(a_shape, self.shape_of(&indices)?, self.dtype_of(&indices)?, axis));
        check!(self.charge_shape("take", &shape, self.dtype_of(&a)?)?);
        // MLX's CPU gather reads whatever an index points at: every index must lie inside the axis.
        let rows = a_shape[at] as i64;
        let range = match self.entry(&indices)?.known_range {
            Some(known) => Some(known),
            None => check!(self.tensors.backend.int_range(self.array(&indices)?)),
        };
        match range {
            Some((low, high)) if low < 0 || high >= rows => {
                return Ok(Err(format!("take: index {} is outside axis {axis} of size {rows}", if low < 0 { low } else { high })));
            }
            _ => {}
        }
        let result = self.tensors.backend.take(self.array(&a)?, self.array(&indices)?, axis);
        self.adopt(result)
    }

    fn softmax(&mut self, a: Handle, axis: i32) -> Outcome<Handle> {
        check!(checks::axis("softmax", axis, self.shape_of(&a)?.len()));
        self.unary("softmax", a, |be, a| be.softmax(a, axis))
    }

    fn rms_norm(&mut self, x: Handle, weight: Handle, eps: f32) -> Outcome<Handle> {
        check!(checks::rms_norm(self.shape_of(&x)?, self.shape_of(&weight)?));
        check!(self.charge_shape("rms-norm", self.shape_of(&x)?, wider(self.dtype_of(&x)?, self.dtype_of(&weight)?))?);
        let result = self.tensors.backend.rms_norm(self.array(&x)?, self.array(&weight)?, eps);
        self.adopt(result)
    }

    fn rope(&mut self, x: Handle, p: wit::RopeParams) -> Outcome<Handle> {
        check!(checks::rope(self.shape_of(&x)?, p.dims));
        let offset = check!(i32::try_from(p.offset).map_err(|_| format!("rope: offset {} is too large", p.offset)));
        let params = Rope { dims: p.dims as i32, traditional: p.traditional, base: p.base, scale: p.scale, offset };
        self.unary("rope", x, |be, x| be.rope(x, params))
    }

    fn attention(&mut self, q: Handle, k: Handle, v: Handle, scale: f32, mask: wit::Mask) -> Outcome<Handle> {
        let (qs, ks) = (self.shape_of(&q)?, self.shape_of(&k)?);
        let explicit = match &mask {
            wit::Mask::Explicit(m) => Some(self.shape_of(m)?),
            _ => None,
        };
        let (out, scores) = check!(checks::attention(qs, ks, self.shape_of(&v)?, explicit));
        // The scores (and, for a sliding window, the mask the shell builds) exist while the op runs.
        self.charge("attention scores", scores.saturating_mul(2))?;
        check!(self.charge_shape("attention", &out, self.dtype_of(&q)?)?);
        let mask = match &mask {
            wit::Mask::None => Mask::None,
            wit::Mask::Causal => Mask::Causal,
            wit::Mask::SlidingWindow(w) => {
                let int = |v: u32| i32::try_from(v).map_err(|_| format!("attention: sliding-window value {v} is too large"));
                Mask::SlidingWindow { window: check!(int(w.window)), query_offset: check!(int(w.query_offset)), key_offset: check!(int(w.key_offset)) }
            }
            wit::Mask::Explicit(m) => Mask::Explicit(self.array(m)?),
        };
        let result = self.tensors.backend.attention(self.array(&q)?, self.array(&k)?, self.array(&v)?, scale, mask);
        self.adopt(result)
    }

    fn conv1d_depthwise(&mut self, x: Handle, weight: Handle) -> Outcome<Handle> {
        let out = check!(checks::conv1d_depthwise(self.shape_of(&x)?, self.shape_of(&weight)?));
        check!(self.charge_shape("conv1d-depthwise", &out, wider(self.dtype_of(&x)?, self.dtype_of(&weight)?))?);
        let result = self.tensors.backend.conv1d_depthwise(self.array(&x)?, self.array(&weight)?);
        self.adopt(result)
    }

    fn record_batch(&mut self, inputs: Vec<Handle>, ops: Vec<wit::Op>, keep: Vec<u32>) -> Outcome<Vec<Handle>> {
        batch::record(self, inputs, &ops, &keep, 0, None)
    }

    fn eval(&mut self, arrays: Vec<Handle>) -> Outcome<()> {
        self.check_deadline()?;
        let refs = arrays.iter().map(|h| self.array(h)).collect::<wasmtime::Result<Vec<_>>>()?;
        Ok(self.tensors.backend.eval(&refs))
    }

    fn read_f32(&mut self, a: Handle) -> Outcome<Vec<f32>> {
        self.check_deadline()?;
        let elements = check!(checks::elements(self.shape_of(&a)?));
        if elements > MAX_READ_ELEMENTS as u64 {
            return Ok(Err(format!("read-f32 of {elements} elements refused (limit {MAX_READ_ELEMENTS})")));
        }
        Ok(self.tensors.backend.read_f32(self.array(&a)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Contract 0.2.0 names the block format of stored blocks; 0.1.0 (host::v0_1_0) calls them float32.
    #[test]
    fn block_quantized_arrays_report_their_format() {
        let mut map = memmap2::MmapMut::map_anon(34 * 2).unwrap(); // two Q8_0 blocks: a [2, 32] matrix
        map[0] = 0x3c; // an f16 scale of 1.0 in each block (the quants stay 0)
        map[34] = 0x3c;
        let map = Arc::new(map.make_read_only().unwrap());
        let backend = ActiveBackend::of(BackendKind::Cpu);
        let array = backend.from_blocks(8, &map, 0..68, &[2, 32]).unwrap().expect("the cpu backend keeps blocks");
        let handle = TensorHandle { blocks: backend.blocks(&array), dtype: backend.dtype(&array), bytes: 0, known_range: None, array };
        assert_eq!(handle.contract_dtype(), wit::Dtype::Q80);
        assert_eq!(handle.dtype, DType::F32);
        assert_eq!(backend.read_f32(&handle.array).unwrap(), vec![0.0; 64]);
        assert!(ActiveBackend::of(BackendKind::Mlx).from_blocks(8, &map, 0..68, &[2, 32]).unwrap().is_none());
    }
}
