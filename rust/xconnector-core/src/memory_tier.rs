//! The in-process tier: fixed-size block slots under a byte budget, indexed by
//! `(namespace, sequence hash)`, with leaf-first LRU eviction.
//!
//! Invariants (checked by [`MemoryTier::check_invariants`] in tests):
//! - a block is visible (`Ready`) only if its parent is visible, so the cached blocks of any token
//!   sequence form a contiguous prefix, and a lookup can binary-search it;
//! - only leaves (no children, including children still being written) that nobody pins are
//!   evictable, oldest first, longer prefixes first on ties;
//! - the number of live slots never exceeds the budget's slot count, whatever the concurrency.
//!
//! Bytes are copied outside the lock: a store reserves `Writing` slots, copies, then publishes them
//! (or aborts them: a store that fails or panics midway leaves no slot behind); a load pins `Ready`
//! slots, copies, then unpins.
//!
//! Each block remembers the digest of its tokens and parent (`hashing::block_digests`); a load
//! whose digest differs (a 64-bit sequence-hash collision between two prefixes) stops there.
//!
//! A block handed out as a zero-copy view gets a checksum of its bytes at its first export: the
//! buffer is read-only, but `torch.frombuffer` ignores that, so a consumer can write through it.
//! Every later load or export of such a block checks it first; a block found changed is
//! "spoiled": never served again (loads and views stop before it), and left to eviction.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use parking_lot::RwLock;

use crate::arena::{Arena, SlotId};
use crate::error::Result;

/// `(namespace id, sequence hash)`.
pub type Key = (u64, u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Writing,
    Ready,
}

struct Entry {
    key: Key,
    digest: u128,
    parent: Option<SlotId>,
    children: u32,
    pins: u32,
    tick: u64,
    depth: u32,
    state: State,
    in_lru: bool,
    /// XXH3 of the bytes, taken when the block was first exported as a view.
    exported_sum: Option<u64>,
    /// Found changed since it was exported: never served again.
    spoiled: bool,
}

impl Entry {
    fn lru_key(&self, slot: SlotId) -> (u64, Reverse<u32>, SlotId) {
        (self.tick, Reverse(self.depth), slot)
    }

    fn evictable(&self) -> bool {
        self.state == State::Ready && self.children == 0 && self.pins == 0
    }
}

/// Keys are already uniform 64-bit hashes: mixing them once is enough.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(23) ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Default)]
struct Inner {
    index: HashMap<Key, SlotId, BuildHasherDefault<KeyHasher>>,
    entries: Vec<Option<Entry>>,
    free: Vec<SlotId>,
    lru: BTreeSet<(u64, Reverse<u32>, SlotId)>,
    tick: u64,
    live: u64,
    pinned: u64,
    evicted_blocks: u64,
    /// Loads stopped at a block whose digest is not the request's.
    mismatched_blocks: u64,
    /// Exported blocks found changed (written through a view).
    spoiled_blocks: u64,
    /// Keys evicted since the last reservation handed them out (for KV "removed" events).
    evicted_keys: Vec<Key>,
}

/// Blocks reserved by [`MemoryTier::reserve`]: `(block index, slot)` for each new block, to be
/// written by the caller and then published with [`MemoryTier::publish`].
#[derive(Debug, Default)]
pub struct Reservation {
    pub new_blocks: Vec<(usize, SlotId)>,
    /// Leading blocks already present.
    pub existing: usize,
    /// Trailing blocks not stored: no slot could be freed, or another store is writing them.
    pub rejected: usize,
    /// The rejected blocks were refused for room alone (no slot could be freed), not because
    /// another store writes them or memory holds other KV under their hash.
    pub out_of_room: bool,
    /// `(namespace, hash)` of blocks evicted to make room.
    pub evicted: Vec<(u64, u64)>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    pub entries: u64,
    pub pinned: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    pub evicted_blocks: u64,
    pub mismatched_blocks: u64,
    pub spoiled_blocks: u64,
}

pub struct MemoryTier {
    arena: Arena,
    inner: RwLock<Inner>,
}

impl Inner {
    fn entry(&self, slot: SlotId) -> &Entry {
        self.entries[slot as usize].as_ref().expect("live slot")
    }

    fn entry_mut(&mut self, slot: SlotId) -> &mut Entry {
        self.entries[slot as usize].as_mut().expect("live slot")
    }

