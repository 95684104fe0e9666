//! Publisher keys and signed metadata (ed25519 via ed25519-dalek).
//!
//! A key pair lives in two text files: the secret seed in KEYFILE (mode 0600) and the public key in
//! KEYFILE.pub, one line `edgechat-ed25519 <64 hex digits>`. A key is named by its id: the first 16 hex
//! digits of the public key's sha256.
//!
//! Signed metadata travels as an [`Envelope`]: `{"signed": {...}, "signatures": [{"key_id", "sig"}]}`.
//! The signature covers the exact bytes of `signed` as they appear in the file (kept verbatim with
//! serde_json's `RawValue`, so no canonical JSON is needed), prefixed with the kind of document, so a
//! signed package manifest can never be passed off as an index or the other way round.

use anyhow::{bail, Context, Result};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

const PUBLIC_TAG: &str = "edgechat-ed25519";
const SECRET_TAG: &str = "edgechat-ed25519-secret";

#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

pub struct SecretKey(SigningKey);

impl PublicKey {
    /// Reads `edgechat-ed25519 <hex>` (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<PublicKey> {
        let mut words = text.split_whitespace();
        let (Some(PUBLIC_TAG), Some(hex_key), None) = (words.next(), words.next(), words.next()) else {
            bail!("not an edgechat public key (expected one line `{PUBLIC_TAG} <64 hex digits>`)");
        };
        PublicKey::from_hex(hex_key)
    }

    pub fn from_hex(hex_key: &str) -> Result<PublicKey> {
        let bytes: [u8; 32] = hex::decode(hex_key).ok().and_then(|b| b.try_into().ok()).context("a public key is 64 hex digits")?;
        // Weak (small-order) points are refused: no signature made with them means anything.
        let key = VerifyingKey::from_bytes(&bytes).ok().filter(|k| !k.is_weak()).context("not a valid ed25519 public key")?;
        Ok(PublicKey(key))
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    /// The name users see and type: 16 hex digits of the key's sha256.
    pub fn id(&self) -> String {
        hex::encode(&Sha256::digest(self.0.as_bytes())[..8])
    }

    pub fn to_line(&self) -> String {
        format!("{PUBLIC_TAG} {}\n", self.hex())
    }
}

impl SecretKey {
    pub fn read(path: &Path) -> Result<SecretKey> {
        let text = crate::paths::read_capped(path, 4096)?;
        let mut words = text.split_whitespace();
        let (Some(SECRET_TAG), Some(seed), None) = (words.next(), words.next(), words.next()) else {
            bail!("{} is not an edgechat secret key (made by `edgechat adapters keygen`)", path.display());
        };
        let seed: [u8; 32] =
            hex::decode(seed).ok().and_then(|b| b.try_into().ok()).with_context(|| format!("{}: the secret key is not 64 hex digits", path.display()))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
}

/// Makes a key pair: the secret in `path` (created new, mode 0600), the public key in `path.pub`.
pub fn keygen(path: &Path) -> Result<PublicKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("the system random source failed: {e}"))?;
    let secret = SecretKey(SigningKey::from_bytes(&seed));
    let public = secret.public();
    let pub_path = public_path(path);
    for p in [path, pub_path.as_path()] {
        if p.exists() {
            bail!("{} already exists; refusing to overwrite a key", p.display());
        }
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{SECRET_TAG} {}", hex::encode(seed))?;
    file.sync_all()?;
    std::fs::write(&pub_path, public.to_line()).with_context(|| format!("writing {}", pub_path.display()))?;
    Ok(public)
}

