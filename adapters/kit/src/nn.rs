//! Building blocks for model graphs over the host's `tensor` interface: linear layers (dense or
//! MLX-quantized), embeddings usable as a tied output head, and caches that remember a bounded history
//! so a conversation can be resumed from a shared prefix.

use crate::ops::{self as tensor, Mask, Tensor};
use crate::wit::edgechat::adapter::tensor::{Array, Dtype, RopeParams, WindowMask};
use crate::wit::edgechat::adapter::weights;

pub use crate::ops::R;

/// A tensor as stored: dense, or MLX affine-quantized.
pub enum Entry {
    Dense(Tensor),
    Quantized(QuantizedEntry),
}

pub struct QuantizedEntry {
    pub weight: Tensor,
    pub scales: Tensor,
    pub biases: Tensor,
    pub group_size: u32,
    pub bits: u32,
}

/// A tensor the model cannot run without.
pub fn load(name: &str) -> R<Entry> {
    Ok(match weights::get(name)? {
        weights::Entry::Dense(a) => Entry::Dense(Tensor::from_array(a)),
        weights::Entry::Quantized(q) => Entry::Quantized(QuantizedEntry {
            weight: Tensor::from_array(q.weight),
            scales: Tensor::from_array(q.scales),
            biases: Tensor::from_array(q.biases),
            group_size: q.group_size,
            bits: q.bits,
        }),
    })
}

/// A dense tensor (dequantized if stored quantized), e.g. a norm weight.
pub fn load_dense(name: &str) -> R<Tensor> {
    match load(name)? {
        Entry::Dense(a) => Ok(a),
        Entry::Quantized(q) => tensor::dequantize(&q.weight, &q.scales, &q.biases, q.group_size, q.bits),
    }
}

/// y = x W^T (+ b).
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// Whether the shell keeps W in one of ggml's block formats (GGUF Q4_0 .. Q6_K) and multiplies blocks.
    in_blocks: bool,
}

enum LinearWeight {
    /// Holds W^T (a lazy transposed view: no copy).
    Dense(Tensor),
    Quantized(QuantizedEntry),
}

impl Linear {
    pub fn load(name: &str) -> R<Self> {
        let (weight, in_blocks) = match load(name)? {
            Entry::Dense(w) => (LinearWeight::Dense(tensor::transpose(&w, &[1, 0])?), is_block_format(w.dtype()?)),
            Entry::Quantized(q) => (LinearWeight::Quantized(q), false),
        };
        Ok(Linear { weight, bias: None, in_blocks })
    }

    /// The dtype a cache should keep what this projection computes in (see [`KvCache::new`]): f16 when
    /// the weight is in ggml blocks, None (as computed) otherwise.
    pub fn cache_dtype(&self) -> Option<Dtype> {
        self.in_blocks.then_some(Dtype::Float16)
    }

    /// A linear layer with a bias vector stored under `bias`.
    pub fn load_biased(name: &str, bias: &str) -> R<Self> {
        Ok(Linear { bias: Some(load_dense(bias)?), ..Linear::load(name)? })
    }

    pub fn forward(&self, x: &Tensor) -> R<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(wt) => tensor::matmul(x, wt)?,
            LinearWeight::Quantized(q) => tensor::quantized_matmul(x, &q.weight, &q.scales, &q.biases, true, q.group_size, q.bits)?,
        };
        match &self.bias {
            Some(b) => tensor::add(&y, b),
            None => Ok(y),
        }
    }
}

fn is_block_format(dtype: Dtype) -> bool {
    use Dtype::*;
    matches!(dtype, Q40 | Q41 | Q50 | Q51 | Q80 | Q4K | Q5K | Q6K)
}

/// Token embeddings [vocab, hidden], also usable as the output head when tied.
pub enum Embedding {
    Dense(Tensor),
    Quantized(QuantizedEntry),
}

