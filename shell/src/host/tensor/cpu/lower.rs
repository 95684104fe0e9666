//! Evaluation on ggml: the pending part of our graph becomes one ggml graph, computed on a process-wide
//! thread pool with memory planned by ggml's graph allocator (intermediates share one reusable buffer).
//!
//! ggml numbers dimensions from the innermost (`ne[0]` is numpy's last axis) and has at most four;
//! `types.rs` translates. Every ggml kernel aborts on inputs it does not support, so each op is lowered
//! to kernels with the operand types and layouts they take: activations f32 and contiguous; a matrix
//! product's weight, attention's f16 keys and values, and the float parts a copy converts are read as stored.

use super::{Array, Buffer, Op, State};
use crate::host::tensor::OpResult;
use llama_cpp_sys_2 as g;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::Arc;

mod compact;
mod fused;
mod repacked;
mod residual;
mod results;
mod reuse;
mod runner;
pub(in crate::host::tensor) mod step;
mod types;
mod unread;

pub(in crate::host::tensor) use reuse::reused_graphs;
use results::Output;
use reuse::{Bindings, Computed, Structure};
use runner::{runner, Runner};
pub(super) use runner::threads;
pub(super) use unread::discard;
pub(super) use types::{block_size, f32_values, row_size, to_f32, Q4_1, TYPE_COUNT};
use types::{ggml_type, ne, ne_of, quantized};

type T = *mut g::ggml_tensor;

/// Room for the ggml tensors one of our ops may expand to, leaves included (attention, the largest, makes
/// about 20: its casts and copies, the mask, two products and a softmax). A full ggml graph aborts, so
/// this errs high; it costs only tensor headers.
const TENSORS_PER_OP: usize = 32;
/// A graph larger than this is refused rather than planned (a forward pass has a few thousand nodes).
const MAX_PENDING: usize = 1 << 20;

/// Why a computed node's data outlives its graph.
#[derive(Clone, Copy, PartialEq)]
enum Kept {
    No,
    /// Asked for (evaluated or read back).
    Result,
    /// Still held by the adapter: state such as a cache.
    State,
}

/// Pending nodes reachable from `roots`, inputs before the nodes that use them.
fn pending_order(roots: &[&Array]) -> OpResult<Vec<Array>> {
    let mut order = Vec::new();
    let mut seen: HashMap<*const super::Node, bool> = HashMap::default();
    let mut stack: Vec<(Array, bool)> = roots.iter().map(|&a| (a.clone(), false)).collect();
    while let Some((node, expanded)) = stack.pop() {
        let key = Arc::as_ptr(&node.0);
        if expanded {
            order.push(node);
            continue;
        }
        if seen.contains_key(&key) {
            continue;
        }
        let state = node.state();
        let State::Pending(_, inputs) = &*state else { continue };
        seen.insert(key, true);
        if seen.len() > MAX_PENDING {
            return Err(format!("a graph of more than {MAX_PENDING} pending operations is refused"));
        }
        stack.push((node.clone(), true));
        stack.extend(inputs.iter().filter(|i| !seen.contains_key(&Arc::as_ptr(&i.0))).map(|i| (i.clone(), false)));
    }
    Ok(order)
}

/// How the nodes of an order read each other.
struct References {
    /// Each node's place in the order.
    index: HashMap<*const super::Node, usize>,
    /// References from inside the graph; anything beyond them (and `order`'s own) is a user of the result.
    internal: Vec<usize>,
    /// Inputs read in all.
    edges: usize,
}

impl References {
    fn of(order: &[Array]) -> References {
        let index: HashMap<*const super::Node, usize> = order.iter().enumerate().map(|(i, a)| (Arc::as_ptr(&a.0), i)).collect();
        let mut internal = vec![0usize; order.len()];
        let mut edges = 0;
        for node in order {
            if let State::Pending(_, inputs) = &*node.state() {
                edges += inputs.len();
                for input in inputs {
                    if let Some(&i) = index.get(&Arc::as_ptr(&input.0)) {
                        internal[i] += 1;
                    }
                }
            }
        }
        References { index, internal, edges }
    }
}

/// Computes `roots` and every pending node still referenced from outside the graph.
pub(super) fn evaluate(roots: &[&Array]) -> OpResult<()> {
    compute(roots, Kept::Result)
}

