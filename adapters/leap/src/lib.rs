//! The Leap runtime adapter: Liquid AI's LFM2 models, as single-file Leap bundles or hub snapshots.
//! Compiled to a WebAssembly component; see wit/ for the contract and adapters/kit for the export glue.

mod catalog;
mod lfm2;

use adapter_kit::adapter::Family;
use adapter_kit::wit::exports::edgechat::adapter::{catalog as wit_catalog, prompt};

struct Leap;

impl Family for Leap {
    const NAME: &'static str = "leap";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const FAMILIES: &'static [&'static str] = &["LFM2"];
    const ARCHITECTURES: &'static [&'static str] = &["lfm2"];
    const ALLOWED_HOSTS: &'static [&'static str] = &["hub", "leap.liquid.ai"];
    /// LFM2's ChatML-style format, used when the model brings no template of its own (Leap bundles).
    const CHAT_TEMPLATE: &'static str = include_str!("chat_template.jinja");
    const BOS: &'static str = "<|startoftext|>";
    const EOS: &'static str = "<|im_end|>";
    const STOP_SEQUENCES: &'static [&'static str] = &["<|im_end|>", "<|endoftext|>"];
    /// Liquid AI's recommended sampling for LFM2.
    const DEFAULTS: prompt::GenerationDefaults =
        prompt::GenerationDefaults { temperature: 0.3, top_k: 0, top_p: 1.0, min_p: 0.15, repetition_penalty: 1.05 };

    type Graph = lfm2::Lfm2;

    fn describe(source: &wit_catalog::Source) -> Result<wit_catalog::Description, String> {
        catalog::describe(source)
    }

    fn manifest(source: &wit_catalog::Source) -> Result<wit_catalog::DownloadManifest, String> {
        catalog::manifest(source)
    }
}

adapter_kit::export_adapter!(Leap);
