//! Signed adapter updates end to end, through the `edgechat` binary: keys, packages, install, rollback,
//! remove, development adapters, the signed index (served from 127.0.0.1), and every refusal leaving
//! the active adapter untouched. The package installed is tests/guests/gemma-next: the gemma adapter at
//! version 1.2.0 with a changed chat template, so a switch is visible in `edgechat prompt`.

mod common;

use edgechat::updates::package::{Package, PackageManifest};
use edgechat::updates::signing::SecretKey;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn edgechat_env(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgechat"));
    cmd.args(args).env("EDGECHAT_HOME", home).env_remove("EDGECHAT_LOG").env_remove("EDGECHAT_DEV_ADAPTERS").env_remove("EDGECHAT_ADAPTER_INDEX");
    cmd.envs(env.iter().copied()).output().unwrap()
}

fn edgechat(home: &Path, args: &[&str]) -> Output {
    edgechat_env(home, args, &[])
}

fn ok(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "stdout: {}\nstderr: {}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// A refusal: exit code 1 and one line on stderr saying why.
fn refused(out: &Output, why: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected a refusal ({why}); stdout: {}\nstderr: {stderr}", text(&out.stdout));
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(why), "expected {why:?} in: {stderr}");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `adapters list --json`, as (name, version, origin kind, state).
fn listed(home: &Path, env: &[(&str, &str)]) -> Vec<(String, String, String, String)> {
    ok(&edgechat_env(home, &["adapters", "list", "--json"], env))
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let field = |x: &serde_json::Value| x.as_str().unwrap_or("").to_owned();
            (field(&v["name"]), field(&v["version"]), field(&v["origin"]["kind"]), field(&v["state"]["state"]))
        })
        .collect()
}

fn active(home: &Path, name: &str) -> (String, String) {
    let all = listed(home, &[]);
    let found: Vec<_> = all.iter().filter(|l| l.0 == name && l.3 == "active").collect();
    assert_eq!(found.len(), 1, "{all:?}");
    (found[0].1.clone(), found[0].2.clone())
}

struct Publisher {
    dir: tempfile::TempDir,
    key: PathBuf,
}

impl Publisher {
    fn new(home: &Path) -> Publisher {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("publisher.key");
        ok(&edgechat(home, &["adapters", "keygen", s(&key)]));
        Publisher { dir, key }
    }

    fn pubfile(&self) -> PathBuf {
        self.dir.path().join("publisher.key.pub")
    }

    /// gemma-next with its version replaced (same length, so the component stays valid).
    fn component(&self, version: &str) -> PathBuf {
        let bytes = std::fs::read(common::component("gemma-next")).unwrap();
        assert_eq!(version.len(), 5);
        let at: Vec<usize> = bytes.windows(5).enumerate().filter(|(_, w)| *w == b"1.2.0").map(|(i, _)| i).collect();
        assert_eq!(at.len(), 1, "the version string appears once in gemma-next.wasm");
        let mut patched = bytes;
        patched[at[0]..at[0] + 5].copy_from_slice(version.as_bytes());
        let path = self.dir.path().join(format!("gemma-{version}.wasm"));
        std::fs::write(&path, patched).unwrap();
        path
    }

    fn pack(&self, home: &Path, version: &str, out_dir: &Path) -> PathBuf {
        let out = out_dir.join(format!("gemma-{version}.ecpkg"));
        ok(&edgechat(home, &["adapters", "pack", s(&self.component(version)), "--key", s(&self.key), "--out", s(&out)]));
        out
    }
}

fn system_messages(home: &Path) -> PathBuf {
    let path = home.join("system.json");
    std::fs::write(&path, r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]"#).unwrap();
    path
}

fn prompt(home: &Path, env: &[(&str, &str)]) -> String {
    let messages = system_messages(home);
    ok(&edgechat_env(home, &["prompt", "gemma-3-270m-it", "--messages", s(&messages)], env))
}

