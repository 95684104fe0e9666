//! The CPU backend: ggml, llama.cpp's tensor library (the same kernels and thread pool as the llama.cpp
//! users compare us with). Every ggml call in the shell lives in this file and [`lower`].
//!
//! The contract's arrays are lazy and individually owned; a ggml context is an arena that is built,
//! computed and thrown away. So an [`Array`] is a node of our own graph — data, or an op over other
//! arrays — and `eval` lowers the pending part of the graph into a fresh ggml graph, computes it on one
//! process-wide thread pool, and turns every node that is still referenced from outside into data (as MLX
//! detaches evaluated arrays). Weights and other data are never copied into ggml: its tensors point at
//! our buffers. ggml aborts the process on a type or shape it does not support, so each op's inputs are
//! brought to the types and layouts its kernel takes (f32 activations, contiguous rows) by [`lower`],
//! never by the adapter.

mod affine;
mod buffer;
pub mod kernels;
mod lower;
mod packed;

use buffer::{release_heap_holes, Buffer};

use super::{checks, Backend, DType, Mask, OpResult, Rope};
use memmap2::Mmap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// A node of the lazy graph. Shape and dtype are fixed when it is recorded.
#[derive(Clone)]
pub struct Array(Arc<Node>);

pub struct Node {
    /// Unique for the life of the process (an address is not: a later node may reuse it).
    id: u64,
    shape: Vec<i32>,
    /// What the contract sees. Block-quantized data reports f32: it computes as the values it encodes.
    dtype: DType,
    /// The ggml block type of data kept as stored (GGUF Q8_0, Q4_K, ...).
    blocks: Option<u32>,
    state: Mutex<State>,
    /// A float form of an MLX-quantized weight, made on its first use in a product.
    dequantized: OnceLock<Array>,
}

enum State {
    Ready(Arc<Buffer>),
    Pending(Op, Vec<Array>),
}

/// How a pending node is computed from its inputs.
#[derive(Clone, Debug)]
enum Op {
    MatMul,
    Add,
    Subtract,
    Multiply,
    Divide,
    Scale(f32),
    AddScalar(f32),
    Tanh,
    Sigmoid,
    Silu,
    GeluTanh,
    Cast,
    Reshape,
    /// numpy axes.
    Transpose(Vec<i32>),
    /// Normalized (start, length) per axis.
    Slice(Vec<(i64, i64)>),
    SliceUpdate(Vec<(i64, i64)>),
    Concat(usize),
    TakeRows,
    Softmax(usize),
    RmsNorm(f32),
    Rope(Rope),
    /// Inputs q, k, v (and the mask, when it is an array).
    Attention { scale: f32, mask: AttentionMask },
    Conv1dDepthwise,
    /// Block-quantized data as f32 (for a read-back or a cast).
    Dequantize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum AttentionMask {
    None,
    Causal,
    SlidingWindow { window: i64, query_offset: i64, key_offset: i64 },
    Explicit,
}

impl AttentionMask {
    /// The kind of `mask` (an explicit mask's array becomes an input of the attention).
    fn of(mask: &Mask<'_, Array>) -> AttentionMask {
        match *mask {
            Mask::None => AttentionMask::None,
            Mask::Causal => AttentionMask::Causal,
            Mask::SlidingWindow { window, query_offset, key_offset } => {
                AttentionMask::SlidingWindow { window: window as i64, query_offset: query_offset as i64, key_offset: key_offset as i64 }
            }
            Mask::Explicit(_) => AttentionMask::Explicit,
        }
    }
}

impl Node {
    fn new(shape: Vec<i32>, dtype: DType, blocks: Option<u32>, state: State) -> Node {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Node { id, shape, dtype, blocks, state: Mutex::new(state), dequantized: OnceLock::new() }
    }
}

impl Array {
    fn ready(shape: Vec<i32>, dtype: DType, buffer: Buffer) -> Array {
        Array::ready_shared(shape, dtype, Arc::new(buffer))
    }

    fn ready_shared(shape: Vec<i32>, dtype: DType, buffer: Arc<Buffer>) -> Array {
        Array(Arc::new(Node::new(shape, dtype, None, State::Ready(buffer))))
    }

