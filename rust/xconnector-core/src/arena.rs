//! Fixed-size slots in lazily allocated segments. The memory tier hands out slot ids under its
//! lock; the bytes of a slot are then read or written without it, which is sound because a slot is
//! either being written by the one store that allocated it, or is immutable while pinned.
//!
//! One contiguous region per segment (not one allocation per block) keeps the resident size equal
//! to the budget, reuses warm pages after eviction, and lets a GPU build register the segments as
//! pinned host memory.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use crate::error::{CoreError, Result};

/// Segments are at most this large, so a big budget costs nothing until it is used.
const SEGMENT_TARGET_BYTES: usize = 64 << 20;
const PAGE: usize = 4096;

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

    fn segment_layout(&self, seg: usize) -> Layout {
        let first = seg as u64 * self.slots_per_segment as u64;
        let n = (self.slots as u64 - first).min(self.slots_per_segment as u64);
        Layout::from_size_align(n as usize * self.slot_bytes, PAGE).expect("segment layout")
    }

    /// Makes sure the segment holding `slot` exists. Called by the tier, under its lock, before it
    /// hands the slot out, so two threads never race to allocate the same segment.
    /// A failed allocation is an error, never an abort: the host worker must survive it.
    pub fn ensure(&self, slot: SlotId) -> Result<()> {
        let seg = (slot / self.slots_per_segment) as usize;
        if !self.segments[seg].load(Ordering::Acquire).is_null() {
            return Ok(());
        }
        let layout = self.segment_layout(seg);
        // SAFETY: the layout has a non-zero size (at least one slot of slot_bytes > 0).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            return Err(CoreError::Cache(format!(
                "could not allocate {} MiB for the memory tier; lower max_cache_size or free host memory",
                layout.size() >> 20
            )));
        };
        self.segments[seg].store(ptr.as_ptr(), Ordering::Release);
        self.allocated_bytes.fetch_add(layout.size() as u64, Ordering::Relaxed);
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
                // SAFETY: allocated in `ensure` with exactly this layout and not freed before.
                unsafe { alloc::dealloc(ptr, self.segment_layout(seg)) };
            }
        }
    }
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
