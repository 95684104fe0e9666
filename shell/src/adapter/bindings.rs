//! Host-side bindings, one module per contract version (wit/v*), as Zed's extension host keeps
//! `since_v*`. The latest is re-exported here and is what the shell speaks: an older version's exports
//! are bound to the latest's types (they did not change), and its imports are served by the latest's
//! host code through conversions (`host::v0_1_0`). Every import may trap: a host function that returns
//! `Err` stops the adapter call, which is how sandbox limits are enforced.

pub use v0_2_0::*;

pub mod v0_2_0 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2.0",
        world: "edgechat:adapter/adapter@0.2.0",
        imports: { default: trappable },
        with: {
            "edgechat:adapter/tensor.array": crate::host::tensor::TensorHandle,
        },
    });
}

pub mod v0_1_0 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "edgechat:adapter/adapter@0.1.0",
        imports: { default: trappable },
        with: {
            "edgechat:adapter/tensor.array": crate::host::tensor::TensorHandle,
        },
    });
}

/// One instance's exports, whichever contract version its component was built against.
pub enum Instance {
    V0_1_0(v0_1_0::Adapter),
    V0_2_0(v0_2_0::Adapter),
}

/// Every contract version's imports, on one linker (their names differ by version).
pub fn add_to_linker(linker: &mut wasmtime::component::Linker<crate::host::HostState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    v0_1_0::Adapter::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    v0_2_0::Adapter::add_to_linker::<_, HasSelf<_>>(linker, |state| state)
}

/// Runs `$call` on whichever version's bindings `$instance` holds (for exports whose types did not change).
macro_rules! either {
    ($instance:expr, |$b:ident| $call:expr) => {
        match $instance {
            Instance::V0_1_0($b) => $call,
            Instance::V0_2_0($b) => $call,
        }
    };
}

use exports::edgechat::adapter::{catalog, info, prompt};
use v0_1_0::exports::edgechat::adapter::{catalog as old_catalog, prompt as old_prompt};
use wasmtime::component::{Resource, ResourceAny};
use wasmtime::AsContextMut;

type Fallible<T> = wasmtime::Result<Result<T, String>>;

impl Instance {
    /// Instantiates `component`, which verification found to implement `contract`.
    pub fn instantiate(
        store: &mut wasmtime::Store<crate::host::HostState>,
        component: &wasmtime::component::Component,
        linker: &wasmtime::component::Linker<crate::host::HostState>,
        contract: &str,
    ) -> wasmtime::Result<Instance> {
        Ok(match contract {
            "0.1.0" => Instance::V0_1_0(v0_1_0::Adapter::instantiate(store, component, linker)?),
            _ => Instance::V0_2_0(v0_2_0::Adapter::instantiate(store, component, linker)?),
        })
    }

    pub fn info(&self, store: impl AsContextMut) -> wasmtime::Result<info::AdapterInfo> {
        Ok(match self {
            Instance::V0_1_0(b) => {
                let i = b.edgechat_adapter_info().call_get(store)?;
                info::AdapterInfo {
                    name: i.name,
                    version: i.version,
                    contract_version: i.contract_version,
                    families: i.families,
                    architectures: i.architectures,
                    allowed_hosts: i.allowed_hosts,
                }
            }
            Instance::V0_2_0(b) => b.edgechat_adapter_info().call_get(store)?,
        })
    }

    pub fn describe(&self, store: impl AsContextMut, source: &catalog::Source) -> Fallible<catalog::Description> {
        Ok(match self {
            Instance::V0_1_0(b) => b.edgechat_adapter_catalog().call_describe(store, &old_source(source))?.map(|d| catalog::Description {
                display_name: d.display_name,
                family: d.family,
                provider: d.provider,
                runtime: match d.runtime {
                    old_catalog::RuntimeKind::MlxSafetensors => catalog::RuntimeKind::MlxSafetensors,
                    old_catalog::RuntimeKind::MlxGguf => catalog::RuntimeKind::MlxGguf,
                    old_catalog::RuntimeKind::MlxLeapBundle => catalog::RuntimeKind::MlxLeapBundle,
                },
                context_length: d.context_length,
                parameters: d.parameters,
                download_bytes: d.download_bytes,
                memory_bytes: d.memory_bytes,
            }),
            Instance::V0_2_0(b) => b.edgechat_adapter_catalog().call_describe(store, source)?,
        })
    }

