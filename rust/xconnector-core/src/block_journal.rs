//! What each local tier gained and lost, block by block, for a host that reports it: vLLM's KV
//! events (`BlockStored` / `BlockRemoved`), which Dynamo relays to its KV router, so the router
//! knows which worker holds a prefix in host memory or on disk.
//!
//! Off unless the host asks ([`crate::Engine::enable_block_events`]): nothing is recorded for a
//! host that never drains it. Bounded: past `capacity` blocks waiting, changes are dropped and
//! counted, never waited for. A dropped change only makes the router's view staler (a hit it does
//! not know of, or one it believes in and misses): it never changes what a load returns.
//!
//! Blocks are named by their sequence hash (the engine's key), which is what a host reports as
//! the block's id; a `Stored` change carries the block's tokens and LoRA name so the receiver can
//! compute its own hash of them. Only blocks this process wrote or promoted are reported: blocks
//! found on disk from an earlier run have no tokens to report, and their removal is not reported
//! either. The shared Redis tier is never reported: every worker reads it alike, so it is no
//! reason to route a request to one of them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::hashing::HashExtras;

/// Where a reported block is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Medium {
    /// The memory tier (host memory).
    Memory,
    /// The local disk tier.
    Disk,
}

impl Medium {
    pub fn as_str(self) -> &'static str {
        match self {
            Medium::Memory => "memory",
            Medium::Disk => "disk",
        }
    }
}

/// One change to a tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockChange {
    /// Consecutive blocks of one request, `hashes[0]` right after `parent` (None: the first
    /// block of a request), holding `tokens` (`hashes.len()` whole blocks).
    Stored {
        medium: Medium,
        parent: Option<u64>,
        hashes: Vec<u64>,
        tokens: Vec<u32>,
        lora_name: Option<String>,
        cache_salt: Option<String>,
    },
    Removed {
        medium: Medium,
        hashes: Vec<u64>,
    },
}

impl BlockChange {
    /// The consecutive blocks `range` of a request, as stored in `medium`.
    pub fn stored(
        medium: Medium,
        hashes: &[u64],
        tokens: &[u32],
        block_size: usize,
        range: std::ops::Range<usize>,
        extras: HashExtras<'_>,
    ) -> Self {
        let own = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
        BlockChange::Stored {
            medium,
            parent: range.start.checked_sub(1).map(|p| hashes[p]),
            hashes: hashes[range.clone()].to_vec(),
            tokens: tokens[range.start * block_size..range.end * block_size].to_vec(),
            lora_name: own(extras.lora_name),
            cache_salt: own(extras.cache_salt),
        }
    }

    pub fn blocks(&self) -> usize {
        match self {
            BlockChange::Stored { hashes, .. } | BlockChange::Removed { hashes, .. } => hashes.len(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Blocks handed to the host (stored and removed).
    pub reported_blocks: u64,
    /// Blocks whose change was dropped because `capacity` blocks were already waiting.
    pub dropped_blocks: u64,
}

pub struct BlockJournal {
    capacity: usize,
    waiting: Mutex<(VecDeque<BlockChange>, usize)>,
    reported: AtomicU64,
    dropped: AtomicU64,
}

impl BlockJournal {
    /// A journal that holds at most `capacity` blocks' changes between two [`Self::take`]s.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            waiting: Mutex::new((VecDeque::new(), 0)),
            reported: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Records a change. A store is dropped (counted) when the journal is full; a removal never
    /// is: it names blocks the host was told of (so removals are bounded by what the tiers
    /// held), and a lost one would leave the receiver believing in a block forever.
    pub fn push(&self, change: BlockChange) {
        let n = change.blocks();
        if n == 0 {
            return;
        }
        let mut waiting = self.waiting.lock();
        let is_store = matches!(change, BlockChange::Stored { .. });
        if is_store && waiting.1 + n > self.capacity {
            drop(waiting);
            if self.dropped.fetch_add(n as u64, Relaxed) == 0 {
                tracing::warn!(
                    capacity = self.capacity,
                    "block events are not being taken fast enough; dropping them (counted in \
                     block_events_dropped; logged once)"
                );
            }
            return;
        }
        waiting.1 += n;
        waiting.0.push_back(change);
    }

    /// Every change since the last call, in the order they happened.
    pub fn take(&self) -> Vec<BlockChange> {
        let mut waiting = self.waiting.lock();
        let (changes, blocks) = std::mem::take(&mut *waiting);
        drop(waiting);
        self.reported.fetch_add(blocks as u64, Relaxed);
        changes.into()
    }

    pub fn stats(&self) -> JournalStats {
        JournalStats { reported_blocks: self.reported.load(Relaxed), dropped_blocks: self.dropped.load(Relaxed) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removed(hashes: &[u64]) -> BlockChange {
        BlockChange::Removed { medium: Medium::Memory, hashes: hashes.to_vec() }
    }

    #[test]
    fn changes_come_out_in_order_once() {
        let j = BlockJournal::new(8);
        j.push(removed(&[1]));
        j.push(removed(&[2, 3]));
        assert_eq!(j.take(), vec![removed(&[1]), removed(&[2, 3])]);
        assert_eq!(j.take(), vec![]);
        assert_eq!(j.stats(), JournalStats { reported_blocks: 3, dropped_blocks: 0 });
    }

    fn stored(hashes: &[u64]) -> BlockChange {
        let tokens: Vec<u32> = (0..hashes.len() as u32).collect();
        BlockChange::stored(Medium::Memory, hashes, &tokens, 1, 0..hashes.len(), HashExtras::default())
    }

    #[test]
    fn a_full_journal_drops_stores_counted_but_never_a_removal() {
        let j = BlockJournal::new(3);
        j.push(stored(&[1, 2]));
        j.push(stored(&[3, 4])); // 4 > 3: dropped whole
        j.push(removed(&[9, 8])); // 4 > 3, but a removal: kept
        j.push(stored(&[5])); // 5 > 3: dropped
        assert_eq!(j.take(), vec![stored(&[1, 2]), removed(&[9, 8])]);
        j.push(stored(&[6, 7, 8]));
        assert_eq!(j.take(), vec![stored(&[6, 7, 8])]);
        assert_eq!(j.stats(), JournalStats { reported_blocks: 7, dropped_blocks: 3 });
    }

    #[test]
    fn stored_names_its_parent_and_carries_exactly_its_blocks_tokens() {
        let tokens: Vec<u32> = (0..8).collect();
        let extras = HashExtras { lora_name: Some("a"), cache_salt: Some(""), lora_id: None };
        let c = BlockChange::stored(Medium::Disk, &[10, 11, 12, 13], &tokens, 2, 1..3, extras);
        assert_eq!(
            c,
            BlockChange::Stored {
                medium: Medium::Disk,
                parent: Some(10),
                hashes: vec![11, 12],
                tokens: vec![2, 3, 4, 5],
                lora_name: Some("a".into()),
                cache_salt: None,
            }
        );
        let first = BlockChange::stored(Medium::Memory, &[10, 11], &tokens[..4], 2, 0..1, HashExtras::default());
        assert!(matches!(first, BlockChange::Stored { parent: None, .. }));
    }
}