#[test]
fn a_signed_package_installs_changes_the_prompt_and_rolls_back() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let publisher = Publisher::new(home);
    let package = publisher.pack(home, "1.2.0", publisher.dir.path());
    assert!(!prompt(home, &[]).contains("System: "), "the built-in template");

    refused(&edgechat(home, &["adapters", "install", s(&package)]), "which this installation does not trust");
    let trusted = ok(&edgechat(home, &["adapters", "trust", s(&publisher.pubfile())]));
    let key_id = trusted.split_whitespace().last().unwrap().to_owned();
    assert!(ok(&edgechat(home, &["adapters", "keys"])).contains(&key_id));

    let out = ok(&edgechat(home, &["adapters", "install", s(&package)]));
    assert!(out.contains("gemma 1.2.0 installed") && out.contains(&key_id) && out.contains("previous: 0.1.0 (built-in)"), "{out}");
    assert_eq!(active(home, "gemma"), ("1.2.0".into(), "installed".into()));
    assert!(prompt(home, &[]).starts_with("<bos><start_of_turn>user\nSystem: Be brief."), "the new template runs, no rebuild");
    assert!(ok(&edgechat(home, &["adapters", "install", s(&package)])).contains("already active"));

    assert!(ok(&edgechat(home, &["adapters", "rollback", "gemma"])).contains("rolled back to the built-in gemma"));
    assert_eq!(active(home, "gemma"), ("0.1.0".into(), "built-in".into()));
    assert!(!prompt(home, &[]).contains("System: "));
    assert!(listed(home, &[]).iter().any(|l| l.1 == "1.2.0" && l.3 == "kept"), "the rolled-back version is kept");
    // Rolling back again goes forward to the kept version (verified again first).
    ok(&edgechat(home, &["adapters", "rollback", "gemma"]));
    assert_eq!(active(home, "gemma").0, "1.2.0");

    let newer = publisher.pack(home, "1.3.0", publisher.dir.path());
    assert!(ok(&edgechat(home, &["adapters", "install", s(&newer)])).contains("previous: 1.2.0"));
    assert!(ok(&edgechat(home, &["adapters", "rollback", "gemma"])).contains("rolled back to gemma 1.2.0"));
    assert_eq!(active(home, "gemma").0, "1.2.0");

    ok(&edgechat(home, &["adapters", "remove", "gemma"]));
    assert_eq!(active(home, "gemma"), ("0.1.0".into(), "built-in".into()));
    assert!(!home.join("adapters/installed/gemma").exists(), "remove deletes the packages");
    refused(&edgechat(home, &["adapters", "remove", "gemma"]), "no installed version of `gemma`");
    refused(&edgechat(home, &["adapters", "rollback", "gemma"]), "nothing to roll back");
}

/// A package signed by the trusted key, built by hand: what a compromised build pipeline could produce.
fn crafted(publisher: &Publisher, component: &[u8], edit: impl FnOnce(&mut PackageManifest)) -> Vec<u8> {
    let host = common::host_with(Default::default());
    let info = host.load_bytes(component, Path::new("x.wasm"), edgechat::adapter::Origin::Development).unwrap().info;
    let mut manifest = PackageManifest::describe(&info, component);
    edit(&mut manifest);
    Package::build(component.to_vec(), &manifest, &SecretKey::read(&publisher.key).unwrap()).unwrap()
}

