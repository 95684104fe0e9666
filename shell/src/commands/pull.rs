//! `edgechat pull` and `edgechat rm`: fetch a model the way its adapter's manifest says, remove one.

use crate::shell::Shell;
use crate::text::human_bytes;
use crate::catalog::Source;
use crate::db::Db;
use crate::download::{DownloadError, Downloader, FileSpec, ModelLock, Progress};
use crate::hub::{Hub, Reach};
use crate::models::{self, FileRecord, Manifest, ModelFiles};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static CANCEL: AtomicBool = AtomicBool::new(false);

/// A model to pull: a catalog id, or `hub:ORG/NAME[@REVISION]`.
pub struct Target {
    pub id: String,
    pub source: Source,
    /// The adapter named by the catalog; for hub references, chosen from the repo's config.json.
    pub adapter: Option<String>,
}

pub fn parse_target(shell: &Shell, name: &str) -> Result<Target> {
    if let Some(reference) = name.strip_prefix("hub:") {
        let (repo, revision) = reference.split_once('@').unwrap_or((reference, "main"));
        let part_ok = |p: &str| !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        let repo_ok = repo.split_once('/').is_some_and(|(org, model)| part_ok(org) && part_ok(model));
        let revision_ok = !revision.is_empty() && revision.len() <= 256 && !revision.chars().any(|c| c.is_control() || c.is_whitespace());
        if !repo_ok || !revision_ok {
            bail!("`{}` is not a hub reference: use hub:ORG/NAME or hub:ORG/NAME@REVISION", crate::text::printable(name, 200));
        }
        return Ok(Target { id: name.to_owned(), source: Source::Hub { repo: repo.into(), revision: revision.into() }, adapter: None });
    }
    let entry = shell.catalog.get(name).with_context(|| {
        let ids: Vec<&str> = shell.catalog.models.iter().map(|m| m.id.as_str()).collect();
        format!("unknown model `{name}` (catalog: {}; or hub:ORG/NAME[@REVISION])", ids.join(", "))
    })?;
    Ok(Target { id: name.to_owned(), source: entry.source.clone(), adapter: Some(entry.adapter.clone()) })
}

/// For a hub reference: the adapter that runs the repo's `model_type`.
fn adapter_for_hub_repo(shell: &Shell, hub: &Hub, repo: &str, revision: &str) -> Result<String> {
    let url = hub.resolve(&format!("hub:/{repo}/resolve/{revision}/config.json")).map_err(anyhow::Error::msg)?;
    let response = hub.send(&hub.client(Some(Duration::from_secs(60)))?, url.clone(), &[], &Reach::default()).map_err(anyhow::Error::msg)?;
    match response.status().as_u16() {
        200 => {}
        401 | 403 => bail!("{repo} is gated or private: accept its license on the hub and set HF_TOKEN"),
        404 => bail!("the hub has no {repo}@{revision} (or it has no config.json)"),
        s => bail!("the hub answered {s} for {url}"),
    }
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(response, crate::host::net::MAX_BODY), &mut body).with_context(|| format!("fetching {url}"))?;
    let config: serde_json::Value = serde_json::from_slice(&body).with_context(|| format!("{repo}'s config.json is not valid JSON"))?;
    let model_type = config.get("model_type").and_then(|t| t.as_str()).with_context(|| format!("{repo}'s config.json has no model_type"))?;
    Ok(shell.registry.for_architecture(model_type)?.name().to_owned())
}

