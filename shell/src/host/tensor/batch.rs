//! `record-batch`: many ops in one call. Each op goes through the host function of its single call, so
//! it is checked, charged and refused exactly as that call would be. Its result is held here rather than
//! in the store's table (a table entry is an allocation, and a decode step makes ~550 results of which
//! it keeps ~40), and counts against the caps like any handle. The results the adapter asked to keep
//! move into the table when the batch ends; the others are released then.

use super::active::AnyArray;
use super::replay::Seen;
use super::wit::{self, BatchMask, Host, Op};
use super::{Backend, Handle, TensorHandle, Tensors};
use crate::host::HostState;
use wasmtime::component::Resource;

type Outcome<T> = wasmtime::Result<Result<T, String>>;

/// Marks the reps of a running batch's results. Table reps are indices bounded by the handle cap, far
/// below it; these never leave the batch (a kept result gets a table handle).
const RESULT: u32 = 1 << 31;

/// Which result of the running batch a handle names, if it names one.
pub(super) fn index(h: &Handle) -> Option<usize> {
    (h.rep() & RESULT != 0).then(|| (h.rep() & !RESULT) as usize)
}

pub(super) fn entry(tensors: &Tensors, index: usize) -> wasmtime::Result<&TensorHandle> {
    match tensors.batch.as_ref().and_then(|results| results.get(index)) {
        Some(Some(handle)) => Ok(handle),
        _ => wasmtime::bail!("a batch result was used outside its batch"),
    }
}

/// Holds a new result; the handle that names it is good only until the batch ends.
pub(super) fn add(results: &mut Vec<Option<TensorHandle>>, handle: TensorHandle) -> Handle {
    results.push(Some(handle));
    Resource::new_borrow(RESULT | (results.len() - 1) as u32)
}

/// A value of the batch: one of the caller's arrays or an op's result, as a handle the host functions take.
struct Value(u32);

/// Records `ops` (with rotary and sliding-window query offsets moved `shift` positions on: see
/// [`template`](super::template)) and returns handles to the values in `keep`.
/// `seen`: filled with every value's shape, type and cpu node when the batch is recorded.
pub(super) fn record(state: &mut HostState, inputs: Vec<Handle>, ops: &[Op], keep: &[u32], shift: u32, seen: Option<&mut Vec<Seen>>) -> Outcome<Vec<Handle>> {
    let mut values = Vec::with_capacity(ops.len());
    state.tensors.batch = Some(Vec::with_capacity(ops.len()));
    let recorded = record_all(state, &inputs, ops, shift, &mut values);
    if let (Ok(Ok(())), Some(seen)) = (&recorded, seen) {
        for value in &values {
            let entry = state.entry(&Resource::new_borrow(value.0))?;
            let id = match &entry.array {
                AnyArray::Cpu(a) => a.id(),
                AnyArray::Mlx(_) => u64::MAX,
            };
            seen.push(Seen { shape: state.tensors.backend.shape(&entry.array).to_vec(), dtype: entry.dtype, id });
        }
    }
    let mut results = state.tensors.batch.take().unwrap_or_default();
    let mut kept = Vec::with_capacity(keep.len());
    let outcome = match recorded {
        Ok(Ok(())) => match check_keep(&values, keep) {
            Ok(()) => {
                for &v in keep {
                    let i = index(&Resource::new_borrow(values[v as usize].0)).expect("checked: a result");
                    kept.push(state.table.push(results[i].take().expect("checked: kept once"))?);
                }
                Ok(Ok(kept))
            }
            Err(e) => Ok(Err(e)),
        },
        Ok(Err(e)) => Ok(Err(e)),
        Err(trap) => Err(trap),
    };
    for released in results.into_iter().flatten() {
        state.tensors.live_handles -= 1;
        state.tensors.live_bytes -= released.bytes;
    }
    outcome
}

/// Each kept value is an op's result (not an input), named once.
fn check_keep(values: &[Value], keep: &[u32]) -> Result<(), String> {
    let mut seen = vec![false; values.len()];
    for &v in keep {
        match values.get(v as usize) {
            None => return Err(format!("record-batch: keep names value {v}, but the batch has {}", values.len())),
            Some(value) if value.0 & RESULT == 0 => return Err(format!("record-batch: keep names value {v}, an input (the adapter holds it already)")),
            Some(_) if seen[v as usize] => return Err(format!("record-batch: keep names value {v} twice")),
            Some(_) => seen[v as usize] = true,
        }
    }
    Ok(())
}

/// Records the ops in order into `values`; stops at the first refusal, naming the op by its index.
fn record_all(state: &mut HostState, inputs: &[Handle], ops: &[Op], shift: u32, values: &mut Vec<Value>) -> Outcome<()> {
    for (index, op) in ops.iter().enumerate() {
        let name = name(op);
        let made = match record_one(state, inputs, values, op, shift)? {
            Ok(made) => made,
            Err(e) => return Ok(Err(format!("record-batch: op {index} ({name}): {e}"))),
        };
        values.push(made);
    }
    Ok(Ok(()))
}

/// A handle to an earlier value (what the single-call functions take).
fn operand(values: &[Value], v: u32) -> Result<Handle, String> {
    match values.get(v as usize) {
        Some(value) => Ok(Resource::new_borrow(value.0)),
        None => Err(format!("value {v} is not the result of an earlier op")),
    }
}

