//! A stand-in for the model hub on 127.0.0.1 (axum), so `adapters test` can run an adapter's catalog
//! look-ups with no network and no account. It answers the model-info API (`/api/models/ORG/NAME/
//! revision/REV`) for any repository with a plausible snapshot: configs and a tokenizer (git files, no
//! hash), `model.safetensors` (LFS, with sha256), and for a `-GGUF` repository one `.gguf` per common
//! quantization, named as publishers name them (`<base>-<QUANT>.gguf`). Nothing is downloaded from it:
//! the kit only validates the manifests an adapter builds from these listings, as `pull` would.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

const COMMIT: &str = "5eed0000000000000000000000000000c0ffee00";
const GGUF_QUANTS: &[&str] = &["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16"];

/// Starts the server on a thread of its own; returns its base URL. It lives as long as the process.
pub fn start() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let url = format!("http://{}/", listener.local_addr()?);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    std::thread::Builder::new().name("standin-hub".into()).spawn(move || {
        runtime.block_on(async move {
            let app = Router::new().route("/api/models/{org}/{name}/revision/{*revision}", get(model_info));
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::warn!("stand-in hub stopped: {e}");
                    }
                }
                Err(e) => tracing::warn!("stand-in hub could not start: {e}"),
            }
        })
    })?;
    Ok(url)
}

async fn model_info(Path((org, name, _revision)): Path<(String, String, String)>) -> Response {
    let lfs = |path: String, size: u64| {
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(path.as_bytes()));
        json!({ "rfilename": path, "size": size, "lfs": { "sha256": sha256, "size": size } })
    };
    let git = |path: &str, size: u64| json!({ "rfilename": path, "size": size });
    let mut siblings = vec![
        git(".gitattributes", 1_570),
        git("README.md", 12_000),
        git("config.json", 1_200),
        git("generation_config.json", 180),
        git("tokenizer.json", 4_700_000),
        git("tokenizer_config.json", 1_100_000),
        git("special_tokens_map.json", 660),
        lfs("model.safetensors".into(), 536_000_000),
    ];
    if let Some(base) = name.strip_suffix("-GGUF") {
        siblings.extend(GGUF_QUANTS.iter().map(|q| lfs(format!("{base}-{q}.gguf"), 400_000_000)));
    }
    if org.is_empty() || name.is_empty() {
        return StatusCode::NOT_FOUND.into_response();
    }
    Json(json!({ "id": format!("{org}/{name}"), "sha": COMMIT, "siblings": siblings })).into_response()
}
