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
                buffer.reading_as_stored();
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

/// ggml's AMX layout of Q8_0 weights (`ggml-cpu/amx/mmq.cpp`, `pack_B`): tiles of 16 rows by one
/// 32-value block, each 512 bytes of values, 16 f16 scales, 16 i32 sums. The values are stored 4 at a
/// time, rows 0-7 then rows 8-15 of each 4-value group side by side. `tests::gathered_rows_of_a_repacked_
/// table_are_its_stored_rows` holds this to ggml's own packing, bit for bit.
const TILE_ROWS: usize = 16;
const TILE_BYTES: usize = 512 + TILE_ROWS * 2 + TILE_ROWS * 4;

impl Graph {
    /// Rows `ids` of a Q8_0 table [rows, row] as f32, gathered from its repacked copy (see `packed.rs`):
    /// once a tied embedding is repacked, its gather no longer reads the file, whose page cache may hand
    /// a fault whole large folios (~0.5 MB a row measured) rather than the row. None where the table is
    /// not a Q8_0 weight that can be repacked; it is repacked here if it was not yet.
    pub(super) fn repacked_rows(&mut self, table: &Array, ids: T) -> OpResult<Option<T>> {
        // SAFETY: reads of a tensor header of this context.
        let ids_ok = unsafe { (*ids).type_ == g::GGML_TYPE_I32 && g::ggml_is_contiguous(ids) };
        if table.0.blocks != Some(g::GGML_TYPE_Q8_0) || table.0.shape.len() != 2 || !ids_ok {
            return Ok(None);
        }
        let Some(packed) = self.repacked_leaf(table)? else { return Ok(None) };
        let mut args = [packed, ids];
        // SAFETY: a custom node of this context over two of its tensors.
        let rows = unsafe {
            let ne = ne_of(packed);
            g::ggml_custom_4d(self.ctx, g::GGML_TYPE_F32, ne[0], g::ggml_nelements(ids), 1, 1, args.as_mut_ptr(), 2, Some(gather_rows), -1, std::ptr::null_mut())
        };
        Ok(Some(rows))
    }
}

/// ggml calls this on each of `nth` threads for `dst` [row, n] f32 from [`Graph::repacked_rows`]'s
/// repacked table and its n i32 ids; thread `ith` takes the ith of `nth` runs of the ids. An id outside
/// the table (the host's gather checks refuse them first) leaves its row zero.
unsafe extern "C" fn gather_rows(dst: *mut g::ggml_tensor, ith: i32, nth: i32, _: *mut std::ffi::c_void) {
    // SAFETY: src[0] is a repacked Q8_0 table of ne[1] rows of ne[0] values (its data ggml's layout of
    // exactly that, `Packed::is`), src[1] n contiguous i32, dst n contiguous rows of ne[0] f32; threads
    // write disjoint rows.
    unsafe {
        let (table, ids) = ((*dst).src[0], (*dst).src[1]);
        let [row, rows, ..] = ne_of(table).map(|n| n as usize);
        let blocks = row / 32;
        let packed = std::slice::from_raw_parts((*table).data as *const u8, rows * blocks * TILE_BYTES / TILE_ROWS);
        let n = g::ggml_nelements(ids) as usize;
        let ids = std::slice::from_raw_parts((*ids).data as *const i32, n);
        let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, n * row);
        for i in super::fused::thread_share(n, ith, nth) {
            let out = &mut out[i * row..][..row];
            let Some(r) = usize::try_from(ids[i]).ok().filter(|&r| r < rows) else {
                out.fill(0.0);
                continue;
            };
            let (tile_row, within) = (r / TILE_ROWS, r % TILE_ROWS);
            for b in 0..blocks {
                let tile = &packed[(tile_row * blocks + b) * TILE_BYTES..][..TILE_BYTES];
                let scale = half::f16::from_le_bytes([tile[512 + 2 * within], tile[513 + 2 * within]]).to_f32();
                for (v, value) in out[b * 32..][..32].iter_mut().enumerate() {
                    let q = tile[(v / 4) * 64 + (within / 8) * 32 + (within % 8) * 4 + v % 4] as i8;
                    *value = q as f32 * scale;
                }
            }
        }
    }
}