/// As `evaluate`, keeping `roots` as `kind`.
fn compute(roots: &[&Array], kind: Kept) -> OpResult<()> {
    let mut order = pending_order(roots)?;
    if compact::in_place(&order) {
        order = pending_order(roots)?;
    }
    if order.is_empty() {
        return Ok(());
    }
    let references = References::of(&order);
    let (internal, edges) = (&references.internal, references.edges);
    let cheap_view = cheap_views(&order, &references);
    let is_root = |a: &Array| roots.iter().any(|r| Arc::ptr_eq(&r.0, &a.0));
    let keep: Vec<Kept> = (0..order.len())
        .map(|i| match is_root(&order[i]) {
            true => kind,
            false if !cheap_view[i] && Arc::strong_count(&order[i].0) > 1 + internal[i] => Kept::State,
            false => Kept::No,
        })
        .collect();
    if edges > 4 * MAX_PENDING {
        return Err(format!("a graph whose operations read more than {} inputs is refused", 4 * MAX_PENDING));
    }
    let structure = Structure::of(&order, &keep, &references);
    let mut runner = runner()?.lock().unwrap_or_else(|e| e.into_inner());
    let result = match reuse::replay(&mut runner, &order, &structure) {
        Some(result) => result,
        None => {
            let mut graph = Graph::new(&mut runner, order.len(), edges, &structure)?;
            graph.lower(&order, &keep)?;
            let computed = Computed::of(&order, &structure, &graph.bindings);
            let result = graph.finish(&mut runner, &order, false);
            if result.is_ok() {
                reuse::keep(&mut runner, graph, structure, computed);
            }
            result
        }
    };
    super::release_heap_holes();
    result
}

/// Views of data (a linear layer's transposed weight, a slice of a cache) stay views: materializing one
/// would copy the data, and a matrix product reads a transposed weight as stored.
fn cheap_views(order: &[Array], references: &References) -> Vec<bool> {
    let mut cheap_view = vec![false; order.len()];
    for (i, node) in order.iter().enumerate() {
        if let State::Pending(Op::Transpose(_) | Op::Reshape | Op::Slice(_), inputs) = &*node.state() {
            cheap_view[i] = inputs[0].buffer().is_some() || references.index.get(&Arc::as_ptr(&inputs[0].0)).is_some_and(|&j| cheap_view[j]);
        }
    }
    cheap_view
}

/// The matrix of `transpose(w, [1, 0])` when `w` is data (a stored weight): a product reads it as stored.
fn stored_transpose(op: &Op, inputs: &[Array]) -> Option<Array> {
    match (op, inputs) {
        (Op::Transpose(axes), [w]) if axes[..] == [1, 0] && w.buffer().is_some() => Some(w.clone()),
        _ => None,
    }
}

/// ggml's `ggml_is_padded_1d`, which its scale asserts (aborting the process otherwise): strides packed
/// over every dimension, even those of size 1 that `ggml_is_contiguous` overlooks (a permuted view of
/// one head).
///
/// # Safety
/// `t` is a tensor of a live context.
unsafe fn padded_1d(t: T) -> bool {
    // SAFETY: per the contract above.
    unsafe {
        let (ne, nb) = ((*t).ne, (*t).nb);
        nb[0] == g::ggml_type_size((*t).type_) && nb[2] == nb[1] * ne[1] as usize && nb[3] == nb[2] * ne[2] as usize
    }
}

/// One ggml graph, its tensor headers in the runner's context or (a very large graph) its own.
struct Graph {
    ctx: *mut g::ggml_context,
    /// Whether `ctx` is this graph's own, freed with it.
    owned: bool,
    graph: *mut g::ggml_cgraph,
    /// Buffers our leaves point into, held while the graph computes.
    held: Vec<Arc<Buffer>>,
    /// Buffers of the graph's own (rope positions, masks), as long as the graph lives.
    own: Vec<Buffer>,
    leaves: HashMap<*const super::Node, T>,
    /// Weights as ggml's AMX product reads them (see [`Graph::repacked_leaf`]).
    repacked: HashMap<*const super::Node, T>,
    /// Appends computed in place (see [`Graph::append`]): the buffer each such node of the order ends up
    /// holding.
    appended: HashMap<usize, Arc<Buffer>>,
    /// The masks the shell built for attention, by kind, sizes and padded size: layers with the same
    /// window share one.
    masks: HashMap<(super::AttentionMask, i64, i64, i64), T>,
    /// Scratch for [`Graph::expand`].
    unnamed: Vec<T>,
    /// The results the graph computes, in order.
    outputs: Vec<Output>,
    /// The node of the order being lowered.
    current: usize,
    /// From the [`Structure`]: each node's padded rows, the nodes computed inside their one reader, and
    /// the leaves' numbers.
    padded: Vec<Option<i64>>,
    folded: Vec<bool>,
    /// The nodes left to their readers so far.
    in_reader: HashSet<*const super::Node>,
    leaf_number: HashMap<*const super::Node, usize>,
    bindings: Bindings,
}

