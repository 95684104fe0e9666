//! Reusing a lowered ggml graph. Decode steps evaluate the same ~550 ops token after token; lowering them
//! to a fresh ggml graph, and placing its intermediates, was ~0.85 ms of each ~20 ms step. So the last
//! graph is kept, and an evaluation whose [`Structure`] equals the kept one's computes the kept graph
//! again after rewriting what differs between steps: where each leaf's data is, the rope positions, the
//! attention masks, and where a cache's new rows go ([`Graph::patch`]).
//!
//! The structure is every fact the lowering reads, written out exactly (ops with their parameters,
//! shapes, types, how nodes connect, what is kept), except the rope offsets and attention mask offsets,
//! which only fill buffers the patch rewrites. A cache's length would change the structure every step,
//! so a cache that is appended in place and read only by single-query attention is lowered at its
//! capacity rounded up to [`PAD_ROWS`] rows, with the rows past its length masked out of attention (as
//! llama.cpp pads its caches); ggml's attention skips masked keys.

use super::{ne, Graph, HashMap, Kept, References, Runner, T};
use crate::host::tensor::cpu::{Array, AttentionMask, Node, Op, State};
use crate::host::tensor::{DType, OpResult};
use llama_cpp_sys_2 as g;
use std::sync::Arc;

/// Caches read by attention are lowered at their length rounded up to this many rows.
pub(super) const PAD_ROWS: i64 = 256;

/// What the lowering of one evaluation depends on, beyond the values of its data.
pub(in crate::host::tensor::cpu) struct Structure {
    /// Everything the lowering reads, as numbers, compared exactly (never by a hash an adapter could
    /// collide).
    key: Vec<u64>,
    /// The data arrays the graph reads, numbered in order of first use; None for the old part of an
    /// append, which only its append may hold (see [`appendable`]).
    pub(super) leaves: Vec<Option<Array>>,
    /// Each leaf's node id, the old part of an append's included.
    leaf_ids: Vec<u64>,
    pub(super) leaf_number: HashMap<*const Node, usize>,
    /// Per node of the order: the rows a cache append is lowered at, when padded.
    pub(super) padded: Vec<Option<i64>>,
    /// Per node of the order: computed inside the one node that reads it (see [`folded`]).
    pub(super) folded: Vec<bool>,
}

/// Where an input comes from, in the key: a node of this graph or a numbered leaf.
const FROM_NODE: u64 = 1 << 62;

impl Structure {
    pub(super) fn of(order: &[Array], keep: &[Kept], references: &References) -> Structure {
        let index = &references.index;
        let (appends, padded) = appends(order, references);
        let folded = folded(order, keep, references, &appends);
        let mut s = Structure { key: Vec::with_capacity(order.len() * 16), leaves: Vec::new(), leaf_ids: Vec::new(), leaf_number: HashMap::default(), padded, folded };
        // Attention nodes that share a mask (same kind, offsets and sizes) share one ggml tensor.
        let mut masks: Vec<((AttentionMask, i64, i64), usize)> = Vec::new();
        for (i, node) in order.iter().enumerate() {
            let state = node.state();
            let State::Pending(op, inputs) = &*state else { continue };
            op_key(op, &mut s.key);
            s.key.extend([node.0.dtype as u64, keep[i] as u64, u64::from(appends[i]), inputs.len() as u64]);
            s.shape(&node.0.shape, s.padded[i]);
            if let Op::Attention { mask, .. } = op {
                let sizes = (*mask, inputs[0].0.shape[2] as i64, inputs[1].0.shape[2] as i64);
                let group = masks.iter().find(|(m, _)| *m == sizes).map_or(i, |&(_, first)| first);
                masks.push((sizes, group));
                s.key.push(group as u64);
            }
            for (position, input) in inputs.iter().enumerate() {
                let key = Arc::as_ptr(&input.0);
                if let Some(&j) = index.get(&key) {
                    s.key.push(FROM_NODE | j as u64);
                    continue;
                }
                let next = s.leaves.len();
                let n = *s.leaf_number.entry(key).or_insert(next);
                s.key.push(n as u64);
                if n == next {
                    s.leaves.push((position != 0 || !appends[i]).then(|| input.clone()));
                    s.leaf_ids.push(input.id());
                    s.key.extend([input.0.dtype as u64, input.0.blocks.map_or(u64::MAX, u64::from)]);
                    // The old part of a padded append is grown in place, to the same padded rows.
                    s.shape(&input.0.shape, if position == 0 { s.padded[i] } else { None });
                }
            }
        }
        s
    }

