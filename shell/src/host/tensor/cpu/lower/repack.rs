//! Weights re-laid out for ggml's interleaved kernels ("CPU_REPACK", what llama.cpp uses by default).
//!
//! ggml multiplies Q4_0 and Q4_K rows eight at a time, from blocks interleaved across rows, with AVX2
//! kernels of its own (`ggml_gemm_q4_K_8x8_q8_K`): at 512 prompt tokens these took 13 % of llama.cpp's
//! time where the row-at-a-time path took 17 % of ours. The layout is ggml's and lossless. A weight gets
//! its interleaved twin the first time a matrix product reads it in a form those kernels accept; every
//! other reader (a gather, a dequantization) keeps reading the blocks as stored. The twin replaces the
//! file's pages in memory: they are handed back once it is made (and read from the file again should
//! anything else touch them).

use super::super::Array;
use llama_cpp_sys_2 as g;
use std::sync::OnceLock;

/// A weight's interleaved copy: a tensor in a repack buffer of its own.
pub(in crate::host::tensor::cpu) struct Repacked {
    context: *mut g::ggml_context,
    buffer: g::ggml_backend_buffer_t,
    tensor: *mut g::ggml_tensor,
}

// SAFETY: the tensor is written once, when made, and only read after (by compute threads too); the
// context and buffer are freed once, on drop.
unsafe impl Send for Repacked {}
unsafe impl Sync for Repacked {}

impl Drop for Repacked {
    fn drop(&mut self) {
        // SAFETY: both were made by `Repacked::new` and are freed only here.
        unsafe {
            g::ggml_backend_buffer_free(self.buffer);
            g::ggml_free(self.context);
        }
    }
}

/// ggml's repack buffer type, found among the CPU device's extra buffer types; None if this build has none.
fn buffer_type() -> Option<g::ggml_backend_buffer_type_t> {
    static FOUND: OnceLock<Option<usize>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        // SAFETY: registry look-ups; the list ggml returns is NULL-terminated and static.
        unsafe {
            let reg = g::ggml_backend_cpu_reg();
            let name = c"ggml_backend_dev_get_extra_bufts";
            let proc = g::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
            if proc.is_null() {
                return None;
            }
            let extra: g::ggml_backend_dev_get_extra_bufts_t = std::mem::transmute(proc);
            let mut list = extra?(g::ggml_backend_reg_dev_get(reg, 0));
            while !list.is_null() && !(*list).is_null() {
                if std::ffi::CStr::from_ptr(g::ggml_backend_buft_name(*list)).to_bytes() == b"CPU_REPACK" {
                    return Some(*list as usize);
                }
                list = list.add(1);
            }
            None
        }
    });
    found.map(|p| p as g::ggml_backend_buffer_type_t)
}

impl Repacked {
    /// The interleaved copy of a 2-d block-quantized weight, if ggml has kernels for it on this processor.
    fn new(ggml_type: g::ggml_type, shape: &[i32], bytes: &[u8]) -> Option<Repacked> {
        let [rows, row] = <[i32; 2]>::try_from(shape).ok()?;
        // ggml's repack of these types refuses (by aborting the process) rows or row counts not divisible
        // by 8; its kernels exist for these two types on x86 (AVX2) and Arm.
        if !matches!(ggml_type, g::GGML_TYPE_Q4_0 | g::GGML_TYPE_Q4_K) || rows <= 0 || row <= 0 || rows % 8 != 0 || row % 8 != 0 {
            return None;
        }
        let buft = buffer_type()?;
        // SAFETY: a one-tensor context; the buffer is sized by ggml for the tensor; `set_tensor` gets
        // exactly the tensor's bytes (`from_blocks` checked they are whole rows of this type and shape).
        unsafe {
            let params = g::ggml_init_params { mem_size: g::ggml_tensor_overhead(), mem_buffer: std::ptr::null_mut(), no_alloc: true };
            let context = g::ggml_init(params);
            if context.is_null() {
                return None;
            }
            let tensor = g::ggml_new_tensor_2d(context, ggml_type, row as i64, rows as i64);
            let buffer = g::ggml_backend_buft_alloc_buffer(buft, g::ggml_backend_buft_get_alloc_size(buft, tensor));
            if buffer.is_null() {
                g::ggml_free(context);
                return None;
            }
            let repacked = Repacked { context, buffer, tensor };
            // Allocating picks the kernel (`extra`); none means this processor has none for the type.
            let placed = g::ggml_backend_tensor_alloc(buffer, tensor, g::ggml_backend_buffer_get_base(buffer));
            if placed != g::GGML_STATUS_SUCCESS || (*tensor).extra.is_null() || g::ggml_nbytes(tensor) != bytes.len() {
                return None;
            }
            g::ggml_backend_tensor_set(tensor, bytes.as_ptr().cast(), 0, bytes.len());
            g::ggml_set_name(tensor, c"repacked".as_ptr());
            Some(repacked)
        }
    }
}

