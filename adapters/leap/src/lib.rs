//! The Leap runtime adapter: Liquid AI's LFM2 models, as single-file Leap bundles or hub snapshots.
//! Compiled to a WebAssembly component; see wit/ for the contract.

mod catalog;
mod lfm2;

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

/// LFM2's ChatML-style format, used when the model brings no template of its own (Leap bundles).
const BUILTIN_CHAT_TEMPLATE: &str = include_str!("chat_template.jinja");
const STOP_SEQUENCES: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

/// Liquid AI's recommended sampling for LFM2.
const DEFAULTS: prompt::GenerationDefaults =
    prompt::GenerationDefaults { temperature: 0.3, top_k: 0, top_p: 1.0, min_p: 0.15, repetition_penalty: 1.05 };

struct Leap;

impl info::Guest for Leap {
    fn get() -> info::AdapterInfo {
        info::AdapterInfo {
            name: "leap".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            contract_version: "0.1.0".into(),
            families: vec!["LFM2".into()],
            architectures: vec!["lfm2".into()],
            allowed_hosts: vec!["hub".into(), "leap.liquid.ai".into()],
        }
    }
}

impl wit_catalog::Guest for Leap {
    fn describe(source: wit_catalog::Source) -> Result<wit_catalog::Description, String> {
        catalog::describe(&source)
    }

    fn manifest(source: wit_catalog::Source) -> Result<wit_catalog::DownloadManifest, String> {
        catalog::manifest(&source)
    }
}

impl prompt::Guest for Leap {
    fn format(messages: Vec<prompt::Message>, options: prompt::FormatOptions) -> Result<prompt::Formatted, String> {
        let mut config = match &options.tokenizer_config {
            Some(json) => TokenizerConfig::parse(json)?,
            None => TokenizerConfig::default(),
        };
        let template = config.chat_template.take().unwrap_or_else(|| BUILTIN_CHAT_TEMPLATE.to_owned());
        config.bos_token.get_or_insert_with(|| "<|startoftext|>".into());
        config.eos_token.get_or_insert_with(|| "<|im_end|>".into());
        let messages: Vec<ChatMessage> =
            messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect();
        let text = render_chat_template(&template, &messages, options.add_generation_prompt, &config)?;
        Ok(prompt::Formatted { text, stop_sequences: STOP_SEQUENCES.map(String::from).to_vec(), defaults: DEFAULTS })
    }
}

/// Per-conversation state of the LFM2 graph (KV caches and conv state).
pub struct LfmCache(RefCell<lfm2::Cache>);

/// A loaded LFM2 model.
pub struct LfmModel(lfm2::Lfm2);

impl runtime::GuestCache for LfmCache {
    fn length(&self) -> u32 {
        self.0.borrow().length()
    }

    fn trim(&self, length: u32) -> Result<(), String> {
        self.0.borrow_mut().trim(length)
    }
}

impl runtime::GuestModel for LfmModel {
    fn load() -> Result<runtime::Model, String> {
        Ok(runtime::Model::new(LfmModel(lfm2::Lfm2::load()?)))
    }

    fn vocab_size(&self) -> u32 {
        self.0.config.vocab
    }

    fn new_cache(&self) -> runtime::Cache {
        runtime::Cache::new(LfmCache(RefCell::new(self.0.new_cache())))
    }

    fn forward(&self, tokens: Vec<u32>, cache: runtime::CacheBorrow<'_>, all_positions: bool) -> Result<runtime::Array, String> {
        if tokens.is_empty() {
            return Err("forward needs at least one token".into());
        }
        let cache = cache.get::<LfmCache>();
        self.0.forward(&tokens, &mut cache.0.borrow_mut(), all_positions)
    }
}

impl runtime::Guest for Leap {
    type Cache = LfmCache;
    type Model = LfmModel;

    fn self_test(a: Vec<f32>, b: Vec<f32>, n: u32) -> Result<Vec<Vec<f32>>, String> {
        adapter_kit::selftest::run(&a, &b, n)
    }
}

export!(Leap);
