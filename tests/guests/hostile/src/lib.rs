//! A hostile adapter. It speaks the real contract, but `prompt.format` misbehaves on request: the first
//! message's content picks the attack. The shell must stop each one with a clear error and stay usable.
//!
//!   "spin"     loop forever
//!   "hoard"    allocate memory without bound
//!   "handles"  create a million tensor handles and keep them
//!   "panic"    panic (a trap)
//!   "phone-home"  reach hosts it never declared (returns the refusals as its text)
//!   "gather"   read outside a tensor with out-of-range gather indices (returns the refusals)
//!   "shapes"   absurd, overflowing and mismatched shapes for every op (returns one line per refusal)
//!   "broadcast" a broadcast whose result would need terabytes
//!   "eval-loop" / "net-loop"  call the host forever: only the call's deadline can stop it
//!   anything   echo the content back, so tests can show the shell still works after an attack
//!
//! `catalog.manifest` of `hub:redteam/<attack>` returns a malicious download manifest (see `manifest`);
//! `runtime.model.load` loads every tensor it is offered, and `forward` returns logits of a wrong shape.

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
            "gather" => Ok(text(gather())),
            "shapes" => Ok(text(shapes())),
            "broadcast" => {
                let a = tensor::Array::from_f32(&[1.0], &[1, 1])?;
                let tall = tensor::reshape(&a, &[1, 1])?;
                let rows = tensor::concatenate(&vec![&tall; 1 << 12], 0)?; // [4096, 1]
                let cols = tensor::transpose(&rows, &[1, 0])?; // [1, 4096]
                let mut big = tensor::multiply(&rows, &cols)?; // [4096, 4096]
                for _ in 0..4 {
                    let flat = tensor::reshape(&big, &[-1, 1])?;
                    big = tensor::multiply(&flat, &tensor::reshape(&big, &[1, -1])?)?;
                }
                Ok(text(format!("{:?}", big.shape())))
            }
            "eval-loop" => {
                let a = tensor::Array::from_f32(&[1.0; 64], &[8, 8])?;
                loop {
                    let b = tensor::matmul(&a, &a)?;
                    tensor::eval(&[&b])?;
                }
            }
            "net-loop" => loop {
                let _ = edgechat::adapter::net::get("https://undeclared.example/", &[]);
            },
            other => Ok(text(other.to_owned())),
        }
    }
}

fn text(text: String) -> prompt::Formatted {
    prompt::Formatted { text, stop_sequences: vec![], defaults: NO_DEFAULTS }
}

