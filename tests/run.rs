//! `edgechat import` and `edgechat run` end to end on the tiny reference models.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn edgechat(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgechat")).args(args).env("EDGECHAT_HOME", home).env_remove("EDGECHAT_LOG").output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn reference(model: &str, seq: &str) -> (String, Vec<u64>) {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture(&format!("tiny/ref/{model}.json"))).unwrap()).unwrap();
    let ids: Vec<String> = json["sequences"][seq]["input_ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let greedy = json["sequences"][seq]["greedy_32"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    (ids.join(","), greedy)
}

/// Runs with --json and returns (token ids, the final summary).
fn run_json(home: &Path, model: &str, ids: &str, extra: &[&str]) -> (Vec<u64>, serde_json::Value) {
    let mut args = vec!["run", model, "--input-ids", ids, "--json", "--temperature", "0", "--dtype", "f32"];
    args.extend_from_slice(extra);
    let out = edgechat(home, &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (summary, tokens) = lines.split_last().unwrap();
    (tokens.iter().map(|t| t["token"].as_u64().unwrap()).collect(), summary.clone())
}

#[test]
fn an_imported_model_runs_greedy_like_transformers() {
    let home = tempfile::tempdir().unwrap();
    let source = common::fixture("tiny/tiny-gemma3");
    let out = edgechat(home.path(), &["import", source.to_str().unwrap(), "--id", "tiny", "--dtype", "f32"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.path().join("Models/tiny/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["adapter"], "gemma");
    assert_eq!(manifest["architecture"], "gemma3_text");
    assert!(manifest["files"].as_array().unwrap().iter().any(|f| f["path"] == "model.safetensors" && f["sha256"].as_str().unwrap().len() == 64));

    let (ids, greedy) = reference("tiny-gemma3", "len24");
    let (tokens, summary) = run_json(home.path(), "tiny", &ids, &["--max-tokens", "32"]);
    assert_eq!(tokens, greedy);
    assert_eq!(summary["done"], true);
    assert_eq!(summary["prompt_tokens"], 24);
    assert_eq!(summary["generated_tokens"], 32);
    assert_eq!(summary["stop"], "max_tokens");
    for key in ["prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes"] {
        assert!(summary[key].as_f64().unwrap() > 0.0, "{key}: {summary}");
    }

    let again = edgechat(home.path(), &["import", source.to_str().unwrap(), "--id", "tiny"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains("already imported"), "{}", text(&again.stderr));
}

#[test]
fn a_model_directory_runs_directly_and_max_tokens_is_respected() {
    let home = tempfile::tempdir().unwrap();
    let (ids, greedy) = reference("tiny-lfm2", "len5");
    let dir = common::fixture("tiny/tiny-lfm2");
    let (tokens, _) = run_json(home.path(), dir.to_str().unwrap(), &ids, &["--max-tokens", "5"]);
    assert_eq!(tokens, greedy[..5]);
}

#[test]
fn broken_or_unknown_models_are_refused_and_leave_nothing_behind() {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();

    let llama = work.path().join("llama");
    std::fs::create_dir_all(&llama).unwrap();
    std::fs::write(llama.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let out = edgechat(home.path(), &["import", llama.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no installed adapter runs architecture `llama`"), "{}", text(&out.stderr));

    let broken = work.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(common::fixture("tiny/tiny-gemma3/config.json"), broken.join("config.json")).unwrap();
    let weights = std::fs::read(common::fixture("tiny/tiny-gemma3/model.safetensors")).unwrap();
    std::fs::write(broken.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    let out = edgechat(home.path(), &["import", broken.to_str().unwrap(), "--id", "broken"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("model.safetensors is not a valid safetensors file"), "{stderr}");
    let models = home.path().join("Models");
    assert!(!models.exists() || std::fs::read_dir(&models).unwrap().next().is_none(), "import left files behind");

    let out = edgechat(home.path(), &["run", "nothing-here", "--input-ids", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no model `nothing-here`"), "{}", text(&out.stderr));
}

#[test]
fn bad_run_input_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let dir = common::fixture("tiny/tiny-gemma3");
    let dir = dir.to_str().unwrap();
    let out = edgechat(home.path(), &["run", dir, "--input-ids", "5,99999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("token id 99999 is outside the vocabulary"), "{}", text(&out.stderr));
    let out = edgechat(home.path(), &["run", dir, "hello"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no tokenizer.json: use --input-ids"), "{}", text(&out.stderr));
    let out = edgechat(home.path(), &["run", dir, "--input-ids", "1,x"]);
    assert_eq!(out.status.code(), Some(2));
    let out = edgechat(home.path(), &["run", dir, "--input-ids", "1", "--dtype", "f64"]);
    assert_eq!(out.status.code(), Some(2));
}

/// `bench --json`: speeds, the boundary's share, and peak RSS beside the weight bytes it is judged against.
#[test]
fn bench_reports_its_figures_and_the_weight_bytes_as_stored() {
    let home = tempfile::tempdir().unwrap();
    let dir = common::fixture("tiny/tiny-gemma3");
    let out = edgechat(home.path(), &["bench", dir.to_str().unwrap(), "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    for key in ["prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes", "boundary_share"] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key}: {report}");
    }
    // A safetensors file is 8 length bytes, the JSON header, then the tensors' bytes.
    let file = std::fs::read(dir.join("model.safetensors")).unwrap();
    let header = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let weights = report["weight_bytes"].as_u64().unwrap();
    assert_eq!(weights as usize, file.len() - 8 - header);
    let ratio = report["peak_rss_per_weight_byte"].as_f64().unwrap();
    assert!((ratio - report["peak_rss_bytes"].as_f64().unwrap() / weights as f64).abs() < 1e-3 * ratio, "{report}");
}
