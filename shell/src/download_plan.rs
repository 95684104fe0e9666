//! An adapter's download manifest, validated as a whole before a byte is fetched. The manifest is the
//! adapter's word (and, through it, a hub's): every path, URL, size, hash and revision in it is checked
//! here, once, and turned into the [`FileSpec`]s the downloader acts on.

use crate::adapter::bindings::exports::edgechat::adapter::catalog::{DownloadManifest, Layout};
use crate::download::FileSpec;
use crate::hub::{Hub, Reach};
use crate::text::printable;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Component, Path};

/// Largest model edgechat downloads (the sum of a manifest's sizes).
pub const MAX_MODEL_BYTES: u64 = 512 << 30;
/// Largest file accepted without a published sha256: configs and tokenizers, not weights.
pub const MAX_UNHASHED_BYTES: u64 = 64 << 20;
const MAX_FILES: usize = 10_000;
const MAX_PATH_BYTES: usize = 512;
const MAX_REVISION_CHARS: usize = 256;
/// Extensions that hold weights: these always need a hash.
const WEIGHT_EXTENSIONS: &[&str] = &["safetensors", "gguf", "bin", "bundle", "pt", "pth", "npz", "onnx"];

/// The checked files of `manifest`, to be stored under `dir`. Errors are one sentence naming the adapter.
pub fn plan(adapter: &str, manifest: &DownloadManifest, dir: &Path, hub: &Hub, reach: &Reach) -> Result<Vec<FileSpec>, String> {
    let refuse = |why: String| Err(format!("adapter {adapter}: {why}"));
    let revision = &manifest.revision;
    if revision.is_empty() || revision.chars().count() > MAX_REVISION_CHARS || revision.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return refuse(format!("manifest revision {:?} is not a revision", printable(revision, 80)));
    }
    match (manifest.layout, manifest.files.len()) {
        (_, 0) => return refuse("manifest lists no files".into()),
        (_, n) if n > MAX_FILES => return refuse(format!("manifest lists {n} files (limit {MAX_FILES})")),
        (Layout::Bundle, n) if n != 1 => return refuse(format!("manifest describes a bundle of {n} files")),
        _ => {}
    }
    let mut folded = HashSet::new();
    let mut total: u64 = 0;
    let mut files = Vec::with_capacity(manifest.files.len());
    for f in &manifest.files {
        let shown = printable(&f.path, 120);
        if let Err(why) = check_path(&f.path) {
            return refuse(format!("manifest file {shown:?} is not a valid path: {why}"));
        }
        if manifest.layout == Layout::Bundle && f.path.contains('/') {
            return refuse(format!("manifest bundle file {shown:?} must be a plain file name"));
        }
        // Case-insensitive file systems (macOS, Windows) would store two of these in one file.
        if !folded.insert(f.path.to_lowercase()) {
            return refuse(format!("manifest lists {shown:?} twice (ignoring case)"));
        }
        if f.size == 0 {
            return refuse(format!("manifest gives no size for {shown:?} (the source listed none)"));
        }
        total = total.checked_add(f.size).filter(|&t| t <= MAX_MODEL_BYTES).ok_or_else(|| {
            format!("adapter {adapter}: manifest sizes add up to more than {} GiB", MAX_MODEL_BYTES >> 30)
        })?;
        let sha256 = match &f.sha256 {
            Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Some(h.to_ascii_lowercase()),
            Some(h) => return refuse(format!("manifest sha256 {:?} of {shown:?} is not 64 hex digits", printable(h, 80))),
            None if f.size > MAX_UNHASHED_BYTES || is_weights(&f.path) => {
                return refuse(format!("manifest gives no sha256 for {shown:?}, which is weights or larger than {} MiB", MAX_UNHASHED_BYTES >> 20));
            }
            None => None,
        };
        let url = hub.resolve(&f.url).map_err(|e| format!("adapter {adapter}: manifest URL of {shown:?}: {e}"))?;
        if let Some(why) = hub.refuse_first_hop(&url, reach) {
            return refuse(format!("manifest URL of {shown:?}: {why}"));
        }
        // A partial download resumes only into the same version of the file.
        let version = match &sha256 {
            Some(h) => h[..16].to_owned(),
            None => hex::encode(&Sha256::digest(format!("{revision}\n{url}\n{}", f.size))[..8]),
        };
        files.push(FileSpec { dest: dir.join(&f.path), url, size: f.size, sha256, version });
    }
    // A path may not be both a file and a directory ("a" and "a/b").
    for f in &manifest.files {
        let mut prefix = String::new();
        for part in f.path.split('/').collect::<Vec<_>>().split_last().map_or(&[][..], |(_, dirs)| dirs) {
            prefix.push_str(&part.to_lowercase());
            if folded.contains(&prefix) {
                return refuse(format!("manifest lists {:?} both as a file and as a directory", printable(&prefix, 120)));
            }
            prefix.push('/');
        }
    }
    Ok(files)
}

