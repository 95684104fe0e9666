//! Pulling models from a hub: the real download code against a local imitation of the hub
//! (tests/common/hub_server.rs) with faults injected: dropped connections, flipped bytes, 500s, a slow
//! link killed with SIGKILL, a gated repository, a disk too small, concurrent pulls, and `rm`.

mod common;
#[path = "common/hub_server.rs"]
mod hub_server;

use hub_server::{FakeHub, File};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const REPO: &str = "mlx-community/gemma-3-270m-it-bf16";
const DIR: &str = "Models/mlx-community--gemma-3-270m-it-bf16";

fn fixture(name: &str) -> Arc<Vec<u8>> {
    Arc::new(std::fs::read(common::fixture(&format!("tiny/tiny-gemma3/{name}"))).unwrap())
}

/// The catalog's gemma-3-270m-it repository, holding the tiny Gemma 3 (plus a file a snapshot skips).
fn hub() -> FakeHub {
    let hub = FakeHub::start();
    hub.add_repo(
        REPO,
        vec![
            File { name: "config.json".into(), data: fixture("config.json"), lfs: false },
            File { name: "model.safetensors".into(), data: fixture("model.safetensors"), lfs: true },
            File { name: "README.md".into(), data: Arc::new(b"# not needed".to_vec()), lfs: false },
        ],
    );
    hub
}

fn command(home: &Path, hub: &FakeHub, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgechat"));
    cmd.args(args).env("EDGECHAT_HOME", home).env("EDGECHAT_HUB_ENDPOINT", &hub.url).env_remove("HF_TOKEN").env_remove("HF_ENDPOINT");
    // The hostile test adapter runs as a development adapter (a signed one would pass the same checks).
    cmd.env("EDGECHAT_DEV_ADAPTERS", "1");
    cmd
}

fn edgechat(home: &Path, hub: &FakeHub, args: &[&str]) -> Output {
    command(home, hub, args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Where the weights download before they are verified: named after the version (hash) they belong to.
fn partial_of(dir: &Path) -> std::path::PathBuf {
    dir.join(format!("model.safetensors.{}.partial", &hub_server::sha256(&fixture("model.safetensors"))[..16]))
}

fn assert_pulled(home: &Path) {
    let dir = home.join(DIR);
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), *fixture("model.safetensors"));
    assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), *fixture("config.json"));
    assert!(!partial_of(&dir).exists());
    assert!(!dir.join("README.md").exists(), "files a snapshot does not need are skipped");
}

