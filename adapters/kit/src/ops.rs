//! Tensor ops for model code, sent to the host in batches.
//!
//! Each function here mirrors the `tensor` import's function of the same name, but records the op
//! locally and returns at once. The recorded ops cross to the host in one `record-batch` call when a
//! result is needed: read back, asked for its shape, or returned to the shell. The host keeps only the
//! results some [`Tensor`] still holds then; intermediate results never get a handle, so they cost no
//! call to make and none to drop. (A Gemma 3 decode step is ~550 ops: as single calls, crossing and
//! dropping them took longer than the host's own work.) A decode step's batch can become a template
//! the shell runs again for later steps ([`step`](crate::step)).
//!
//! A batch the host refuses fails at the call that sent it, with the host's message naming the op; the
//! results it would have made report that message when used again.

use crate::wit::edgechat::adapter::tensor::{self, Array, AttentionArgs, BatchMask, DequantizeArgs, Dtype, Op, QuantizedMatmulArgs, RopeParams, WindowMask};
use std::cell::{Cell, Ref, RefCell};
use std::rc::{Rc, Weak};

pub type R<T> = Result<T, String>;

/// An array of a model graph: one the host holds, or the result of an op not sent yet.
#[derive(Clone)]
pub struct Tensor(Rc<RefCell<State>>);

enum State {
    /// `input` is the value the array has in the batch being recorded, once an op there used it.
    Host { array: Array, input: Cell<Option<u32>> },
    /// The value this op's result has in the batch being recorded.
    Pending(u32),
    /// The batch that was to make it was refused.
    Failed(String),
    /// Its array was given up to a template run, which refills it (see [`Tensor::give_up`]).
    Given,
}

const GIVEN: &str = "a tensor given up to a template run was used";

/// Ops recorded and not yet sent. Values are numbered by the op that makes them, inputs included.
#[derive(Default)]
pub(crate) struct Batch {
    /// Host arrays the ops use, each once.
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) ops: Vec<Op>,
    /// Each value's tensor while model code holds it; what is still held when the batch is sent is kept.
    made: Vec<Weak<RefCell<State>>>,
}

thread_local! {
    static BATCH: RefCell<Batch> = RefCell::default();
    /// Batches sent so far (a decode step recorded in one batch can become a template).
    static SENT: Cell<u64> = const { Cell::new(0) };
}

impl Batch {
    /// The value `t` has in this batch (a host array becomes an input the first time an op uses it).
    fn value(&mut self, t: &Tensor) -> R<u32> {
        match &*t.0.borrow() {
            State::Pending(v) => Ok(*v),
            State::Failed(e) => Err(e.clone()),
            State::Given => Err(GIVEN.into()),
            State::Host { input, .. } => {
                if let Some(v) = input.get() {
                    return Ok(v);
                }
                let v = self.push(Op::Input(self.inputs.len() as u32), Weak::new());
                self.inputs.push(t.clone());
                input.set(Some(v));
                Ok(v)
            }
        }
    }

    fn push(&mut self, op: Op, made: Weak<RefCell<State>>) -> u32 {
        self.ops.push(op);
        self.made.push(made);
        self.ops.len() as u32 - 1
    }
}

/// Records the op `make` builds from the batch's values of its operands.
fn record(make: impl FnOnce(&mut Batch) -> R<Op>) -> R<Tensor> {
    BATCH.with(|batch| {
        let mut batch = batch.borrow_mut();
        let op = make(&mut batch)?;
        let tensor = Tensor(Rc::new(RefCell::new(State::Pending(batch.ops.len() as u32))));
        batch.push(op, Rc::downgrade(&tensor.0));
        Ok(tensor)
    })
}

/// Sends the recorded ops to the host, keeping the results still held.
pub fn flush() -> R<()> {
    send(take_batch())
}

/// The ops recorded and not yet sent, taken out to be looked at before [`send`].
pub(crate) fn take_batch() -> Batch {
    BATCH.with(|batch| std::mem::take(&mut *batch.borrow_mut()))
}

/// How many batches have been sent.
pub(crate) fn batches_sent() -> u64 {
    SENT.with(Cell::get)
}

impl Batch {
    /// The values whose tensors model code still holds, in order.
    pub(crate) fn held(&self) -> Vec<u32> {
        self.made.iter().enumerate().filter(|(_, t)| t.strong_count() > 0).map(|(v, _)| v as u32).collect()
    }
}

/// Sends `batch` to the host, keeping the results still held.
pub(crate) fn send(batch: Batch) -> R<()> {
    if batch.ops.is_empty() {
        return Ok(());
    }
    SENT.with(|sent| sent.set(sent.get() + 1));
    let held: Vec<(u32, Rc<RefCell<State>>)> = batch.made.iter().enumerate().filter_map(|(v, t)| Some((v as u32, t.upgrade()?))).collect();
    let keep: Vec<u32> = held.iter().map(|(v, _)| *v).collect();
    let sent = {
        let inputs: Vec<Ref<State>> = batch.inputs.iter().map(|t| t.0.borrow()).collect();
        let arrays: Vec<&Array> = inputs.iter().filter_map(|s| if let State::Host { array, .. } = &**s { Some(array) } else { None }).collect();
        tensor::record_batch(&arrays, &batch.ops, &keep)
    };
    for input in &batch.inputs {
        if let State::Host { input, .. } = &*input.0.borrow() {
            input.set(None);
        }
    }
    match sent {
        Ok(arrays) => {
            for ((_, state), array) in held.iter().zip(arrays) {
                *state.borrow_mut() = State::Host { array, input: Cell::new(None) };
            }
            Ok(())
        }
        Err(e) => {
            for (_, state) in &held {
                *state.borrow_mut() = State::Failed(e.clone());
            }
            Err(e)
        }
    }
}

