//! Downloading a model the way its adapter's manifest says: each file to `<name>.partial`, resumed with
//! HTTP Range after any interruption, verified (sha256, or size when the source publishes no hash), then
//! renamed into place, so a final path never holds a partial or corrupt file. A partial carries the
//! version of the file it belongs to in its name, so it never resumes into a different version; a 206
//! must say it continues exactly where the partial ends. Files download in parallel (bounded); transient
//! failures retry with backoff; one lock per model keeps concurrent pulls of that model apart. The files
//! come from a manifest already validated by [`crate::download_plan`].

use crate::hub::{Hub, Reach};
use crate::paths::free_space;
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// One file to fetch.
#[derive(Debug, Clone)]
pub struct FileSpec {
    /// Where it ends up.
    pub dest: PathBuf,
    /// Resolved http(s) URL.
    pub url: url::Url,
    pub size: u64,
    pub sha256: Option<String>,
    /// Names this version of the file (a hash prefix, or one of revision, URL and size).
    pub version: String,
}

/// Progress of one model's download: the UI contract is `fraction()` in 0..=1.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicU64,
    pub done: AtomicU64,
    /// Bytes received in this run (what a download record reports).
    pub transferred: AtomicU64,
}

impl Progress {
    pub fn fraction(&self) -> f64 {
        let total = self.total.load(Ordering::Relaxed);
        if total == 0 { 1.0 } else { (self.done.load(Ordering::Relaxed) as f64 / total as f64).min(1.0) }
    }
}

/// Why a download stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("cancelled; partial files are kept and the next pull resumes them")]
    Cancelled,
    #[error("{0}")]
    Fatal(String),
}

pub struct Downloader<'a> {
    pub hub: &'a Hub,
    /// Where first requests may go (the adapter's declared hosts) and that redirects may leave them.
    pub reach: Reach,
    pub client: reqwest::blocking::Client,
    pub parallel: usize,
    /// Attempts per file for transient failures (connection drops, 5xx).
    pub attempts: u32,
    pub backoff: Duration,
    pub cancel: &'a AtomicBool,
}

/// Holds the per-model lock for as long as it lives.
pub struct ModelLock {
    _file: File,
}

impl ModelLock {
    pub fn acquire(path: &Path) -> Result<ModelLock> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(path).with_context(|| format!("opening lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(ModelLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => bail!("another edgechat is downloading this model right now (lock {})", path.display()),
            Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }

    /// The lock of the model stored at `dir`: `<dir>.lock` beside it (never `with_extension`, which would
    /// give `Qwen2.5-0.5B` and `Qwen2.5-1.5B` the same lock).
    pub fn path_for(dir: &Path) -> PathBuf {
        let mut name = dir.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        dir.with_file_name(name)
    }
}

/// Where `file` is downloaded before it is verified: `<name>.<version>.partial`.
pub fn partial_path(file: &FileSpec) -> PathBuf {
    let mut name = file.dest.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.partial", file.version));
    file.dest.with_file_name(name)
}

/// Every partial of `dest`, of any version.
pub fn partials_of(dest: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name().and_then(|n| n.to_str())) else { return vec![] };
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let prefix = format!("{name}.");
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix(&prefix)).and_then(|rest| rest.strip_suffix(".partial")).is_some_and(|version| {
                version.len() == 16 && version.bytes().all(|b| b.is_ascii_hexdigit())
            })
        })
        .collect()
}

/// Whether a 206's Content-Range continues exactly at `offset` and ends the file of `size` bytes.
fn range_matches(header: Option<&str>, offset: u64, size: u64) -> bool {
    let Some(range) = header.and_then(|h| h.strip_prefix("bytes ")) else { return false };
    let Some((span, total)) = range.split_once('/') else { return false };
    let Some((start, end)) = span.split_once('-') else { return false };
    start.parse() == Ok(offset) && end.parse() == Ok(size - 1) && (total == "*" || total.parse() == Ok(size))
}

/// Whether `path` holds exactly this file (size, and sha256 when known).
pub fn is_complete(file: &FileSpec) -> Result<bool> {
    match std::fs::metadata(&file.dest) {
        Ok(m) if m.len() == file.size => match &file.sha256 {
            Some(want) => Ok(&sha256_of(&file.dest)? == want),
            None => Ok(true),
        },
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("checking {}", file.dest.display())),
    }
}

