//! Weights repacked for ggml's AMX kernels.
//!
//! On processors with AMX (Intel Xeon from Sapphire Rapids on), ggml's CPU module has a buffer type of
//! its own ("AMX", `ggml-cpu/amx`) whose Q4_0, Q4_1 and Q8_0 weights are laid out in tiles. A product
//! with one row of activations (a decode step's) then takes 64 weight rows at once with AVX-512 VNNI,
//! where ggml's plain product calls a dot product per row: Gemma 3's 262144×640 Q8_0 output head, half
//! of a decode step, went from 18.8 ms to 8.6 ms a product on 2 threads (docs/benchmarks.md).
//!
//! Products with more rows would run ggml's AMX tile kernel, which is not safe to run everywhere: in a
//! virtual machine we measured on (a Sapphire Rapids guest whose XCR0 and `arch_prctl` both grant the
//! tile state), ggml's tile product, called from a small C program, stopped the process with an
//! invalid-instruction fault at its first `tileloadd`. So only one-row products read repacked weights
//! (`Graph::matmul`), and those run AVX-512 VNNI instructions only.
//!
//! llama.cpp puts weights in this buffer type too, but not a head tied to the embedding: the embedding's
//! gather reads the blocks as stored. Here the gather reads its rows from the repacked copy too
//! (`lower/repacked.rs`), and a prompt's products with more rows read the file's mapped blocks. Each run
//! of rows hands its pages of the file back once it is repacked, and the pages a prompt's product reads
//! back are handed back after its evaluation, so the copy takes the file's place in memory rather than
//! adding to it. It is larger by a 4-byte sum per 32-value block (Q8_0: 38 bytes
//! where the file has 34; Gemma 3 270M's head, 190 MiB for 170).
//!
//! The activations are rounded to the same Q8_0/Q8_1 blocks as in ggml's plain product, so only the
//! order of the sums changes. K-quant weights are not repacked: their products take the residual path
//! (`lower/residual.rs`), which hands ggml activations already rounded, and ggml's AMX kernels take f32.

use super::kernels::kernels;
use llama_cpp_sys_2 as g;
use std::ops::Range;

/// ggml's tiles hold 16 weight rows of 32 values, and its one-row product takes rows in pairs of tiles.
const ROWS_TOGETHER: i64 = 32;
const VALUES_TOGETHER: i64 = 32;
/// Rows repacked at a time before their pages of the file are handed back.
const RUN_ROWS: i64 = 4096;
/// Weights with fewer rows are left as stored. A small matrix gains little from the tile layout, and
/// a prompt chunk's products read it as stored anyway, so during a prompt it was held twice: Gemma 3
/// 270M's nine 256-row Q8_0 value projections held 1.75 MB repacked beside their 1.56 MB of file
/// pages, at the moment of the run's peak RSS. Decode speed did not change measurably without them.
const FEWEST_ROWS: i64 = 4096;

/// A weight in ggml's AMX layout, in a buffer of ggml's AMX buffer type.
pub(super) struct Packed {
    buffer: g::ggml_backend_buffer_t,
    /// ggml's tensor traits for the buffer type (what its products dispatch on).
    extra: *mut std::ffi::c_void,
    /// The type and dims it was packed as: a product reads it only as exactly these.
    ty: u32,
    ne: [i64; 4],
}

// SAFETY: the buffer is written once, while packing, and only read after; ggml's buffer functions are
// not tied to a thread.
unsafe impl Send for Packed {}
unsafe impl Sync for Packed {}

impl Drop for Packed {
    fn drop(&mut self) {
        // SAFETY: the buffer was allocated for this weight alone and is freed once.
        unsafe { g::ggml_backend_buffer_free(self.buffer) }
    }
}

/// Whether a product with a weight of this type and dims (as ggml's ne) can read it repacked: a 2-d
/// Q4_0, Q4_1 or Q8_0 matrix of whole tiles and at least [`FEWEST_ROWS`] rows, on a processor and
/// module with AMX.
pub(super) fn packable(ty: u32, ne: [i64; 4]) -> bool {
    let types = matches!(ty, g::GGML_TYPE_Q4_0 | g::GGML_TYPE_Q4_1 | g::GGML_TYPE_Q8_0);
    let dims = ne[0] > 0 && ne[1] >= FEWEST_ROWS && ne[0] % VALUES_TOGETHER == 0 && ne[1] % ROWS_TOGETHER == 0 && ne[2] == 1 && ne[3] == 1;
    types && dims && kernels().is_ok_and(|k| k.amx.is_some())
}

