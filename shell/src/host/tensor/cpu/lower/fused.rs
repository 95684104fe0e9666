//! The lowerings that are more than one ggml call: caches appended in place, GELU as one exact node,
//! rope through strides, attention as ggml's fused kernel with the shell's masks.

use super::{ggml_type, ne, ne_of, reuse, Graph, HashMap, HashSet, T};
use crate::host::tensor::cpu::{Array, AttentionMask, Buffer, Node, Op, State};
use crate::host::tensor::{OpResult, Rope};
use llama_cpp_sys_2 as g;
use std::sync::Arc;

impl Graph {
    /// A cache growing by one step — concatenate(old, new) where [`reuse::appendable`] — is computed by
    /// writing `new` after `old`'s bytes in old's own buffer (grown geometrically), instead of copying the
    /// whole history every token. A padded append's tensor spans its padded rows (see `reuse.rs`).
    pub(super) fn append(&mut self, op: &Op, inputs: &[Array], node: &Array, lowered: &HashMap<*const Node, T>) -> OpResult<Option<T>> {
        if !reuse::appendable(op, inputs, node) {
            return Ok(None);
        }
        let [old, new] = inputs else { return Ok(None) };
        let n = self.lowered_ne(node)?;
        let room = n.iter().product::<i64>() as usize * node.0.dtype.size();
        // New rows cast from f32 (an f16 cache's) that only this append reads are copied from the cast's
        // source: ggml's copy converts as its cast does, the same bits, with a node fewer.
        let folded_cast = self.in_reader.contains(&Arc::as_ptr(&new.0)).then(|| reuse::cast_from_f32(new)).flatten();
        let Some(buffer) = self.grow(old, node.elements() * node.0.dtype.size(), room) else {
            // (A padded append, or one whose cast was left to it, has no other lowering.)
            if n != ne(&node.0.shape)? || folded_cast.is_some() {
                return Err("could not grow a cache in place".into());
            }
            return Ok(None);
        };
        let rows = folded_cast.as_ref().unwrap_or(new);
        let new_t = match lowered.get(&Arc::as_ptr(&rows.0)) {
            Some(&t) => t,
            None => self.leaf(rows)?,
        };
        let new_t = self.float(new_t)?;
        // SAFETY: a tensor over the grown buffer (its room covers the padded rows), and a view of it as
        // long as `new`, placed after old's bytes by [`Graph::place`]; the copy is added to the graph
        // before any op that reads `full`, and ggml runs nodes in order. ggml's copy reads `new_t` in its
        // logical order whatever its strides, as the contract lays the new rows out.
        unsafe {
            let full = g::ggml_new_tensor(self.ctx, ggml_type(node.0.dtype), 4, n.as_ptr());
            let tail = g::ggml_view_1d(self.ctx, full, new.elements() as i64, 0);
            let copy = g::ggml_cpy(self.ctx, new_t, tail);
            self.place(self.current, old.elements() * node.0.dtype.size(), buffer, full, [tail, copy]);
            self.bindings.appends.push((self.current, full, [tail, copy]));
            self.expand(copy);
            Ok(Some(full))
        }
    }

    /// Grows `old`'s buffer to `len` bytes, with at least `room` bytes of memory behind it (a padded
    /// append's); None when it cannot grow in place.
    pub(super) fn grow(&mut self, old: &Array, len: usize, room: usize) -> Option<Arc<Buffer>> {
        let mut state = old.state();
        let State::Ready(buffer) = &mut *state else { return None };
        Arc::get_mut(buffer)?.grow(len, room).then(|| buffer.clone())
    }

    /// Points the tensor of the order's node `i`, an append, at the grown buffer and its views after the
    /// old part's `old_bytes`.
    pub(super) fn place(&mut self, i: usize, old_bytes: usize, buffer: Arc<Buffer>, full: T, views: [T; 2]) {
        // SAFETY: tensors of this graph; the views lie inside `full` (old's bytes plus new's elements are
        // the grown length), and the finishing pass sets their data from full's.
        unsafe {
            (*full).data = buffer.ptr();
            for view in views {
                (*view).view_offs = old_bytes;
            }
        }
        self.held.push(buffer.clone());
        self.appended.insert(i, buffer);
    }

