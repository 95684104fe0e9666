//! A model loaded into its adapter, and the forward pass: the adapter builds the graph through the
//! `tensor` import, the shell evaluates it and reads the logits back.

use crate::adapter::bindings::exports::edgechat::adapter::prompt::{FormatOptions, Formatted, Message};
use crate::adapter::{Adapter, Session};
use crate::host::tensor::{Backend, TensorHandle};
use crate::host::weights::OpenCheckpoint;
use anyhow::{bail, Context, Result};
use std::sync::{Arc, Mutex};
use wasmtime::component::{Resource, ResourceAny};

/// The largest vocabulary a model may report (today's largest are ~262k).
const MAX_VOCAB: u32 = 4 << 20;

/// The most tokens computed as one graph: activations and masks grow with it. Gemma 3 270M on 2 threads,
/// 512-token prompt, alternating binaries (docs/benchmarks.md): chunks of 128 prefill at 302-321 tokens/s
/// against 290-295 for 256, with peak RSS 302 against 318 MiB; a 2048-token prompt in one graph peaked
/// at 643 MiB.
pub const PREFILL_CHUNK: usize = 128;

pub struct Model {
    session: Session,
    model: ResourceAny,
    /// The adapter instance the model lives in.
    instance: u64,
    pub vocab: u32,
    /// Total time spent inside `forward` calls building graphs (adapter code and host calls).
    graph_build: std::time::Duration,
    /// Caches dropped by their owners, to be released in the adapter at the next call.
    dropped: Arc<Mutex<Vec<Cache>>>,
}

/// One conversation's state inside the adapter (KV caches, conv state). The adapter holds its arrays
/// until the resource is dropped there, which needs the store: dropping a `Cache` hands it back to its
/// model, which releases it at its next call (a chat that resets, a server that replaces caches, a
/// benchmark's runs would otherwise keep every cache they ever made).
pub struct Cache {
    resource: ResourceAny,
    instance: u64,
    dropped: Option<Arc<Mutex<Vec<Cache>>>>,
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Some(dropped) = self.dropped.take() {
            let cache = Cache { resource: self.resource, instance: self.instance, dropped: None };
            dropped.lock().unwrap_or_else(|e| e.into_inner()).push(cache);
        }
    }
}

impl Model {
    /// Loads a checkpoint through `adapter`; the checkpoint is visible to it only during the load.
    pub fn load(adapter: &Adapter, checkpoint: OpenCheckpoint) -> Result<Model> {
        let mut session = adapter.instantiate()?;
        session.state_mut()?.weights = Some(checkpoint);
        let loaded = session.call("runtime.model.load", |store, b| b.load(store));
        let checkpoint = session.state_mut()?.weights.take();
        let model = loaded.with_context(|| format!("adapter `{}` could not load the model", adapter.name()))?;
        let unused = checkpoint.map(|c| c.unused()).unwrap_or_default();
        if !unused.is_empty() {
            let shown: Vec<String> = unused.iter().take(8).map(|n| crate::text::printable(n, 120)).collect();
            let more = if unused.len() > shown.len() { format!(" and {} more", unused.len() - shown.len()) } else { String::new() };
            bail!(
                "adapter `{}` did not use {} tensor(s) of the checkpoint ({}{more}): the model would run without them, so it is refused",
                adapter.name(),
                unused.len(),
                shown.join(", ")
            );
        }
        let vocab = session.call("model.vocab-size", |store, b| Ok(Ok(b.vocab_size(store, model)?)))?;
        if vocab == 0 || vocab > MAX_VOCAB {
            bail!("adapter `{}` reports a vocabulary of {vocab} tokens (1 to {MAX_VOCAB} are possible)", adapter.name());
        }
        let instance = session.instance();
        Ok(Model { session, model, instance, vocab, graph_build: Default::default(), dropped: Default::default() })
    }

    /// The adapter instance the model lives in (for its sandbox figures).
    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn graph_build_time(&self) -> std::time::Duration {
        self.graph_build
    }

    /// Chat formatting by the same adapter instance.
    pub fn format(&mut self, messages: &[Message], options: &FormatOptions) -> Result<Formatted> {
        Ok(self.session.format(messages, options)?)
    }

    fn check_live(&self, instance: u64) -> Result<()> {
        if self.session.instance() != self.instance || instance != self.instance {
            bail!("adapter `{}` was restarted after an error; load the model again", self.session.adapter().name());
        }
        Ok(())
    }

    pub fn new_cache(&mut self) -> Result<Cache> {
        self.check_live(self.instance)?;
        self.release_dropped_caches()?;
        let model = self.model;
        let resource = self.session.call("model.new-cache", |store, b| Ok(Ok(b.new_cache(store, model)?)))?;
        Ok(Cache { resource, instance: self.instance, dropped: Some(self.dropped.clone()) })
    }