/// Computed tensors whose arrays are lent out again and again without a RefCell borrow each time: a
/// decode template's ~240 weights, every token. (Borrowing each was ~0.8 % of a decode step under the
/// Pulley interpreter, a fifth of the boundary's share there; docs/benchmarks.md.)
pub(crate) struct Lent {
    tensors: Vec<Tensor>,
    arrays: Vec<*const Array>,
}

impl Lent {
    pub(crate) fn new(tensors: Vec<Tensor>) -> R<Lent> {
        let arrays = tensors.iter().map(|t| t.array().map(|a| &*a as *const Array)).collect::<R<_>>()?;
        Ok(Lent { tensors, arrays })
    }

    pub(crate) fn arrays(&self) -> Vec<&Array> {
        debug_assert_eq!(self.tensors.len(), self.arrays.len());
        // SAFETY: each pointer is to the array in the state of a tensor held in `self.tensors`, so the
        // state's allocation lives as long as `self`. A computed state is replaced only by `give_up`,
        // which refuses a tensor held more than once (and this is a second holder), and by `refill`,
        // which replaces only a given-up state; so each array stays where it was, unchanged, and nothing
        // writes to it while these shared references live.
        self.arrays.iter().map(|&a| unsafe { &*a }).collect()
    }
}

impl Tensor {
    pub fn from_array(array: Array) -> Tensor {
        Tensor(Rc::new(RefCell::new(State::Host { array, input: Cell::new(None) })))
    }

    pub fn from_f32(data: &[f32], shape: &[u32]) -> R<Tensor> {
        Ok(Tensor::from_array(Array::from_f32(data, shape)?))
    }

    pub fn from_i32(data: &[i32], shape: &[u32]) -> R<Tensor> {
        Ok(Tensor::from_array(Array::from_i32(data, shape)?))
    }

    /// Whether nothing else holds this tensor.
    pub fn sole(&self) -> bool {
        Rc::strong_count(&self.0) == 1
    }

    /// Whether both name the same tensor.
    pub fn same(&self, other: &Tensor) -> bool {
        Rc::ptr_eq(&self.0, &other.0)
    }

    /// The value this tensor has in the batch being recorded, if an op there made it.
    pub(crate) fn pending_value(&self) -> Option<u32> {
        match &*self.0.borrow() {
            State::Pending(v) => Some(*v),
            _ => None,
        }
    }

    /// The host's array (sending the batch first if this is a result not sent yet).
    pub(crate) fn array(&self) -> R<Ref<'_, Array>> {
        let pending = matches!(*self.0.borrow(), State::Pending(_));
        if pending {
            flush()?;
        }
        let state = self.0.borrow();
        match &*state {
            State::Host { .. } => Ok(Ref::map(state, |s| match s {
                State::Host { array, .. } => array,
                _ => unreachable!("checked above"),
            })),
            State::Failed(e) => Err(e.clone()),
            State::Given => Err(GIVEN.into()),
            State::Pending(_) => Err("a tensor was not made by the batch that recorded it".into()),
        }
    }

    pub fn shape(&self) -> R<Vec<u32>> {
        Ok(self.array()?.shape())
    }

    pub fn dtype(&self) -> R<Dtype> {
        Ok(self.array()?.dtype())
    }

    /// The host array itself, to hand to the shell (this must be its only holder).
    pub fn into_array(self) -> R<Array> {
        drop(self.array()?);
        match Rc::try_unwrap(self.0).map(RefCell::into_inner) {
            Ok(State::Host { array, .. }) => Ok(array),
            _ => Err("a tensor handed to the shell is still used by the model".to_owned()),
        }
    }

    /// The host array, given up (to a template run) until [`Tensor::refill`]: this must be its only
    /// holder. Unlike [`Tensor::into_array`] the tensor stays, to be refilled in place.
    pub(crate) fn give_up(&self) -> R<Array> {
        drop(self.array()?);
        if !self.sole() {
            return Err("a tensor given up is still used by the model".into());
        }
        match std::mem::replace(&mut *self.0.borrow_mut(), State::Given) {
            State::Host { array, .. } => Ok(array),
            _ => unreachable!("computed above"),
        }
    }

    /// Holds `array` (a template run's result) where a given-up array was.
    pub(crate) fn refill(&self, array: Array) -> R<()> {
        let mut state = self.0.borrow_mut();
        if !matches!(*state, State::Given) {
            return Err("only a tensor given up is refilled".into());
        }
        *state = State::Host { array, input: Cell::new(None) };
        Ok(())
    }
}