impl Embedding {
    pub fn load(name: &str) -> R<Self> {
        Ok(match load(name)? {
            Entry::Dense(w) => Embedding::Dense(w),
            Entry::Quantized(q) => Embedding::Quantized(q),
        })
    }

    /// Vocabulary size.
    pub fn rows(&self) -> R<u32> {
        let shape = match self {
            Embedding::Dense(table) => table.shape()?,
            Embedding::Quantized(q) => q.weight.shape()?,
        };
        shape.first().copied().ok_or_else(|| "the embedding table has no rows".into())
    }

    /// ids [batch, seq] (int32) -> [batch, seq, hidden].
    pub fn lookup(&self, ids: &Tensor) -> R<Tensor> {
        match self {
            Embedding::Dense(table) => tensor::take(table, ids, 0),
            Embedding::Quantized(q) => {
                let rows = |a: &Tensor| tensor::take(a, ids, 0);
                tensor::dequantize(&rows(&q.weight)?, &rows(&q.scales)?, &rows(&q.biases)?, q.group_size, q.bits)
            }
        }
    }

    /// x [.., hidden] -> logits [.., vocab].
    pub fn as_linear(&self, x: &Tensor) -> R<Tensor> {
        match self {
            Embedding::Dense(table) => tensor::matmul(x, &tensor::transpose(table, &[1, 0])?),
            Embedding::Quantized(q) => tensor::quantized_matmul(x, &q.weight, &q.scales, &q.biases, true, q.group_size, q.bits),
        }
    }
}

/// How many positions beyond what attention or convolution needs a bounded cache keeps, so that a
/// conversation can still be resumed after trimming this many tokens.
pub const TRIM_SLACK: u32 = 256;

/// How far a bounded history may run past what it keeps before it is cut back (see [`History::compact`]).
pub const COMPACT_STEP: u32 = 64;

/// The recent history of one per-position tensor (keys, values, conv inputs) along `axis`.
/// It covers positions `start..end`; with `keep = Some(n)` only the last n are retained.
pub struct History {
    data: Option<Tensor>,
    axis: u32,
    start: u32,
    end: u32,
    keep: Option<u32>,
    /// Positions the next step needs before `end` (window - 1 for sliding attention, kernel - 1 for conv).
    needs: u32,
}

impl History {
    pub fn unbounded(axis: u32) -> Self {
        History { data: None, axis, start: 0, end: 0, keep: None, needs: 0 }
    }

    /// Keeps `needs` positions plus [`TRIM_SLACK`].
    pub fn bounded(axis: u32, needs: u32) -> Self {
        History { data: None, axis, start: 0, end: 0, keep: Some(needs + TRIM_SLACK), needs }
    }

    pub fn start(&self) -> u32 {
        self.start
    }

    pub fn end(&self) -> u32 {
        self.end
    }

    pub fn data(&self) -> Option<&Tensor> {
        self.data.as_ref()
    }

    /// Appends `new` (covering `count` positions). The whole history, new part included, is then
    /// `data()` until [`History::compact`] drops what is no longer needed.
    pub fn append(&mut self, new: Tensor, count: u32) -> R<()> {
        self.data = Some(match self.data.take() {
            Some(old) => tensor::concatenate(&[&old, &new], self.axis as i32)?,
            None => new,
        });
        self.end += count;
        Ok(())
    }

    /// Whether appending `count` positions would make [`History::compact`] drop some.
    pub fn compacts_after(&self, count: u32) -> bool {
        self.keep.is_some_and(|keep| self.end + count - self.start > keep + COMPACT_STEP)
    }

    /// What [`History::append`] and a [`History::compact`] that drops nothing leave, from a replayed
    /// step: the data is `data`, the whole history, `count` positions longer. The tensor stays the same.
    pub fn advance(&mut self, data: Array, count: u32) -> R<()> {
        self.data.as_ref().ok_or("an empty history cannot advance")?.refill(data)?;
        self.end += count;
        Ok(())
    }

