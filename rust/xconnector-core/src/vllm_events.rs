//! The engine's block changes ([`BlockChange`]) as vLLM's KV events, and what a scheduler tells
//! the router given every rank's events. The vLLM integration (`kv_events.py`) only builds vLLM's
//! event objects from what this module decides.
//!
//! Invariants, relied on below and checked in the tests:
//! - **Same names at store and removal.** A block reported stored in a medium keeps the names it
//!   was reported under until it is reported removed from that medium ([`BlockNames::removed`]
//!   returns exactly those), whatever was learnt or forgotten in between: the router matches a
//!   removal to a store by name.
//! - **Parent linkage.** A stored run's parent is the last vLLM block of the parent XConnector
//!   block, under the names that block was reported with in the same medium, so the router chains
//!   the run onto what it already knows.
//! - **Names.** vLLM's own names when learnt ([`BlockNames::learn`]); otherwise XConnector's
//!   sequence hash when one XConnector block is one vLLM block, or [`sub_id`] of it and the
//!   position when it is `k` vLLM blocks. Either is a pure function of the block, so a fallback
//!   name is the same at store and at removal.
//! - **Rank agreement.** Each tensor/pipeline rank holds its own part of every block: a block is
//!   announced once, when the last of `world` ranks holds it, and removed once, when the first
//!   rank drops it; a block some rank never held is never announced nor its removal.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use blake2::digest::consts::U8;
use blake2::{Blake2b, Digest};

use crate::block_journal::{BlockChange, Medium};
use crate::error::{CoreError, Result};
use crate::hashing::{self, HashExtras};

/// vLLM names learnt and remembered at most (least recently learnt forgotten first).
pub const MAX_NAMES: usize = 1 << 17;

/// A block's name in vLLM's events: vLLM's block hash (bytes, or an int when vLLM reports ints,
/// `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`), or one of XConnector's (an int).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Name {
    Int(u64),
    Bytes(Box<[u8]>),
}

/// vLLM's `medium` for each of XConnector's tiers (`MEDIUM_CPU`, `MEDIUM_STORAGE`).
pub fn vllm_medium(medium: Medium) -> &'static str {
    match medium {
        Medium::Memory => "CPU",
        Medium::Disk => "STORAGE",
    }
}

/// The name of vLLM block `j` of the `k` in the XConnector block `chunk_hash`: the block's own
/// hash when `k == 1`, else the little-endian BLAKE2b-64 of `chunk_hash` (8 bytes LE) and `j`
/// (4 bytes LE), as Python's `hashlib.blake2b(raw, digest_size=8)` computes it.
pub fn sub_id(chunk_hash: u64, j: u32, k: usize) -> u64 {
    if k == 1 {
        return chunk_hash;
    }
    let mut raw = [0u8; 12];
    raw[..8].copy_from_slice(&chunk_hash.to_le_bytes());
    raw[8..].copy_from_slice(&j.to_le_bytes());
    let digest = Blake2b::<U8>::digest(raw);
    u64::from_le_bytes(digest.into())
}

/// vLLM blocks per XConnector block: `engine_block` (XConnector's, in tokens) is a multiple of
/// `block_size` (vLLM's); at least one vLLM block.
pub fn blocks_per_chunk(block_size: usize, engine_block: usize) -> Result<usize> {
    // At most 2^16 vLLM blocks per XConnector block: each is named, so a larger count is a
    // mistake that would allocate without bound.
    match engine_block.checked_div(block_size) {
        Some(k) if k > 0 && k <= 1 << 16 && engine_block.is_multiple_of(block_size) => Ok(k),
        _ => Err(CoreError::invalid(format!(
            "XConnector's block ({engine_block} tokens) must be 1 to 65536 times vLLM's ({block_size})"
        ))),
    }
}

/// vLLM's per-block extra keys for a LoRA name and a cache salt (the salt is in the first block
/// of a request only), as its own events carry them; None when neither applies.
pub fn extra_keys(
    n: usize,
    first: bool,
    lora_name: Option<&str>,
    salt: Option<&str>,
) -> Option<Vec<Option<Vec<String>>>> {
    let lora: Vec<String> = lora_name.filter(|l| !l.is_empty()).map(str::to_owned).into_iter().collect();
    let mut keys: Vec<Option<Vec<String>>> = vec![(!lora.is_empty()).then(|| lora.clone()); n];
    if let (Some(salt), true, Some(k0)) = (salt.filter(|s| !s.is_empty()), first, keys.first_mut()) {
        let mut with_salt = lora;
        with_salt.push(salt.to_owned());
        *k0 = Some(with_salt);
    }
    keys.iter().any(Option::is_some).then_some(keys)
}

