//! Products with K-quant weights, computed on the activations and on what rounding them loses.
//!
//! ggml multiplies a weight block by activation blocks of its `vec_dot_type`: Q8_0 (8 bits, a scale per
//! 32 values) for Q4_0 … Q8_0 weights, but Q8_K (a scale per 256) for the K-quants. One large value then
//! coarsens 255 others, and the inputs of the FFN's down projection — K-quant in the usual GGUF mixes —
//! have such values in most blocks. On Gemma 3 270M (tests/real_model.rs, 701 positions) that rounding
//! cost 2.0 points of teacher-forced top-1 agreement with f32 under ggml's AVX2 kernels (95.9 % with it,
//! 97.9 % without) and 3.1 points under its AVX-512 ones (94.9 %, under the 95 % bar, against 98.0 %).
//!
//! So the activations x are split into hi, x rounded to Q8_K blocks, and lo, what that rounding lost,
//! rounded to Q8_K blocks of its own; the weight multiplies both as two halves of one product, by ggml's
//! kernels, its blocks as stored and read from memory once. What is lost is lo's rounding, about 1/254
//! of the original error. The halves are handed to ggml as Q8_K blocks, which its products take as they
//! are: ggml's own Q8_K rounding on x86 is its scalar reference code (3.8 % of a 512-token prefill when it
//! rounded both halves), and the split has the integers at hand anyway. What the residual costs is the
//! K-quant products' arithmetic twice and two more graph nodes (docs/benchmarks.md).

use super::fused::thread_share;
use super::{ne_of, Graph, T};
use llama_cpp_sys_2 as g;

/// Values per Q8_K block (ggml's QK_K).
const Q8_K_BLOCK: usize = 256;

/// The weight types ggml multiplies by Q8_K activations (`vec_dot_type` in ggml-cpu's type traits).
pub(super) fn rounds_activations_to_q8_k(weight_type: u32) -> bool {
    matches!(weight_type, g::GGML_TYPE_Q2_K | g::GGML_TYPE_Q3_K | g::GGML_TYPE_Q4_K | g::GGML_TYPE_Q5_K | g::GGML_TYPE_Q6_K)
}

/// ggml's `block_q8_K` (ggml-common.h): a scale, 256 values of 8 bits, and their sums by 16 (the K-quant
/// kernels' shortcut for the weights' minimums).
#[repr(C)]
struct BlockQ8K {
    d: f32,
    qs: [i8; Q8_K_BLOCK],
    bsums: [i16; Q8_K_BLOCK / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292 && std::mem::align_of::<BlockQ8K>() == 4);

impl Graph {
    /// mul_mat(weight, a) for a K-quant `weight` and contiguous f32 `a` [K, M, ..] (K a multiple of 256,
    /// as every K-quant row is), as the sum of the products with hi and lo (see above).
    pub(super) unsafe fn k_quant_product(&self, weight: T, a: T) -> T {
        let ctx = self.ctx;
        let [k, m, b2, b3] = ne_of(a);
        let mut args = [a];
        // One node writes hi's then lo's rows of Q8_K blocks per batch entry: [K, 2M, ..].
        let halves = g::ggml_custom_4d(ctx, g::GGML_TYPE_Q8_K, k, 2 * m, b2, b3, args.as_mut_ptr(), 1, Some(split_rows), -1, std::ptr::null_mut());
        let product = g::ggml_mul_mat(ctx, weight, halves);
        let (n, nb) = (ne_of(product), (*product).nb);
        let half = |offset| g::ggml_view_4d(ctx, product, n[0], m, n[2], n[3], nb[1], nb[2], nb[3], offset);
        g::ggml_add(ctx, half(0), half(m as usize * nb[1]))
    }
}

/// ggml calls this on each of `nth` threads for `dst` [K, 2M, ..] of Q8_K blocks made by
/// [`Graph::k_quant_product`] from its contiguous f32 source [K, M, ..]; thread `ith` takes the ith of
/// `nth` runs of its blocks.
unsafe extern "C" fn split_rows(dst: *mut g::ggml_tensor, ith: i32, nth: i32, _: *mut std::ffi::c_void) {
    // SAFETY: the source is a contiguous f32 tensor and dst a contiguous Q8_K one of the shapes above
    // (`BlockQ8K` is ggml's block, checked by size; ggml aligns tensor data), both alive while ggml
    // computes dst; the threads write disjoint blocks.
    unsafe {
        let a = (*dst).src[0];
        let [k, m, b2, b3] = ne_of(a).map(|n| n as usize);
        let x = std::slice::from_raw_parts((*a).data as *const f32, k * m * b2 * b3);
        let blocks = k / Q8_K_BLOCK;
        let out = (*dst).data as *mut BlockQ8K;
        // Each thread takes a run of the blocks of all rows: a decode step's one row is split too.
        for n in thread_share(m * b2 * b3 * blocks, ith, nth) {
            let (row, block) = (n / blocks, n % blocks);
            let (batch, r) = (row / m, row % m);
            let hi = &mut *out.add((batch * 2 * m + r) * blocks + block);
            let lo = &mut *out.add((batch * 2 * m + m + r) * blocks + block);
            split(&x[n * Q8_K_BLOCK..][..Q8_K_BLOCK], hi, lo);
        }
    }
}

/// Rounds the 256 values `x` to `hi`, and what that lost to `lo`: with AVX2's 8 lanes where the CPU
/// has them (the build targets any x86-64, whose SSE2 has no integer min and max of 32 bits), which
/// computes the same values in the same order.
fn split(x: &[f32], hi: &mut BlockQ8K, lo: &mut BlockQ8K) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, just checked.
        return unsafe { split_avx2(x, hi, lo) };
    }
    split_block(x, hi, lo)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn split_avx2(x: &[f32], hi: &mut BlockQ8K, lo: &mut BlockQ8K) {
    split_block(x, hi, lo)
}

