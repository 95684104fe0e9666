//! Contract 0.2.0, served by the latest contract's host code. 0.3.0 only added `tensor.record-batch` and
//! `tensor.template`, so every 0.2.0 import is the latest's under other Rust types; they are converted
//! field for field.
//! (`host::v0_1_0` serves 0.1.0 through these.)

use crate::adapter::bindings::v0_2_0::edgechat::adapter::{log as old_log, net as old_net, tensor as old, weights as old_weights};
use crate::adapter::bindings::v0_3_0::edgechat::adapter::{log as new_log, net as new_net, tensor as new, weights as new_weights};
use crate::host::tensor::TensorHandle;
use crate::host::HostState;
use wasmtime::component::Resource;

type Handle = Resource<TensorHandle>;
type Outcome<T> = wasmtime::Result<Result<T, String>>;

/// Converts between the two versions' `dtype` enums, which list the same cases.
macro_rules! dtypes {
    ($from:ident -> $to:ident, $d:expr) => {
        match $d {
            $from::Dtype::Float32 => $to::Dtype::Float32,
            $from::Dtype::Float16 => $to::Dtype::Float16,
            $from::Dtype::Bfloat16 => $to::Dtype::Bfloat16,
            $from::Dtype::Int32 => $to::Dtype::Int32,
            $from::Dtype::Uint32 => $to::Dtype::Uint32,
            $from::Dtype::Uint8 => $to::Dtype::Uint8,
            $from::Dtype::Q40 => $to::Dtype::Q40,
            $from::Dtype::Q41 => $to::Dtype::Q41,
            $from::Dtype::Q50 => $to::Dtype::Q50,
            $from::Dtype::Q51 => $to::Dtype::Q51,
            $from::Dtype::Q80 => $to::Dtype::Q80,
            $from::Dtype::Q4K => $to::Dtype::Q4K,
            $from::Dtype::Q5K => $to::Dtype::Q5K,
            $from::Dtype::Q6K => $to::Dtype::Q6K,
        }
    };
}

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
        Ok(dtypes!(new -> old, new::HostArray::dtype(self, a)?))
    }

    fn drop(&mut self, a: Handle) -> wasmtime::Result<()> {
        new::HostArray::drop(self, a)
    }
}

/// Forwards ops whose signatures are the same in both versions.
macro_rules! same {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)*) => {
        $(fn $name(&mut self, $($arg: $ty),*) -> $out {
            new::Host::$name(self, $($arg),*)
        })*
    };
}

impl old::Host for HostState {
    same! {
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
        new::Host::astype(self, a, dtypes!(old -> new, dtype))
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