    /// Puts `slot` into, or takes it out of, the evictable set according to its current state.
    fn refresh(&mut self, slot: SlotId) {
        let e = self.entries[slot as usize].as_mut().expect("live slot");
        let key = e.lru_key(slot);
        let want = e.evictable();
        if e.in_lru == want {
            return;
        }
        e.in_lru = want;
        if want {
            self.lru.insert(key);
        } else {
            self.lru.remove(&key);
        }
    }

    /// Marks a slot used now; keeps its position in the evictable set in step.
    fn touch(&mut self, slot: SlotId, tick: u64) {
        let e = self.entries[slot as usize].as_mut().expect("live slot");
        if e.in_lru {
            let old = e.lru_key(slot);
            e.tick = tick;
            let new = e.lru_key(slot);
            self.lru.remove(&old);
            self.lru.insert(new);
        } else {
            e.tick = tick;
        }
    }

    fn pin(&mut self, slot: SlotId) {
        let e = self.entry_mut(slot);
        e.pins += 1;
        if e.pins == 1 {
            self.pinned += 1;
        }
        self.refresh(slot);
    }

    fn unpin(&mut self, slot: SlotId) {
        let e = self.entry_mut(slot);
        assert!(e.pins > 0, "unpin of an unpinned slot");
        e.pins -= 1;
        if e.pins == 0 {
            self.pinned -= 1;
        }
        self.refresh(slot);
    }

    /// Frees the least recently used evictable leaf and returns its slot for reuse.
    fn evict_one(&mut self) -> Option<SlotId> {
        let (_, _, victim) = self.lru.pop_first()?;
        let e = self.entries[victim as usize].take().expect("evictable slot is live");
        self.index.remove(&e.key);
        self.live -= 1;
        self.evicted_blocks += 1;
        self.evicted_keys.push(e.key);
        if let Some(parent) = e.parent {
            self.entry_mut(parent).children -= 1;
            self.refresh(parent);
        }
        Some(victim)
    }

    /// A slot for a new block: a free one, an untouched one, or an evicted leaf's.
    fn allocate(&mut self, capacity: u32) -> Option<SlotId> {
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        if (self.entries.len() as u64) < u64::from(capacity) {
            self.entries.push(None);
            return Some(self.entries.len() as SlotId - 1);
        }
        self.evict_one()
    }

    fn is_ready(&self, key: &Key) -> bool {
        self.index.get(key).is_some_and(|&s| self.entry(s).state == State::Ready)
    }
}

impl MemoryTier {
    /// A tier of `capacity_bytes / block_bytes` slots (rounded down).
    pub fn new(block_bytes: usize, capacity_bytes: u64) -> Self {
        let slots = (capacity_bytes / block_bytes as u64).min(u64::from(u32::MAX)) as u32;
        Self { arena: Arena::new(block_bytes, slots), inner: RwLock::new(Inner::default()) }
    }

    pub fn block_bytes(&self) -> usize {
        self.arena.slot_bytes()
    }

    pub fn capacity_blocks(&self) -> u32 {
        self.arena.slots()
    }

    /// The usable budget: whole blocks only.
    pub fn capacity_bytes(&self) -> u64 {
        u64::from(self.arena.slots()) * self.arena.slot_bytes() as u64
    }