#[inline(always)]
fn split_block(x: &[f32], hi: &mut BlockQ8K, lo: &mut BlockQ8K) {
    round(x, hi);
    round(&lost(x, hi), lo);
}

/// What rounding `x` to `block` lost.
#[inline(always)]
fn lost(x: &[f32], block: &BlockQ8K) -> [f32; Q8_K_BLOCK] {
    std::array::from_fn(|i| x[i] - block.qs[i] as f32 * block.d)
}

/// Rounds 256 values to a Q8_K block as ggml's `quantize_row_q8_K_ref` does, bit for bit (the largest
/// magnitude to -127, a negative scale for a positive value), so hi is what ggml itself would multiply.
#[inline(always)]
fn round(x: &[f32], block: &mut BlockQ8K) {
    // Magnitudes order as their bits do, so the largest is an integer maximum (which vectorizes), and
    // a NaN or an infinity shows as bits at or above infinity's.
    let widest = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    if widest >= f32::INFINITY.to_bits() {
        // No integer for it: a NaN scale makes the product say so.
        (block.d, block.qs, block.bsums) = (f32::NAN, [0; Q8_K_BLOCK], [0; Q8_K_BLOCK / 16]);
        return;
    }
    // ggml scales by the first value of that magnitude, to -127.
    let max = x.iter().copied().find(|v| v.to_bits() & 0x7fff_ffff == widest).unwrap_or(0.0);
    let iscale = if widest > 0 { -127.0 / max } else { 0.0 };
    let scale = if widest > 0 { 1.0 / iscale } else { 0.0 };
    // ggml's nearest_int: adding 1.5 * 2^23 leaves a float no fraction bits, so its low mantissa bits
    // are the integer, rounded ties to even (|iscale * v| <= 127).
    const ROUND: f32 = 12_582_912.0;
    for (&v, q) in x.iter().zip(&mut block.qs) {
        *q = (((iscale * v + ROUND).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000).min(127) as i8;
    }
    for (sum, group) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
        *sum = group.iter().map(|&q| q as i16).sum();
    }
    block.d = scale;
}

#[cfg(test)]
mod tests {
    use super::{BlockQ8K, Q8_K_BLOCK};
    use llama_cpp_sys_2 as g;

