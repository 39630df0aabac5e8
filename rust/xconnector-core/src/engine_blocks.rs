//! How a worker's KV blocks compose the engine's blocks, for a paged store or load. An engine
//! block is `per` consecutive KV blocks of a request (LMCache's `chunk_size` spans several vLLM
//! blocks): engine block `i` holds the request's KV blocks `i*per .. (i+1)*per`, their payloads
//! back to back, KV block `i*per + j` at bytes `j*kv_block_bytes ..`.
//!
//! Invariant: the engine's block size and bytes are exactly `per` times the KV block's; [`new`]
//! refuses anything else, so every method may rely on it.
//!
//! [`new`]: EngineBlocks::new

use std::ops::Range;

use crate::error::{CoreError, Result};

/// The geometry of engine blocks made of KV blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineBlocks {
    kv_block_size: usize,
    kv_block_bytes: usize,
    per: usize,
}

impl EngineBlocks {
    /// Engine blocks of `engine_block_size` tokens / `engine_block_bytes` bytes over KV blocks of
    /// `kv_block_size` tokens / `kv_block_bytes` bytes: a whole number `k >= 1` of them, in both.
    pub fn new(
        kv_block_size: usize,
        kv_block_bytes: usize,
        engine_block_size: usize,
        engine_block_bytes: usize,
    ) -> Result<Self> {
        let per = engine_block_size.checked_div(kv_block_size).unwrap_or(0);
        let whole = per > 0 && engine_block_size.is_multiple_of(kv_block_size);
        if !whole || per.checked_mul(kv_block_bytes) != Some(engine_block_bytes) {
            let (bs, bb) = (kv_block_size, kv_block_bytes);
            return Err(CoreError::invalid(format!(
                "the engine holds blocks of {engine_block_size} tokens / {engine_block_bytes} bytes, which is not a \
                 whole number of these KV blocks ({bs} tokens / {bb} bytes); create the engine with \
                 block_size=k*{bs} and block_bytes=k*{bb}"
            )));
        }
        Ok(Self { kv_block_size, kv_block_bytes, per })
    }

    /// KV blocks per engine block.
    pub fn per(&self) -> usize {
        self.per
    }

    pub fn engine_block_size(&self) -> usize {
        self.per * self.kv_block_size
    }

    pub fn engine_block_bytes(&self) -> usize {
        self.per * self.kv_block_bytes
    }

    /// Full engine blocks in `n_tokens` tokens: what a store stores.
    pub fn full_engine_blocks(&self, n_tokens: usize) -> usize {
        n_tokens / self.engine_block_size()
    }

    /// How many of the request's `n_ids` KV block ids a store of `n_tokens` tokens reads (its full
    /// engine blocks' worth); an error when fewer were given.
    pub fn store_kv_blocks(&self, n_tokens: usize, n_ids: usize) -> Result<usize> {
        let need = self.full_engine_blocks(n_tokens) * self.per;
        if n_ids < need {
            return Err(CoreError::invalid(format!(
                "{n_tokens} tokens make {need} full KV block(s) but only {n_ids} block id(s) were given"
            )));
        }
        Ok(need)
    }

    /// Engine blocks a load into `n_ids` KV blocks may fill.
    pub fn load_engine_blocks(&self, n_ids: usize) -> usize {
        n_ids / self.per
    }

    /// The KV blocks of engine block `i`, as (position in the request's block ids, bytes within
    /// the engine block), skipping positions before `first_block` (held on the device already).
    pub fn parts(&self, i: usize, first_block: usize) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
        let kbb = self.kv_block_bytes;
        (0..self.per)
            .filter(move |j| i * self.per + j >= first_block)
            .map(move |j| (i * self.per + j, j * kbb..(j + 1) * kbb))
    }

    /// Positions in the request's block ids that a load of `loaded_tokens` tokens writes, those
    /// before `first_block` skipped.
    pub fn loaded_kv_blocks(&self, loaded_tokens: usize, first_block: usize) -> Range<usize> {
        let n = loaded_tokens / self.kv_block_size;
        first_block.min(n)..n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_block_is_a_whole_number_of_kv_blocks() {
        let g = EngineBlocks::new(16, 100, 64, 400).unwrap();
        assert_eq!((g.per(), g.engine_block_size(), g.engine_block_bytes()), (4, 64, 400));
        assert_eq!(EngineBlocks::new(16, 100, 16, 100).unwrap().per(), 1);
        for (size, bytes) in [(40, 250), (64, 300), (8, 50), (0, 0)] {
            let err = EngineBlocks::new(16, 100, size, bytes).unwrap_err().to_string();
            assert!(err.contains("not a whole number of these KV blocks"), "{err}");
        }
        assert!(EngineBlocks::new(0, 100, 16, 100).is_err());
        // Bytes that only match after wrapping around are refused too.
        assert!(EngineBlocks::new(16, 1 << (usize::BITS - 1), 32, 0).is_err());
    }

    #[test]
    fn a_store_reads_the_full_engine_blocks_worth_of_ids() {
        let g = EngineBlocks::new(16, 100, 32, 200).unwrap();
        // 100 tokens: 3 full engine blocks = 6 KV blocks; a partial engine block is not stored.
        assert_eq!(g.full_engine_blocks(100), 3);
        assert_eq!(g.store_kv_blocks(100, 7).unwrap(), 6);
        assert_eq!(g.store_kv_blocks(100, 6).unwrap(), 6);
        let err = g.store_kv_blocks(100, 5).unwrap_err().to_string();
        assert_eq!(err, "100 tokens make 6 full KV block(s) but only 5 block id(s) were given");
        assert_eq!(g.store_kv_blocks(31, 0).unwrap(), 0);
    }

    #[test]
    fn kv_block_ids_map_in_order_and_loads_skip_blocks_held() {
        let g = EngineBlocks::new(16, 10, 48, 30).unwrap();
        let all: Vec<_> = g.parts(1, 0).collect();
        assert_eq!(all, vec![(3, 0..10), (4, 10..20), (5, 20..30)]);
        let from4: Vec<_> = g.parts(1, 4).collect();
        assert_eq!(from4, vec![(4, 10..20), (5, 20..30)]);
        assert_eq!(g.parts(0, 4).count(), 0);
        assert_eq!(g.load_engine_blocks(7), 2);
        assert_eq!(g.loaded_kv_blocks(96, 2), 2..6);
        assert_eq!(g.loaded_kv_blocks(96, 9), 6..6);
        assert_eq!(g.loaded_kv_blocks(0, 0), 0..0);
    }
}