impl Packed {
    /// `bytes`, a weight of `ty` and dims `ne` as stored, repacked (None where it cannot be: see
    /// [`packable`], or no memory). `done` is told each range of `bytes` once it has been repacked.
    pub(super) fn new(ty: u32, ne: [i64; 4], bytes: &[u8], mut done: impl FnMut(Range<usize>)) -> Option<Packed> {
        if !packable(ty, ne) {
            return None;
        }
        let amx = kernels().ok()?.amx?.0;
        let [k, n, ..] = ne;
        let runs = (n as usize).div_ceil(RUN_ROWS as usize);
        // SAFETY: a context of tensor headers only (no_alloc), freed below; every tensor is placed inside
        // the buffer allocated for the whole weight (sizes are ggml's own for its layout, the same for each
        // row), and each run reads `row_bytes` * rows of `bytes`, whose length is checked first.
        unsafe {
            let row_bytes = g::ggml_row_size(ty, k);
            if bytes.len() != row_bytes * n as usize {
                return None;
            }
            let params = g::ggml_init_params { mem_size: (runs + 1) * g::ggml_tensor_overhead(), mem_buffer: std::ptr::null_mut(), no_alloc: true };
            let ctx = g::ggml_init(params);
            if ctx.is_null() {
                return None;
            }
            let whole = g::ggml_new_tensor_2d(ctx, ty as g::ggml_type, k, n);
            let size = g::ggml_backend_buft_get_alloc_size(amx, whole);
            let buffer = g::ggml_backend_buft_alloc_buffer(amx, size);
            if buffer.is_null() || size % n as usize != 0 {
                if !buffer.is_null() {
                    g::ggml_backend_buffer_free(buffer);
                }
                g::ggml_free(ctx);
                return None;
            }
            let base = g::ggml_backend_buffer_get_base(buffer).cast::<u8>();
            let packed_row = size / n as usize;
            g::ggml_backend_tensor_alloc(buffer, whole, base.cast());
            let extra = (*whole).extra;
            for first in (0..n).step_by(RUN_ROWS as usize) {
                let rows = RUN_ROWS.min(n - first);
                let run = g::ggml_new_tensor_2d(ctx, ty as g::ggml_type, k, rows);
                g::ggml_backend_tensor_alloc(buffer, run, base.add(first as usize * packed_row).cast());
                let from = first as usize * row_bytes..(first + rows) as usize * row_bytes;
                g::ggml_backend_tensor_set(run, bytes[from.clone()].as_ptr().cast(), 0, from.len());
                done(from);
            }
            g::ggml_free(ctx);
            Some(Packed { buffer, extra, ty, ne })
        }
    }

    /// Whether this is the weight a product of this type and dims reads.
    pub(super) fn is(&self, ty: u32, ne: [i64; 4]) -> bool {
        self.ty == ty && self.ne == ne
    }