    /// The split's two steps for one block: rounding it, and what that lost.
    fn round(x: &[f32], block: &mut BlockQ8K, lost: &mut [f32; Q8_K_BLOCK]) {
        super::round(x, block);
        *lost = super::lost(x, block);
    }

    fn empty() -> BlockQ8K {
        BlockQ8K { d: 0.0, qs: [0; Q8_K_BLOCK], bsums: [0; Q8_K_BLOCK / 16] }
    }

    fn values(b: &BlockQ8K) -> Vec<f32> {
        b.qs.iter().map(|&q| b.d * q as f32).collect()
    }

    // ggml-base's own Q8_K rounding (ggml-quants.h; the generated bindings leave it out).
    unsafe extern "C" {
        fn quantize_row_q8_K_ref(x: *const f32, y: *mut BlockQ8K, k: i64);
    }

    fn ggml_rounding(x: &[f32; Q8_K_BLOCK]) -> BlockQ8K {
        let mut block = empty();
        // SAFETY: one block's worth of values in, one block out; the size is ggml's block_q8_K's.
        unsafe {
            assert_eq!(g::ggml_type_size(g::GGML_TYPE_Q8_K), std::mem::size_of::<BlockQ8K>(), "ggml's block_q8_K is BlockQ8K");
            quantize_row_q8_K_ref(x.as_ptr(), &mut block, Q8_K_BLOCK as i64);
        }
        block
    }

    #[test]
    fn a_block_rounds_as_ggml_rounds_it_and_keeps_what_it_loses() {
        let x: [f32; Q8_K_BLOCK] = std::array::from_fn(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0 + if i == 9 { 60.0 } else { 0.0 });
        let (mut hi, mut lost) = (empty(), [0f32; Q8_K_BLOCK]);
        // The same block as ggml's, bit for bit, whichever sign the largest value has, and the first of
        // two largest magnitudes deciding it.
        let mut negative = x;
        negative[200] = -61.0;
        let mut tied = x;
        tied[3] = -tied[9];
        for x in [x, negative, tied] {
            round(&x, &mut hi, &mut lost);
            let reference = ggml_rounding(&x);
            assert_eq!((hi.d.to_bits(), hi.qs, hi.bsums), (reference.d.to_bits(), reference.qs, reference.bsums));
            // The split the product runs (with AVX2 where the CPU has it) makes the same two blocks.
            let (mut split_hi, mut split_lo) = (empty(), empty());
            super::split(&x, &mut split_hi, &mut split_lo);
            let lo_reference = ggml_rounding(&lost);
            for (got, want) in [(&split_hi, &reference), (&split_lo, &lo_reference)] {
                assert_eq!((got.d.to_bits(), got.qs, got.bsums), (want.d.to_bits(), want.qs, want.bsums));
            }
        }
        round(&x, &mut hi, &mut lost);
        // What it loses is within half a step, at the large value's scale, and is kept.
        let step = hi.d.abs();
        assert!(lost.iter().all(|l| l.abs() <= step / 2.0 * (1.0 + 1e-5)) && lost.iter().any(|&l| l > step / 4.0));
        assert!(x.iter().zip(values(&hi)).zip(&lost).all(|((v, h), l)| (h + l - v).abs() <= v.abs() * f32::EPSILON));
        // lo rounds that at its own scale: hi + lo is x to within lo's half step.
        let mut lo = empty();
        round(&lost, &mut lo, &mut [0f32; Q8_K_BLOCK]);
        let both: Vec<f32> = values(&hi).iter().zip(values(&lo)).map(|(h, l)| h + l).collect();
        assert!(x.iter().zip(&both).all(|(v, b)| (v - b).abs() <= lo.d.abs() / 2.0 * (1.0 + 1e-4) + v.abs() * f32::EPSILON));
        assert!(lo.d.abs() < step / 200.0);
        // Ties go to the even integer, as in ggml: at scale 1 (the largest value -127), 2.5 -> 2, 3.5 -> 4.
        let mut ties = [0.25f32; Q8_K_BLOCK];
        ties[..4].copy_from_slice(&[-127.0, 2.5, 3.5, -2.5]);
        round(&ties, &mut hi, &mut lost);
        assert_eq!(hi.qs[..5], [-127, 2, 4, -2, 0]);
        assert_eq!(hi.qs, ggml_rounding(&ties).qs);
        round(&[0.0; Q8_K_BLOCK], &mut hi, &mut lost);
        assert!(hi.d == 0.0 && hi.qs.iter().all(|&q| q == 0) && hi.bsums.iter().all(|&s| s == 0) && lost.iter().all(|&l| l == 0.0));
        // A NaN or an infinity makes the block's scale NaN, so the product says so.
        for bad in [f32::NAN, f32::INFINITY] {
            let mut poisoned = x;
            poisoned[3] = bad;
            round(&poisoned, &mut hi, &mut lost);
            assert!(hi.d.is_nan());
        }
    }

