//! `edgechat bench`: prefill and decode speed of a model (median of runs), peak memory, and how much of
//! each forward pass is spent building the graph through the adapter (the WebAssembly boundary).

use super::run::peak_rss_bytes;
use crate::shell::Shell;
use crate::text::human_bytes;
use crate::generate::argmax;
use crate::host::tensor::cpu::{reused_graphs, unrecorded_steps};
use crate::host::weights::Precision;
use crate::models;
use crate::chat::{ChatSession, LoadedModel};
use anyhow::{bail, Result};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

pub struct BenchArgs {
    pub model: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub dtype: Option<Precision>,
    pub runs: usize,
    pub json: bool,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.prompt_tokens == 0 || args.gen_tokens < 2 || args.runs == 0 {
        bail!("need --prompt-tokens >= 1, --gen-tokens >= 2 and --runs >= 1");
    }
    let mut shell = Shell::open()?;
    let files = models::resolve(&shell, &args.model)?;
    let precision = files.precision(args.dtype)?;
    let started = Instant::now();
    // Token ids are made up here, so the tokenizer is not loaded: the peak RSS is the engine's and the
    // weights'. (Gemma 3's 262k-entry tokenizer.json adds ~150 MB to `run` and `chat`.)
    let adapter = shell.registry.keep_only_for_architecture(&files.architecture)?;
    let checkpoint = files.open(precision)?;
    let weight_bytes = checkpoint.checkpoint.stored_bytes();
    let mut model = crate::engine::Model::load(adapter, checkpoint)?;
    let load_time = started.elapsed();
    // A deterministic prompt of ordinary (non-special) token ids.
    let span = model.vocab.saturating_sub(1000).max(1);
    let prompt: Vec<u32> = (0..args.prompt_tokens as u32).map(|i| 1000 + (i * 7919) % span).collect();

    let (mut prefill, mut decode, mut build, mut reused, mut unrecorded) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..=args.runs {
        let cache = model.new_cache()?;
        let t = Instant::now();
        let mut next = model.forward_with(&prompt, &cache, argmax)?;
        let prefill_time = t.elapsed();
        let t = Instant::now();
        let built_before = model.graph_build_time();
        let (reused_before, unrecorded_before) = (reused_graphs(), unrecorded_steps());
        for _ in 1..args.gen_tokens {
            next = model.forward_with(&[next], &cache, argmax)?;
        }
        let decode_time = t.elapsed();
        let built = model.graph_build_time() - built_before;
        let unrecorded_steps = unrecorded_steps() - unrecorded_before;
        let steps_reused = reused_graphs() - reused_before + unrecorded_steps;
        if run == 0 {
            continue; // warm-up: first-touch of weights, allocator growth
        }
        prefill.push(args.prompt_tokens as f64 / prefill_time.as_secs_f64());
        decode.push((args.gen_tokens - 1) as f64 / decode_time.as_secs_f64());
        build.push(built.as_secs_f64() / decode_time.as_secs_f64());
        reused.push(steps_reused as f64 / (args.gen_tokens - 1) as f64);
        unrecorded.push(unrecorded_steps as f64 / (args.gen_tokens - 1) as f64);
    }
    let (prefill, decode, build) = (median(prefill), median(decode), median(build));
    // Graph reuse is the cpu backend's (MLX builds its own graphs).
    let on_cpu = crate::host::tensor::active::chosen() == crate::host::tensor::BackendKind::Cpu;
    let reused = on_cpu.then(|| median(reused));
    let unrecorded = on_cpu.then(|| median(unrecorded));
    let peak = peak_rss_bytes();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": args.model, "architecture": files.architecture, "backend": crate::host::tensor::active::chosen().name(), "engine": crate::host::tensor::Backend::name(&crate::host::tensor::ActiveBackend::default()),
                "adapter_engine": crate::adapter::engine_kind(),
                "dtype": format!("{precision:?}").to_lowercase(), "load_seconds": load_time.as_secs_f64(),
                "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "runs": args.runs,
                "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
                "boundary_share": build, "reused_graph_share": reused, "unrecorded_step_share": unrecorded, "peak_rss_bytes": peak, "weight_bytes": weight_bytes,
                "peak_rss_per_weight_byte": peak as f64 / weight_bytes.max(1) as f64,
            })
        );
        return Ok(());
    }
    println!("model            {} ({}, {:?})", args.model, files.architecture, precision);
    println!("load             {:.2} s", load_time.as_secs_f64());
    println!("prefill          {prefill:.1} tokens/s  ({} tokens, median of {})", args.prompt_tokens, args.runs);
    println!("decode           {decode:.2} tokens/s  ({} tokens, median of {})", args.gen_tokens, args.runs);
    println!("graph building   {:.1}% of decode time (adapter + host calls; an upper bound on the WASM boundary's cost)", build * 100.0);
    if let Some(reused) = reused {
        println!("graph reuse      {:.0}% of decode steps computed the ggml graph kept from the step before", reused * 100.0);
    }
    if let Some(unrecorded) = unrecorded {
        println!("unrecorded steps {:.0}% of decode steps were computed without recording their ops", unrecorded * 100.0);
    }
    println!(
        "peak RSS         {} ({:.2}x the weights' {} as stored)",
        human_bytes(peak),
        peak as f64 / weight_bytes.max(1) as f64,
        human_bytes(weight_bytes)
    );
    Ok(())
}

/// Time to the first token of a second chat turn that follows `history` tokens: once reusing the cache
/// the first turn left (only the new turn is computed), once from a fresh cache (everything again).
pub fn second_turn(model: &str, history: usize, runs: usize) -> Result<()> {
    let shell = Shell::open()?;
    let (mut reused, mut fresh) = (Vec::new(), Vec::new());
    let mut loaded = Some(LoadedModel::load(&shell, model, None)?);
    let sentence = "The quick brown fox jumps over the lazy dog while the river keeps flowing. ";
    let mut first = String::new();
    while loaded.as_ref().expect("loaded").encode(&first, false)?.len() < history {
        first.push_str(sentence);
    }
    let never = AtomicBool::new(false);
    for run in 0..=runs.max(1) {
        let mut session = ChatSession::new(loaded.take().expect("loaded"), None);
        session.settings.set("temperature", "0")?;
        session.settings.set("max_tokens", "8")?;
        session.model.reset_cache();
        session.send(&first, &never, |_| {})?;
        session.settings.set("max_tokens", "1")?;
        let with_cache = session.send("Summarize that in one word.", &never, |_| {})?;
        // The same prompt again from nothing.
        let messages = session.messages();
        session.model.reset_cache();
        let prepared = session.model.format(&messages[..messages.len() - 1], true)?;
        let started = Instant::now();
        session.model.generate(&prepared.ids, &prepared.stops, session.settings.sampling(&prepared.defaults), 1, &never, |_, _| {})?;
        let without = started.elapsed();
        if run > 0 {
            reused.push(with_cache.time_to_first_token.as_secs_f64());
            fresh.push(without.as_secs_f64());
        }
        if run == runs.max(1) {
            println!("model            {model}");
            println!("second turn      {} prompt tokens, {} of them from the cache", with_cache.prompt_tokens, with_cache.cached_tokens);
        }
        loaded = Some(session.model);
    }
    let (reused, fresh) = (median(reused), median(fresh));
    println!("first token      {:.0} ms with the cache reused, {:.0} ms with a fresh prefill: {:.1}x faster (median of {runs})", reused * 1e3, fresh * 1e3, fresh / reused);
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
