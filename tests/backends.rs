//! The two tensor backends agree: every contract op, on the shapes and layouts model graphs use
//! (broadcasts, transposed weights, views, grouped-query attention, sliding windows), computed by ggml
//! (cpu) and by MLX and compared element by element. A lowering mistake in either shows up here as a
//! number, before it shows up as a worse model.

use edgechat::host::tensor::cpu::CpuBackend;
use edgechat::host::tensor::mlx::MlxBackend;
use edgechat::host::tensor::{Backend, DType, Mask, Rope};

type Results = Vec<(&'static str, Result<(Vec<i32>, Vec<f32>), String>)>;

/// Deterministic values in [-2, 2).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// Every case, built and read back on one backend.
fn cases<B: Backend>(be: &B) -> Results {
    let x = |seed: u64, shape: &[i32]| be.from_f32(&values(shape.iter().product::<i32>() as usize, seed), shape).unwrap();
    let rope = |offset, traditional| Rope { dims: 8, traditional, base: 10000.0, scale: 1.0, offset };
    let mut out: Results = Vec::new();
    let mut case = |name: &'static str, result: Result<B::Array, String>| {
        out.push((name, result.and_then(|a| Ok((be.shape(&a).to_vec(), be.read_f32(&a)?)))));
    };
    let (a, b, w) = (x(1, &[2, 3, 16]), x(2, &[2, 3, 16]), x(3, &[24, 16]));
    case("matmul with a transposed weight", be.transpose(&w, &[1, 0]).and_then(|wt| be.matmul(&a, &wt)));
    let wt = be.transpose(&x(40, &[3, 5]), &[1, 0]).unwrap();
    case("a transposed matrix read by a product and by an elementwise op", be.matmul(&x(41, &[2, 3]), &be.transpose(&wt, &[1, 0]).unwrap()).and_then(|p| {
        let sum = be.add(&wt, &x(42, &[5, 3]))?;
        be.matmul(&p, &sum)
    }));
    let wt = be.transpose(&x(43, &[4, 6]), &[1, 0]).unwrap();
    case("a transposed weight read by its product and by a join", be.matmul(&x(44, &[2, 6]), &wt).and_then(|p| {
        let joined = be.concatenate(&[&wt, &x(45, &[1, 4])], 0)?;
        be.matmul(&p, &be.transpose(&joined, &[1, 0])?)
    }));
    case("matmul of plain matrices", be.matmul(&x(4, &[5, 7]), &x(5, &[7, 3])));
    case("batched matmul broadcasting the left side", be.matmul(&x(6, &[5, 7]), &x(7, &[2, 7, 3])));
    case("add", be.add(&a, &b));
    case("add broadcasting a row", be.add(&a, &x(8, &[16])));
    case("subtract broadcasting the left side", be.subtract(&x(9, &[3, 1]), &x(10, &[2, 3, 4])));
    case("multiply broadcasting both sides", be.multiply(&x(11, &[3, 1]), &x(12, &[1, 4])));
    case("divide", be.divide(&a, &be.add_scalar(&be.multiply(&b, &b).unwrap(), 1.0).unwrap()));
    let (column, row) = (be.from_i32(&[1, 2, 3], &[3, 1]).unwrap(), be.from_i32(&[5, -1], &[1, 2]).unwrap());
    case("integer add with broadcasting", be.add(&column, &row).and_then(|s| be.take(&w, &be.add(&s, &be.from_i32(&[2], &[1]).unwrap())?, 0)));
    case("integer multiply then divide", be.multiply(&column, &row).and_then(|p| be.divide(&p, &column)));
    case("scale", be.scale(&a, 0.125));
    case("add-scalar", be.add_scalar(&a, -3.5));
    case("tanh", be.tanh(&a));
    case("sigmoid", be.sigmoid(&a));
    case("silu", be.silu(&a));
    case("gelu-tanh", be.gelu_tanh(&be.scale(&a, 3.0).unwrap()));
    // Far tails and overflow: tanh saturating, x^3 and exp overflowing, infinities (NaN must match too).
    let tails = [-1e30f32, -1e4, -60.0, -9.0, -1e-6, 0.0, 1e-6, 9.0, 60.0, 1e4, 1e30, f32::INFINITY, f32::NEG_INFINITY];
    case("gelu-tanh at the tails", be.gelu_tanh(&be.from_f32(&tails, &[tails.len() as i32]).unwrap()));
    case("astype to bfloat16 and back", be.astype(&a, DType::BF16).and_then(|h| be.astype(&h, DType::F32)));
    case("reshape of a transpose", be.transpose(&a, &[2, 0, 1]).and_then(|t| be.reshape(&t, &[16, 6])));
    case("slice with negative bounds", be.slice(&a, &[0, -2, 3], &[2, 3, -1]));
    case("slice of a transpose", be.transpose(&a, &[0, 2, 1]).and_then(|t| be.slice(&t, &[1, 4], &[2, 12])));
    case("slice-update", be.slice_update(&a, &x(13, &[2, 1, 4]), &[0, 1, 8], &[2, 2, 12]));
    case("slice-update of an empty region past the end", be.slice_update(&x(30, &[2, 3]), &x(31, &[1]), &[2, 3], &[2, 3]));
    case("slice-update with bounds beyond the shape", be.slice_update(&x(32, &[2, 3]), &x(33, &[1]), &[-9, 1], &[9, 2]));
    case("matmul over an empty inner dimension", be.matmul(&x(34, &[3, 0]), &x(35, &[0, 2])));
    case("an empty slice", be.slice(&a, &[0, 2, 0], &[2, 1, 16]));
    case("concatenate with an empty part", be.concatenate(&[&x(36, &[2, 0]), &x(37, &[2, 3])], 1));
    case("concatenate on the sequence axis", be.concatenate(&[&x(14, &[1, 2, 5, 8]), &x(15, &[1, 2, 3, 8])], 2));
    case("concatenate on the last axis", be.concatenate(&[&a, &b], -1));
    let half = |t: &B::Array, dtype| be.astype(t, dtype).unwrap();
    case("concatenate float16 parts", be.concatenate(&[&half(&a, DType::F16), &half(&b, DType::F16)], 1));
    case("concatenate bfloat16 with float32", be.concatenate(&[&half(&a, DType::BF16), &b], 0));
    let ids = be.from_i32(&[3, 0, 23, 7], &[1, 4]).unwrap();
    case("take rows (embedding lookup)", be.take(&w, &ids, 0));
    case("softmax over the last axis", be.softmax(&a, -1));
    case("softmax over a middle axis", be.softmax(&a, 1));
    case("rms-norm", be.rms_norm(&a, &x(16, &[16]), 1e-6));
    case("rope, halves, at an offset", be.rope(&x(17, &[1, 2, 3, 8]), rope(5, false)));
    case("rope, interleaved", be.rope(&x(18, &[1, 2, 3, 8]), rope(0, true)));
    case("rope of the first half of the head", be.rope(&x(19, &[1, 2, 3, 16]), rope(2, false)));
    let (q, k, v) = (x(20, &[1, 4, 3, 8]), x(21, &[1, 2, 7, 8]), x(22, &[1, 2, 7, 8]));
    case("attention, grouped-query, causal", be.attention(&q, &k, &v, 0.35, Mask::Causal));
    case("attention, no mask", be.attention(&x(23, &[1, 4, 1, 8]), &k, &v, 0.35, Mask::None));
    let window = Mask::SlidingWindow { window: 4, query_offset: 10, key_offset: 6 };
    case("attention, sliding window", be.attention(&q, &k, &v, 0.35, window));
    let additive = x(24, &[3, 7]);
    case("attention, explicit additive mask", be.attention(&q, &k, &v, 0.35, Mask::Explicit(&additive)));
    case("conv1d-depthwise", be.conv1d_depthwise(&x(25, &[2, 6, 5]), &x(26, &[5, 3])));
    // 4-bit MLX-packed words for an [8, 64] matrix, groups of 32.
    let words: Vec<u8> = (0..64u32).flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()).collect();
    let (qw, scales, biases) = (be.from_bytes(DType::U32, &words, &[8, 8]).unwrap(), x(27, &[8, 2]), x(29, &[8, 2]));
    case("dequantize", be.dequantize(&qw, &scales, &biases, 32, 4));
    case("quantized-matmul (dequantized on the cpu backend)", be.quantized_matmul(&x(28, &[2, 64]), &qw, &scales, &biases, true, 32, 4));
    out
}

