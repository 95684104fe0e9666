//! Conversations with a loaded model: the library behind `edgechat chat` and `edgechat serve`.
//!
//! [`LoadedModel`] owns a model (its adapter instance), its tokenizer and one cache, and reuses whatever
//! prefix of a new prompt the cache already holds — the second turn of a chat, or a request that repeats
//! a conversation, computes only what is new. [`ChatSession`] adds a conversation: a system prompt, turns,
//! settings, a context window that drops the oldest turns when full, and persistence.

use crate::adapter::bindings::exports::edgechat::adapter::prompt::{FormatOptions, GenerationDefaults};
use crate::db::{ConversationRecord, Db, MessageRecord};
use crate::engine::{Cache, Model};
use crate::generate::{self, Outcome, Request, SamplingParams, StopReason, Stops};
use crate::host::weights::Precision;
use crate::models::ModelFiles;
use crate::registry::Registry;
use crate::shell::Shell;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use crate::tokenizer::Tokenizer;

pub use crate::adapter::bindings::exports::edgechat::adapter::prompt::Message;

/// Context assumed when a checkpoint does not say.
const FALLBACK_CONTEXT: usize = 4096;

/// A model ready to generate, with one cache and the tokens it holds.
pub struct LoadedModel {
    pub id: String,
    pub adapter: String,
    pub adapter_version: String,
    /// "Gemma 3", "LFM2".
    pub family: String,
    /// Who made the model, when the catalog knows it ("Google").
    pub provider: Option<String>,
    pub context_length: usize,
    model: Model,
    tokenizer: Tokenizer,
    tokenizer_config: Option<String>,
    cache: Option<Cache>,
    cached: Vec<u32>,
}

/// A formatted, tokenized prompt and what the adapter says about generating after it.
pub struct Prepared {
    pub ids: Vec<u32>,
    pub stops: Vec<String>,
    pub defaults: GenerationDefaults,
}

impl LoadedModel {
    /// Loads a model by id (imported or downloaded) or path, at its recorded precision unless told.
    pub fn load(shell: &Shell, id: &str, precision: Option<Precision>) -> Result<LoadedModel> {
        let files = crate::models::resolve(shell, id)?;
        let mut loaded = Self::from_files(&shell.registry, id, &files, precision)?;
        // The catalog entry's adapter describes who made the model (a badge in `/show`).
        if let Some(entry) = shell.catalog.get(id) {
            let described = shell.registry.get(&entry.adapter).and_then(|a| Ok(a.instantiate()?.describe(&entry.source.to_wit())?));
            loaded.provider = described.ok().map(|d| d.provider);
        }
        Ok(loaded)
    }

    pub fn from_files(registry: &Registry, id: &str, files: &ModelFiles, precision: Option<Precision>) -> Result<LoadedModel> {
        let adapter = registry.for_architecture(&files.architecture)?;
        let tokenizer = files.tokenizer()?.with_context(|| format!("{id} has no tokenizer.json: chat needs one"))?;
        let model = Model::load(adapter, files.open(files.precision(precision)?)?)?;
        Ok(LoadedModel {
            id: id.to_owned(),
            adapter: adapter.name().to_owned(),
            adapter_version: adapter.info.version.clone(),
            family: adapter.info.families.join(", "),
            provider: None,
            context_length: files.context_length().unwrap_or(FALLBACK_CONTEXT),
            model,
            tokenizer,
            tokenizer_config: files.tokenizer_config.clone(),
            cache: None,
            cached: Vec::new(),
        })
    }

    /// Chat-formats `messages` through the adapter and tokenizes the text (special tokens written out).
    pub fn format(&mut self, messages: &[Message], generation_prompt: bool) -> Result<Prepared> {
        let options = FormatOptions { add_generation_prompt: generation_prompt, tokenizer_config: self.tokenizer_config.clone() };
        let formatted = self.model.format(messages, &options)?;
        let ids = self.encode(&formatted.text, false)?;
        Ok(Prepared { ids, stops: formatted.stop_sequences, defaults: formatted.defaults })
    }

