//! MLX affine quantization on the cpu backend: quantizing and dequantizing as MLX does (so `--dtype q4/q8`
//! mean the same on both backends), and 4-bit weights as ggml Q4_1 blocks, so they are multiplied as
//! blocks instead of as f32 dequantized at first use (8x the bytes).
//!
//! Both formats store `value = scale * q + bias` with an unsigned 4-bit `q` and one scale and bias per
//! group: MLX groups 32, 64 or 128 values of a row, Q4_1 blocks 32 (so an MLX group is one to four
//! blocks with the same scale and bias). The quantized values carry over exactly; Q4_1 keeps scale and
//! bias as f16, which holds mlx-lm's bf16 scales exactly while they stay within f16's normal range
//! (2^-14 to 65504), and rounds f32 ones to 11 significant bits.

use super::{lower, to_f64, Array, Buffer, CpuBackend, DType, Node, OpResult, State};
use crate::host::tensor::Backend;
use std::sync::Arc;

impl CpuBackend {
    /// MLX affine dequantization, in Rust: each `bits`-bit value q of a group becomes scale * q + bias.
    pub(super) fn dequantize_now(&self, w: &Array, scales: &Array, biases: &Array, group_size: i32, bits: i32) -> OpResult<Array> {
        if !matches!(bits, 2 | 4 | 8) {
            return Err(format!("the cpu backend dequantizes 2, 4 and 8-bit MLX weights, not {bits}-bit"));
        }
        let (words, scale_values, bias_values) = (self.computed(w)?, self.computed(scales)?, self.computed(biases)?);
        let (scale_values, bias_values) = (to_f64(scale_values.bytes(), scales.0.dtype), to_f64(bias_values.bytes(), biases.0.dtype));
        let per_word = 32 / bits as usize;
        let columns = *w.0.shape.last().ok_or("dequantize: a scalar weight")? as usize * per_word;
        let rows = w.elements() * per_word / columns.max(1);
        let groups = columns / group_size as usize;
        let mut out = Buffer::zeroed(rows * columns * 4);
        let words: Vec<u32> = words.bytes().chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let mask = (1u64 << bits) as u32 - 1;
        for (i, chunk) in out.bytes_mut().chunks_exact_mut(4).enumerate() {
            let (row, column) = (i / columns, i % columns);
            let q = (words[row * (columns / per_word) + column / per_word] >> ((column % per_word) * bits as usize)) & mask;
            let g = row * groups + column / group_size as usize;
            chunk.copy_from_slice(&((scale_values[g] * q as f64 + bias_values[g]) as f32).to_le_bytes());
        }
        let mut shape = w.0.shape.clone();
        *shape.last_mut().expect("checked above") = columns as i32;
        Ok(Array::ready(shape, DType::F32, out))
    }

    /// MLX affine quantization (min/max per group), in Rust, so `--dtype q4/q8` means the same on both
    /// backends.
    pub(super) fn quantize_affine(&self, w: &Array, group_size: i32, bits: i32) -> OpResult<(Array, Array, Array)> {
        if !matches!(bits, 2 | 4 | 8) || w.0.shape.len() != 2 || w.0.shape[1] % group_size != 0 {
            return Err(format!("quantize: {bits}-bit groups of {group_size} do not fit {:?}", w.0.shape));
        }
        let values = to_f64(self.computed(w)?.bytes(), w.0.dtype);
        let (rows, columns, group) = (w.0.shape[0] as usize, w.0.shape[1] as usize, group_size as usize);
        let levels = ((1u32 << bits) - 1) as f64;
        let per_word = 32 / bits as usize;
        let mut words = vec![0u32; rows * columns / per_word];
        let (mut scales, mut biases) = (Vec::with_capacity(rows * columns / group), Vec::with_capacity(rows * columns / group));
        for (g, chunk) in values.chunks(group).enumerate() {
            let (low, high) = chunk.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
            let scale = ((high - low) / levels).max(1e-12);
            for (j, &v) in chunk.iter().enumerate() {
                let q = ((v - low) / scale).round().clamp(0.0, levels) as u32;
                let i = g * group + j;
                words[i / per_word] |= q << ((i % per_word) * bits as usize);
            }
            scales.push(scale as f32);
            biases.push(low as f32);
        }
        let word_bytes: Vec<u8> = words.iter().flat_map(|v| v.to_le_bytes()).collect();
        let shape = [rows as i32, (columns / group) as i32];
        Ok((
            Array::ready(vec![rows as i32, (columns / per_word) as i32], DType::U32, Buffer::from_bytes(&word_bytes)),
            self.from_f32(&scales, &shape)?,
            self.from_f32(&biases, &shape)?,
        ))
    }

