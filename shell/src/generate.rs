//! The generation loop: prefill, sample, stream text, stop.
//!
//! Sampling is [`crate::sampler`]'s.
//! Text is streamed with the tokenizer's incremental decoder (never splitting a UTF-8 character,
//! SentencePiece spaces handled), and any text that might be the start of a stop string is held back
//! until it is known not to be one, so no part of a stop string is ever shown.

use crate::engine::{Cache, Model};
pub use crate::sampler::{argmax, Sampler, SamplingParams};
use anyhow::Result;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use crate::tokenizer::Tokenizer;

/// When to stop: special tokens that end a turn, and strings.
#[derive(Debug, Clone, Default)]
pub struct Stops {
    pub token_ids: HashSet<u32>,
    pub strings: Vec<String>,
}

impl Stops {
    /// Stop sequences that are single tokens of `tokenizer` stop on the token; the rest on the text.
    pub fn new(sequences: &[String], tokenizer: Option<&Tokenizer>) -> Stops {
        let mut stops = Stops::default();
        for s in sequences {
            match tokenizer.and_then(|t| t.token_to_id(s)) {
                Some(id) => {
                    stops.token_ids.insert(id);
                }
                None => stops.strings.push(s.clone()),
            }
        }
        stops
    }
}

/// Holds back text that could still turn into a stop string.
struct StopFilter {
    strings: Vec<String>,
    pending: String,
}

impl StopFilter {
    /// Adds text; returns what is safe to show and whether a stop string was completed.
    fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self.strings.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let shown = self.pending[..at].to_owned();
            self.pending.clear();
            return (shown, true);
        }
        // Keep the longest tail that is a prefix of some stop string.
        let hold = self
            .strings
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|prefix| self.pending.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let shown = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        (shown, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

type Decoder<'t> = tokenizers::DecodeStream<
    't,
    crate::tokenizer::Model,
    tokenizers::NormalizerWrapper,
    tokenizers::PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// Turns generated tokens into text as they come: whole characters only, and nothing that may still
/// become a stop string.
pub struct TextStream<'t> {
    decoder: Option<Decoder<'t>>,
    filter: StopFilter,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: Option<&'t Tokenizer>, stop_strings: &[String]) -> Self {
        TextStream { decoder: tokenizer.map(|t| t.decode_stream(true)), filter: StopFilter { strings: stop_strings.to_vec(), pending: String::new() } }
    }

    /// The text `token` makes visible, and whether it completed a stop string.
    pub fn push(&mut self, token: u32) -> Result<(String, bool)> {
        let piece = match self.decoder.as_mut() {
            Some(d) => d.step(token).map_err(|e| anyhow::anyhow!("decoding token {token}: {e}"))?.unwrap_or_default(),
            None => String::new(),
        };
        Ok(self.filter.push(&piece))
    }

    /// Text held back for a stop string that never came.
    pub fn finish(&mut self) -> String {
        self.filter.flush()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    StopToken,
    StopString,
    MaxTokens,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub prompt_tokens: usize,
    /// Prompt tokens actually computed (the rest came from the cache).
    pub prefilled_tokens: usize,
    pub generated: Vec<u32>,
    pub text: String,
    pub prefill: Duration,
    pub decode: Duration,
    pub stop: StopReason,
}

impl Outcome {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prefilled_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Tokens after the first, over the time they took.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated.len().saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

pub struct Request<'a> {
    /// The whole conversation so far, as tokens; what the cache already holds is not recomputed.
    pub prompt: &'a [u32],
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stops: &'a Stops,
    pub tokenizer: Option<&'a Tokenizer>,
    /// Set from another thread (Ctrl-C) to stop after the current token.
    pub cancel: &'a AtomicBool,
}

/// Tokens `cache` holds that match the start of `prompt`; the cache is trimmed to them (or reset when
/// it cannot resume there). Returns how many prompt tokens are already cached.
pub fn reuse_prefix(model: &mut Model, cache: &mut Cache, cached: &[u32], prompt: &[u32]) -> Result<usize> {
    let common = cached.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    // At least one token must be fed to get logits.
    let keep = common.min(prompt.len().saturating_sub(1));
    if model.trim(cache, keep as u32).is_ok() {
        return Ok(keep);
    }
    *cache = model.new_cache()?;
    Ok(0)
}