/// The interleaved twin of weight `w` for a product with `x` (ggml: `mul_mat(w, x)`), when ggml's
/// interleaved kernels take this product: a 2-d weight, and f32, contiguous activations in at most
/// three dimensions (what they assert).
///
/// # Safety
/// `x` is a live tensor of the graph being built.
pub(super) unsafe fn twin(w: &Array, x: *mut g::ggml_tensor) -> Option<*mut g::ggml_tensor> {
    let blocks = w.0.blocks?;
    // SAFETY: x is live (the caller's promise).
    let fits = unsafe { (*x).type_ == g::GGML_TYPE_F32 && (*x).ne[3] == 1 && g::ggml_is_contiguous(x) };
    if !fits || w.0.shape.len() != 2 {
        return None;
    }
    let repacked = w.0.repacked.get_or_init(|| {
        let buffer = w.buffer()?;
        let made = Repacked::new(blocks, &w.0.shape, buffer.bytes());
        if made.is_some() {
            buffer.release_pages();
        }
        made
    });
    repacked.as_ref().map(|r| r.tensor)
}

#[cfg(test)]
mod tests {
    use super::g;
    use crate::host::tensor::cpu::CpuBackend;
    use crate::host::tensor::Backend;
    use std::sync::Arc;

    /// Whether ggml has interleaved Q4_K kernels for this processor.
    fn has_kernels() -> bool {
        // SAFETY: feature queries.
        unsafe { g::ggml_cpu_has_avx2() != 0 || (g::ggml_cpu_has_neon() != 0 && (g::ggml_cpu_has_matmul_int8() != 0 || g::ggml_cpu_has_dotprod() != 0)) }
    }

    /// A Q4_K weight read by a product gets its interleaved twin, the product matches the float product
    /// of the values its blocks encode, and a gather from the same weight afterwards still reads the
    /// blocks as stored (their pages were handed back, and are read from the mapping again).
    #[test]
    fn a_product_reads_the_interleaved_twin_and_a_gather_the_blocks_as_stored() {
        let (rows, row) = (16, 512);
        let values: Vec<f32> = (0..rows * row).map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0).collect();
        let mut blocks = vec![0u8; rows * row / 256 * 144];
        // SAFETY: `blocks` holds exactly `rows` Q4_K rows of `row` values.
        let written = unsafe { g::ggml_quantize_chunk(g::GGML_TYPE_Q4_K, values.as_ptr(), blocks.as_mut_ptr().cast(), 0, rows as i64, row as i64, std::ptr::null()) };
        assert_eq!(written, blocks.len());
        // Weights are mapped from their file (whose pages can be handed back and read again).
        let file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut &file, &blocks).unwrap();
        // SAFETY: a private temporary file nothing else writes.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
        let be = CpuBackend;
        let w = be.from_blocks(g::GGML_TYPE_Q4_K, &map, 0..blocks.len(), &[rows as i32, row as i32]).unwrap().unwrap();
        let encoded = be.read_f32(&w).unwrap();

        let x: Vec<f32> = (0..3 * row).map(|i| (i * 13 % 29) as f32 / 14.0 - 1.0).collect();
        let product = be.matmul(&be.from_f32(&x, &[3, row as i32]).unwrap(), &be.transpose(&w, &[1, 0]).unwrap()).unwrap();
        let y = be.read_f32(&product).unwrap();
        assert_eq!(w.0.repacked.get().map(Option::is_some), Some(has_kernels()), "the product made the twin where kernels exist");
        for i in 0..3 {
            for j in 0..rows {
                let exact: f32 = (0..row).map(|k| x[i * row + k] * encoded[j * row + k]).sum();
                // The kernels round activations (|x| <= 1) to 8 bits per 256-value block, as the
                // row-at-a-time path does: each off by at most 1/254, so the sum by sum(|w|) / 254.
                let bound = (0..row).map(|k| encoded[j * row + k].abs()).sum::<f32>() / 254.0 + 1e-4;
                assert!((y[i * rows + j] - exact).abs() <= bound, "[{i}, {j}]: {} vs {exact} (bound {bound})", y[i * rows + j]);
            }
        }

        let gathered = be.read_f32(&be.take(&w, &be.from_i32(&[5, 0], &[2]).unwrap(), 0).unwrap()).unwrap();
        assert_eq!(&gathered[..row], &encoded[5 * row..6 * row]);
        assert_eq!(&gathered[row..], &encoded[..row]);
    }
}
