//! What the leap adapter knows about LFM2 checkpoints: Leap bundles (one file per model and quantization)
//! and hub snapshots (safetensors).

use adapter_kit::wit::exports::edgechat::adapter::catalog::{Description, DownloadManifest, Layout, ManifestFile, RuntimeKind, Source};
use adapter_kit::hub;

/// Architecture facts of one LFM2 size, from its config.json.
struct Size {
    slug: &'static str,
    label: &'static str,
    parameters: u64,
    context_length: u32,
    attention_layers: u64,
    kv_heads: u64,
    head_dim: u64,
}

const SIZES: &[Size] = &[
    Size { slug: "lfm2-350m", label: "350M", parameters: 354_483_968, context_length: 32_768, attention_layers: 6, kv_heads: 8, head_dim: 64 },
    Size { slug: "lfm2-700m", label: "700M", parameters: 742_489_344, context_length: 32_768, attention_layers: 6, kv_heads: 8, head_dim: 96 },
    Size { slug: "lfm2-1.2b", label: "1.2B", parameters: 1_170_340_608, context_length: 32_768, attention_layers: 6, kv_heads: 8, head_dim: 64 },
];

/// Bits per weight of the quantizations Leap ships, and of plain hub snapshots.
fn bits_per_weight(quantization: &str) -> Result<f64, String> {
    Ok(match quantization.to_ascii_uppercase().as_str() {
        "Q4_0" => 4.5,
        "Q4_K_M" => 4.85,
        "Q5_K_M" => 5.69,
        "Q6_K" => 6.56,
        "Q8_0" => 8.5,
        "F16" | "BF16" => 16.0,
        other => return Err(format!("unknown LFM2 quantization {other:?} (known: Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0, F16)")),
    })
}

pub fn describe(source: &Source) -> Result<Description, String> {
    let (name, bits, runtime, precision) = match source {
        Source::Leap(leap) => {
            (leap.slug.to_ascii_lowercase(), bits_per_weight(&leap.quantization)?, RuntimeKind::MlxLeapBundle, leap.quantization.to_ascii_uppercase())
        }
        Source::Hub(hub) => (hub.repo.to_ascii_lowercase(), 16.0, RuntimeKind::MlxSafetensors, "bf16".to_owned()),
    };
    let size = SIZES
        .iter()
        .find(|s| name.contains(s.slug))
        .ok_or_else(|| format!("{name} is not an LFM2 size this adapter knows (350M, 700M, 1.2B)"))?;
    let weights = (size.parameters as f64 * bits / 8.0) as u64;
    // Only the attention layers keep a KV cache (bf16); conv layers keep a few tokens of state.
    let kv_bytes = size.attention_layers * size.context_length as u64 * 2 * size.kv_heads * size.head_dim * 2;
    Ok(Description {
        display_name: format!("LFM2 {} ({precision})", size.label),
        family: "LFM2".into(),
        provider: "Liquid AI".into(),
        runtime,
        context_length: size.context_length,
        parameters: size.parameters,
        download_bytes: weights + 5_000_000, // + tokenizer and configs
        memory_bytes: weights + kv_bytes + weights / 10,
    })
}

/// Leap publishes each LFM2 model as single-file bundles, one per quantization, in the hub repository
/// `LiquidAI/<slug>-GGUF`; hub sources are ordinary safetensors snapshots.
pub fn manifest(source: &Source) -> Result<DownloadManifest, String> {
    match source {
        Source::Leap(leap) => {
            bits_per_weight(&leap.quantization)?;
            let repo = format!("LiquidAI/{}-GGUF", leap.slug);
            let file = format!("{}-{}.gguf", leap.slug, leap.quantization);
            let listing = hub::listing(&repo, "main")?;
            let found = listing
                .files
                .into_iter()
                .find(|f| f.path == file)
                .ok_or_else(|| format!("{repo} has no bundle {file} (quantization {} not published?)", leap.quantization))?;
            Ok(DownloadManifest {
                layout: Layout::Bundle,
                files: vec![ManifestFile { url: hub::file_url(&repo, &listing.sha, &found.path), path: found.path, size: found.size, sha256: found.sha256 }],
                revision: listing.sha,
            })
        }
        Source::Hub(h) => {
            let listing = hub::listing(&h.repo, &h.revision)?;
            let files: Vec<ManifestFile> = listing
                .files
                .into_iter()
                .filter(|f| hub::is_snapshot_file(&f.path))
                .map(|f| ManifestFile { url: hub::file_url(&h.repo, &listing.sha, &f.path), path: f.path, size: f.size, sha256: f.sha256 })
                .collect();
            if !files.iter().any(|f| f.path.ends_with(".safetensors")) {
                return Err(format!("{}@{} has no .safetensors weights", h.repo, h.revision));
            }
            Ok(DownloadManifest { layout: Layout::Directory, revision: listing.sha, files })
        }
    }
}