    /// 4-bit triples as Q4_1 blocks; None for other widths and groups that do not split into blocks.
    pub(super) fn affine_as_q4_1(&self, w: &Array, scales: &Array, biases: &Array, group_size: i32, bits: i32) -> OpResult<Option<Array>> {
        if bits != 4 || group_size <= 0 || w.0.dtype != DType::U32 || w.0.shape.len() != 2 {
            return Ok(None);
        }
        let words: Vec<u32> = self.computed(w)?.bytes().chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let floats = |a: &Array| -> OpResult<Vec<f32>> { Ok(to_f64(self.computed(a)?.bytes(), a.0.dtype).into_iter().map(|v| v as f32).collect()) };
        let (rows, columns) = (w.0.shape[0], w.0.shape[1].checked_mul(8).ok_or("a 4-bit weight too wide")?);
        let Some(blocks) = q4_1_blocks(&words, &floats(scales)?, &floats(biases)?, rows as usize, group_size as usize) else {
            return Ok(None);
        };
        let buffer = Arc::new(Buffer::from_bytes(&blocks));
        let node = Node::new(vec![rows, columns], DType::F32, Some(lower::Q4_1), State::Ready(buffer));
        Ok(Some(Array(Arc::new(node))))
    }
}

/// Bytes of one Q4_1 block: scale and bias (f16 each), then 32 values in 16 bytes.
const BLOCK_BYTES: usize = 20;
const BLOCK: usize = 32;

/// Q4_1 blocks for `rows` rows of MLX-packed 4-bit `words` (eight values per little-endian u32, the
/// first in the lowest bits), with `scales` and `biases` per `group_size` values of a row. None when the
/// groups do not split into whole blocks.
pub fn q4_1_blocks(words: &[u32], scales: &[f32], biases: &[f32], rows: usize, group_size: usize) -> Option<Vec<u8>> {
    let columns = words.len().checked_mul(8)? / rows.max(1);
    if rows == 0 || group_size == 0 || group_size % BLOCK != 0 || columns % group_size != 0 || words.len() * 8 != rows * columns {
        return None;
    }
    let groups = columns / group_size;
    if scales.len() != rows * groups || biases.len() != rows * groups {
        return None;
    }
    let value = |row: usize, column: usize| (words[(row * columns + column) / 8] >> ((column % 8) * 4)) as u8 & 15;
    let mut out = Vec::with_capacity(rows * columns / BLOCK * BLOCK_BYTES);
    for row in 0..rows {
        for start in (0..columns).step_by(BLOCK) {
            let group = row * groups + start / group_size;
            out.extend_from_slice(&half::f16::from_f32(scales[group]).to_le_bytes());
            out.extend_from_slice(&half::f16::from_f32(biases[group]).to_le_bytes());
            // ggml's layout: byte j holds value j in its low half and value j + 16 in its high half.
            out.extend((0..BLOCK / 2).map(|j| value(row, start + j) | value(row, start + j + BLOCK / 2) << 4));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::lower::{to_f32, Q4_1};
    use super::q4_1_blocks;

    #[test]
    fn q4_1_blocks_hold_the_values_of_the_mlx_groups() {
        let (rows, columns) = (3, 256);
        let q = |i: usize| ((i * 7 + i / 5) % 16) as u32;
        let words: Vec<u32> = (0..rows * columns / 8).map(|w| (0..8).fold(0, |acc, j| acc | q(w * 8 + j) << (4 * j))).collect();
        for group in [32, 64, 128] {
            let groups = rows * columns / group;
            // Scales and biases f16 holds exactly, so ggml's own dequantizer must give MLX's values.
            let scales: Vec<f32> = (0..groups).map(|g| (g as f32 + 1.0) / 64.0).collect();
            let biases: Vec<f32> = (0..groups).map(|g| -(g as f32) / 8.0).collect();
            let blocks = q4_1_blocks(&words, &scales, &biases, rows, group).expect("whole blocks");
            let expected: Vec<f32> = (0..rows * columns).map(|i| scales[i / group] * q(i) as f32 + biases[i / group]).collect();
            assert_eq!(to_f32(Q4_1, &blocks, rows * columns), expected, "groups of {group}");
        }
        // Groups smaller than a block, and scales that do not match the groups, are not converted.
        assert!(q4_1_blocks(&words, &[1.0; 48], &[0.0; 48], rows, 16).is_none());
        assert!(q4_1_blocks(&words, &[1.0; 23], &[0.0; 24], rows, 32).is_none());
        assert!(q4_1_blocks(&words, &[1.0; 24], &[0.0; 24], 5, 32).is_none());
    }

    #[test]
    fn a_quantized_weight_as_blocks_computes_as_its_dequantized_values() {
        use crate::host::tensor::Backend;
        let be = super::super::CpuBackend;
        let values: Vec<f32> = (0..8 * 128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let w = be.from_f32(&values, &[8, 128]).unwrap();
        let (q, scales, biases) = be.quantize(&w, 64, 4).unwrap();
        let exact = be.read_f32(&be.dequantize(&q, &scales, &biases, 64, 4).unwrap()).unwrap();
        let blocks = be.affine_as_blocks(&q, &scales, &biases, 64, 4).unwrap().expect("4-bit groups of 64 fit Q4_1");
        assert_eq!(be.blocks(&blocks), Some(super::super::lower::Q4_1));
        // Only the f32 scales and biases rounded to f16 may differ.
        let as_blocks = be.read_f32(&blocks).unwrap();
        let worst = exact.iter().zip(&as_blocks).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 3e-3, "{worst}");
        assert!(be.affine_as_blocks(&q, &scales, &biases, 64, 8).unwrap().is_none(), "8-bit has no lossless block format");
    }
}