    /// `gelu_tanh(gate) * up` as one node, for a GELU that only this product reads (see
    /// `reuse::folded`): Gemma's MLP, one node and one pass over memory fewer per layer, and
    /// the same f32 arithmetic as the two ops.
    pub(super) fn gated(&mut self, op: &Op, inputs: &[Array], lowered: &HashMap<*const Node, T>, deferred: &HashSet<*const Node>) -> OpResult<Option<T>> {
        let (Op::Multiply, [a, b]) = (op, inputs) else { return Ok(None) };
        let (gelu, other) = match (self.in_reader.contains(&Arc::as_ptr(&a.0)), self.in_reader.contains(&Arc::as_ptr(&b.0))) {
            (true, _) => (a, b),
            (false, true) => (b, a),
            (false, false) => return Ok(None),
        };
        let gate = match &*gelu.state() {
            State::Pending(Op::GeluTanh, gate) => gate[0].clone(),
            _ => return Err("the cpu backend lost a GELU it had left to its product".into()),
        };
        let mut tensor = |a: &Array| -> OpResult<T> {
            let key = Arc::as_ptr(&a.0);
            match lowered.get(&key) {
                Some(&t) => Ok(t),
                None if deferred.contains(&key) => self.transposed_leaf(a),
                None => self.leaf(a),
            }
        };
        let (gate, other) = (tensor(&gate)?, tensor(other)?);
        let (gate, other) = (self.act(gate)?, self.act(other)?);
        // SAFETY: both are contiguous f32 tensors of the product's shape (checked by the structure).
        Ok(Some(unsafe { g::ggml_map_custom2(self.ctx, gate, other, Some(gated_gelu_rows), -1, std::ptr::null_mut()) }))
    }

    /// GELU (tanh approximation) in f32, as one node on every thread: ggml's own GELU reads an f16 table,
    /// and composing it from ggml ops takes eight nodes, each a barrier for the thread pool.
    pub(super) unsafe fn gelu_tanh(&self, x: T) -> T {
        g::ggml_map_custom1(self.ctx, x, Some(gelu_rows), -1, std::ptr::null_mut())
    }

    /// MLX's rope over x [.., heads, seq, d]; ggml's rotates x [d, heads, seq, batch] by positions along seq.
    pub(super) unsafe fn rope(&mut self, x: T, p: Rope) -> T {
        let ctx = self.ctx;
        let seq = ne_of(x)[1];
        let positions = self.own_data(g::GGML_TYPE_I32, &[seq, 1, 1, 1]);
        write_positions(positions, p.offset);
        self.bindings.positions.push((self.current, positions));
        // ggml's rope reads its input through strides: the permutation is a view, not a copy.
        let heads_outer = g::ggml_permute(ctx, x, 0, 2, 1, 3);
        // ggml's rope modes: 0 rotates interleaved pairs, GGML_ROPE_TYPE_NEOX (2) the two halves.
        let mode = if p.traditional { 0 } else { 2 };
        let rotated = g::ggml_rope_ext(ctx, heads_outer, positions, std::ptr::null_mut(), p.dims, mode, 0, p.base, p.scale, 0.0, 1.0, 0.0, 0.0);
        g::ggml_permute(ctx, rotated, 0, 2, 1, 3)
    }