impl Drop for Graph {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: the context was created by ggml_init for this graph alone and is freed once.
            unsafe { g::ggml_free(self.ctx) }
        }
    }
}

impl Graph {
    /// A context and graph with room for `pending` ops reading `edges` inputs in all (a concatenation of
    /// n arrays becomes about 3n ggml tensors).
    fn new(runner: &mut Runner, pending: usize, edges: usize, structure: &Structure) -> OpResult<Graph> {
        let size = pending * TENSORS_PER_OP + edges * 4 + 64;
        let busy = runner.kept.as_ref().map_or(std::ptr::null_mut(), |k| k.context());
        let (ctx, owned) = runner.context(size, busy)?;
        // SAFETY: the context has room for `size` tensors and a graph of them.
        let graph = unsafe { g::ggml_new_graph_custom(ctx, size, false) };
        Ok(Graph {
            ctx,
            owned,
            graph,
            held: Vec::new(),
            own: Vec::new(),
            leaves: HashMap::default(),
            repacked: HashMap::default(),
            appended: HashMap::default(),
            masks: HashMap::default(),
            unnamed: Vec::new(),
            outputs: Vec::new(),
            current: 0,
            padded: structure.padded.clone(),
            folded: structure.folded.clone(),
            in_reader: HashSet::default(),
            leaf_number: structure.leaf_number.clone(),
            bindings: Bindings { complete: true, ..Bindings::default() },
        })
    }

    /// Lowers `order` (as its [`Structure`] describes it) and computes it.
    #[cfg(test)]
    fn run(&mut self, runner: &mut Runner, order: &[Array], keep: &[Kept]) -> OpResult<()> {
        self.lower(order, keep)?;
        self.finish(runner, order, false)
    }

    fn lower(&mut self, order: &[Array], keep: &[Kept]) -> OpResult<()> {
        let mut lowered: HashMap<*const super::Node, T> = HashMap::default();
        // A linear layer's transposed weight (`x @ w.T`, 127 per Gemma 3 decode step) is read by its
        // product as stored; its view is only made if something else reads it.
        let mut deferred: HashSet<*const super::Node> = HashSet::default();
        for (i, (node, &kept)) in order.iter().zip(keep).enumerate() {
            self.current = i;
            if node.elements() == 0 {
                // Nothing to compute (ggml's kernels assume at least one element): an empty result.
                *node.state() = State::Ready(Arc::new(Buffer::zeroed(0)));
                self.bindings.empty.push(i);
                continue;
            }
            let t = {
                let state = node.state();
                let State::Pending(op, inputs) = &*state else { continue };
                if kept == Kept::No && stored_transpose(op, inputs).is_some() {
                    deferred.insert(Arc::as_ptr(&node.0));
                    continue;
                }
                if self.folded[i] {
                    // Computed by the node that reads it (see `gated`, `append`).
                    self.in_reader.insert(Arc::as_ptr(&node.0));
                    continue;
                }
                // A product reads a deferred weight as stored (see `matmul`); any other reader gets its view.
                let as_stored = |i: usize| matches!(op, Op::MatMul) && i == 1;
                for (i, input) in inputs.iter().enumerate() {
                    let key = Arc::as_ptr(&input.0);
                    if !as_stored(i) && deferred.contains(&key) && !lowered.contains_key(&key) {
                        let t = self.transposed_leaf(input)?;
                        lowered.insert(key, t);
                    }
                }
                if let Some(t) = self.append(op, inputs, node, &lowered)? {
                    t
                } else if let Some(t) = self.gated(op, inputs, &lowered, &deferred)? {
                    t
                } else {
                let mut args = Vec::with_capacity(inputs.len());
                for (i, input) in inputs.iter().enumerate() {
                    args.push(match lowered.get(&Arc::as_ptr(&input.0)) {
                        Some(&t) => t,
                        None if as_stored(i) && deferred.contains(&Arc::as_ptr(&input.0)) => std::ptr::null_mut(),
                        None => self.leaf(input)?,
                    });
                }
                self.op(op, &args, inputs, node)?
                }
            };
            let expected = self.lowered_ne(node)?;
            // A transposed view of block-quantized data keeps the blocks (for a matrix product to read).
            let block_view = quantized(t) && matches!(&*node.state(), State::Pending(Op::Transpose(_), _));
            // SAFETY: t is a tensor of this context.
            if ne_of(t) != expected || (unsafe { (*t).type_ } != ggml_type(node.0.dtype) && !block_view) {
                return Err(format!("the cpu backend lowered an op to the wrong shape or type ({:?} -> {:?})", node.0.shape, ne_of(t)));
            }
            // Added in topological order, ggml's recursive walk over parents only ever meets this op's
            // own few tensors: a graph of any depth cannot exhaust the stack.
            self.expand(t);
            lowered.insert(Arc::as_ptr(&node.0), t);
        }
        self.mark_outputs(order, keep, &lowered);
        self.leaves.clear();
        self.repacked.clear();
        self.leaf_number.clear();
        self.in_reader.clear();
        Ok(())
    }

