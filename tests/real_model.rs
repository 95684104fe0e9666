//! The real Gemma 3 270M (Q4_K_M GGUF, run at f32) against transformers: same prompt tokens, same
//! 32-token greedy continuation (tests/fixtures/gemma3-270m/make_reference.py). Needs the model that
//! `cargo xtask demo-model` fetches into .toolchain/demo; without it the test says so and passes, unless
//! EDGECHAT_REQUIRE_REAL_MODEL is set (as CI does).

mod common;

use edgechat::engine::Model;
use edgechat::generate::argmax;
use edgechat::host::weights::gguf::GgufCheckpoint;
use edgechat::host::weights::{OpenCheckpoint, Precision};

#[test]
fn gemma3_270m_continues_like_transformers() {
    let demo = common::workspace().join(".toolchain/demo");
    let gguf = demo.join("gemma-3-270m-q4_k_m.gguf");
    let tokenizer = demo.join("tokenizer/tokenizer.json");
    if !gguf.exists() || !tokenizer.exists() {
        assert!(std::env::var_os("EDGECHAT_REQUIRE_REAL_MODEL").is_none(), "{} is missing: run `cargo xtask demo-model`", gguf.display());
        eprintln!("skipped: {} not present (run `cargo xtask demo-model`)", gguf.display());
        return;
    }
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("gemma3-270m/reference.json")).unwrap()).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer).unwrap();
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