    /// softmax(q k^T scale + mask) v. The masks the shell builds go to ggml's fused attention (as f16:
    /// 0 and -inf are exact), which reads K and V as they are — no score matrix, no transposed copy of V —
    /// and broadcasts kv heads over query heads as grouped-query attention does. Keys and values lowered
    /// at a padded length have the rows past `inputs`' length masked out (ggml skips masked keys).
    pub(super) unsafe fn attention(&mut self, x: &[T], inputs: &[Array], scale: f32, mask: AttentionMask) -> OpResult<T> {
        let ctx = self.ctx;
        // f16 keys and values are read as stored (ggml's kernel takes them, as llama.cpp's caches are);
        // anything else as f32.
        let q = self.act(x[0])?;
        let mut stored = |t: T| if (*t).type_ == g::GGML_TYPE_F16 { Ok(self.cont(t)) } else { self.act(t) };
        let (mut k, mut v) = (stored(x[1])?, stored(x[2])?);
        let length = inputs[1].0.shape[2] as i64;
        if ne_of(k)[1] != ne_of(v)[1] || (mask == AttentionMask::Explicit && ne_of(k)[1] != length) {
            (k, v) = (self.first_rows(k, length), self.first_rows(v, length));
        }
        let (lq, lk) = (ne_of(q)[1], ne_of(k)[1]);
        let key = (mask, lq, length, lk);
        let mask = match mask {
            AttentionMask::None if lk == length => std::ptr::null_mut(),
            _ if self.masks.contains_key(&key) => self.masks[&key],
            AttentionMask::Explicit => {
                // An adapter's own mask may hold any values, which f16 would round: scores, a masked
                // softmax in f32, then the product with V (ggml's mul_mat broadcasts kv heads the same way).
                let m = self.act(x[3])?;
                let n = ne_of(m);
                let mask = self.cont(self.repeat(m, [lk, lq, n[2], n[3]]));
                let probabilities = g::ggml_soft_max_ext(ctx, g::ggml_mul_mat(ctx, k, q), mask, scale, 0.0);
                let v_t = g::ggml_cont(ctx, g::ggml_permute(ctx, v, 1, 0, 2, 3));
                return Ok(g::ggml_mul_mat(ctx, v_t, probabilities));
            }
            // (Built here once per graph, then shared through `masks` below.)
            _ => {
                let t = self.own_data(g::GGML_TYPE_F16, &[lk, lq, 1, 1]);
                write_mask(t, mask, lq, length);
                self.bindings.masks.push((self.current, t));
                t
            }
        };
        if !mask.is_null() {
            self.masks.entry(key).or_insert(mask);
        }
        let fused = g::ggml_flash_attn_ext(ctx, q, k, v, mask, scale, 0.0, 0.0);
        // ggml's result is [d, heads, queries, batch]; the contract's is [batch, heads, queries, d].
        Ok(g::ggml_permute(ctx, fused, 0, 2, 1, 3))
    }

    /// The first `rows` rows (ne[1]) of `t`, a view.
    unsafe fn first_rows(&self, t: T, rows: i64) -> T {
        let (n, nb) = (ne_of(t), (*t).nb);
        if n[1] == rows { t } else { g::ggml_view_4d(self.ctx, t, n[0], rows, n[2], n[3], nb[1], nb[2], nb[3], 0) }
    }
}

/// ggml calls these on each of `nth` threads; thread `ith` takes its share of the elements of a contiguous
/// f32 `a` (act() made it so) into `dst`, a new tensor of the same shape: GELU, and for the gated one
/// times `b`, contiguous f32 of the same shape.
unsafe extern "C" fn gelu_rows(dst: *mut g::ggml_tensor, a: *const g::ggml_tensor, ith: i32, nth: i32, _: *mut std::ffi::c_void) {
    // SAFETY: as documented above.
    unsafe { gelu_share(dst, a, None, ith, nth) }
}

unsafe extern "C" fn gated_gelu_rows(dst: *mut g::ggml_tensor, a: *const g::ggml_tensor, b: *const g::ggml_tensor, ith: i32, nth: i32, _: *mut std::ffi::c_void) {
    // SAFETY: as documented above.
    unsafe { gelu_share(dst, a, Some(b), ith, nth) }
}

/// Thread `ith` of `nth`'s run of `total` items in a custom op: consecutive, disjoint, covering all.
pub(super) fn thread_share(total: usize, ith: i32, nth: i32) -> std::ops::Range<usize> {
    let share = total.div_ceil(nth.max(1) as usize);
    let ith = ith.max(0) as usize;
    (ith * share).min(total)..((ith + 1) * share).min(total)
}

/// # Safety
/// `dst`, `a` and `up` hold ggml_nelements(a) contiguous f32 values; the threads' ranges are disjoint.
unsafe fn gelu_share(dst: *mut g::ggml_tensor, a: *const g::ggml_tensor, up: Option<*const g::ggml_tensor>, ith: i32, nth: i32) {
    // SAFETY: per the contract above.
    unsafe {
        let n = g::ggml_nelements(a) as usize;
        let std::ops::Range { start, end } = thread_share(n, ith, nth);
        let x = &std::slice::from_raw_parts((*a).data as *const f32, n)[start..end];
        let y = &mut std::slice::from_raw_parts_mut((*dst).data as *mut f32, n)[start..end];
        let up = up.map(|up| &std::slice::from_raw_parts((*up).data as *const f32, n)[start..end]);
        gelu_values(x, up, y);
    }
}

