//! Signed adapter updates: a chat template or a model family's support is fixed by shipping an adapter
//! package, not an app release.
//!
//! Installed packages live in `<data dir>/adapters/installed/<name>/<version>.ecpkg`, whole and signed;
//! edgechat.db records per adapter which version is active, which was active before it (none: the
//! built-in adapter) and the highest ever installed. Installing writes the package file first (temporary
//! name, fsync, rename) and then switches the database row in one statement, so a kill at any point
//! leaves either the previous adapter active or the new one, never a mix. Packages are re-verified
//! against the trusted keys on every start. A running chat or server keeps the compiled instance it
//! started with; old package files are only deleted by `remove`.
//!
//! The trust model follows TUF where it matters for a single publisher role: signed metadata with a
//! version and an expiry (`index`), refusing rollback (older index or adapter versions) and freeze
//! (expired index) attacks; keys are rotated by trusting the new key and untrusting the old.

pub mod index;
pub mod package;
pub mod signing;

use crate::adapter::{Adapter, AdapterHost, Origin, KNOWN_CONTRACTS};
use crate::db::{Db, InstalledAdapter};
use crate::hub::{Hub, Reach};
use crate::paths::Paths;
use anyhow::{bail, Context, Result};
use package::{Package, Verified};
use semver::Version;
use signing::PublicKey;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The installed packages and their state.
pub struct Store<'a> {
    dir: PathBuf,
    db: &'a Db,
}

/// The version of an adapter that runs without development adapters (installed or built-in), which an
/// install must exceed; by adapter name.
pub type Current = std::collections::BTreeMap<String, (String, Origin)>;

/// What `install` did.
pub enum Installed {
    Switched { name: String, version: String, signer: String, previous: String },
    AlreadyActive { name: String, version: String },
}

pub fn parse_version(text: &str, what: &str) -> Result<Version> {
    Version::parse(text).map_err(|e| anyhow::anyhow!("{what} version {:?} is not semver: {e}", crate::text::printable(text, 40)))
}

impl<'a> Store<'a> {
    pub fn new(paths: &Paths, db: &'a Db) -> Store<'a> {
        Store { dir: paths.user_adapters().join("installed"), db }
    }

    /// Names and versions are checked identifiers and semver (see `check_info`), never paths.
    pub fn package_path(&self, name: &str, version: &str) -> PathBuf {
        self.dir.join(name).join(format!("{version}.ecpkg"))
    }

    pub fn trusted_keys(&self) -> Result<Vec<PublicKey>> {
        self.db.trusted_keys()?.into_iter().map(|(_, hex, _)| PublicKey::from_hex(&hex)).collect()
    }

    /// Reads and verifies one installed package against the keys trusted now, and loads its component.
    pub fn load_version(&self, host: &AdapterHost, name: &str, version: &str) -> Result<Adapter> {
        let path = self.package_path(name, version);
        let bytes = read_package(&path)?;
        let verified = Package::parse(&bytes)?.verify(&self.trusted_keys()?)?;
        if (verified.manifest.adapter.name.as_str(), verified.manifest.adapter.version.as_str()) != (name, version) {
            bail!("the package file holds {} {}, not {name} {version}", verified.manifest.adapter.name, verified.manifest.adapter.version);
        }
        load_verified(host, verified, &path)
    }

    pub fn states(&self) -> Result<Vec<InstalledAdapter>> {
        self.db.installed_adapters()
    }

    /// Verifies a package and makes it the active version of its adapter (see the module comment).
    pub fn install(&self, host: &AdapterHost, current: &Current, bytes: &[u8]) -> Result<Installed> {
        let verified = Package::parse(bytes)?.verify(&self.trusted_keys()?)?;
        self.install_verified(host, current, verified, bytes)
    }

    /// [`Store::install`] after the signature and hash are checked; `bytes` is the package as read.
    pub fn install_verified(&self, host: &AdapterHost, current: &Current, verified: Verified, bytes: &[u8]) -> Result<Installed> {
        let manifest = verified.manifest.adapter.clone();
        if !KNOWN_CONTRACTS.contains(&manifest.contract_version.as_str()) {
            bail!("it is built for contract {}; this edgechat supports {}", crate::text::printable(&manifest.contract_version, 20), KNOWN_CONTRACTS.join(", "));
        }
        let version = parse_version(&manifest.version, "its")?;
        let signer = verified.signer.clone();
        let adapter = load_verified(host, verified, Path::new(&format!("{}-{}.ecpkg", manifest.name, manifest.version)))?;
        let current = current.get(&manifest.name);
        if let Some((active, origin)) = current {
            let active_version = parse_version(active, "the active")?;
            if version == active_version {
                return Ok(Installed::AlreadyActive { name: manifest.name, version: manifest.version });
            }
            if version < active_version {
                bail!(
                    "{} {} is older than the active {} ({}); use `edgechat adapters rollback {}` to go back",
                    manifest.name, manifest.version, active, describe_origin(origin), manifest.name
                );
            }
        }
        let smoke = crate::conformance::smoke(&adapter);
        if !smoke.passed() {
            bail!("it fails the conformance smoke test: {}", smoke.failures());
        }
        let previous = current.map_or("none".to_owned(), |(version, origin)| format!("{version} ({})", describe_origin(origin)));
        self.write_package(&manifest.name, &manifest.version, bytes)?;
        let before = self.db.installed_adapter(&manifest.name)?;
        let highest = match before.as_ref().map(|b| parse_version(&b.highest, "the highest installed")).transpose()? {
            Some(h) if h > version => h.to_string(),
            _ => manifest.version.clone(),
        };
        self.db.set_installed_adapter(&InstalledAdapter {
            name: manifest.name.clone(),
            active: Some(manifest.version.clone()),
            previous: before.and_then(|b| b.active),
            highest,
        })?;
        Ok(Installed::Switched { name: manifest.name, version: manifest.version, signer, previous })
    }

    /// Writes a package file atomically: a temporary name, fsync, rename, fsync of the directory.
    fn write_package(&self, name: &str, version: &str, bytes: &[u8]) -> Result<()> {
        let path = self.package_path(name, version);
        let dir = path.parent().expect("a package path has a directory");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // What an install killed mid-write left behind is never read; clear it before writing anew.
        let stale = format!(".{version}.ecpkg.");
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&stale) && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let tmp = dir.join(format!(".{version}.ecpkg.{}.tmp", std::process::id()));
        let mut file = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("moving {} into place", path.display()))?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    /// Makes the previously active version (or the built-in adapter) active again, verified before the
    /// switch.
    pub fn rollback(&self, host: &AdapterHost, name: &str) -> Result<String> {
        // Active and previous swap, so a second rollback returns to where the first started.
        let state = self.db.installed_adapter(name)?.filter(|s| s.active.is_some() || s.previous.is_some());
        let Some(state) = state else { bail!("nothing to roll back: no installed version of `{name}` was ever active") };
        let back_to = match &state.previous {
            Some(previous) => {
                self.load_version(host, name, previous).with_context(|| format!("cannot roll back to {name} {previous}"))?;
                format!("{name} {previous}")
            }
            None => format!("the built-in {name}"),
        };
        self.db.set_installed_adapter(&InstalledAdapter { active: state.previous.clone(), previous: state.active.clone(), ..state })?;
        Ok(back_to)
    }

