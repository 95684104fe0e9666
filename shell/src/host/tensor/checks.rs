//! What the tensor host checks before an op is recorded, because MLX does not (or does it in 32-bit
//! arithmetic, or only when the graph runs): shape products and broadcasts in checked 64-bit arithmetic,
//! the rank and dimension requirements of the fused ops, and the size of each op's result and of its
//! largest intermediate, so the byte cap is charged before anything is allocated. Every function is
//! pure over shapes; refusals are sentences naming the op.

use super::DType;

pub type Check<T> = Result<T, String>;

/// Largest dimension MLX can hold (its shapes are i32).
const MAX_DIM: i64 = i32::MAX as i64;
/// Largest rank accepted: models use at most 4; a few more leave room, thousands are an attack.
pub const MAX_RANK: usize = 8;

/// Element count of a shape, refusing negative dimensions and overflow.
pub fn elements(shape: &[i32]) -> Check<u64> {
    if shape.len() > MAX_RANK {
        return Err(format!("rank {} is above the limit of {MAX_RANK}", shape.len()));
    }
    shape.iter().try_fold(1u64, |n, &d| {
        let d = u64::try_from(d).map_err(|_| format!("negative dimension in shape {shape:?}"))?;
        n.checked_mul(d).ok_or_else(|| format!("shape {shape:?} has more elements than can be counted"))
    })
}

/// Bytes of an array of `shape` and `dtype`.
pub fn bytes(shape: &[i32], dtype: DType) -> Check<u64> {
    elements(shape)?.checked_mul(dtype.size() as u64).ok_or_else(|| format!("shape {shape:?} is too large"))
}

/// A guest-given shape (u32 dimensions) as MLX's i32 shape.
pub fn from_guest(shape: &[u32]) -> Check<Vec<i32>> {
    let shape = shape.iter().map(|&d| i32::try_from(d).map_err(|_| format!("dimension {d} is too large"))).collect::<Check<Vec<i32>>>()?;
    elements(&shape)?;
    // mlx-rs multiplies a new array's dimensions in i32, zeros included wherever they are: the product
    // of the non-zero ones must fit (found by the op-sequence property test).
    let nonzero = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d.max(1) as u64).filter(|&n| n <= i32::MAX as u64));
    if nonzero.is_none() {
        return Err(format!("shape {shape:?} is too large for one array"));
    }
    Ok(shape)
}

/// Numpy broadcasting of two shapes.
pub fn broadcast(op: &str, a: &[i32], b: &[i32]) -> Check<Vec<i32>> {
    let rank = a.len().max(b.len());
    let at = |s: &[i32], i: usize| if i + s.len() >= rank { s[i + s.len() - rank] } else { 1 };
    let shape = (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            (x, y) => Err(format!("{op}: shapes {a:?} and {b:?} do not broadcast (axis {i}: {x} vs {y})")),
        })
        .collect::<Check<Vec<i32>>>()?;
    elements(&shape).map_err(|e| format!("{op}: {e}"))?;
    Ok(shape)
}

/// `a @ b` with batch broadcasting; both at least 2-D here (the adapters never need vectors).
pub fn matmul(a: &[i32], b: &[i32]) -> Check<Vec<i32>> {
    if a.len() < 2 || b.len() < 2 {
        return Err(format!("matmul: operands must be at least 2-D, got {a:?} and {b:?}"));
    }
    let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
    let (k2, n) = (b[b.len() - 2], b[b.len() - 1]);
    if k != k2 {
        return Err(format!("matmul: inner dimensions differ ({a:?} @ {b:?})"));
    }
    let mut shape = broadcast("matmul", &a[..a.len() - 2], &b[..b.len() - 2])?;
    shape.extend([m, n]);
    elements(&shape).map_err(|e| format!("matmul: {e}"))?;
    Ok(shape)
}

/// The shape `reshape` produces, with at most one -1, counted in 64 bits (MLX multiplies in 32/64-bit
/// without overflow checks, so a shape whose product wraps around could otherwise pass).
pub fn reshape(from: &[i32], to: &[i32]) -> Check<Vec<i32>> {
    let total = elements(from)?;
    if to.len() > MAX_RANK {
        return Err(format!("reshape: rank {} is above the limit of {MAX_RANK}", to.len()));
    }
    let mut known = 1u64;
    let mut infer = None;
    for (i, &d) in to.iter().enumerate() {
        match d {
            -1 if infer.is_none() => infer = Some(i),
            d if d >= 0 => known = known.checked_mul(d as u64).ok_or_else(|| format!("reshape: shape {to:?} is too large"))?,
            _ => return Err(format!("reshape: invalid shape {to:?}")),
        }
    }
    let mut shape = to.to_vec();
    if let Some(i) = infer {
        if known == 0 || total % known != 0 || total / known > MAX_DIM as u64 {
            return Err(format!("reshape: cannot infer -1 for {from:?} -> {to:?}"));
        }
        shape[i] = (total / known) as i32;
    } else if known != total {
        return Err(format!("reshape: {from:?} has {total} elements, {to:?} has {known}"));
    }
    Ok(shape)
}

