//! Products with K-quant weights, computed on the activations and on what rounding them loses.
//!
//! ggml multiplies a weight block by activation blocks of its `vec_dot_type`: Q8_0 (8 bits, a scale per
//! 32 values) for Q4_0 … Q8_0 weights, but Q8_K (a scale per 256) for the K-quants. One large value then
//! coarsens 255 others, and the inputs of the FFN's down projection — K-quant in the usual GGUF mixes —
//! have such values in most blocks. On Gemma 3 270M (tests/real_model.rs, 701 positions) that rounding
//! cost 2.0 points of teacher-forced top-1 agreement with f32 under ggml's AVX2 kernels (95.9 % with it,
//! 97.9 % without) and 3.1 points under its AVX-512 ones (94.9 %, under the 95 % bar, against 98.0 %).
//!
//! So the activations x are split into hi, x rounded as Q8_K rounds it (which ggml's own Q8_K rounding
//! then keeps exactly), and lo = x - hi, and the weight multiplies both as two halves of one product, by
//! ggml's kernels, its blocks as stored and read from memory once. What is lost is lo's rounding, about
//! 1/254 of the original error. What it costs is the K-quant products' arithmetic twice, ggml quantizing
//! both halves and two more graph nodes: 6-10 % of a decode step and ~15 % of a 512-token prefill, with
//! the same kernels (docs/benchmarks.md).

use super::{ne_of, Graph, T};
use llama_cpp_sys_2 as g;

/// Values per Q8_K block (ggml's QK_K).
const Q8_K_BLOCK: usize = 256;

/// The weight types ggml multiplies by Q8_K activations (`vec_dot_type` in ggml-cpu's type traits).
pub(super) fn rounds_activations_to_q8_k(weight_type: u32) -> bool {
    matches!(weight_type, g::GGML_TYPE_Q2_K | g::GGML_TYPE_Q3_K | g::GGML_TYPE_Q4_K | g::GGML_TYPE_Q5_K | g::GGML_TYPE_Q6_K)
}

impl Graph {
    /// mul_mat(weight, a) for a K-quant `weight` and contiguous f32 `a` [K, M, ..] (K a multiple of 256,
    /// as every K-quant row is), as the sum of the products with hi and lo (see above).
    pub(super) unsafe fn k_quant_product(&self, weight: T, a: T) -> T {
        let ctx = self.ctx;
        let [k, m, b2, b3] = ne_of(a);
        let mut args = [a];
        // One node writes hi then lo per batch entry: [K, 2M, ..].
        let halves = g::ggml_custom_4d(ctx, g::GGML_TYPE_F32, k, 2 * m, b2, b3, args.as_mut_ptr(), 1, Some(split_rows), -1, std::ptr::null_mut());
        let product = g::ggml_mul_mat(ctx, weight, halves);
        let (n, nb) = (ne_of(product), (*product).nb);
        let half = |offset| g::ggml_view_4d(ctx, product, n[0], m, n[2], n[3], nb[1], nb[2], nb[3], offset);
        g::ggml_add(ctx, half(0), half(m as usize * nb[1]))
    }
}

/// ggml calls this on each of `nth` threads for `dst` [K, 2M, ..] made by [`Graph::k_quant_product`]
/// from its contiguous f32 source [K, M, ..]; thread `ith` takes every nth row.
unsafe extern "C" fn split_rows(dst: *mut g::ggml_tensor, ith: i32, nth: i32, _: *mut std::ffi::c_void) {
    // SAFETY: dst and its source are contiguous f32 tensors of the shapes above, alive while ggml computes
    // dst; the threads write disjoint rows.
    unsafe {
        let a = (*dst).src[0];
        let [k, m, b2, b3] = ne_of(a).map(|n| n as usize);
        let x = std::slice::from_raw_parts((*a).data as *const f32, k * m * b2 * b3);
        let out = (*dst).data as *mut f32;
        for row in (ith.max(0) as usize..m * b2 * b3).step_by(nth.max(1) as usize) {
            let (batch, r) = (row / m, row % m);
            let hi = std::slice::from_raw_parts_mut(out.add((batch * 2 * m + r) * k), k);
            let lo = std::slice::from_raw_parts_mut(out.add((batch * 2 * m + m + r) * k), k);
            let x = &x[row * k..][..k];
            for ((x, hi), lo) in x.chunks(Q8_K_BLOCK).zip(hi.chunks_mut(Q8_K_BLOCK)).zip(lo.chunks_mut(Q8_K_BLOCK)) {
                split(x, hi, lo);
            }
        }
    }
}

