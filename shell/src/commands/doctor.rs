//! `edgechat doctor`: facts about this installation and a self-test of the tensor backend driven
//! through each adapter, checked against plain Rust arithmetic.

use crate::shell::Shell;
use crate::text::human_bytes;
use crate::adapter::{Adapter, CodeSource};
use crate::host::tensor::{active, ActiveBackend, Backend, BackendKind};
use crate::paths::free_space;
use anyhow::{bail, Result};
use std::time::Instant;

/// Size of the self-test matrices.
const N: usize = 8;
/// f32 results of different summation orders differ by a few ulps; anything real is far larger.
const TOLERANCE: f32 = 1e-5;
/// Both backends are self-tested, the one in use first.
const KINDS: [BackendKind; 2] = [BackendKind::Cpu, BackendKind::Mlx];

pub fn run() -> Result<()> {
    let shell = Shell::open()?;
    println!("edgechat {} ({}-{})", env!("CARGO_PKG_VERSION"), std::env::consts::OS, std::env::consts::ARCH);
    let chosen = active::chosen();
    for kind in KINDS {
        match (kind, active::cpu_unavailable()) {
            (BackendKind::Cpu, Some(why)) => println!("tensor backend   cpu  unavailable: {why}"),
            _ => {
                let note = if kind == chosen { "in use" } else { "available: --backend" };
                println!("tensor backend   {:<4} {} ({note})", kind.name(), ActiveBackend::of(kind).name());
            }
        }
    }
    println!("adapter runtime  wasmtime 48 (component model, no WASI; fuel {} per call, memory {} MiB)", shell.host.limits().fuel_per_call, shell.host.limits().memory_bytes >> 20);
    println!("data dir         {}", shell.paths.data.display());
    println!("cache dir        {}", shell.paths.cache.display());
    match free_space(&shell.paths.data) {
        Some(bytes) => println!("free disk        {}", human_bytes(bytes)),
        None => println!("free disk        unknown"),
    }
    for (path, problem) in shell.registry.refused() {
        println!("refused adapter  {}: {problem}", path.display());
    }
    if shell.registry.adapters.is_empty() {
        bail!("no adapters found: run `cargo xtask adapters`");
    }
    let mut failures = 0;
    for adapter in &shell.registry.adapters {
        match check_adapter(adapter) {
            Ok(line) => println!("adapter {:<8} ok: {line}", adapter.name()),
            Err(e) => {
                failures += 1;
                println!("adapter {:<8} FAILED: {e:#}", adapter.name());
            }
        }
    }
    if failures > 0 {
        bail!("{failures} adapter self-test(s) failed");
    }
    Ok(())
}

fn check_adapter(adapter: &Adapter) -> Result<String> {
    let code = match adapter.code {
        CodeSource::Compiled(d) => format!("compiled in {:.0} ms", d.as_secs_f64() * 1e3),
        CodeSource::Cached(d) => format!("loaded cached code in {:.1} ms", d.as_secs_f64() * 1e3),
    };
    let started = Instant::now();
    let mut session = adapter.instantiate()?;
    let instantiate = started.elapsed();

    const CALLS: u32 = 1000;
    let started = Instant::now();
    for _ in 0..CALLS {
        session.info()?;
    }
    let per_call = started.elapsed() / CALLS;

    let mut tests = Vec::new();
    let runnable = KINDS.into_iter().filter(|&kind| kind != BackendKind::Cpu || active::cpu_unavailable().is_none());
    for kind in runnable {
        // A fresh instance holds no arrays yet, so it may switch backends before the test.
        let mut session = adapter.instantiate()?;
        session.state_mut()?.tensors.backend = ActiveBackend::of(kind);
        let (a, b) = inputs();
        let started = Instant::now();
        let results = session.self_test(&a, &b, N as u32)?;
        let self_test = started.elapsed();
        let worst = verify(&a, &b, &results).map_err(|e| anyhow::anyhow!("{} backend: {e}", kind.name()))?;
        tests.push(format!("{} max |err| {worst:.1e} in {:.2} ms", kind.name(), self_test.as_secs_f64() * 1e3));
    }
    Ok(format!(
        "{code}, instantiated in {:.2} ms, info call {:.1} µs; matmul/rms-norm/softmax match Rust ({})",
        instantiate.as_secs_f64() * 1e3,
        per_call.as_secs_f64() * 1e6,
        tests.join(", "),
    ))
}

/// Deterministic inputs with mixed signs and magnitudes.
pub fn inputs() -> (Vec<f32>, Vec<f32>) {
    let a = (0..N * N).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
    let b = (0..N * N).map(|i| ((i * 53 % 29) as f32 - 14.0) / 9.0).collect();
    (a, b)
}

/// Checks [a @ b, rms-norm(a), softmax(a)] against plain Rust; returns the largest absolute error.
pub fn verify(a: &[f32], b: &[f32], results: &[Vec<f32>]) -> Result<f32> {
    if results.len() != 3 || results.iter().any(|r| r.len() != N * N) {
        bail!("self-test returned {} results of lengths {:?}, expected 3 of {}", results.len(), results.iter().map(Vec::len).collect::<Vec<_>>(), N * N);
    }
    let mut expected = vec![vec![0f32; N * N]; 3];
    for i in 0..N {
        let row = &a[i * N..(i + 1) * N];
        for j in 0..N {
            expected[0][i * N + j] = (0..N).map(|k| row[k] * b[k * N + j]).sum();
        }
        let rms = (row.iter().map(|x| x * x).sum::<f32>() / N as f32 + 1e-6).sqrt();
        let max = row.iter().cloned().fold(f32::MIN, f32::max);
        let total: f32 = row.iter().map(|x| (x - max).exp()).sum();
        for j in 0..N {
            expected[1][i * N + j] = row[j] / rms;
            expected[2][i * N + j] = (row[j] - max).exp() / total;
        }
    }
    let mut worst = 0f32;
    for (name, (got, want)) in ["matmul", "rms-norm", "softmax"].iter().zip(results.iter().zip(&expected)) {
        for (g, w) in got.iter().zip(want) {
            let err = (g - w).abs();
            if !(err <= TOLERANCE * w.abs().max(1.0)) {
                bail!("{name} differs from plain arithmetic: got {g}, expected {w}");
            }
            worst = worst.max(err);
        }
    }
    Ok(worst)
}
