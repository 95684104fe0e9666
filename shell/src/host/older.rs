//! What every older contract version's host code is: the next version's, reached through conversions.
//! A version's module (`v0_1_0`, `v0_2_0`) names the two versions' bindings `old*` and `new*`, says how
//! their `dtype`s convert (`dtype_in`, `dtype_out`: what changed between them), and invokes
//! [`serve_older_contract!`], which writes every import of the older version as a call of the newer's
//! with its records converted field for field (those did not change).

/// Forwards ops whose signatures are the same in both versions.
macro_rules! forward_same {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)*) => {
        $(fn $name(&mut self, $($arg: $ty),*) -> $out {
            new::Host::$name(self, $($arg),*)
        })*
    };
}

/// Implements the older version's imports for `HostState` over the newer's (see the module docs).
macro_rules! serve_older_contract {
    () => {
        impl old::HostArray for HostState {
            fn from_f32(&mut self, data: Vec<f32>, shape: Vec<u32>) -> Outcome<Handle> {
                new::HostArray::from_f32(self, data, shape)
            }

            fn from_i32(&mut self, data: Vec<i32>, shape: Vec<u32>) -> Outcome<Handle> {
                new::HostArray::from_i32(self, data, shape)
            }

            fn shape(&mut self, a: Handle) -> wasmtime::Result<Vec<u32>> {
                new::HostArray::shape(self, a)
            }

            fn dtype(&mut self, a: Handle) -> wasmtime::Result<old::Dtype> {
                Ok(dtype_out(new::HostArray::dtype(self, a)?))
            }

            fn drop(&mut self, a: Handle) -> wasmtime::Result<()> {
                new::HostArray::drop(self, a)
            }
        }

        impl old::Host for HostState {
            $crate::host::older::forward_same! {
                matmul(a: Handle, b: Handle) -> Outcome<Handle>;
                quantized_matmul(x: Handle, w: Handle, scales: Handle, biases: Handle, transpose: bool, group_size: u32, bits: u32) -> Outcome<Handle>;
                dequantize(w: Handle, scales: Handle, biases: Handle, group_size: u32, bits: u32) -> Outcome<Handle>;
                add(a: Handle, b: Handle) -> Outcome<Handle>;
                subtract(a: Handle, b: Handle) -> Outcome<Handle>;
                multiply(a: Handle, b: Handle) -> Outcome<Handle>;
                divide(a: Handle, b: Handle) -> Outcome<Handle>;
                scale(a: Handle, factor: f32) -> Outcome<Handle>;
                add_scalar(a: Handle, value: f32) -> Outcome<Handle>;
                tanh(a: Handle) -> Outcome<Handle>;
                sigmoid(a: Handle) -> Outcome<Handle>;
                silu(a: Handle) -> Outcome<Handle>;
                gelu_tanh(a: Handle) -> Outcome<Handle>;
                reshape(a: Handle, shape: Vec<i32>) -> Outcome<Handle>;
                transpose(a: Handle, axes: Vec<u32>) -> Outcome<Handle>;
                slice(a: Handle, start: Vec<i32>, stop: Vec<i32>) -> Outcome<Handle>;
                slice_update(a: Handle, update: Handle, start: Vec<i32>, stop: Vec<i32>) -> Outcome<Handle>;
                concatenate(arrays: Vec<Handle>, axis: i32) -> Outcome<Handle>;
                take(a: Handle, indices: Handle, axis: i32) -> Outcome<Handle>;
                softmax(a: Handle, axis: i32) -> Outcome<Handle>;
                rms_norm(x: Handle, weight: Handle, eps: f32) -> Outcome<Handle>;
                conv1d_depthwise(x: Handle, weight: Handle) -> Outcome<Handle>;
                eval(arrays: Vec<Handle>) -> Outcome<()>;
                read_f32(a: Handle) -> Outcome<Vec<f32>>;
            }

            fn astype(&mut self, a: Handle, dtype: old::Dtype) -> Outcome<Handle> {
                new::Host::astype(self, a, dtype_in(dtype))
            }

            fn rope(&mut self, x: Handle, p: old::RopeParams) -> Outcome<Handle> {
                let p = new::RopeParams { dims: p.dims, traditional: p.traditional, base: p.base, scale: p.scale, offset: p.offset };
                new::Host::rope(self, x, p)
            }

            fn attention(&mut self, q: Handle, k: Handle, v: Handle, scale: f32, mask: old::Mask) -> Outcome<Handle> {
                let mask = match mask {
                    old::Mask::None => new::Mask::None,
                    old::Mask::Causal => new::Mask::Causal,
                    old::Mask::SlidingWindow(w) => new::Mask::SlidingWindow(new::WindowMask { window: w.window, query_offset: w.query_offset, key_offset: w.key_offset }),
                    old::Mask::Explicit(m) => new::Mask::Explicit(m),
                };
                new::Host::attention(self, q, k, v, scale, mask)
            }
        }

        impl old_weights::Host for HostState {
            fn format(&mut self) -> wasmtime::Result<old_weights::CheckpointFormat> {
                Ok(match new_weights::Host::format(self)? {
                    new_weights::CheckpointFormat::Safetensors => old_weights::CheckpointFormat::Safetensors,
                    new_weights::CheckpointFormat::Gguf => old_weights::CheckpointFormat::Gguf,
                })
            }

            fn config(&mut self) -> wasmtime::Result<String> {
                new_weights::Host::config(self)
            }

            fn names(&mut self) -> wasmtime::Result<Vec<String>> {
                new_weights::Host::names(self)
            }

            fn get(&mut self, name: String) -> Outcome<old_weights::Entry> {
                Ok(new_weights::Host::get(self, name)?.map(|entry| match entry {
                    new_weights::Entry::Dense(a) => old_weights::Entry::Dense(a),
                    new_weights::Entry::Quantized(q) => old_weights::Entry::Quantized(old_weights::QuantizedEntry {
                        weight: q.weight,
                        scales: q.scales,
                        biases: q.biases,
                        group_size: q.group_size,
                        bits: q.bits,
                    }),
                }))
            }
        }

        impl old_log::Host for HostState {
            fn log(&mut self, level: old_log::Level, message: String) -> wasmtime::Result<()> {
                let level = match level {
                    old_log::Level::Trace => new_log::Level::Trace,
                    old_log::Level::Debug => new_log::Level::Debug,
                    old_log::Level::Info => new_log::Level::Info,
                    old_log::Level::Warn => new_log::Level::Warn,
                    old_log::Level::Error => new_log::Level::Error,
                };
                new_log::Host::log(self, level, message)
            }
        }

        impl old_net::Host for HostState {
            fn get(&mut self, url: String, headers: Vec<(String, String)>) -> Outcome<old_net::Response> {
                Ok(new_net::Host::get(self, url, headers)?.map(|r| old_net::Response { status: r.status, headers: r.headers, body: r.body }))
            }
        }
    };
}

pub(crate) use {forward_same, serve_older_contract};