/// y = GELU(x), times `up` when given: with AVX2's 8 lanes where the CPU has them (the build targets any
/// x86-64, whose SSE2 has 4), which computes the same values.
fn gelu_values(x: &[f32], up: Option<&[f32]>, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, just checked.
        return unsafe { gelu_values_avx2(x, up, y) };
    }
    gelu_loop(x, up, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn gelu_values_avx2(x: &[f32], up: Option<&[f32]>, y: &mut [f32]) {
    gelu_loop(x, up, y)
}

#[inline(always)]
fn gelu_loop(x: &[f32], up: Option<&[f32]>, y: &mut [f32]) {
    let c = (2.0f32 / std::f32::consts::PI).sqrt();
    // 0.5 (1 + tanh u) is sigmoid(2u): one exp instead of tanh's expm1 and more (GELU was ~5 % of a
    // 512-token prefill with tanh). It stays finite at both ends: exp overflowing to infinity gives
    // -0, exp vanishing gives v.
    let gelu = |v: f32| v / (1.0 + exp(-2.0 * (c * (v + 0.044715 * v * v * v))));
    match up {
        Some(up) => {
            for ((out, &v), &u) in y.iter_mut().zip(x).zip(up) {
                *out = gelu(v) * u;
            }
        }
        None => {
            for (out, &v) in y.iter_mut().zip(x) {
                *out = gelu(v);
            }
        }
    }
}

/// Rope positions `offset`, `offset` + 1, ... into an i32 tensor the graph owns.
///
/// # Safety
/// `t` is an i32 tensor with ne[0] values of writable data, read by nothing during the call.
pub(super) unsafe fn write_positions(t: T, offset: i32) {
    let positions = std::slice::from_raw_parts_mut((*t).data as *mut i32, ne_of(t)[0] as usize);
    for (i, p) in positions.iter_mut().enumerate() {
        *p = offset.wrapping_add(i as i32);
    }
}

/// An attention mask the shell builds into an f16 tensor [keys, queries] the graph owns: 0 where query i
/// sees key j, -inf elsewhere, and -inf for keys at or past `length` (padding).
///
/// # Safety
/// `t` is an f16 tensor with ne[0] * ne[1] values of writable data, read by nothing during the call.
pub(super) unsafe fn write_mask(t: T, mask: AttentionMask, lq: i64, length: i64) {
    let lk = ne_of(t)[0];
    let values = std::slice::from_raw_parts_mut((*t).data as *mut u16, (lk * lq) as usize);
    let (zero, hidden) = (half::f16::ZERO.to_bits(), half::f16::NEG_INFINITY.to_bits());
    for i in 0..lq {
        for j in 0..lk {
            let sees = j < length
                && match mask {
                    AttentionMask::Causal => j <= length - lq + i,
                    AttentionMask::SlidingWindow { window, query_offset, key_offset } => {
                        let (query, key) = (query_offset + i, key_offset + j);
                        key <= query && query - window < key
                    }
                    AttentionMask::None | AttentionMask::Explicit => true,
                };
            values[(i * lk + j) as usize] = if sees { zero } else { hidden };
        }
    }
}

/// e^t in f32 without calls or branches, so that the GELU loop compiles to packed instructions (libm's
/// `expf` is a call per value: it was half of GELU's time). Cephes' `expf`: t = k ln 2 + r with
/// |r| <= ln 2 / 2 (ln 2 split in two for an exact product), a degree-6 polynomial for e^r (relative error
/// below 2e-7), times 2^k built in the exponent bits. Above 88 it is +inf and below -87.3 zero (e^t is
/// then beyond f32's normal range), and NaN stays NaN.
#[inline(always)]
fn exp(t: f32) -> f32 {
    let clamped = t.clamp(-87.3, 88.0);
    // Round to nearest by adding and subtracting 1.5 * 2^23 (|k| < 2^22: exact, and it vectorizes).
    let k = (clamped * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = clamped - k * 0.693_359_4 + k * 2.121_944_4e-4;
    let p = 1.987_569_2e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    // 2^k: k + 127 lands in the low bits of 1.5 * 2^23 + k + 127 (float-to-int conversion would not
    // vectorize: Rust's `as` saturates).
    let biased = (k + 127.0 + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    let e = (p * r * r + r + 1.0) * f32::from_bits(biased << 23);
    let e = if t > 88.0 { f32::INFINITY } else { e };
    let e = if t < -87.3 { 0.0 } else { e };
    if t.is_nan() { t } else { e }
}

#[cfg(test)]
mod tests {
    use super::super::runner::last_ops;
    use super::exp;
    use crate::host::tensor::cpu::CpuBackend;
    use crate::host::tensor::{Backend, DType};
    use llama_cpp_sys_2 as g;

    /// Rows cast from f32 into an f16 cache (a block-quantized model's) are converted by the append's own
    /// copy: the cache holds the cast's bits, and no cast is computed on its own.
    #[test]
    fn rows_cast_into_an_f16_cache_are_converted_by_the_append() {
        let cpu = CpuBackend;
        let rows = |n: i32, seed: f32| cpu.from_f32(&(0..n * 8).map(|i| (i as f32 * 0.37 + seed).sin() * 300.0).collect::<Vec<_>>(), &[1, 1, n, 8]).unwrap();
        let old = cpu.astype(&rows(4, 0.5), DType::F16).unwrap();
        cpu.eval(&[&old]).unwrap();
        let new = cpu.scale(&rows(1, 1.5), 1.001).unwrap();
        let joined = cpu.concatenate(&[&old, &cpu.astype(&new, DType::F16).unwrap()], 2).unwrap();
        drop(old);
        cpu.eval(&[&joined]).unwrap();
        let ops = last_ops();
        assert_eq!(ops.iter().filter(|&&op| op == g::GGML_OP_CPY).count(), 1, "one copy converts and places the new rows: {ops:?}");
        let cast = cpu.read_f32(&cpu.astype(&new, DType::F16).unwrap()).unwrap();
        assert_eq!(cpu.read_f32(&joined).unwrap()[32..], cast[..]);
    }

    /// `gelu(gate) * up` in one graph (one fused node) equals the GELU computed and read first, then
    /// multiplied: the same f32 arithmetic, bit for bit, whichever operand the GELU is.
    #[test]
    fn a_gelu_computed_inside_its_product_is_exact() {
        let cpu = CpuBackend;
        let values = |seed: f32| -> Vec<f32> { (0..3000).map(|i| (i as f32 * 0.013 + seed).sin() * 6.0).collect() };
        let gate = cpu.from_f32(&values(0.1), &[3, 1000]).unwrap();
        let up = cpu.from_f32(&values(0.7), &[3, 1000]).unwrap();
        // (Each GELU is a temporary of its own statement: nothing but the product holds it when evaluated.)
        let fused = cpu.multiply(&cpu.gelu_tanh(&gate).unwrap(), &up).unwrap();
        let swapped = cpu.multiply(&up, &cpu.gelu_tanh(&gate).unwrap()).unwrap();
        let (fused, swapped) = (cpu.read_f32(&fused).unwrap(), cpu.read_f32(&swapped).unwrap());
        let gelu = cpu.gelu_tanh(&gate).unwrap();
        cpu.eval(&[&gelu]).unwrap();
        let separate = cpu.read_f32(&cpu.multiply(&gelu, &up).unwrap()).unwrap();
        assert!(fused == separate && swapped == separate);
        assert!(separate.iter().any(|&v| v != 0.0));
        // A product of two GELUs computes one inside it and reads the other.
        let both = cpu.multiply(&cpu.gelu_tanh(&gate).unwrap(), &cpu.gelu_tanh(&up).unwrap()).unwrap();
        let both = cpu.read_f32(&both).unwrap();
        let up_gelu = cpu.gelu_tanh(&up).unwrap();
        cpu.eval(&[&up_gelu]).unwrap();
        assert!(both == cpu.read_f32(&cpu.multiply(&gelu, &up_gelu).unwrap()).unwrap());
    }

    /// The GELU ggml runs (with AVX2 on this machine) gives the portable loop's values bit for bit, the
    /// tails and non-finite values included.
    #[test]
    fn gelu_gives_the_same_bits_with_wider_vectors() {
        let mut x: Vec<f32> = (0..100_003).map(|i| (i as f32 - 50_000.0) / 997.0).collect();
        x.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, 0.0, -0.0, 1e-40]);
        let up: Vec<f32> = x.iter().map(|v| 1.5 - v * 0.25).collect();
        for up in [None, Some(&up[..])] {
            let (mut fast, mut portable) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            super::gelu_values(&x, up, &mut fast);
            super::gelu_loop(&x, up, &mut portable);
            assert!(fast.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn exp_matches_libm_within_a_few_ulp_and_saturates_like_it() {
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let t = -87.0 + 175.0 * i as f32 / 2e6;
            let want = (t as f64).exp();
            worst = worst.max(((exp(t) as f64) - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(-88.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }
}