    fn pending(shape: Vec<i32>, dtype: DType, op: Op, inputs: Vec<Array>) -> Array {
        Array(Arc::new(Node::new(shape, dtype, None, State::Pending(op, inputs))))
    }

    /// The node's process-unique id.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    pub fn shape(&self) -> &[i32] {
        &self.0.shape
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The data, if this array has been computed.
    fn buffer(&self) -> Option<Arc<Buffer>> {
        match &*self.state() {
            State::Ready(b) => Some(b.clone()),
            State::Pending(..) => None,
        }
    }

    fn elements(&self) -> usize {
        self.0.shape.iter().map(|&d| d as usize).product()
    }
}

/// Long chains of nodes (an adapter may record millions) are released without recursion.
impl Drop for Node {
    fn drop(&mut self) {
        let mut stack = match self.state.get_mut() {
            Ok(State::Pending(_, inputs)) => std::mem::take(inputs),
            _ => return,
        };
        while let Some(Array(node)) = stack.pop() {
            if let Some(mut node) = Arc::into_inner(node) {
                if let Ok(State::Pending(_, inputs)) = node.state.get_mut() {
                    // Moved out: the node drops here with nothing left to release.
                    stack.append(inputs);
                }
            }
        }
    }
}

pub(super) use lower::step;

/// How many evaluations so far computed a kept ggml graph again instead of lowering a new one (see
/// `lower/reuse.rs`): process-wide, as the compute resources are.
pub fn reused_graphs() -> u64 {
    lower::reused_graphs()
}

/// How many template runs so far were computed by the kept graph without being recorded (see
/// `host/tensor/replay.rs`).
pub fn unrecorded_steps() -> u64 {
    step::steps_run()
}

/// `elements` values of ggml type `ggml_type` (GGUF's numbering) as f32, by ggml's reference
/// dequantizer. `bytes` must hold exactly those elements in whole blocks (the GGUF reader checks).
pub fn to_f32(ggml_type: u32, bytes: &[u8], elements: usize) -> Vec<f32> {
    lower::to_f32(ggml_type, bytes, elements)
}

fn values_fill(len: usize, shape: &[i32]) -> OpResult<()> {
    let n = checks::elements(shape)?;
    if n != len as u64 {
        return Err(format!("{len} values do not fill shape {shape:?}"));
    }
    Ok(())
}

/// The CPU backend. Arrays are shared freely; computing goes through one process-wide [`lower::Runner`].
#[derive(Default)]
pub struct CpuBackend;

/// numpy-style normalized ranges: negative bounds count from the end, then clamp to the axis.
fn ranges(shape: &[i32], start: &[i32], stop: &[i32]) -> OpResult<Vec<(i64, i64)>> {
    if start.len() != stop.len() || start.len() > shape.len() {
        return Err(format!("slice: start {start:?} and stop {stop:?} do not fit shape {shape:?}"));
    }
    Ok(shape
        .iter()
        .enumerate()
        .map(|(axis, &dim)| {
            let dim = dim as i64;
            let norm = |v: i32| if v < 0 { (v as i64 + dim).max(0) } else { (v as i64).min(dim) };
            match (start.get(axis), stop.get(axis)) {
                (Some(&a), Some(&b)) => (norm(a), (norm(b) - norm(a)).max(0)),
                _ => (0, dim),
            }
        })
        .collect())
}

fn float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16)
}

/// Converts computed data between element types, in Rust (for the integer types ggml cannot cast).
fn convert(bytes: &[u8], from: DType, to: DType) -> Buffer {
    let values = to_f64(bytes, from);
    let mut out = Buffer::zeroed(values.len() * to.size());
    for (chunk, v) in out.bytes_mut().chunks_exact_mut(to.size()).zip(values) {
        match to {
            DType::F32 => chunk.copy_from_slice(&(v as f32).to_le_bytes()),
            DType::F16 => chunk.copy_from_slice(&half::f16::from_f64(v).to_le_bytes()),
            DType::BF16 => chunk.copy_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            DType::I32 => chunk.copy_from_slice(&(v as i32).to_le_bytes()),
            DType::U32 => chunk.copy_from_slice(&(v as u32).to_le_bytes()),
            DType::U8 => chunk[0] = v as u8,
        }
    }
    out
}