    /// Drops positions beyond what a bounded history keeps, [`COMPACT_STEP`] at a time: a compacted
    /// history is a slice, which the next append must copy whole, where a history appended to as it
    /// is grows in place. (Compacting every token copied each sliding layer's ~770 kept positions per
    /// token: decode past Gemma 3's window ran 18 % slower.)
    pub fn compact(&mut self) -> R<()> {
        let held = self.end - self.start;
        if let (Some(keep), Some(data)) = (self.keep, &self.data) {
            if held > keep + COMPACT_STEP {
                let dropped = held - keep;
                self.data = Some(slice_axis(data, self.axis, dropped, held)?);
                self.start += dropped;
            }
        }
        Ok(())
    }

    /// Forgets everything from position `length` on.
    pub fn trim(&mut self, length: u32) -> R<()> {
        if length >= self.end {
            return Ok(());
        }
        if length == 0 {
            *self = History { data: None, start: 0, end: 0, ..*self };
            return Ok(());
        }
        if self.start > length.saturating_sub(self.needs) {
            return Err(format!(
                "cannot resume at token {length}: only tokens {}..{} are still cached",
                self.start, self.end
            ));
        }
        let data = self.data.as_ref().ok_or("empty cache")?;
        self.data = Some(slice_axis(data, self.axis, 0, length - self.start)?);
        self.end = length;
        Ok(())
    }
}

/// a[.., from..to, ..] along `axis` (slices clamp to the shape, so no shape query is needed: the
/// axes before `axis` are taken whole, and so are those after it, being left out).
pub fn slice_axis(a: &Tensor, axis: u32, from: u32, to: u32) -> R<Tensor> {
    let mut start = vec![0; axis as usize + 1];
    let mut stop = vec![i32::MAX; axis as usize + 1];
    start[axis as usize] = from as i32;
    stop[axis as usize] = to as i32;
    tensor::slice(a, &start, &stop)
}

/// Keys and values of one attention layer, [batch, kv_heads, positions, head_dim].
pub struct KvCache {
    pub keys: History,
    pub values: History,
    /// Sliding-window size, if the layer attends locally.
    pub window: Option<u32>,
    /// What keys and values are stored as; None keeps them as computed.
    stored: Option<Dtype>,
}

impl KvCache {
    /// `stored`: f16 for a model whose weights are ggml blocks (from [`Linear::cache_dtype`]), as
    /// llama.cpp stores its caches. Decode attention reads the whole cache every token: at 512-768
    /// positions it was ~7 % of a Gemma 3 step over f32 caches, and f16 halves the bytes. Agreement with
    /// f32 moves by 0.1-0.2 points (docs/benchmarks.md). Dense checkpoints keep their compute dtype, so
    /// f32 runs stay exact.
    pub fn new(window: Option<u32>, stored: Option<Dtype>) -> Self {
        let history = || match window {
            Some(w) => History::bounded(2, w - 1),
            None => History::unbounded(2),
        };
        KvCache { keys: history(), values: history(), window, stored }
    }

    pub fn offset(&self) -> u32 {
        self.keys.end()
    }

    pub fn trim(&mut self, length: u32) -> R<()> {
        self.keys.trim(length)?;
        self.values.trim(length)
    }