#[test]
fn every_op_agrees_between_ggml_and_mlx() {
    let (cpu, mlx) = (cases(&CpuBackend), cases(&MlxBackend));
    let mut failures = Vec::new();
    for ((name, c), (_, m)) in cpu.iter().zip(&mlx) {
        match (c, m) {
            (Ok((cs, cv)), Ok((ms, mv))) if cs == ms => {
                let worst = cv.iter().zip(mv).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0f32, f32::max);
                // bf16 round trips and the 4-bit dequantization are exact on both; f32 kernels differ in
                // summation order only.
                if worst > 2e-5 || cv.iter().any(|v| v.is_nan()) != mv.iter().any(|v| v.is_nan()) {
                    failures.push(format!("{name}: differ by {worst:e}"));
                }
            }
            (Ok((cs, _)), Ok((ms, _))) => failures.push(format!("{name}: shapes {cs:?} (cpu) and {ms:?} (mlx)")),
            (c, m) => failures.push(format!("{name}: cpu {:?}, mlx {:?}", c.as_ref().err(), m.as_ref().err())),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases disagree:\n{}", failures.len(), cpu.len(), failures.join("\n"));
}

#[test]
fn an_unevaluated_chain_of_a_million_ops_is_refused_or_computed_without_overflowing_the_stack() {
    let be = CpuBackend;
    let mut a = be.from_f32(&[1.0], &[1]).unwrap();
    for _ in 0..1_100_000 {
        a = be.add_scalar(&a, 1.0).unwrap();
    }
    let refused = be.read_f32(&a).unwrap_err();
    assert!(refused.contains("pending operations is refused"), "{refused}");
    drop(a); // released iteratively: a recursive drop would overflow the stack here
    let mut a = be.from_f32(&[1.0], &[1]).unwrap();
    for _ in 0..100_000 {
        a = be.add_scalar(&a, 1.0).unwrap();
    }
    assert_eq!(be.read_f32(&a).unwrap(), vec![100_001.0]);
}

#[test]
fn an_evaluated_graph_leaves_every_result_still_referenced_usable() {
    let be = CpuBackend;
    let x = be.from_f32(&[1.0, 2.0], &[2]).unwrap();
    let kept = be.scale(&x, 2.0).unwrap();
    let result = be.add(&kept, &x).unwrap();
    be.eval(&[&result]).unwrap();
    // `kept` was referenced from outside the graph, so it is data now: a later graph starts from it.
    let later = be.add_scalar(&kept, 1.0).unwrap();
    assert_eq!(be.read_f32(&later).unwrap(), vec![3.0, 5.0]);
    assert_eq!(be.read_f32(&result).unwrap(), vec![3.0, 6.0]);
}

/// The cpu backend appends to a cache in place when nothing else holds the old cache; the result must
/// Joined parts of one float type keep it (a cache stored as f16 grows as f16), mixed ones give f32, as
/// on MLX; attention reads f16 keys and values as they are, and bf16 ones as f32.
#[test]
fn concatenation_keeps_its_parts_float_type_and_attention_reads_it() {
    fn check<B: Backend>(be: &B) -> Vec<f32> {
        let x = |seed: u64, shape: &[i32]| be.from_f32(&values(shape.iter().product::<i32>() as usize, seed), shape).unwrap();
        let (a, b) = (be.astype(&x(1, &[1, 2, 3, 8]), DType::F16).unwrap(), be.astype(&x(2, &[1, 2, 4, 8]), DType::F16).unwrap());
        let joined = be.concatenate(&[&a, &b], 2).unwrap();
        assert_eq!(be.dtype(&joined), DType::F16);
        assert_eq!(be.dtype(&be.concatenate(&[&a, &x(3, &[1, 2, 4, 8])], 2).unwrap()), DType::F32);
        let q = x(4, &[1, 4, 2, 8]);
        let mut out = be.read_f32(&be.attention(&q, &joined, &joined, 0.35, Mask::Causal).unwrap()).unwrap();
        let additive = x(5, &[2, 7]);
        out.extend(be.read_f32(&be.attention(&q, &joined, &joined, 0.35, Mask::Explicit(&additive)).unwrap()).unwrap());
        let bf16 = be.astype(&joined, DType::BF16).unwrap();
        out.extend(be.read_f32(&be.attention(&q, &bf16, &bf16, 0.35, Mask::None).unwrap()).unwrap());
        out
    }
    let (cpu, mlx) = (check(&CpuBackend), check(&MlxBackend));
    // ggml accumulates f16 values in f16 (as llama.cpp's f16 caches do): close, not identical.
    let worst = cpu.iter().zip(&mlx).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 5e-3, "cpu and mlx differ by {worst}");
}