fn to_f64(bytes: &[u8], dtype: DType) -> Vec<f64> {
    let u16s = || bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    let u32s = || bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    match dtype {
        DType::F32 => u32s().map(|v| f32::from_bits(v) as f64).collect(),
        DType::F16 => u16s().map(|v| half::f16::from_bits(v).to_f64()).collect(),
        DType::BF16 => u16s().map(|v| half::bf16::from_bits(v).to_f64()).collect(),
        DType::I32 => u32s().map(|v| v as i32 as f64).collect(),
        DType::U32 => u32s().map(|v| v as f64).collect(),
        DType::U8 => bytes.iter().map(|&v| v as f64).collect(),
    }
}

impl CpuBackend {
    /// Computes `a` if needed and returns its data as elements of `a.dtype` (blocks dequantized).
    fn computed(&self, a: &Array) -> OpResult<Arc<Buffer>> {
        if a.0.blocks.is_some() {
            return self.computed(&Array::pending(a.0.shape.clone(), DType::F32, Op::Dequantize, vec![a.clone()]));
        }
        if let Some(b) = a.buffer() {
            return Ok(b);
        }
        lower::evaluate(&[a])?;
        a.buffer().ok_or_else(|| "the CPU backend did not compute an array it was asked for".to_owned())
    }

    fn elementwise(&self, op: Op, a: &Array, b: &Array) -> OpResult<Array> {
        let shape = checks::broadcast("elementwise op", &a.0.shape, &b.0.shape)?;
        if !float(a.0.dtype) && !float(b.0.dtype) && !matches!(op, Op::Divide) {
            return self.integer_elementwise(&op, a, b, shape);
        }
        Ok(Array::pending(shape, DType::F32, op, vec![a.clone(), b.clone()]))
    }

    /// Integer arithmetic (index computations) stays integer, as on MLX: computed now, in Rust, since
    /// ggml's arithmetic is float.
    fn integer_elementwise(&self, op: &Op, a: &Array, b: &Array, shape: Vec<i32>) -> OpResult<Array> {
        let (x, y) = (to_f64(self.computed(a)?.bytes(), a.0.dtype), to_f64(self.computed(b)?.bytes(), b.0.dtype));
        let n = checks::elements(&shape)? as usize;
        // The flat index into an operand broadcast to `shape`.
        let source = |from: &[i32], i: usize| {
            let (mut rest, mut at, mut stride) = (i, 0usize, 1usize);
            for (axis, &dim) in shape.iter().enumerate().rev() {
                let coordinate = rest % dim as usize;
                rest /= dim as usize;
                let offset = axis as isize - (shape.len() - from.len()) as isize;
                if offset >= 0 {
                    let d = from[offset as usize] as usize;
                    at += if d == 1 { 0 } else { coordinate * stride };
                    stride *= d;
                }
            }
            at
        };
        let values: Vec<i32> = (0..n)
            .map(|i| {
                let (p, q) = (x[source(&a.0.shape, i)] as i64, y[source(&b.0.shape, i)] as i64);
                let v = match op {
                    Op::Add => p.wrapping_add(q),
                    Op::Subtract => p.wrapping_sub(q),
                    _ => p.wrapping_mul(q),
                };
                v as i32
            })
            .collect();
        self.from_i32(&values, &shape)
    }

    fn unary(&self, op: Op, a: &Array) -> OpResult<Array> {
        Ok(Array::pending(a.0.shape.clone(), DType::F32, op, vec![a.clone()]))
    }
}

impl Backend for CpuBackend {
    type Array = Array;

    fn name(&self) -> String {
        let (kernels, amx) = kernels::kernels().map_or(("no", ""), |k| (k.variant.as_str(), if k.amx.is_some() { " with AMX repacking" } else { "" }));
        format!("ggml (CPU, {kernels} kernels{amx}, {} threads)", lower::threads())
    }

