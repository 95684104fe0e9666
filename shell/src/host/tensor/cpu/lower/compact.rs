//! Caches cut back in place. A bounded history (a sliding-window layer's keys and values) drops its
//! oldest positions now and then by slicing them off, and the next step appends to that slice. Joined
//! as written, the kept positions are copied into a new buffer while the old one is still held: for
//! Gemma 3 270M's 15 sliding layers past 832 positions, ~11 MiB more at that step, every 64 tokens.
//! Instead, before a graph is lowered, such a slice is settled in the buffer it slices: the kept rows
//! move to its front, and the append that follows grows that buffer as every step's does.

use super::{Array, Op, State};
use std::sync::Arc;

/// Settles, in their own buffers, the cut-back histories that `order`'s appends read (see the module
/// comment); whether any was.
pub(super) fn in_place(order: &[Array]) -> bool {
    let mut settled = false;
    for node in order {
        let state = node.state();
        if let State::Pending(Op::Concat(axis), inputs) = &*state {
            if let Some(old) = inputs.first() {
                settled |= settle(old, *axis);
            }
        }
    }
    settled
}

/// Makes `old`, a pending slice that drops the first rows along `axis` of a computed array held by no
/// one else, the array's own buffer with those rows dropped.
fn settle(old: &Array, axis: usize) -> bool {
    let mut slice_state = old.state();
    let State::Pending(Op::Slice(ranges), from) = &mut *slice_state else { return false };
    let [source] = from.as_mut_slice() else { return false };
    // Read only by this append: the append's input and `order`'s entry. The array sliced is read by
    // nothing else either, and the rows dropped are one run of bytes: every axis before `axis` has one
    // entry, and the slice keeps every axis but `axis` whole and `axis` up to its end.
    let shape = &source.0.shape;
    let row_elements: i64 = shape.iter().skip(axis + 1).map(|&d| d as i64).product();
    let keeps_the_end = ranges.iter().enumerate().all(|(d, &(start, len))| {
        let dim = shape[d] as i64;
        if d == axis { start > 0 && start + len == dim } else { start == 0 && len == dim }
    });
    if Arc::strong_count(&old.0) != 2
        || Arc::strong_count(&source.0) != 1
        || ranges.len() != shape.len()
        || !shape[..axis].iter().all(|&d| d == 1)
        || !keeps_the_end
        || source.0.blocks.is_some()
    {
        return false;
    }
    let dropped = (ranges[axis].0 * row_elements) as usize * source.0.dtype.size();
    let mut source_state = source.state();
    let State::Ready(buffer) = &mut *source_state else { return false };
    let whole = buffer.bytes().len() == source.elements() * source.0.dtype.size();
    let Some(bytes) = Arc::get_mut(buffer).filter(|_| whole) else { return false };
    if !bytes.drop_front(dropped) {
        return false;
    }
    let buffer = buffer.clone();
    drop(source_state);
    *slice_state = State::Ready(buffer);
    true
}

#[cfg(test)]
mod tests {
    use super::super::evaluate;
    use crate::host::tensor::cpu::{Array, Buffer, Op, State};
    use crate::host::tensor::DType;

    fn f32s(a: &Array) -> Vec<f32> {
        let State::Ready(buffer) = &*a.state() else { panic!("not computed") };
        buffer.bytes().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// A history of 10 positions of 4 values, cut back to its last 7 and appended to: the result is the
    /// kept rows then the new one, in the history's own memory.
    #[test]
    fn a_cut_back_history_is_appended_to_in_its_own_memory() {
        let values: Vec<f32> = (0..40).map(|v| v as f32).collect();
        let mut history = Buffer::growable(40 * 4);
        history.bytes_mut().copy_from_slice(&values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        let memory = history.ptr();
        let old = Array::ready(vec![1, 1, 10, 4], DType::F32, history);
        let kept = Array::pending(vec![1, 1, 7, 4], DType::F32, Op::Slice(vec![(0, 1), (0, 1), (3, 7), (0, 4)]), vec![old]);
        let new = Array::ready(vec![1, 1, 1, 4], DType::F32, Buffer::from_bytes(&[100f32, 101., 102., 103.].map(f32::to_le_bytes).concat()));
        let joined = Array::pending(vec![1, 1, 8, 4], DType::F32, Op::Concat(2), vec![kept, new]);
        evaluate(&[&joined]).unwrap();
        let want: Vec<f32> = (12..40).map(|v| v as f32).chain([100., 101., 102., 103.]).collect();
        assert_eq!(f32s(&joined), want);
        let State::Ready(buffer) = &*joined.state() else { unreachable!() };
        assert_eq!(buffer.ptr(), memory, "the history was copied instead of cut back in place");
    }

    /// A slice someone else still reads is joined by copying, and its source is left as it was.
    #[test]
    fn a_slice_read_elsewhere_is_left_alone() {
        let values: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let old = Array::ready(vec![1, 4, 2], DType::F32, Buffer::from_bytes(&values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()));
        let kept = Array::pending(vec![1, 3, 2], DType::F32, Op::Slice(vec![(0, 1), (1, 3), (0, 2)]), vec![old.clone()]);
        let new = Array::ready(vec![1, 1, 2], DType::F32, Buffer::from_bytes(&[8f32, 9.].map(f32::to_le_bytes).concat()));
        let joined = Array::pending(vec![1, 4, 2], DType::F32, Op::Concat(1), vec![kept, new]);
        evaluate(&[&joined]).unwrap();
        assert_eq!(f32s(&joined), (2..10).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(f32s(&old), values);
    }
}
