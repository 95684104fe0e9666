//! GGUF checkpoints (llama.cpp's single-file format): metadata, tensor directory, and the tensors of
//! types F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K — kept as blocks for the cpu
//! backend, or dequantized to f32 by ggml's own reference dequantizers.

use super::{Checkpoint, Loaded};
use crate::adapter::bindings::edgechat::adapter::weights::CheckpointFormat;
use crate::host::tensor::{ActiveBackend, Backend};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
/// Metadata arrays longer than this (vocabularies, merges) are not passed to adapters.
const MAX_ARRAY_IN_CONFIG: usize = 256;
/// Metadata strings longer than this are not passed to adapters either (chat templates are ~10 KiB).
const MAX_STRING_IN_CONFIG: usize = 1 << 20;
/// Arrays of arrays nest at most this deep (real files use one level); deeper is refused, not recursed.
const MAX_NESTING: usize = 4;
/// Largest dimension accepted (the tensor backend's shapes are i32).
const MAX_DIM: u64 = i32::MAX as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }
}

pub struct TensorEntry {
    /// ggml type id as stored (unsupported types are reported when the tensor is requested).
    type_id: u32,
    /// Row-major shape (GGUF lists dimensions innermost first; reversed here).
    shape: Vec<usize>,
    offset: usize,
}

impl TensorEntry {
    /// Where the tensor's bytes are: (start, length), in checked arithmetic and whole blocks.
    fn span(&self, ty: GgmlType, data_start: usize) -> Result<(usize, usize)> {
        let elements = self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).context("impossibly many elements")?;
        let (per_block, block_bytes) = ty.block();
        if elements % per_block != 0 {
            bail!("{elements} elements are not whole {ty:?} blocks");
        }
        let len = (elements / per_block).checked_mul(block_bytes).context("impossibly large")?;
        let start = data_start.checked_add(self.offset).context("offset overflows")?;
        Ok((start, len))
    }
}

pub struct GgufCheckpoint {
    path: PathBuf,
    /// Shared with the cpu backend, whose block-quantized arrays point into it.
    map: std::sync::Arc<Mmap>,
    metadata: Map<String, Value>,
    tensors: BTreeMap<String, TensorEntry>,
    data_start: usize,
}

/// A bounds-checked little-endian reader over the file.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).context("file ends inside the header (truncated?)")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    /// A count or byte length: each counted item takes at least a byte of what is left of the file.
    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        let left = self.bytes.len() - self.at;
        usize::try_from(n).ok().filter(|&n| n <= left).with_context(|| format!("a length of {n} runs past the end of the file (truncated?)"))
    }
    fn size(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n).with_context(|| format!("size {n} does not fit in memory"))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn value(&mut self, type_id: u32, depth: usize) -> Result<Value> {
        Ok(match type_id {
            0 => self.u8()?.into(),
            1 => (self.u8()? as i8).into(),
            2 => self.u16()?.into(),
            3 => (self.u16()? as i16).into(),
            4 => self.u32()?.into(),
            5 => (self.u32()? as i32).into(),
            6 => Value::from(f32::from_bits(self.u32()?) as f64),
            7 => (self.u8()? != 0).into(),
            8 => {
                let s = self.string()?;
                if s.len() > MAX_STRING_IN_CONFIG { Value::Null } else { s.into() }
            }
            9 => {
                if depth >= MAX_NESTING {
                    bail!("arrays nested more than {MAX_NESTING} deep");
                }
                let item_type = self.u32()?;
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(MAX_ARRAY_IN_CONFIG));
                for _ in 0..n {
                    let v = self.value(item_type, depth + 1)?;
                    if items.len() < MAX_ARRAY_IN_CONFIG {
                        items.push(v);
                    }
                }
                if n > MAX_ARRAY_IN_CONFIG {
                    Value::Null // left out of the config
                } else {
                    Value::Array(items)
                }
            }
            10 => self.u64()?.into(),
            11 => (self.u64()? as i64).into(),
            12 => Value::from(f64::from_bits(self.u64()?)),
            other => bail!("unknown metadata value type {other}"),
        })
    }
}