    /// Attention of `q` [1, h, t, d] (already rotated) over the cached keys plus `k`, `v` (the new ones:
    /// `t` positions, which the caller knows; asking the host would be one more call per layer and token).
    pub fn attend(&mut self, q: &Tensor, k: Tensor, v: Tensor, t: u32, scale: f32) -> R<Tensor> {
        let first = self.offset();
        let (k, v) = match self.stored {
            Some(dtype) => (tensor::astype(&k, dtype)?, tensor::astype(&v, dtype)?),
            None => (k, v),
        };
        self.keys.append(k, t)?;
        self.values.append(v, t)?;
        let (keys, values) = (self.keys.data().ok_or("no keys")?, self.values.data().ok_or("no values")?);
        let key_start = self.keys.start();
        let mask = match self.window {
            // Sliding layers keep more than the window (for resuming); the shell masks the excess.
            Some(window) => Mask::SlidingWindow(WindowMask { window, query_offset: first, key_offset: key_start }),
            // Causal masking aligned to the last key is exact for full attention.
            None if t > 1 => Mask::Causal,
            None => Mask::None,
        };
        let out = tensor::attention(q, keys, values, scale, mask)?;
        self.keys.compact()?;
        self.values.compact()?;
        Ok(out)
    }
}

/// Rotary embedding of x [b, h, t, d] starting at `offset`, rotating halves (Gemma, LFM2).
pub fn rope(x: &Tensor, dims: u32, base: f32, scale: f32, offset: u32) -> R<Tensor> {
    tensor::rope(x, RopeParams { dims, traditional: false, base, scale, offset })
}

/// [1, t, heads * d] -> [1, heads, t, d]. The kit's models run one sequence, so the batch is 1 and the
/// host infers t: no shape query (one host call per use, three per layer and token).
pub fn split_heads(x: &Tensor, heads: u32, head_dim: u32) -> R<Tensor> {
    let x = tensor::reshape(x, &[1, -1, heads as i32, head_dim as i32])?;
    tensor::transpose(&x, &[0, 2, 1, 3])
}

/// [1, heads, t, d] -> [1, t, heads * d].
pub fn merge_heads(x: &Tensor, heads: u32, head_dim: u32) -> R<Tensor> {
    let x = tensor::transpose(x, &[0, 2, 1, 3])?;
    tensor::reshape(&x, &[1, -1, (heads * head_dim) as i32])
}

/// Token ids as an int32 [1, t] array.
pub fn token_ids(tokens: &[u32]) -> R<Tensor> {
    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    Tensor::from_i32(&ids, &[1, tokens.len() as u32])
}

/// Hidden states [1, t, hidden] -> those of the last position only [1, 1, hidden].
pub fn last_position(h: &Tensor, t: u32) -> R<Tensor> {
    tensor::slice(h, &[0, t as i32 - 1], &[1, t as i32])
}

/// Logits [1, t, vocab] as the f32 [t, vocab] tensor `forward` returns to the shell.
pub fn finish_logits(logits: &Tensor, t: u32) -> R<Tensor> {
    let logits = tensor::astype(logits, Dtype::Float32)?;
    tensor::reshape(&logits, &[t as i32, -1])
}

/// Reads a config value: the first of `keys` present (dotted paths into nested objects).
pub fn config_value<'a>(config: &'a serde_json::Value, keys: &[&str]) -> Option<&'a serde_json::Value> {
    keys.iter().find_map(|key| key.split('.').try_fold(config, |v, part| v.get(part)).filter(|v| !v.is_null()))
}

/// Refuses a config that sets a flag the graph does not implement: each `(key, accepted)` names a config
/// key and the values the graph handles (an absent or null key is always accepted).
pub fn refuse_unimplemented(config: &serde_json::Value, flags: &[(&str, fn(&serde_json::Value) -> bool)]) -> R<()> {
    for (key, accepted) in flags {
        if let Some(value) = config_value(config, &[key]) {
            if !accepted(value) {
                return Err(format!("config sets {key} = {value}, which this adapter does not implement"));
            }
        }
    }
    Ok(())
}

pub fn config_u32(config: &serde_json::Value, keys: &[&str]) -> R<u32> {
    config_value(config, keys).and_then(|v| v.as_u64()).map(|v| v as u32).ok_or_else(|| format!("config has no {}", keys[0]))
}

pub fn config_f32(config: &serde_json::Value, keys: &[&str]) -> Option<f32> {
    config_value(config, keys).and_then(|v| v.as_f64()).map(|v| v as f32)
}
