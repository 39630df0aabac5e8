//! The engine: a namespace, a block geometry and the memory tier, driven by requests' token ids.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use crate::arena::SlotId;
use crate::error::{CoreError, Result};
use crate::faults::{self, FaultPoint};
use crate::hashing::{self, HashExtras};
use crate::memory_tier::MemoryTier;
use crate::namespace::Namespace;
use crate::stats::{add_elapsed, Counters, EngineStats};

/// What the engine is created with. `block_bytes` is the size of one block's payload (its KV for
/// all layers); every stored block has exactly this size.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub block_size: usize,
    pub block_bytes: usize,
    pub capacity_bytes: u64,
    pub namespace: Namespace,
}

/// What a store did with each full block of the request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreOutcome {
    pub stored: usize,
    pub existing: usize,
    pub rejected: usize,
}

pub struct Engine {
    cfg: EngineConfig,
    namespace_id: u64,
    tier: Arc<MemoryTier>,
    counters: Counters,
}

/// A block held in place: neither evicted nor overwritten until this is dropped.
pub struct PinnedBlock {
    tier: Arc<MemoryTier>,
    slot: SlotId,
}

impl PinnedBlock {
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: the slot stays pinned for the lifetime of `self`.
        unsafe { self.tier.pinned_ptr(self.slot) }
    }

    pub fn len(&self) -> usize {
        self.tier.block_bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: pinned for the lifetime of `self`, so immutable and valid for `len()` bytes.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len()) }
    }
}

impl Drop for PinnedBlock {
    fn drop(&mut self) {
        self.tier.unpin(&[self.slot]);
    }
}

