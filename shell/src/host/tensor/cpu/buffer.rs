//! Where the cpu backend's array bytes live: our own 64-byte aligned memory, memory that grows in place
//! (caches), or a range of a mapped checkpoint.

use super::packed::{packable, Packed};
use memmap2::Mmap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// Element bytes: our own, 64-byte aligned (ggml's alignment for its buffers), or a range of a mapped
/// checkpoint (block-quantized weights are computed from the file's pages, never copied).
pub(super) struct Buffer {
    storage: Storage,
    len: usize,
}

enum Storage {
    Owned(Vec<Chunk>),
    /// Bytes that grow in place (see [`Buffer::grow`]).
    Growing(memmap2::MmapMut),
    /// A range of a mapped checkpoint, and its repacked copy once a product has asked for one; whether
    /// a graph has read the range as stored since its pages were last handed back.
    Mapped { map: Arc<Mmap>, offset: usize, packed: OnceLock<Option<Packed>>, read_as_stored: AtomicBool },
}

/// Set when a buffer left the heap for a mapping of its own (see [`Buffer::grow`]): the heap memory it
/// held is handed back to the system after the evaluation (`lower::evaluate`). Caches start as a
/// prefill's results in the heap; without this their old copies stayed resident as holes in it.
static HEAP_HOLES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Notes that memory left the heap (see [`release_heap_holes`]).
pub(super) fn heap_hole_left() {
    HEAP_HOLES.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Returns the heap's free pages to the system if buffers left it since the last call.
pub(super) fn release_heap_holes() {
    if HEAP_HOLES.swap(false, std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: malloc_trim only releases free memory; it is thread-safe.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Owned memory of results dropped lately, for the next results of the same size ([`Buffer::for_result`]):
/// a decode step's logits (1 MB for Gemma 3, written whole by ggml every token) came from fresh zeroed
/// memory each step, and its memset or page faults cost ~0.15 ms a step. Few and bounded in size, so
/// what they hold stays small beside the weights.
static SPARE: std::sync::Mutex<Vec<Vec<Chunk>>> = std::sync::Mutex::new(Vec::new());
const SPARE_BUFFERS: usize = 2;
const SPARE_BYTES: std::ops::RangeInclusive<usize> = (64 << 10)..=(4 << 20);

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Chunk([u8; 64]);

impl Buffer {
    /// Zeroed memory from the allocator (fresh pages are not written twice).
    pub(super) fn zeroed(len: usize) -> Buffer {
        let chunks = len.div_ceil(64);
        let storage = if chunks == 0 {
            Vec::new()
        } else {
            let layout = std::alloc::Layout::array::<Chunk>(chunks).expect("a buffer within the byte cap");
            // SAFETY: a non-zero layout; all-zero bytes are a valid Chunk; the Vec takes ownership of
            // exactly this allocation with this layout.
            unsafe {
                let ptr = std::alloc::alloc_zeroed(layout).cast::<Chunk>();
                if ptr.is_null() {
                    std::alloc::handle_alloc_error(layout);
                }
                Vec::from_raw_parts(ptr, chunks, chunks)
            }
        };
        Buffer { storage: Storage::Owned(storage), len }
    }

    /// Memory for a result ggml writes whole: a spare of exactly this size if one was dropped (holding an
    /// earlier result's bytes, every one of them overwritten), else zeroed.
    pub(super) fn for_result(len: usize) -> Buffer {
        let chunks = len.div_ceil(64);
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        match spare.iter().position(|s| s.len() == chunks) {
            Some(i) => Buffer { storage: Storage::Owned(spare.swap_remove(i)), len },
            None => Buffer::zeroed(len),
        }
    }

    /// Zeroed bytes in an anonymous mapping of their own, for data that will likely grow (a cache joined
    /// from parts): its first growth remaps instead of moving it out of the heap.
    pub(super) fn growable(len: usize) -> Buffer {
        match memmap2::MmapMut::map_anon(len.max(1)) {
            Ok(map) => Buffer { storage: Storage::Growing(map), len },
            Err(_) => Buffer::zeroed(len),
        }
    }

    /// Extends the bytes to `len` (zeros after the old end), with at least `room` bytes of memory behind
    /// them (readable zeros past `len`, for a padded append); false for a mapped checkpoint. The first
    /// growth moves them into an anonymous mapping with room to double, later ones remap it (Linux moves
    /// the pages, copying nothing): a cache appended to every token neither copies its history nor leaves
    /// freed copies in the heap (they held ~40 MB after a 640-token run), and room not yet written costs
    /// no memory. The caller holds the only reference, so nothing points into the bytes as they move.
    pub(super) fn grow(&mut self, len: usize, room: usize) -> bool {
        let needed = room.max(len);
        if needed <= self.len {
            return true;
        }
        let target = needed.max(self.len.saturating_mul(2));
        match &mut self.storage {
            Storage::Mapped { .. } => return false,
            Storage::Growing(map) => {
                #[cfg(target_os = "linux")]
                if map.len() < needed {
                    // SAFETY: the mapping is ours alone (see above); remapping keeps its contents. On
                    // failure it is unchanged, and is copied below.
                    let _ = unsafe { map.remap(target, memmap2::RemapOptions::new().may_move(true)) };
                }
                if map.len() >= needed {
                    self.len = self.len.max(len);
                    return true;
                }
            }
            Storage::Owned(_) => {}
        }
        let Ok(mut fresh) = memmap2::MmapMut::map_anon(target) else { return false };
        fresh[..self.len].copy_from_slice(self.bytes());
        if let Storage::Owned(_) = std::mem::replace(&mut self.storage, Storage::Growing(fresh)) {
            heap_hole_left();
        }
        self.len = self.len.max(len);
        true
    }

    /// Drops the first `bytes` bytes, moving the rest to the front of the same memory (a cache cut back
    /// to what it keeps, see `lower/compact.rs`); false for a mapped checkpoint.
    pub(super) fn drop_front(&mut self, bytes: usize) -> bool {
        if bytes > self.len || matches!(self.storage, Storage::Mapped { .. }) {
            return false;
        }
        let len = self.len;
        self.bytes_mut().copy_within(bytes..len, 0);
        self.len = len - bytes;
        true
    }

    /// `len` bytes of a mapped file from `offset` (checked by the caller to lie within it).
    pub(super) fn mapped(map: Arc<Mmap>, offset: usize, len: usize) -> Buffer {
        Buffer { storage: Storage::Mapped { map, offset, packed: OnceLock::new(), read_as_stored: AtomicBool::new(false) }, len }
    }

    /// The bytes (a weight of ggml type `ty` and dims `ne`) repacked for ggml's AMX kernels, made on
    /// the first call (see `packed.rs`): only for a mapped checkpoint's weights, whose pages of the file
    /// are handed back as they are repacked. None where they cannot be.
    pub(super) fn packed(&self, ty: u32, ne: [i64; 4]) -> Option<&Packed> {
        let Storage::Mapped { map, offset, packed, .. } = &self.storage else { return None };
        if !packable(ty, ne) {
            return None;
        }
        let release = |range: std::ops::Range<usize>| release_pages(map, offset + range.start, range.len());
        let packed = packed.get_or_init(|| Packed::new(ty, ne, self.bytes(), release)).as_ref()?;
        packed.is(ty, ne).then_some(packed)
    }

    /// Whether a product has had these bytes repacked.
    #[cfg(test)]
    pub(super) fn is_repacked(&self) -> bool {
        matches!(&self.storage, Storage::Mapped { packed, .. } if packed.get().is_some_and(Option::is_some))
    }

    /// Notes that a graph reads these bytes as stored (a prompt's product with more than one row).
    pub(super) fn reading_as_stored(&self) {
        if let Storage::Mapped { read_as_stored, .. } = &self.storage {
            read_as_stored.store(true, Ordering::Relaxed);
        }
    }

    /// Hands back the pages of the file a repacked weight's readers as stored brought back, if any did
    /// since the last call (see [`Buffer::packed`]).
    pub(super) fn release_repacked_pages(&self) {
        if let Storage::Mapped { map, offset, packed, read_as_stored } = &self.storage {
            if packed.get().is_some_and(Option::is_some) && read_as_stored.swap(false, Ordering::Relaxed) {
                release_pages(map, *offset, self.len);
            }
        }
    }

    pub(super) fn from_bytes(bytes: &[u8]) -> Buffer {
        let mut b = Buffer::zeroed(bytes.len());
        b.bytes_mut().copy_from_slice(bytes);
        b
    }

    pub(super) fn bytes(&self) -> &[u8] {
        match &self.storage {
            // SAFETY: the chunks hold at least `len` initialized bytes; Chunk is plain bytes.
            Storage::Owned(chunks) => unsafe { std::slice::from_raw_parts(chunks.as_ptr().cast::<u8>(), self.len) },
            Storage::Growing(map) => &map[..self.len],
            Storage::Mapped { map, offset, .. } => &map[*offset..*offset + self.len],
        }
    }

    /// Only for buffers being filled (always owned).
    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.storage {
            // SAFETY: as above, and we hold the only reference.
            Storage::Owned(chunks) => unsafe { std::slice::from_raw_parts_mut(chunks.as_mut_ptr().cast::<u8>(), self.len) },
            Storage::Growing(map) => &mut map[..self.len],
            Storage::Mapped { .. } => unreachable!("mapped buffers are never written"),
        }
    }

    /// Where ggml reads the data. ggml only reads inputs (a mapped file is read-only besides).
    pub(super) fn ptr(&self) -> *mut std::ffi::c_void {
        self.bytes().as_ptr() as *mut std::ffi::c_void
    }
}

/// Drops `len` bytes from `offset` of a mapped file from this process's memory.
fn release_pages(map: &Mmap, offset: usize, len: usize) {
    // SAFETY: a read-only private mapping of a file we never write: pages dropped are read again from
    // the file if touched.
    let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Storage::Owned(chunks) = &mut self.storage {
            if SPARE_BYTES.contains(&(chunks.len() * 64)) {
                // The latest drops are the likeliest sizes next: the oldest spare makes room.
                let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
                if spare.len() == SPARE_BUFFERS {
                    spare.remove(0);
                }
                spare.push(std::mem::take(chunks));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Buffer;

    #[test]
    fn a_dropped_result_buffer_serves_the_next_result_of_its_size() {
        let len = (64 << 10) + 192; // a size no other test's results have
        // (Tests running beside this one may drop buffers in between: a few tries.)
        // A spare still holds the result it was (fresh memory would be zeros).
        let reused = (0..10).any(|_| {
            let mut first = Buffer::for_result(len);
            first.bytes_mut().fill(7);
            drop(first);
            Buffer::for_result(len).bytes().iter().all(|&b| b == 7)
        });
        assert!(reused, "the dropped buffer was not used again");
        assert_eq!(Buffer::for_result(len).bytes().len(), len);
    }
}