/// Computes the given tensors now.
pub fn eval(tensors: &[&Tensor]) -> R<()> {
    let arrays = tensors.iter().map(|t| t.array()).collect::<R<Vec<_>>>()?;
    tensor::eval(&arrays.iter().map(|a| &**a).collect::<Vec<_>>())
}

pub fn read_f32(t: &Tensor) -> R<Vec<f32>> {
    tensor::read_f32(&*t.array()?)
}

/// Which keys a query may attend to (see the contract's `mask`).
pub enum Mask<'a> {
    None,
    Causal,
    SlidingWindow(WindowMask),
    Explicit(&'a Tensor),
}

macro_rules! unary {
    ($($name:ident => $case:ident),* $(,)?) => {
        $(pub fn $name(a: &Tensor) -> R<Tensor> {
            record(|b| Ok(Op::$case(b.value(a)?)))
        })*
    };
}

macro_rules! binary {
    ($($name:ident => $case:ident),* $(,)?) => {
        $(pub fn $name(a: &Tensor, other: &Tensor) -> R<Tensor> {
            record(|b| Ok(Op::$case((b.value(a)?, b.value(other)?))))
        })*
    };
}

unary! { tanh => Tanh, sigmoid => Sigmoid, silu => Silu, gelu_tanh => GeluTanh }
binary! { matmul => Matmul, add => Add, subtract => Subtract, multiply => Multiply, divide => Divide, conv1d_depthwise => Conv1dDepthwise }

pub fn quantized_matmul(x: &Tensor, w: &Tensor, scales: &Tensor, biases: &Tensor, transpose: bool, group_size: u32, bits: u32) -> R<Tensor> {
    record(|b| {
        let (x, w, scales, biases) = (b.value(x)?, b.value(w)?, b.value(scales)?, b.value(biases)?);
        Ok(Op::QuantizedMatmul(QuantizedMatmulArgs { x, w, scales, biases, transpose, group_size, bits }))
    })
}

pub fn dequantize(w: &Tensor, scales: &Tensor, biases: &Tensor, group_size: u32, bits: u32) -> R<Tensor> {
    record(|b| Ok(Op::Dequantize(DequantizeArgs { w: b.value(w)?, scales: b.value(scales)?, biases: b.value(biases)?, group_size, bits })))
}

pub fn scale(a: &Tensor, factor: f32) -> R<Tensor> {
    record(|b| Ok(Op::Scale((b.value(a)?, factor))))
}

pub fn add_scalar(a: &Tensor, value: f32) -> R<Tensor> {
    record(|b| Ok(Op::AddScalar((b.value(a)?, value))))
}

pub fn astype(a: &Tensor, dtype: Dtype) -> R<Tensor> {
    record(|b| Ok(Op::Astype((b.value(a)?, dtype))))
}

pub fn reshape(a: &Tensor, shape: &[i32]) -> R<Tensor> {
    record(|b| Ok(Op::Reshape((b.value(a)?, shape.to_vec()))))
}

pub fn transpose(a: &Tensor, axes: &[u32]) -> R<Tensor> {
    record(|b| Ok(Op::Transpose((b.value(a)?, axes.to_vec()))))
}

pub fn slice(a: &Tensor, start: &[i32], stop: &[i32]) -> R<Tensor> {
    record(|b| Ok(Op::Slice((b.value(a)?, start.to_vec(), stop.to_vec()))))
}

pub fn slice_update(a: &Tensor, update: &Tensor, start: &[i32], stop: &[i32]) -> R<Tensor> {
    record(|b| Ok(Op::SliceUpdate((b.value(a)?, b.value(update)?, start.to_vec(), stop.to_vec()))))
}

pub fn concatenate(tensors: &[&Tensor], axis: i32) -> R<Tensor> {
    record(|b| Ok(Op::Concatenate((tensors.iter().map(|t| b.value(t)).collect::<R<_>>()?, axis))))
}

pub fn take(a: &Tensor, indices: &Tensor, axis: i32) -> R<Tensor> {
    record(|b| Ok(Op::Take((b.value(a)?, b.value(indices)?, axis))))
}

pub fn softmax(a: &Tensor, axis: i32) -> R<Tensor> {
    record(|b| Ok(Op::Softmax((b.value(a)?, axis))))
}

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> R<Tensor> {
    record(|b| Ok(Op::RmsNorm((b.value(x)?, b.value(weight)?, eps))))
}

pub fn rope(x: &Tensor, params: RopeParams) -> R<Tensor> {
    record(|b| Ok(Op::Rope((b.value(x)?, params))))
}

pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, mask: Mask<'_>) -> R<Tensor> {
    record(|b| {
        let mask = match mask {
            Mask::None => BatchMask::None,
            Mask::Causal => BatchMask::Causal,
            Mask::SlidingWindow(w) => BatchMask::SlidingWindow(w),
            Mask::Explicit(m) => BatchMask::Explicit(b.value(m)?),
        };
        Ok(Op::Attention(AttentionArgs { q: b.value(q)?, k: b.value(k)?, v: b.value(v)?, scale, mask }))
    })
}
