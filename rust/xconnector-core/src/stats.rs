//! Engine counters: lock-free atomics bumped on every operation, read as one snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::disk_tier::DiskStats;
use crate::histogram::Histogram;
use crate::memory_tier::TierStats;
use crate::peer_events::EventStats;
use crate::redis_tier::RedisStats;

#[derive(Default)]
pub(crate) struct Counters {
    pub lookups: AtomicU64,
    pub hit_tokens: AtomicU64,
    pub miss_tokens: AtomicU64,
    pub lookup_ns: AtomicU64,
    pub stores: AtomicU64,
    pub stored_blocks: AtomicU64,
    pub store_existing_blocks: AtomicU64,
    pub store_rejected_blocks: AtomicU64,
    pub store_spilled_blocks: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub store_ns: AtomicU64,
    pub loads: AtomicU64,
    pub loaded_blocks: AtomicU64,
    pub loaded_bytes: AtomicU64,
    pub load_ns: AtomicU64,
    pub promoted_blocks: AtomicU64,
    pub write_behind_dropped: AtomicU64,
    /// 1 when the disk tier was configured but could not be used or trusted (it is off).
    pub disk_refused: AtomicU64,
    pub lookup_hist: Histogram,
    pub store_hist: Histogram,
    pub load_hist: Histogram,
}

pub(crate) fn add_elapsed(counter: &AtomicU64, d: Duration) {
    counter.fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
}

/// A point-in-time copy of every counter, plus the memory tier's occupancy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub lookups: u64,
    /// Tokens found cached by lookups (block-aligned).
    pub hit_tokens: u64,
    /// Tokens asked about by lookups but not cached (including a trailing partial block).
    pub miss_tokens: u64,
    pub lookup_ns: u64,
    pub stores: u64,
    /// Blocks newly written by stores.
    pub stored_blocks: u64,
    /// Blocks a store found already present.
    pub store_existing_blocks: u64,
    /// Blocks a store could not keep (budget full of pinned blocks, or a concurrent writer).
    pub store_rejected_blocks: u64,
    /// Blocks memory had no room for, stored straight to the tiers below.
    pub store_spilled_blocks: u64,
    pub stored_bytes: u64,
    pub store_ns: u64,
    pub loads: u64,
    pub loaded_blocks: u64,
    pub loaded_bytes: u64,
    pub load_ns: u64,
    /// Blocks copied up from a lower tier into memory by loads.
    pub promoted_blocks: u64,
    /// Blocks not written to a lower tier because its write-behind queue was full.
    pub write_behind_dropped: u64,
    /// 1 when the disk tier was configured but is off: its directory could not be used or trusted.
    pub disk_refused: u64,
    pub tier: TierStats,
    pub disk: Option<DiskStats>,
    pub redis: Option<RedisStats>,
    pub events: Option<EventStats>,
    pub block_events: Option<crate::block_journal::JournalStats>,
}

impl Counters {
    pub fn snapshot(
        &self,
        tier: TierStats,
        disk: Option<DiskStats>,
        redis: Option<RedisStats>,
        events: Option<EventStats>,
        block_events: Option<crate::block_journal::JournalStats>,
    ) -> EngineStats {
        EngineStats {
            lookups: self.lookups.load(Relaxed),
            hit_tokens: self.hit_tokens.load(Relaxed),
            miss_tokens: self.miss_tokens.load(Relaxed),
            lookup_ns: self.lookup_ns.load(Relaxed),
            stores: self.stores.load(Relaxed),
            stored_blocks: self.stored_blocks.load(Relaxed),
            store_existing_blocks: self.store_existing_blocks.load(Relaxed),
            store_rejected_blocks: self.store_rejected_blocks.load(Relaxed),
            store_spilled_blocks: self.store_spilled_blocks.load(Relaxed),
            stored_bytes: self.stored_bytes.load(Relaxed),
            store_ns: self.store_ns.load(Relaxed),
            loads: self.loads.load(Relaxed),
            loaded_blocks: self.loaded_blocks.load(Relaxed),
            loaded_bytes: self.loaded_bytes.load(Relaxed),
            load_ns: self.load_ns.load(Relaxed),
            promoted_blocks: self.promoted_blocks.load(Relaxed),
            write_behind_dropped: self.write_behind_dropped.load(Relaxed),
            disk_refused: self.disk_refused.load(Relaxed),
            tier,
            disk,
            redis,
            events,
            block_events,
        }
    }
}
