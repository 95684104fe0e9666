//! `edgechat serve`: an OpenAI-compatible HTTP API (axum on tokio) over the same library as the chat.
//! Handlers parse and validate on the async side; one worker thread owns the model ([`worker`]).
//!
//! Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`.

pub mod openai;
mod worker;

use crate::shell::Shell;
use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use openai::{ApiError, Envelope, Request};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedReceiver;
use worker::{Job, Status, Update};

pub struct Options {
    pub host: IpAddr,
    pub port: u16,
    /// Loaded at start; otherwise the first request's model is.
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub cors_origin: Option<String>,
    /// Requests that may wait for the one running.
    pub queue: usize,
}

#[derive(Clone)]
struct AppState {
    jobs: SyncSender<Job>,
    status: Arc<Mutex<Status>>,
    models_dir: PathBuf,
    api_key: Option<Arc<str>>,
    queue: usize,
}

/// Binds, prints where, and serves until the process ends.
pub fn serve(shell: Shell, options: Options) -> Result<()> {
    if let Some(model) = &options.model {
        crate::models::resolve(&shell, model)?;
    }
    let listener = std::net::TcpListener::bind((options.host, options.port)).with_context(|| format!("cannot listen on {}:{}", options.host, options.port))?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    if !options.host.is_loopback() && options.api_key.is_none() {
        eprintln!("warning: serving on {} without --api-key: anyone who can reach this address can use the models", options.host);
    }
    let status = Arc::new(Mutex::new(Status::default()));
    let state = AppState {
        models_dir: shell.paths.models(),
        jobs: worker::spawn(shell, options.model.clone(), options.queue, status.clone())?,
        status,
        api_key: options.api_key.map(Arc::from),
        queue: options.queue,
    };
    let app = router(state, options.cors_origin.as_deref())?;
    println!("edgechat serves the OpenAI API at http://{address}/v1");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(listener, app).await
    })?;
    Ok(())
}

fn router(state: AppState, cors_origin: Option<&str>) -> Result<Router> {
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|| async { ApiError { status: StatusCode::NOT_FOUND, ..ApiError::bad_request("no such endpoint", None) } })
        .layer(axum::middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state);
    if let Some(origin) = cors_origin {
        let origin = HeaderValue::from_str(origin).with_context(|| format!("--cors-origin {origin:?} is not a valid origin"))?;
        let cors = tower_http::cors::CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]);
        // Outside the key check: a browser's preflight carries no credentials.
        app = app.layer(cors);
    }
    Ok(app)
}

/// With `--api-key`, every `/v1` request needs `Authorization: Bearer <key>`.
async fn authorize(State(state): State<AppState>, request: HttpRequest, next: Next) -> Response {
    if let (Some(key), true) = (&state.api_key, request.uri().path().starts_with("/v1")) {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        // Compared in time independent of where they differ.
        let matches = given.is_some_and(|g| g.len() == key.len() && g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0);
        if !matches {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn health(State(state): State<AppState>) -> Response {
    let status = state.status.lock().unwrap_or_else(|e| e.into_inner());
    match &status.loading {
        Some(model) => ApiError::unavailable(format!("loading model {model}"), 2).into_response(),
        None => Json(json!({ "status": "ok", "model": status.loaded })).into_response(),
    }
}

/// The models on disk (imported or pulled), by the ids requests use.
fn available(models_dir: &std::path::Path) -> Vec<crate::models::Manifest> {
    crate::models::on_disk(models_dir).into_iter().map(|(_, m)| m).collect()
}

async fn models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = available(&state.models_dir).into_iter().map(|m| json!({ "id": m.id, "object": "model", "created": 0, "owned_by": m.adapter })).collect();
    Json(json!({ "object": "list", "data": data }))
}

async fn chat_completions(State(state): State<AppState>, body: Bytes) -> Response {
    complete(state, body, true).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(state): State<AppState>, body: Bytes) -> Response {
    complete(state, body, false).await.unwrap_or_else(IntoResponse::into_response)
}

/// Sets the job's cancel flag when dropped: the client went away (its connection, and so the handler's
/// future or the response stream, was dropped).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn complete(state: AppState, body: Bytes, chat: bool) -> Result<Response, ApiError> {
    let request: Request = openai::parse(&body, chat)?;
    if !available(&state.models_dir).iter().any(|m| m.id == request.model) {
        return Err(ApiError::model_not_found(&request.model));
    }
    let (updates, mut received) = tokio::sync::mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let envelope = Envelope {
        id: format!("{}-{:016x}", if chat { "chatcmpl" } else { "cmpl" }, rand::random::<u64>()),
        created: crate::chat::now() as u64,
        model: request.model.clone(),
        chat,
        include_usage: request.include_usage,
    };
    let stream = request.stream;
    match state.jobs.try_send(Job { request, updates, cancel: cancel.clone() }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => return Err(ApiError::unavailable(format!("the server is busy ({} requests are waiting); retry shortly", state.queue), 1)),
        Err(TrySendError::Disconnected(_)) => return Err(ApiError::internal("the generation worker stopped")),
    }
    let guard = CancelOnDrop(cancel);
    // The first update decides the status: an error before any text is an HTTP error, not a stream.
    let first = received.recv().await.ok_or_else(|| ApiError::internal("the generation worker stopped"))?;
    if let Update::Failed(error) = first {
        return Err(error);
    }
    if stream {
        return Ok(stream_response(envelope, first, received, guard));
    }
    // Not streamed: the pieces are not needed, the final update carries the whole text.
    let mut update = first;
    loop {
        match update {
            Update::Text(_) => {}
            Update::Done { text, finish_reason, usage } => {
                drop(guard);
                return Ok(Json(envelope.complete(&text, finish_reason, &usage)).into_response());
            }
            Update::Failed(error) => return Err(error),
        }
        update = received.recv().await.ok_or_else(|| ApiError::internal("the generation worker stopped"))?;
    }
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// Server-sent events exactly as OpenAI sends them: the role, content deltas, the finish reason with an
/// empty delta, the usage (when asked), then `[DONE]`.
fn stream_response(envelope: Envelope, first: Update, received: UnboundedReceiver<Update>, guard: CancelOnDrop) -> Response {
    let opening = envelope.chat.then(|| sse(&envelope.chunk(None, true, None)));
    let state = (received, Some(first), guard, envelope, false);
    let events = futures_util::stream::unfold(state, |(mut received, pending, guard, envelope, finished)| async move {
        if finished {
            return None;
        }
        let update = match pending {
            Some(update) => update,
            None => received.recv().await?,
        };
        let (bytes, finished) = match update {
            Update::Text(text) => (sse(&envelope.chunk(Some(&text), false, None)), false),
            Update::Done { finish_reason, usage, .. } => {
                let mut bytes = sse(&envelope.chunk(None, false, Some(finish_reason))).to_vec();
                if envelope.include_usage {
                    bytes.extend_from_slice(&sse(&envelope.usage_chunk(&usage)));
                }
                bytes.extend_from_slice(b"data: [DONE]\n\n");
                (Bytes::from(bytes), true)
            }
            Update::Failed(error) => {
                let mut bytes = sse(&error.body()).to_vec();
                bytes.extend_from_slice(b"data: [DONE]\n\n");
                (Bytes::from(bytes), true)
            }
        };
        Some((Ok::<Bytes, std::convert::Infallible>(bytes), (received, None, guard, envelope, finished)))
    });
    let body = futures_util::stream::iter(opening.map(Ok)).chain(events);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| ApiError::internal("building the response failed").into_response())
}
