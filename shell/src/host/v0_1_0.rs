//! Contract 0.1.0, served by 0.2.0's host code (and so the latest's; see `host::older`). What differs:
//! 0.1.0 has no block formats, so a block-quantized array reports float32 to it (it computes as the
//! values its blocks encode, as 0.1.0 promised of GGUF tensors).

use crate::adapter::bindings::v0_1_0::edgechat::adapter::{log as old_log, net as old_net, tensor as old, weights as old_weights};
use crate::adapter::bindings::v0_2_0::edgechat::adapter::{log as new_log, net as new_net, tensor as new, weights as new_weights};
use crate::host::tensor::TensorHandle;
use crate::host::HostState;
use wasmtime::component::Resource;

type Handle = Resource<TensorHandle>;
type Outcome<T> = wasmtime::Result<Result<T, String>>;

fn dtype_in(d: old::Dtype) -> new::Dtype {
    match d {
        old::Dtype::Float32 => new::Dtype::Float32,
        old::Dtype::Float16 => new::Dtype::Float16,
        old::Dtype::Bfloat16 => new::Dtype::Bfloat16,
        old::Dtype::Int32 => new::Dtype::Int32,
        old::Dtype::Uint32 => new::Dtype::Uint32,
        old::Dtype::Uint8 => new::Dtype::Uint8,
    }
}

/// Block formats are float32 to a 0.1.0 adapter.
pub fn dtype_out(d: new::Dtype) -> old::Dtype {
    match d {
        new::Dtype::Float16 => old::Dtype::Float16,
        new::Dtype::Bfloat16 => old::Dtype::Bfloat16,
        new::Dtype::Int32 => old::Dtype::Int32,
        new::Dtype::Uint32 => old::Dtype::Uint32,
        new::Dtype::Uint8 => old::Dtype::Uint8,
        _ => old::Dtype::Float32,
    }
}

super::older::serve_older_contract!();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_0_1_0_adapter_sees_block_formats_as_float32() {
        assert_eq!(dtype_out(new::Dtype::Q80), old::Dtype::Float32);
        assert_eq!(dtype_out(new::Dtype::Q4K), old::Dtype::Float32);
        assert_eq!(dtype_out(new::Dtype::Bfloat16), old::Dtype::Bfloat16);
        assert_eq!(dtype_in(old::Dtype::Uint8), new::Dtype::Uint8);
    }
}
