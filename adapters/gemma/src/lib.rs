//! The Gemma 3 runtime adapter: Google's Gemma 3 instruction-tuned text models, from hub snapshots
//! (MLX format) or imported GGUF files. Compiled to a WebAssembly component; see wit/ for the contract
//! and adapters/kit for the export glue.

mod catalog;
mod gemma3_text;

use adapter_kit::adapter::Family;
use adapter_kit::wit::exports::edgechat::adapter::{catalog as wit_catalog, prompt};

struct Gemma;

impl Family for Gemma {
    const NAME: &'static str = "gemma";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const FAMILIES: &'static [&'static str] = &["Gemma 3"];
    const ARCHITECTURES: &'static [&'static str] = &["gemma3", "gemma3_text"];
    const ALLOWED_HOSTS: &'static [&'static str] = &["hub"];
    /// The official Gemma 3 chat template, used when a model directory brings none (e.g. a bare GGUF).
    const CHAT_TEMPLATE: &'static str = include_str!("chat_template.jinja");
    const BOS: &'static str = "<bos>";
    const EOS: &'static str = "<eos>";
    const STOP_SEQUENCES: &'static [&'static str] = &["<end_of_turn>", "<eos>"];
    /// Gemma 3's generation_config.json.
    const DEFAULTS: prompt::GenerationDefaults =
        prompt::GenerationDefaults { temperature: 1.0, top_k: 64, top_p: 0.95, min_p: 0.0, repetition_penalty: 1.0 };

    type Graph = gemma3_text::Gemma3;

    fn describe(source: &wit_catalog::Source) -> Result<wit_catalog::Description, String> {
        catalog::describe(source)
    }

    fn manifest(source: &wit_catalog::Source) -> Result<wit_catalog::DownloadManifest, String> {
        catalog::manifest(source)
    }
}

adapter_kit::export_adapter!(Gemma);