/// Generates after `request.prompt`, calling `on_text(token, text)` for each token with the text it
/// makes visible (possibly empty). The cache must already hold `cached` tokens of the prompt.
pub fn generate(model: &mut Model, cache: &Cache, cached: usize, request: Request<'_>, mut on_text: impl FnMut(u32, &str)) -> Result<Outcome> {
    let mut sampler = Sampler::new(request.sampling.clone());
    let mut stream = TextStream::new(request.tokenizer, &request.stops.strings);
    let mut history: Vec<u32> = request.prompt.to_vec();
    let mut generated = Vec::new();
    let mut text = String::new();

    let started = Instant::now();
    // Each token is sampled from the logits where the backend left them.
    let mut next = model.forward_with(&request.prompt[cached..], cache, |logits| sampler.sample(logits, &history))?;
    let prefill = started.elapsed();
    let decode_started = Instant::now();
    let mut stop = StopReason::MaxTokens;
    while generated.len() < request.max_tokens {
        if request.cancel.load(Ordering::Relaxed) {
            stop = StopReason::Cancelled;
            break;
        }
        let token = next;
        if request.stops.token_ids.contains(&token) {
            stop = StopReason::StopToken;
            break;
        }
        generated.push(token);
        history.push(token);
        let (shown, stopped) = stream.push(token)?;
        text.push_str(&shown);
        on_text(token, &shown);
        if stopped {
            stop = StopReason::StopString;
            break;
        }
        if generated.len() < request.max_tokens {
            next = model.forward_with(&[token], cache, |logits| sampler.sample(logits, &history))?;
        }
    }
    if stop != StopReason::StopString {
        let rest = stream.finish();
        if !rest.is_empty() {
            text.push_str(&rest);
            on_text(*generated.last().unwrap_or(&0), &rest);
        }
    }
    Ok(Outcome {
        prompt_tokens: request.prompt.len(),
        prefilled_tokens: request.prompt.len() - cached,
        generated,
        text,
        prefill,
        decode: decode_started.elapsed(),
        stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_never_shown_even_across_pieces() {
        let mut f = StopFilter { strings: vec!["<|im_end|>".into()], pending: String::new() };
        assert_eq!(f.push("Hello <|im"), ("Hello ".into(), false));
        assert_eq!(f.push("_e"), (String::new(), false));
        assert_eq!(f.push("nd|> trailing"), (String::new(), true));
        let mut f = StopFilter { strings: vec!["STOP".into()], pending: String::new() };
        assert_eq!(f.push("ST"), (String::new(), false));
        assert_eq!(f.push("AR"), ("STAR".into(), false));
        assert_eq!(f.push("S"), (String::new(), false));
        assert_eq!(f.flush(), "S");
    }

    /// A SentencePiece-style byte-fallback BPE tokenizer, decoding as Gemma's does.
    fn tokenizer() -> Tokenizer {
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": 6, "content": "<end>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "BPE", "byte_fallback": true, "unk_token": "<unk>", "fuse_unk": true, "merges": [],
                "vocab": {"<unk>": 0, "<0xE2>": 1, "<0x82>": 2, "<0xAC>": 3, "\u{2581}hello": 4, "\u{2581}world": 5, "<end>": 6, "!": 7}}
        });
        crate::tokenizer::parse(&json.to_string()).unwrap()
    }

    #[test]
    fn streaming_never_splits_a_character_and_keeps_spaces() {
        let tokenizer = tokenizer();
        let mut stream = TextStream::new(Some(&tokenizer), &[]);
        let pieces: Vec<String> = [4, 1, 2, 3, 5, 7].iter().map(|&t| stream.push(t).unwrap().0).collect();
        assert_eq!(pieces, [" hello", "", "", "\u{20ac}", " world", "!"]);
        assert_eq!(pieces.concat(), tokenizer.decode(&[4, 1, 2, 3, 5, 7], true).unwrap());
    }

    #[test]
    fn stop_tokens_and_strings_come_from_the_sequences() {
        let tokenizer = tokenizer();
        let stops = Stops::new(&["<end>".into(), "world".into()], Some(&tokenizer));
        assert!(stops.token_ids.contains(&6));
        assert_eq!(stops.strings, ["world"]);
        let mut stream = TextStream::new(Some(&tokenizer), &stops.strings);
        assert_eq!(stream.push(4).unwrap(), (" hello".into(), false));
        assert_eq!(stream.push(5).unwrap(), (" ".into(), true));
    }
}