    /// Adds `t` and the tensors it reads to the graph. ggml names each unnamed tensor it adds with
    /// snprintf ("node_%d", "leaf_%d"): ~750 calls per decode step, a quarter of lowering it. A name set
    /// here first, one byte, skips that.
    fn expand(&mut self, t: T) {
        self.unnamed.push(t);
        // SAFETY: `t` and its sources are tensors of live contexts; a name is a NUL-terminated array.
        unsafe {
            while let Some(t) = self.unnamed.pop() {
                if (*t).name[0] == 0 {
                    (*t).name[0] = b'_' as std::ffi::c_char;
                    (*t).name[1] = 0;
                    self.unnamed.extend((*t).src.iter().copied().filter(|s| !s.is_null()));
                }
            }
            g::ggml_build_forward_expand(self.graph, t);
        }
    }

    /// A computed array as a ggml tensor over its buffer (no copy).
    fn leaf(&mut self, a: &Array) -> OpResult<T> {
        let key = Arc::as_ptr(&a.0);
        if let Some(&t) = self.leaves.get(&key) {
            return Ok(t);
        }
        let buffer = a.buffer().ok_or("the cpu backend met an input it had not computed")?;
        // SAFETY: a 4-d tensor header in the context; its data points at `buffer`, held while computing.
        let t = unsafe { g::ggml_new_tensor(self.ctx, a.0.blocks.unwrap_or(ggml_type(a.0.dtype)), 4, ne(&a.0.shape)?.as_ptr()) };
        unsafe { (*t).data = buffer.ptr() };
        buffer.reading_as_stored();
        self.held.push(buffer);
        self.leaves.insert(key, t);
        match self.leaf_number.get(&key) {
            Some(&n) => self.bindings.leaves.push((n, t)),
            // Not a leaf the structure numbered: this graph cannot be pointed at another evaluation's.
            None => self.bindings.complete = false,
        }
        Ok(t)
    }

    /// A zeroed tensor over a buffer of the graph's own, for values the shell writes (rope positions,
    /// masks, row indices).
    fn own_data(&mut self, ty: g::ggml_type, ne: &[i64; 4]) -> T {
        // SAFETY: a 4-d tensor header in the context; its data points at a buffer the graph keeps.
        unsafe {
            let t = g::ggml_new_tensor(self.ctx, ty, 4, ne.as_ptr());
            let buffer = Buffer::zeroed(g::ggml_nbytes(t));
            (*t).data = buffer.ptr();
            self.own.push(buffer);
            t
        }
    }

