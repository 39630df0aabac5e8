//! Fixed-size slots in lazily allocated segments. The memory tier hands out slot ids under its
//! lock; the bytes of a slot are then read or written without it, which is sound because a slot is
//! either being written by the one store that allocated it, or is immutable while pinned.
//!
//! One contiguous region per segment (not one allocation per block) keeps the resident size equal
//! to the budget, reuses warm pages after eviction, and lets a GPU build register the segments as
//! pinned host memory. Segments are anonymous mappings (zero pages until touched) advised to use
//! transparent huge pages: on 4 KiB pages, reads of large blocks ran at half of memcpy speed.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use crate::error::{CoreError, Result};

/// Segments are at most this large, so a big budget costs nothing until it is used.
const SEGMENT_TARGET_BYTES: usize = 64 << 20;

/// Slots start half a page into their mapping. Callers' buffers usually sit a few bytes past a
/// page boundary (numpy's are at +16): copying between addresses a few bytes apart modulo 4 KiB
/// stalls on 4K aliasing, and measured loads into numpy arrays ran at half of memcpy speed.
const SKEW: usize = 2048;

pub type SlotId = u32;

pub struct Arena {
    slot_bytes: usize,
    slots: u32,
    slots_per_segment: u32,
    segments: Box<[AtomicPtr<u8>]>,
    allocated_bytes: AtomicU64,
}

