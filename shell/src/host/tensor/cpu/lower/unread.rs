//! Results dropped unread: a long prompt is computed in chunks, and every chunk but the last returns
//! logits nobody reads (the contract always returns some). Computing them would run the output head, ~5 %
//! of a 128-token chunk of Gemma 3 270M; only what the chunk leaves in the cache is needed.

use super::{cheap_views, compute, pending_order, Kept, References};
use crate::host::tensor::cpu::Array;
use crate::host::tensor::OpResult;
use std::sync::Arc;

/// Drops `root` unread, first computing the pending nodes of its graph that others hold: the state
/// (a cache's new rows) that computing `root` would have kept.
pub(in crate::host::tensor::cpu) fn discard(root: Array) -> OpResult<()> {
    let order = pending_order(&[&root])?;
    let references = References::of(&order);
    let cheap_view = cheap_views(&order, &references);
    let held_by_others = |&(i, node): &(usize, &Array)| {
        !Arc::ptr_eq(&node.0, &root.0) && !cheap_view[i] && Arc::strong_count(&node.0) > 1 + references.internal[i]
    };
    let held: Vec<Array> = order.iter().enumerate().filter(held_by_others).map(|(_, node)| node.clone()).collect();
    drop((order, root)); // what only `root` needed is freed here, never computed
    compute(&held.iter().collect::<Vec<_>>(), Kept::State)
}

#[cfg(test)]
mod tests {
    use super::super::runner::last_ops;
    use crate::host::tensor::cpu::{Array, CpuBackend};
    use crate::host::tensor::Backend;
    use llama_cpp_sys_2 as g;

    /// A "cache" and a product only the dropped result needs, as a chunk's new rows and its logits head.
    fn chunk() -> (Array, Array) {
        let cpu = CpuBackend;
        let x = cpu.from_f32(&(0..32).map(|i| i as f32).collect::<Vec<_>>(), &[4, 8]).unwrap();
        let w = cpu.from_f32(&(0..128).map(|i| (i % 7) as f32).collect::<Vec<_>>(), &[16, 8]).unwrap();
        let cache = cpu.scale(&x, 2.0).unwrap();
        let hidden = cpu.add_scalar(&cache, 1.0).unwrap();
        let logits = cpu.matmul(&hidden, &cpu.transpose(&w, &[1, 0]).unwrap()).unwrap();
        (cache, logits)
    }

    #[test]
    fn a_discarded_result_computes_what_others_hold_and_nothing_only_it_needs() {
        let (cache, logits) = chunk();
        CpuBackend.discard(logits).unwrap();
        let ops = last_ops();
        assert!(ops.contains(&g::GGML_OP_SCALE), "the held state was computed: {ops:?}");
        assert!(!ops.contains(&g::GGML_OP_MUL_MAT), "the product only the dropped result needed was computed: {ops:?}");
        assert!(cache.buffer().is_some(), "the held state is data now");
        let doubled: Vec<f32> = (0..32).map(|i| 2.0 * i as f32).collect();
        assert_eq!(CpuBackend.read_f32(&cache).unwrap(), doubled);

        // The same graph read: its product is computed.
        let (_cache, logits) = chunk();
        CpuBackend.read_f32(&logits).unwrap();
        assert!(last_ops().contains(&g::GGML_OP_MUL_MAT));
    }
}
