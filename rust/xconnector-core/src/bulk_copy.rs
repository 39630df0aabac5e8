//! Copies for bulk KV transfers, with non-temporal (streaming) stores when a transfer is large.
//!
//! A transfer is many block-sized copies (KiBs to a few MiBs each). glibc's `memcpy` streams only
//! above a threshold tied to the last-level cache (192 MiB on the 2-core CI VM), so each of those
//! copies goes through the cache: every destination line is first read for ownership, then
//! written back, and the data evicts what the worker had cached. One 256 MiB `memcpy` of the same
//! bytes streams, which is why per-block copies measured 0.6x of it on one VM and 0.9x on another
//! (whose threshold differed). Streaming the blocks of a large transfer ourselves writes each line
//! once and leaves the cache alone: the copies then run at the speed of one big `memcpy`.
//!
//! Small transfers keep `memcpy`: their destination is likely read soon (a load into a KV cache the
//! next step attends over) and fits in cache.

/// Transfers at least this large stream: past a few MiB the destination would push most of a
/// core's L2 and a good share of L3 out anyway, and nobody reads it back before it is evicted.
pub const STREAM_FROM_BYTES: usize = 4 << 20;

/// How the copies of one transfer write their destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BulkCopy {
    stream: bool,
}

impl BulkCopy {
    /// The copy mode for a transfer of `total_bytes` in all.
    pub fn for_transfer(total_bytes: usize) -> Self {
        Self { stream: total_bytes >= STREAM_FROM_BYTES && streaming_available() }
    }

    /// Plain `memcpy`, whatever the size.
    pub fn cached() -> Self {
        Self { stream: false }
    }

    pub fn streams(self) -> bool {
        self.stream
    }

    /// Copies `src` into `dst` (same length); the bytes are visible to every thread on return.
    pub fn copy(self, dst: &mut [u8], src: &[u8]) {
        assert_eq!(dst.len(), src.len(), "bulk copy between slices of different lengths");
        // SAFETY: two distinct Rust slices of the same length cannot overlap.
        unsafe {
            self.copy_unfenced(src.as_ptr(), dst.as_mut_ptr(), src.len());
        }
        self.fence();
    }

    /// Copies `n` bytes from `src` to `dst` without the closing fence: for a caller that copies
    /// many small runs and calls [`fence`](Self::fence) once after the last.
    ///
    /// # Safety
    /// As `std::ptr::copy_nonoverlapping`: both ranges valid for `n` bytes and disjoint.
    pub unsafe fn copy_unfenced(self, src: *const u8, dst: *mut u8, n: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.stream {
            // SAFETY: per this function's contract; `stream` is set only where SSE2 exists, which
            // every x86-64 CPU has.
            unsafe { x86::stream_copy(src, dst, n) };
            return;
        }
        // SAFETY: per this function's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, n) };
    }

    /// Orders streamed stores before whatever follows (publishing a slot, handing a buffer back):
    /// non-temporal stores are weakly ordered, and another thread must never see a published
    /// block whose bytes are still in flight.
    pub fn fence(self) {
        #[cfg(target_arch = "x86_64")]
        if self.stream {
            // SAFETY: SFENCE has no preconditions; SSE is part of x86-64.
            unsafe { std::arch::x86_64::_mm_sfence() };
        }
    }
}

