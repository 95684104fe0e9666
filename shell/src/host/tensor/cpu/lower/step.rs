//! A template's decode step computed by the kept graph without being recorded (see
//! `host/tensor/replay.rs`). The graph was lowered from one run of the template; a [`StepPlan`] says which
//! of the template's values each of its leaves, rope positions, masks, appends and outputs is, and a later
//! run binds the same places to that run's values: the checks of what differs between runs are the
//! caller's; every size the graph reads or writes through is checked here, before anything is written.

use super::{ggml_type, ne, ne_of, runner};
use crate::host::tensor::cpu::{Array, AttentionMask, Buffer, State};
use crate::host::tensor::{DType, Mask, OpResult};
use llama_cpp_sys_2 as g;
use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

/// Where the kept graph's places come from among a template's values (each an op's index).
pub struct StepPlan {
    serial: u64,
    /// Per leaf number: where the data bound there is (None: the old part of an append, bound through it).
    leaves: Vec<Option<Leaf>>,
    /// Per rope position binding: the rope.
    positions: Vec<usize>,
    /// Per mask binding: the attention.
    masks: Vec<usize>,
    /// Per append binding: the append and the value it appends to.
    appends: Vec<(usize, usize)>,
    /// Per output: the value.
    outputs: Vec<usize>,
}

/// Where a leaf's data is among a run's inputs.
#[derive(Clone)]
enum Leaf {
    /// The input itself.
    Input(usize),
    /// Data under a pending input, one the adapter lends every run (a weight under its transposed view),
    /// held here: the input with this id, still pending, still reads it.
    Under { value: usize, input: u64, data: Array },
}

impl Leaf {
    fn value(&self) -> usize {
        match self {
            Leaf::Input(v) | Leaf::Under { value: v, .. } => *v,
        }
    }

    /// The data this run binds.
    fn data(&self, values: &impl StepValues) -> Option<Array> {
        match self {
            Leaf::Input(v) => values.input(*v).cloned(),
            Leaf::Under { value, input, data } => {
                let lent = values.input(*value)?;
                (lent.id() == *input && lent.buffer().is_none()).then(|| data.clone())
            }
        }
    }
}

/// The computed arrays a pending array is made from (itself, when it is computed).
fn ready_under(a: &Array) -> Vec<Array> {
    let (mut stack, mut found) = (vec![a.clone()], Vec::new());
    while let Some(a) = stack.pop() {
        match &*a.state() {
            State::Ready(_) => found.push(a.clone()),
            State::Pending(_, inputs) => stack.extend(inputs.iter().cloned()),
        }
        if stack.len() + found.len() > 64 {
            return Vec::new(); // a view of a few steps is what is lent, not a graph
        }
    }
    found
}

impl StepPlan {
    /// The values bound in place of data (the caller checks each is one of its inputs).
    pub fn inputs(&self) -> impl Iterator<Item = usize> + '_ {
        self.leaves.iter().flatten().map(Leaf::value).chain(self.appends.iter().map(|&(_, old)| old))
    }

    pub fn ropes(&self) -> &[usize] {
        &self.positions
    }

    pub fn attentions(&self) -> &[usize] {
        &self.masks
    }

    pub fn appends(&self) -> impl Iterator<Item = usize> + '_ {
        self.appends.iter().map(|&(append, _)| append)
    }

    pub fn outputs(&self) -> &[usize] {
        &self.outputs
    }
}

