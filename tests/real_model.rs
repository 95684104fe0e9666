//! The real Gemma 3 270M (Q4_K_M GGUF, run at f32) against transformers: same prompt tokens, same
//! 32-token greedy continuation (tests/fixtures/gemma3-270m/make_reference.py); and its quantized
//! execution (the GGUF's blocks multiplied as stored) against f32 on real text. Needs the model that
//! `cargo xtask demo-model` fetches into .toolchain/demo; without it the test says so and passes, unless
//! EDGECHAT_REQUIRE_REAL_MODEL is set (as CI does).

mod common;

use edgechat::engine::Model;
use edgechat::generate::argmax;
use edgechat::host::weights::gguf::GgufCheckpoint;
use edgechat::host::weights::{OpenCheckpoint, Precision};

/// The demo model's GGUF and tokenizer, or None (with a note) when they have not been fetched.
fn demo_model() -> Option<(std::path::PathBuf, edgechat::tokenizer::Tokenizer)> {
    let demo = common::workspace().join(".toolchain/demo");
    let gguf = demo.join("gemma-3-270m-q4_k_m.gguf");
    let tokenizer = demo.join("tokenizer/tokenizer.json");
    if !gguf.exists() || !tokenizer.exists() {
        assert!(std::env::var_os("EDGECHAT_REQUIRE_REAL_MODEL").is_none(), "{} is missing: run `cargo xtask demo-model`", gguf.display());
        eprintln!("skipped: {} not present (run `cargo xtask demo-model`)", gguf.display());
        return None;
    }
    Some((gguf, edgechat::tokenizer::load(&tokenizer).unwrap()))
}

/// Gemma 3's tokenizer (262144 tokens, 514906 merges) as we load it is the one `tokenizers` loads.
#[test]
fn the_real_tokenizer_loads_as_tokenizers_loads_it() {
    let Some((_, ours)) = demo_model() else { return };
    let theirs = tokenizers::Tokenizer::from_file(common::workspace().join(".toolchain/demo/tokenizer/tokenizer.json")).unwrap();
    assert_eq!(ours.to_string(false).unwrap(), theirs.to_string(false).unwrap());
    let chat = "<start_of_turn>user\nWhat is 2+2? Ünïcödé, 中文, emoji 🙂\t tabs<end_of_turn>\n<start_of_turn>model\n";
    let prose = std::fs::read_to_string(common::fixture("text/harbor.txt")).unwrap();
    // Text the vocabulary splits into bytes: private-use and unassigned-looking characters, controls.
    let rare = "\u{e000}\u{10fffd}\u{1}\u{7f} \u{2028}x\u{fe0f}\u{200d}👩\u{200d}🔬  \n\n\t\r\n";
    for text in [chat, &prose, rare] {
        let (a, b) = (ours.encode(text, true).unwrap(), theirs.encode(text, true).unwrap());
        assert_eq!(a.get_ids(), b.get_ids());
        assert_eq!(a.get_offsets(), b.get_offsets());
    }
    // Prose words, from a random character on, followed by arbitrary characters.
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config { cases: 300, ..Default::default() });
    let words = proptest::collection::vec(proptest::sample::select(prose.split(' ').map(str::to_string).collect::<Vec<_>>()), 0..12);
    let strategy = (words, "\\PC{0,6}", 0..40usize);
    runner
        .run(&strategy, |(words, odd, cut)| {
            let text: String = words.join(" ").chars().skip(cut).chain(odd.chars()).collect();
            let (a, b) = (ours.encode(text.as_str(), false).unwrap(), theirs.encode(text.as_str(), false).unwrap());
            proptest::prop_assert_eq!(a.get_ids(), b.get_ids(), "{:?}", text);
            Ok(())
        })
        .unwrap();
}