    fn shape(&mut self, shape: &[i32], padded: Option<i64>) {
        self.key.push(shape.len() as u64);
        let rank = shape.len();
        for (axis, &d) in shape.iter().enumerate() {
            let d = match padded {
                Some(rows) if axis + 2 == rank => rows,
                _ => d as i64,
            };
            self.key.push(d as u64);
        }
    }
}

/// The parts of an op the lowering reads, exhaustively (a new op must say what it adds). Rope offsets and
/// mask offsets are left out: they only fill buffers [`Graph::patch`] rewrites.
fn op_key(op: &Op, key: &mut Vec<u64>) {
    let bits = |f: f32| u64::from(f.to_bits());
    match op {
        Op::MatMul => key.push(1),
        Op::Add => key.push(2),
        Op::Subtract => key.push(3),
        Op::Multiply => key.push(4),
        Op::Divide => key.push(5),
        Op::Scale(f) => key.extend([6, bits(*f)]),
        Op::AddScalar(v) => key.extend([7, bits(*v)]),
        Op::Tanh => key.push(8),
        Op::Sigmoid => key.push(9),
        Op::Silu => key.push(10),
        Op::GeluTanh => key.push(11),
        Op::Cast => key.push(12),
        Op::Reshape => key.push(13),
        Op::Transpose(axes) => {
            key.extend([14, axes.len() as u64]);
            key.extend(axes.iter().map(|&a| a as u64));
        }
        Op::Slice(ranges) | Op::SliceUpdate(ranges) => {
            key.extend([if matches!(op, Op::Slice(_)) { 15 } else { 16 }, ranges.len() as u64]);
            key.extend(ranges.iter().flat_map(|&(start, len)| [start as u64, len as u64]));
        }
        Op::Concat(axis) => key.extend([17, *axis as u64]),
        Op::TakeRows => key.push(18),
        Op::Softmax(axis) => key.extend([19, *axis as u64]),
        Op::RmsNorm(eps) => key.extend([20, bits(*eps)]),
        Op::Rope(p) => key.extend([21, p.dims as u64, u64::from(p.traditional), bits(p.base), bits(p.scale)]),
        Op::Attention { scale, mask } => {
            key.extend([22, bits(*scale)]);
            match mask {
                AttentionMask::None => key.push(0),
                AttentionMask::Causal => key.push(1),
                AttentionMask::SlidingWindow { window, .. } => key.extend([2, *window as u64]),
                AttentionMask::Explicit => key.push(3),
            }
        }
        Op::Conv1dDepthwise => key.push(23),
        Op::Dequantize => key.push(24),
    }
}

/// Whether `concatenate(old, new)` can be computed by writing `new` after `old` in old's own buffer: one
/// float type throughout, only unit axes before the joined one, and nothing but this op holding `old` or
/// its buffer. See [`Graph::append`].
pub(super) fn appendable(op: &Op, inputs: &[Array], node: &Array) -> bool {
    let (Op::Concat(axis), [old, new]) = (op, inputs) else { return false };
    let dtype = node.0.dtype;
    let stored = matches!(dtype, DType::F32 | DType::F16) && old.0.dtype == dtype && old.0.blocks.is_none();
    let sole_buffer = match &*old.state() {
        State::Ready(buffer) => Arc::strong_count(buffer) == 1,
        State::Pending(..) => false,
    };
    stored && node.0.shape[..*axis].iter().all(|&d| d == 1) && Arc::strong_count(&old.0) == 1 && sole_buffer && new.elements() > 0
}

/// The f32 array `a` is cast from, when `a` is a pending cast of unquantized f32 data.
pub(super) fn cast_from_f32(a: &Array) -> Option<Array> {
    match &*a.state() {
        State::Pending(Op::Cast, from) if from[0].0.dtype == DType::F32 && from[0].0.blocks.is_none() => Some(from[0].clone()),
        _ => None,
    }
}