/// The bytes of the whole pages before `end` that lie inside a mapping of `len` bytes. A file's data
/// start is where its header says, which may lie past the end of the file (a header with no tensors and
/// a large alignment).
fn whole_pages_before(end: usize, len: usize, page: usize) -> usize {
    end.min(len) / page * page
}

impl GgufCheckpoint {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: read-only mapping of the user's model file, which edgechat does not modify while open.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let (metadata, tensors, data_start) = Self::parse(&map).with_context(|| format!("{} is not a valid GGUF file", path.display()))?;
        // The header (metadata with the tokenizer's vocabulary: 6.2 MB of Gemma 3's file) was read once,
        // just now; its pages are handed back, so what stays resident of the file is the weights.
        // SAFETY: sysconf only reads a system constant.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0).max(1);
        let header_pages = whole_pages_before(data_start, map.len(), page);
        if header_pages > 0 {
            // SAFETY: whole pages inside this read-only shared file mapping (madvise itself checks no
            // bounds: past the mapping it would drop a neighbour's pages): dropped pages are read from
            // the file again if touched.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, header_pages) };
        }
        Ok(GgufCheckpoint { path: path.to_owned(), map: std::sync::Arc::new(map), metadata, tensors, data_start })
    }

    /// Parses and checks the header and tensor directory (public for the fuzz tests). Never panics.
    pub fn parse(bytes: &[u8]) -> Result<(Map<String, Value>, BTreeMap<String, TensorEntry>, usize)> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4)? != MAGIC {
            bail!("no GGUF magic");
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} is not supported (2 and 3 are)");
        }
        let tensor_count = r.len()?;
        let kv_count = r.len()?;
        let mut metadata = Map::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let type_id = r.u32()?;
            let value = r.value(type_id, 0).with_context(|| format!("metadata {:?}", crate::text::printable(&key, 100)))?;
            if !value.is_null() {
                metadata.insert(key, value);
            }
        }
        let mut tensors = BTreeMap::new();
        for _ in 0..tensor_count {
            let name = r.string()?;
            let shown = crate::text::printable(&name, 100);
            let dims = r.u32()? as usize;
            if !(1..=4).contains(&dims) {
                bail!("tensor {shown} has {dims} dimensions");
            }
            let mut shape = Vec::with_capacity(dims);
            for _ in 0..dims {
                let d = r.u64()?;
                if d == 0 || d > MAX_DIM {
                    bail!("tensor {shown} has a dimension of {d}");
                }
                shape.push(d as usize);
            }
            shape.reverse();
            let type_id = r.u32()?;
            let offset = r.size()?;
            if tensors.insert(name.clone(), TensorEntry { type_id, shape, offset }).is_some() {
                bail!("tensor {shown} is listed twice");
            }
        }
        let alignment = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32);
        if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
            bail!("general.alignment {alignment} is not a power of two up to 1 MiB");
        }
        let data_start = r.at.div_ceil(alignment as usize) * alignment as usize;
        // Every tensor must lie inside the file, in whole blocks of its type, before anything is read.
        for (name, t) in &tensors {
            let shown = crate::text::printable(name, 100);
            let Some(ty) = GgmlType::from_id(t.type_id) else { continue }; // reported if requested
            let (start, len) = t.span(ty, data_start).with_context(|| format!("tensor {shown}"))?;
            if start.checked_add(len).is_none_or(|end| end > bytes.len()) {
                bail!("tensor {shown} lies outside the file (truncated?)");
            }
        }
        Ok((metadata, tensors, data_start))
    }

    pub fn architecture(&self) -> Option<&str> {
        self.metadata.get("general.architecture").and_then(Value::as_str)
    }

    pub fn metadata(&self) -> &Map<String, Value> {
        &self.metadata
    }

    /// A block-quantized tensor's bytes as stored, with its ggml type id and row-major shape; None for
    /// float tensors.
    fn blocks(&self, name: &str) -> Result<Option<(u32, std::ops::Range<usize>, Vec<usize>)>, String> {
        let file = self.path.display();
        let t = self.tensors.get(name).ok_or_else(|| format!("{file}: no tensor {name}"))?;
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| format!("{file}: tensor {name} has ggml type {} which edgechat cannot read", t.type_id))?;
        if ty.block().0 == 1 {
            return Ok(None);
        }
        let (start, len) = t.span(ty, self.data_start).map_err(|e| format!("{file}: tensor {name}: {e}"))?;
        if t.shape.last().is_none_or(|&row| row % ty.block().0 != 0) {
            return Err(format!("{file}: tensor {name}: rows of {:?} are not whole {ty:?} blocks", t.shape));
        }
        let range = start..start.saturating_add(len);
        if self.map.get(range.clone()).is_none() {
            return Err(format!("{file}: tensor {name} lies outside the file (truncated?)"));
        }
        Ok(Some((t.type_id, range, t.shape.clone())))
    }

    /// The tensor dequantized to f32, row-major.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), String> {
        let file = self.path.display();
        let t = self.tensors.get(name).ok_or_else(|| format!("{file}: no tensor {name}"))?;
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| format!("{file}: tensor {name} has ggml type {} which edgechat cannot read", t.type_id))?;
        let (start, len) = t.span(ty, self.data_start).map_err(|e| format!("{file}: tensor {name}: {e}"))?;
        let bytes = self
            .map
            .get(start..start.saturating_add(len))
            .ok_or_else(|| format!("{file}: tensor {name} lies outside the file (truncated?)"))?;
        Ok((crate::host::tensor::cpu::to_f32(t.type_id, bytes, len / ty.block().1 * ty.block().0), t.shape.clone()))
    }
}

