//! The one thread that owns the model. Requests wait in a bounded FIFO and run one at a time; the loaded
//! model keeps its cache between them, so a request that repeats a conversation's prefix computes only
//! what is new. A request whose client went away is skipped, or stopped within one token.

use super::openai::{ApiError, Input, Request, Usage};
use crate::chat::{LoadedModel, Prepared, Settings};
use crate::generate::StopReason;
use crate::shell::Shell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;

/// What the worker tells the request's handler.
pub enum Update {
    Text(String),
    Done { text: String, finish_reason: &'static str, usage: Usage },
    Failed(ApiError),
}

pub struct Job {
    pub request: Request,
    pub updates: UnboundedSender<Update>,
    /// Set when the client goes away.
    pub cancel: Arc<AtomicBool>,
}

/// Which model is resident, or loading (`/health`).
#[derive(Default)]
pub struct Status {
    pub loaded: Option<String>,
    pub loading: Option<String>,
}

pub fn spawn(shell: Shell, preload: Option<String>, queue: usize, status: Arc<Mutex<Status>>) -> std::io::Result<SyncSender<Job>> {
    let (jobs, queued) = std::sync::mpsc::sync_channel(queue);
    std::thread::Builder::new().name("generation".into()).spawn(move || Worker { shell, model: None, status }.run(preload, queued))?;
    Ok(jobs)
}

struct Worker {
    shell: Shell,
    model: Option<LoadedModel>,
    status: Arc<Mutex<Status>>,
}

impl Worker {
    fn run(mut self, preload: Option<String>, queued: Receiver<Job>) {
        if let Some(model) = preload {
            if let Err(e) = self.ensure(&model) {
                tracing::error!("{}", e.message);
            }
        }
        for job in queued {
            if job.cancel.load(Ordering::SeqCst) {
                continue; // its client is gone
            }
            if let Err(error) = self.handle(&job) {
                if error.status.is_server_error() {
                    // The adapter may have been stopped mid-call: load afresh next time.
                    self.model = None;
                    self.set_status(None, None);
                }
                let _ = job.updates.send(Update::Failed(error));
            }
        }
    }

    /// Makes `model` the resident one, unloading the previous first.
    fn ensure(&mut self, model: &str) -> Result<&mut LoadedModel, ApiError> {
        if self.model.as_ref().is_none_or(|m| m.id != model) {
            self.model = None;
            self.set_status(None, Some(model));
            let loaded = LoadedModel::load(&self.shell, model, None);
            self.set_status(loaded.as_ref().ok().map(|_| model), None);
            self.model = Some(loaded.map_err(|e| ApiError::internal(format!("loading {model} failed: {e:#}")))?);
        }
        Ok(self.model.as_mut().expect("a model is loaded"))
    }

    fn set_status(&self, loaded: Option<&str>, loading: Option<&str>) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.loaded = loaded.map(str::to_owned);
        status.loading = loading.map(str::to_owned);
    }

    fn handle(&mut self, job: &Job) -> Result<(), ApiError> {
        let request = &job.request;
        let model = self.ensure(&request.model)?;
        let refused = |e: anyhow::Error| ApiError::bad_request(crate::text::printable(&format!("{e:#}"), 1000), Some("messages"));
        let prepared = match &request.input {
            Input::Chat(messages) => model.format(messages, true),
            Input::Text(text) => model.prepare_raw(text),
        };
        let Prepared { ids, mut stops, defaults } = prepared.map_err(refused)?;
        if ids.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
        }
        if ids.len() >= model.context_length {
            let message = format!(
                "This model's maximum context length is {} tokens. However, your messages resulted in {} tokens.",
                model.context_length,
                ids.len()
            );
            return Err(ApiError::bad_request(message, Some("messages")).with_code("context_length_exceeded"));
        }
        stops.extend(request.stop.iter().cloned());
        let settings = Settings { temperature: request.temperature, top_p: request.top_p, seed: request.seed, ..Settings::default() };
        let max_tokens = request.max_tokens.unwrap_or(usize::MAX);
        let outcome = model
            .generate(&ids, &stops, settings.sampling(&defaults), max_tokens, &job.cancel, |_, text| {
                if !text.is_empty() && job.updates.send(Update::Text(text.to_owned())).is_err() {
                    job.cancel.store(true, Ordering::SeqCst);
                }
            })
            .map_err(|e| ApiError::internal(format!("generation failed: {e:#}")))?;
        tracing::info!(
            "{}: {} prompt tokens ({} cached), {} generated in {:.0} ms (prefill {:.0} ms)",
            request.model,
            outcome.prompt_tokens,
            outcome.prompt_tokens - outcome.prefilled_tokens,
            outcome.generated.len(),
            (outcome.prefill + outcome.decode).as_secs_f64() * 1e3,
            outcome.prefill.as_secs_f64() * 1e3
        );
        let finish_reason = if outcome.stop == StopReason::MaxTokens { "length" } else { "stop" };
        let usage = Usage { prompt_tokens: outcome.prompt_tokens, completion_tokens: outcome.generated.len(), cached_tokens: outcome.prompt_tokens - outcome.prefilled_tokens };
        let _ = job.updates.send(Update::Done { text: outcome.text, finish_reason, usage });
        Ok(())
    }
}