    /// Drops, in the adapter, the caches whose owners let go of them (those of an instance since
    /// restarted went with it).
    fn release_dropped_caches(&mut self) -> Result<()> {
        let dropped = std::mem::take(&mut *self.dropped.lock().unwrap_or_else(|e| e.into_inner()));
        let live = self.session.instance();
        for cache in dropped.into_iter().filter(|c| c.instance == live) {
            self.session.call("cache.drop", |store, _| Ok(Ok(cache.resource.resource_drop(store)?)))?;
        }
        Ok(())
    }

    /// Runs `tokens` after what `cache` holds. Returns logits for every position ([tokens * vocab]) or for
    /// the last one ([vocab]). A long prompt is computed [`PREFILL_CHUNK`] tokens at a time, which gives
    /// the same logits with activation memory bounded by the chunk, not by the prompt.
    pub fn forward(&mut self, tokens: &[u32], cache: &Cache, all_positions: bool) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        let chunks = self.chunks(tokens)?;
        let count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            // An earlier chunk's last-position logits are not wanted (the contract always returns some).
            let mut read = |l: &[f32]| logits.extend_from_slice(l);
            let wanted = all_positions || i + 1 == count;
            self.forward_once(chunk, cache, all_positions, wanted.then_some(&mut read as &mut dyn FnMut(&[f32])))?;
        }
        Ok(logits)
    }

    /// The last position's logits after `tokens`, lent to `f` where they lie (a decode loop samples them
    /// without copying 1 MB first).
    pub fn forward_with<R>(&mut self, tokens: &[u32], cache: &Cache, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        let chunks = self.chunks(tokens)?;
        let count = chunks.len();
        let (mut f, mut result) = (Some(f), None);
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut read = |l: &[f32]| result = f.take().map(|f| f(l));
            self.forward_once(chunk, cache, false, (i + 1 == count).then_some(&mut read as &mut dyn FnMut(&[f32])))?;
        }
        result.ok_or_else(|| anyhow::anyhow!("no logits were computed"))
    }

    /// The graphs `tokens` are computed in, checked whole before any reaches the cache.
    fn chunks<'t>(&self, tokens: &'t [u32]) -> Result<Vec<&'t [u32]>> {
        if let Some(&bad) = tokens.iter().find(|&&t| t >= self.vocab) {
            bail!("token id {bad} is outside the vocabulary (size {})", self.vocab);
        }
        Ok(if tokens.len() <= PREFILL_CHUNK { vec![tokens] } else { tokens.chunks(PREFILL_CHUNK).collect() })
    }

    /// One graph: `tokens` after the cache. Lends the logits to `read`, or drops them unread.
    fn forward_once(&mut self, tokens: &[u32], cache: &Cache, all_positions: bool, read: Option<&mut dyn FnMut(&[f32])>) -> Result<()> {
        self.check_live(cache.instance)?;
        self.release_dropped_caches()?;
        let (model, cache) = (self.model, cache.resource);
        let started = std::time::Instant::now();
        let logits: Resource<TensorHandle> = self.session.call("model.forward", |store, b| {
            b.forward(store, model, tokens, cache, all_positions)
        })?;
        let called = started.elapsed();
        let rows = if all_positions { tokens.len() } else { 1 };
        let name = self.session.adapter().name().to_owned();
        let state = self.session.state_mut()?;
        // A template run computed inside the call (see host::tensor::replay) is evaluation, not building.
        let built = called.saturating_sub(std::mem::take(&mut state.tensors.computed_in_calls));
        self.graph_build += built;
        // The shape is checked before anything is evaluated or read: the adapter chose this array.
        let checked = state.array(&logits).map_err(anyhow::Error::from).and_then(|a| {
            let shape = state.tensors.backend.shape(a);
            if shape != [rows as i32, self.vocab as i32] {
                bail!("adapter `{name}` returned logits of shape {shape:?} from forward, expected [{rows}, {}]", self.vocab);
            }
            Ok(a.clone())
        });
        crate::adapter::bindings::edgechat::adapter::tensor::HostArray::drop(state, logits)?;
        let backend = &state.tensors.backend;
        let read = checked.and_then(|a| {
            let read = match read {
                Some(read) => backend.with_f32(&a, read),
                None => backend.discard(a),
            };
            read.map_err(anyhow::Error::msg).context("evaluating the model's graph")
        });
        tracing::debug!(tokens = tokens.len(), "forward: graph built in {built:?}, evaluated in {:?}", started.elapsed().saturating_sub(built));
        read
    }

    pub fn cache_length(&mut self, cache: &Cache) -> Result<u32> {
        self.check_live(cache.instance)?;
        let resource = cache.resource;
        Ok(self.session.call("cache.length", |store, b| Ok(Ok(b.cache_length(store, resource)?)))?)
    }

    /// Keeps the first `length` tokens of the cache. Fails if the cache no longer holds what resuming
    /// there needs (sliding windows keep a bounded history); start a new cache then.
    pub fn trim(&mut self, cache: &Cache, length: u32) -> Result<()> {
        self.check_live(cache.instance)?;
        let resource = cache.resource;
        Ok(self.session.call("cache.trim", |store, b| b.cache_trim(store, resource, length))?)
    }
}