/// hi = x rounded as ggml's `quantize_row_q8_K_ref` rounds a block: scaled so that the largest magnitude
/// is 127, each value to the nearest integer (ties to even), scaled back. (ggml maps the largest value to
/// -127 rather than 127; rounding ties to even is symmetric, so the values are the same.) lo = x - hi.
fn split(x: &[f32], hi: &mut [f32], lo: &mut [f32]) {
    // (A comparison rather than f32::max, whose NaN rule keeps the loop from vectorizing; NaNs are skipped.)
    let largest = x.iter().fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
    let (iscale, scale) = if largest > 0.0 { (127.0 / largest, largest / 127.0) } else { (0.0, 0.0) };
    // Adding 1.5 * 2^23 leaves a float no fraction bits, so the sum is rounded to an integer, ties to even,
    // as ggml's nearest_int rounds (|iscale * v| <= 127). round_ties_even would be a libm call on x86-64
    // without SSE4.1: 0.8 % of a decode step.
    const ROUND: f32 = 12_582_912.0;
    for ((&v, hi), lo) in x.iter().zip(hi).zip(lo) {
        *hi = ((iscale * v + ROUND) - ROUND) * scale;
        *lo = v - *hi;
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn hi_is_a_fixed_point_of_q8_k_rounding_and_hi_plus_lo_is_x() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0 + if i == 9 { 60.0 } else { 0.0 }).collect();
        let (mut hi, mut lo) = (vec![0f32; 256], vec![0f32; 256]);
        split(&x, &mut hi, &mut lo);
        let step = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        assert!(lo.iter().all(|l| l.abs() <= step / 2.0 * (1.0 + 1e-5)) && lo.iter().any(|&l| l > step / 4.0), "x is rounded at the outlier's scale");
        assert!(x.iter().zip(&hi).zip(&lo).all(|((v, h), l)| (h + l - v).abs() <= v.abs() * f32::EPSILON));
        let (mut again, mut rest) = (vec![0f32; 256], vec![0f32; 256]);
        split(&hi, &mut again, &mut rest);
        let worst = hi.iter().zip(&again).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 64.0 * f32::EPSILON, "rounding hi again moves it by {worst}");
        // Ties go to the even integer, as in ggml: at scale 1 (the largest value -127), 2.5 -> 2, 3.5 -> 4.
        let mut ties = [0.25f32; 256];
        ties[..4].copy_from_slice(&[-127.0, 2.5, 3.5, -2.5]);
        split(&ties, &mut hi, &mut lo);
        assert_eq!(hi[..5], [-127.0, 2.0, 4.0, -2.0, 0.0]);
        split(&[0.0; 256], &mut hi, &mut lo);
        assert!(hi.iter().chain(&lo).all(|&v| v == 0.0));
    }

    /// A Q4_K weight times activations like the FFN's (one large value per block of 256) comes within
    /// f32 accumulation of the exact product with the weight's stored values. Without lo, Q8_K rounding
    /// of the small values at the large one's scale puts it ~50 times further off.
    #[test]
    fn a_k_quant_product_is_as_close_to_f32_as_its_stored_weights_allow() {
        use super::super::{row_size, to_f32};
        use crate::host::tensor::cpu::{Array, Buffer, CpuBackend, Node, State};
        use crate::host::tensor::{Backend, DType};
        use llama_cpp_sys_2 as g;
        use std::sync::{Arc, Mutex, OnceLock};
        let (rows, k) = (8usize, 512usize);
        let w: Vec<f32> = (0..rows * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 40.0).collect();
        // SAFETY: row_size is a pure function of a known type; blocks holds `rows` rows of it.
        let mut blocks = vec![0u8; rows * unsafe { row_size(g::GGML_TYPE_Q4_K, k as i64) }];
        unsafe { g::ggml_quantize_chunk(g::GGML_TYPE_Q4_K, w.as_ptr(), blocks.as_mut_ptr().cast(), 0, rows as i64, k as i64, std::ptr::null()) };
        let stored = to_f32(g::GGML_TYPE_Q4_K, &blocks, rows * k);
        let state = Mutex::new(State::Ready(Arc::new(Buffer::from_bytes(&blocks))));
        let weight = Array(Arc::new(Node { shape: vec![rows as i32, k as i32], dtype: DType::F32, blocks: Some(g::GGML_TYPE_Q4_K), state, dequantized: OnceLock::new() }));
        let be = CpuBackend;
        // One row (a decode step), several, and a batch of several (each batch entry's halves apart).
        for shape in [vec![1, k as i32], vec![3, k as i32], vec![2, 3, k as i32]] {
            let m = shape.iter().product::<i32>() as usize / k;
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 29 % 83) as f32 - 41.0) / 50.0 + if i % 256 == 7 { 40.0 } else { 0.0 }).collect();
            let xs = be.from_f32(&x, &shape).unwrap();
            let y = be.read_f32(&be.matmul(&xs, &be.transpose(&weight, &[1, 0]).unwrap()).unwrap()).unwrap();
            for (i, &got) in y.iter().enumerate() {
                let (x, w) = (&x[i / rows * k..][..k], &stored[i % rows * k..][..k]);
                let exact: f64 = x.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
                let size: f64 = x.iter().zip(w).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                assert!((got as f64 - exact).abs() <= 1e-4 * size, "value {i} of {shape:?}: {got} vs {exact} (size {size})");
            }
        }
    }
}