impl Engine {
    pub fn new(mut cfg: EngineConfig) -> Result<Self> {
        if cfg.block_size == 0 || cfg.block_size > u32::MAX as usize {
            return Err(CoreError::config(format!(
                "block_size must be a positive number of tokens (got {}); vLLM uses 16 or 32",
                cfg.block_size
            )));
        }
        if cfg.block_bytes == 0 {
            return Err(CoreError::config(
                "block_bytes must be positive: it is the size of one block's KV payload for all layers",
            ));
        }
        if cfg.capacity_bytes < cfg.block_bytes as u64 {
            return Err(CoreError::config(format!(
                "capacity_bytes ({}) is smaller than one block ({} bytes); raise the cache size or use smaller blocks",
                cfg.capacity_bytes, cfg.block_bytes
            )));
        }
        cfg.namespace.block_size = cfg.block_size as u32;
        let tier = Arc::new(MemoryTier::new(cfg.block_bytes, cfg.capacity_bytes));
        let namespace_id = cfg.namespace.id();
        tracing::debug!(
            namespace = format_args!("{namespace_id:016x}"),
            block_size = cfg.block_size,
            block_bytes = cfg.block_bytes,
            capacity_blocks = tier.capacity_blocks(),
            "engine created"
        );
        Ok(Self { cfg, namespace_id, tier, counters: Counters::default() })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The usable budget: `capacity_bytes` rounded down to whole blocks.
    pub fn capacity_bytes(&self) -> u64 {
        self.tier.capacity_bytes()
    }

    pub fn namespace_id(&self) -> u64 {
        self.namespace_id
    }

    fn namespace_for(&self, extras: HashExtras<'_>) -> u64 {
        if extras.is_empty() {
            self.namespace_id
        } else {
            self.cfg.namespace.id_with(extras)
        }
    }

    /// Sequence hashes of the request's full blocks.
    pub fn hashes(&self, tokens: &[u32], extras: HashExtras<'_>) -> Vec<u64> {
        hashing::sequence_hashes(tokens, self.cfg.block_size, extras)
    }

    /// Number of leading tokens whose KV is cached (a multiple of the block size).
    pub fn lookup(&self, tokens: &[u32], extras: HashExtras<'_>) -> Result<usize> {
        faults::check(FaultPoint::Lookup)?;
        let t0 = Instant::now();
        let hashes = self.hashes(tokens, extras);
        let hit = self.tier.contiguous_ready(self.namespace_for(extras), &hashes) * self.cfg.block_size;
        let c = &self.counters;
        c.lookups.fetch_add(1, Relaxed);
        c.hit_tokens.fetch_add(hit as u64, Relaxed);
        c.miss_tokens.fetch_add((tokens.len() - hit) as u64, Relaxed);
        add_elapsed(&c.lookup_ns, t0.elapsed());
        Ok(hit)
    }

    /// Stores the KV of the request's full blocks. `payload` holds exactly those blocks back to back.
    pub fn store(&self, tokens: &[u32], payload: &[u8], extras: HashExtras<'_>) -> Result<StoreOutcome> {
        let bs = self.cfg.block_size;
        let bb = self.cfg.block_bytes;
        let blocks = tokens.len() / bs;
        if payload.len() != blocks * bb {
            return Err(CoreError::invalid(format!(
                "payload is {} bytes, but {} tokens make {blocks} full block(s) of {bb} bytes = {} bytes; \
                 pass exactly the KV of the full blocks (a trailing partial block of {} token(s) is not cached)",
                payload.len(),
                tokens.len(),
                blocks * bb,
                tokens.len() % bs
            )));
        }
        self.store_with(tokens, extras, |i, dst| dst.copy_from_slice(&payload[i * bb..(i + 1) * bb]))
    }

    /// Stores the request's full blocks, filling each newly reserved slot in place with
    /// `fill(block_index, slot_bytes)`: no staging copy, and no work for blocks already cached.
    /// `fill` cannot fail: validate what it reads before calling this.
    pub fn store_with(
        &self,
        tokens: &[u32],
        extras: HashExtras<'_>,
        mut fill: impl FnMut(usize, &mut [u8]),
    ) -> Result<StoreOutcome> {
        faults::check(FaultPoint::Store)?;
        let t0 = Instant::now();
        let bb = self.cfg.block_bytes;
        let hashes = self.hashes(tokens, extras);
        let res = self.tier.reserve(self.namespace_for(extras), &hashes)?;
        for &(i, slot) in &res.new_blocks {
            self.tier.fill_reserved(slot, |dst| fill(i, dst));
        }
        self.tier.publish(&res);
        let out = StoreOutcome { stored: res.new_blocks.len(), existing: res.existing, rejected: res.rejected };
        let c = &self.counters;
        c.stores.fetch_add(1, Relaxed);
        c.stored_blocks.fetch_add(out.stored as u64, Relaxed);
        c.store_existing_blocks.fetch_add(out.existing as u64, Relaxed);
        c.store_rejected_blocks.fetch_add(out.rejected as u64, Relaxed);
        c.stored_bytes.fetch_add((out.stored * bb) as u64, Relaxed);
        add_elapsed(&c.store_ns, t0.elapsed());
        if out.rejected > 0 {
            tracing::debug!(rejected = out.rejected, stored = out.stored, "store kept only a prefix");
        }
        Ok(out)
    }

    /// Copies the longest cached prefix (at most `out.len() / block_bytes` blocks) into `out`,
    /// blocks back to back from offset 0. Returns the number of tokens loaded.
    pub fn load(&self, tokens: &[u32], out: &mut [u8], extras: HashExtras<'_>) -> Result<usize> {
        let bb = self.cfg.block_bytes;
        self.load_with(tokens, extras, out.len() / bb, |i, src| out[i * bb..(i + 1) * bb].copy_from_slice(src))
    }

    /// Hands the longest cached prefix (at most `max_blocks` blocks) to `read(block_index, bytes)`,
    /// each block pinned while it is read. Returns the number of tokens loaded.
    pub fn load_with(
        &self,
        tokens: &[u32],
        extras: HashExtras<'_>,
        max_blocks: usize,
        mut read: impl FnMut(usize, &[u8]),
    ) -> Result<usize> {
        faults::check(FaultPoint::Load)?;
        let t0 = Instant::now();
        let bb = self.cfg.block_bytes;
        let hashes = self.hashes(tokens, extras);
        let slots = self.tier.pin_prefix(self.namespace_for(extras), &hashes, max_blocks);
        for (i, &slot) in slots.iter().enumerate() {
            self.tier.with_pinned(slot, |src| read(i, src));
        }
        self.tier.unpin(&slots);
        let c = &self.counters;
        c.loads.fetch_add(1, Relaxed);
        c.loaded_blocks.fetch_add(slots.len() as u64, Relaxed);
        c.loaded_bytes.fetch_add((slots.len() * bb) as u64, Relaxed);
        add_elapsed(&c.load_ns, t0.elapsed());
        Ok(slots.len() * self.cfg.block_size)
    }

    /// Pins the longest cached prefix (at most `max_blocks`) for zero-copy reads.
    pub fn pin_prefix(&self, tokens: &[u32], extras: HashExtras<'_>, max_blocks: usize) -> Result<Vec<PinnedBlock>> {
        faults::check(FaultPoint::Load)?;
        let hashes = self.hashes(tokens, extras);
        let slots = self.tier.pin_prefix(self.namespace_for(extras), &hashes, max_blocks);
        Ok(slots.into_iter().map(|slot| PinnedBlock { tier: Arc::clone(&self.tier), slot }).collect())
    }

    pub fn stats(&self) -> EngineStats {
        self.counters.snapshot(self.tier.stats())
    }

    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.tier.check_invariants()
    }
}