    /// Number of leading `hashes` whose blocks are ready to load. Side-effect free (no LRU touch):
    /// a scheduler may ask repeatedly about a waiting request.
    pub fn contiguous_ready(&self, ns: u64, hashes: &[u64]) -> usize {
        let inner = self.inner.read();
        // Ready blocks form a prefix of any chain (module invariant), so the predicate is monotone.
        let (mut lo, mut hi) = (0usize, hashes.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if inner.is_ready(&(ns, hashes[mid])) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Reserves slots for the blocks of `hashes` (with their `digests`) not yet present, evicting
    /// as needed. Stops at the first block another store is still writing, at a block present
    /// under another digest, or when nothing more can be evicted.
    pub fn reserve(&self, ns: u64, hashes: &[u64], digests: &[u128]) -> Result<Reservation> {
        self.reserve_from(ns, hashes, digests, 0, None)
    }

    /// `reserve` of the blocks of `hashes` from `from` on, for a caller that holds `parent`, the
    /// slot of block `from - 1` (None when `from` is 0), pinned: the prefix before it (its
    /// ancestors, kept by it) is not walked again. `existing` counts from `from`.
    pub fn reserve_from(
        &self,
        ns: u64,
        hashes: &[u64],
        digests: &[u128],
        from: usize,
        mut parent: Option<SlotId>,
    ) -> Result<Reservation> {
        assert_eq!(hashes.len(), digests.len(), "one digest per hash");
        assert_eq!(from == 0, parent.is_none(), "a parent exactly when starting past block 0");
        let capacity = self.arena.slots();
        let mut inner = self.inner.write();
        if let Some(p) = parent {
            // Children under a wrong or stale parent would corrupt the tree: checked always.
            let e = inner.entry(p);
            assert!(
                e.pins > 0 && e.key == (ns, hashes[from - 1]),
                "reserve_from: the parent is not the pinned block before"
            );
        }
        inner.tick += 1;
        let tick = inner.tick;
        let mut res = Reservation::default();
        for (i, &h) in hashes.iter().enumerate().skip(from) {
            let key = (ns, h);
            if let Some(&slot) = inner.index.get(&key) {
                let e = inner.entry(slot);
                if e.state != State::Ready || e.digest != digests[i] || !res.new_blocks.is_empty() {
                    // Another store owns it, another prefix's block holds this hash, or a hash
                    // collision inside one sequence: stop here rather than chain onto KV that is
                    // not this prefix's, or publish children before their parent.
                    res.rejected = hashes.len() - i;
                    break;
                }
                inner.touch(slot, tick);
                res.existing += 1;
                parent = Some(slot);
                continue;
            }
            // The parent may be an evictable leaf right now: keep it while we allocate its child.
            if let Some(p) = parent {
                inner.pin(p);
            }
            let slot = inner.allocate(capacity);
            if let Some(p) = parent {
                inner.unpin(p);
            }
            let Some(slot) = slot else {
                res.rejected = hashes.len() - i;
                res.out_of_room = true;
                break;
            };
            if let Err(e) = self.arena.ensure(slot) {
                inner.free.push(slot);
                if res.new_blocks.is_empty() {
                    return Err(e);
                }
                res.rejected = hashes.len() - i;
                res.out_of_room = true;
                break;
            }
            inner.entries[slot as usize] = Some(Entry {
                key,
                digest: digests[i],
                parent,
                children: 0,
                pins: 0,
                tick,
                depth: i as u32,
                state: State::Writing,
                in_lru: false,
                exported_sum: None,
                spoiled: false,
            });
            if let Some(p) = parent {
                inner.entry_mut(p).children += 1;
                inner.refresh(p);
            }
            inner.index.insert(key, slot);
            inner.live += 1;
            res.new_blocks.push((i, slot));
            parent = Some(slot);
        }
        res.evicted = std::mem::take(&mut inner.evicted_keys);
        Ok(res)
    }

    /// Fills a reserved slot in place (no staging copy).
    pub fn fill_reserved(&self, slot: SlotId, fill: impl FnOnce(&mut [u8])) {
        // SAFETY: `slot` came from `reserve` and is not published yet, so this caller owns it
        // exclusively; its segment was ensured by `reserve` and holds `block_bytes` bytes.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.arena.slot_ptr(slot), self.block_bytes()) };
        fill(dst);
    }

    /// Takes back the reserved blocks from the `keep`-th on (they were not written: the store
    /// failed or panicked), newest first so no freed block is still some block's parent.
    pub fn abort(&self, res: &mut Reservation, keep: usize) {
        if keep >= res.new_blocks.len() {
            return;
        }
        let mut inner = self.inner.write();
        for &(_, slot) in res.new_blocks[keep..].iter().rev() {
            let e = inner.entries[slot as usize].take().expect("reserved slot is live");
            debug_assert!(e.state == State::Writing && e.children == 0 && e.pins == 0);
            inner.index.remove(&e.key);
            inner.live -= 1;
            inner.free.push(slot);
            if let Some(p) = e.parent {
                inner.entry_mut(p).children -= 1;
                inner.refresh(p);
            }
        }
        res.rejected += res.new_blocks.len() - keep;
        res.new_blocks.truncate(keep);
    }

    /// Makes reserved blocks visible, all at once, so a child is never visible before its parent.
    pub fn publish(&self, res: &Reservation) {
        self.publish_pinning_last(res, false);
    }

    /// `publish`, pinning the last new block (returned) in the same step when `pin_last`, so it
    /// is never evictable in between: a caller extending the chain holds it, and its ancestors.
    pub fn publish_pinning_last(&self, res: &Reservation, pin_last: bool) -> Option<SlotId> {
        let mut inner = self.inner.write();
        for &(_, slot) in &res.new_blocks {
            inner.entry_mut(slot).state = State::Ready;
            inner.refresh(slot);
        }
        let last = res.new_blocks.last().map(|&(_, slot)| slot).filter(|_| pin_last)?;
        inner.pin(last);
        Some(last)
    }

    /// Pins the leading ready blocks of `hashes` (at most `max_blocks`) whose digests are the
    /// request's, and marks them used.
    pub fn pin_prefix(&self, ns: u64, hashes: &[u64], digests: &[u128], max_blocks: usize) -> Vec<SlotId> {
        assert_eq!(hashes.len(), digests.len(), "one digest per hash");
        let mut inner = self.inner.write();
        inner.tick += 1;
        let tick = inner.tick;
        let mut slots = Vec::new();
        for (&h, &d) in hashes.iter().zip(digests).take(max_blocks) {
            let Some(&slot) = inner.index.get(&(ns, h)) else { break };
            let e = inner.entry(slot);
            if e.state != State::Ready {
                break;
            }
            if e.digest != d {
                inner.mismatched_blocks += 1;
                break;
            }
            if e.spoiled {
                break;
            }
            inner.touch(slot, tick);
            inner.pin(slot);
            slots.push(slot);
        }
        slots
    }

    pub fn unpin(&self, slots: &[SlotId]) {
        let mut inner = self.inner.write();
        for &slot in slots {
            inner.unpin(slot);
        }
    }

    /// Keeps, among the leading `slots` (pinned), those that are unchanged since they were
    /// exported, and unpins the rest from the first changed one on (which is spoiled). With
    /// `export`, the blocks are about to be exported: the ones never exported get their checksum.
    pub fn verify_exported(&self, slots: &mut Vec<SlotId>, export: bool) {
        let sums: Vec<Option<u64>> = {
            let inner = self.inner.read();
            slots.iter().map(|&s| inner.entry(s).exported_sum).collect()
        };
        if !export && sums.iter().all(Option::is_none) {
            return; // the common case: nothing ever exported, nothing to hash
        }
        let mut keep = slots.len();
        let mut taken = Vec::new();
        for (k, (&slot, sum)) in slots.iter().zip(&sums).enumerate() {
            let now = self.with_pinned(slot, xxhash_rust::xxh3::xxh3_64);
            match sum {
                Some(expected) if *expected != now => {
                    keep = k;
                    break;
                }
                Some(_) => {}
                None => taken.push((slot, now)),
            }
        }
        let mut inner = self.inner.write();
        if export {
            for (slot, sum) in taken.into_iter().filter(|(s, _)| slots[..keep].contains(s)) {
                let e = inner.entry_mut(slot);
                e.exported_sum.get_or_insert(sum);
            }
        }
        let mut spoiled_now = false;
        if keep < slots.len() {
            let e = inner.entry_mut(slots[keep]);
            if !e.spoiled {
                e.spoiled = true;
                inner.spoiled_blocks += 1;
                spoiled_now = true;
            }
            for &slot in &slots[keep..] {
                inner.unpin(slot);
            }
            slots.truncate(keep);
        }
        drop(inner);
        // Logged outside the lock: a log record may need Python's GIL, whose holder may be
        // waiting for this lock.
        if spoiled_now {
            tracing::warn!("a cached block was changed through a view of it; it is not served again");
        }
    }

    /// Hands a pinned slot's bytes to `read`.
    pub fn with_pinned<R>(&self, slot: SlotId, read: impl FnOnce(&[u8]) -> R) -> R {
        // SAFETY: the caller pinned the slot, so it is neither evicted nor rewritten meanwhile.
        read(unsafe { std::slice::from_raw_parts(self.pinned_ptr(slot), self.block_bytes()) })
    }

    /// The bytes of a pinned block, valid until it is unpinned.
    ///
    /// # Safety
    /// The caller must keep `slot` pinned for as long as it uses the returned pointer.
    pub unsafe fn pinned_ptr(&self, slot: SlotId) -> *const u8 {
        self.arena.slot_ptr(slot)
    }

    /// Whether `[addr, addr + len)` overlaps the tier's memory.
    pub fn overlaps(&self, addr: usize, len: usize) -> bool {
        self.arena.overlaps(addr, len)
    }

    pub fn stats(&self) -> TierStats {
        let inner = self.inner.read();
        let bb = self.arena.slot_bytes() as u64;
        TierStats {
            entries: inner.live,
            pinned: inner.pinned,
            used_bytes: inner.live * bb,
            capacity_bytes: self.capacity_bytes(),
            allocated_bytes: self.arena.allocated_bytes(),
            evicted_blocks: inner.evicted_blocks,
            mismatched_blocks: inner.mismatched_blocks,
            spoiled_blocks: inner.spoiled_blocks,
        }
    }

    /// Verifies every structural invariant; returns a description of the first violation.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let inner = self.inner.read();
        let mut live = 0u64;
        let mut children = vec![0u32; inner.entries.len()];
        let (mut evictable, mut pinned) = (0usize, 0u64);
        for (slot, e) in inner.entries.iter().enumerate() {
            let Some(e) = e else { continue };
            live += 1;
            pinned += u64::from(e.pins > 0);
            if inner.index.get(&e.key) != Some(&(slot as SlotId)) {
                return Err(format!("slot {slot} is not indexed under its key"));
            }
            if let Some(p) = e.parent {
                let Some(pe) = inner.entries.get(p as usize).and_then(|x| x.as_ref()) else {
                    return Err(format!("slot {slot} has a freed parent {p}: unreachable block"));
                };
                if e.state == State::Ready && pe.state != State::Ready {
                    return Err(format!("slot {slot} is ready but its parent {p} is not"));
                }
                if pe.depth + 1 != e.depth {
                    return Err(format!("slot {slot} has depth {} under parent depth {}", e.depth, pe.depth));
                }
                children[p as usize] += 1;
            } else if e.depth != 0 {
                return Err(format!("slot {slot} has no parent but depth {}", e.depth));
            }
            if e.in_lru != e.evictable() || e.in_lru != inner.lru.contains(&e.lru_key(slot as SlotId)) {
                return Err(format!("slot {slot} evictable-set membership is stale"));
            }
            evictable += usize::from(e.in_lru);
        }
        for (slot, e) in inner.entries.iter().enumerate() {
            if let Some(e) = e {
                if e.children != children[slot] {
                    return Err(format!("slot {slot} counts {} children, has {}", e.children, children[slot]));
                }
            }
        }
        if pinned != inner.pinned {
            return Err(format!("{} blocks counted pinned, {pinned} are", inner.pinned));
        }
        if live != inner.live || inner.index.len() as u64 != live {
            return Err(format!("live count {} / index {} / entries {live}", inner.live, inner.index.len()));
        }
        if live > u64::from(self.arena.slots()) {
            return Err(format!("{live} live blocks exceed the budget of {}", self.arena.slots()));
        }
        if evictable != inner.lru.len() {
            return Err("evictable set holds freed slots".into());
        }
        if self.arena.allocated_bytes() > u64::from(self.arena.slots()) * self.arena.slot_bytes() as u64 {
            return Err("arena allocated more than the budget".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_grown_from_its_pinned_tail_keeps_every_block_under_pressure() {
        const BB: usize = 64;
        let tier = MemoryTier::new(BB, 5 * BB as u64);
        let (a, b): (Vec<u64>, Vec<u64>) = ((1..=5).collect(), (101..=103).collect());
        let (da, db): (Vec<u128>, Vec<u128>) =
            (a.iter().map(|&h| h.into()).collect(), b.iter().map(|&h| h.into()).collect());
        // A's first 3 blocks, the last kept pinned. B, stored meanwhile, finds room for 2 and
        // may evict nothing of A (its tail, the older, is pinned; the rest are its ancestors).
        let res = tier.reserve(1, &a[..3], &da[..3]).unwrap();
        let tail = tier.publish_pinning_last(&res, true).unwrap();
        let res = tier.reserve(1, &b, &db).unwrap();
        assert_eq!((res.new_blocks.len(), res.rejected, res.out_of_room), (2, 1, true));
        tier.publish(&res);
        tier.check_invariants().unwrap();
        // A's next 2 come from the tail: the room is made from B.
        let more = tier.reserve_from(1, &a, &da, 3, Some(tail)).unwrap();
        assert_eq!((more.existing, more.new_blocks.len(), more.rejected), (0, 2, 0));
        assert_eq!(more.new_blocks.iter().map(|&(i, _)| i).collect::<Vec<_>>(), [3, 4]);
        tier.publish(&more);
        tier.unpin(&[tail]);
        let pinned = tier.pin_prefix(1, &a, &da, 5);
        assert_eq!(pinned.len(), 5);
        tier.unpin(&pinned);
        assert!(tier.pin_prefix(1, &b, &db, 3).is_empty(), "B made the room");
        tier.check_invariants().unwrap();
    }
}
