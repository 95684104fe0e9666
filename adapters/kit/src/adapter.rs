//! The export glue every adapter needs, written once: an adapter is its [`Family`] (names, catalog,
//! chat template, sampling defaults) and its [`Graph`] (the model file), exported with
//! [`export_adapter!`](crate::export_adapter).

use crate::nn::{self, History};
use crate::ops::Tensor;
use crate::step::{self, Replay};
use crate::wit::edgechat::adapter::tensor::Array;
use crate::wit::exports::edgechat::adapter::{catalog, info, prompt, runtime};
use crate::{render_chat_template, ChatMessage, TokenizerConfig};
use std::cell::RefCell;
use std::marker::PhantomData;

/// What a model family's adapter declares and knows, apart from the graph.
pub trait Family: 'static {
    /// Short stable name, e.g. "gemma".
    const NAME: &'static str;
    /// The adapter's own version: pass `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;
    const FAMILIES: &'static [&'static str];
    /// config.json `model_type` / GGUF `general.architecture` values served.
    const ARCHITECTURES: &'static [&'static str];
    /// Hosts `net.get` may reach; "hub" is the configured hub.
    const ALLOWED_HOSTS: &'static [&'static str];
    /// Used when the model directory brings no chat template of its own.
    const CHAT_TEMPLATE: &'static str;
    /// Special tokens the template sees when tokenizer_config.json does not name them.
    const BOS: &'static str;
    const EOS: &'static str;
    const STOP_SEQUENCES: &'static [&'static str];
    const DEFAULTS: prompt::GenerationDefaults;

    type Graph: Graph;

    fn describe(source: &catalog::Source) -> Result<catalog::Description, String>;
    fn manifest(source: &catalog::Source) -> Result<catalog::DownloadManifest, String>;
}

/// A model graph over the `tensor` import, loaded from `weights`.
pub trait Graph: Sized + 'static {
    type Cache: 'static;
    /// Whether a decode step records the same ops at every position, rotary and sliding-window offsets
    /// aside, so that the kit may run it from a template ([`step`](crate::step)). A model whose graph
    /// changes at some position by itself (a rope scaling that switches past a length) must say false:
    /// two steps alike before that position cannot tell.
    const DECODE_TEMPLATES: bool = true;
    fn load() -> Result<Self, String>;
    fn vocab_size(&self) -> u32;
    fn new_cache(&self) -> Self::Cache;
    /// Logits after feeding `tokens` (as int32 [1, t] `ids`): [t, vocab] for every position when
    /// `all_positions`, else [1, vocab] for the last.
    fn forward(&self, tokens: &[u32], ids: &Tensor, cache: &mut Self::Cache, all_positions: bool) -> Result<Tensor, String>;
    fn cache_length(cache: &Self::Cache) -> u32;
    fn trim(cache: &mut Self::Cache, length: u32) -> Result<(), String>;
    /// Every per-position history the cache holds, always in the same order: what a decode step reads
    /// and replaces (see [`step`](crate::step)).
    fn histories(cache: &mut Self::Cache) -> Vec<&mut History>;
}

/// The exported adapter for family `F`.
pub struct Adapter<F>(PhantomData<F>);
pub struct Model<F: Family>(F::Graph);
pub struct Cache<F: Family>(RefCell<(<F::Graph as Graph>::Cache, Replay)>);

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

impl<F: Family> info::Guest for Adapter<F> {
    fn get() -> info::AdapterInfo {
        info::AdapterInfo {
            name: F::NAME.into(),
            version: F::VERSION.into(),
            contract_version: "0.3.0".into(),
            families: strings(F::FAMILIES),
            architectures: strings(F::ARCHITECTURES),
            allowed_hosts: strings(F::ALLOWED_HOSTS),
        }
    }
}

impl<F: Family> catalog::Guest for Adapter<F> {
    fn describe(source: catalog::Source) -> Result<catalog::Description, String> {
        F::describe(&source)
    }

    fn manifest(source: catalog::Source) -> Result<catalog::DownloadManifest, String> {
        F::manifest(&source)
    }
}

impl<F: Family> prompt::Guest for Adapter<F> {
    fn format(messages: Vec<prompt::Message>, options: prompt::FormatOptions) -> Result<prompt::Formatted, String> {
        let mut config = match &options.tokenizer_config {
            Some(json) => TokenizerConfig::parse(json)?,
            None => TokenizerConfig::default(),
        };
        let template = config.chat_template.take().unwrap_or_else(|| F::CHAT_TEMPLATE.to_owned());
        config.bos_token.get_or_insert_with(|| F::BOS.into());
        config.eos_token.get_or_insert_with(|| F::EOS.into());
        let messages: Vec<ChatMessage> = messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect();
        let text = render_chat_template(&template, &messages, options.add_generation_prompt, &config)?;
        Ok(prompt::Formatted { text, stop_sequences: strings(F::STOP_SEQUENCES), defaults: F::DEFAULTS })
    }
}

impl<F: Family> runtime::GuestCache for Cache<F> {
    fn length(&self) -> u32 {
        F::Graph::cache_length(&self.0.borrow().0)
    }

    fn trim(&self, length: u32) -> Result<(), String> {
        let (cache, replay) = &mut *self.0.borrow_mut();
        replay.forget();
        F::Graph::trim(cache, length)
    }
}

impl<F: Family> runtime::GuestModel for Model<F> {
    fn load() -> Result<runtime::Model, String> {
        Ok(runtime::Model::new(Model::<F>(F::Graph::load()?)))
    }

    fn vocab_size(&self) -> u32 {
        self.0.vocab_size()
    }

    fn new_cache(&self) -> runtime::Cache {
        runtime::Cache::new(Cache::<F>(RefCell::new((self.0.new_cache(), Replay::default()))))
    }

    fn forward(&self, tokens: Vec<u32>, cache: runtime::CacheBorrow<'_>, all_positions: bool) -> Result<Array, String> {
        if tokens.is_empty() {
            return Err("forward needs at least one token".into());
        }
        let (cache, replay) = &mut *cache.get::<Cache<F>>().0.borrow_mut();
        if let ([token], false, true) = (&tokens[..], all_positions, F::Graph::DECODE_TEMPLATES) {
            return step::decode(&self.0, *token, cache, replay);
        }
        replay.forget();
        self.0.forward(&tokens, &nn::token_ids(&tokens)?, cache, all_positions)?.into_array()
    }
}

impl<F: Family> runtime::Guest for Adapter<F> {
    type Cache = Cache<F>;
    type Model = Model<F>;

    fn self_test(a: Vec<f32>, b: Vec<f32>, n: u32) -> Result<Vec<Vec<f32>>, String> {
        crate::selftest::run(&a, &b, n)
    }
}

/// Exports `Adapter<$family>` as the component's adapter world.
#[macro_export]
macro_rules! export_adapter {
    ($family:ty) => {
        type EdgechatAdapter = $crate::adapter::Adapter<$family>;
        $crate::wit::export!(EdgechatAdapter with_types_in $crate::wit);
    };
}