    /// An f32, contiguous form of `t` (what elementwise kernels take).
    fn act(&mut self, t: T) -> OpResult<T> {
        // SAFETY: t belongs to this context.
        unsafe {
            let t = match (*t).type_ {
                g::GGML_TYPE_F32 => t,
                g::GGML_TYPE_F16 | g::GGML_TYPE_BF16 | g::GGML_TYPE_I32 => g::ggml_cast(self.ctx, t, g::GGML_TYPE_F32),
                _ if quantized(t) => self.dequantize(t)?,
                _ => return Err("the cpu backend computes with float or int32 arrays only (cast uint8 first)".into()),
            };
            Ok(self.cont(t))
        }
    }

    /// `t` as [`Graph::act`] makes it, with strides packed over every axis as ggml's scale asserts
    /// (see [`padded_1d`]); a copy only where that differs (other kernels take such views as they are).
    fn packed(&mut self, t: T) -> OpResult<T> {
        let t = self.act(t)?;
        // SAFETY: t belongs to this context.
        Ok(unsafe { if padded_1d(t) { t } else { g::ggml_cont(self.ctx, t) } })
    }

    /// `t` if it is a float type (ggml's copies convert between those, and read any layout), else as f32:
    /// what a copy into a float destination takes.
    fn float(&mut self, t: T) -> OpResult<T> {
        // SAFETY: t belongs to this context.
        let kept = unsafe { matches!((*t).type_, g::GGML_TYPE_F32 | g::GGML_TYPE_F16 | g::GGML_TYPE_BF16) };
        if kept { Ok(t) } else { self.act(t) }
    }

    /// Block-quantized rows as f32: ggml's row gather dequantizes what it picks, and here it picks all.
    unsafe fn dequantize(&mut self, t: T) -> OpResult<T> {
        if !g::ggml_is_contiguous(t) {
            return Err("block-quantized arrays are multiplied, gathered or read whole; this view of one cannot be computed".into());
        }
        let n = ne_of(t);
        let rows = n[1] * n[2] * n[3];
        let ids = self.own_data(g::GGML_TYPE_I32, &[rows, 1, 1, 1]);
        fused::write_positions(ids, 0);
        let flat = g::ggml_reshape_2d(self.ctx, t, n[0], rows);
        Ok(g::ggml_reshape_4d(self.ctx, g::ggml_get_rows(self.ctx, flat, ids), n[0], n[1], n[2], n[3]))
    }

    /// `t`, contiguous. ggml counts a view whose rows hold one element as contiguous whatever their stride
    /// (a transposed row), while its kernels assert the innermost stride is one element's size (aborting
    /// the process): such a view is copied too.
    fn cont(&self, t: T) -> T {
        // SAFETY: t belongs to this context.
        unsafe {
            let packed_rows = (*t).nb[0] == g::ggml_type_size((*t).type_);
            if g::ggml_is_contiguous(t) && packed_rows { t } else { g::ggml_cont(self.ctx, t) }
        }
    }

    fn repeat(&self, t: T, to: [i64; 4]) -> T {
        // SAFETY: callers only repeat to shapes that numpy broadcasting produced, which ggml can repeat to.
        unsafe { if ne_of(t) == to { t } else { g::ggml_repeat_4d(self.ctx, t, to[0], to[1], to[2], to[3]) } }
    }

    /// numpy `transpose(axes)` of a rank-`rank` array as a ggml permutation (a view).
    fn transpose(&self, t: T, axes: &[i32]) -> T {
        let rank = axes.len();
        let mut to = [0, 1, 2, 3];
        for (j, &axis) in axes.iter().enumerate() {
            to[rank - 1 - axis as usize] = (rank - 1 - j) as i32;
        }
        // SAFETY: `to` is a permutation of 0..4 (axes were checked to be a permutation of 0..rank).
        unsafe { g::ggml_permute(self.ctx, t, to[0], to[1], to[2], to[3]) }
    }