    pub fn manifest(&self, store: impl AsContextMut, source: &catalog::Source) -> Fallible<catalog::DownloadManifest> {
        Ok(match self {
            Instance::V0_1_0(b) => b.edgechat_adapter_catalog().call_manifest(store, &old_source(source))?.map(|m| catalog::DownloadManifest {
                layout: match m.layout {
                    old_catalog::Layout::Bundle => catalog::Layout::Bundle,
                    old_catalog::Layout::Directory => catalog::Layout::Directory,
                },
                revision: m.revision,
                files: m.files.into_iter().map(|f| catalog::ManifestFile { path: f.path, url: f.url, size: f.size, sha256: f.sha256 }).collect(),
            }),
            Instance::V0_2_0(b) => b.edgechat_adapter_catalog().call_manifest(store, source)?,
        })
    }

    pub fn format(&self, store: impl AsContextMut, messages: &[prompt::Message], options: &prompt::FormatOptions) -> Fallible<prompt::Formatted> {
        Ok(match self {
            Instance::V0_1_0(b) => {
                let messages: Vec<old_prompt::Message> = messages.iter().map(|m| old_prompt::Message { role: m.role.clone(), content: m.content.clone() }).collect();
                let options = old_prompt::FormatOptions { add_generation_prompt: options.add_generation_prompt, tokenizer_config: options.tokenizer_config.clone() };
                b.edgechat_adapter_prompt().call_format(store, &messages, &options)?.map(|f| prompt::Formatted {
                    text: f.text,
                    stop_sequences: f.stop_sequences,
                    defaults: prompt::GenerationDefaults {
                        temperature: f.defaults.temperature,
                        top_k: f.defaults.top_k,
                        top_p: f.defaults.top_p,
                        min_p: f.defaults.min_p,
                        repetition_penalty: f.defaults.repetition_penalty,
                    },
                })
            }
            Instance::V0_2_0(b) => b.edgechat_adapter_prompt().call_format(store, messages, options)?,
        })
    }

    pub fn load(&self, store: impl AsContextMut) -> Fallible<ResourceAny> {
        either!(self, |b| b.edgechat_adapter_runtime().model().call_load(store))
    }

    pub fn vocab_size(&self, store: impl AsContextMut, model: ResourceAny) -> wasmtime::Result<u32> {
        either!(self, |b| b.edgechat_adapter_runtime().model().call_vocab_size(store, model))
    }

    pub fn new_cache(&self, store: impl AsContextMut, model: ResourceAny) -> wasmtime::Result<ResourceAny> {
        either!(self, |b| b.edgechat_adapter_runtime().model().call_new_cache(store, model))
    }

    pub fn forward(
        &self,
        store: impl AsContextMut,
        model: ResourceAny,
        tokens: &[u32],
        cache: ResourceAny,
        all_positions: bool,
    ) -> Fallible<Resource<crate::host::tensor::TensorHandle>> {
        either!(self, |b| b.edgechat_adapter_runtime().model().call_forward(store, model, tokens, cache, all_positions))
    }

    pub fn cache_length(&self, store: impl AsContextMut, cache: ResourceAny) -> wasmtime::Result<u32> {
        either!(self, |b| b.edgechat_adapter_runtime().cache().call_length(store, cache))
    }

    pub fn cache_trim(&self, store: impl AsContextMut, cache: ResourceAny, length: u32) -> Fallible<()> {
        either!(self, |b| b.edgechat_adapter_runtime().cache().call_trim(store, cache, length))
    }

    pub fn self_test(&self, store: impl AsContextMut, a: &[f32], b_: &[f32], n: u32) -> Fallible<Vec<Vec<f32>>> {
        either!(self, |b| b.edgechat_adapter_runtime().call_self_test(store, a, b_, n))
    }
}

fn old_source(source: &catalog::Source) -> old_catalog::Source {
    match source {
        catalog::Source::Hub(h) => old_catalog::Source::Hub(old_catalog::HubSource { repo: h.repo.clone(), revision: h.revision.clone() }),
        catalog::Source::Leap(l) => old_catalog::Source::Leap(old_catalog::LeapSource { slug: l.slug.clone(), quantization: l.quantization.clone() }),
    }
}