    /// Returns to the built-in adapter and deletes the installed packages; the highest version seen is
    /// remembered (an index cannot then offer an older one).
    pub fn remove(&self, name: &str) -> Result<()> {
        let Some(state) = self.db.installed_adapter(name)?.filter(|s| s.active.is_some() || s.previous.is_some()) else {
            bail!("no installed version of `{name}` to remove");
        };
        self.db.set_installed_adapter(&InstalledAdapter { active: None, previous: None, ..state })?;
        let dir = self.dir.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("deleting {}", dir.display()))?;
        }
        Ok(())
    }

    pub fn highest_installed(&self, name: &str) -> Result<Option<Version>> {
        self.db.installed_adapter(name)?.map(|s| parse_version(&s.highest, "the highest installed")).transpose()
    }
}

pub fn describe_origin(origin: &Origin) -> String {
    match origin {
        Origin::BuiltIn => "built-in".into(),
        Origin::Installed { signer } => format!("installed, signed by {signer}"),
        Origin::Development => "development".into(),
    }
}

/// Loads a verified component and checks it says what the signed manifest says.
fn load_verified(host: &AdapterHost, verified: Verified, path: &Path) -> Result<Adapter> {
    let origin = Origin::Installed { signer: verified.signer };
    let adapter = host.load_bytes(&verified.component, path, origin)?;
    verified.manifest.check_matches(&adapter.info)?;
    Ok(adapter)
}

fn read_package(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(package::MAX_PACKAGE_BYTES + 1).read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes)
}

/// A package from a file or an http(s) URL.
pub fn read_source(source: &str) -> Result<Vec<u8>> {
    if source.starts_with("http://") || source.starts_with("https://") {
        let url = crate::hub::parse_http(source).map_err(anyhow::Error::msg)?;
        return fetch(&Hub::from_env()?, url, package::MAX_PACKAGE_BYTES);
    }
    read_package(Path::new(source))
}

/// GETs `url` through the model download path ([`Hub::send`]: checked hops, the token only to the hub
/// origin, redirects to a CDN over https), refusing bodies larger than `max` bytes.
pub fn fetch(hub: &Hub, url: url::Url, max: u64) -> Result<Vec<u8>> {
    let reach = Reach { hosts: url.host().map(|h| h.to_owned()).into_iter().collect(), redirects_anywhere: true };
    let client = hub.client(Some(std::time::Duration::from_secs(300)))?;
    let shown = crate::text::printable(url.as_str(), 300);
    let response = hub.send(&client, url, &[], &reach).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !response.status().is_success() {
        bail!("GET {shown}: the server answered {}", response.status());
    }
    if response.content_length().is_some_and(|n| n > max) {
        bail!("GET {shown}: larger than {} MiB; refused", max >> 20);
    }
    let mut body = Vec::new();
    response.take(max + 1).read_to_end(&mut body).with_context(|| format!("GET {shown}"))?;
    if body.len() as u64 > max {
        bail!("GET {shown}: larger than {} MiB; refused", max >> 20);
    }
    Ok(body)
}
