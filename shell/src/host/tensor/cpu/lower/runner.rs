//! The process-wide compute resources ggml graphs run on: one thread pool, one graph allocator, one work
//! buffer, and two contexts for tensor headers, reset for each graph (a fresh one per token cost a mapping
//! and page faults): one may hold the graph kept for reuse (`reuse.rs`) while the other builds the next.

use super::super::kernels::{kernels, Kernels};
use llama_cpp_sys_2 as g;
use std::sync::{Mutex, OnceLock};

/// Graphs of up to this many tensor headers (a decode step or a prefill of some thousand tokens) use the
/// runner's context; a larger one gets a context of its own, freed after it.
const REUSED_CONTEXT_TENSORS: usize = 1 << 16;
/// Allocator buffers smaller than this are kept whatever the graph. (A prompt chunk of Gemma 3 270M
/// leaves 3.8 MB, of which a decode step's graph uses under 1.8: kept, it held 3 MB for nothing.)
const SHRINK_ALLOCATOR_ABOVE: usize = 1 << 20;

pub(super) struct Runner {
    /// ggml's kernels for this processor.
    kernels: &'static Kernels,
    pool: *mut g::ggml_threadpool,
    threads: i32,
    allocator: g::ggml_gallocr_t,
    work: Vec<u64>,
    /// Room for [`REUSED_CONTEXT_TENSORS`] tensor headers each (null until first used).
    headers: [*mut g::ggml_context; 2],
    /// The graph computed last: its intermediates still have the places the allocator gave them, and
    /// `plan` is its plan (how many threads each node takes, the work buffer's size).
    last: *mut g::ggml_cgraph,
    plan: Option<g::ggml_cplan>,
    /// The last graph lowered, kept for an evaluation of the same structure (`reuse.rs`).
    pub(super) kept: Option<super::reuse::KeptGraph>,
}

// SAFETY: the pool and allocator are only used under the runner's mutex.
unsafe impl Send for Runner {}

/// The process's runner, or why the cpu backend cannot run here (its kernels are missing).
pub(super) fn runner() -> Result<&'static Mutex<Runner>, String> {
    static RUNNER: OnceLock<Mutex<Runner>> = OnceLock::new();
    let kernels = kernels()?;
    Ok(RUNNER.get_or_init(|| Mutex::new(Runner::new(kernels, threads()))))
}

/// Compute threads: EDGECHAT_THREADS, else every core the process may use.
pub fn threads() -> i32 {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    std::env::var("EDGECHAT_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(cores).clamp(1, 256) as i32
}

/// ggml's own messages go to our log, not to the terminal.
unsafe extern "C" fn log(level: g::ggml_log_level, text: *const std::ffi::c_char, _: *mut std::ffi::c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy();
    match level {
        g::GGML_LOG_LEVEL_ERROR => tracing::error!(target: "ggml", "{}", text.trim_end()),
        g::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "ggml", "{}", text.trim_end()),
        _ => tracing::debug!(target: "ggml", "{}", text.trim_end()),
    }
}

impl Runner {
    pub(super) fn new(kernels: &'static Kernels, threads: i32) -> Runner {
        // SAFETY: plain constructors (the kernels' module ran ggml_cpu_init when it was chosen).
        unsafe {
            g::ggml_log_set(Some(log), std::ptr::null_mut());
            let mut params = g::ggml_threadpool_params_default(threads);
            let pool = (kernels.threadpool_new)(&mut params);
            let allocator = g::ggml_gallocr_new((kernels.buffer_type)());
            let headers = [std::ptr::null_mut(); 2];
            Runner { kernels, pool, threads, allocator, work: Vec::new(), headers, last: std::ptr::null_mut(), plan: None, kept: None }
        }
    }

    /// An empty context with room for `tensors` headers and a graph of them, and whether it is the
    /// caller's own to free (a very large graph's) or the runner's, reset (never `busy`, the kept graph's).
    pub(super) fn context(&mut self, tensors: usize, busy: *mut g::ggml_context) -> Result<(*mut g::ggml_context, bool), String> {
        // SAFETY: sizes come from ggml's own overhead functions; no_alloc keeps data out of the context.
        // A reset context is empty again; nothing of an earlier graph is used after its evaluation.
        unsafe {
            let init = |tensors: usize| {
                let mem = g::ggml_tensor_overhead() * tensors + g::ggml_graph_overhead_custom(tensors, false) + (1 << 16);
                let ctx = g::ggml_init(g::ggml_init_params { mem_size: mem, mem_buffer: std::ptr::null_mut(), no_alloc: true });
                if ctx.is_null() { Err("ggml could not allocate a graph context".to_owned()) } else { Ok(ctx) }
            };
            if tensors > REUSED_CONTEXT_TENSORS {
                return Ok((init(tensors)?, true));
            }
            let slot = usize::from(!busy.is_null() && self.headers[0] == busy);
            if self.headers[slot].is_null() {
                self.headers[slot] = init(REUSED_CONTEXT_TENSORS)?;
            }
            g::ggml_reset(self.headers[slot]);
            Ok((self.headers[slot], false))
        }
    }

    /// Whether `graph` was the last one computed, so its intermediates' places are still its own.
    pub(super) fn computed_last(&self, graph: *mut g::ggml_cgraph) -> bool {
        !graph.is_null() && self.last == graph
    }