pub fn pull(name: &str, json: bool) -> Result<()> {
    let shell = Shell::open()?;
    let target = parse_target(&shell, name)?;
    let hub = Hub::from_env()?;
    let adapter_name = match (&target.adapter, &target.source) {
        (Some(a), _) => a.clone(),
        (None, Source::Hub { repo, revision }) => adapter_for_hub_repo(&shell, &hub, repo, revision)?,
        (None, Source::Leap { .. }) => unreachable!("leap sources come from the catalog"),
    };
    let adapter = shell.registry.get(&adapter_name)?;
    let manifest = adapter.instantiate()?.manifest(&target.source.to_wit()).with_context(|| format!("resolving {name}"))?;
    let dir = shell.model_dir(&target.source);
    let mut reach = Reach::declared(&adapter_name, &adapter.info.allowed_hosts);
    let files = crate::download_plan::plan(&adapter_name, &manifest, &dir, &hub, &reach).map_err(anyhow::Error::msg)?;
    // The first request of each file was checked above; its redirects may go to the hub's CDN.
    reach.redirects_anywhere = true;

    let _lock = ModelLock::acquire(&ModelLock::path_for(&dir))?;
    let db = Db::open(&shell.paths.database())?;
    let record = db.start_download(name, &target.source.to_string(), Some(&manifest.revision))?;
    let _ = ctrlc::set_handler(|| CANCEL.store(true, Ordering::SeqCst));
    let downloader = Downloader { hub: &hub, reach, client: hub.client(None)?, parallel: 3, attempts: 5, backoff: Duration::from_millis(500), cancel: &CANCEL };
    let progress = Progress::default();
    let finished = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| report(&progress, &finished, json, name));
        let result = downloader.run(&files, &progress);
        finished.store(true, Ordering::SeqCst);
        result
    });
    let outcome = match &result {
        Ok(0) => "already-downloaded".to_owned(),
        Ok(_) => "complete".to_owned(),
        Err(DownloadError::Cancelled) => "cancelled".to_owned(),
        Err(DownloadError::Fatal(e)) => format!("failed: {e}"),
    };
    db.finish_download(record, progress.transferred.load(Ordering::Relaxed), &outcome)?;
    match result {
        Ok(0) => println!("{name} is already downloaded ({})", dir.display()),
        Ok(bytes) => {
            let record = write_record(&dir, &target, &adapter_name, &manifest.revision, &files)?;
            if json {
                println!("{}", serde_json::json!({ "event": "done", "model": name, "bytes": bytes, "revision": record.revision, "dir": dir }));
            } else {
                println!("pulled {name} ({}, revision {}) into {}", human_bytes(bytes), crate::text::printable(&manifest.revision, 80), dir.display());
            }
        }
        Err(DownloadError::Cancelled) => bail!("{name}: download cancelled; partial files are kept and `edgechat pull {name}` resumes"),
        Err(DownloadError::Fatal(e)) => bail!("{name}: {e}"),
    }
    if !dir.join("manifest.json").exists() {
        write_record(&dir, &target, &adapter_name, &manifest.revision, &files)?;
    }
    Ok(())
}

/// Progress: an indicatif bar on a terminal, JSON lines with `--json`.
fn report(progress: &Progress, finished: &AtomicBool, json: bool, name: &str) {
    use std::sync::atomic::Ordering::Relaxed;
    let bar = (!json).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(name.to_owned());
        bar
    });
    let mut last = -1.0;
    loop {
        let done = finished.load(Relaxed);
        let fraction = progress.fraction();
        match &bar {
            Some(bar) => {
                bar.set_length(progress.total.load(Relaxed));
                bar.set_position(progress.done.load(Relaxed));
            }
            None if fraction != last => {
                println!(
                    "{}",
                    serde_json::json!({ "event": "progress", "model": name, "fraction": fraction,
                        "bytes": progress.done.load(Relaxed), "total": progress.total.load(Relaxed) })
                );
                last = fraction;
            }
            None => {}
        }
        if done {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn write_record(dir: &Path, target: &Target, adapter: &str, revision: &str, files: &[FileSpec]) -> Result<Manifest> {
    let inspected = ModelFiles::inspect(dir).ok();
    let records = files
        .iter()
        .map(|f| {
            // Files were verified as they were renamed into place; those without a published hash get theirs now.
            let sha256 = match &f.sha256 {
                Some(s) => s.clone(),
                None => crate::download::sha256_of(&f.dest)?,
            };
            FileRecord::verified(dir, &f.dest.strip_prefix(dir).unwrap_or(&f.dest).display().to_string(), sha256)
        })
        .collect::<Result<Vec<_>>>()?;
    let record = Manifest {
        id: target.id.clone(),
        adapter: adapter.to_owned(),
        architecture: inspected.as_ref().map(|m| m.architecture.clone()).unwrap_or_default(),
        format: match inspected.map(|m| m.weights) {
            Some(models::Weights::Gguf(_)) => "gguf".into(),
            _ => "safetensors".into(),
        },
        dtype: format!("{:?}", models::DEFAULT_PRECISION).to_lowercase(),
        source: target.source.to_string(),
        revision: Some(revision.to_owned()),
        files: records,
        imported_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    };
    let tmp = dir.join("manifest.json.partial");
    std::fs::write(&tmp, serde_json::to_string_pretty(&record)?)?;
    std::fs::rename(&tmp, dir.join("manifest.json"))?;
    Ok(record)
}