pub fn sha256_of(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

enum Attempt {
    Done,
    /// Worth retrying (network error, 5xx, truncated body).
    Transient(String),
    Fatal(String),
}

impl Downloader<'_> {
    /// Fetches every file not already complete. Returns the bytes transferred.
    pub fn run(&self, files: &[FileSpec], progress: &Progress) -> Result<u64, DownloadError> {
        let fatal = |e: anyhow::Error| DownloadError::Fatal(format!("{e:#}"));
        let mut pending = Vec::new();
        let mut needed = 0u64;
        progress.total.store(files.iter().map(|f| f.size).sum(), Ordering::Relaxed);
        for file in files {
            if is_complete(file).map_err(fatal)? {
                progress.done.fetch_add(file.size, Ordering::Relaxed);
                continue;
            }
            let have = std::fs::metadata(partial_path(file)).map(|m| m.len().min(file.size)).unwrap_or(0);
            progress.done.fetch_add(have, Ordering::Relaxed);
            needed += file.size - have;
            pending.push(file.clone());
        }
        if pending.is_empty() {
            return Ok(0);
        }
        if let Some(dir) = pending[0].dest.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fatal(anyhow!("creating {}: {e}", dir.display())))?;
            if let Some(free) = free_space(dir) {
                // Keep a little headroom for the rest of the system.
                if needed + (64 << 20) > free {
                    return Err(DownloadError::Fatal(format!(
                        "not enough disk space in {}: the download needs {} MB, {} MB are free",
                        dir.display(),
                        needed.div_ceil(1 << 20),
                        free >> 20
                    )));
                }
            }
        }
        let transferred = &progress.transferred;
        let queue = Mutex::new(pending);
        let first_error: Mutex<Option<DownloadError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..self.parallel.max(1) {
                scope.spawn(|| loop {
                    if first_error.lock().unwrap().is_some() {
                        return;
                    }
                    let Some(file) = queue.lock().unwrap().pop() else { return };
                    if let Err(e) = self.fetch(&file, progress, transferred) {
                        first_error.lock().unwrap().get_or_insert(e);
                        return;
                    }
                });
            }
        });
        match first_error.into_inner().unwrap() {
            Some(e) => Err(e),
            None => Ok(transferred.load(Ordering::Relaxed)),
        }
    }

    fn fetch(&self, file: &FileSpec, progress: &Progress, transferred: &AtomicU64) -> Result<(), DownloadError> {
        let mut failures = 0;
        let mut hash_retry_used = false;
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(DownloadError::Cancelled);
            }
            match self.attempt(file, progress, transferred) {
                Attempt::Done => {}
                Attempt::Fatal(e) => return Err(DownloadError::Fatal(e)),
                Attempt::Transient(e) if self.cancel.load(Ordering::Relaxed) => {
                    tracing::debug!("{e}");
                    return Err(DownloadError::Cancelled);
                }
                Attempt::Transient(e) => {
                    failures += 1;
                    if failures >= self.attempts {
                        return Err(DownloadError::Fatal(format!("{e} (gave up after {failures} attempts)")));
                    }
                    let wait = self.backoff * 2u32.pow(failures - 1);
                    tracing::warn!("{e}; retrying in {wait:?}");
                    std::thread::sleep(wait);
                    continue;
                }
            }
            // Complete: verify before the file may take its final name.
            let partial = partial_path(file);
            let size = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            let verdict = if size != file.size {
                Some(format!("{}: downloaded {size} bytes, expected {}", file.dest.display(), file.size))
            } else if let Some(want) = &file.sha256 {
                let got = sha256_of(&partial).map_err(|e| DownloadError::Fatal(format!("{e:#}")))?;
                (&got != want).then(|| format!("{}: sha256 is {got}, expected {want}", file.dest.display()))
            } else {
                None
            };
            match verdict {
                None => {
                    File::open(&partial).and_then(|f| f.sync_all()).ok();
                    std::fs::rename(&partial, &file.dest)
                        .map_err(|e| DownloadError::Fatal(format!("moving {} into place: {e}", file.dest.display())))?;
                    return Ok(());
                }
                Some(problem) => {
                    // A corrupt partial must not be resumed: start this file over, once.
                    let _ = std::fs::remove_file(&partial);
                    progress.done.fetch_sub(size.min(progress.done.load(Ordering::Relaxed)), Ordering::Relaxed);
                    if hash_retry_used {
                        return Err(DownloadError::Fatal(format!("{problem}; the file was deleted")));
                    }
                    tracing::warn!("{problem}; downloading it again");
                    hash_retry_used = true;
                }
            }
        }
    }

    fn attempt(&self, file: &FileSpec, progress: &Progress, transferred: &AtomicU64) -> Attempt {
        let partial = partial_path(file);
        // Partials of other versions of this file can never be resumed.
        for stale in partials_of(&file.dest).into_iter().filter(|p| *p != partial) {
            let _ = std::fs::remove_file(stale);
        }
        let mut offset = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if offset > file.size {
            let _ = std::fs::remove_file(&partial);
            progress.done.fetch_sub(file.size.min(progress.done.load(Ordering::Relaxed)), Ordering::Relaxed);
            offset = 0;
        }
        if offset == file.size {
            return Attempt::Done;
        }
        let range = (offset > 0).then(|| (reqwest::header::RANGE, format!("bytes={offset}-").parse().expect("a valid header value")));
        let response = match self.hub.send(&self.client, file.url.clone(), range.as_slice(), &self.reach) {
            Ok(r) => r,
            Err(crate::hub::SendError::Refused(e)) => return Attempt::Fatal(e),
            Err(crate::hub::SendError::Network(e)) => return Attempt::Transient(e),
        };
        let status = response.status().as_u16();
        let append = match status {
            206 if range_matches(response.headers().get(reqwest::header::CONTENT_RANGE).and_then(|v| v.to_str().ok()), offset, file.size) => true,
            206 => {
                let _ = std::fs::remove_file(&partial);
                progress.done.fetch_sub(offset.min(progress.done.load(Ordering::Relaxed)), Ordering::Relaxed);
                return Attempt::Transient(format!("{} answered 206 for a range it did not send; starting the file over", file.url));
            }
            200 => false,
            401 | 403 => {
                let hint = if self.hub.token.is_some() { "your HF_TOKEN has no access to it" } else { "it is gated or private: set HF_TOKEN" };
                return Attempt::Fatal(format!("{} answered {status} for {}: {hint}", file.url, file.dest.display()));
            }
            404 => return Attempt::Fatal(format!("{} answered 404: the file {} is not there", file.url, file.dest.display())),
            416 => return Attempt::Transient(format!("{} refused the range from byte {offset}", file.url)),
            s if s >= 500 || s == 429 || s == 408 => return Attempt::Transient(format!("{} answered {s}", file.url)),
            s => return Attempt::Fatal(format!("{} answered {s}", file.url)),
        };
        if !append && offset > 0 {
            progress.done.fetch_sub(offset.min(progress.done.load(Ordering::Relaxed)), Ordering::Relaxed);
        }
        let out = if append { OpenOptions::new().append(true).open(&partial) } else { File::create(&partial) };
        let mut out = match out {
            Ok(f) => f,
            Err(e) => return Attempt::Fatal(format!("writing {}: {e}", partial.display())),
        };
        let mut body = response;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Attempt::Transient("cancelled".into());
            }
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return Attempt::Transient(format!("{}: connection lost: {e}", file.url)),
            };
            let written = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            if written + n as u64 > file.size {
                let _ = std::fs::remove_file(&partial);
                return Attempt::Fatal(format!("{} sent more than the {} bytes {} should have", file.url, file.size, file.dest.display()));
            }
            if let Err(e) = out.write_all(&buf[..n]) {
                let disk_full = e.raw_os_error() == Some(28);
                let _ = std::fs::remove_file(&partial);
                let why = if disk_full { "the disk is full".to_owned() } else { e.to_string() };
                return Attempt::Fatal(format!("writing {}: {why}; the partial file was removed", partial.display()));
            }
            progress.done.fetch_add(n as u64, Ordering::Relaxed);
            transferred.fetch_add(n as u64, Ordering::Relaxed);
        }
        let written = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if written < file.size {
            return Attempt::Transient(format!("{}: the connection closed after {written} of {} bytes", file.url, file.size));
        }
        Attempt::Done
    }
}
