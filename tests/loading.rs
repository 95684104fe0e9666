//! Strict loading: a checkpoint is loaded whole or not at all. Tensors the graph leaves unused and
//! config flags the graph does not implement are errors naming them; logits of the wrong shape from an
//! adapter are refused before they are read.

mod common;

use edgechat::engine::Model;
use edgechat::host::weights::safetensors::SafetensorsCheckpoint;
use edgechat::host::weights::{OpenCheckpoint, Precision};
use std::path::Path;

/// A copy of a tiny fixture whose config.json is edited by `edit`, plus `extra` tensors in another file.
fn variant(model: &str, edit: impl FnOnce(&mut serde_json::Value), extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = common::fixture(&format!("tiny/{model}"));
    std::fs::copy(source.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(source.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    if !extra.is_empty() {
        let data = vec![0u8; 4 * 64];
        let views: Vec<(String, safetensors::tensor::TensorView)> = extra
            .iter()
            .map(|n| (n.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64], &data).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join("extra.safetensors")).unwrap();
    }
    dir
}

fn load(adapter: &str, dir: &Path) -> Result<Model, String> {
    let checkpoint = SafetensorsCheckpoint::open(dir).map_err(|e| format!("{e:#}"))?;
    Model::load(&common::load(adapter), OpenCheckpoint::new(Box::new(checkpoint), Precision::F32)).map_err(|e| format!("{e:#}"))
}

#[test]
fn unused_tensors_are_an_error_naming_them() {
    for (adapter, model, extra) in [("gemma", "tiny-gemma3", "lm_head.weight"), ("leap", "tiny-lfm2", "model.layers.0.conv.conv.bias")] {
        let dir = variant(model, |_| {}, &[extra]);
        let err = load(adapter, dir.path()).err().expect("a partial load must fail");
        assert!(err.contains(&format!("did not use 1 tensor(s) of the checkpoint ({extra})")), "{err}");
    }
    // The untouched fixtures load: the check does not refuse what the graph uses.
    assert!(load("gemma", &common::fixture("tiny/tiny-gemma3")).is_ok());
}

#[test]
fn conv_bias_biases_are_loaded_not_ignored() {
    // The conv-bias fixture with the flag switched off: its biases would go unused, which is refused.
    let dir = variant("tiny-lfm2-conv-bias", |c| c["conv_bias"] = false.into(), &[]);
    let err = load("leap", dir.path()).err().expect("ignoring the biases must fail");
    assert!(err.contains("conv.in_proj.bias") || err.contains("conv.conv.bias"), "{err}");
}

#[test]
fn config_flags_the_graph_does_not_implement_are_refused() {
    let cases: [(&str, &str, fn(&mut serde_json::Value)); 4] = [
        ("gemma", "tiny-gemma3", |c| c["attn_logit_softcapping"] = 50.0.into()),
        ("gemma", "tiny-gemma3", |c| c["hidden_activation"] = "silu".into()),
        ("gemma", "tiny-gemma3", |c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 8.0})),
        ("leap", "tiny-lfm2", |c| c["block_use_swiglu"] = false.into()),
    ];
    for (adapter, model, edit) in cases {
        let dir = variant(model, edit, &[]);
        let err = load(adapter, dir.path()).err().expect("an unimplemented flag must fail");
        assert!(err.contains("which this adapter does not implement"), "{err}");
    }
}

#[test]
fn logits_of_the_wrong_shape_are_refused_before_reading() {
    // The hostile adapter loads every tensor, reports 8 tokens of vocabulary and returns [1, 3] logits.
    let mut model = load("hostile", &common::fixture("tiny/tiny-lfm2")).unwrap();
    let cache = model.new_cache().unwrap();
    let err = format!("{:#}", model.forward(&[1, 2], &cache, false).unwrap_err());
    assert!(err.contains("returned logits of shape [1, 3] from forward, expected [1, 8]"), "{err}");
}

#[test]
fn caches_dropped_by_the_shell_are_released_in_the_adapter() {
    // A chat that resets, a server replacing caches, `run` answering prompt after prompt: each drops a
    // cache. Its arrays live in the adapter until the resource is dropped there; they must not pile up.
    for (adapter, model) in [("gemma", "tiny-gemma3"), ("leap", "tiny-lfm2")] {
        let mut model = load(adapter, &common::fixture(&format!("tiny/{model}"))).unwrap();
        let live = |m: &Model| m.session().state().expect("a live instance").tensors.live_handles;
        let one_cache_in_use = |m: &mut Model| {
            let cache = m.new_cache().unwrap();
            m.forward(&[1, 2, 3], &cache, false).unwrap();
            cache
        };
        let first = one_cache_in_use(&mut model);
        let settled = live(&model);
        drop(first);
        for _ in 0..20 {
            drop(one_cache_in_use(&mut model));
        }
        let _last = one_cache_in_use(&mut model);
        assert_eq!(live(&model), settled, "{adapter}: handles still live after 21 caches were dropped");
    }
}

/// `run` and `bench` load one model: the other adapters' code and memory are released before the weights
/// load (each is ~6 MiB of the peak RSS), and they stay listed.
#[test]
fn a_single_model_run_keeps_only_its_adapter_loaded() {
    let dirs = [common::workspace().join("target/adapters")];
    let mut registry = edgechat::registry::Registry::from_dirs(&common::host_with(Default::default()), &dirs);
    let listed = registry.listed.len();
    assert!(registry.adapters.len() >= 2, "both built-in adapters load");
    assert_eq!(registry.keep_only_for_architecture("gemma3").unwrap().name(), "gemma");
    assert_eq!(registry.adapters.iter().map(|a| a.name()).collect::<Vec<_>>(), ["gemma"]);
    assert_eq!(registry.listed.len(), listed);
    assert!(registry.for_architecture("lfm2").is_err(), "the leap adapter was released");
}