    /// Points `t`, a product's weight tensor of this type and dims, at the repacked weight: its data,
    /// and the buffer and traits ggml's product dispatches on.
    ///
    /// SAFETY: `t` is a live tensor header with [`Packed::is`] true of its type and dims, read only by
    /// ggml's matrix product while this lives.
    pub(super) unsafe fn point(&self, t: *mut g::ggml_tensor) {
        unsafe {
            (*t).data = g::ggml_backend_buffer_get_base(self.buffer);
            (*t).buffer = self.buffer;
            (*t).extra = self.extra;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Array, Backend, CpuBackend};
    use super::*;
    use std::sync::Arc;

    /// Resident kilobytes of this process's mapping that holds `address` (/proc/self/smaps).
    fn resident_kb(address: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-') && !r.ends_with(':')) {
                let (start, end) = range.split_once('-').unwrap();
                let (start, end) = (usize::from_str_radix(start, 16).unwrap(), usize::from_str_radix(end, 16).unwrap());
                inside = (start..end).contains(&address);
            } else if let Some(kb) = line.strip_prefix("Rss:").filter(|_| inside) {
                return kb.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
        panic!("no mapping holds {address:#x}")
    }

    /// A Q8_0 weight [rows, k] mapped from a file, as a checkpoint's weights are.
    fn mapped_q8_0(rows: usize, k: usize) -> (Array, Arc<memmap2::Mmap>) {
        let values: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 2003) as f32 / 1001.0 - 1.0) * if i % 97 == 0 { 8.0 } else { 1.0 }).collect();
        // SAFETY: a pure function of the type, which ggml knows.
        let mut bytes = vec![0u8; rows * unsafe { g::ggml_row_size(g::GGML_TYPE_Q8_0, k as i64) }];
        // SAFETY: `values` holds rows * k floats and `bytes` their Q8_0 blocks.
        unsafe { g::ggml_quantize_chunk(g::GGML_TYPE_Q8_0, values.as_ptr(), bytes.as_mut_ptr().cast(), 0, rows as i64, k as i64, std::ptr::null()) };
        let path = std::env::temp_dir().join(format!("edgechat-packed-{}-{rows}", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        // SAFETY: a file of this test's own, never written while mapped.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&std::fs::File::open(&path).unwrap()).unwrap() });
        std::fs::remove_file(&path).unwrap();
        let weight = CpuBackend.from_blocks(g::GGML_TYPE_Q8_0, &map, 0..bytes.len(), &[rows as i32, k as i32]).unwrap().unwrap();
        (weight, map)
    }

    /// `x @ weight.T` for activations of `rows` rows (the first row of `x` repeated).
    fn product(weight: &Array, x: &[f32], rows: usize) -> Vec<f32> {
        let cpu = CpuBackend;
        let x: Vec<f32> = x.iter().copied().cycle().take(x.len() * rows).collect();
        let x = cpu.from_f32(&x, &[rows as i32, (x.len() / rows) as i32]).unwrap();
        let out = cpu.matmul(&x, &cpu.transpose(weight, &[1, 0]).unwrap()).unwrap();
        cpu.read_f32(&out).unwrap()
    }

    /// A gather from a Q8_0 table (a tied embedding) reads its rows from the repacked copy, repacking it
    /// if a product has not yet: exactly the stored rows.
    #[test]
    fn gathered_rows_of_a_repacked_table_are_its_stored_rows() {
        if kernels().map_or(true, |k| k.amx.is_none()) {
            eprintln!("skipped: ggml has no AMX buffer type on this processor");
            return;
        }
        let (rows, k) = (RUN_ROWS as usize + 96, 256);
        let (table, map) = mapped_q8_0(rows, k);
        let ids = [0, 1, 15, 16, 17, 4111, rows as i32 - 1, 8];
        let stored = super::super::to_f32(g::GGML_TYPE_Q8_0, &map[..], rows * k);
        let cpu = CpuBackend;
        let gathered = cpu.read_f32(&cpu.take(&table, &cpu.from_i32(&ids, &[ids.len() as i32]).unwrap(), 0).unwrap()).unwrap();
        assert!(table.buffer().unwrap().is_repacked(), "the gather did not read the table repacked");
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            assert_eq!(&gathered[i * k..][..k], &stored[id * k..][..k], "row {id}");
        }
    }

    /// On an AMX processor a decode step's product reads the weight repacked, computes what the product
    /// with the weight as stored computes (the same Q8_0 activations, summed in another order), and the
    /// weight's pages of the file are handed back.
    #[test]
    fn one_row_products_read_repacked_weights_and_compute_as_stored() {
        let amx = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" amx_int8") && c.contains(" avx512_vnni"));
        if !amx {
            eprintln!("skipped: this processor has no AMX, so ggml has no repacked products here");
            return;
        }
        assert!(kernels().unwrap().amx.is_some(), "ggml's AMX buffer type was not found on an AMX processor");
        // More rows than one run of repacking, and a last group of 32 rows (ggml takes 64 at a time).
        let (rows, k) = (RUN_ROWS as usize + 96, 256);
        let (weight, map) = mapped_q8_0(rows, k);
        let x: Vec<f32> = (0..k).map(|i| ((i * 31 % 17) as f32 - 8.0) / 4.0).collect();
        let stored = product(&weight, &x, 2);
        assert!(!weight.buffer().unwrap().is_repacked(), "a two-row product reads the weight as stored");
        let before = resident_kb(map.as_ptr() as usize);
        let repacked = product(&weight, &x, 1);
        assert!(weight.buffer().unwrap().is_repacked(), "a one-row product did not read the weight repacked");
        assert_eq!(repacked.len(), rows);
        for (i, (a, b)) in repacked.iter().zip(&stored[..rows]).enumerate() {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "row {i}: {a} repacked, {b} as stored");
        }
        let after = resident_kb(map.as_ptr() as usize);
        assert!(before >= 1000 && after < 64, "the weight's pages of the file were not handed back: {before} kB, then {after} kB");
        // Later steps (one-row products back to back: a kept graph pointed at new activations) too.
        let steps: Vec<Vec<f32>> = (1..4).map(|s| product(&weight, &x.iter().map(|v| v * s as f32 - 0.25).collect::<Vec<_>>(), 1)).collect();
        for (s, step) in (1..4).zip(&steps) {
            let stored = product(&weight, &x.iter().map(|v| v * s as f32 - 0.25).collect::<Vec<_>>(), 2);
            assert!(step.iter().zip(&stored).all(|(a, b)| (a - b).abs() <= 1e-4 * b.abs().max(1.0)), "step {s}");
        }
        // The next two-row product reads the stored blocks again, and gives their pages back after.
        assert_eq!(product(&weight, &x, 2), stored);
        assert!(resident_kb(map.as_ptr() as usize) < 64);
    }
}
