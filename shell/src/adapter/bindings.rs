//! Host-side bindings, one module per contract version (wit/v*), as Zed's extension host keeps
//! `since_v*`. The latest is re-exported here and is what the shell speaks: an older version's exports
//! are bound to the latest's types (they did not change), and its imports are served by the latest's
//! host code through conversions (`host::v0_2_0` serves 0.2.0 with the latest's host code, `host::v0_1_0`
//! serves 0.1.0 with 0.2.0's; `host::older` writes both). Every import may trap: a host function that returns
//! `Err` stops the adapter call, which is how sandbox limits are enforced.

pub use v0_3_0::*;

pub mod v0_3_0 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.3.0",
        world: "edgechat:adapter/adapter@0.3.0",
        imports: { default: trappable },
        with: {
            "edgechat:adapter/tensor.array": crate::host::tensor::TensorHandle,
            "edgechat:adapter/tensor.template": crate::host::tensor::template::Template,
        },
    });
}

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
    V0_3_0(v0_3_0::Adapter),
}

/// Every contract version's imports, on one linker (their names differ by version).
pub fn add_to_linker(linker: &mut wasmtime::component::Linker<crate::host::HostState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    v0_1_0::Adapter::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    v0_2_0::Adapter::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    v0_3_0::Adapter::add_to_linker::<_, HasSelf<_>>(linker, |state| state)
}

/// Runs `$call` on whichever version's bindings `$instance` holds (for exports whose types did not change).
macro_rules! either {
    ($instance:expr, |$b:ident| $call:expr) => {
        match $instance {
            Instance::V0_1_0($b) => $call,
            Instance::V0_2_0($b) => $call,
            Instance::V0_3_0($b) => $call,
        }
    };
}

use exports::edgechat::adapter::{catalog, info, prompt};
use wasmtime::component::{Resource, ResourceAny};
use wasmtime::AsContextMut;

type Fallible<T> = wasmtime::Result<Result<T, String>>;

/// An older version's export types, converted field for field to and from the latest's (the exports
/// did not change between versions; bindgen gives each version types of its own).
macro_rules! older_exports {
    ($module:ident, $version:ident) => {
        mod $module {
            use super::$version::exports::edgechat::adapter::{catalog as old, info as old_info, prompt as old_prompt};
            use super::{catalog, info, prompt};

            pub fn info(i: old_info::AdapterInfo) -> info::AdapterInfo {
                info::AdapterInfo {
                    name: i.name,
                    version: i.version,
                    contract_version: i.contract_version,
                    families: i.families,
                    architectures: i.architectures,
                    allowed_hosts: i.allowed_hosts,
                }
            }

            pub fn source(source: &catalog::Source) -> old::Source {
                match source {
                    catalog::Source::Hub(h) => old::Source::Hub(old::HubSource { repo: h.repo.clone(), revision: h.revision.clone() }),
                    catalog::Source::Leap(l) => old::Source::Leap(old::LeapSource { slug: l.slug.clone(), quantization: l.quantization.clone() }),
                }
            }

            pub fn description(d: old::Description) -> catalog::Description {
                catalog::Description {
                    display_name: d.display_name,
                    family: d.family,
                    provider: d.provider,
                    runtime: match d.runtime {
                        old::RuntimeKind::MlxSafetensors => catalog::RuntimeKind::MlxSafetensors,
                        old::RuntimeKind::MlxGguf => catalog::RuntimeKind::MlxGguf,
                        old::RuntimeKind::MlxLeapBundle => catalog::RuntimeKind::MlxLeapBundle,
                    },
                    context_length: d.context_length,
                    parameters: d.parameters,
                    download_bytes: d.download_bytes,
                    memory_bytes: d.memory_bytes,
                }
            }

            pub fn manifest(m: old::DownloadManifest) -> catalog::DownloadManifest {
                catalog::DownloadManifest {
                    layout: match m.layout {
                        old::Layout::Bundle => catalog::Layout::Bundle,
                        old::Layout::Directory => catalog::Layout::Directory,
                    },
                    revision: m.revision,
                    files: m.files.into_iter().map(|f| catalog::ManifestFile { path: f.path, url: f.url, size: f.size, sha256: f.sha256 }).collect(),
                }
            }

            pub fn messages(messages: &[prompt::Message]) -> Vec<old_prompt::Message> {
                messages.iter().map(|m| old_prompt::Message { role: m.role.clone(), content: m.content.clone() }).collect()
            }

            pub fn options(o: &prompt::FormatOptions) -> old_prompt::FormatOptions {
                old_prompt::FormatOptions { add_generation_prompt: o.add_generation_prompt, tokenizer_config: o.tokenizer_config.clone() }
            }

            pub fn formatted(f: old_prompt::Formatted) -> prompt::Formatted {
                let d = f.defaults;
                prompt::Formatted {
                    text: f.text,
                    stop_sequences: f.stop_sequences,
                    defaults: prompt::GenerationDefaults {
                        temperature: d.temperature,
                        top_k: d.top_k,
                        top_p: d.top_p,
                        min_p: d.min_p,
                        repetition_penalty: d.repetition_penalty,
                    },
                }
            }
        }
    };
}

older_exports!(from_v0_1_0, v0_1_0);
older_exports!(from_v0_2_0, v0_2_0);

/// Runs `$old` on an older version's bindings with `$conv` naming its conversions, `$new` on the latest's.
macro_rules! by_version {
    ($instance:expr, |$b:ident, $conv:ident| $old:expr, $new:expr) => {
        match $instance {
            Instance::V0_1_0($b) => {
                use from_v0_1_0 as $conv;
                $old
            }
            Instance::V0_2_0($b) => {
                use from_v0_2_0 as $conv;
                $old
            }
            Instance::V0_3_0($b) => $new,
        }
    };
}

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
            "0.2.0" => Instance::V0_2_0(v0_2_0::Adapter::instantiate(store, component, linker)?),
            _ => Instance::V0_3_0(v0_3_0::Adapter::instantiate(store, component, linker)?),
        })
    }

    pub fn info(&self, store: impl AsContextMut) -> wasmtime::Result<info::AdapterInfo> {
        Ok(by_version!(self, |b, conv| conv::info(b.edgechat_adapter_info().call_get(store)?), b.edgechat_adapter_info().call_get(store)?))
    }

    pub fn describe(&self, store: impl AsContextMut, source: &catalog::Source) -> Fallible<catalog::Description> {
        Ok(by_version!(
            self,
            |b, conv| b.edgechat_adapter_catalog().call_describe(store, &conv::source(source))?.map(conv::description),
            b.edgechat_adapter_catalog().call_describe(store, source)?
        ))
    }

    pub fn manifest(&self, store: impl AsContextMut, source: &catalog::Source) -> Fallible<catalog::DownloadManifest> {
        Ok(by_version!(
            self,
            |b, conv| b.edgechat_adapter_catalog().call_manifest(store, &conv::source(source))?.map(conv::manifest),
            b.edgechat_adapter_catalog().call_manifest(store, source)?
        ))
    }

    pub fn format(&self, store: impl AsContextMut, messages: &[prompt::Message], options: &prompt::FormatOptions) -> Fallible<prompt::Formatted> {
        Ok(by_version!(
            self,
            |b, conv| b.edgechat_adapter_prompt().call_format(store, &conv::messages(messages), &conv::options(options))?.map(conv::formatted),
            b.edgechat_adapter_prompt().call_format(store, messages, options)?
        ))
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
