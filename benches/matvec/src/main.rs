//! The matrix products Gemma 3 270M's GGUF needs, in the GGUF's own block formats, on the two CPU
//! backend candidates: ggml (llama.cpp's tensor library, built from the sources llama-cpp-sys-2 vendors)
//! and candle-core. One row (decode) and 128 rows (prefill), 2 threads, random weights quantized by each
//! library itself. Prints one table row per case.
//!
//!     cd benches/matvec && cargo run --release            # built with -C target-cpu=native (.cargo/config.toml)
//!
//! Weight shapes are [out, in] as the model uses them: the tied 262144 x 640 output head (Q8_0), the
//! 640 -> 2048 gate/up projections (Q5_0), 1024 -> 640 attention output (Q4_K), 2048 -> 640 down (Q6_K).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use llama_cpp_sys_2 as g;
use std::time::Instant;

const THREADS: i32 = 2;

struct Case {
    name: &'static str,
    ggml: g::ggml_type,
    candle: GgmlDType,
    out: i64,
    inp: i64,
}

fn cases() -> Vec<Case> {
    vec![
        Case { name: "Q8_0 262144x640", ggml: g::GGML_TYPE_Q8_0, candle: GgmlDType::Q8_0, out: 262_144, inp: 640 },
        Case { name: "Q5_0 640->2048", ggml: g::GGML_TYPE_Q5_0, candle: GgmlDType::Q5_0, out: 2048, inp: 640 },
        Case { name: "Q4_K 1024->640", ggml: g::GGML_TYPE_Q4_K, candle: GgmlDType::Q4K, out: 640, inp: 1024 },
        Case { name: "Q6_K 2048->640", ggml: g::GGML_TYPE_Q6_K, candle: GgmlDType::Q6K, out: 640, inp: 2048 },
    ]
}

/// Deterministic values in [-1, 1).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Seconds per product, the median of `iters` after one warm-up.
fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn iters(rows: i64, case: &Case) -> usize {
    let macs = rows * case.out * case.inp;
    (2e10 / macs as f64).clamp(3.0, 200.0) as usize
}

/// ggml: a graph of one `ggml_mul_mat`, computed with `THREADS` threads.
fn ggml(case: &Case, rows: i64) -> (f64, usize) {
    // SAFETY: plain use of ggml's C API on a context we own: tensors are allocated in it (no_alloc false),
    // quantized row by row into their own data, and the context is freed at the end.
    unsafe {
        let row_bytes = g::ggml_row_size(case.ggml, case.inp);
        let weight_bytes = row_bytes * case.out as usize;
        // Room for the graph (2048 nodes) and tensor headers besides the data.
        let mem = weight_bytes + (rows * (case.inp + 64 * case.out)) as usize * 4 + (256 << 20);
        let ctx = g::ggml_init(g::ggml_init_params { mem_size: mem, mem_buffer: std::ptr::null_mut(), no_alloc: false });
        let w = g::ggml_new_tensor_2d(ctx, case.ggml, case.inp, case.out);
        let batch = 4096.min(case.out);
        let src = random((batch * case.inp) as usize, 1);
        let mut row = 0;
        while row < case.out {
            let n = batch.min(case.out - row);
            let dst = ((*w).data as *mut u8).add(row as usize * row_bytes);
            g::ggml_quantize_chunk(case.ggml, src.as_ptr(), dst.cast(), 0, n, case.inp, std::ptr::null());
            row += n;
        }
        let x = g::ggml_new_tensor_2d(ctx, g::GGML_TYPE_F32, case.inp, rows);
        let xs = random((rows * case.inp) as usize, 2);
        std::ptr::copy_nonoverlapping(xs.as_ptr(), (*x).data.cast::<f32>(), xs.len());
        // Small products are repeated inside one graph, as they sit in a model's decode graph: a compute
        // call starts its threads once, so one product per call would mostly measure that.
        let reps = (5e7 / (rows * case.out * case.inp) as f64).clamp(1.0, 64.0) as usize;
        let graph = g::ggml_new_graph(ctx);
        for _ in 0..reps {
            g::ggml_build_forward_expand(graph, g::ggml_mul_mat(ctx, w, x));
        }
        let seconds = time(iters(rows, case), || {
            g::ggml_graph_compute_with_ctx(ctx, graph, THREADS);
        });
        g::ggml_free(ctx);
        (seconds / reps as f64, weight_bytes)
    }
}

/// candle: `QMatMul::forward` on the CPU device (its own thread count: RAYON_NUM_THREADS or the CPUs).
fn candle(case: &Case, rows: i64) -> candle_core::Result<f64> {
    let device = Device::Cpu;
    let w = Tensor::from_vec(random((case.out * case.inp) as usize, 1), (case.out as usize, case.inp as usize), &device)?;
    let q = QMatMul::from_qtensor(QTensor::quantize(&w, case.candle)?)?;
    drop(w);
    let x = Tensor::from_vec(random((rows * case.inp) as usize, 2), (rows as usize, case.inp as usize), &device)?;
    let mut failed = None;
    let seconds = time(iters(rows, case), || {
        if let Err(e) = q.forward(&x) {
            failed = Some(e);
        }
    });
    match failed {
        Some(e) => Err(e),
        None => Ok(seconds),
    }
}

fn main() {
    // SAFETY: initializes ggml's CPU feature tables once, before any graph is computed.
    unsafe { g::ggml_cpu_init() };
    println!("threads: ggml {THREADS}, candle {}", candle_core::utils::get_num_threads());
    println!("| case | rows | ggml ms | candle ms | ggml GB/s or GMAC/s | candle GB/s or GMAC/s | candle / ggml |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for case in cases() {
        for rows in [1, 128] {
            let (g_s, bytes) = ggml(&case, rows);
            let c = candle(&case, rows);
            let rate = |s: f64| if rows == 1 { bytes as f64 / s / 1e9 } else { (rows * case.out * case.inp) as f64 / s / 1e9 };
            let unit = if rows == 1 { "GB/s" } else { "GMAC/s" };
            match c {
                Ok(c_s) => println!(
                    "| {} | {rows} | {:.2} | {:.2} | {:.1} {unit} | {:.1} {unit} | {:.2}x |",
                    case.name,
                    g_s * 1e3,
                    c_s * 1e3,
                    rate(g_s),
                    rate(c_s),
                    c_s / g_s
                ),
                Err(e) => println!("| {} | {rows} | {:.2} | error: {e} | {:.1} {unit} | - | - |", case.name, g_s * 1e3, rate(g_s)),
            }
        }
    }
}
