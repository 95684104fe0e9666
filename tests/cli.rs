//! The `edgechat` binary end to end: output, errors and exit codes (0 ok, 1 runtime error, 2 usage).

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn edgechat(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgechat")).args(args).env("EDGECHAT_HOME", home).env_remove("EDGECHAT_LOG").output().unwrap()
}

/// With development (unsigned) adapters from the data dir enabled.
fn edgechat_dev(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgechat")).args(args).env("EDGECHAT_HOME", home).env("EDGECHAT_DEV_ADAPTERS", "1").env_remove("EDGECHAT_LOG").output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn golden(name: &str, add_generation_prompt: bool) -> serde_json::Value {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("template_goldens.json")).unwrap()).unwrap();
    cases.into_iter().find(|c| c["name"] == name && c["add_generation_prompt"] == add_generation_prompt).unwrap()
}

fn write_messages(dir: &Path, case: &serde_json::Value) -> String {
    let path = dir.join("messages.json");
    std::fs::write(&path, case["messages"].to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn prompt_writes_exactly_the_rendered_prompt() {
    let home = tempfile::tempdir().unwrap();
    for add_generation_prompt in [true, false] {
        let case = golden("system_folded_into_first_user", add_generation_prompt);
        let messages = write_messages(home.path(), &case);
        let mut args = vec!["prompt", "gemma-3-270m-it", "--messages", &messages];
        if !add_generation_prompt {
            args.push("--no-generation-prompt");
        }
        let out = edgechat(home.path(), &args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), case["gemma"].as_str().unwrap());

        args[1] = "lfm2-350m";
        let out = edgechat(home.path(), &args);
        assert_eq!(text(&out.stdout), case["lfm2"].as_str().unwrap());
    }
}

#[test]
fn prompt_uses_a_model_directorys_own_template() {
    let home = tempfile::tempdir().unwrap();
    let case = golden("unicode", true);
    let messages = write_messages(home.path(), &case);
    let dir = common::fixture("gemma3-chat");
    let out = edgechat(home.path(), &["prompt", dir.to_str().unwrap(), "--messages", &messages]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), case["gemma"].as_str().unwrap());
}