/// `offset` moved `shift` positions on.
pub(super) fn later(offset: u32, shift: u32) -> Result<u32, String> {
    offset.checked_add(shift).ok_or_else(|| format!("position {offset} + {shift} overflows"))
}

fn record_one(state: &mut HostState, inputs: &[Handle], values: &[Value], op: &Op, shift: u32) -> Outcome<Value> {
    macro_rules! v {
        ($x:expr) => {
            match operand(values, $x) {
                Ok(h) => h,
                Err(e) => return Ok(Err(e)),
            }
        };
    }
    macro_rules! moved {
        ($offset:expr) => {
            match later($offset, shift) {
                Ok(offset) => offset,
                Err(e) => return Ok(Err(e)),
            }
        };
    }
    let made = match op {
        Op::Input(n) => {
            return Ok(match inputs.get(*n as usize) {
                Some(h) => Ok(Value(h.rep())),
                None => Err(format!("input {n} does not exist ({} given)", inputs.len())),
            });
        }
        Op::Matmul((a, b)) => state.matmul(v!(*a), v!(*b)),
        Op::QuantizedMatmul(q) => state.quantized_matmul(v!(q.x), v!(q.w), v!(q.scales), v!(q.biases), q.transpose, q.group_size, q.bits),
        Op::Dequantize(q) => state.dequantize(v!(q.w), v!(q.scales), v!(q.biases), q.group_size, q.bits),
        Op::Add((a, b)) => state.add(v!(*a), v!(*b)),
        Op::Subtract((a, b)) => state.subtract(v!(*a), v!(*b)),
        Op::Multiply((a, b)) => state.multiply(v!(*a), v!(*b)),
        Op::Divide((a, b)) => state.divide(v!(*a), v!(*b)),
        Op::Scale((a, factor)) => state.scale(v!(*a), *factor),
        Op::AddScalar((a, value)) => state.add_scalar(v!(*a), *value),
        Op::Tanh(a) => state.tanh(v!(*a)),
        Op::Sigmoid(a) => state.sigmoid(v!(*a)),
        Op::Silu(a) => state.silu(v!(*a)),
        Op::GeluTanh(a) => state.gelu_tanh(v!(*a)),
        Op::Astype((a, dtype)) => state.astype(v!(*a), *dtype),
        Op::Reshape((a, shape)) => state.reshape(v!(*a), shape.clone()),
        Op::Transpose((a, axes)) => state.transpose(v!(*a), axes.clone()),
        Op::Slice((a, start, stop)) => state.slice(v!(*a), start.clone(), stop.clone()),
        Op::SliceUpdate((a, update, start, stop)) => state.slice_update(v!(*a), v!(*update), start.clone(), stop.clone()),
        Op::Concatenate((parts, axis)) => {
            let mut handles = Vec::with_capacity(parts.len());
            for &p in parts {
                handles.push(v!(p));
            }
            state.concatenate(handles, *axis)
        }
        Op::Take((a, indices, axis)) => state.take(v!(*a), v!(*indices), *axis),
        Op::Softmax((a, axis)) => state.softmax(v!(*a), *axis),
        Op::RmsNorm((x, weight, eps)) => state.rms_norm(v!(*x), v!(*weight), *eps),
        Op::Rope((x, params)) => state.rope(v!(*x), wit::RopeParams { offset: moved!(params.offset), ..*params }),
        Op::Attention(a) => {
            let mask = match a.mask {
                BatchMask::None => wit::Mask::None,
                BatchMask::Causal => wit::Mask::Causal,
                BatchMask::SlidingWindow(w) => wit::Mask::SlidingWindow(wit::WindowMask { query_offset: moved!(w.query_offset), ..w }),
                BatchMask::Explicit(m) => wit::Mask::Explicit(v!(m)),
            };
            state.attention(v!(a.q), v!(a.k), v!(a.v), a.scale, mask)
        }
        Op::Conv1dDepthwise((x, weight)) => state.conv1d_depthwise(v!(*x), v!(*weight)),
    };
    Ok(made?.map(|h| Value(h.rep())))
}

/// The op's name as the contract spells it (for errors).
fn name(op: &Op) -> &'static str {
    match op {
        Op::Input(_) => "input",
        Op::Matmul(_) => "matmul",
        Op::QuantizedMatmul(_) => "quantized-matmul",
        Op::Dequantize(_) => "dequantize",
        Op::Add(_) => "add",
        Op::Subtract(_) => "subtract",
        Op::Multiply(_) => "multiply",
        Op::Divide(_) => "divide",
        Op::Scale(_) => "scale",
        Op::AddScalar(_) => "add-scalar",
        Op::Tanh(_) => "tanh",
        Op::Sigmoid(_) => "sigmoid",
        Op::Silu(_) => "silu",
        Op::GeluTanh(_) => "gelu-tanh",
        Op::Astype(_) => "astype",
        Op::Reshape(_) => "reshape",
        Op::Transpose(_) => "transpose",
        Op::Slice(_) => "slice",
        Op::SliceUpdate(_) => "slice-update",
        Op::Concatenate(_) => "concatenate",
        Op::Take(_) => "take",
        Op::Softmax(_) => "softmax",
        Op::RmsNorm(_) => "rms-norm",
        Op::Rope(_) => "rope",
        Op::Attention(_) => "attention",
        Op::Conv1dDepthwise(_) => "conv1d-depthwise",
    }
}
