//! Contract 0.2.0, served by the latest contract's host code. 0.3.0 only added `tensor.record-batch` and
//! `tensor.template`, so every 0.2.0 import is the latest's under other Rust types; they are converted
//! field for field (`host::older`). (`host::v0_1_0` serves 0.1.0 through these.)

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

fn dtype_in(d: old::Dtype) -> new::Dtype {
    dtypes!(old -> new, d)
}

fn dtype_out(d: new::Dtype) -> old::Dtype {
    dtypes!(new -> old, d)
}

super::older::serve_older_contract!();