#[test]
fn every_refused_package_leaves_the_active_adapter_untouched() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let publisher = Publisher::new(home);
    ok(&edgechat(home, &["adapters", "trust", s(&publisher.pubfile())]));
    ok(&edgechat(home, &["adapters", "install", s(&publisher.pack(home, "1.2.0", publisher.dir.path()))]));
    let good = std::fs::read(publisher.pack(home, "1.3.0", publisher.dir.path())).unwrap();
    let component = std::fs::read(publisher.component("1.3.0")).unwrap();
    let installed_dir = home.join("adapters/installed/gemma");
    let files_before: Vec<_> = std::fs::read_dir(&installed_dir).unwrap().map(|e| e.unwrap().file_name()).collect();

    let stranger = Publisher::new(home);
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    // One byte of the component flipped, inside the archive.
    let mut tampered = good.clone();
    let at = tampered.len() - 4096;
    tampered[at] ^= 1;
    cases.push(("tampered component", tampered, "does not match the signed manifest"));
    let mut tampered = good.clone();
    let manifest_at = tampered.windows(7).position(|w| w == b"\"1.3.0\"").unwrap();
    tampered[manifest_at + 3] = b'9';
    cases.push(("tampered manifest", tampered, "does not verify"));
    cases.push(("untrusted key", std::fs::read(stranger.pack(home, "1.3.0", stranger.dir.path())).unwrap(), "does not trust"));
    cases.push(("downgrade", std::fs::read(publisher.pack(home, "0.1.5", publisher.dir.path())).unwrap(), "use `edgechat adapters rollback gemma`"));
    cases.push(("unknown contract", crafted(&publisher, &component, |m| m.adapter.contract_version = "9.0.0".into()), "contract 9.0.0"));
    cases.push(("name/version mismatch", crafted(&publisher, &component, |m| m.adapter.version = "1.4.0".into()), "but the component says gemma 1.3.0"));
    let hostile = std::fs::read(common::component("hostile")).unwrap();
    cases.push(("failed smoke test", crafted(&publisher, &hostile, |_| {}), "fails the conformance smoke test"));
    cases.push(("not a package", b"MZ\x90\0 not a tar".to_vec(), "refusing to install"));

    for (what, bytes, why) in cases {
        let path = home.join("candidate.ecpkg");
        std::fs::write(&path, bytes).unwrap();
        let out = edgechat(home, &["adapters", "install", s(&path)]);
        refused(&out, why);
        assert_eq!(active(home, "gemma"), ("1.2.0".into(), "installed".into()), "{what} left gemma 1.2.0 active");
        let files: Vec<_> = std::fs::read_dir(&installed_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(files, files_before, "{what} wrote no package");
    }
    // The hostile component was refused by the smoke test, not installed under its own name.
    assert!(!home.join("adapters/installed/hostile").exists());
}

#[test]
fn untrusting_a_key_refuses_what_it_signed() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let publisher = Publisher::new(home);
    let key_id = ok(&edgechat(home, &["adapters", "trust", s(&publisher.pubfile())])).split_whitespace().last().unwrap().to_owned();
    ok(&edgechat(home, &["adapters", "install", s(&publisher.pack(home, "1.2.0", publisher.dir.path()))]));
    ok(&edgechat(home, &["adapters", "untrust", &key_id]));
    assert_eq!(active(home, "gemma"), ("0.1.0".into(), "built-in".into()));
    let refused_line = listed(home, &[]).into_iter().find(|l| l.2 == "installed" && l.3 == "refused");
    assert!(refused_line.is_some(), "the installed package is listed as refused");
    assert!(ok(&edgechat(home, &["adapters", "list"])).contains("does not trust"));
    refused(&edgechat(home, &["adapters", "untrust", &key_id]), "no trusted key");
}

#[test]
fn unsigned_components_run_only_as_development_adapters() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    std::fs::create_dir_all(home.join("adapters")).unwrap();
    std::fs::copy(common::component("gemma-next"), home.join("adapters/gemma-next.wasm")).unwrap();

    let unsigned = listed(home, &[]).into_iter().find(|l| l.2 == "development").unwrap();
    assert_eq!(unsigned.3, "refused");
    assert!(ok(&edgechat(home, &["adapters", "list"])).contains("unsigned; set EDGECHAT_DEV_ADAPTERS=1"));
    assert_eq!(active(home, "gemma").1, "built-in");
    assert!(!prompt(home, &[]).contains("System: "), "the unsigned file does not run");

    let dev = [("EDGECHAT_DEV_ADAPTERS", "1")];
    let found = listed(home, &dev);
    assert!(found.iter().any(|l| l.0 == "gemma" && l.1 == "1.2.0" && l.2 == "development" && l.3 == "active"), "{found:?}");
    assert!(found.iter().any(|l| l.0 == "gemma" && l.2 == "built-in" && l.3 == "shadowed"), "{found:?}");
    assert!(prompt(home, &dev).contains("System: Be brief."));
}

