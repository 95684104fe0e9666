//! A lowered graph's results: which tensors are written straight into buffers of their own, computing the
//! graph, and making its results the nodes' data.

use super::{Graph, HashMap, HashSet, Kept, Runner, T};
use crate::host::tensor::cpu::{Array, Buffer, Node, State};
use crate::host::tensor::OpResult;
use llama_cpp_sys_2 as g;
use std::sync::Arc;

/// Kept state at least this large gets a mapping of its own, which grows without copies (small state
/// stays in the heap, where a mapping per token would cost page faults).
const GROWABLE_STATE: usize = 64 << 10;

/// A result of the graph: the order's node, its tensor, and, when the result is written straight into a
/// buffer of its own, the tensor whose memory that is and whether the buffer should be growable.
pub(super) struct Output {
    pub(super) node: usize,
    out: T,
    own: Option<(T, bool)>,
}

/// The tensor whose memory `t` is: the source of a view that is all of it in the same order (a reshape
/// of a contiguous result), else `t` itself.
///
/// # Safety
/// `t` is a tensor of a live context.
unsafe fn whole_source(t: T) -> T {
    // SAFETY: per the contract above; a view's source belongs to the same context.
    unsafe {
        let source = (*t).view_src;
        let whole = !source.is_null()
            && (*t).view_offs == 0
            && (*source).type_ == (*t).type_
            && g::ggml_nbytes(source) == g::ggml_nbytes(t)
            && g::ggml_is_contiguous(source)
            && g::ggml_is_contiguous(t);
        if whole { source } else { t }
    }
}

impl Graph {
    /// Makes the results and kept state among `order`'s lowered nodes outputs of the graph.
    pub(super) fn mark_outputs(&mut self, order: &[Array], keep: &[Kept], lowered: &HashMap<*const Node, T>) {
        // Results sharing memory (a result and a reshape of it) are written once, into the first one's.
        let mut claimed: HashSet<T> = HashSet::default();
        for (i, (node, &kept)) in order.iter().zip(keep).enumerate() {
            // (Empty results are data already.)
            if let (Kept::Result | Kept::State, Some(&t)) = (kept, lowered.get(&Arc::as_ptr(&node.0))) {
                // SAFETY: graph construction over tensors of this context.
                let out = unsafe { if g::ggml_is_contiguous(t) { t } else { g::ggml_cont(self.ctx, t) } };
                // An op's result is written straight into the buffer that keeps it (no copy afterwards),
                // also through a reshape (the logits of every step are one); a view of data already held
                // is copied out.
                // SAFETY: as above.
                let own = unsafe {
                    g::ggml_set_output(out);
                    self.expand(out);
                    let memory = whole_source(out);
                    // Larger state kept past the graph is a cache (a prompt's first chunk, or one cut back
                    // to its window) that will grow in place: it starts where it can.
                    let growable = kept == Kept::State && g::ggml_nbytes(memory) >= GROWABLE_STATE;
                    let free = (*memory).view_src.is_null() && (*memory).data.is_null() && claimed.insert(memory);
                    free.then_some((memory, growable))
                };
                self.outputs.push(Output { node: i, out, own });
            }
        }
    }

    /// Computes the lowered (or patched) graph and makes its outputs the nodes' data. `placed`: the
    /// graph's intermediates are where the allocator put them for its last computation.
    pub(super) fn finish(&mut self, runner: &mut Runner, order: &[Array], placed: bool) -> OpResult<()> {
        let buffers = self.compute(runner, placed, |i| order[i].elements() * order[i].0.dtype.size())?;
        for (output, buffer) in self.outputs.iter().zip(buffers) {
            *order[output.node].state() = State::Ready(buffer);
        }
        Ok(())
    }

    /// Computes the graph and returns each output's data, in the order of [`Graph::outputs`]. `bytes`:
    /// the size of the order's node `i`.
    pub(super) fn compute(&mut self, runner: &mut Runner, placed: bool, bytes: impl Fn(usize) -> usize) -> OpResult<Vec<Arc<Buffer>>> {
        let mut own = Vec::with_capacity(self.outputs.len());
        for output in &self.outputs {
            own.push(output.own.map(|(memory, growable)| {
                // SAFETY: memory is a tensor of this graph; its data now points at the new buffer, which
                // lives until it becomes the node's data below.
                unsafe {
                    let bytes = g::ggml_nbytes(memory);
                    let buffer = if growable { Buffer::growable(bytes) } else { Buffer::for_result(bytes) };
                    (*memory).data = buffer.ptr();
                    buffer
                }
            }));
        }
        // Views of memory the allocator does not own (leaves, appended caches, results written into their
        // own buffers) point into it from here: ggml set some when they were made, before that memory was
        // known or when it was an earlier evaluation's.
        // SAFETY: every node belongs to this graph; view_offs lies within the viewed tensor.
        unsafe {
            for i in 0..g::ggml_graph_n_nodes(self.graph) {
                let t = g::ggml_graph_node(self.graph, i);
                let source = (*t).view_src;
                if !source.is_null() && !(*source).data.is_null() && (*source).buffer.is_null() {
                    (*t).data = (*source).data.cast::<u8>().add((*t).view_offs).cast();
                }
            }
        }
        let result = runner.compute(self.graph, placed).and_then(|()| self.results(own, bytes));
        // A prompt's product read a repacked weight as stored, bringing its pages of the file back: the
        // repacked copy stands in for them in memory (see `packed.rs`), so they are handed back again
        // (only where a leaf read the weight as stored).
        for buffer in &self.held {
            buffer.release_repacked_pages();
        }
        // Nothing of this evaluation stays with a graph that may be kept: the maps are keyed by nodes
        // whose addresses later nodes may reuse.
        self.held.clear();
        self.appended.clear();
        result
    }

    fn results(&mut self, own: Vec<Option<Buffer>>, expected: impl Fn(usize) -> usize) -> OpResult<Vec<Arc<Buffer>>> {
        let mut buffers = Vec::with_capacity(own.len());
        for (output, own) in self.outputs.iter().zip(own) {
            let appended = self.appended.remove(&output.node);
            // SAFETY: after compute, out's data holds ggml_nbytes(out) bytes.
            let bytes = unsafe { std::slice::from_raw_parts((*output.out).data as *const u8, g::ggml_nbytes(output.out)) };
            if appended.is_none() && bytes.len() != expected(output.node) {
                return Err("the cpu backend produced a result of the wrong size".into());
            }
            buffers.push(match (appended, own) {
                (Some(appended), _) => appended,
                (None, Some(own)) => Arc::new(own),
                (None, None) => Arc::new(Buffer::from_bytes(bytes)),
            });
        }
        Ok(buffers)
    }
}
