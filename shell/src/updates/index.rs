//! The signed adapter index: what a publisher offers, with a version that only grows and an expiry.
//! `update` refuses an index that is unsigned, signed by an unknown key, expired (a freeze attack: an
//! old index served forever) or older than the newest this installation has seen (a rollback attack);
//! the version it accepts is remembered. Package URLs are relative to the index's own URL.

use super::signing::{Envelope, PublicKey, SecretKey};
use super::{package::Package, parse_version, Current, Installed, Store};
use crate::adapter::AdapterHost;
use crate::db::Db;
use crate::hub::Hub;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::{Duration, SystemTime};

pub const KIND: &str = "adapter index";
pub const FILE_NAME: &str = "index.json";
const MAX_INDEX_BYTES: u64 = 4 << 20;
const INDEX_VERSION_KEY: &str = "adapter_index_version";
const INDEX_URL_KEY: &str = "adapter_index_url";
pub const INDEX_URL_VAR: &str = "EDGECHAT_ADAPTER_INDEX";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub version: u64,
    /// RFC 3339, UTC.
    pub expires: String,
    pub adapters: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub name: String,
    pub version: String,
    pub contract_version: String,
    /// Relative to the index's URL: a plain file name.
    pub url: String,
    /// Of the package file.
    pub sha256: String,
    pub size: u64,
}

/// Builds and signs `DIR/index.json` over the `*.ecpkg` packages in DIR, one version above the index
/// already there. Each package must verify against the index key or a key trusted here.
pub fn build(dir: &Path, key: &SecretKey, expires_in: Duration, trusted: &[PublicKey]) -> Result<Index> {
    let index_path = dir.join(FILE_NAME);
    let previous = match std::fs::read(&index_path) {
        Ok(bytes) => previous_version(&bytes).with_context(|| format!("reading the version of {}", index_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", index_path.display())),
    };
    let mut keys = trusted.to_vec();
    keys.push(key.public());
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ecpkg"))
        .collect();
    names.sort();
    let mut adapters = Vec::new();
    for name in names {
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b)) {
            bail!("{name:?}: package file names are kept to letters, digits and ._-+ so their URLs need no escaping");
        }
        let bytes = std::fs::read(dir.join(&name))?;
        let verified = Package::parse(&bytes).and_then(|p| p.verify(&keys)).with_context(|| format!("package {name}"))?;
        let m = verified.manifest.adapter;
        adapters.push(Entry { name: m.name, version: m.version, contract_version: m.contract_version, url: name, sha256: hex::encode(Sha256::digest(&bytes)), size: bytes.len() as u64 });
    }
    if adapters.is_empty() {
        bail!("{} holds no .ecpkg packages", dir.display());
    }
    let expires = humantime::format_rfc3339_seconds(SystemTime::now() + expires_in).to_string();
    let index = Index { version: previous + 1, expires, adapters };
    let text = Envelope::sign(KIND, &index, key)?;
    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &index_path).with_context(|| format!("writing {}", index_path.display()))?;
    Ok(index)
}

/// The publisher's own previous index: only its version matters, so it is read without verifying.
fn previous_version(bytes: &[u8]) -> Result<u64> {
    let value: serde_json::Value = serde_json::from_slice(bytes)?;
    value.pointer("/signed/version").and_then(|v| v.as_u64()).context("it has no signed.version")
}

/// `30d`, `12h`, `1s`, `2w 3d` (humantime's syntax).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration like 30d, 12h or 1s: {e}"))
}

/// One line per adapter the index offers: what `update` did or would do.
pub struct Report {
    pub version: u64,
    pub signer: String,
    pub expires: String,
    pub lines: Vec<String>,
}

/// Which index URL `update` uses: the flag, else $EDGECHAT_ADAPTER_INDEX, else the last one used.
pub fn index_url(flag: Option<&str>, db: &Db) -> Result<String> {
    if let Some(url) = flag.map(str::to_owned).or_else(|| std::env::var(INDEX_URL_VAR).ok().filter(|u| !u.is_empty())) {
        return Ok(url);
    }
    db.setting(INDEX_URL_KEY)?.context("no adapter index configured: pass --index URL (or set EDGECHAT_ADAPTER_INDEX)")
}

