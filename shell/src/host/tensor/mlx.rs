//! The MLX backend (mlx-rs): Metal on Apple Silicon, the CPU backend elsewhere. Every MLX call in the
//! shell lives in this file.

use super::{Backend, DType, Mask, OpResult, Rope};
use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::{ArrayIndex, ArrayIndexOp, TryIndexOp, TryIndexUpdateOp, UpdateMode};
use mlx_rs::{ops, Array, Dtype};

#[derive(Default)]
pub struct MlxBackend;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn checked_len(len: usize, shape: &[i32]) -> OpResult<()> {
    if shape.iter().any(|&d| d < 0) {
        return Err(format!("negative dimension in shape {shape:?}"));
    }
    let expected = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d as usize));
    match expected {
        Some(n) if n == len => Ok(()),
        _ => Err(format!("{len} values do not fill shape {shape:?}")),
    }
}

fn to_mlx(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::Float32,
        DType::F16 => Dtype::Float16,
        DType::BF16 => Dtype::Bfloat16,
        DType::I32 => Dtype::Int32,
        DType::U32 => Dtype::Uint32,
        DType::U8 => Dtype::Uint8,
    }
}

/// Per-axis ranges for `slice` / `slice-update`; axes not mentioned are taken whole.
fn ranges(start: &[i32], stop: &[i32]) -> OpResult<Vec<ArrayIndexOp<'static>>> {
    if start.len() != stop.len() {
        return Err(format!("slice start {start:?} and stop {stop:?} differ in length"));
    }
    Ok(start.iter().zip(stop).map(|(&a, &b)| (a..b).index_op()).collect())
}

impl Backend for MlxBackend {
    type Array = Array;

    /// The device MLX actually runs on (asked of MLX, not assumed from the platform).
    fn name(&self) -> String {
        let device = match mlx_rs::Device::default().get_type() {
            Ok(mlx_rs::DeviceType::Gpu) => "GPU, Metal",
            Ok(mlx_rs::DeviceType::Cpu) => "CPU",
            Err(_) => "device unknown",
        };
        format!("MLX ({device})")
    }

    fn from_f32(&self, data: &[f32], shape: &[i32]) -> OpResult<Array> {
        checked_len(data.len(), shape)?;
        Ok(Array::from_slice(data, shape))
    }

    fn from_i32(&self, data: &[i32], shape: &[i32]) -> OpResult<Array> {
        checked_len(data.len(), shape)?;
        Ok(Array::from_slice(data, shape))
    }

    fn from_bytes(&self, dtype: DType, bytes: &[u8], shape: &[i32]) -> OpResult<Array> {
        if bytes.len() % dtype.size() != 0 {
            return Err(format!("{} bytes are not a whole number of {dtype:?} elements", bytes.len()));
        }
        let n = bytes.len() / dtype.size();
        checked_len(n, shape)?;
        let u16s = || bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
        let u32s = || bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        Ok(match dtype {
            DType::F32 => Array::from_slice(&u32s().map(f32::from_bits).collect::<Vec<_>>(), shape),
            DType::F16 => Array::from_slice(&u16s().map(half::f16::from_bits).collect::<Vec<_>>(), shape),
            DType::BF16 => Array::from_slice(&u16s().map(half::bf16::from_bits).collect::<Vec<_>>(), shape),
            DType::I32 => Array::from_slice(&u32s().map(|v| v as i32).collect::<Vec<_>>(), shape),
            DType::U32 => Array::from_slice(&u32s().collect::<Vec<_>>(), shape),
            DType::U8 => Array::from_slice(bytes, shape),
        })
    }

    /// MLX multiplies its own affine format as it is.
    fn affine_as_blocks(&self, _: &Array, _: &Array, _: &Array, _: i32, _: i32) -> OpResult<Option<Array>> {
        Ok(None)
    }

    /// MLX has no ggml block formats: the caller dequantizes instead.
    fn from_blocks(&self, _: u32, _: &std::sync::Arc<memmap2::Mmap>, _: std::ops::Range<usize>, _: &[i32]) -> OpResult<Option<Array>> {
        Ok(None)
    }