    fn from_f32(&self, data: &[f32], shape: &[i32]) -> OpResult<Array> {
        values_fill(data.len(), shape)?;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(Array::ready(shape.to_vec(), DType::F32, Buffer::from_bytes(&bytes)))
    }

    fn from_i32(&self, data: &[i32], shape: &[i32]) -> OpResult<Array> {
        values_fill(data.len(), shape)?;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(Array::ready(shape.to_vec(), DType::I32, Buffer::from_bytes(&bytes)))
    }

    fn from_bytes(&self, dtype: DType, bytes: &[u8], shape: &[i32]) -> OpResult<Array> {
        if bytes.len() % dtype.size() != 0 {
            return Err(format!("{} bytes are not a whole number of {dtype:?} elements", bytes.len()));
        }
        values_fill(bytes.len() / dtype.size(), shape)?;
        Ok(Array::ready(shape.to_vec(), dtype, Buffer::from_bytes(bytes)))
    }

    fn from_blocks(&self, ggml_type: u32, map: &Arc<Mmap>, range: Range<usize>, shape: &[i32]) -> OpResult<Option<Array>> {
        let bytes = map.get(range.clone()).ok_or("block data lies outside the file")?;
        let row = *shape.last().ok_or("a block-quantized scalar")? as i64;
        let rows = checks::elements(shape)? as i64 / row.max(1);
        // SAFETY: pure functions of the type id, which is checked to be a type ggml knows first.
        let (block, row_bytes) = unsafe {
            if ggml_type >= lower::TYPE_COUNT || lower::block_size(ggml_type) <= 1 {
                return Err(format!("ggml type {ggml_type} is not a block format"));
            }
            (lower::block_size(ggml_type), lower::row_size(ggml_type, row))
        };
        if row % block != 0 || row_bytes as i64 * rows != bytes.len() as i64 {
            return Err(format!("{} bytes are not whole blocks of type {ggml_type} for shape {shape:?}", bytes.len()));
        }
        if shape.len() > 4 {
            return Err(format!("block-quantized arrays hold at most 4 dimensions, not {shape:?}"));
        }
        let node = Node::new(shape.to_vec(), DType::F32, Some(ggml_type), State::Ready(Arc::new(Buffer::mapped(map.clone(), range.start, bytes.len()))));
        Ok(Some(Array(Arc::new(node))))
    }

