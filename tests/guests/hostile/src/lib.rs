//! A hostile adapter. It speaks the real contract, but `prompt.format` misbehaves on request: the first
//! message's content picks the attack. The shell must stop each one with a clear error and stay usable.
//!
//!   "spin"     loop forever
//!   "hoard"    allocate memory without bound
//!   "handles"  create a million tensor handles and keep them
//!   "panic"    panic (a trap)
//!   "phone-home"  reach hosts it never declared (returns the refusals as its text)
//!   anything   echo the content back, so tests can show the shell still works after an attack

wit_bindgen::generate!({
    path: "../../../wit/v0.1.0",
    world: "edgechat:adapter/adapter@0.1.0",
    generate_all,
});

use edgechat::adapter::tensor;
use exports::edgechat::adapter::{catalog, info, prompt, runtime};

const NO_DEFAULTS: prompt::GenerationDefaults =
    prompt::GenerationDefaults { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0 };

struct Hostile;

impl info::Guest for Hostile {
    fn get() -> info::AdapterInfo {
        info::AdapterInfo {
            name: "hostile".into(),
            version: "0.1.0".into(),
            contract_version: "0.1.0".into(),
            families: vec!["Test".into()],
            architectures: vec!["hostile".into()],
            allowed_hosts: vec![],
        }
    }
}

impl prompt::Guest for Hostile {
    fn format(messages: Vec<prompt::Message>, _options: prompt::FormatOptions) -> Result<prompt::Formatted, String> {
        let attack = messages.first().map(|m| m.content.as_str()).unwrap_or("");
        match attack {
            "spin" => {
                let mut n = 0u64;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "hoard" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "handles" => {
                let mut kept = Vec::new();
                for i in 0..1_000_000 {
                    kept.push(tensor::Array::from_f32(&[i as f32], &[1]).map_err(|e| e.to_string())?);
                }
                Ok(prompt::Formatted { text: format!("{} handles", kept.len()), stop_sequences: vec![], defaults: NO_DEFAULTS })
            }
            "panic" => panic!("hostile adapter panics on purpose"),
            "phone-home" => {
                // Neither host was declared in info: both must be refused without any request.
                let outside = edgechat::adapter::net::get("http://127.0.0.1:9/steal", &[]).err().unwrap_or_default();
                let hub = edgechat::adapter::net::get("hub:/api/models/x/y", &[]).err().unwrap_or_default();
                Ok(prompt::Formatted { text: format!("{outside}\n{hub}"), stop_sequences: vec![], defaults: NO_DEFAULTS })
            }
            other => Ok(prompt::Formatted { text: other.to_owned(), stop_sequences: vec![], defaults: NO_DEFAULTS }),
        }
    }
}

impl catalog::Guest for Hostile {
    fn describe(_source: catalog::Source) -> Result<catalog::Description, String> {
        Err("no catalog".into())
    }

    fn manifest(_source: catalog::Source) -> Result<catalog::DownloadManifest, String> {
        Err("no catalog".into())
    }
}

pub struct NoCache;
pub struct NoModel;

impl runtime::GuestCache for NoCache {
    fn length(&self) -> u32 {
        0
    }

    fn trim(&self, _length: u32) -> Result<(), String> {
        Ok(())
    }
}

impl runtime::GuestModel for NoModel {
    fn load() -> Result<runtime::Model, String> {
        Err("no model".into())
    }

    fn vocab_size(&self) -> u32 {
        0
    }

    fn new_cache(&self) -> runtime::Cache {
        runtime::Cache::new(NoCache)
    }

    fn forward(&self, _tokens: Vec<u32>, _cache: runtime::CacheBorrow<'_>, _all_positions: bool) -> Result<tensor::Array, String> {
        Err("no model".into())
    }
}

impl runtime::Guest for Hostile {
    type Cache = NoCache;
    type Model = NoModel;

    fn self_test(_a: Vec<f32>, _b: Vec<f32>, _n: u32) -> Result<Vec<Vec<f32>>, String> {
        Err("no self-test".into())
    }
}

export!(Hostile);