#[test]
fn a_catalog_model_pulls_verifies_and_runs() {
    let hub = hub();
    let home = tempfile::tempdir().unwrap();
    let out = edgechat(home.path(), &hub, &["pull", "gemma-3-270m-it", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_pulled(home.path());
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let fractions: Vec<f64> = events.iter().filter(|e| e["event"] == "progress").map(|e| e["fraction"].as_f64().unwrap()).collect();
    assert!(fractions.windows(2).all(|w| w[0] <= w[1]) && fractions.iter().all(|f| (0.0..=1.0).contains(f)), "{fractions:?}");
    assert_eq!(events.last().unwrap()["event"], "done");

    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(home.path().join(DIR).join("manifest.json")).unwrap()).unwrap();
    let sha = hub.state.lock().unwrap().repos[REPO].sha.clone();
    assert_eq!(manifest["revision"], sha);
    assert_eq!(manifest["adapter"], "gemma");

    // Again: nothing to do.
    let requests = hub.state.lock().unwrap().requests.len();
    let out = edgechat(home.path(), &hub, &["pull", "gemma-3-270m-it"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("already downloaded"));
    let cdn = hub.state.lock().unwrap().requests[requests..].iter().filter(|r| r.0.starts_with("/cdn/")).count();
    assert_eq!(cdn, 0, "a complete model is not downloaded again");

    // `models` shows it downloaded, with its size and revision; `select` remembers it.
    let out = edgechat(home.path(), &hub, &["select", "gemma-3-270m-it"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = edgechat(home.path(), &hub, &["models", "--json"]);
    let listed: serde_json::Value = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|m| m["id"] == "gemma-3-270m-it").unwrap();
    assert_eq!(listed["downloaded"], true);
    assert_eq!(listed["revision"], sha);
    assert_eq!(listed["selected"], true);
    let expected_bytes = fixture("model.safetensors").len() + fixture("config.json").len();
    assert_eq!(listed["bytes_on_disk"], expected_bytes);

    // A file changed behind edgechat's back no longer counts as downloaded.
    let weights = home.path().join(DIR).join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    let out = edgechat(home.path(), &hub, &["models", "--json"]);
    let listed: serde_json::Value = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|m| m["id"] == "gemma-3-270m-it").unwrap();
    assert_eq!(listed["downloaded"], false);
    bytes[1000] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();

    // Both pulls are on record in edgechat.db.
    let db = edgechat::db::Db::open(&home.path().join("edgechat.db")).unwrap();
    let records = db.downloads("gemma-3-270m-it").unwrap();
    let outcomes: Vec<&str> = records.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(outcomes, ["complete", "already-downloaded"]);
    assert_eq!(records[0].bytes as usize, expected_bytes);
    assert_eq!(records[0].revision.as_deref(), Some(sha.as_str()));

    // And it runs: the tiny model's greedy continuation.
    let out = edgechat(home.path(), &hub, &["run", "gemma-3-270m-it", "--input-ids", "2,697,694,169,697", "--max-tokens", "3", "--json", "--temperature", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let tokens: Vec<u64> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["token"].as_u64()).collect();
    assert_eq!(tokens, [183, 183, 753]);
}

#[test]
fn dropped_connections_resume_with_ranges() {
    let hub = hub();
    hub.faults().faults.drop_after.insert("model.safetensors".into(), vec![300_000, 400_000]);
    let home = tempfile::tempdir().unwrap();
    let out = edgechat(home.path(), &hub, &["pull", "gemma-3-270m-it"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_pulled(home.path());
    let ranges: Vec<String> = hub.state.lock().unwrap().requests.iter().filter(|r| r.0.starts_with("/cdn/")).filter_map(|r| r.1.clone()).collect();
    assert_eq!(ranges, ["bytes=300000-", "bytes=700000-"], "each retry resumes where the last connection died");
}

#[test]
fn a_flipped_byte_is_caught() {
    let hub = hub();
    let home = tempfile::tempdir().unwrap();
    // Once: caught, the file is fetched again, and the pull succeeds.
    hub.faults().faults.flip.insert("model.safetensors".into(), 1);
    let out = edgechat(home.path(), &hub, &["pull", "gemma-3-270m-it"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_pulled(home.path());

    // Every time: the pull fails naming the file and both hashes, and nothing corrupt is left.
    let home = tempfile::tempdir().unwrap();
    hub.faults().faults.flip.insert("model.safetensors".into(), 10);
    let out = edgechat(home.path(), &hub, &["pull", "gemma-3-270m-it"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let want = hub_server::sha256(&fixture("model.safetensors"));
    assert!(err.contains("model.safetensors: sha256 is") && err.contains(&format!("expected {want}")), "{err}");
    let dir = home.path().join(DIR);
    assert!(!dir.join("model.safetensors").exists() && !partial_of(&dir).exists());
}

#[test]
fn server_errors_are_retried_then_reported() {
    let hub = hub();
    let home = tempfile::tempdir().unwrap();
    hub.faults().faults.fail.insert("model.safetensors".into(), 2);
    let out = edgechat(home.path(), &hub, &["pull", "gemma-3-270m-it"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_pulled(home.path());

    let home = tempfile::tempdir().unwrap();
    hub.faults().faults.fail.insert("model.safetensors".into(), 100);
    let out = edgechat(home.path(), &hub, &["pull", "gemma-3-270m-it"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("answered 500") && stderr(&out).contains("gave up after 5 attempts"), "{}", stderr(&out));
    let db = edgechat::db::Db::open(&home.path().join("edgechat.db")).unwrap();
    assert!(db.downloads("gemma-3-270m-it").unwrap()[0].outcome.starts_with("failed: "));
}

#[test]
fn missing_and_gated_repositories_are_clear_errors() {
    let hub = hub();
    let home = tempfile::tempdir().unwrap();
    let out = edgechat(home.path(), &hub, &["pull", "hub:nobody/missing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("the hub has no nobody/missing@main"), "{}", stderr(&out));

    hub.faults().faults.gated.insert(REPO.into(), "secret".into());
    let out = edgechat(home.path(), &hub, &["pull", "gemma-3-270m-it"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("gated or private") && stderr(&out).contains("HF_TOKEN"), "{}", stderr(&out));

    let out = command(home.path(), &hub, &["pull", "gemma-3-270m-it"]).env("HF_TOKEN", "secret").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_pulled(home.path());

    // HF_ENDPOINT is honoured when EDGECHAT_HUB_ENDPOINT is not set.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = command(elsewhere.path(), &hub, &["pull", "gemma-3-270m-it"]).env_remove("EDGECHAT_HUB_ENDPOINT").env("HF_ENDPOINT", &hub.url).env("HF_TOKEN", "secret").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = edgechat(home.path(), &hub, &["pull", "hub:not-a-reference"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a hub reference"), "{}", stderr(&out));
}

#[test]
fn a_hub_reference_picks_its_adapter_from_config_json() {
    let hub = hub();
    hub.add_repo("someone/tiny-lfm2", vec![
        File { name: "config.json".into(), data: Arc::new(std::fs::read(common::fixture("tiny/tiny-lfm2/config.json")).unwrap()), lfs: false },
        File { name: "model.safetensors".into(), data: Arc::new(std::fs::read(common::fixture("tiny/tiny-lfm2/model.safetensors")).unwrap()), lfs: true },
    ]);
    let home = tempfile::tempdir().unwrap();
    let out = edgechat(home.path(), &hub, &["pull", "hub:someone/tiny-lfm2@main"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let manifest = std::fs::read_to_string(home.path().join("Models/someone--tiny-lfm2/manifest.json")).unwrap();
    assert!(manifest.contains("\"adapter\": \"leap\"") && manifest.contains("\"architecture\": \"lfm2\""), "{manifest}");
}

#[test]
fn a_leap_bundle_is_one_verified_file() {
    let hub = hub();
    let bundle = Arc::new(std::fs::read(common::fixture("gguf/quants.gguf")).unwrap());
    hub.add_repo("LiquidAI/LFM2-350M-GGUF", vec![
        File { name: "LFM2-350M-Q8_0.gguf".into(), data: bundle.clone(), lfs: true },
        File { name: "LFM2-350M-Q4_0.gguf".into(), data: Arc::new(vec![0; 10]), lfs: true },
    ]);
    let home = tempfile::tempdir().unwrap();
    let out = edgechat(home.path(), &hub, &["pull", "lfm2-350m"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let dir = home.path().join("Models/LFM2-350M-Q8_0.bundle");
    assert_eq!(std::fs::read(dir.join("LFM2-350M-Q8_0.gguf")).unwrap(), *bundle);
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), 2, "the bundle and its manifest only: {files:?}");
}

#[test]
fn a_pull_killed_at_any_point_resumes_to_identical_files() {
    let hub = hub();
    hub.faults().faults.delay_per_chunk = Duration::from_millis(15);
    let home = tempfile::tempdir().unwrap();
    let partial = partial_of(&home.path().join(DIR));
    let total = fixture("model.safetensors").len() as u64;
    for fraction in [0.2, 0.5, 0.8] {
        let mut child = command(home.path(), &hub, &["pull", "gemma-3-270m-it"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < (total as f64 * fraction) as u64 {
            assert!(Instant::now() < deadline, "download did not progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL: no cleanup runs
        child.wait().unwrap();
        assert!(!home.path().join(DIR).join("model.safetensors").exists(), "nothing partial at the final path");
    }
    hub.faults().faults.delay_per_chunk = Duration::ZERO;
    let out = edgechat(home.path(), &hub, &["pull", "gemma-3-270m-it"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_pulled(home.path());
    let resumed = hub.state.lock().unwrap().requests.iter().filter(|r| r.1.is_some()).count();
    assert!(resumed >= 3, "pulls after a kill resume with Range ({resumed})");
}

#[test]
fn too_little_disk_fails_before_writing() {
    let hub = hub();
    // Below the 512 GiB bound on a model, above any disk this runs on.
    hub.faults().faults.listed_size.insert("model.safetensors".into(), 500 << 30);
    let home = tempfile::tempdir().unwrap();
    let out = edgechat(home.path(), &hub, &["pull", "gemma-3-270m-it"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not enough disk space"), "{}", stderr(&out));
    let dir = home.path().join(DIR);
    assert!(!dir.join("model.safetensors").exists() && !partial_of(&dir).exists());
}

/// A real full disk: a small tmpfs that fills up while the download runs. Needs permission to mount
/// (root, as in CI); elsewhere the test says so and passes.
#[test]
fn a_disk_filling_up_mid_download_fails_cleanly() {
    let mount = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=80m", "tmpfs"]).arg(mount.path()).status().is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(mount.path());
    let hub = hub();
    hub.faults().faults.delay_per_chunk = Duration::from_millis(20);
    let home = mount.path().join("home");
    let mut child = command(&home, &hub, &["pull", "gemma-3-270m-it"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let partial = partial_of(&home.join(DIR));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "download did not start");
        if child.try_wait().unwrap().is_some() {
            panic!("pull ended early: {}", stderr(&child.wait_with_output().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Someone else fills the disk (80 MiB tmpfs: the pull's own free-space check passed with 64 MiB spare).
    let _ = std::fs::write(mount.path().join("filler"), vec![0u8; 80 << 20]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("the disk is full"), "{}", stderr(&out));
    assert!(!home.join(DIR).join("model.safetensors").exists() && !partial.exists());
}

#[test]
fn concurrent_pulls_end_with_one_correct_copy() {
    let hub = hub();
    hub.faults().faults.delay_per_chunk = Duration::from_millis(5);
    let home = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..2).map(|_| command(home.path(), &hub, &["pull", "gemma-3-270m-it"]).output()).collect();
    let mut ok = 0;
    for out in children {
        let out = out.unwrap();
        if out.status.success() {
            ok += 1;
        } else {
            assert!(stderr(&out).contains("another edgechat is downloading this model"), "{}", stderr(&out));
        }
    }
    assert!(ok >= 1);
    assert_pulled(home.path());
}

#[test]
fn rm_removes_exactly_one_model() {
    let hub = hub();
    hub.add_repo("mlx-community/gemma-3-1b-it-bf16", vec![
        File { name: "config.json".into(), data: fixture("config.json"), lfs: false },
        File { name: "model.safetensors".into(), data: fixture("model.safetensors"), lfs: true },
    ]);
    let home = tempfile::tempdir().unwrap();
    for id in ["gemma-3-270m-it", "gemma-3-1b-it"] {
        let out = edgechat(home.path(), &hub, &["pull", id]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let sibling_file = home.path().join("Models/mlx-community--gemma-3-1b-it-bf16/model.safetensors");
    let out = edgechat(home.path(), &hub, &["rm", "gemma-3-270m-it"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!home.path().join(DIR).exists());
    assert!(sibling_file.exists() && home.path().join("Models").exists());
    let out = edgechat(home.path(), &hub, &["rm", "gemma-3-270m-it"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not downloaded"), "{}", stderr(&out));
}

/// The hostile test adapter as a development adapter in the data dir, and a hub repo `redteam/<attack>` whose
/// config.json names it: `pull hub:redteam/<attack>` gets the attack's manifest.
fn redteam(attack: &str) -> (tempfile::TempDir, FakeHub) {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("adapters")).unwrap();
    std::fs::copy(common::component("hostile"), home.path().join("adapters/hostile.wasm")).unwrap();
    let hub = FakeHub::start();
    let config = Arc::new(br#"{"model_type": "hostile"}"#.to_vec());
    hub.add_repo(&format!("redteam/{attack}"), vec![File { name: "config.json".into(), data: config, lfs: false }]);
    (home, hub)
}

/// Every file under `root`, relative.
fn tree(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            found.push(path.strip_prefix(root).unwrap().display().to_string());
        }
    }
    found.sort();
    found
}

#[test]
fn hostile_manifests_are_refused_before_a_byte_is_fetched() {
    let cases = [
        ("empty-path", "manifest file \"\" is not a valid path"),
        ("traversal", "is not a valid path"),
        ("absolute", "is not a valid path"),
        ("reserved", "a name edgechat keeps for itself"),
        ("partial-name", "a name edgechat keeps for itself"),
        ("case-duplicate", "twice (ignoring case)"),
        ("overflow", "add up to more than"),
        ("unhashed-weights", "no sha256"),
        ("no-size", "no size"),
        ("undeclared-host", "host attacker.example is not among the hosts this adapter declared"),
        ("plain-http", "host attacker.example is not among the hosts"),
        ("loopback", "not among the hosts"),
        ("file-url", "not an http(s) URL"),
        ("escape-revision", "is not a revision"),
    ];
    for (attack, expected) in cases {
        let (home, hub) = redteam(attack);
        let before = tree(home.path());
        let out = edgechat(home.path(), &hub, &["pull", &format!("hub:redteam/{attack}")]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{attack}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{attack}: one line: {err}");
        assert!(err.contains("adapter hostile: manifest"), "{attack}: names the adapter: {err}");
        assert!(err.contains(expected), "{attack}: {err}");
        assert!(!err.contains('\u{1b}'), "{attack}: no terminal escapes reach the terminal");
        let downloads = hub.state.lock().unwrap().requests.iter().filter(|r| !r.0.contains("config.json")).count();
        assert_eq!(downloads, 0, "{attack}: nothing fetched");
        let after: Vec<String> = tree(home.path()).into_iter().filter(|p| !before.contains(p) && !p.ends_with("edgechat.db") && !p.starts_with("compiled")).collect();
        assert!(after.iter().all(|p| !p.starts_with("Models")), "{attack}: nothing written: {after:?}");
        assert!(!home.path().parent().unwrap().join("escaped.json").exists());
        let models = edgechat(home.path(), &hub, &["models"]);
        assert_eq!(models.status.code(), Some(0), "{attack}: models still works: {}", stderr(&models));
    }
}

#[test]
fn the_token_never_leaves_the_hub_origin() {
    // The hub redirects its files to a "CDN" on another origin (another port): plain http off the hub's
    // origin is refused before any request, so the token cannot reach it.
    let hub = hub();
    let cdn = FakeHub::start();
    hub.faults().faults.cdn = Some(cdn.url.clone());
    let home = tempfile::tempdir().unwrap();
    let out = command(home.path(), &hub, &["pull", "gemma-3-270m-it"]).env("HF_TOKEN", "hf_secret").output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is not the hub and would be reached over plain http"), "{err}");
    assert!(cdn.state.lock().unwrap().requests.is_empty(), "the other origin saw no request");
    let hub_requests = hub.state.lock().unwrap().requests.clone();
    assert!(!hub_requests.is_empty() && hub_requests.iter().all(|r| r.2), "every request to the hub origin carried the token");
}

#[test]
fn a_listing_without_sizes_is_a_clear_error() {
    let hub = hub();
    hub.faults().faults.without_size.push("config.json".into());
    let home = tempfile::tempdir().unwrap();
    let out = edgechat(home.path(), &hub, &["pull", "gemma-3-270m-it"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("gives no size for \"config.json\""), "{err}");
    assert!(!err.contains("No such file"), "{err}");
}

#[test]
fn a_partial_of_another_version_is_not_resumed_and_ranges_must_match() {
    let hub = hub();
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join(DIR);
    std::fs::create_dir_all(&dir).unwrap();
    // Left by an older version of the file: same name, other hash.
    let stale = dir.join("model.safetensors.0123456789abcdef.partial");
    std::fs::write(&stale, vec![7u8; 1000]).unwrap();
    // The current version's partial, resumed by a server that answers with a range starting at 0.
    let current = partial_of(&dir);
    std::fs::write(&current, &fixture("model.safetensors")[..1000]).unwrap();
    hub.faults().faults.wrong_range.push("model.safetensors".into());
    let out = edgechat(home.path(), &hub, &["pull", "gemma-3-270m-it"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_pulled(home.path());
    assert!(!stale.exists(), "a partial of another version is deleted, not resumed");
    let ranges = hub.state.lock().unwrap().requests.iter().filter(|r| r.0.starts_with("/cdn/") && r.1.is_some()).count();
    assert!(ranges >= 1, "the current partial was offered for resuming");
}

#[test]
fn locks_of_models_with_dotted_names_do_not_collide() {
    use edgechat::download::ModelLock;
    let dir = tempfile::tempdir().unwrap();
    let a = ModelLock::path_for(&dir.path().join("Qwen--Qwen2.5-0.5B"));
    let b = ModelLock::path_for(&dir.path().join("Qwen--Qwen2.5-1.5B"));
    assert_ne!(a, b);
    let _held = ModelLock::acquire(&a).unwrap();
    ModelLock::acquire(&b).expect("a different model is not blocked");
    assert!(ModelLock::acquire(&a).is_err(), "the same model is");
}