/// A guest axis (negative counts from the end) as an index into a shape of `rank`.
pub fn axis(op: &str, axis: i32, rank: usize) -> Check<usize> {
    let a = if axis < 0 { rank as i64 + axis as i64 } else { axis as i64 };
    usize::try_from(a).ok().filter(|&a| a < rank).ok_or_else(|| format!("{op}: axis {axis} is out of range for rank {rank}"))
}

pub fn transpose(shape: &[i32], axes: &[u32]) -> Check<Vec<i32>> {
    let mut seen = vec![false; shape.len()];
    if axes.len() != shape.len() {
        return Err(format!("transpose: {} axes for rank {}", axes.len(), shape.len()));
    }
    axes.iter()
        .map(|&a| {
            let a = a as usize;
            if a >= shape.len() || std::mem::replace(&mut seen[a], true) {
                return Err(format!("transpose: axes {axes:?} are not a permutation of 0..{}", shape.len()));
            }
            Ok(shape[a])
        })
        .collect()
}

/// `slice` bounds: at most one range per axis. MLX clamps the ranges itself; the result is no larger
/// than the input.
pub fn slice(shape: &[i32], start: &[i32], stop: &[i32]) -> Check<()> {
    if start.len() != stop.len() || start.len() > shape.len() {
        return Err(format!("slice: start {start:?} and stop {stop:?} do not fit shape {shape:?}"));
    }
    Ok(())
}

pub fn concatenate<S: AsRef<[i32]>>(shapes: &[S], axis_: i32) -> Check<Vec<i32>> {
    let first = shapes.first().ok_or("concatenate: no arrays")?.as_ref();
    let at = axis("concatenate", axis_, first.len())?;
    let mut total: i64 = 0;
    for s in shapes {
        let s = s.as_ref();
        if s.len() != first.len() || s.iter().zip(first).enumerate().any(|(i, (x, y))| i != at && x != y) {
            return Err(format!("concatenate: shapes {first:?} and {s:?} differ off axis {axis_}"));
        }
        total += s[at] as i64;
    }
    if total > MAX_DIM {
        return Err(format!("concatenate: axis {axis_} would have {total} entries"));
    }
    let mut shape = first.to_vec();
    shape[at] = total as i32;
    elements(&shape)?;
    Ok(shape)
}

/// `take`: the result's shape; the indices themselves are checked against `a.shape[axis]` by the host.
pub fn take(a: &[i32], indices: &[i32], indices_dtype: DType, axis_: i32) -> Check<(Vec<i32>, usize)> {
    if !matches!(indices_dtype, DType::I32 | DType::U32) {
        return Err(format!("take: indices must be int32 or uint32, got {indices_dtype:?}"));
    }
    let at = axis("take", axis_, a.len())?;
    let mut shape = a[..at].to_vec();
    shape.extend_from_slice(indices);
    shape.extend_from_slice(&a[at + 1..]);
    elements(&shape).map_err(|e| format!("take: {e}"))?;
    Ok((shape, at))
}

pub fn rms_norm(x: &[i32], weight: &[i32]) -> Check<()> {
    match (x.last(), weight) {
        (Some(&d), [w]) if d == *w => Ok(()),
        _ => Err(format!("rms-norm: weight {weight:?} must be 1-D and match the last axis of {x:?}")),
    }
}

pub fn rope(x: &[i32], dims: u32) -> Check<()> {
    let last = x.last().copied().unwrap_or(0);
    if x.len() < 3 || dims == 0 || dims % 2 != 0 || dims as i64 > last as i64 {
        return Err(format!("rope: x must be [.., seq, head_dim] (got {x:?}) with an even dims <= head_dim (got {dims})"));
    }
    Ok(())
}

/// Attention's result shape and the bytes of its score matrix [b, hq, lq, lk] (f32), which MLX
/// materializes on the CPU.
pub fn attention(q: &[i32], k: &[i32], v: &[i32], mask: Option<&[i32]>) -> Check<(Vec<i32>, u64)> {
    let bad = || format!("attention: q {q:?}, k {k:?}, v {v:?} must be [batch, heads, seq, dim] with matching batch, seq and dim, and kv heads dividing q heads");
    let ([b, hq, lq, d], [bk, hk, lk, dk], [bv, hv, lv, dv]) = (q, k, v) else { return Err(bad()) };
    if b != bk || b != bv || hk != hv || lk != lv || d != dk || *hk == 0 || hq % hk != 0 {
        return Err(bad());
    }
    let scores = [*b, *hq, *lq, *lk];
    if let Some(m) = mask {
        let full = broadcast("attention mask", m, &scores)?;
        if full != scores {
            return Err(format!("attention: mask {m:?} does not broadcast to the scores {scores:?}"));
        }
    }
    Ok((vec![*b, *hq, *lq, *dv], bytes(&scores, DType::F32)?))
}