    fn op(&mut self, op: &Op, x: &[T], inputs: &[Array], node: &Array) -> OpResult<T> {
        let out = ne(&node.0.shape)?;
        let ctx = self.ctx;
        // SAFETY: every call below builds graph nodes from tensors of this context, with operand types and
        // layouts brought to what the kernel takes and shapes validated when the op was recorded.
        unsafe {
            Ok(match op {
                Op::MatMul => return self.matmul(x, inputs, out),
                Op::Add => self.binary(g::ggml_add, x, out, true)?,
                Op::Multiply => self.binary(g::ggml_mul, x, out, true)?,
                Op::Subtract => self.binary(g::ggml_sub, x, out, false)?,
                Op::Divide => self.binary(g::ggml_div, x, out, false)?,
                Op::Scale(s) => g::ggml_scale(ctx, self.packed(x[0])?, *s),
                Op::AddScalar(v) => g::ggml_scale_bias(ctx, self.packed(x[0])?, 1.0, *v),
                Op::Tanh => g::ggml_tanh(ctx, self.act(x[0])?),
                Op::Sigmoid => g::ggml_sigmoid(ctx, self.act(x[0])?),
                Op::Silu => g::ggml_silu(ctx, self.act(x[0])?),
                Op::GeluTanh => {
                    let a = self.act(x[0])?;
                    self.gelu_tanh(a)
                }
                Op::Cast => {
                    let source = if quantized(x[0]) { self.act(x[0])? } else { x[0] };
                    g::ggml_cast(ctx, source, ggml_type(node.0.dtype))
                }
                Op::Dequantize => self.act(x[0])?,
                Op::Reshape => {
                    let source = if quantized(x[0]) { self.act(x[0])? } else { self.cont(x[0]) };
                    g::ggml_reshape_4d(ctx, source, out[0], out[1], out[2], out[3])
                }
                Op::Transpose(axes) => self.transpose(x[0], axes),
                Op::Slice(ranges) => {
                    // ggml views step elements by the type size along ne[0]: a view whose innermost axis
                    // was permuted away is made contiguous first.
                    let source = if quantized(x[0]) {
                        self.act(x[0])?
                    } else if (*x[0]).nb[0] == g::ggml_type_size((*x[0]).type_) {
                        x[0]
                    } else {
                        g::ggml_cont(ctx, x[0])
                    };
                    let nb = (*source).nb;
                    let rank = ranges.len();
                    let offset: usize = ranges.iter().enumerate().map(|(axis, &(start, _))| start as usize * nb[rank - 1 - axis]).sum();
                    g::ggml_view_4d(ctx, source, out[0], out[1], out[2], out[3], nb[1], nb[2], nb[3], offset)
                }
                Op::SliceUpdate(ranges) if ranges.iter().any(|&(_, len)| len == 0) => self.act(x[0])?,
                Op::SliceUpdate(ranges) => {
                    let a = self.act(x[0])?;
                    let region = ne(&ranges.iter().map(|&(_, len)| len as i32).collect::<Vec<_>>())?;
                    let update = self.act(x[1])?;
                    let update = self.repeat(update, region);
                    let nb = (*a).nb;
                    let rank = ranges.len();
                    let offset: usize = ranges.iter().enumerate().map(|(axis, &(start, _))| start as usize * nb[rank - 1 - axis]).sum();
                    g::ggml_set(ctx, a, update, nb[1], nb[2], nb[3], offset)
                }
                Op::Concat(axis) => {
                    // Each part is copied into its place in one result: linear in the result's size, however
                    // many parts (a chain of pairwise joins would copy the growing prefix every time).
                    let dim = node.0.shape.len() - 1 - axis;
                    let joined = g::ggml_new_tensor(ctx, ggml_type(node.0.dtype), 4, out.as_ptr());
                    let nb = (*joined).nb;
                    let mut at = 0usize;
                    for (t, a) in x.iter().zip(inputs) {
                        if a.elements() == 0 {
                            continue;
                        }
                        let part = self.float(*t)?;
                        let n = ne_of(part);
                        let place = g::ggml_view_4d(ctx, joined, n[0], n[1], n[2], n[3], nb[1], nb[2], nb[3], at * nb[dim]);
                        self.expand(g::ggml_cpy(ctx, part, place));
                        at += n[dim] as usize;
                    }
                    joined
                }
                Op::TakeRows => {
                    let ids = g::ggml_reshape_1d(ctx, self.cont(x[1]), inputs[1].elements() as i64);
                    let picked = match self.repacked_rows(&inputs[0], ids)? {
                        Some(picked) => picked,
                        None => {
                            let rows = inputs[0].0.shape[0] as i64;
                            let row = inputs[0].elements() as i64 / rows.max(1);
                            g::ggml_get_rows(ctx, g::ggml_reshape_2d(ctx, self.cont(x[0]), row, rows), ids)
                        }
                    };
                    g::ggml_reshape_4d(ctx, picked, out[0], out[1], out[2], out[3])
                }
                Op::Softmax(axis) => {
                    let rank = node.0.shape.len();
                    if *axis == rank - 1 {
                        g::ggml_soft_max(ctx, self.act(x[0])?)
                    } else {
                        let mut swap: Vec<i32> = (0..rank as i32).collect();
                        swap.swap(*axis, rank - 1);
                        let moved = self.act(self.transpose(x[0], &swap))?;
                        self.transpose(g::ggml_soft_max(ctx, moved), &swap)
                    }
                }
                Op::RmsNorm(eps) => g::ggml_mul(ctx, g::ggml_rms_norm(ctx, self.act(x[0])?, *eps), self.act(x[1])?),
                Op::Rope(p) => {
                    let a = self.act(x[0])?;
                    self.rope(a, *p)
                }
                Op::Attention { scale, mask } => self.attention(x, inputs, *scale, *mask)?,
                Op::Conv1dDepthwise => {
                    let a = self.act(x[0])?;
                    let x_t = self.cont(g::ggml_permute(ctx, a, 1, 0, 2, 3));
                    g::ggml_ssm_conv(ctx, x_t, self.act(x[1])?)
                }
            })
        }
    }