fn streaming_available() -> bool {
    cfg!(target_arch = "x86_64")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Destinations below this are copied plainly: aligning and fencing costs more than it saves.
    const SMALL: usize = 256;

    /// Streams `n` bytes from `src` to `dst`: a plain copy up to the first 32-byte aligned
    /// destination address, 32-byte streaming stores (AVX when the CPU has it, else two SSE2
    /// stores), and a plain copy of the tail.
    ///
    /// # Safety
    /// Both ranges valid for `n` bytes and disjoint.
    pub unsafe fn stream_copy(src: *const u8, dst: *mut u8, n: usize) {
        if n < SMALL {
            // SAFETY: per this function's contract.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, n) };
            return;
        }
        let head = dst.align_offset(32).min(n);
        // SAFETY: head <= n, so every range below stays within the caller's.
        unsafe {
            std::ptr::copy_nonoverlapping(src, dst, head);
            let body = (n - head) & !127;
            if std::is_x86_feature_detected!("avx") {
                stream_avx(src.add(head), dst.add(head), body);
            } else {
                stream_sse2(src.add(head), dst.add(head), body);
            }
            let done = head + body;
            std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), n - done);
        }
    }

    /// # Safety
    /// `dst` 32-byte aligned, `n` a multiple of 128, both ranges valid and disjoint, AVX present.
    #[target_feature(enable = "avx")]
    unsafe fn stream_avx(src: *const u8, dst: *mut u8, n: usize) {
        let mut i = 0;
        while i < n {
            // SAFETY: i + 128 <= n; unaligned loads, aligned streaming stores (dst + i is 32-aligned).
            unsafe {
                let s = src.add(i).cast::<__m256i>();
                let d = dst.add(i).cast::<__m256i>();
                let (a, b) = (_mm256_loadu_si256(s), _mm256_loadu_si256(s.add(1)));
                let (c, e) = (_mm256_loadu_si256(s.add(2)), _mm256_loadu_si256(s.add(3)));
                _mm256_stream_si256(d, a);
                _mm256_stream_si256(d.add(1), b);
                _mm256_stream_si256(d.add(2), c);
                _mm256_stream_si256(d.add(3), e);
            }
            i += 128;
        }
    }

    /// # Safety
    /// `dst` 16-byte aligned, `n` a multiple of 128, both ranges valid and disjoint.
    unsafe fn stream_sse2(src: *const u8, dst: *mut u8, n: usize) {
        let mut i = 0;
        while i < n {
            // SAFETY: as in `stream_avx`, 16 bytes at a time.
            unsafe {
                let s = src.add(i).cast::<__m128i>();
                let d = dst.add(i).cast::<__m128i>();
                for k in 0..8 {
                    _mm_stream_si128(d.add(k), _mm_loadu_si128(s.add(k)));
                }
            }
            i += 128;
        }
    }

    #[cfg(test)]
    pub fn stream_sse2_for_test(src: &[u8], dst: &mut [u8]) {
        assert!(dst.as_ptr().align_offset(16) == 0 && src.len().is_multiple_of(128) && src.len() == dst.len());
        // SAFETY: checked just above.
        unsafe {
            stream_sse2(src.as_ptr(), dst.as_mut_ptr(), src.len());
            _mm_sfence();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + i / 251) as u8).collect()
    }

    #[test]
    fn streamed_copies_equal_the_source_at_every_alignment_and_length() {
        let src = pattern(9000);
        let copy = BulkCopy::for_transfer(STREAM_FROM_BYTES);
        assert_eq!(copy.streams(), cfg!(target_arch = "x86_64"));
        for s_off in [0, 1, 7, 16, 33] {
            for d_off in [0, 1, 5, 31, 32, 63] {
                for n in [0, 1, 100, 255, 256, 257, 1000, 4096, 4099, 8191] {
                    let mut dst = vec![0xEEu8; n + d_off + 64];
                    copy.copy(&mut dst[d_off..d_off + n], &src[s_off..s_off + n]);
                    assert_eq!(&dst[d_off..d_off + n], &src[s_off..s_off + n], "s {s_off} d {d_off} n {n}");
                    // Nothing around the destination is touched.
                    assert!(dst[..d_off].iter().chain(&dst[d_off + n..]).all(|&b| b == 0xEE));
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_sse2_path_copies_the_same_bytes() {
        // Machines with AVX never take this path in `copy`; it must hold where AVX is missing.
        let src = pattern(128 * 40);
        let mut buf = vec![0u8; 128 * 40 + 16];
        let at = buf.as_ptr().align_offset(16);
        x86::stream_sse2_for_test(&src, &mut buf[at..at + src.len()]);
        assert_eq!(&buf[at..at + src.len()], &src[..]);
    }

    #[test]
    fn small_transfers_go_through_the_cache() {
        assert!(!BulkCopy::for_transfer(STREAM_FROM_BYTES - 1).streams());
        assert!(!BulkCopy::cached().streams());
    }
}