pub fn conv1d_depthwise(x: &[i32], weight: &[i32]) -> Check<Vec<i32>> {
    match (x, weight) {
        ([b, l, c], [cw, k]) if c == cw && *k >= 1 && l >= k => Ok(vec![*b, l - k + 1, *c]),
        _ => Err(format!("conv1d-depthwise: x {x:?} must be [batch, seq >= kernel, channels], weight {weight:?} [channels, kernel]")),
    }
}

/// MLX affine quantization: `w` packs 32/bits values per u32; scales and biases hold one value per group.
pub fn quantized(w: &[i32], w_dtype: DType, scales: &[i32], biases: &[i32], group_size: u32, bits: u32) -> Check<i64> {
    if !matches!(bits, 2 | 3 | 4 | 5 | 6 | 8) || !matches!(group_size, 32 | 64 | 128) {
        return Err(format!("quantized: bits {bits} / group size {group_size} are not supported (bits 2-6 or 8, groups 32, 64, 128)"));
    }
    if w_dtype != DType::U32 || w.len() < 2 {
        return Err(format!("quantized: weight must be a uint32 matrix, got {w_dtype:?} {w:?}"));
    }
    let columns = w[w.len() - 1] as i64 * 32 / bits as i64;
    if columns % group_size as i64 != 0 {
        return Err(format!("quantized: {columns} columns are not whole groups of {group_size}"));
    }
    let mut expected = w.to_vec();
    *expected.last_mut().expect("rank >= 2") = (columns / group_size as i64) as i32;
    if scales != expected || biases != expected {
        return Err(format!("quantized: scales {scales:?} and biases {biases:?} must be {expected:?} for weight {w:?}"));
    }
    Ok(columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_are_counted_without_overflow() {
        assert_eq!(elements(&[2, 3, 4]), Ok(24));
        assert!(elements(&[i32::MAX, i32::MAX, i32::MAX, i32::MAX, i32::MAX]).is_err());
        assert!(elements(&[-1, 4]).is_err());
        assert!(elements(&[1; 9]).is_err());
        assert!(from_guest(&[u32::MAX]).is_err());
        assert!(from_guest(&[65536, 65536, 0]).is_err());
    }

    #[test]
    fn reshape_refuses_wrapped_products() {
        assert_eq!(reshape(&[4, 6], &[2, -1]), Ok(vec![2, 12]));
        assert!(reshape(&[1], &[65536, 65536, 65536, 65536, 65536]).is_err());
        assert!(reshape(&[4, 6], &[-1, -1]).is_err());
        assert!(reshape(&[4, 6], &[0, -1]).is_err());
        assert!(reshape(&[4, 6], &[5, 5]).is_err());
    }

    #[test]
    fn broadcasts_and_matmuls() {
        assert_eq!(broadcast("add", &[3, 1], &[1, 4]), Ok(vec![3, 4]));
        assert!(broadcast("add", &[3], &[4]).is_err());
        assert_eq!(matmul(&[2, 3, 4], &[4, 5]), Ok(vec![2, 3, 5]));
        assert!(matmul(&[3, 4], &[5, 6]).is_err());
        assert!(matmul(&[4], &[4, 2]).is_err());
    }

    #[test]
    fn fused_ops_check_their_ranks() {
        assert!(attention(&[1, 4, 2, 8], &[1, 2, 5, 8], &[1, 2, 5, 8], None).is_ok());
        assert!(attention(&[1, 4, 2, 8], &[1, 3, 5, 8], &[1, 3, 5, 8], None).is_err());
        assert!(attention(&[4, 2, 8], &[2, 5, 8], &[2, 5, 8], None).is_err());
        assert!(attention(&[1, 4, 2, 8], &[1, 2, 5, 8], &[1, 2, 5, 8], Some(&[3, 5])).is_err());
        assert!(rope(&[1, 2, 3, 8], 8).is_ok());
        assert!(rope(&[8], 8).is_err());
        assert!(rope(&[1, 2, 3, 8], 16).is_err());
        assert!(rms_norm(&[2, 8], &[8]).is_ok());
        assert!(rms_norm(&[2, 8], &[4]).is_err());
        assert_eq!(conv1d_depthwise(&[1, 5, 4], &[4, 3]), Ok(vec![1, 3, 4]));
        assert!(conv1d_depthwise(&[1, 2, 4], &[4, 3]).is_err());
        assert!(quantized(&[8, 16], DType::U32, &[8, 1], &[8, 1], 64, 8).is_ok());
        assert!(quantized(&[8, 16], DType::U32, &[8, 2], &[8, 1], 64, 8).is_err());
        assert!(take(&[10, 4], &[3], DType::F32, 0).is_err());
        assert!(concatenate(&[vec![i32::MAX, 1], vec![5, 1]], 0).is_err());
        assert!(transpose(&[2, 3], &[0, 0]).is_err());
    }
}