#[test]
fn an_interrupted_install_leaves_a_working_adapter() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let publisher = Publisher::new(home);
    ok(&edgechat(home, &["adapters", "trust", s(&publisher.pubfile())]));
    let package = publisher.pack(home, "1.2.0", publisher.dir.path());
    let mut outcomes = std::collections::BTreeSet::new();
    for delay_ms in [0, 2, 5, 10, 20, 40, 80, 120, 200, 300, 500, 800] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgechat"))
            .args(["adapters", "install", s(&package)])
            .env("EDGECHAT_HOME", home)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // Whatever the moment, one gemma is active, it loads, and it formats prompts.
        let (version, origin) = active(home, "gemma");
        let text = prompt(home, &[]);
        match (version.as_str(), origin.as_str()) {
            ("0.1.0", "built-in") => assert!(!text.contains("System: ")),
            ("1.2.0", "installed") => {
                assert!(text.contains("System: "));
                ok(&edgechat(home, &["adapters", "remove", "gemma"]));
            }
            other => panic!("after a kill at {delay_ms} ms: {other:?}"),
        }
        outcomes.insert(version);
    }
    eprintln!("outcomes seen: {outcomes:?}");
    assert!(outcomes.contains("0.1.0"), "a kill right after the start leaves the built-in adapter");
}

/// Serves the files of a directory over HTTP on 127.0.0.1 (one thread, one request per connection).
fn serve(dir: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_owned();
            let response = match std::fs::read(dir.join(&path)) {
                Ok(body) if !path.contains("..") => {
                    let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes();
                    r.extend(body);
                    r
                }
                _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            };
            let _ = stream.write_all(&response);
        }
    });
    url
}

#[test]
fn the_signed_index_installs_what_is_newer_and_refuses_replays_expiry_and_strangers() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let publisher = Publisher::new(home);
    ok(&edgechat(home, &["adapters", "trust", s(&publisher.pubfile())]));
    let site = tempfile::tempdir().unwrap();
    let base = serve(site.path().to_owned());
    let index_url = format!("{base}/index.json");
    let env = [("EDGECHAT_HUB_ENDPOINT", base.as_str())];
    let update = |args: &[&str]| {
        let mut all = vec!["adapters", "update", "--index", &index_url];
        all.extend_from_slice(args);
        edgechat_env(home, &all, &env)
    };

    publisher.pack(home, "1.2.0", site.path());
    let built = ok(&edgechat(home, &["adapters", "index", "build", s(site.path()), "--key", s(&publisher.key)]));
    assert!(built.contains("version 1"), "{built}");
    let index_v1 = std::fs::read(site.path().join("index.json")).unwrap();

    let check = ok(&update(&["--check"]));
    assert!(check.contains("gemma: 0.1.0 -> 1.2.0 available"), "{check}");
    assert_eq!(active(home, "gemma").1, "built-in", "--check installs nothing");
    assert!(ok(&update(&[])).contains("gemma: 0.1.0 -> 1.2.0 installed"));
    assert_eq!(active(home, "gemma"), ("1.2.0".into(), "installed".into()));
    assert!(ok(&update(&[])).contains("gemma: 1.2.0 is up to date"));

    publisher.pack(home, "1.3.0", site.path());
    assert!(ok(&edgechat(home, &["adapters", "index", "build", s(site.path()), "--key", s(&publisher.key)])).contains("version 2"));
    let index_v2 = std::fs::read(site.path().join("index.json")).unwrap();
    // The remembered URL is used without --index.
    assert!(ok(&edgechat_env(home, &["adapters", "update"], &env)).contains("gemma: 1.2.0 -> 1.3.0 installed"));

    // A rollback of the adapter does not make the index reinstall what was rolled back from, nor can an
    // index offer less than what was once installed.
    ok(&edgechat(home, &["adapters", "rollback", "gemma"]));
    assert!(ok(&update(&[])).contains("gemma: 1.2.0 is up to date"));

    std::fs::write(site.path().join("index.json"), &index_v1).unwrap();
    refused(&update(&[]), "older than version 2 already seen here");

    let mut unsigned: serde_json::Value = serde_json::from_slice(&index_v2).unwrap();
    unsigned["signatures"] = serde_json::json!([]);
    std::fs::write(site.path().join("index.json"), unsigned.to_string()).unwrap();
    refused(&update(&[]), "is not signed");

    let stranger = Publisher::new(home);
    std::fs::write(site.path().join("index.json"), &index_v2).unwrap();
    ok(&edgechat(home, &["adapters", "index", "build", s(site.path()), "--key", s(&stranger.key)]));
    refused(&update(&[]), "does not trust");

    std::fs::write(site.path().join("index.json"), &index_v2).unwrap();
    ok(&edgechat(home, &["adapters", "index", "build", s(site.path()), "--key", s(&publisher.key), "--expires", "1s"]));
    std::thread::sleep(std::time::Duration::from_millis(2100));
    refused(&update(&[]), "expired at");

    // A package altered on the server after the index was signed.
    publisher.pack(home, "1.4.0", site.path());
    ok(&edgechat(home, &["adapters", "index", "build", s(site.path()), "--key", s(&publisher.key)]));
    let mut package = std::fs::read(site.path().join("gemma-1.4.0.ecpkg")).unwrap();
    let last = package.len() - 2048;
    package[last] ^= 1;
    std::fs::write(site.path().join("gemma-1.4.0.ecpkg"), package).unwrap();
    refused(&update(&[]), "does not match the index's sha256");
    assert_eq!(active(home, "gemma"), ("1.2.0".into(), "installed".into()), "every refusal left the active adapter alone");
}