    /// numpy a [.., M, K] @ b [.., K, N] as ggml's mul_mat(A [K, N], B [K, M]) -> [N, M]. When b is the
    /// transposed view of a matrix (how adapters hold linear weights), that matrix is A as stored.
    unsafe fn matmul(&mut self, x: &[T], inputs: &[Array], out: [i64; 4]) -> OpResult<T> {
        let ctx = self.ctx;
        let stored = match &*inputs[1].state() {
            State::Pending(op, src) => stored_transpose(op, src),
            State::Ready(_) => None,
        };
        let a = self.act(x[0])?;
        let k = ne_of(a)[0];
        let a = self.repeat(a, [k, out[1], out[2], out[3]]);
        let weight = match stored {
            // One row of activations (a decode step): ggml's AMX product then runs its AVX-512 VNNI
            // kernel. More rows would run its tile kernel, which faults in some virtual machines (see
            // `packed.rs`), so those products read the weight as stored.
            Some(w) if out[1] == 1 && out[2] == 1 && out[3] == 1 && g::ggml_is_contiguous(a) => match self.repacked_leaf(&w)? {
                Some(t) => return Ok(g::ggml_mul_mat(ctx, t, a)),
                None => self.leaf(&w)?,
            },
            Some(w) => self.leaf(&w)?,
            _ => {
                let b = self.act(x[1])?;
                g::ggml_cont(ctx, g::ggml_permute(ctx, b, 1, 0, 2, 3))
            }
        };
        let weight = match (*weight).type_ {
            g::GGML_TYPE_I32 | g::GGML_TYPE_I8 => self.act(weight)?,
            _ => weight,
        };
        if residual::rounds_activations_to_q8_k((*weight).type_) {
            return Ok(self.k_quant_product(weight, a));
        }
        Ok(g::ggml_mul_mat(ctx, weight, a))
    }

    /// A deferred transposed weight's view, for a reader other than its product.
    fn transposed_leaf(&mut self, a: &Array) -> OpResult<T> {
        let source = match &*a.state() {
            State::Pending(op, inputs) => stored_transpose(op, inputs),
            State::Ready(_) => None,
        };
        let source = source.ok_or("the cpu backend lost a deferred transpose")?;
        let leaf = self.leaf(&source)?;
        Ok(self.transpose(leaf, &[1, 0]))
    }

    /// An elementwise op with numpy broadcasting: ggml repeats the second operand only.
    unsafe fn binary(&mut self, f: unsafe extern "C" fn(*mut g::ggml_context, T, T) -> T, x: &[T], out: [i64; 4], commutes: bool) -> OpResult<T> {
        let (a, b) = (self.act(x[0])?, self.act(x[1])?);
        Ok(if ne_of(a) == out && g::ggml_can_repeat(b, a) {
            f(self.ctx, a, b)
        } else if commutes && ne_of(b) == out && g::ggml_can_repeat(a, b) {
            f(self.ctx, b, a)
        } else {
            f(self.ctx, self.repeat(a, out), b)
        })
    }
}
