//! What the gemma adapter knows about Gemma 3 checkpoints on the hub: names, sizes, context, memory.

use adapter_kit::wit::exports::edgechat::adapter::catalog::{Description, DownloadManifest, Layout, ManifestFile, RuntimeKind, Source};

/// Architecture facts of one Gemma 3 size, from its config.json.
struct Size {
    tag: &'static str,
    label: &'static str,
    parameters: u64,
    context_length: u32,
    layers: u64,
    kv_heads: u64,
    head_dim: u64,
    sliding_window: u64,
    /// Every n-th layer attends globally; the rest use the sliding window.
    global_every: u64,
}

const SIZES: &[Size] = &[
    Size { tag: "gemma-3-270m", label: "270M", parameters: 268_098_176, context_length: 32_768, layers: 18, kv_heads: 1, head_dim: 256, sliding_window: 512, global_every: 6 },
    Size { tag: "gemma-3-1b", label: "1B", parameters: 999_885_952, context_length: 32_768, layers: 26, kv_heads: 1, head_dim: 256, sliding_window: 512, global_every: 6 },
    Size { tag: "gemma-3-4b", label: "4B", parameters: 3_880_099_328, context_length: 131_072, layers: 34, kv_heads: 4, head_dim: 256, sliding_window: 1024, global_every: 6 },
];

/// Bytes per parameter and a label, from the repo name's quantization suffix (mlx-community naming).
fn precision(repo: &str) -> (f64, &'static str) {
    // MLX affine quantization stores a bf16 scale and bias per group of 64: +0.5 bit per weight.
    if repo.contains("4bit") {
        (4.5 / 8.0, "4-bit")
    } else if repo.contains("8bit") {
        (8.5 / 8.0, "8-bit")
    } else if repo.contains("fp32") || repo.contains("f32") {
        (4.0, "f32")
    } else {
        (2.0, "bf16")
    }
}

pub fn describe(source: &Source) -> Result<Description, String> {
    let Source::Hub(hub) = source else {
        return Err("the gemma adapter serves hub snapshots; Leap bundles belong to the leap adapter".into());
    };
    let name = hub.repo.to_ascii_lowercase();
    let size = SIZES
        .iter()
        .find(|s| name.contains(s.tag))
        .ok_or_else(|| format!("{} is not a Gemma 3 size this adapter knows (270M, 1B, 4B)", hub.repo))?;
    let (bytes_per_param, precision) = precision(&name);
    let instruct = name.contains("-it");
    let weights = (size.parameters as f64 * bytes_per_param) as u64;
    // bf16 K and V per layer: global layers hold the whole context, sliding ones only their window.
    let global_layers = size.layers / size.global_every;
    let kv_tokens = global_layers * size.context_length as u64 + (size.layers - global_layers) * size.sliding_window;
    let kv_bytes = kv_tokens * 2 * size.kv_heads * size.head_dim * 2;
    Ok(Description {
        display_name: format!("Gemma 3 {}{} ({precision})", size.label, if instruct { " Instruct" } else { "" }),
        family: "Gemma 3".into(),
        provider: "Google".into(),
        runtime: RuntimeKind::MlxSafetensors,
        context_length: size.context_length,
        parameters: size.parameters,
        download_bytes: weights + 40_000_000, // + tokenizer.json and configs
        memory_bytes: weights + kv_bytes + weights / 10,
    })
}

pub fn manifest(source: &Source) -> Result<DownloadManifest, String> {
    let Source::Hub(hub) = source else {
        return Err("the gemma adapter serves hub snapshots; Leap bundles belong to the leap adapter".into());
    };
    snapshot_manifest(&hub.repo, &hub.revision)
}

/// A hub snapshot: its safetensors, configs and tokenizer at the resolved commit.
pub fn snapshot_manifest(repo: &str, revision: &str) -> Result<DownloadManifest, String> {
    let listing = adapter_kit::hub::listing(repo, revision)?;
    let files: Vec<ManifestFile> = listing
        .files
        .into_iter()
        .filter(|f| adapter_kit::hub::is_snapshot_file(&f.path))
        .map(|f| ManifestFile { url: adapter_kit::hub::file_url(repo, &listing.sha, &f.path), path: f.path, size: f.size, sha256: f.sha256 })
        .collect();
    if !files.iter().any(|f| f.path.ends_with(".safetensors")) {
        return Err(format!("{repo}@{revision} has no .safetensors weights"));
    }
    if !files.iter().any(|f| f.path == "config.json") {
        return Err(format!("{repo}@{revision} has no config.json"));
    }
    Ok(DownloadManifest { layout: Layout::Directory, revision: listing.sha, files })
}