    /// Tokenizes plain text; `bos` adds the tokenizer's own special tokens (raw completions).
    pub fn encode(&self, text: &str, bos: bool) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, bos).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
    }

    /// Plain text with the tokenizer's BOS, for a raw completion: it stops at the family's end-of-turn
    /// sequences and samples with its defaults (the adapter names both with any prompt).
    pub fn prepare_raw(&mut self, text: &str) -> Result<Prepared> {
        let family = self.format(&[Message { role: "user".into(), content: String::new() }], true)?;
        Ok(Prepared { ids: self.encode(text, true)?, ..family })
    }

    /// Forgets the cache: the next generation computes its whole prompt.
    pub fn reset_cache(&mut self) {
        self.cache = None;
        self.cached.clear();
    }

    /// Tokens the cache holds now.
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
    }

    /// Generates after `ids`, reusing the cached prefix. `on_text` gets each piece of visible text.
    pub fn generate(
        &mut self,
        ids: &[u32],
        stops: &[String],
        sampling: SamplingParams,
        max_tokens: usize,
        cancel: &AtomicBool,
        on_text: impl FnMut(u32, &str),
    ) -> Result<Outcome> {
        if ids.is_empty() {
            bail!("nothing to feed the model: the prompt is empty");
        }
        if ids.len() >= self.context_length {
            bail!("the prompt is {} tokens; {} holds {} tokens of context", ids.len(), self.id, self.context_length);
        }
        let mut cache = match self.cache.take() {
            Some(cache) => cache,
            None => self.model.new_cache()?,
        };
        let cached = generate::reuse_prefix(&mut self.model, &mut cache, &self.cached, ids)?;
        self.cached.truncate(cached);
        let stops = Stops::new(stops, Some(&self.tokenizer));
        let max_tokens = max_tokens.min(self.context_length - ids.len());
        let request = Request { prompt: ids, max_tokens, sampling, stops: &stops, tokenizer: Some(&self.tokenizer), cancel };
        let outcome = generate::generate(&mut self.model, &cache, cached, request, on_text);
        // Whatever happened, the cache holds a prefix of prompt + generated; remember exactly how much.
        let held = self.model.cache_length(&cache).unwrap_or(0) as usize;
        let mut tokens: Vec<u32> = ids.to_vec();
        if let Ok(o) = &outcome {
            tokens.extend(&o.generated);
        }
        tokens.truncate(held);
        if held > tokens.len() {
            tokens.clear(); // an error mid-way: the cache's content is unknown, so it is not reused
            cache = self.model.new_cache()?;
        }
        self.cached = tokens;
        self.cache = Some(cache);
        outcome
    }
}

/// The user's sampling choices; None takes the model family's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_tokens: Option<usize>,
    pub seed: Option<u64>,
}

/// Replies are cut here unless the user sets `max_tokens`.
pub const DEFAULT_MAX_TOKENS: usize = 1024;

impl Settings {
    pub fn sampling(&self, d: &GenerationDefaults) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k as usize),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            seed: self.seed,
        }
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)
    }

    /// `/set NAME VALUE`.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let number = |ok: fn(f32) -> bool, range: &str| -> Result<Option<f32>> {
            match value.parse::<f32>() {
                Ok(v) if v.is_finite() && ok(v) => Ok(Some(v)),
                _ => bail!("{name} must be a number {range}, not {value:?}"),
            }
        };
        let count = |min: usize| -> Result<usize> {
            value.parse::<usize>().ok().filter(|&n| n >= min).with_context(|| format!("{name} must be a whole number of at least {min}, not {value:?}"))
        };
        match name {
            "temperature" => self.temperature = number(|v| v >= 0.0, "of 0 or more")?,
            "top_p" => self.top_p = number(|v| v > 0.0 && v <= 1.0, "in (0, 1]")?,
            "min_p" => self.min_p = number(|v| (0.0..1.0).contains(&v), "in [0, 1)")?,
            "repetition_penalty" => self.repetition_penalty = number(|v| v > 0.0, "above 0")?,
            "top_k" => self.top_k = Some(count(0)?),
            "max_tokens" => self.max_tokens = Some(count(1)?),
            "seed" => self.seed = Some(value.parse().with_context(|| format!("seed must be a whole number, not {value:?}"))?),
            other => bail!("unknown setting {other:?} (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens, seed)"),
        }
        Ok(())
    }
}