    fn shape<'a>(&self, a: &'a Array) -> &'a [i32] {
        a.shape()
    }

    fn blocks(&self, _: &Array) -> Option<u32> {
        None
    }

    fn dtype(&self, a: &Array) -> DType {
        match a.dtype() {
            Dtype::Float16 => DType::F16,
            Dtype::Bfloat16 => DType::BF16,
            Dtype::Int32 => DType::I32,
            Dtype::Uint32 => DType::U32,
            Dtype::Uint8 | Dtype::Bool => DType::U8,
            _ => DType::F32,
        }
    }

    fn matmul(&self, a: &Array, b: &Array) -> OpResult<Array> {
        ops::matmul(a, b).map_err(err)
    }

    fn quantized_matmul(&self, x: &Array, w: &Array, scales: &Array, biases: &Array, transpose: bool, group_size: i32, bits: i32) -> OpResult<Array> {
        ops::quantized_matmul(x, w, scales, biases, transpose, group_size, bits).map_err(err)
    }

    fn dequantize(&self, w: &Array, scales: &Array, biases: &Array, group_size: i32, bits: i32) -> OpResult<Array> {
        ops::dequantize(w, scales, biases, group_size, bits).map_err(err)
    }

    fn quantize(&self, w: &Array, group_size: i32, bits: i32) -> OpResult<(Array, Array, Array)> {
        ops::quantize(w, group_size, bits).map_err(err)
    }

    fn add(&self, a: &Array, b: &Array) -> OpResult<Array> {
        ops::add(a, b).map_err(err)
    }

    fn subtract(&self, a: &Array, b: &Array) -> OpResult<Array> {
        ops::subtract(a, b).map_err(err)
    }

    fn multiply(&self, a: &Array, b: &Array) -> OpResult<Array> {
        ops::multiply(a, b).map_err(err)
    }

    fn divide(&self, a: &Array, b: &Array) -> OpResult<Array> {
        ops::divide(a, b).map_err(err)
    }

    fn scale(&self, a: &Array, factor: f32) -> OpResult<Array> {
        // The scalar takes the array's dtype, so bf16 graphs stay bf16.
        let s = Array::from_f32(factor).as_dtype(a.dtype()).map_err(err)?;
        ops::multiply(a, &s).map_err(err)
    }

    fn add_scalar(&self, a: &Array, value: f32) -> OpResult<Array> {
        let s = Array::from_f32(value).as_dtype(a.dtype()).map_err(err)?;
        ops::add(a, &s).map_err(err)
    }

    fn tanh(&self, a: &Array) -> OpResult<Array> {
        ops::tanh(a).map_err(err)
    }

    fn sigmoid(&self, a: &Array) -> OpResult<Array> {
        ops::sigmoid(a).map_err(err)
    }

    fn silu(&self, a: &Array) -> OpResult<Array> {
        mlx_rs::nn::silu(a).map_err(err)
    }

    fn gelu_tanh(&self, a: &Array) -> OpResult<Array> {
        mlx_rs::nn::gelu_approximate(a).map_err(err)
    }

    fn astype(&self, a: &Array, dtype: DType) -> OpResult<Array> {
        a.as_dtype(to_mlx(dtype)).map_err(err)
    }

    fn reshape(&self, a: &Array, shape: &[i32]) -> OpResult<Array> {
        ops::reshape(a, shape).map_err(err)
    }

    fn transpose(&self, a: &Array, axes: &[i32]) -> OpResult<Array> {
        ops::transpose_axes(a, axes).map_err(err)
    }

    fn slice(&self, a: &Array, start: &[i32], stop: &[i32]) -> OpResult<Array> {
        let ops = ranges(start, stop)?;
        a.try_index(&ops[..]).map_err(err)
    }

    fn slice_update(&self, a: &Array, update: &Array, start: &[i32], stop: &[i32]) -> OpResult<Array> {
        let ops = ranges(start, stop)?;
        a.try_index_update(&ops[..], update, UpdateMode::Replace).map_err(err)
    }

    fn concatenate(&self, arrays: &[&Array], axis: i32) -> OpResult<Array> {
        ops::concatenate(arrays, axis).map_err(err)
    }

    fn take(&self, a: &Array, indices: &Array, axis: i32) -> OpResult<Array> {
        ops::indexing::take_axis(a, indices, axis).map_err(err)
    }

    fn softmax(&self, a: &Array, axis: i32) -> OpResult<Array> {
        ops::softmax_axis(a, axis, true).map_err(err)
    }

    fn rms_norm(&self, x: &Array, weight: &Array, eps: f32) -> OpResult<Array> {
        fast::rms_norm(x, Some(weight), eps).map_err(err)
    }

    fn rope(&self, x: &Array, p: Rope) -> OpResult<Array> {
        fast::rope(x, p.dims, p.traditional, p.base, p.scale, p.offset, None).map_err(err)
    }

    fn attention(&self, q: &Array, k: &Array, v: &Array, scale: f32, mask: Mask<'_, Array>) -> OpResult<Array> {
        let window_mask;
        let mask = match mask {
            Mask::None => None,
            Mask::Causal => Some(ScaledDotProductAttentionMask::Causal),
            Mask::SlidingWindow { window, query_offset, key_offset } => {
                let (queries, keys) = (q.shape()[2], k.shape()[2]);
                let positions = |from: i32, n: i32, shape: &[i32]| Array::from_slice(&(from..from + n).collect::<Vec<i32>>(), shape);
                let query = positions(query_offset, queries, &[queries, 1]);
                let oldest = positions(query_offset - window, queries, &[queries, 1]);
                let key = positions(key_offset, keys, &[1, keys]);
                window_mask = ops::logical_and(&ops::le(&key, &query).map_err(err)?, &ops::gt(&key, &oldest).map_err(err)?).map_err(err)?;
                Some(ScaledDotProductAttentionMask::Array(&window_mask))
            }
            Mask::Explicit(m) => Some(ScaledDotProductAttentionMask::Array(m)),
        };
        fast::scaled_dot_product_attention(q, k, v, scale, mask, None).map_err(err)
    }

    fn conv1d_depthwise(&self, x: &Array, weight: &Array) -> OpResult<Array> {
        let shape = weight.shape();
        if shape.len() != 2 {
            return Err(format!("depthwise conv weight must be [channels, kernel], got {shape:?}"));
        }
        let (channels, kernel) = (shape[0], shape[1]);
        // MLX conv1d weights are [out_channels, kernel, in_channels / groups].
        let w = ops::reshape(weight, &[channels, kernel, 1]).map_err(err)?;
        ops::conv1d(x, &w, 1, 0, 1, channels).map_err(err)
    }

    fn eval(&self, arrays: &[&Array]) -> OpResult<()> {
        mlx_rs::transforms::eval(arrays.iter().copied()).map_err(err)
    }

    /// MLX keeps no account of who holds a node, so the whole graph is computed.
    fn discard(&self, a: Array) -> OpResult<()> {
        self.eval(&[&a])
    }

    fn int_range(&self, a: &Array) -> OpResult<Option<(i64, i64)>> {
        if a.size() == 0 {
            return Ok(None);
        }
        let wide = a.as_dtype(Dtype::Int64).map_err(err)?;
        let (low, high) = (ops::min(&wide, None).map_err(err)?, ops::max(&wide, None).map_err(err)?);
        mlx_rs::transforms::eval([&low, &high]).map_err(err)?;
        Ok(Some((low.try_item_exact::<i64>().map_err(err)?, high.try_item_exact::<i64>().map_err(err)?)))
    }

    fn read_f32(&self, a: &Array) -> OpResult<Vec<f32>> {
        if a.size() == 0 {
            return Ok(Vec::new()); // MLX gives an empty array no data pointer at all
        }
        let a = if a.dtype() == Dtype::Float32 { a.clone() } else { a.as_dtype(Dtype::Float32).map_err(err)? };
        // A view (slice, transpose) is read through a row-major copy.
        let a = a.contiguous().map_err(err)?;
        a.eval().map_err(err)?;
        a.try_as_slice::<f32>().map(<[f32]>::to_vec).map_err(err)
    }
}