#[test]
fn template_errors_are_clear_runtime_errors() {
    let home = tempfile::tempdir().unwrap();
    let messages = write_messages(home.path(), &golden("invalid_two_users", true));
    let out = edgechat(home.path(), &["prompt", "gemma-3-1b-it", "--messages", &messages]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot format the chat for gemma-3-1b-it: Conversation roles must alternate"), "{stderr}");
}

#[test]
fn bad_input_files_name_the_problem() {
    let home = tempfile::tempdir().unwrap();
    let cases: [(&str, &str); 4] = [
        ("{not json", "messages are not valid JSON"),
        (r#"{"role": "user"}"#, "must be a JSON list"),
        (r#"[{"role": "user", "content": 3}]"#, "message 0: `content` must be a string"),
        (r#"[{"content": "x"}]"#, "message 0: `role` is missing"),
    ];
    for (content, expected) in cases {
        let path = home.path().join("bad.json");
        std::fs::write(&path, content).unwrap();
        let out = edgechat(home.path(), &["prompt", "gemma-3-270m-it", "--messages", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains(expected), "{content}: {}", text(&out.stderr));
    }
    let out = edgechat(home.path(), &["prompt", "gemma-3-270m-it", "--messages", "/nonexistent/m.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("reading /nonexistent/m.json"));
    let one = home.path().join("one.json");
    std::fs::write(&one, r#"[{"role": "user", "content": "x"}]"#).unwrap();
    let out = edgechat(home.path(), &["prompt", "no-such-model", "--messages", one.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("unknown model `no-such-model`"), "{}", text(&out.stderr));
}

#[test]
fn usage_errors_exit_with_2() {
    let home = tempfile::tempdir().unwrap();
    for args in [&[][..], &["prompt"][..], &["frobnicate"][..], &["models", "--bogus"][..]] {
        let out = edgechat(home.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    assert_eq!(edgechat(home.path(), &["--help"]).status.code(), Some(0));
}

#[test]
fn models_lists_the_catalog_as_the_adapters_describe_it() {
    let home = tempfile::tempdir().unwrap();
    let out = edgechat(home.path(), &["models"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for id in ["gemma-3-270m-it", "gemma-3-1b-it", "lfm2-350m", "lfm2-700m", "lfm2-1.2b"] {
        let line = stdout.lines().find(|l| l[2..].starts_with(id)).unwrap_or_else(|| panic!("{id} missing:\n{stdout}"));
        let provider = if id.starts_with("gemma") { "Google" } else { "Liquid AI" };
        assert!(line.contains(provider) && line.contains("MLX"), "{line}");
    }
    let out = edgechat(home.path(), &["models", "--json"]);
    let first: serde_json::Value = serde_json::from_str(text(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["id"], "gemma-3-270m-it");
    assert_eq!(first["provider"], "Google");
    assert_eq!(first["context_length"], 32768);
}

#[test]
fn adapters_list_shows_origin_and_hash_and_refuses_hostile_installs() {
    let home = tempfile::tempdir().unwrap();
    let installed = home.path().join("adapters");
    std::fs::create_dir_all(&installed).unwrap();
    let wasi = wat::parse_str(r#"(component (import "wasi:cli/environment@0.2.0" (instance)))"#).unwrap();
    std::fs::write(installed.join("sneaky.wasm"), wasi).unwrap();
    let out = edgechat(home.path(), &["adapters", "list"]);
    assert!(text(&out.stdout).contains("sneaky.wasm: unsigned; set EDGECHAT_DEV_ADAPTERS=1"), "{}", text(&out.stdout));
    let out = edgechat_dev(home.path(), &["adapters", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(common::component("gemma")).unwrap()))
    };
    let gemma = stdout.lines().find(|l| l.starts_with("gemma")).unwrap();
    assert!(gemma.contains("0.1.0") && gemma.contains("Gemma 3") && gemma.contains(&sha[..16]) && gemma.contains("gemma.wasm"), "{gemma}");
    assert!(stdout.lines().any(|l| l.starts_with("leap") && l.contains("LFM2")));
    assert!(stdout.contains("refused") && stdout.contains("sneaky.wasm") && stdout.contains("no WASI"), "{stdout}");
}

#[test]
fn a_development_adapter_replaces_the_builtin_one_of_the_same_name() {
    let home = tempfile::tempdir().unwrap();
    let installed = home.path().join("adapters");
    std::fs::create_dir_all(&installed).unwrap();
    std::fs::copy(common::component("leap"), installed.join("leap.wasm")).unwrap();
    let out = edgechat_dev(home.path(), &["adapters", "list"]);
    let stdout = text(&out.stdout);
    let leap: Vec<&str> = stdout.lines().filter(|l| l.starts_with("leap")).collect();
    assert_eq!(leap.len(), 2, "{stdout}");
    assert!(leap[0].contains("development") && leap[0].contains(" active ") && leap[0].contains(installed.to_str().unwrap()), "{stdout}");
    assert!(leap[1].contains("built-in") && leap[1].contains(" shadowed "), "{stdout}");
}

#[test]
fn doctor_runs_the_backend_self_test_through_each_adapter() {
    let home = tempfile::tempdir().unwrap();
    let out = edgechat(home.path(), &["doctor"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    // Both backends are named, the one in use marked, and each adapter's self-test runs on both.
    assert!(stdout.contains("tensor backend   cpu  ggml (CPU"), "{stdout}");
    assert!(stdout.contains("tensor backend   mlx  MLX ("), "{stdout}");
    assert_eq!(stdout.matches("(in use)").count(), 1, "{stdout}");
    for name in ["gemma", "leap"] {
        let line = stdout.lines().find(|l| l.starts_with(&format!("adapter {name}"))).unwrap();
        assert!(line.contains("match Rust (cpu max |err|") && line.contains(", mlx max |err|"), "{line}");
    }
    let chosen = edgechat(home.path(), &["--backend", "mlx", "doctor"]);
    let mlx_line = text(&chosen.stdout).lines().find(|l| l.starts_with("tensor backend   mlx")).map(str::to_owned);
    assert!(mlx_line.as_deref().is_some_and(|l| l.ends_with("(in use)")), "{mlx_line:?}");
    let refused = edgechat(home.path(), &["--backend", "gpu", "doctor"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(stdout.contains("free disk"));
}
