//! Products that read their weights repacked for ggml's AMX kernels (see `cpu/packed.rs`): the tensor
//! a product reads, and pointing a kept graph's leaves at a later evaluation's data.

use super::{ne, ne_of, Array, Buffer, Graph, OpResult, T};
use llama_cpp_sys_2 as g;
use std::sync::Arc;

impl Graph {
    /// Whether `buffer` can be what leaf `t` of a kept graph reads: at least its bytes, or for a product's
    /// repacked weight, a repacked copy of its type and dims.
    pub(super) fn leaf_fits(t: T, buffer: &Buffer) -> bool {
        // SAFETY: reads of a live tensor header.
        unsafe {
            match (*t).buffer.is_null() {
                true => buffer.bytes().len() >= g::ggml_nbytes(t),
                false => buffer.packed((*t).type_, ne_of(t)).is_some(),
            }
        }
    }

    /// Points leaf `t` of a kept graph at `buffer`, which [`Graph::leaf_fits`].
    ///
    /// SAFETY: `t` is a tensor of a kept graph and `buffer` is held until the graph is done.
    pub(super) unsafe fn bind_leaf(t: T, buffer: &Buffer) {
        unsafe {
            if (*t).buffer.is_null() {
                (*t).data = buffer.ptr();
            } else if let Some(repacked) = buffer.packed((*t).type_, ne_of(t)) {
                repacked.point(t);
            }
        }
    }

    /// A stored weight as ggml's AMX product reads it, repacked (see `packed.rs`); None where it is
    /// not repacked. A tensor of its own beside the weight's [`Graph::leaf`], which other readers (a
    /// gather from a tied embedding) read as stored; bound to the same leaf number.
    pub(super) fn repacked_leaf(&mut self, w: &Array) -> OpResult<Option<T>> {
        let key = Arc::as_ptr(&w.0);
        if let Some(&t) = self.repacked.get(&key) {
            return Ok(Some(t));
        }
        let (Some(ty), Some(buffer)) = (w.0.blocks, w.buffer()) else { return Ok(None) };
        let dims = ne(&w.0.shape)?;
        let Some(repacked) = buffer.packed(ty, dims) else { return Ok(None) };
        // SAFETY: a tensor header of the weight's type and dims in the context, pointed at the repacked
        // copy (`is` those), which the held buffer keeps alive while the graph computes; only the product
        // reads it.
        let t = unsafe {
            let t = g::ggml_new_tensor(self.ctx, ty, 4, dims.as_ptr());
            repacked.point(t);
            t
        };
        self.held.push(buffer);
        self.repacked.insert(key, t);
        match self.leaf_number.get(&key) {
            Some(&n) => self.bindings.leaves.push((n, t)),
            None => self.bindings.complete = false,
        }
        Ok(Some(t))
    }
}
