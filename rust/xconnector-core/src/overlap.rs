//! Prefix-overlap scoring of workers: for a request's block hashes, how many leading blocks each
//! worker holds, the quantity Dynamo's KV router routes by. Fed by stored/removed block events.
//!
//! Sequence hashes chain (block i's hash covers the whole prefix), so "holds the first n blocks"
//! is "holds each of the first n hashes"; a worker's run ends at its first missing block.

use std::collections::HashMap;

use parking_lot::RwLock;

#[derive(Default)]
struct Inner {
    workers: Vec<String>,
    ids: HashMap<String, u32>,
    /// Block hash -> workers holding it (few per block; a small sorted vector).
    holders: HashMap<u64, Vec<u32>>,
    blocks_per_worker: Vec<u64>,
}

impl Inner {
    fn id(&mut self, worker: &str) -> u32 {
        if let Some(&id) = self.ids.get(worker) {
            return id;
        }
        let id = self.workers.len() as u32;
        self.workers.push(worker.to_owned());
        self.ids.insert(worker.to_owned(), id);
        self.blocks_per_worker.push(0);
        id
    }
}

#[derive(Default)]
pub struct OverlapIndex {
    inner: RwLock<Inner>,
}

impl OverlapIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// `worker` now holds these blocks.
    pub fn stored(&self, worker: &str, hashes: &[u64]) {
        let mut inner = self.inner.write();
        let id = inner.id(worker);
        let mut added = 0;
        for &h in hashes {
            let holders = inner.holders.entry(h).or_default();
            if let Err(pos) = holders.binary_search(&id) {
                holders.insert(pos, id);
                added += 1;
            }
        }
        inner.blocks_per_worker[id as usize] += added;
    }

    /// `worker` no longer holds these blocks.
    pub fn removed(&self, worker: &str, hashes: &[u64]) {
        let mut inner = self.inner.write();
        let Some(&id) = inner.ids.get(worker) else { return };
        let mut gone = 0;
        for h in hashes {
            if let Some(holders) = inner.holders.get_mut(h) {
                if let Ok(pos) = holders.binary_search(&id) {
                    holders.remove(pos);
                    gone += 1;
                    if holders.is_empty() {
                        inner.holders.remove(h);
                    }
                }
            }
        }
        inner.blocks_per_worker[id as usize] -= gone;
    }

    /// Forgets everything `worker` held (it left, or restarted with an empty cache).
    pub fn clear_worker(&self, worker: &str) {
        let mut inner = self.inner.write();
        let Some(&id) = inner.ids.get(worker) else { return };
        inner.holders.retain(|_, holders| {
            holders.retain(|&w| w != id);
            !holders.is_empty()
        });
        inner.blocks_per_worker[id as usize] = 0;
    }

    /// Leading blocks of `hashes` each worker holds, best first (ties by worker name); workers
    /// holding none of the first block are left out.
    pub fn score(&self, hashes: &[u64]) -> Vec<(String, usize)> {
        let inner = self.inner.read();
        let mut run: HashMap<u32, usize> = HashMap::new();
        let mut alive: Vec<u32> = match hashes.first().and_then(|h| inner.holders.get(h)) {
            Some(first) => first.clone(),
            None => return Vec::new(),
        };
        for (i, h) in hashes.iter().enumerate() {
            let Some(holders) = inner.holders.get(h) else { break };
            alive.retain(|w| holders.binary_search(w).is_ok());
            if alive.is_empty() {
                break;
            }
            for &w in &alive {
                run.insert(w, i + 1);
            }
        }
        let mut out: Vec<(String, usize)> =
            run.into_iter().map(|(w, n)| (inner.workers[w as usize].clone(), n)).collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Blocks each known worker holds.
    pub fn workers(&self) -> Vec<(String, u64)> {
        let inner = self.inner.read();
        inner.workers.iter().cloned().zip(inner.blocks_per_worker.iter().copied()).collect()
    }
}