impl Arena {
    /// An arena of `slots` slots of `slot_bytes` each. Nothing is allocated yet.
    pub fn new(slot_bytes: usize, slots: u32) -> Self {
        assert!(slot_bytes > 0);
        let per = (SEGMENT_TARGET_BYTES / slot_bytes).clamp(1, u32::MAX as usize) as u32;
        let per = per.min(slots.max(1));
        let n_segments = slots.div_ceil(per) as usize;
        let segments = (0..n_segments).map(|_| AtomicPtr::new(std::ptr::null_mut())).collect();
        Self { slot_bytes, slots, slots_per_segment: per, segments, allocated_bytes: AtomicU64::new(0) }
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Bytes of memory actually reserved for segments so far (never more than the slots' total).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_bytes.load(Ordering::Relaxed)
    }

    fn segment_bytes(&self, seg: usize) -> usize {
        let first = seg as u64 * self.slots_per_segment as u64;
        let n = (self.slots as u64 - first).min(self.slots_per_segment as u64);
        n as usize * self.slot_bytes
    }

    /// Makes sure the segment holding `slot` exists. Called by the tier, under its lock, before it
    /// hands the slot out, so two threads never race to allocate the same segment.
    /// A failed allocation is an error, never an abort: the host worker must survive it.
    pub fn ensure(&self, slot: SlotId) -> Result<()> {
        let seg = (slot / self.slots_per_segment) as usize;
        if !self.segments[seg].load(Ordering::Acquire).is_null() {
            return Ok(());
        }
        let size = self.segment_bytes(seg);
        let ptr = map_segment(size + SKEW).ok_or_else(|| {
            CoreError::Cache(format!(
                "could not allocate {} MiB for the memory tier ({}); lower max_cache_size or free host memory",
                size.div_ceil(1 << 20),
                std::io::Error::last_os_error()
            ))
        })?;
        // SAFETY: the mapping is SKEW bytes longer than the segment.
        self.segments[seg].store(unsafe { ptr.add(SKEW) }, Ordering::Release);
        self.allocated_bytes.fetch_add(size as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Raw pointer to the first byte of `slot`. The slot's segment must have been `ensure`d.
    pub fn slot_ptr(&self, slot: SlotId) -> *mut u8 {
        let seg = (slot / self.slots_per_segment) as usize;
        let base = self.segments[seg].load(Ordering::Acquire);
        assert!(!base.is_null(), "slot {slot} used before its segment was allocated");
        let offset = (slot % self.slots_per_segment) as usize * self.slot_bytes;
        // SAFETY: offset + slot_bytes lies within the segment, whose layout holds every slot of it.
        unsafe { base.add(offset) }
    }

    /// Whether `[addr, addr + len)` touches any allocated segment: a caller's output buffer that
    /// does (a view of a cached block handed back as `out`) would overwrite cached KV.
    pub fn overlaps(&self, addr: usize, len: usize) -> bool {
        let end = addr.saturating_add(len.max(1));
        (0..self.segments.len()).any(|seg| {
            let base = self.segments[seg].load(Ordering::Acquire) as usize;
            base != 0 && addr < base + self.segment_bytes(seg) && base < end
        })
    }

    /// Copies `src` into `slot`.
    ///
    /// # Safety
    /// The caller must own the slot exclusively (it allocated it and has not yet published it).
    pub unsafe fn write(&self, slot: SlotId, src: &[u8]) {
        assert_eq!(src.len(), self.slot_bytes);
        // SAFETY: the slot is slot_bytes long and exclusively owned per this function's contract;
        // `src` is caller memory that cannot overlap an arena segment it does not know about.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.slot_ptr(slot), self.slot_bytes) };
    }

    /// Copies `slot` into `dst`.
    ///
    /// # Safety
    /// The slot must be pinned (or otherwise kept from reuse) for the duration of the copy.
    pub unsafe fn read(&self, slot: SlotId, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.slot_bytes);
        // SAFETY: the slot is pinned, so nobody writes it; both regions are slot_bytes long.
        unsafe { std::ptr::copy_nonoverlapping(self.slot_ptr(slot), dst.as_mut_ptr(), self.slot_bytes) };
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        for seg in 0..self.segments.len() {
            let ptr = *self.segments[seg].get_mut();
            if !ptr.is_null() {
                // SAFETY: mapped in `ensure` SKEW bytes earlier with this size, not unmapped before.
                unsafe { unmap_segment(ptr.sub(SKEW), self.segment_bytes(seg) + SKEW) };
            }
        }
    }
}

/// A zero-filled, page-aligned anonymous mapping of `size` bytes, or `None` if the OS refuses.
fn map_segment(size: usize) -> Option<*mut u8> {
    // SAFETY: an anonymous private mapping with no address hint has no preconditions.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return None;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: advising a range we just mapped; failure only means no huge pages.
    unsafe {
        libc::madvise(ptr, size, libc::MADV_HUGEPAGE);
    }
    Some(ptr.cast())
}

/// # Safety
/// `ptr` and `size` must be exactly those of one live `map_segment` result.
unsafe fn unmap_segment(ptr: *mut u8, size: usize) {
    // SAFETY: per this function's contract.
    unsafe { libc::munmap(ptr.cast(), size) };
}

// SAFETY: the arena only hands out raw pointers; the memory tier's pin/ownership protocol (see the
// module comment) is what makes concurrent access to them sound.
unsafe impl Send for Arena {}
// SAFETY: as above.
unsafe impl Sync for Arena {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_lazy_and_bounded() {
        let a = Arena::new(1 << 20, 200); // 200 MiB of slots, 64 per segment
        assert_eq!(a.allocated_bytes(), 0);
        a.ensure(0).unwrap();
        assert_eq!(a.allocated_bytes(), 64 << 20);
        a.ensure(199).unwrap();
        // The last segment holds only the 8 remaining slots.
        assert_eq!(a.allocated_bytes(), (64 + 8) << 20);
        for s in 0..200 {
            a.ensure(s).unwrap();
        }
        assert_eq!(a.allocated_bytes(), 200 << 20);
    }

    #[test]
    fn write_then_read_round_trips() {
        let a = Arena::new(100, 7);
        for s in 0..7 {
            a.ensure(s).unwrap();
            // SAFETY: single-threaded test owns every slot.
            unsafe { a.write(s, &[s as u8; 100]) };
        }
        for s in 0..7 {
            let mut out = [0u8; 100];
            // SAFETY: as above.
            unsafe { a.read(s, &mut out) };
            assert_eq!(out, [s as u8; 100]);
        }
    }
}