/// equal plain concatenation at every step, and an old cache someone still holds must never change.
#[test]
fn a_cache_appended_in_place_equals_concatenation_and_held_arrays_never_change() {
    for dtype in [DType::F32, DType::F16] {
        appended_in_place(dtype);
    }
}

/// (Values are small integers: exact in f16 too.)
fn appended_in_place(dtype: DType) {
    let be = CpuBackend;
    let mut cache = be.astype(&be.from_f32(&[0.0; 4], &[1, 1, 1, 4]).unwrap(), dtype).unwrap();
    be.eval(&[&cache]).unwrap();
    let mut expected = vec![0.0f32; 4];
    let mut held = Vec::new();
    for step in 1..40 {
        let row: Vec<f32> = (0..4).map(|i| (step * 10 + i) as f32).collect();
        let row = be.astype(&be.from_f32(&row, &[1, 1, 1, 4]).unwrap(), dtype).unwrap();
        let grown = be.concatenate(&[&cache, &row], 2).unwrap();
        assert_eq!(be.dtype(&grown), dtype);
        if step % 7 == 0 {
            held.push((cache.clone(), expected.clone()));
        }
        cache = grown;
        expected.extend((0..4).map(|i| (step * 10 + i) as f32));
        be.eval(&[&cache]).unwrap();
        assert_eq!(be.read_f32(&cache).unwrap(), expected, "step {step}");
    }
    for (array, values) in held {
        assert_eq!(be.read_f32(&array).unwrap(), values);
    }
}

/// Joining many parts: each part is copied into place once, so 200 000 parts are one pass over the result
/// (a chain of pairwise joins would copy the growing prefix 200 000 times and not finish in a test run).
#[test]
fn a_concatenation_of_many_parts_is_computed_in_one_pass() {
    let be = CpuBackend;
    let parts: Vec<_> = (0..200_000).map(|i| be.from_f32(&[i as f32], &[1]).unwrap()).collect();
    let joined = be.concatenate(&parts.iter().collect::<Vec<_>>(), 0).unwrap();
    let values = be.read_f32(&joined).unwrap();
    assert!(values.iter().enumerate().all(|(i, &v)| v == i as f32));
}