// mlx-sys declares these for every platform, but the Linux CPU library (and the mlx-c built against it)
// does not export them. They are never reached on Linux: the shell reads back only f32, and MLX's
// timing code calls mach_approximate_time only on macOS. Defining them keeps the linker satisfied.
#[cfg(target_os = "linux")]
mod linux_link_shims {
    use mlx_sys::mlx_array;

    #[no_mangle]
    pub extern "C" fn mach_approximate_time() -> u64 {
        0
    }

    extern "C" {
        fn mlx_array_data_uint16(arr: mlx_array) -> *const u16;
        fn mlx_array_item_uint16(res: *mut u16, arr: mlx_array) -> i32;
    }

    #[no_mangle]
    pub unsafe extern "C" fn mlx_array_data_float16(arr: mlx_array) -> *const u16 {
        mlx_array_data_uint16(arr)
    }

    #[no_mangle]
    pub unsafe extern "C" fn mlx_array_data_bfloat16(arr: mlx_array) -> *const u16 {
        mlx_array_data_uint16(arr)
    }

    #[no_mangle]
    pub unsafe extern "C" fn mlx_array_item_float16(res: *mut u16, arr: mlx_array) -> i32 {
        mlx_array_item_uint16(res, arr)
    }

    #[no_mangle]
    pub unsafe extern "C" fn mlx_array_item_bfloat16(res: *mut u16, arr: mlx_array) -> i32 {
        mlx_array_item_uint16(res, arr)
    }
}