pub fn public_path(secret: &Path) -> PathBuf {
    let mut name = secret.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

#[derive(Serialize, Deserialize)]
struct Signature {
    key_id: String,
    sig: String,
}

/// A signed document as it travels: the signed JSON kept byte for byte, and its signatures.
#[derive(Serialize, Deserialize)]
pub struct Envelope {
    signed: Box<RawValue>,
    signatures: Vec<Signature>,
}

/// What a signature covers: the kind of document, then the signed bytes.
fn message(kind: &str, signed: &str) -> Vec<u8> {
    let mut m = format!("edgechat {kind} v1\n").into_bytes();
    m.extend_from_slice(signed.as_bytes());
    m
}

impl Envelope {
    /// Signs `value` as a document of `kind`; returns the envelope's JSON text.
    pub fn sign<T: Serialize>(kind: &str, value: &T, key: &SecretKey) -> Result<String> {
        let signed = serde_json::value::to_raw_value(value)?;
        let sig = key.0.sign(&message(kind, signed.get()));
        let envelope = Envelope { signatures: vec![Signature { key_id: key.public().id(), sig: hex::encode(sig.to_bytes()) }], signed };
        Ok(serde_json::to_string_pretty(&envelope)? + "\n")
    }

    /// Checks the envelope's signatures against `trusted`, and parses the signed document only once one
    /// of them verifies. Returns the document and the id of the key that signed it.
    pub fn open<T: DeserializeOwned>(kind: &str, bytes: &[u8], trusted: &[PublicKey]) -> Result<(T, String)> {
        let envelope: Envelope = serde_json::from_slice(bytes).with_context(|| format!("the {kind} is not a signed edgechat document"))?;
        if envelope.signatures.is_empty() {
            bail!("the {kind} is not signed");
        }
        let message = message(kind, envelope.signed.get());
        let mut unknown = Vec::new();
        for signature in &envelope.signatures {
            let Some(key) = trusted.iter().find(|k| k.id() == signature.key_id) else {
                unknown.push(crate::text::printable(&signature.key_id, 20));
                continue;
            };
            let sig = hex::decode(&signature.sig)
                .ok()
                .and_then(|b| <[u8; 64]>::try_from(b).ok())
                .map(|b| ed25519_dalek::Signature::from_bytes(&b))
                .with_context(|| format!("the {kind}'s signature by key {} is malformed", key.id()))?;
            key.0.verify_strict(&message, &sig).map_err(|_| anyhow::anyhow!("the {kind}'s signature by key {} does not verify: it was altered after signing", key.id()))?;
            let document = serde_json::from_str(envelope.signed.get()).with_context(|| format!("the signed {kind} is malformed"))?;
            return Ok((document, key.id()));
        }
        bail!("the {kind} is signed by key {}, which this installation does not trust (see `edgechat adapters keys`)", unknown.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey(SigningKey::from_bytes(&[7; 32]))
    }

    #[test]
    fn a_signed_document_opens_only_with_its_key_and_kind_and_untouched() {
        let key = key();
        let text = Envelope::sign("index", &serde_json::json!({"version": 3}), &key).unwrap();
        let (doc, id): (serde_json::Value, String) = Envelope::open("index", text.as_bytes(), &[key.public()]).unwrap();
        assert_eq!((doc["version"].as_u64(), id), (Some(3), key.public().id()));

        let other = SecretKey(SigningKey::from_bytes(&[8; 32])).public();
        let err = Envelope::open::<serde_json::Value>("index", text.as_bytes(), &[other]).err().unwrap();
        assert!(format!("{err:#}").contains("does not trust"), "{err:#}");
        let err = Envelope::open::<serde_json::Value>("package manifest", text.as_bytes(), &[key.public()]).err().unwrap();
        assert!(format!("{err:#}").contains("does not verify"), "{err:#}");
        let tampered = text.replace("\"version\":3", "\"version\":4");
        assert_ne!(tampered, text);
        let err = Envelope::open::<serde_json::Value>("index", tampered.as_bytes(), &[key.public()]).err().unwrap();
        assert!(format!("{err:#}").contains("does not verify"), "{err:#}");
    }

    #[test]
    fn keys_round_trip_through_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("publisher.key");
        let public = keygen(&path).unwrap();
        assert_eq!(SecretKey::read(&path).unwrap().public().id(), public.id());
        assert_eq!(PublicKey::parse(&std::fs::read_to_string(public_path(&path)).unwrap()).unwrap().id(), public.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(keygen(&path).is_err(), "an existing key is never overwritten");
        assert!(PublicKey::parse("edgechat-ed25519 00").is_err());
        assert!(PublicKey::from_hex(&"00".repeat(32)).is_err(), "the identity point is a weak key");
    }
}