/// Fetches and verifies the index, then installs every adapter it offers newer than both the active
/// version and the highest ever installed (or only reports them, with `check`).
pub fn update(host: &AdapterHost, current: &Current, store: &Store, db: &Db, url: &str, check: bool) -> Result<Report> {
    let hub = Hub::from_env()?;
    let index_url = hub.resolve(url).map_err(anyhow::Error::msg)?;
    let bytes = super::fetch(&hub, index_url.clone(), MAX_INDEX_BYTES).context("fetching the adapter index")?;
    let (index, signer): (Index, String) = Envelope::open(KIND, &bytes, &store.trusted_keys()?).context("refusing the adapter index")?;
    let expires = humantime::parse_rfc3339(&index.expires).map_err(|e| anyhow::anyhow!("refusing the adapter index: its expiry {:?} is not a date: {e}", crate::text::printable(&index.expires, 40)))?;
    if expires <= SystemTime::now() {
        bail!("refusing the adapter index: it expired at {} (a stale index may hide updates; the publisher must re-sign it)", index.expires);
    }
    let seen: u64 = db.setting(INDEX_VERSION_KEY)?.and_then(|v| v.parse().ok()).unwrap_or(0);
    if index.version < seen {
        bail!("refusing the adapter index: its version {} is older than version {seen} already seen here (a replayed or rolled-back index)", index.version);
    }
    db.set_setting(INDEX_VERSION_KEY, &index.version.to_string())?;
    db.set_setting(INDEX_URL_KEY, url)?;

    let mut lines = Vec::new();
    for entry in &index.adapters {
        let name = crate::text::printable(&entry.name, 40);
        let offered = parse_version(&entry.version, &format!("{name}'s offered"))?;
        let active = current.get(&entry.name).map(|(v, _)| parse_version(v, "the active")).transpose()?;
        let highest = store.highest_installed(&entry.name)?;
        let newest_known = active.clone().max(highest.clone());
        if newest_known.as_ref().is_some_and(|known| offered <= *known) {
            let held = active.map_or("none".into(), |v| v.to_string());
            lines.push(if highest.as_ref().is_some_and(|h| offered < *h) {
                format!("{name}: the index offers {offered}, older than {} installed before; skipped", highest.unwrap())
            } else {
                format!("{name}: {held} is up to date")
            });
            continue;
        }
        let from = active.map_or("not installed".into(), |v| v.to_string());
        if check {
            lines.push(format!("{name}: {from} -> {offered} available"));
            continue;
        }
        let package_url = index_url.join(&entry.url).with_context(|| format!("{name}: package URL {:?}", crate::text::printable(&entry.url, 100)))?;
        // Packages sit beside the index: a URL that leaves its origin is refused, signed or not.
        if (package_url.scheme(), package_url.host(), package_url.port_or_known_default()) != (index_url.scheme(), index_url.host(), index_url.port_or_known_default()) {
            bail!("{name}: the index points its package to {}, off the index's own server; refused", crate::text::printable(package_url.as_str(), 200));
        }
        let bytes = super::fetch(&hub, package_url, entry.size.min(super::package::MAX_PACKAGE_BYTES)).with_context(|| format!("fetching {name} {offered}"))?;
        if hex::encode(Sha256::digest(&bytes)) != entry.sha256 || bytes.len() as u64 != entry.size {
            bail!("{name} {offered}: the package does not match the index's sha256 and size (altered in transit or on the server)");
        }
        let signed = Package::parse(&bytes).and_then(|p| p.verify(&store.trusted_keys()?)).with_context(|| format!("refusing {name} {offered}"))?;
        if (signed.manifest.adapter.name.as_str(), signed.manifest.adapter.version.as_str()) != (entry.name.as_str(), entry.version.as_str()) {
            bail!("refusing {name} {offered}: the package holds {} {}", signed.manifest.adapter.name, signed.manifest.adapter.version);
        }
        match store.install_verified(host, current, signed, &bytes).with_context(|| format!("refusing {name} {offered}"))? {
            Installed::Switched { name, version, signer, .. } => lines.push(format!("{name}: {from} -> {version} installed (signed by {signer})")),
            Installed::AlreadyActive { name, version } => lines.push(format!("{name}: {version} is up to date")),
        }
    }
    Ok(Report { version: index.version, signer, expires: index.expires, lines })
}