/// What a run of the template is, value by value, as its caller has checked it.
pub trait StepValues {
    /// The data an input value holds this run.
    fn input(&self, value: usize) -> Option<&Array>;
    /// The values that are inputs.
    fn inputs(&self) -> &[usize];
    /// A value's shape this run.
    fn shape(&self, value: usize) -> &[i32];
    fn dtype(&self, value: usize) -> DType;
    /// A rope's offset this run.
    fn rope_offset(&self, value: usize) -> Option<i32>;
    /// An attention's mask this run, its queries and its keys.
    fn mask(&self, value: usize) -> Option<(Mask<'_, Array>, i64, i64)>;
}

/// The plan binding the kept graph to a template whose last run made the nodes `values` names (node id
/// to value), and whose inputs this run are `run`'s; None when the kept graph did not compute that run,
/// or read anything else.
pub fn plan(values: &HashMap<u64, usize>, run: &impl StepValues) -> Option<StepPlan> {
    let mut under: HashMap<u64, Leaf> = HashMap::default();
    for &value in run.inputs() {
        let Some(lent) = run.input(value).filter(|a| a.buffer().is_none()) else { continue };
        for data in ready_under(lent) {
            under.insert(data.id(), Leaf::Under { value, input: lent.id(), data });
        }
    }
    let runner = runner().ok()?.lock().unwrap_or_else(|e| e.into_inner());
    let kept = runner.kept.as_ref()?;
    let (computed, bindings) = (&kept.computed, &kept.graph.bindings);
    let node = |i: usize| values.get(computed.nodes.get(i)?).copied();
    if !bindings.empty.is_empty() {
        return None;
    }
    let mut leaves = vec![None; computed.leaves.len()];
    for &(n, _) in &bindings.leaves {
        let id = computed.leaves.get(n)?;
        leaves[n] = Some(match values.get(id) {
            Some(&v) => Leaf::Input(v),
            None => under.get(id)?.clone(),
        });
    }
    let appends = bindings.appends.iter().zip(&computed.appended_to).map(|(&(i, ..), old)| Some((node(i)?, *values.get(old)?)));
    Some(StepPlan {
        serial: kept.serial,
        leaves,
        positions: bindings.positions.iter().map(|&(i, _)| node(i)).collect::<Option<_>>()?,
        masks: bindings.masks.iter().map(|&(i, _)| node(i)).collect::<Option<_>>()?,
        appends: appends.collect::<Option<_>>()?,
        outputs: kept.graph.outputs.iter().map(|o| node(o.node)).collect::<Option<_>>()?,
    })
}

/// Runs computed without being recorded (for tests and `bench`).
static STEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn steps_run() -> u64 {
    STEPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Computes `plan`'s graph over `values`, returning each output's value and data. None, with nothing
/// changed, when it cannot: the graph is no longer kept, or a value does not fit the place it goes.
pub fn run(plan: &StepPlan, values: &impl StepValues) -> Option<OpResult<Vec<(usize, Array)>>> {
    let mut runner = runner().ok()?.lock().unwrap_or_else(|e| e.into_inner());
    if runner.kept.as_ref()?.serial != plan.serial {
        return None;
    }
    let graph = &runner.kept.as_ref()?.graph;
    let bound = Bound::check(plan, values, graph)?;
    let mut kept = runner.kept.take()?;
    let graph = &mut kept.graph;
    // Nothing was changed before here; from here each write goes where the checks above allow.
    for (&(_, t), buffer) in graph.bindings.leaves.iter().zip(&bound.leaves) {
        // SAFETY: t is a tensor of the kept graph; the buffer fits it (checked) and is held until the
        // graph is done.
        unsafe { super::Graph::bind_leaf(t, buffer) };
    }
    graph.held.extend(bound.leaves);
    for (&(_, t), &offset) in graph.bindings.positions.iter().zip(&bound.offsets) {
        // SAFETY: the positions tensor holds ne[0] i32 values in a buffer the graph owns.
        unsafe { super::fused::write_positions(t, offset) };
    }
    for (&(_, t), &(mask, lq, length)) in graph.bindings.masks.iter().zip(&bound.masks) {
        // SAFETY: an f16 tensor of ne[0] * ne[1] values the graph owns; lq is its ne[1] (checked).
        unsafe { super::fused::write_mask(t, mask, lq, length) };
    }
    let appends = std::mem::take(&mut graph.bindings.appends);
    for (&(i, full, views), (old, bytes)) in appends.iter().zip(&bound.appends) {
        let old_bytes = old.elements() * old.0.dtype.size();
        // SAFETY: a size query on a tensor of the kept graph.
        let room = unsafe { g::ggml_nbytes(full) };
        // (Checked: old's buffer is its alone, and `bytes` fits the room.)
        let Some(buffer) = graph.grow(old, *bytes, room) else {
            graph.bindings.appends = appends;
            return Some(Err("could not grow a cache in place".into()));
        };
        graph.place(i, old_bytes, buffer, full, views);
    }
    graph.bindings.appends = appends;
    let result = graph.compute(&mut runner, true, |i| bound.output_bytes.get(&i).copied().unwrap_or(usize::MAX));
    super::super::release_heap_holes();
    let buffers = match result {
        Ok(buffers) => buffers,
        Err(e) => return Some(Err(e)),
    };
    STEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let outputs = plan.outputs.iter().zip(buffers).map(|(&v, buffer)| (v, Array::ready_shared(values.shape(v).to_vec(), values.dtype(v), buffer))).collect();
    runner.kept = Some(kept);
    Some(Ok(outputs))
}

/// A run's values, checked against the places they go.
struct Bound<'a> {
    leaves: Vec<Arc<Buffer>>,
    offsets: Vec<i32>,
    masks: Vec<(AttentionMask, i64, i64)>,
    /// Each append's old part and the bytes it grows to.
    appends: Vec<(&'a Array, usize)>,
    /// The size of each output, by node of the order.
    output_bytes: HashMap<usize, usize>,
}

impl<'a> Bound<'a> {
    fn check(plan: &StepPlan, values: &'a impl StepValues, graph: &super::Graph) -> Option<Bound<'a>> {
        let b = &graph.bindings;
        let mut leaves = Vec::with_capacity(b.leaves.len());
        for &(n, t) in &b.leaves {
            let array = plan.leaves.get(n)?.as_ref()?.data(values)?;
            let buffer = array.buffer()?;
            // SAFETY: a read of a tensor header of the kept graph.
            let ty = unsafe { (*t).type_ };
            let same = ne(&array.0.shape).ok()? == ne_of(t) && array.0.blocks.unwrap_or(ggml_type(array.0.dtype)) == ty;
            if !same || !super::Graph::leaf_fits(t, &buffer) {
                return None;
            }
            leaves.push(buffer);
        }
        let offsets = plan.positions.iter().map(|&v| values.rope_offset(v)).collect::<Option<Vec<_>>>()?;
        let mut masks = Vec::with_capacity(b.masks.len());
        for (&v, &(_, t)) in plan.masks.iter().zip(&b.masks) {
            let (mask, lq, length) = values.mask(v)?;
            let mask = AttentionMask::of(&mask);
            let n = ne_of(t);
            if mask == AttentionMask::Explicit || n[1] != lq || length > n[0] {
                return None;
            }
            masks.push((mask, lq, length));
        }
        let mut appends = Vec::with_capacity(b.appends.len());
        for (&(append, old), &(_, full, [tail, _])) in plan.appends.iter().zip(&b.appends) {
            let old = values.input(old)?;
            let bytes = checks_bytes(values.shape(append), values.dtype(append))?;
            // SAFETY: size queries on tensors of the kept graph.
            let (room, tail) = unsafe { (g::ggml_nbytes(full), g::ggml_nbytes(tail)) };
            let old_bytes = old.elements() * old.0.dtype.size();
            let sole = match &*old.state() {
                State::Ready(buffer) => Arc::strong_count(buffer) == 1,
                State::Pending(..) => false,
            };
            // Each grows a buffer of its own (one the leaves above do not hold either), the new rows right
            // after the old ones, inside the room.
            let twice = appends.iter().any(|(other, _): &(&Array, usize)| Arc::ptr_eq(&other.0, &old.0));
            if !sole || twice || Arc::strong_count(&old.0) != 1 || old.0.dtype != values.dtype(append) || old_bytes + tail != bytes || bytes > room {
                return None;
            }
            appends.push((old, bytes));
        }
        let mut output_bytes = HashMap::default();
        for (output, &v) in graph.outputs.iter().zip(&plan.outputs) {
            output_bytes.insert(output.node, checks_bytes(values.shape(v), values.dtype(v))?);
        }
        Some(Bound { leaves, offsets, masks, appends, output_bytes })
    }
}

fn checks_bytes(shape: &[i32], dtype: DType) -> Option<usize> {
    usize::try_from(crate::host::tensor::checks::bytes(shape, dtype).ok()?).ok()
}