/// Gathers with indices outside the table: each must be refused before MLX reads memory.
fn gather() -> String {
    let attempt = |ids: &[i32]| -> Result<Vec<f32>, String> {
        let table = tensor::Array::from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &[4, 2])?;
        let ids = tensor::Array::from_i32(ids, &[ids.len() as u32])?;
        tensor::read_f32(&tensor::take(&table, &ids, 0)?)
    };
    // Indices the host computes (3 + 3) rather than receives: it must evaluate them to check them.
    let computed = || -> Result<Vec<f32>, String> {
        let table = tensor::Array::from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &[4, 2])?;
        let three = tensor::Array::from_i32(&[3], &[1])?;
        tensor::read_f32(&tensor::take(&table, &tensor::add(&three, &three)?, 0)?)
    };
    [&[4][..], &[-1], &[0, 1_000_000], &[i32::MAX], &[i32::MIN]]
        .iter()
        .map(|ids| attempt(ids))
        .chain([computed()])
        .map(|outcome| match outcome {
            Ok(values) => format!("READ {values:?}"),
            Err(e) => format!("refused: {e}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every op with shapes it cannot take; one line per attempt: "refused: ..." or "ACCEPTED ...".
fn shapes() -> String {
    let f = |shape: &[u32]| tensor::Array::from_f32(&vec![0.5; shape.iter().product::<u32>() as usize], shape);
    let attempts: Vec<(&str, Box<dyn Fn() -> Result<tensor::Array, String>>)> = vec![
        ("from-f32 huge", Box::new(|| tensor::Array::from_f32(&[1.0], &[u32::MAX, u32::MAX]))),
        ("from-f32 short", Box::new(|| tensor::Array::from_f32(&[1.0], &[65536, 65536, 65536, 65536]))),
        ("reshape wrap", Box::new(|| tensor::reshape(&f(&[1])?, &[65536, 65536, 65536, 65536, 65536]))),
        ("reshape two -1", Box::new(|| tensor::reshape(&f(&[4])?, &[-1, -1]))),
        ("reshape rank 100", Box::new(|| tensor::reshape(&f(&[1])?, &[1; 100]))),
        ("matmul mismatch", Box::new(|| tensor::matmul(&f(&[2, 3])?, &f(&[4, 5])?))),
        ("matmul vector", Box::new(|| tensor::matmul(&f(&[3])?, &f(&[3])?))),
        ("add no broadcast", Box::new(|| tensor::add(&f(&[3])?, &f(&[4])?))),
        ("transpose repeat", Box::new(|| tensor::transpose(&f(&[2, 3])?, &[0, 0]))),
        ("transpose huge axis", Box::new(|| tensor::transpose(&f(&[2, 3])?, &[u32::MAX, 0]))),
        ("slice too many axes", Box::new(|| tensor::slice(&f(&[2])?, &[0, 0, 0], &[1, 1, 1]))),
        ("concatenate mismatch", Box::new(|| tensor::concatenate(&[&f(&[2, 3])?, &f(&[2, 4])?], 0))),
        ("concatenate axis", Box::new(|| tensor::concatenate(&[&f(&[2])?], 7))),
        ("softmax axis", Box::new(|| tensor::softmax(&f(&[2])?, -5))),
        ("rms-norm weight", Box::new(|| tensor::rms_norm(&f(&[2, 8])?, &f(&[4])?, 1e-6))),
        ("rms-norm scalar", Box::new(|| tensor::rms_norm(&f(&[])?, &f(&[1])?, 1e-6))),
        ("rope rank 1", Box::new(|| tensor::rope(&f(&[8])?, rope(8, 0)))),
        ("rope dims", Box::new(|| tensor::rope(&f(&[1, 1, 2, 8])?, rope(64, 0)))),
        ("rope offset", Box::new(|| tensor::rope(&f(&[1, 1, 2, 8])?, rope(8, u32::MAX)))),
        ("attention rank 2", Box::new(|| tensor::attention(&f(&[2, 8])?, &f(&[2, 8])?, &f(&[2, 8])?, 1.0, &tensor::Mask::Causal))),
        ("attention heads", Box::new(|| tensor::attention(&f(&[1, 3, 2, 8])?, &f(&[1, 2, 2, 8])?, &f(&[1, 2, 2, 8])?, 1.0, &tensor::Mask::None))),
        ("attention window", Box::new(|| {
            let window = tensor::WindowMask { window: u32::MAX, query_offset: u32::MAX, key_offset: 0 };
            tensor::attention(&f(&[1, 1, 2, 8])?, &f(&[1, 1, 2, 8])?, &f(&[1, 1, 2, 8])?, 1.0, &tensor::Mask::SlidingWindow(window))
        })),
        ("attention mask", Box::new(|| {
            let mask = f(&[5, 7])?;
            tensor::attention(&f(&[1, 1, 2, 8])?, &f(&[1, 1, 2, 8])?, &f(&[1, 1, 2, 8])?, 1.0, &tensor::Mask::Explicit(&mask))
        })),
        ("conv1d rank", Box::new(|| tensor::conv1d_depthwise(&f(&[4])?, &f(&[4, 3])?))),
        ("conv1d short", Box::new(|| tensor::conv1d_depthwise(&f(&[1, 2, 4])?, &f(&[4, 3])?))),
        ("conv1d channels", Box::new(|| tensor::conv1d_depthwise(&f(&[1, 5, 4])?, &f(&[5, 3])?))),
        ("quantized dtype", Box::new(|| tensor::quantized_matmul(&f(&[1, 64])?, &f(&[8, 8])?, &f(&[8, 1])?, &f(&[8, 1])?, true, 64, 4))),
        ("dequantize scales", Box::new(|| {
            let w = tensor::astype(&f(&[8, 8])?, tensor::Dtype::Uint32)?;
            tensor::dequantize(&w, &f(&[8, 3])?, &f(&[8, 3])?, 64, 4)
        })),
        ("dequantize bits", Box::new(|| {
            let w = tensor::astype(&f(&[8, 8])?, tensor::Dtype::Uint32)?;
            tensor::dequantize(&w, &f(&[8, 1])?, &f(&[8, 1])?, 64, 7)
        })),
        ("take float indices", Box::new(|| tensor::take(&f(&[4, 2])?, &f(&[1])?, 0))),
    ];
    attempts
        .into_iter()
        .map(|(name, attempt)| match attempt() {
            Ok(a) => format!("ACCEPTED {name}: {:?}", a.shape()),
            Err(e) => format!("refused {name}: {e}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn rope(dims: u32, offset: u32) -> tensor::RopeParams {
    tensor::RopeParams { dims, traditional: false, base: 10000.0, scale: 1.0, offset }
}

const HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn file(path: &str, url: &str, size: u64, sha256: Option<&str>) -> catalog::ManifestFile {
    catalog::ManifestFile { path: path.into(), url: url.into(), size, sha256: sha256.map(Into::into) }
}

impl catalog::Guest for Hostile {
    fn describe(_source: catalog::Source) -> Result<catalog::Description, String> {
        Err("no catalog".into())
    }

    /// `hub:redteam/<attack>`: a manifest that breaks one rule of the shell's manifest validation.
    fn manifest(source: catalog::Source) -> Result<catalog::DownloadManifest, String> {
        let catalog::Source::Hub(hub) = source else { return Err("no catalog".into()) };
        let attack = hub.repo.strip_prefix("redteam/").unwrap_or("");
        let config = |path: &str| file(path, "hub:/redteam/x/resolve/main/config.json", 10, None);
        let mut revision = "0123456789abcdef".to_owned();
        let files = match attack {
            "empty-path" => vec![file("", "hub:/x", 10, None)],
            "traversal" => vec![file("../../escaped.json", "hub:/x", 10, None)],
            "absolute" => vec![file("/tmp/escaped.json", "hub:/x", 10, None)],
            "reserved" => vec![config("manifest.json")],
            "partial-name" => vec![config("config.json.partial")],
            "case-duplicate" => vec![config("config.json"), config("CONFIG.json")],
            "overflow" => vec![file("a.safetensors", "hub:/x", u64::MAX, Some(HASH)), file("b.safetensors", "hub:/x", 2, Some(HASH))],
            "unhashed-weights" => vec![file("model.safetensors", "hub:/x", 10, None)],
            "no-size" => vec![file("config.json", "hub:/x", 0, None)],
            "undeclared-host" => vec![file("config.json", "https://attacker.example/config.json", 10, None)],
            "plain-http" => vec![file("config.json", "http://attacker.example/config.json", 10, None)],
            "loopback" => vec![file("config.json", "https://127.0.0.1:1/config.json", 10, None)],
            "file-url" => vec![file("config.json", "file:///etc/passwd", 10, None)],
            "escape-revision" => {
                revision = "main\u{1b}]0;pwned\u{7}\u{1b}[2J".to_owned();
                vec![config("config.json")]
            }
            other => return Err(format!("unknown attack {other:?}")),
        };
        Ok(catalog::DownloadManifest { layout: catalog::Layout::Directory, revision, files })
    }
}

pub struct NoCache;
/// Loads every tensor offered (so strict loading passes), then returns logits of the wrong shape.
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
        for name in edgechat::adapter::weights::names() {
            edgechat::adapter::weights::get(&name)?;
        }
        Ok(runtime::Model::new(NoModel))
    }

    fn vocab_size(&self) -> u32 {
        8
    }

    fn new_cache(&self) -> runtime::Cache {
        runtime::Cache::new(NoCache)
    }

    fn forward(&self, _tokens: Vec<u32>, _cache: runtime::CacheBorrow<'_>, _all_positions: bool) -> Result<tensor::Array, String> {
        tensor::Array::from_f32(&[0.0; 3], &[1, 3])
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