    /// Places the graph's intermediates (unless `placed`: it was the last graph computed) and computes it
    /// on the pool.
    pub(super) fn compute(&mut self, graph: *mut g::ggml_cgraph, placed: bool) -> Result<(), String> {
        // SAFETY: the graph is complete; the allocator places every intermediate (or placed them for this
        // same graph last time, and nothing was placed since); the work buffer is sized by ggml's plan and
        // outlives the call.
        unsafe {
            let placed = placed && self.computed_last(graph);
            self.last = std::ptr::null_mut();
            if !placed {
                self.plan = None;
                self.fit_allocator(graph);
                if !g::ggml_gallocr_alloc_graph(self.allocator, graph) {
                    return Err("ggml could not allocate memory for the graph".into());
                }
            }
            // A graph computed again as it was (a kept graph) plans as it did: ~0.1 ms a decode step.
            let mut plan = match self.plan.take() {
                Some(plan) if placed => plan,
                _ => (self.kernels.graph_plan)(graph, self.threads, self.pool),
            };
            if plan.work_size > self.work.len() * 8 {
                self.work = vec![0u64; plan.work_size.div_ceil(8)];
            }
            plan.work_data = self.work.as_mut_ptr().cast();
            let status = (self.kernels.graph_compute)(graph, &mut plan);
            if status != g::GGML_STATUS_SUCCESS {
                return Err(format!("ggml failed to compute the graph (status {status})"));
            }
            self.last = graph;
            self.plan = Some(plan);
            #[cfg(test)]
            LAST_OPS.with(|ops| *ops.borrow_mut() = (0..g::ggml_graph_n_nodes(graph)).map(|i| (*g::ggml_graph_node(graph, i)).op).collect());
        }
        Ok(())
    }

    /// ggml's allocator keeps the largest buffer any graph needed. A prompt's chunk needs one for hundreds
    /// of rows (17 MB for Gemma 3 270M); the decode steps after it use a few of its pages, and the rest
    /// would stay resident beside the growing caches. So when `graph` could not use half the buffer even
    /// if nothing in it shared memory, the allocator starts over at this graph's size.
    ///
    /// # Safety
    /// `graph` is a complete graph whose tensors belong to a live context.
    unsafe fn fit_allocator(&mut self, graph: *mut g::ggml_cgraph) {
        // SAFETY: per the contract above; the allocator is ours and nothing placed by it outlives a graph.
        unsafe {
            let held = g::ggml_gallocr_get_buffer_size(self.allocator, 0);
            if held < SHRINK_ALLOCATOR_ABOVE {
                return;
            }
            let mut needed = 0usize;
            for i in 0..g::ggml_graph_n_nodes(graph) {
                let t = g::ggml_graph_node(graph, i);
                if (*t).view_src.is_null() && (*t).data.is_null() {
                    needed = needed.saturating_add(g::ggml_nbytes(t));
                }
            }
            if needed < held / 2 {
                g::ggml_gallocr_free(self.allocator);
                self.allocator = g::ggml_gallocr_new((self.kernels.buffer_type)());
                super::super::buffer::heap_hole_left();
            }
        }
    }
}

#[cfg(test)]
thread_local! {
    /// The ops of the graph this thread computed last.
    static LAST_OPS: std::cell::RefCell<Vec<g::ggml_op>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The ops of the graph this thread computed last (tests run side by side on the one pool).
#[cfg(test)]
pub(super) fn last_ops() -> Vec<g::ggml_op> {
    LAST_OPS.with(|ops| ops.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::super::{Array, Buffer, Graph, Kept, Op, References, Structure};
    use super::*;
    use crate::host::tensor::DType;

    /// x * x + x over `rows` rows of 1024 ones, through `runner`: x * x is an intermediate the allocator places.
    fn square_plus(runner: &mut Runner, rows: i32) -> Vec<f32> {
        let shape = vec![rows, 1024];
        let ones: Vec<u8> = (0..rows * 1024).flat_map(|_| 1f32.to_le_bytes()).collect();
        let x = Array::ready(shape.clone(), DType::F32, Buffer::from_bytes(&ones));
        let square = Array::pending(shape.clone(), DType::F32, Op::Multiply, vec![x.clone(), x.clone()]);
        let sum = Array::pending(shape, DType::F32, Op::Add, vec![square.clone(), x]);
        let order = [square, sum.clone()];
        let keep = [Kept::No, Kept::Result];
        let structure = Structure::of(&order, &keep, &References::of(&order));
        Graph::new(runner, order.len(), 4, &structure).unwrap().run(runner, &order, &keep).unwrap();
        let bytes = sum.buffer().expect("computed");
        bytes.bytes().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    #[test]
    fn the_allocator_lets_go_of_a_prompt_sized_buffer_when_graphs_get_small() {
        let mut runner = Runner::new(kernels().unwrap(), 1);
        // SAFETY: a size query on the runner's live allocator.
        let held = |runner: &Runner| unsafe { g::ggml_gallocr_get_buffer_size(runner.allocator, 0) };
        assert!(square_plus(&mut runner, 2048).iter().all(|&v| v == 2.0));
        assert!(held(&runner) >= 8 << 20, "an 8 MiB intermediate was placed");
        assert!(square_plus(&mut runner, 1).iter().all(|&v| v == 2.0));
        assert!(held(&runner) < 1 << 20, "a one-row graph runs in a fresh, small buffer ({} bytes held)", held(&runner));
        assert!(square_plus(&mut runner, 2048).iter().all(|&v| v == 2.0));
    }
}