/// The nodes computed inside the one node that reads them (and not kept), each a node and a pass over
/// memory fewer: a GELU inside an elementwise product of its shape, a gated MLP's `gelu(gate) * up`
/// (see [`Graph::gated`]), and new rows cast from f32 inside the append of an f16 cache, one copy that
/// converts (see [`Graph::append`]).
fn folded(order: &[Array], keep: &[Kept], references: &References, appends: &[bool]) -> Vec<bool> {
    let mut candidate = vec![false; order.len()];
    for (i, node) in order.iter().enumerate() {
        let state = node.state();
        let State::Pending(op, inputs) = &*state else { continue };
        let internal = |input: &Array| references.index.get(&Arc::as_ptr(&input.0)).copied();
        if appends[i] {
            if let Some(j) = cast_from_f32(&inputs[1]).and_then(|_| internal(&inputs[1])) {
                candidate[j] = true;
            }
            continue;
        }
        if !matches!(op, Op::Multiply) || node.elements() == 0 || inputs.iter().any(|i| i.0.shape != node.0.shape) {
            continue;
        }
        // One GELU per product (the first): the other operand is read as it is.
        let gelu = |input: &&Array| matches!(&*input.state(), State::Pending(Op::GeluTanh, _));
        if let Some(j) = inputs.iter().find(gelu).and_then(internal) {
            candidate[j] = true;
        }
    }
    (0..order.len()).map(|j| candidate[j] && references.internal[j] == 1 && keep[j] == Kept::No).collect()
}

/// Which nodes are appends, and those lowered at a padded length: rank-4 caches joined along their
/// sequence axis and read by nothing but single-query attention, as keys or values (a decode step's).
/// Prefill chunks keep exact lengths, so a prompt computes as it always has.
fn appends(order: &[Array], references: &References) -> (Vec<bool>, Vec<Option<i64>>) {
    let appends: Vec<bool> = order
        .iter()
        .map(|node| match &*node.state() {
            State::Pending(op, inputs) => appendable(op, inputs, node),
            State::Ready(_) => false,
        })
        .collect();
    let mut padded: Vec<Option<i64>> = order
        .iter()
        .zip(&appends)
        .map(|(node, &append)| match &*node.state() {
            State::Pending(Op::Concat(2), _) if append && node.0.shape.len() == 4 => {
                let rows = node.0.shape[2] as i64;
                Some((rows + PAD_ROWS - 1) / PAD_ROWS * PAD_ROWS)
            }
            _ => None,
        })
        .collect();
    for node in order {
        let state = node.state();
        let State::Pending(op, inputs) = &*state else { continue };
        for (position, input) in inputs.iter().enumerate() {
            let Some(&j) = references.index.get(&Arc::as_ptr(&input.0)) else { continue };
            let by_decode_attention = matches!(op, Op::Attention { mask, .. } if *mask != AttentionMask::Explicit)
                && (position == 1 || position == 2)
                && inputs[0].0.shape[2] == 1;
            if !by_decode_attention {
                padded[j] = None;
            }
        }
    }
    let padded = padded.iter().zip(&references.internal).map(|(&p, &readers)| p.filter(|_| readers > 0)).collect();
    (appends, padded)
}

/// The graph kept from the last evaluation, for the next one of the same structure.
pub(in crate::host::tensor::cpu) struct KeptGraph {
    key: Vec<u64>,
    pub(super) graph: Graph,
    /// Which kept graph this is: numbered in the order they were kept.
    pub(super) serial: u64,
    /// What it computed last (see `step.rs`).
    pub(super) computed: Computed,
}

/// The nodes a kept graph last computed, by id: those of its order, the leaves it read (by number) and
/// the old part of each in-place append (by binding).
pub(super) struct Computed {
    pub(super) nodes: Vec<u64>,
    pub(super) leaves: Vec<u64>,
    pub(super) appended_to: Vec<u64>,
}