#[test]
fn a_package_installs_from_a_url_through_the_download_path() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let publisher = Publisher::new(home);
    ok(&edgechat(home, &["adapters", "trust", s(&publisher.pubfile())]));
    let site = tempfile::tempdir().unwrap();
    publisher.pack(home, "1.2.0", site.path());
    let base = serve(site.path().to_owned());
    let url = format!("{base}/gemma-1.2.0.ecpkg");
    // Not the hub and plain http on loopback: refused like any undeclared host.
    refused(&edgechat(home, &["adapters", "install", &url]), "would be reached over plain http");
    let env = [("EDGECHAT_HUB_ENDPOINT", base.as_str())];
    assert!(ok(&edgechat_env(home, &["adapters", "install", &url], &env)).contains("gemma 1.2.0 installed"));
    refused(&edgechat_env(home, &["adapters", "install", &format!("{base}/missing.ecpkg")], &env), "404");
}

#[test]
fn the_conformance_kit_passes_the_adapters_and_fails_what_breaks_a_case() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let tiny = |p: &str| common::fixture(&format!("tiny/{p}"));
    for (adapter, model, goldens) in [("gemma", "tiny-gemma3", "gemma"), ("leap", "tiny-lfm2", "leap")] {
        let out = ok(&edgechat(home, &[
            "adapters", "test", s(&common::component(adapter)),
            "--fixture", s(&tiny(model)), "--reference", s(&tiny(&format!("ref/{model}.json"))),
            "--templates", s(&common::fixture(&format!("templates/{goldens}.json"))), "--json",
        ]));
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["passed"], true, "{report:#}");
        let names: Vec<&str> = report["cases"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["contract", "info", "catalog", "prompt", "determinism", "templates", &format!("fixture {model}"), "limits"]);
    }
    // The table form, and failures: a template that differs from the goldens, a model from another family.
    let next = edgechat(home, &["adapters", "test", s(&common::component("gemma-next")), "--templates", s(&common::fixture("templates/gemma.json"))]);
    refused(&next, "templates: golden system_folded_into_first_user: differs from byte");
    assert!(text(&next.stdout).lines().any(|l| l.starts_with("templates ") && l.contains(" FAIL ")), "{}", text(&next.stdout));
    let wrong = edgechat(home, &["adapters", "test", s(&common::component("gemma")), "--fixture", s(&tiny("tiny-lfm2")), "--reference", s(&tiny("ref/tiny-lfm2.json"))]);
    refused(&wrong, "fixture tiny-lfm2");
    refused(&edgechat(home, &["adapters", "test", s(&common::component("hostile"))]), "prompt: single user turn: the generation prompt is not an addition");
    refused(&edgechat(home, &["adapters", "test", s(&common::fixture("tiny/tiny-gemma3/config.json"))]), "contract");
}