fn is_weights(path: &str) -> bool {
    Path::new(path).extension().and_then(|e| e.to_str()).is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A relative path of plain components, none of which the shell keeps beside the files itself.
fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("it is empty".into());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("it is longer than {MAX_PATH_BYTES} bytes"));
    }
    if let Some(c) = path.chars().find(|&c| c.is_control() || c == '\\' || c == ':') {
        return Err(format!("it contains {:?}", c));
    }
    for component in Path::new(path).components() {
        let Component::Normal(part) = component else { return Err("it is absolute or has `.`/`..` components".into()) };
        let part = part.to_string_lossy().to_lowercase();
        if part == "manifest.json" || part.ends_with(".partial") || part.ends_with(".lock") {
            return Err(format!("{part:?} is a name edgechat keeps for itself"));
        }
    }
    if path.split('/').any(|p| p.is_empty() || p.trim() != p || p.ends_with('.')) {
        return Err("it has an empty component, or one with leading/trailing spaces or a trailing dot".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::bindings::exports::edgechat::adapter::catalog::ManifestFile;

    const HASH: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn file(path: &str, size: u64, sha256: Option<&str>) -> ManifestFile {
        ManifestFile { path: path.into(), url: format!("hub:/r/resolve/x/{path}"), size, sha256: sha256.map(Into::into) }
    }

    fn check(files: Vec<ManifestFile>) -> Result<Vec<FileSpec>, String> {
        let hub = Hub::new("https://hub.example", None).unwrap();
        let manifest = DownloadManifest { layout: Layout::Directory, revision: "abc".into(), files };
        plan("redteam", &manifest, Path::new("/models/m"), &hub, &Reach::default())
    }

    #[test]
    fn a_sound_manifest_passes() {
        let files = check(vec![file("config.json", 10, None), file("model.safetensors", 100, Some(HASH)), file("sub/x.json", 5, None)]).unwrap();
        assert_eq!(files[1].dest, Path::new("/models/m/model.safetensors"));
        assert_eq!(files[1].url.as_str(), "https://hub.example/r/resolve/x/model.safetensors");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in [
            "", "/etc/passwd", "../x", "a/../../x", "./x", "a//b", "manifest.json", "MANIFEST.JSON", "x.partial", "sub/m.lock", "a\\..\\b", "c:x",
            "a\u{1b}[2J", "dot.", " space",
        ] {
            let err = check(vec![file(bad, 1, None)]).expect_err(bad);
            assert!(err.starts_with("adapter redteam: manifest file"), "{err}");
        }
    }

    #[test]
    fn duplicates_collisions_sizes_and_hashes_are_refused() {
        let twice = check(vec![file("a.json", 1, None), file("A.JSON", 1, None)]).unwrap_err();
        assert!(twice.contains("twice"), "{twice}");
        let both = check(vec![file("a", 1, None), file("A/b", 1, None)]).unwrap_err();
        assert!(both.contains("both as a file and as a directory"), "{both}");
        let huge = check(vec![file("a.bin", u64::MAX, Some(HASH)), file("b.bin", 2, Some(HASH))]).unwrap_err();
        assert!(huge.contains("add up to more than"), "{huge}");
        let no_size = check(vec![file("config.json", 0, None)]).unwrap_err();
        assert!(no_size.contains("no size"), "{no_size}");
        let unhashed = check(vec![file("model.safetensors", 10, None)]).unwrap_err();
        assert!(unhashed.contains("no sha256"), "{unhashed}");
        let big = check(vec![file("notes.txt", MAX_UNHASHED_BYTES + 1, None)]).unwrap_err();
        assert!(big.contains("no sha256"), "{big}");
        let bad_hash = check(vec![file("m.gguf", 10, Some("zz"))]).unwrap_err();
        assert!(bad_hash.contains("not 64 hex digits"), "{bad_hash}");
        assert!(check(vec![]).unwrap_err().contains("no files"));
    }

    #[test]
    fn urls_must_reach_the_hub_or_declared_hosts() {
        let mut f = file("config.json", 1, None);
        f.url = "https://elsewhere.example/x".into();
        assert!(check(vec![f.clone()]).unwrap_err().contains("not among the hosts"));
        f.url = "file:///etc/passwd".into();
        assert!(check(vec![f]).unwrap_err().contains("not an http(s) URL"));
    }

    #[test]
    fn revisions_are_printable() {
        let hub = Hub::new("https://hub.example", None).unwrap();
        for revision in ["", "a\u{1b}]0;title\u{7}", "main branch", &"x".repeat(300)] {
            let manifest = DownloadManifest { layout: Layout::Directory, revision: revision.into(), files: vec![file("a.json", 1, None)] };
            let err = plan("redteam", &manifest, Path::new("/m"), &hub, &Reach::default()).unwrap_err();
            assert!(err.contains("is not a revision") && !err.contains('\u{1b}'), "{err}");
        }
    }
}