    /// A K-quant weight times activations like the FFN's (a large value in each block of 256) comes within
    /// f32 accumulation of the exact product with the weight's stored values, on ggml's kernels for a
    /// few rows and on its tiled ones for many (8 and more). Without lo, Q8_K rounding of the small
    /// values at the large one's scale puts it ~50 times further off.
    #[test]
    fn a_k_quant_product_is_as_close_to_f32_as_its_stored_weights_allow() {
        use crate::host::tensor::{Backend, DType};
        let (rows, k) = (64usize, 1024usize);
        let w: Vec<f32> = (0..rows * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 40.0).collect();
        for kind in [g::GGML_TYPE_Q4_K, g::GGML_TYPE_Q6_K] {
            let (weight, stored) = stored_weight(kind, &w, rows, k);
            let be = crate::host::tensor::cpu::CpuBackend;
            // One row (a decode step), several, a batch of several (each entry's halves apart), and many.
            for shape in [vec![1, k as i32], vec![3, k as i32], vec![2, 3, k as i32], vec![40, k as i32]] {
                let m = shape.iter().product::<i32>() as usize / k;
                let large = |i: usize| match i % 256 {
                    7 => 40.0,
                    100 if i % 512 > 256 => -45.0,
                    _ => 0.0,
                };
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 29 % 83) as f32 - 41.0) / 50.0 + large(i)).collect();
                let xs = be.from_f32(&x, &shape).unwrap();
                let y = be.read_f32(&be.matmul(&xs, &be.transpose(&weight, &[1, 0]).unwrap()).unwrap()).unwrap();
                for (i, &got) in y.iter().enumerate() {
                    let (x, w) = (&x[i / rows * k..][..k], &stored[i % rows * k..][..k]);
                    let exact: f64 = x.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let size: f64 = x.iter().zip(w).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                    assert!((got as f64 - exact).abs() <= 1e-4 * size, "{kind}: value {i} of {shape:?}: {got} vs {exact} (size {size})");
                }
            }
        }

        /// `w` [rows, k] as ggml's blocks of `kind`, and the values they store.
        fn stored_weight(kind: u32, w: &[f32], rows: usize, k: usize) -> (crate::host::tensor::cpu::Array, Vec<f32>) {
            use super::super::{row_size, to_f32};
            use crate::host::tensor::cpu::{Array, Buffer, Node, State};
            use std::sync::Arc;
            // SAFETY: row_size is a pure function of a known type; blocks holds `rows` rows of it.
            let mut blocks = vec![0u8; rows * unsafe { row_size(kind, k as i64) }];
            unsafe { g::ggml_quantize_chunk(kind, w.as_ptr(), blocks.as_mut_ptr().cast(), 0, rows as i64, k as i64, std::ptr::null()) };
            let stored = to_f32(kind, &blocks, rows * k);
            let state = State::Ready(Arc::new(Buffer::from_bytes(&blocks)));
            let weight = Array(Arc::new(Node::new(vec![rows as i32, k as i32], DType::F32, Some(kind), state)));
            (weight, stored)
        }
    }
}