/// One message of a conversation, as kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: String,
    pub content: String,
    /// Unix seconds.
    pub at: i64,
    /// Tokens of the content alone.
    pub tokens: usize,
}

/// What a reply took.
#[derive(Debug, Clone)]
pub struct TurnStats {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub time_to_first_token: Duration,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub stop: StopReason,
}

impl TurnStats {
    fn of(outcome: &Outcome, first_token: Duration) -> TurnStats {
        TurnStats {
            prompt_tokens: outcome.prompt_tokens,
            cached_tokens: outcome.prompt_tokens - outcome.prefilled_tokens,
            completion_tokens: outcome.generated.len(),
            time_to_first_token: first_token,
            prefill_tokens_per_s: outcome.prefill_tokens_per_s(),
            decode_tokens_per_s: outcome.decode_tokens_per_s(),
            stop: outcome.stop,
        }
    }
}

pub enum Event<'a> {
    /// Visible text of the reply, as it streams.
    Text(&'a str),
    /// The oldest turns no longer fit the context and were left out of what the model sees.
    Dropped { turns: usize },
}

/// A conversation with one loaded model.
pub struct ChatSession {
    pub model: LoadedModel,
    pub system: Option<String>,
    pub turns: Vec<Turn>,
    pub settings: Settings,
    /// Turns before this index no longer fit the context: the model sees the system prompt and the rest.
    pub window_start: usize,
    pub last: Option<TurnStats>,
    /// The saved conversation this is, once saved; turns before `saved` are in the database.
    pub conversation: Option<i64>,
    saved: usize,
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl ChatSession {
    pub fn new(model: LoadedModel, system: Option<String>) -> ChatSession {
        ChatSession { model, system, turns: Vec::new(), settings: Settings::default(), window_start: 0, last: None, conversation: None, saved: 0 }
    }

    /// What the model is shown: the system prompt and the turns in the window.
    pub fn messages(&self) -> Vec<Message> {
        let system = self.system.iter().map(|s| Message { role: "system".into(), content: s.clone() });
        system.chain(self.turns[self.window_start..].iter().map(|t| Message { role: t.role.clone(), content: t.content.clone() })).collect()
    }

    /// Adds the user's message and streams the reply. On error (or a refused message) the conversation
    /// is as before.
    pub fn send(&mut self, text: &str, cancel: &AtomicBool, on_event: impl FnMut(Event)) -> Result<TurnStats> {
        let tokens = self.model.encode(text, false)?.len();
        self.turns.push(Turn { role: "user".into(), content: text.to_owned(), at: now(), tokens });
        let result = self.reply(cancel, on_event);
        if result.is_err() {
            self.turns.pop();
        }
        result
    }

    /// Replaces the last reply with a new one.
    pub fn regenerate(&mut self, cancel: &AtomicBool, on_event: impl FnMut(Event)) -> Result<TurnStats> {
        if self.turns.last().is_some_and(|t| t.role == "assistant") {
            let removed = self.turns.pop().expect("a last turn");
            self.saved = self.saved.min(self.turns.len()); // the next save replaces the old reply
            return self.reply(cancel, on_event).inspect_err(|_| self.turns.push(removed.clone()));
        }
        bail!("there is no reply to regenerate yet")
    }

    /// Forgets the turns (the system prompt stays) and starts a new conversation.
    pub fn clear(&mut self) {
        self.turns.clear();
        self.window_start = 0;
        self.conversation = None;
        self.saved = 0;
    }

    /// Tokens of the prompt the model would see now (without a reply).
    pub fn context_used(&mut self) -> Result<usize> {
        if self.turns.is_empty() {
            return Ok(0);
        }
        Ok(self.model.format(&self.messages(), false)?.ids.len())
    }

    fn reply(&mut self, cancel: &AtomicBool, mut on_event: impl FnMut(Event)) -> Result<TurnStats> {
        let context = self.model.context_length;
        let reserve = self.settings.max_tokens().min(context / 2);
        let mut dropped = 0;
        let prepared = loop {
            let prepared = self.model.format(&self.messages(), true)?;
            if prepared.ids.len() + reserve <= context {
                break prepared;
            }
            // Drop the oldest exchange: up to the next user turn after the window's first.
            let next_user = self.turns[self.window_start + 1..].iter().position(|t| t.role == "user").map(|i| self.window_start + 1 + i);
            match next_user {
                Some(start) => {
                    dropped += start - self.window_start;
                    self.window_start = start;
                }
                None => bail!(
                    "the message does not fit: the prompt is {} tokens and {} holds {context} (with {reserve} kept for the reply)",
                    prepared.ids.len(),
                    self.model.id
                ),
            }
        };
        if dropped > 0 {
            on_event(Event::Dropped { turns: dropped });
        }
        let sampling = self.settings.sampling(&prepared.defaults);
        let started = Instant::now();
        let mut first_token = None;
        let outcome = self.model.generate(&prepared.ids, &prepared.stops, sampling, self.settings.max_tokens(), cancel, |_, text| {
            if !text.is_empty() {
                first_token.get_or_insert_with(|| started.elapsed());
                on_event(Event::Text(text));
            }
        })?;
        let stats = TurnStats::of(&outcome, first_token.unwrap_or(outcome.prefill));
        self.turns.push(Turn { role: "assistant".into(), content: outcome.text.clone(), at: now(), tokens: outcome.generated.len() });
        self.last = Some(stats.clone());
        Ok(stats)
    }

    /// Writes what is new since the last save: the conversation row, then each new turn.
    pub fn save(&mut self, db: &Db, title: Option<&str>) -> Result<i64> {
        let settings = serde_json::to_string(&self.settings)?;
        let record = ConversationRecord {
            id: self.conversation.unwrap_or(0),
            title: title.map(str::to_owned).or_else(|| self.turns.first().map(|t| crate::text::printable(&t.content, 60))).unwrap_or_default(),
            model: self.model.id.clone(),
            adapter: self.model.adapter.clone(),
            adapter_version: self.model.adapter_version.clone(),
            settings,
            system: self.system.clone(),
            created_at: now(),
            updated_at: now(),
            messages: 0,
        };
        let id = db.save_conversation(&record, title.is_some())?;
        db.truncate_messages(id, self.saved)?;
        for turn in &self.turns[self.saved.min(self.turns.len())..] {
            db.append_message(id, &MessageRecord { role: turn.role.clone(), content: turn.content.clone(), tokens: Some(turn.tokens as i64), created_at: turn.at })?;
        }
        self.conversation = Some(id);
        self.saved = self.turns.len();
        Ok(id)
    }

    /// Continues a saved conversation with `model` (the conversation's own model, or another).
    pub fn resume(model: LoadedModel, db: &Db, id: i64) -> Result<ChatSession> {
        let mut session = ChatSession::new(model, None);
        session.load_conversation(db, id)?;
        Ok(session)
    }

    /// Replaces the conversation with a saved one, keeping the loaded model.
    pub fn load_conversation(&mut self, db: &Db, id: i64) -> Result<()> {
        let (record, messages) = db.conversation(id)?.with_context(|| format!("no saved conversation {id} (see `edgechat history`)"))?;
        self.system = record.system;
        self.settings = serde_json::from_str(&record.settings).unwrap_or_default();
        self.turns = messages.into_iter().map(|m| Turn { role: m.role, content: m.content, at: m.created_at, tokens: m.tokens.unwrap_or(0) as usize }).collect();
        self.window_start = 0;
        self.conversation = Some(id);
        self.saved = self.turns.len();
        Ok(())
    }
}

/// Reads an OpenAI-style message list.
pub fn read_messages(text: &str) -> Result<Vec<Message>> {
    let value: serde_json::Value = serde_json::from_str(text).context("messages are not valid JSON")?;
    let list = value.as_array().context("messages must be a JSON list of {\"role\", \"content\"} objects")?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |name: &str| -> Result<String> {
                match m.get(name) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(_) => bail!("message {i}: `{name}` must be a string"),
                    None => bail!("message {i}: `{name}` is missing"),
                }
            };
            Ok(Message { role: field("role")?, content: field("content")? })
        })
        .collect()
}
