//! Resolving hub repositories through the host's `net` import: the files of a repository at a revision,
//! with sizes and LFS sha256, from the hub's model-info API. URLs use the `hub:` prefix, which the shell
//! resolves against the configured endpoint.

use crate::wit::edgechat::adapter::net;
use serde::Deserialize;

pub struct RepoFile {
    pub path: String,
    pub size: u64,
    /// Present for LFS files (weights); small git files have none.
    pub sha256: Option<String>,
}

pub struct Listing {
    /// The commit the revision resolved to.
    pub sha: String,
    pub files: Vec<RepoFile>,
}

#[derive(Deserialize)]
struct Info {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// Percent-encodes a revision for a URL path (branch names may contain '/').
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn valid_repo(repo: &str) -> bool {
    let mut parts = repo.split('/');
    let ok = |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && p != "." && p != "..");
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

pub fn listing(repo: &str, revision: &str) -> Result<Listing, String> {
    if !valid_repo(repo) {
        return Err(format!("{repo:?} is not a hub repository name (ORG/NAME)"));
    }
    let url = format!("hub:/api/models/{repo}/revision/{}?blobs=true", encode(revision));
    let response = net::get(&url, &[])?;
    match response.status {
        200 => {}
        401 | 403 => return Err(format!("{repo} is gated or private: accept its license on the hub and set HF_TOKEN")),
        404 => return Err(format!("the hub has no repository {repo} at revision {revision}")),
        s => return Err(format!("the hub answered {s} for {repo}@{revision}")),
    }
    let info: Info = serde_json::from_slice(&response.body).map_err(|e| format!("the hub's listing of {repo} is malformed: {e}"))?;
    // A file without a size cannot be verified or resumed: refuse the listing rather than guess.
    let files = info
        .siblings
        .into_iter()
        .map(|s| {
            let size = s.lfs.as_ref().map(|l| l.size).or(s.size).ok_or_else(|| format!("the hub's listing of {repo} gives no size for {:?}", s.rfilename))?;
            Ok(RepoFile { size, sha256: s.lfs.map(|l| l.sha256.to_ascii_lowercase()), path: s.rfilename })
        })
        .collect::<Result<_, String>>()?;
    Ok(Listing { sha: info.sha, files })
}

/// Where the shell downloads `path` of `repo` at commit `sha`.
pub fn file_url(repo: &str, sha: &str, path: &str) -> String {
    format!("hub:/{repo}/resolve/{sha}/{path}")
}

/// The files a safetensors snapshot needs to run and to chat: weights, configs, tokenizer.
pub fn is_snapshot_file(path: &str) -> bool {
    !path.contains('/')
        && (path.ends_with(".safetensors")
            || matches!(
                path,
                "config.json"
                    | "generation_config.json"
                    | "model.safetensors.index.json"
                    | "tokenizer.json"
                    | "tokenizer_config.json"
                    | "special_tokens_map.json"
                    | "chat_template.jinja"
            ))
}