#[test]
fn gemma3_270m_continues_like_transformers() {
    let Some((gguf, tokenizer)) = demo_model() else { return };
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("gemma3-270m/reference.json")).unwrap()).unwrap();
    let checkpoint = GgufCheckpoint::open(&gguf).unwrap();
    let mut model = Model::load(&common::load("gemma"), OpenCheckpoint::new(Box::new(checkpoint), Precision::F32)).unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let ids: Vec<u32> = tokenizer.encode(case["prompt"].as_str().unwrap(), true).unwrap().get_ids().to_vec();
        let want_ids: Vec<u32> = case["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want_ids, "tokenization of {}", case["prompt"]);
        let cache = model.new_cache().unwrap();
        let mut next = argmax(&model.forward(&ids, &cache, false).unwrap());
        let mut generated = vec![next];
        while generated.len() < 32 {
            next = argmax(&model.forward(&[next], &cache, false).unwrap());
            generated.push(next);
        }
        let want: Vec<u32> = case["greedy_32"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(generated, want, "{}: got {:?}", case["prompt"], tokenizer.decode(&generated, true).unwrap());
    }
}

/// For each position of `tokens` (teacher-forced, `step` tokens per forward): the top-1 prediction with
/// its margin over the runner-up, and the natural log of the probability given to the token that
/// actually follows.
fn teacher_forced(model: &mut Model, tokens: &[u32], step: usize) -> (Vec<(u32, f32)>, Vec<f64>) {
    let (vocab, cache) = (model.vocab as usize, model.new_cache().unwrap());
    let (mut top, mut log_p) = (Vec::new(), Vec::new());
    for (c, chunk) in tokens.chunks(step).enumerate() {
        let logits = model.forward(chunk, &cache, true).unwrap();
        for (i, row) in logits.chunks(vocab).enumerate() {
            let best = argmax(row);
            let second = row.iter().enumerate().filter(|&(j, _)| j as u32 != best).map(|(_, &v)| v).fold(f32::MIN, f32::max);
            top.push((best, row[best as usize] - second));
            if let Some(&next) = tokens.get(c * step + i + 1) {
                let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
                let total: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                log_p.push(row[next as usize] as f64 - max - total.ln());
            }
        }
    }
    (top, log_p)
}

/// Quantized execution — the GGUF's Q8_0/Q5_0/Q4_K/Q6_K blocks multiplied as stored, the cpu backend's
/// default — against the same weights dequantized to f32, teacher-forced over ~750 tokens of plain
/// English (tests/fixtures/text/harbor.txt, written for this test): top-1 agreement >= 95 % (the
/// issue's bar), perplexities reported side by side. Quantized runs go both ways a model runs, 64 tokens
/// per forward as a prompt's chunks do and one token at a time as decode does: their attention kernels
/// differ, and over the f16 caches of block-quantized models decode's kernel sums values in f16.
#[test]
fn quantized_execution_agrees_with_f32_on_real_text() {
    if edgechat::host::tensor::active::chosen() != edgechat::host::tensor::BackendKind::Cpu {
        eprintln!("skipped: only the cpu backend multiplies blocks as stored (on MLX `auto` is f32)");
        return;
    }
    let Some((gguf, tokenizer)) = demo_model() else { return };
    let text = std::fs::read_to_string(common::fixture("text/harbor.txt")).unwrap();
    let tokens = tokenizer.encode(text.as_str(), true).unwrap().get_ids().to_vec();
    assert!(tokens.len() > 500, "{} tokens", tokens.len());
    let run = |precision, step| {
        let checkpoint = GgufCheckpoint::open(&gguf).unwrap();
        let mut model = Model::load(&common::load("gemma"), OpenCheckpoint::new(Box::new(checkpoint), precision)).unwrap();
        teacher_forced(&mut model, &tokens, step)
    };
    let (top_f32, log_p_f32) = run(Precision::F32, 64);
    for (step, way) in [(64, "in chunks of 64"), (1, "one token at a time")] {
        let (top_q, log_p_q) = run(Precision::Auto, step);
        agrees(way, (&top_f32, &log_p_f32), (&top_q, &log_p_q));
    }
}