impl Computed {
    pub(super) fn of(order: &[Array], structure: &Structure, bindings: &Bindings) -> Computed {
        let old = |i: usize| match &*order[i].state() {
            State::Pending(_, inputs) => inputs[0].id(),
            State::Ready(_) => u64::MAX,
        };
        Computed {
            nodes: order.iter().map(Array::id).collect(),
            leaves: structure.leaf_ids.clone(),
            appended_to: bindings.appends.iter().map(|&(i, ..)| old(i)).collect(),
        }
    }
}

impl KeptGraph {
    pub(super) fn context(&self) -> *mut g::ggml_context {
        self.graph.ctx
    }
}

/// Graphs computed again from a kept one (for tests and `bench`).
static REUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(in crate::host::tensor) fn reused_graphs() -> u64 {
    REUSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Computes `order` with the kept graph if its structure is `structure`'s and its intermediates are
/// still placed (it was the last graph computed). None when it cannot be reused.
pub(super) fn replay(runner: &mut Runner, order: &[Array], structure: &Structure) -> Option<OpResult<()>> {
    let kept = runner.kept.as_ref()?;
    if kept.key != structure.key || !runner.computed_last(kept.graph.graph) || !kept.graph.leaves_fit(structure) {
        return None;
    }
    let mut kept = runner.kept.take()?;
    // (Read before the computation: it makes the order's appends data.)
    let computed = Computed::of(order, structure, &kept.graph.bindings);
    let result = kept.graph.patch(order, structure).and_then(|()| kept.graph.finish(runner, order, true));
    if result.is_ok() {
        REUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        kept.computed = computed;
        runner.kept = Some(kept);
    }
    Some(result)
}

/// Keeps `graph`, just computed for `structure` (from `computed`), for the next evaluation (unless it
/// lives in a context of its own, or its lowering met something the structure does not describe).
pub(super) fn keep(runner: &mut Runner, graph: Graph, structure: Structure, computed: Computed) {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    runner.kept = (!graph.owned && graph.bindings.complete).then_some(KeptGraph { key: structure.key, graph, serial, computed });
}

/// What a kept graph rewrites for each evaluation: recorded while lowering.
#[derive(Default)]
pub(super) struct Bindings {
    /// Tensors over leaf data, by leaf number.
    pub(super) leaves: Vec<(usize, T)>,
    /// Rope positions: the rope node and the tensor of its positions.
    pub(super) positions: Vec<(usize, T)>,
    /// Attention masks the shell built: the attention node that made it and the mask.
    pub(super) masks: Vec<(usize, T)>,
    /// In-place appends: the node, the cache tensor, and the two views its new rows are copied through.
    pub(super) appends: Vec<(usize, T, [T; 2])>,
    /// Nodes with no elements, which are results without being computed.
    pub(super) empty: Vec<usize>,
    /// False when the lowering read something outside the structure: the graph is not kept.
    pub(super) complete: bool,
}

impl Graph {
    /// Whether this evaluation's leaves fit the kept graph's tensors (equal shapes and types are in the
    /// structure's key; a repacked weight also needs its copy: see [`Graph::leaf_fits`]).
    fn leaves_fit(&self, structure: &Structure) -> bool {
        self.bindings.leaves.iter().all(|&(n, t)| {
            let buffer = structure.leaves.get(n).and_then(|leaf| leaf.as_ref()?.buffer());
            buffer.is_some_and(|b| Graph::leaf_fits(t, &b))
        })
    }

    /// Points the kept graph at this evaluation's data and rewrites its positions, masks and appends.
    fn patch(&mut self, order: &[Array], structure: &Structure) -> OpResult<()> {
        for &i in &self.bindings.empty {
            *order[i].state() = State::Ready(Arc::new(crate::host::tensor::cpu::Buffer::zeroed(0)));
        }
        let leaves = std::mem::take(&mut self.bindings.leaves);
        for &(n, t) in &leaves {
            let leaf = structure.leaves[n].as_ref().ok_or("a kept graph lost a leaf")?;
            let buffer = leaf.buffer().ok_or("the cpu backend met an input it had not computed")?;
            // SAFETY: t is a tensor of the kept graph's context; the buffer fits it (`replay` checked) and
            // is held until the graph is done.
            unsafe { Graph::bind_leaf(t, &buffer) };
            self.held.push(buffer);
        }
        self.bindings.leaves = leaves;
        for &(i, t) in &self.bindings.positions {
            let State::Pending(Op::Rope(p), _) = &*order[i].state() else { return Err("a kept graph lost a rope".into()) };
            // SAFETY: the positions tensor holds ne[0] i32 values in a buffer the graph owns.
            unsafe { super::fused::write_positions(t, p.offset) };
        }
        for &(i, t) in &self.bindings.masks {
            let State::Pending(Op::Attention { mask, .. }, inputs) = &*order[i].state() else { return Err("a kept graph lost an attention".into()) };
            let (lq, lk) = (inputs[0].0.shape[2] as i64, inputs[1].0.shape[2] as i64);
            // SAFETY: the mask is an f16 tensor of ne[0] * ne[1] values in a buffer the graph owns.
            unsafe { super::fused::write_mask(t, *mask, lq, lk) };
        }
        let appends = std::mem::take(&mut self.bindings.appends);
        for &(i, full, views) in &appends {
            let state = order[i].state();
            let State::Pending(_, inputs) = &*state else { return Err("a kept graph lost an append".into()) };
            // SAFETY: a size query on a tensor of the kept graph.
            let room = unsafe { g::ggml_nbytes(full) };
            let bytes = order[i].elements() * order[i].0.dtype.size();
            let buffer = self.grow(&inputs[0], bytes, room).ok_or("could not grow a cache in place")?;
            self.place(i, inputs[0].elements() * order[i].0.dtype.size(), buffer, full, views);
        }
        self.bindings.appends = appends;
        Ok(())
    }

    /// The ne the node being lowered is lowered to: its shape's, or a padded append's padded rows.
    pub(super) fn lowered_ne(&self, node: &Array) -> OpResult<[i64; 4]> {
        let mut n = ne(&node.0.shape)?;
        if let Some(rows) = self.padded.get(self.current).copied().flatten() {
            n[1] = rows;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use crate::host::tensor::cpu::{reused_graphs, Array, CpuBackend};
    use crate::host::tensor::{Backend, DType, Mask, Rope};

    /// How the decode loop below is computed.
    #[derive(Clone, Copy, PartialEq)]
    enum Way {
        /// Each step computes the graph kept from the last one when it can.
        Reusing,
        /// The kept graph is dropped before each step: every step is lowered afresh (still padded).
        Lowering,
        /// The old caches are also held elsewhere, so they are joined by copying, at their exact length.
        Copying,
    }

    /// A single-head decode loop over a 4-row prompt: rope, a cache per keys and values (of `stored`,
    /// cast from f32) appended every step, sliding-window and causal attention, an output product.
    /// Returns every step's output.
    fn decode(way: Way, steps: i32, stored: DType) -> Vec<Vec<f32>> {
        let cpu = CpuBackend;
        let values = |n: usize, seed: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect() };
        let w = |seed: f32| cpu.from_f32(&values(64, seed), &[8, 8]).unwrap();
        let (wq, wk, wv, wo) = (w(1.0), w(2.0), w(3.0), w(4.0));
        let rope = |x: &Array, offset: i32| cpu.rope(x, Rope { dims: 8, traditional: false, base: 10_000.0, scale: 1.0, offset }).unwrap();
        let project = |x: &Array, w: &Array, rows: i32| cpu.reshape(&cpu.matmul(x, w).unwrap(), &[1, 1, rows, 8]).unwrap();
        let prompt = cpu.from_f32(&values(32, 0.5), &[4, 8]).unwrap();
        let store = |x: Array| cpu.astype(&x, stored).unwrap();
        let mut keys = store(rope(&project(&prompt, &wk, 4), 0));
        let mut vals = store(project(&prompt, &wv, 4));
        cpu.eval(&[&keys, &vals]).unwrap();
        let mut outputs = Vec::new();
        for step in 0..steps {
            let position = 4 + step;
            let x = cpu.from_f32(&values(8, position as f32), &[1, 8]).unwrap();
            let q = rope(&project(&x, &wq, 1), position);
            let held = (way == Way::Copying).then(|| (keys.clone(), vals.clone()));
            keys = cpu.concatenate(&[&keys, &store(rope(&project(&x, &wk, 1), position))], 2).unwrap();
            vals = cpu.concatenate(&[&vals, &store(project(&x, &wv, 1))], 2).unwrap();
            let local = cpu.attention(&q, &keys, &vals, 0.35, Mask::SlidingWindow { window: 5, query_offset: position, key_offset: 0 }).unwrap();
            let global = cpu.attention(&q, &keys, &vals, 0.35, Mask::Causal).unwrap();
            let out = cpu.matmul(&cpu.reshape(&cpu.add(&local, &global).unwrap(), &[1, 8]).unwrap(), &wo).unwrap();
            if way == Way::Lowering {
                super::super::runner().unwrap().lock().unwrap().kept = None;
            }
            outputs.push(cpu.read_f32(&out).unwrap());
            drop(held);
        }
        outputs
    }

    /// A kept graph holds nothing of the evaluation that made it: an append that was not a result left
    /// its buffer under its node's address, and a later node at that address took it for its own.
    #[test]
    fn a_kept_graph_keeps_nothing_of_its_evaluation() {
        let cpu = CpuBackend;
        let old = cpu.from_f32(&[1.0; 8], &[1, 2, 4]).unwrap();
        let joined = cpu.concatenate(&[&old, &cpu.from_f32(&[2.0; 4], &[1, 1, 4]).unwrap()], 1).unwrap();
        drop(old);
        let doubled = cpu.scale(&joined, 2.0).unwrap();
        drop(joined);
        assert_eq!(cpu.read_f32(&doubled).unwrap(), [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 4.0, 4.0, 4.0, 4.0]);
        // (Whichever graph is kept now, maybe another test's, holds nothing either.)
        let runner = super::super::runner().unwrap().lock().unwrap();
        let kept = runner.kept.as_ref().expect("a graph is kept");
        assert!(kept.graph.appended.is_empty() && kept.graph.held.is_empty() && kept.graph.leaves.is_empty() && kept.graph.leaf_number.is_empty());
    }

    /// An empty result of a reused graph is data, as it is when the graph is lowered.
    #[test]
    fn a_reused_graph_still_makes_its_empty_results() {
        let cpu = CpuBackend;
        let before = reused_graphs();
        // Tests running beside this one replace the kept graph now and then: steps go on until one reuses.
        for step in 0..100 {
            let x = cpu.from_f32(&[step as f32; 4], &[1, 4]).unwrap();
            let doubled = cpu.scale(&x, 2.0).unwrap();
            let nothing = cpu.slice(&doubled, &[0, 0], &[0, 4]).unwrap();
            cpu.eval(&[&doubled, &nothing]).unwrap();
            assert!(nothing.buffer().is_some(), "step {step}: the empty result was made");
            assert_eq!(cpu.read_f32(&doubled).unwrap(), vec![2.0 * step as f32; 4]);
            if step >= 2 && reused_graphs() > before {
                return;
            }
        }
        panic!("no graph was reused");
    }

    /// For f32 caches, and for f16 ones (a block-quantized model's), whose new rows are converted by
    /// the append itself.
    #[test]
    fn a_reused_graph_computes_what_a_fresh_one_does() {
        for stored in [DType::F32, DType::F16] {
            // 300 steps: the caches' padded length goes from 256 to 512 rows on the way.
            let before = reused_graphs();
            let reusing = decode(Way::Reusing, 300, stored);
            assert!(reused_graphs() > before, "no graph was reused");
            assert!(reusing == decode(Way::Lowering, 300, stored), "{stored:?}: a reused graph computes exactly what the same graph lowered afresh does");
            // Padded and exact caches: the same attention up to the order ggml sums in past 512 rows (and,
            // over f16 values, up to its f16 sums: 8e-5 measured).
            let tolerance = if stored == DType::F16 { 1e-3 } else { 1e-5 };
            for (step, (padded, exact)) in reusing.iter().zip(decode(Way::Copying, 300, stored)).enumerate() {
                let diff = padded.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < tolerance, "{stored:?}, step {step}: padded caches differ from exact ones by {diff}");
            }
        }
    }
}
