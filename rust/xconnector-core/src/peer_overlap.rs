//! One worker's view of where KV lives (DESIGN section 7): the [`OverlapIndex`] of its peers'
//! announced blocks, combined with its own exact overlap, ranked in tokens.
//!
//! Invariants: this worker's own blocks never enter the index (its overlap comes from its engine,
//! which is exact, so announcements about itself are ignored and reported as not applied); a
//! ranking is in tokens (blocks x block size for peers), best first, ties by worker name, and
//! leaves out every worker holding nothing. `events_applied` counts the peer events that changed
//! the index (this worker's own are not counted).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{CoreError, Result};
use crate::overlap::OverlapIndex;
use crate::peer_events::{EventBatch, EventData, EventSubscriber};

pub struct PeerOverlap {
    me: String,
    index: OverlapIndex,
    applied: AtomicU64,
}

/// A thread feeding a [`PeerOverlap`] from an [`EventSubscriber`]; dropping it stops the thread
/// (within one poll, 200 ms) without waiting for it.
pub struct Follower {
    stop: Arc<AtomicBool>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl PeerOverlap {
    pub fn new(me: &str) -> Self {
        Self { me: me.to_owned(), index: OverlapIndex::new(), applied: AtomicU64::new(0) }
    }

    /// Applies one batch as an engine published it; how many of its events changed the index.
    pub fn apply(&self, batch: &EventBatch) -> u64 {
        let mut n = 0;
        for event in &batch.events {
            let applied = match &event.data {
                EventData::Stored { blocks, .. } => {
                    let hashes: Vec<u64> = blocks.iter().map(|b| b.block_hash).collect();
                    self.stored(&batch.worker_id, &hashes)
                }
                EventData::Removed { block_hashes } => self.removed(&batch.worker_id, block_hashes),
            };
            n += u64::from(applied);
        }
        self.applied.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Peer events applied so far (by [`apply`](Self::apply) and any follower).
    pub fn events_applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Applies every batch `sub` receives, in a thread of its own, until the follower is dropped.
    pub fn follow(self: &Arc<Self>, sub: EventSubscriber) -> Result<Follower> {
        let stop = Arc::new(AtomicBool::new(false));
        let (me, flag) = (Arc::clone(self), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("xconnector-kv-events".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    if let Some(batch) = sub.next(Duration::from_millis(200)) {
                        me.apply(&batch);
                    }
                }
            })
            .map_err(|source| CoreError::Io { context: "peer events: cannot start a thread".into(), source })?;
        Ok(Follower { stop })
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// `worker` announced it holds these blocks; false (ignored) when it is this worker.
    pub fn stored(&self, worker: &str, hashes: &[u64]) -> bool {
        worker != self.me && {
            self.index.stored(worker, hashes);
            true
        }
    }

    /// `worker` announced it dropped these blocks; false (ignored) when it is this worker.
    pub fn removed(&self, worker: &str, hashes: &[u64]) -> bool {
        worker != self.me && {
            self.index.removed(worker, hashes);
            true
        }
    }

    pub fn forget(&self, worker: &str) {
        self.index.clear_worker(worker)
    }

    /// Other workers seen, with the number of blocks each announced.
    pub fn peers(&self) -> Vec<(String, u64)> {
        self.index.workers().into_iter().filter(|(w, _)| *w != self.me).collect()
    }

    /// `[(worker, leading tokens it holds)]` for a request's block `hashes`, best first; this
    /// worker is ranked by `local_tokens` (its engine's lookup) and included when it holds any.
    pub fn score(&self, hashes: &[u64], block_size: usize, local_tokens: usize) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = self
            .index
            .score(hashes)
            .into_iter()
            .filter(|(w, _)| *w != self.me)
            .map(|(w, n)| (w, n * block_size))
            .collect();
        if local_tokens > 0 {
            out.push((self.me.clone(), local_tokens));
        }
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// The best-ranked worker among `candidates` (any when `None`); `None` when none holds any.
    pub fn best(
        &self,
        hashes: &[u64],
        block_size: usize,
        local_tokens: usize,
        candidates: Option<&[String]>,
    ) -> Option<String> {
        self.score(hashes, block_size, local_tokens)
            .into_iter()
            .map(|(w, _)| w)
            .find(|w| candidates.is_none_or(|c| c.contains(w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_announcements_are_ignored_and_own_overlap_is_local() {
        let p = PeerOverlap::new("me");
        assert!(!p.stored("me", &[1, 2, 3]));
        assert!(p.stored("a", &[1, 2]));
        assert!(p.peers().iter().all(|(w, _)| w != "me"));
        assert_eq!(p.score(&[1, 2, 3], 16, 0), vec![("a".to_owned(), 32)]);
        assert_eq!(p.score(&[1, 2, 3], 16, 48), vec![("me".to_owned(), 48), ("a".to_owned(), 32)]);
        assert!(!p.removed("me", &[1]));
    }

    #[test]
    fn batches_apply_peers_events_and_count_them() {
        use crate::peer_events::{KvEvent, StoredBlock};
        let p = PeerOverlap::new("me");
        let stored = |id, hashes: &[u64]| KvEvent {
            event_id: id,
            data: EventData::Stored {
                parent_hash: None,
                blocks: hashes.iter().map(|&h| StoredBlock { block_hash: h, tokens_hash: h }).collect(),
            },
        };
        let removed = KvEvent { event_id: 3, data: EventData::Removed { block_hashes: vec![2] } };
        let batch = |w: &str, events| EventBatch { worker_id: w.to_owned(), events };
        assert_eq!(p.apply(&batch("peer", vec![stored(1, &[1, 2]), stored(2, &[3])])), 2);
        assert_eq!(p.apply(&batch("me", vec![stored(1, &[1, 2, 3])])), 0);
        assert_eq!(p.score(&[1, 2, 3], 16, 0), vec![("peer".to_owned(), 48)]);
        assert_eq!(p.apply(&batch("peer", vec![removed])), 1);
        assert_eq!(p.score(&[1, 2, 3], 16, 0), vec![("peer".to_owned(), 16)]);
        assert_eq!(p.events_applied(), 3);
    }

    #[test]
    fn ranking_is_in_tokens_best_first_ties_by_name() {
        let p = PeerOverlap::new("self");
        p.stored("peer-b", &[1, 2, 3, 4]);
        p.stored("peer-a", &[1, 2]);
        p.stored("peer-c", &[9]);
        let want = vec![("peer-b".to_owned(), 64), ("self".to_owned(), 64), ("peer-a".to_owned(), 32)];
        assert_eq!(p.score(&[1, 2, 3, 4, 5], 16, 64), want);
        let some = ["peer-a".to_owned(), "peer-c".to_owned()];
        assert_eq!(p.best(&[1, 2, 3, 4, 5], 16, 64, Some(&some)).as_deref(), Some("peer-a"));
        assert_eq!(p.best(&[7], 16, 0, None), None);
        p.removed("peer-b", &[1, 2, 3, 4]);
        p.forget("peer-a");
        assert_eq!(p.score(&[1, 2, 3, 4, 5], 16, 64), vec![("self".to_owned(), 64)]);
        let mut peers = p.peers();
        peers.sort();
        assert_eq!(peers, vec![("peer-a".to_owned(), 0), ("peer-b".to_owned(), 0), ("peer-c".to_owned(), 1)]);
    }
}