/// One vLLM event: `BlockStored` or `BlockRemoved`, in vLLM's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VllmEvent {
    Stored {
        names: Vec<Name>,
        parent: Option<Name>,
        tokens: Vec<u32>,
        medium: &'static str,
        lora_name: Option<String>,
        extra_keys: Option<Vec<Option<Vec<String>>>>,
    },
    Removed {
        names: Vec<Name>,
        medium: &'static str,
    },
}

/// vLLM's names for XConnector's blocks (see the module's invariants). Learnt names are bounded
/// by `capacity`, least recently learnt forgotten first; reported names are bounded by what the
/// tiers hold (each is dropped at its removal).
#[derive(Debug)]
pub struct BlockNames {
    capacity: usize,
    /// Block -> (when learnt, its vLLM names); `order` is the same entries by when learnt.
    learnt: HashMap<u64, (u64, Vec<Name>)>,
    order: BTreeMap<u64, u64>,
    clock: u64,
    reported: HashMap<(Medium, u64), Vec<Name>>,
}

impl Default for BlockNames {
    fn default() -> Self {
        Self::new(MAX_NAMES)
    }
}

impl BlockNames {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, learnt: HashMap::new(), order: BTreeMap::new(), clock: 0, reported: HashMap::new() }
    }

    /// Learns vLLM's `names` (one per vLLM block of `block_size` tokens) for the XConnector blocks
    /// of `engine_block` tokens that `tokens` (with `extras`) hash to; names past the last whole
    /// XConnector block they cover are ignored.
    pub fn learn(
        &mut self,
        engine_block: usize,
        block_size: usize,
        tokens: &[u32],
        names: &[Name],
        extras: HashExtras<'_>,
    ) -> Result<()> {
        let k = blocks_per_chunk(block_size, engine_block)?;
        for (i, h) in hashing::sequence_hashes(tokens, engine_block, extras).into_iter().enumerate() {
            let Some(mine) = names.get(i * k..(i + 1) * k) else { break };
            self.clock += 1;
            if let Some((stamp, _)) = self.learnt.insert(h, (self.clock, mine.to_vec())) {
                self.order.remove(&stamp);
            }
            self.order.insert(self.clock, h);
        }
        while self.learnt.len() > self.capacity {
            let Some((_, h)) = self.order.pop_first() else { break };
            self.learnt.remove(&h);
        }
        Ok(())
    }

    /// The names block `h` (of `k` vLLM blocks) goes by: in `medium`, if it was reported stored
    /// there; else its learnt names, else the fallback ones.
    pub fn of(&self, h: u64, k: usize, medium: Option<Medium>) -> Vec<Name> {
        if let Some(names) = medium.and_then(|m| self.reported.get(&(m, h))) {
            return names.clone();
        }
        match self.learnt.get(&h) {
            Some((_, names)) => names.clone(),
            None => (0..k).map(|j| Name::Int(sub_id(h, j as u32, k))).collect(),
        }
    }

    /// The names block `h` is reported stored in `medium` under (kept until its removal).
    pub fn stored(&mut self, medium: Medium, h: u64, k: usize) -> Vec<Name> {
        let names = self.of(h, k, Some(medium));
        self.reported.insert((medium, h), names.clone());
        names
    }

    /// The names block `h` is reported removed from `medium` under: those it was stored under.
    pub fn removed(&mut self, medium: Medium, h: u64, k: usize) -> Vec<Name> {
        match self.reported.remove(&(medium, h)) {
            Some(names) if !names.is_empty() => names,
            _ => self.of(h, k, None),
        }
    }

    /// vLLM's events for the engine's `changes`; `block_size` is vLLM's, `engine_block`
    /// XConnector's (a multiple of it).
    pub fn events(
        &mut self,
        changes: &[BlockChange],
        block_size: usize,
        engine_block: usize,
    ) -> Result<Vec<VllmEvent>> {
        let k = blocks_per_chunk(block_size, engine_block)?;
        let mut out = Vec::with_capacity(changes.len());
        for change in changes {
            match change {
                BlockChange::Removed { medium, hashes } => {
                    let names = hashes.iter().flat_map(|&h| self.removed(*medium, h, k)).collect();
                    out.push(VllmEvent::Removed { names, medium: vllm_medium(*medium) });
                }
                BlockChange::Stored { medium, parent, hashes, tokens, lora_name, cache_salt } => {
                    let names: Vec<Name> = hashes.iter().flat_map(|&h| self.stored(*medium, h, k)).collect();
                    let parent = match parent {
                        None => None,
                        Some(p) => Some(
                            self.of(*p, k, Some(*medium))
                                .pop()
                                .ok_or_else(|| CoreError::Internal(format!("block {p:#x} has no vLLM name")))?,
                        ),
                    };
                    let extra_keys =
                        extra_keys(names.len(), parent.is_none(), lora_name.as_deref(), cache_salt.as_deref());
                    out.push(VllmEvent::Stored {
                        names,
                        parent,
                        tokens: tokens.clone(),
                        medium: vllm_medium(*medium),
                        lora_name: lora_name.clone(),
                        extra_keys,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// A block as the router knows it: vLLM's medium (as the event says it) and the block's name.
type Key = (Option<String>, Name);

/// What the router should be told, given what each of `world` ranks says (see the module's
/// invariants). A rank reporting a block twice counts once, so the router (which counts stores)
/// never needs two removals. Remembers the blocks some rank holds: bounded by the tiers.
#[derive(Debug)]
pub struct RankAgreement {
    world: usize,
    holders: HashMap<Key, HashSet<usize>>,
    announced: HashSet<Key>,
}

impl RankAgreement {
    pub fn new(world: usize) -> Self {
        Self { world, holders: HashMap::new(), announced: HashSet::new() }
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// `rank` reports `names` stored in `medium`: the runs of consecutive positions in `names`
    /// every rank now holds and the router has not been told of, each to announce as one event.
    pub fn stored(&mut self, rank: usize, medium: Option<&str>, names: &[Name]) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let key = (medium.map(str::to_owned), name.clone());
            let holders = self.holders.entry(key.clone()).or_default();
            holders.insert(rank);
            if holders.len() >= self.world && self.announced.insert(key) {
                match runs.last_mut() {
                    Some(run) if run.end == i => run.end = i + 1,
                    _ => runs.push(i..i + 1),
                }
            }
        }
        runs
    }

    /// `rank` reports `names` removed from `medium`: the positions in `names` of the blocks the
    /// router was told of and must now be told are gone.
    pub fn removed(&mut self, rank: usize, medium: Option<&str>, names: &[Name]) -> Vec<usize> {
        let mut gone = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let key = (medium.map(str::to_owned), name.clone());
            let Some(holders) = self.holders.get_mut(&key) else { continue };
            holders.remove(&rank);
            let empty = holders.is_empty();
            if self.announced.remove(&key) {
                gone.push(i);
            }
            if empty {
                self.holders.remove(&key);
            }
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ints(v: &[u64]) -> Vec<Name> {
        v.iter().map(|&n| Name::Int(n)).collect()
    }

    fn stored(medium: Medium, parent: Option<u64>, hashes: &[u64], tokens: Vec<u32>) -> BlockChange {
        BlockChange::Stored { medium, parent, hashes: hashes.to_vec(), tokens, lora_name: None, cache_salt: None }
    }

    fn removed(medium: Medium, hashes: &[u64]) -> BlockChange {
        BlockChange::Removed { medium, hashes: hashes.to_vec() }
    }

    fn names_of(e: &VllmEvent) -> &[Name] {
        match e {
            VllmEvent::Stored { names, .. } | VllmEvent::Removed { names, .. } => names,
        }
    }

    fn parent_of(e: &VllmEvent) -> Option<&Name> {
        match e {
            VllmEvent::Stored { parent, .. } => parent.as_ref(),
            VllmEvent::Removed { .. } => None,
        }
    }

    #[test]
    fn sub_ids_equal_pythons_blake2b_with_an_8_byte_digest() {
        // int.from_bytes(hashlib.blake2b(h.to_bytes(8, "little") + j.to_bytes(4, "little"),
        // digest_size=8).digest(), "little"), computed by CPython 3.
        let cases: [(u64, u32, usize, u64); 5] = [
            (0, 0, 2, 0x1fb0b259359cf224),
            (10, 0, 2, 0x7a7e3638f20abcf3),
            (10, 1, 2, 0x998a180fa04f4879),
            (0xfedcba9876543210, 3, 4, 0xda08d30df9d50cd5),
            (u64::MAX, u32::MAX, 2, 0x93f9176f7f3524be),
        ];
        for (h, j, k, want) in cases {
            assert_eq!(sub_id(h, j, k), want, "sub_id({h:#x}, {j}, {k})");
        }
        assert_eq!(sub_id(12345, 0, 1), 12345, "one vLLM block per XConnector block: its own hash");
    }

    #[test]
    fn a_block_is_named_alike_at_store_and_removal_and_linked_to_its_parent() {
        let mut names = BlockNames::default();
        let changes = [
            stored(Medium::Memory, None, &[10, 11], (0..64).collect()),
            stored(Medium::Disk, Some(11), &[12], (64..96).collect()),
            removed(Medium::Memory, &[11]),
        ];
        // XConnector blocks of 32 tokens, vLLM blocks of 16: two vLLM blocks each.
        let events = names.events(&changes, 16, 32).unwrap();
        let first = names_of(&events[0]);
        assert_eq!(first.len(), 4);
        assert_eq!(first.iter().collect::<HashSet<_>>().len(), 4);
        assert_eq!(parent_of(&events[0]), None);
        assert_eq!(parent_of(&events[1]), Some(&first[3]), "the last vLLM block of block 11");
        assert_eq!(names_of(&events[2]), &first[2..], "block 11 = vLLM blocks 3 and 4");
        match &events[1] {
            VllmEvent::Stored { medium, tokens, .. } => {
                assert_eq!(*medium, "STORAGE");
                assert_eq!(tokens, &(64..96).collect::<Vec<u32>>());
            }
            other => panic!("expected a store, got {other:?}"),
        }
        assert!(matches!(events[2], VllmEvent::Removed { medium: "CPU", .. }));
        // One vLLM block per XConnector block and no vLLM names known: XConnector's hashes.
        let same = BlockNames::default().events(&changes[..1], 32, 32).unwrap();
        assert_eq!(names_of(&same[0]), ints(&[10, 11]));
    }

    #[test]
    fn a_removal_names_what_was_stored_even_after_names_are_learnt_or_forgotten() {
        let tokens: Vec<u32> = (0..64).collect();
        let ours = hashing::sequence_hashes(&tokens, 16, HashExtras::default());
        let vllm = ints(&[101, 102, 103, 104]);
        // Stored under a fallback name, learnt later: the removal still names what was told.
        let mut names = BlockNames::default();
        let early = names.events(&[stored(Medium::Memory, None, &ours[..2], tokens[..32].to_vec())], 16, 16).unwrap();
        assert_eq!(names_of(&early[0]), ints(&ours[..2]));
        names.learn(16, 16, &tokens, &vllm, HashExtras::default()).unwrap();
        let late = names.events(&[removed(Medium::Memory, &ours[..2])], 16, 16).unwrap();
        assert_eq!(names_of(&late[0]), ints(&ours[..2]));
        // Learnt first, then forgotten (capacity 1): the removal still names what was told.
        let mut small = BlockNames::new(1);
        small.learn(16, 16, &tokens[..16], &vllm[..1], HashExtras::default()).unwrap();
        let s = small.events(&[stored(Medium::Disk, None, &ours[..1], tokens[..16].to_vec())], 16, 16).unwrap();
        assert_eq!(names_of(&s[0]), &vllm[..1]);
        small.learn(16, 16, &tokens, &vllm, HashExtras::default()).unwrap();
        assert_eq!(small.of(ours[0], 1, None), ints(&ours[..1]), "forgotten");
        let r = small.events(&[removed(Medium::Disk, &ours[..1])], 16, 16).unwrap();
        assert_eq!(names_of(&r[0]), &vllm[..1]);
        // The parent is named as it was reported in the same medium.
        let c = small.events(&[stored(Medium::Memory, None, &ours[..1], tokens[..16].to_vec())], 16, 16).unwrap();
        let d = small
            .events(&[stored(Medium::Memory, Some(ours[0]), &ours[1..2], tokens[16..32].to_vec())], 16, 16)
            .unwrap();
        assert_eq!(parent_of(&d[0]), names_of(&c[0]).last());
    }

    #[test]
    fn learnt_names_are_bounded_least_recently_learnt_first() {
        let tokens: Vec<u32> = (0..64).collect();
        let ours = hashing::sequence_hashes(&tokens, 16, HashExtras::default());
        let mut small = BlockNames::new(2);
        small.learn(16, 16, &tokens, &ints(&[101, 102, 103, 104]), HashExtras::default()).unwrap();
        assert_eq!(small.of(ours[3], 1, None), ints(&[104]));
        assert_eq!(small.of(ours[0], 1, None), ints(&ours[..1]));
        // Learning a block again makes it the most recent.
        small.learn(16, 16, &tokens[..16], &ints(&[101]), HashExtras::default()).unwrap();
        small.learn(16, 16, &tokens[16..32], &ints(&[999]), HashExtras::default()).unwrap();
        assert_eq!(small.of(ours[0], 1, None), ints(&[101]));
        assert_eq!(small.of(ours[3], 1, None), ints(&ours[3..4]));
        // Fewer names than blocks: only whole XConnector blocks are learnt.
        let mut names = BlockNames::default();
        names.learn(32, 16, &tokens, &ints(&[1, 2, 3]), HashExtras::default()).unwrap();
        let ours32 = hashing::sequence_hashes(&tokens, 32, HashExtras::default());
        assert_eq!(names.of(ours32[0], 2, None), ints(&[1, 2]));
        assert_ne!(names.of(ours32[1], 2, None), ints(&[3]));
        assert!(names.learn(8, 16, &tokens, &[], HashExtras::default()).is_err());
        assert!(names.events(&[], 0, 16).is_err());
    }

    #[test]
    fn extra_keys_carry_the_lora_name_and_the_salt_in_a_requests_first_block_only() {
        let s = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(extra_keys(2, true, None, Some("salt")), Some(vec![s(&["salt"]), None]));
        assert_eq!(extra_keys(2, false, None, Some("salt")), None);
        assert_eq!(extra_keys(2, true, Some("l"), Some("salt")), Some(vec![s(&["l", "salt"]), s(&["l"])]));
        assert_eq!(extra_keys(1, false, Some("l"), None), Some(vec![s(&["l"])]));
        assert_eq!(extra_keys(2, true, Some(""), Some("")), None);
        assert_eq!(extra_keys(0, true, Some("l"), Some("salt")), None);
    }

    #[test]
    fn ranks_agree_a_block_is_held_once_all_hold_it_and_gone_once_one_drops_it() {
        let none: Vec<Range<usize>> = Vec::new();
        let cpu = Some("CPU");
        let mut agree = RankAgreement::new(2);
        assert_eq!(agree.stored(0, cpu, &ints(&[1, 2, 3])), none);
        assert_eq!(agree.stored(1, cpu, &ints(&[1])), vec![0..1], "only block 1 is on both ranks");
        assert_eq!(agree.stored(1, cpu, &ints(&[2, 3])), vec![0..2]);
        assert_eq!(agree.stored(0, cpu, &ints(&[1])), none, "announced once only");
        assert_eq!(agree.removed(0, cpu, &ints(&[2])), vec![0], "the first rank to drop it ends it");
        assert_eq!(agree.removed(1, cpu, &ints(&[2, 3])), vec![1]);
        assert_eq!(agree.stored(0, cpu, &ints(&[7])), none, "only some ranks hold 7");
        assert_eq!(agree.removed(0, cpu, &ints(&[7])), Vec::<usize>::new());
        // Mediums are apart: a block on both ranks' disks is not on their host memory.
        assert_eq!(agree.stored(0, Some("STORAGE"), &ints(&[1])), none);
        assert_eq!(agree.removed(0, Some("STORAGE"), &ints(&[1])), Vec::<usize>::new());
        // Runs: held positions 0, 1 and 3 are two events.
        let mut two = RankAgreement::new(2);
        two.stored(0, cpu, &ints(&[4, 5, 6, 8]));
        assert_eq!(two.stored(1, cpu, &ints(&[4, 5, 9, 8])), vec![0..2, 3..4]);
        // One rank: what it says, in order.
        let mut one = RankAgreement::new(1);
        assert_eq!(one.stored(0, cpu, &ints(&[5, 6])), vec![0..2]);
        assert_eq!(one.removed(0, cpu, &ints(&[5])), vec![0]);
    }

    #[test]
    fn a_chunk_is_a_bounded_whole_number_of_vllm_blocks() {
        assert_eq!(blocks_per_chunk(16, 64).unwrap(), 4);
        for (bs, chunk) in [(16, 8), (16, 40), (0, 16), (1, (1 << 16) + 1)] {
            assert!(blocks_per_chunk(bs, chunk).is_err(), "{bs} {chunk}");
        }
    }

    #[test]
    fn bytes_and_ints_are_different_names() {
        let mut agree = RankAgreement::new(1);
        let bytes = Name::Bytes(vec![5].into_boxed_slice());
        assert_eq!(agree.stored(0, None, &[bytes.clone(), Name::Int(5)]), vec![0..2]);
        assert_eq!(agree.removed(0, None, &[bytes]), vec![0]);
    }
}
