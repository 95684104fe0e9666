//! Adapter packages: a tar archive (the `tar` crate) of exactly two files, `manifest.json` — a signed
//! [`PackageManifest`] — and `component.wasm`. The manifest records what the component says about itself
//! (read from its `info` export in the sandbox, never from flags) and the component's sha256, so a
//! verified manifest vouches for every byte of the component.
//!
//! A package is read whole into memory and never unpacked onto disk: nothing in it chooses a path.

use super::signing::{Envelope, PublicKey, SecretKey};
use crate::adapter::AdapterInfo;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;

pub const KIND: &str = "adapter package";
const MANIFEST: &str = "manifest.json";
const COMPONENT: &str = "component.wasm";
const MAX_MANIFEST_BYTES: u64 = 64 << 10;
/// Today's adapters are 2–5 MB; this leaves room without letting a package exhaust memory.
pub const MAX_COMPONENT_BYTES: u64 = 128 << 20;
pub const MAX_PACKAGE_BYTES: u64 = MAX_COMPONENT_BYTES + MAX_MANIFEST_BYTES + (16 << 10);

/// What a publisher signs about a component: what the component says about itself (its `info`) and
/// the hash and size of its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackageManifest {
    #[serde(flatten)]
    pub adapter: AdapterInfo,
    pub component_sha256: String,
    pub component_size: u64,
}

impl PackageManifest {
    pub fn describe(info: &AdapterInfo, component: &[u8]) -> PackageManifest {
        PackageManifest { adapter: info.clone(), component_sha256: hex::encode(Sha256::digest(component)), component_size: component.len() as u64 }
    }

    /// Refuses a component whose own `info` differs from what was signed.
    pub fn check_matches(&self, info: &AdapterInfo) -> Result<()> {
        let signed = &self.adapter;
        if signed != info {
            bail!(
                "the signed manifest says {} {} (contract {}) but the component says {} {} (contract {}), or their families, architectures or hosts differ",
                signed.name, signed.version, signed.contract_version, info.name, info.version, info.contract_version
            );
        }
        Ok(())
    }
}

/// A package as read, not yet verified.
pub struct Package {
    pub manifest_bytes: Vec<u8>,
    pub component: Vec<u8>,
}

/// A package whose signature, by a trusted key, covers its component.
pub struct Verified {
    pub manifest: PackageManifest,
    pub signer: String,
    pub component: Vec<u8>,
}

impl Package {
    pub fn build(component: Vec<u8>, manifest: &PackageManifest, key: &SecretKey) -> Result<Vec<u8>> {
        let manifest_text = Envelope::sign(KIND, manifest, key)?;
        let mut builder = tar::Builder::new(Vec::new());
        for (name, bytes) in [(MANIFEST, manifest_text.as_bytes()), (COMPONENT, component.as_slice())] {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, bytes)?;
        }
        Ok(builder.into_inner()?)
    }

    /// Reads the archive: exactly the two files, regular, within their size caps.
    pub fn parse(bytes: &[u8]) -> Result<Package> {
        if bytes.len() as u64 > MAX_PACKAGE_BYTES {
            bail!("the package is larger than {} MiB", MAX_PACKAGE_BYTES >> 20);
        }
        let mut archive = tar::Archive::new(bytes);
        let (mut manifest_bytes, mut component) = (None, None);
        for entry in archive.entries().context("the package is not a tar archive")? {
            let entry = entry.context("the package archive is damaged")?;
            let path = entry.path_bytes().into_owned();
            let (slot, cap) = match path.as_slice() {
                b"manifest.json" => (&mut manifest_bytes, MAX_MANIFEST_BYTES),
                b"component.wasm" => (&mut component, MAX_COMPONENT_BYTES),
                other => bail!("the package holds {:?}; only {MANIFEST} and {COMPONENT} belong in one", crate::text::printable(&String::from_utf8_lossy(other), 80)),
            };
            if entry.header().entry_type() != tar::EntryType::Regular {
                bail!("{} in the package is not a regular file", String::from_utf8_lossy(&path));
            }
            if slot.is_some() {
                bail!("the package holds {} twice", String::from_utf8_lossy(&path));
            }
            let mut data = Vec::new();
            entry.take(cap + 1).read_to_end(&mut data).context("the package archive is damaged")?;
            if data.len() as u64 > cap {
                bail!("{} in the package is larger than {} KiB", String::from_utf8_lossy(&path), cap >> 10);
            }
            *slot = Some(data);
        }
        match (manifest_bytes, component) {
            (Some(manifest_bytes), Some(component)) => Ok(Package { manifest_bytes, component }),
            _ => bail!("the package lacks {MANIFEST} or {COMPONENT} (is it an edgechat adapter package?)"),
        }
    }

    /// Checks the signature against `trusted` keys and the component against the signed hash and size.
    pub fn verify(self, trusted: &[PublicKey]) -> Result<Verified> {
        let (manifest, signer): (PackageManifest, String) = Envelope::open(KIND, &self.manifest_bytes, trusted)?;
        let sha256 = hex::encode(Sha256::digest(&self.component));
        if sha256 != manifest.component_sha256 || self.component.len() as u64 != manifest.component_size {
            bail!(
                "its component does not match the signed manifest (sha256 {} of {} bytes, signed {} of {} bytes): it was altered",
                &sha256[..16],
                self.component.len(),
                crate::text::printable(&manifest.component_sha256, 16),
                manifest.component_size
            );
        }
        Ok(Verified { manifest, signer, component: self.component })
    }
}