impl Checkpoint for GgufCheckpoint {
    fn get_blocks(&self, backend: &ActiveBackend, name: &str) -> Result<Option<Loaded>, String> {
        let Some((type_id, range, shape)) = self.blocks(name)? else { return Ok(None) };
        let shape: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
        let array = backend.from_blocks(type_id, &self.map, range, &shape).map_err(|e| format!("{}: tensor {name}: {e}", self.path.display()))?;
        Ok(array.map(Loaded::Dense))
    }

    fn format(&self) -> CheckpointFormat {
        CheckpointFormat::Gguf
    }

    fn config(&self) -> String {
        Value::Object(self.metadata.clone()).to_string()
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn stored_bytes(&self) -> u64 {
        let spans = self.tensors.values().filter_map(|t| t.span(GgmlType::from_id(t.type_id)?, self.data_start).ok());
        spans.fold(0u64, |total, (_, len)| total.saturating_add(len as u64))
    }

    fn get(&self, backend: &ActiveBackend, name: &str) -> Result<Loaded, String> {
        let (values, shape) = self.dequantize(name)?;
        let shape: Vec<i32> = shape.iter().map(|&d| d as i32).collect(); // each <= MAX_DIM, checked at open
        let array = backend.from_f32(&values, &shape).map_err(|e| format!("{}: tensor {name}: {e}", self.path.display()))?;
        Ok(Loaded::Dense(array))
    }
}

#[cfg(test)]
mod tests {
    use super::whole_pages_before;

    #[test]
    fn the_header_pages_handed_back_stay_inside_the_mapping() {
        assert_eq!(whole_pages_before(10_000, 1 << 20, 4096), 8192);
        assert_eq!(whole_pages_before(4095, 1 << 20, 4096), 0);
        assert_eq!(whole_pages_before(1 << 20, 3 * 4096 + 100, 4096), 3 * 4096);
        assert_eq!(whole_pages_before(usize::MAX, 5000, 4096), 4096);
    }
}
