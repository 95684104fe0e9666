//! Our element types and shapes in ggml's terms: type ids, `ne` (innermost dimension first, at most
//! four), block sizes, and ggml's own dequantizers.

use super::T;
use crate::host::tensor::{DType, OpResult};
use llama_cpp_sys_2 as g;

pub(super) fn ggml_type(d: DType) -> g::ggml_type {
    match d {
        DType::F32 => g::GGML_TYPE_F32,
        DType::F16 => g::GGML_TYPE_F16,
        DType::BF16 => g::GGML_TYPE_BF16,
        DType::I32 | DType::U32 => g::GGML_TYPE_I32,
        DType::U8 => g::GGML_TYPE_I8,
    }
}

/// numpy shape -> ggml ne (innermost first), refusing ranks ggml cannot hold.
pub(super) fn ne(shape: &[i32]) -> OpResult<[i64; 4]> {
    if shape.len() > 4 {
        return Err(format!("the cpu backend holds at most 4 dimensions, not {} ({shape:?})", shape.len()));
    }
    let mut ne = [1i64; 4];
    for (i, &d) in shape.iter().rev().enumerate() {
        ne[i] = d as i64;
    }
    Ok(ne)
}

/// ggml's number of types: ids at or above it are not types.
pub(in crate::host::tensor::cpu) const TYPE_COUNT: u32 = g::GGML_TYPE_COUNT;
/// The block format MLX affine 4-bit weights become (see `affine.rs`).
pub(in crate::host::tensor::cpu) const Q4_1: u32 = g::GGML_TYPE_Q4_1;

/// Elements per block of a ggml type. Safe for ids below [`TYPE_COUNT`].
pub(in crate::host::tensor::cpu) unsafe fn block_size(ty: u32) -> i64 {
    unsafe { g::ggml_blck_size(ty) }
}

/// Bytes of a row of `n` elements (whole blocks) of a ggml type.
pub(in crate::host::tensor::cpu) unsafe fn row_size(ty: u32, n: i64) -> usize {
    unsafe { g::ggml_row_size(ty, n) }
}

/// Little-endian f32 bytes as values, in one pass (the logits of every decode step are read this way).
pub(in crate::host::tensor::cpu) fn f32_values(bytes: &[u8]) -> Vec<f32> {
    let mut values = Vec::with_capacity(bytes.len() / 4);
    values.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))));
    values
}

pub(in crate::host::tensor::cpu) fn to_f32(ty: u32, bytes: &[u8], elements: usize) -> Vec<f32> {
    // SAFETY: the type id is below GGML_TYPE_COUNT and has a dequantizer (checked); the caller guarantees
    // `bytes` holds `elements` values of it in whole blocks, and `out` has room for them.
    unsafe {
        assert!(ty < TYPE_COUNT, "ggml type {ty}");
        let traits = g::ggml_get_type_traits(ty);
        let size = g::ggml_row_size(ty, elements as i64);
        assert_eq!(size, bytes.len(), "{elements} values of ggml type {ty} are {size} bytes");
        match (*traits).to_float {
            Some(to_float) => {
                let mut out = vec![0f32; elements];
                to_float(bytes.as_ptr().cast(), out.as_mut_ptr(), elements as i64);
                out
            }
            None if ty == g::GGML_TYPE_F32 => f32_values(bytes),
            None => panic!("ggml type {ty} has no dequantizer"),
        }
    }
}

pub(super) fn quantized(t: T) -> bool {
    // SAFETY: t is a live tensor; the type is one ggml created it with.
    unsafe { g::ggml_is_quantized((*t).type_) }
}

pub(super) fn ne_of(t: T) -> [i64; 4] {
    // SAFETY: t is a live tensor of the current context.
    unsafe { (*t).ne }
}