    fn shape<'a>(&self, a: &'a Array) -> &'a [i32] {
        &a.0.shape
    }

    fn blocks(&self, a: &Array) -> Option<u32> {
        a.0.blocks
    }

    fn dtype(&self, a: &Array) -> DType {
        a.0.dtype
    }

    fn matmul(&self, a: &Array, b: &Array) -> OpResult<Array> {
        let shape = checks::matmul(&a.0.shape, &b.0.shape)?;
        if a.0.shape.last() == Some(&0) {
            // A product over nothing: zeros (ggml's kernels assume a non-empty inner dimension).
            let n = checks::elements(&shape)? as usize;
            return Ok(Array::ready(shape, DType::F32, Buffer::zeroed(n * 4)));
        }
        Ok(Array::pending(shape, DType::F32, Op::MatMul, vec![a.clone(), b.clone()]))
    }

    fn quantized_matmul(&self, x: &Array, w: &Array, scales: &Array, biases: &Array, transpose: bool, group_size: i32, bits: i32) -> OpResult<Array> {
        let dense = match w.0.dequantized.get() {
            Some(d) => d.clone(),
            None => {
                let d = self.dequantize_now(w, scales, biases, group_size, bits)?;
                w.0.dequantized.get_or_init(|| d).clone()
            }
        };
        let dense = if transpose { self.transpose(&dense, &[1, 0])? } else { dense };
        self.matmul(x, &dense)
    }

    fn dequantize(&self, w: &Array, scales: &Array, biases: &Array, group_size: i32, bits: i32) -> OpResult<Array> {
        self.dequantize_now(w, scales, biases, group_size, bits)
    }

    fn affine_as_blocks(&self, w: &Array, scales: &Array, biases: &Array, group_size: i32, bits: i32) -> OpResult<Option<Array>> {
        self.affine_as_q4_1(w, scales, biases, group_size, bits)
    }

    /// MLX affine quantization (min/max per group), in Rust, so `--dtype q4/q8` means the same on both backends.
    fn quantize(&self, w: &Array, group_size: i32, bits: i32) -> OpResult<(Array, Array, Array)> {
        self.quantize_affine(w, group_size, bits)
    }

    fn add(&self, a: &Array, b: &Array) -> OpResult<Array> {
        self.elementwise(Op::Add, a, b)
    }

    fn subtract(&self, a: &Array, b: &Array) -> OpResult<Array> {
        self.elementwise(Op::Subtract, a, b)
    }

    fn multiply(&self, a: &Array, b: &Array) -> OpResult<Array> {
        self.elementwise(Op::Multiply, a, b)
    }

    fn divide(&self, a: &Array, b: &Array) -> OpResult<Array> {
        self.elementwise(Op::Divide, a, b)
    }

    fn scale(&self, a: &Array, factor: f32) -> OpResult<Array> {
        self.unary(Op::Scale(factor), a)
    }

    fn add_scalar(&self, a: &Array, value: f32) -> OpResult<Array> {
        self.unary(Op::AddScalar(value), a)
    }

    fn tanh(&self, a: &Array) -> OpResult<Array> {
        self.unary(Op::Tanh, a)
    }

    fn sigmoid(&self, a: &Array) -> OpResult<Array> {
        self.unary(Op::Sigmoid, a)
    }

    fn silu(&self, a: &Array) -> OpResult<Array> {
        self.unary(Op::Silu, a)
    }

    fn gelu_tanh(&self, a: &Array) -> OpResult<Array> {
        self.unary(Op::GeluTanh, a)
    }

    /// Float-to-float casts run in ggml; anything involving the integer types is converted in Rust.
    fn astype(&self, a: &Array, dtype: DType) -> OpResult<Array> {
        if a.0.dtype == dtype {
            return Ok(a.clone());
        }
        if float(a.0.dtype) && float(dtype) {
            return Ok(Array::pending(a.0.shape.clone(), dtype, Op::Cast, vec![a.clone()]));
        }
        let data = self.computed(a)?;
        Ok(Array::ready(a.0.shape.clone(), dtype, convert(data.bytes(), a.0.dtype, dtype)))
    }

    fn reshape(&self, a: &Array, shape: &[i32]) -> OpResult<Array> {
        let shape = checks::reshape(&a.0.shape, shape)?;
        Ok(Array::pending(shape, a.0.dtype, Op::Reshape, vec![a.clone()]))
    }

    fn transpose(&self, a: &Array, axes: &[i32]) -> OpResult<Array> {
        let unsigned: Vec<u32> = axes.iter().map(|&x| x as u32).collect();
        let shape = checks::transpose(&a.0.shape, &unsigned)?;
        Ok(Array::pending(shape, a.0.dtype, Op::Transpose(axes.to_vec()), vec![a.clone()]))
    }

    fn slice(&self, a: &Array, start: &[i32], stop: &[i32]) -> OpResult<Array> {
        let ranges = ranges(&a.0.shape, start, stop)?;
        let shape = ranges.iter().map(|&(_, len)| len as i32).collect();
        Ok(Array::pending(shape, a.0.dtype, Op::Slice(ranges), vec![a.clone()]))
    }

    fn slice_update(&self, a: &Array, update: &Array, start: &[i32], stop: &[i32]) -> OpResult<Array> {
        let ranges = ranges(&a.0.shape, start, stop)?;
        let region: Vec<i32> = ranges.iter().map(|&(_, len)| len as i32).collect();
        if checks::broadcast("slice-update", &update.0.shape, &region)? != region {
            return Err(format!("slice-update: update {:?} does not fit the region {region:?}", update.0.shape));
        }
        Ok(Array::pending(a.0.shape.clone(), DType::F32, Op::SliceUpdate(ranges), vec![a.clone(), update.clone()]))
    }

    fn concatenate(&self, arrays: &[&Array], axis: i32) -> OpResult<Array> {
        let shapes: Vec<Vec<i32>> = arrays.iter().map(|a| a.0.shape.clone()).collect();
        let shape = checks::concatenate(&shapes, axis)?;
        let at = checks::axis("concatenate", axis, shape.len())?;
        // Parts of one float type stay in it (an f16 cache grows as f16); anything else joins as f32.
        let first = arrays[0].0.dtype;
        let kept = float(first) && arrays.iter().all(|a| a.0.dtype == first && a.0.blocks.is_none());
        let dtype = if kept { first } else { DType::F32 };
        Ok(Array::pending(shape, dtype, Op::Concat(at), arrays.iter().map(|&a| a.clone()).collect()))
    }

    fn take(&self, a: &Array, indices: &Array, axis: i32) -> OpResult<Array> {
        let (shape, at) = checks::take(&a.0.shape, &indices.0.shape, indices.0.dtype, axis)?;
        if at != 0 {
            return Err(format!("take: the cpu backend gathers along axis 0 only (asked for axis {axis})"));
        }
        let dtype = if float(a.0.dtype) { DType::F32 } else { a.0.dtype };
        // 32-bit integers are gathered as bits (MLX-packed quantized weights are uint32).
        if !matches!(dtype, DType::F32 | DType::I32 | DType::U32) {
            return Err(format!("take: the cpu backend gathers float or 32-bit integer rows, not {:?}", a.0.dtype));
        }
        Ok(Array::pending(shape, dtype, Op::TakeRows, vec![a.clone(), indices.clone()]))
    }

    fn softmax(&self, a: &Array, axis: i32) -> OpResult<Array> {
        let at = checks::axis("softmax", axis, a.0.shape.len())?;
        self.unary(Op::Softmax(at), a)
    }

    fn rms_norm(&self, x: &Array, weight: &Array, eps: f32) -> OpResult<Array> {
        checks::rms_norm(&x.0.shape, &weight.0.shape)?;
        Ok(Array::pending(x.0.shape.clone(), DType::F32, Op::RmsNorm(eps), vec![x.clone(), weight.clone()]))
    }

    fn rope(&self, x: &Array, params: Rope) -> OpResult<Array> {
        checks::rope(&x.0.shape, params.dims as u32)?;
        self.unary(Op::Rope(params), x)
    }

    fn attention(&self, q: &Array, k: &Array, v: &Array, scale: f32, mask: Mask<'_, Array>) -> OpResult<Array> {
        let explicit = match &mask {
            Mask::Explicit(m) => Some(m.0.shape.clone()),
            _ => None,
        };
        let (shape, _) = checks::attention(&q.0.shape, &k.0.shape, &v.0.shape, explicit.as_deref())?;
        if k.0.shape[2] == 0 {
            return Err("attention: there are no keys to attend to".into());
        }
        let mut inputs = vec![q.clone(), k.clone(), v.clone()];
        if let Mask::Explicit(m) = &mask {
            if !float(m.0.dtype) {
                return Err("attention: the cpu backend takes additive (float) masks, not boolean ones".into());
            }
            inputs.push((*m).clone());
        }
        Ok(Array::pending(shape, DType::F32, Op::Attention { scale, mask: AttentionMask::of(&mask) }, inputs))
    }

    fn conv1d_depthwise(&self, x: &Array, weight: &Array) -> OpResult<Array> {
        let shape = checks::conv1d_depthwise(&x.0.shape, &weight.0.shape)?;
        Ok(Array::pending(shape, DType::F32, Op::Conv1dDepthwise, vec![x.clone(), weight.clone()]))
    }

    fn eval(&self, arrays: &[&Array]) -> OpResult<()> {
        lower::evaluate(arrays)
    }

    fn discard(&self, a: Array) -> OpResult<()> {
        lower::discard(a)
    }

    fn read_f32(&self, a: &Array) -> OpResult<Vec<f32>> {
        let data = self.computed(a)?;
        Ok(match a.0.dtype {
            // The logits of every decode step (1 MB for Gemma 3): one copy, without a detour through f64.
            DType::F32 => lower::f32_values(data.bytes()),
            other => to_f64(data.bytes(), other).into_iter().map(|v| v as f32).collect(),
        })
    }

    fn with_f32<R>(&self, a: &Array, f: impl FnOnce(&[f32]) -> R) -> OpResult<R> {
        if a.0.dtype == DType::F32 && cfg!(target_endian = "little") {
            let data = self.computed(a)?;
            // SAFETY: every bit pattern is an f32; the slice borrows bytes the buffer holds while `f` runs.
            let (head, values, tail) = unsafe { data.bytes().align_to::<f32>() };
            if head.is_empty() && tail.is_empty() {
                return Ok(f(values));
            }
        }
        Ok(f(&self.read_f32(a)?))
    }

    fn int_range(&self, a: &Array) -> OpResult<Option<(i64, i64)>> {
        let values = to_f64(self.computed(a)?.bytes(), a.0.dtype);
        let low = values.iter().copied().reduce(f64::min);
        let high = values.iter().copied().reduce(f64::max);
        Ok(low.zip(high).map(|(l, h)| (l as i64, h as i64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml counts a view whose innermost axis has one element as contiguous whatever that axis's stride,
    /// and its elementwise kernels assert a packed innermost axis (aborting the process): a transposed
    /// row is such a view.
    #[test]
    fn views_with_one_element_rows_are_computed_as_their_values() {
        let cpu = CpuBackend;
        let row = cpu.from_f32(&[1.0, 2.0, 3.0], &[1, 3]).unwrap();
        let column = cpu.transpose(&row, &[1, 0]).unwrap();
        let tens = cpu.from_f32(&[10.0, 20.0, 30.0], &[3, 1]).unwrap();
        assert_eq!(cpu.read_f32(&cpu.add(&column, &tens).unwrap()).unwrap(), [11.0, 22.0, 33.0]);
        assert_eq!(cpu.read_f32(&cpu.multiply(&tens, &column).unwrap()).unwrap(), [10.0, 40.0, 90.0]);
        assert_eq!(cpu.read_f32(&cpu.tanh(&column).unwrap()).unwrap(), [1f32.tanh(), 2f32.tanh(), 3f32.tanh()]);
    }

    /// A recursive drop of a million-node chain would overflow the test thread's 2 MiB stack.
    #[test]
    fn a_million_node_chain_is_released_without_recursion() {
        let mut chain = Array::ready(vec![1], DType::F32, Buffer::from_bytes(&1f32.to_le_bytes()));
        for _ in 0..1_000_000 {
            chain = Array::pending(vec![1], DType::F32, Op::Scale(2.0), vec![chain]);
        }
        let second = Array::pending(vec![1], DType::F32, Op::Add, vec![chain.clone(), chain]);
        drop(second);
    }

    /// The rotation of a single head is a permuted view whose size-1 axis has unpacked strides; ggml's
    /// scale aborted the process on it (`ggml_is_padded_1d`) until such inputs were copied first.
    #[test]
    fn scaling_a_rotated_single_head_computes() {
        let cpu = CpuBackend;
        let x = cpu.from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &[1, 1, 2, 4]).unwrap();
        let rotated = cpu.rope(&x, Rope { dims: 4, traditional: false, base: 10_000.0, scale: 1.0, offset: 0 }).unwrap();
        let twice = cpu.scale(&rotated, 2.0).unwrap();
        let plus = cpu.add_scalar(&rotated, 1.0).unwrap();
        // Each in a graph of its own with the rotation, read before the rotation is.
        let (twice, plus) = (cpu.read_f32(&twice).unwrap(), cpu.read_f32(&plus).unwrap());
        let rotated = cpu.read_f32(&rotated).unwrap();
        assert_eq!(&rotated[..4], &[1.0, 2.0, 3.0, 4.0], "position 0 is not rotated");
        assert_eq!(twice, rotated.iter().map(|v| v * 2.0).collect::<Vec<_>>());
        assert_eq!(plus, rotated.iter().map(|v| v + 1.0).collect::<Vec<_>>());
    }
}