/// Teacher-forced top-1 agreement of `quantized` with `f32`, counting near-ties, >= 95 %; perplexities
/// within 5 %.
fn agrees(way: &str, (top_f32, log_p_f32): (&[(u32, f32)], &[f64]), (top_q, log_p_q): (&[(u32, f32)], &[f64])) {
    let n = top_f32.len() as f64;
    let agree = top_f32.iter().zip(top_q).filter(|(a, b)| a.0 == b.0).count() as f64 / n;
    // As for greedy comparisons: where f32's own top two are within 0.01, either answer is right.
    let near_ties = top_f32.iter().zip(top_q).filter(|(a, b)| a.0 != b.0 && a.1 < 0.01).count() as f64 / n;
    let perplexity = |log_p: &[f64]| (-log_p.iter().sum::<f64>() / log_p.len() as f64).exp();
    let (p_f32, p_q) = (perplexity(log_p_f32), perplexity(log_p_q));
    eprintln!(
        "quantized ({way}) vs f32 over {} positions: top-1 agreement {:.1} % ({:.1} % more at near-ties), perplexity {p_q:.3} vs {p_f32:.3} ({:+.2} %)",
        top_f32.len(),
        agree * 100.0,
        near_ties * 100.0,
        (p_q / p_f32 - 1.0) * 100.0
    );
    assert!(agree + near_ties >= 0.95, "{way}: top-1 agreement {:.1} % is below 95 %", (agree + near_ties) * 100.0);
    assert!((p_q / p_f32 - 1.0).abs() < 0.05, "{way}: perplexity {p_q} (quantized) vs {p_f32} (f32)");
}

/// The 0.1.0 adapter (tests/fixtures/adapters) gets the GGUF's blocks reported as float32 arrays and the
/// current one as block dtypes. Dequantized to f32, both run the same graph: the same logits, bit for
/// bit. With the blocks as stored, both multiply the same blocks, but the current adapter, seeing block
/// dtypes, caches keys and values in f16 (as llama.cpp does) where the 0.1.0 one keeps f32: the same
/// top token at every position, the logits apart by f16's rounding carried through 18 layers (measured
/// 0.65 at most over 2.6 M logits). (On MLX, which dequantizes blocks, `auto` is f32 and both agree exactly.)
#[test]
fn both_contract_versions_compute_the_same_on_the_real_gguf() {
    let Some((gguf, tokenizer)) = demo_model() else { return };
    let ids = tokenizer.encode("The harbor town woke slowly in the winter.", true).unwrap().get_ids().to_vec();
    let old = common::host_with(Default::default()).load(&common::fixture("adapters/gemma-0.1.0.wasm")).unwrap();
    let current = common::load("gemma");
    let logits = |adapter: &edgechat::adapter::Adapter, precision| {
        let checkpoint = GgufCheckpoint::open(&gguf).unwrap();
        let mut model = Model::load(adapter, OpenCheckpoint::new(Box::new(checkpoint), precision)).unwrap();
        let cache = model.new_cache().unwrap();
        model.forward(&ids, &cache, true).unwrap()
    };
    assert_eq!(logits(&old, Precision::F32), logits(&current, Precision::F32));
    let (old, current) = (logits(&old, Precision::Auto), logits(&current, Precision::Auto));
    if edgechat::host::tensor::active::chosen() != edgechat::host::tensor::BackendKind::Cpu {
        // MLX dequantizes the blocks: both run in f32, f32 caches included.
        assert_eq!(old, current);
        return;
    }
    assert_ne!(old, current, "the current adapter should cache keys and values of block weights in f16");
    let vocab = old.len() / ids.len();
    for (position, (a, b)) in old.chunks(vocab).zip(current.chunks(vocab)).enumerate() {
        assert_eq!(argmax(a), argmax(b), "position {position}: the two contract versions' top tokens differ");
    }
    let worst = old.iter().zip(&current).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < 1.0, "the two contract versions' logits differ by up to {worst}");
}
