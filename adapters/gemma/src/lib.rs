//! The Gemma 3 runtime adapter: Google's Gemma 3 instruction-tuned text models, from hub snapshots
//! (MLX format) or imported GGUF files. Compiled to a WebAssembly component; see wit/ for the contract.

mod catalog;
mod gemma3_text;

use adapter_kit::{render_chat_template, ChatMessage, TokenizerConfig};
use std::cell::RefCell;

wit_bindgen::generate!({
    path: "../../wit/v0.1.0",
    world: "edgechat:adapter/adapter@0.1.0",
    with: {
        "edgechat:adapter/log@0.1.0": adapter_kit::wit::edgechat::adapter::log,
        "edgechat:adapter/tensor@0.1.0": adapter_kit::wit::edgechat::adapter::tensor,
        "edgechat:adapter/weights@0.1.0": adapter_kit::wit::edgechat::adapter::weights,
        "edgechat:adapter/net@0.1.0": adapter_kit::wit::edgechat::adapter::net,
    },
});

use exports::edgechat::adapter::{catalog as wit_catalog, info, prompt, runtime};

/// The official Gemma 3 chat template, used when a model directory brings none (e.g. a bare GGUF).
const BUILTIN_CHAT_TEMPLATE: &str = include_str!("chat_template.jinja");
const STOP_SEQUENCES: [&str; 2] = ["<end_of_turn>", "<eos>"];

/// Gemma 3's generation_config.json.
const DEFAULTS: prompt::GenerationDefaults =
    prompt::GenerationDefaults { temperature: 1.0, top_k: 64, top_p: 0.95, min_p: 0.0, repetition_penalty: 1.0 };

struct Gemma;

impl info::Guest for Gemma {
    fn get() -> info::AdapterInfo {
        info::AdapterInfo {
            name: "gemma".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            contract_version: "0.1.0".into(),
            families: vec!["Gemma 3".into()],
            architectures: vec!["gemma3".into(), "gemma3_text".into()],
            allowed_hosts: vec!["hub".into()],
        }
    }
}

impl wit_catalog::Guest for Gemma {
    fn describe(source: wit_catalog::Source) -> Result<wit_catalog::Description, String> {
        catalog::describe(&source)
    }

    fn manifest(source: wit_catalog::Source) -> Result<wit_catalog::DownloadManifest, String> {
        catalog::manifest(&source)
    }
}

impl prompt::Guest for Gemma {
    fn format(messages: Vec<prompt::Message>, options: prompt::FormatOptions) -> Result<prompt::Formatted, String> {
        let mut config = match &options.tokenizer_config {
            Some(json) => TokenizerConfig::parse(json)?,
            None => TokenizerConfig::default(),
        };
        let template = config.chat_template.take().unwrap_or_else(|| BUILTIN_CHAT_TEMPLATE.to_owned());
        config.bos_token.get_or_insert_with(|| "<bos>".into());
        config.eos_token.get_or_insert_with(|| "<eos>".into());
        let messages: Vec<ChatMessage> =
            messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect();
        let text = render_chat_template(&template, &messages, options.add_generation_prompt, &config)?;
        Ok(prompt::Formatted { text, stop_sequences: STOP_SEQUENCES.map(String::from).to_vec(), defaults: DEFAULTS })
    }
}

/// Per-conversation state of the Gemma 3 graph (KV caches).
pub struct GemmaCache(RefCell<gemma3_text::Cache>);

/// A loaded Gemma 3 model.
pub struct GemmaModel(gemma3_text::Gemma3);

impl runtime::GuestCache for GemmaCache {
    fn length(&self) -> u32 {
        self.0.borrow().length()
    }

    fn trim(&self, length: u32) -> Result<(), String> {
        self.0.borrow_mut().layers.iter_mut().try_for_each(|kv| kv.trim(length))
    }
}

impl runtime::GuestModel for GemmaModel {
    fn load() -> Result<runtime::Model, String> {
        Ok(runtime::Model::new(GemmaModel(gemma3_text::Gemma3::load()?)))
    }

    fn vocab_size(&self) -> u32 {
        self.0.config.vocab
    }

    fn new_cache(&self) -> runtime::Cache {
        runtime::Cache::new(GemmaCache(RefCell::new(self.0.new_cache())))
    }

    fn forward(&self, tokens: Vec<u32>, cache: runtime::CacheBorrow<'_>, all_positions: bool) -> Result<runtime::Array, String> {
        if tokens.is_empty() {
            return Err("forward needs at least one token".into());
        }
        let cache = cache.get::<GemmaCache>();
        self.0.forward(&tokens, &mut cache.0.borrow_mut(), all_positions)
    }
}

impl runtime::Guest for Gemma {
    type Cache = GemmaCache;
    type Model = GemmaModel;

    fn self_test(a: Vec<f32>, b: Vec<f32>, n: u32) -> Result<Vec<Vec<f32>>, String> {
        adapter_kit::selftest::run(&a, &b, n)
    }
}

export!(Gemma);
