//! Never serve wrong KV: a value is served only to the block it is the KV of (namespace, sequence
//! hash and digest of its tokens and parent), in every tier; a copy under another key, or another
//! prefix whose 64-bit hash collides, is a miss, counted, and removed.

use std::path::Path;
use std::time::Duration;

use xconnector_core::disk_tier::HEADER;
use xconnector_core::hashing::{block_digests, sequence_hashes};
use xconnector_core::memory_tier::MemoryTier;
use xconnector_core::{DiskConfig, Engine, EngineConfig, HashExtras, Namespace};

const BS: usize = 4;
const BB: usize = 64;
const X: HashExtras<'static> = HashExtras { lora_name: None, cache_salt: None, lora_id: None };

fn payload(tokens: &[u32]) -> Vec<u8> {
    tokens
        .chunks_exact(BS)
        .enumerate()
        .flat_map(|(i, b)| {
            let seed = b.iter().fold(17u32 + i as u32, |a, t| a.wrapping_mul(31).wrapping_add(*t));
            (0..BB).map(move |j| (seed.wrapping_add(j as u32 * 7) % 251) as u8)
        })
        .collect()
}

fn disk_engine(dir: &Path, memory_blocks: u64) -> Engine {
    Engine::new(EngineConfig {
        block_size: BS,
        block_bytes: BB,
        capacity_bytes: memory_blocks * BB as u64,
        namespace: Namespace { model: "m".into(), ..Namespace::default() },
        disk: Some(DiskConfig {
            dir: dir.to_path_buf(),
            capacity_bytes: 64 * (BB + HEADER) as u64,
            queue_blocks: 64,
            shared: false,
        }),
        redis: None,
        events: None,
    })
    .unwrap()
}

#[test]
fn a_memory_block_under_a_colliding_hash_is_not_served_to_another_prefix() {
    // A 64-bit sequence-hash collision cannot be produced on demand, so the tier is driven with
    // the same hash and two prefixes' digests, which is exactly what a collision looks like to it.
    let tier = MemoryTier::new(BB, 8 * BB as u64);
    let (a, b) = ((1..=8).collect::<Vec<u32>>(), (101..=108).collect::<Vec<u32>>());
    let hashes = sequence_hashes(&a, BS, X);
    let (da, db) = (block_digests(&a, BS), block_digests(&b, BS));
    let res = tier.reserve(7, &hashes, &da).unwrap();
    assert_eq!(res.new_blocks.len(), 2);
    tier.publish(&res);
    assert!(tier.pin_prefix(7, &hashes, &db, 2).is_empty(), "the other prefix's digest: a miss");
    assert_eq!(tier.stats().mismatched_blocks, 1);
    // Nor does a store of the other prefix chain onto it.
    let other = tier.reserve(7, &hashes, &db).unwrap();
    assert_eq!((other.new_blocks.len(), other.existing, other.rejected), (0, 0, 2));
    let pinned = tier.pin_prefix(7, &hashes, &da, 2);
    assert_eq!(pinned.len(), 2, "the prefix it belongs to still gets it");
    tier.unpin(&pinned);
    tier.check_invariants().unwrap();
}

#[test]
fn a_disk_block_copied_under_another_key_is_a_miss_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c): (Vec<u32>, Vec<u32>) = ((1..=2 * BS as u32).collect(), (501..=500 + 2 * BS as u32).collect());
    let ns = {
        let e = disk_engine(dir.path(), 16);
        e.store(&a, &payload(&a), X).unwrap();
        e.store(&c, &payload(&c), X).unwrap();
        assert!(e.flush(Duration::from_secs(10)));
        e.namespace_id()
    };
    let file = |h: u64| {
        dir.path().join(format!("{ns:016x}")).join(format!("{:02x}", h >> 56)).join(format!("{ns:016x}-{h:016x}.xcb"))
    };
    let (ha, hc) = (sequence_hashes(&a, BS, X), sequence_hashes(&c, BS, X));
    // C's second block, intact, now sits where A's second block was.
    std::fs::copy(file(hc[1]), file(ha[1])).unwrap();
    let e = disk_engine(dir.path(), 16);
    assert_eq!(e.lookup(&a, X).unwrap(), 2 * BS, "the file exists, so the lookup promises it");
    let mut out = vec![0u8; 2 * BB];
    assert_eq!(e.load(&a, &mut out, X).unwrap(), BS, "only A's own first block is served");
    assert_eq!(&out[..BB], &payload(&a)[..BB]);
    assert_ne!(&out[BB..], &payload(&c)[BB..], "C's KV never reaches A's buffer");
    let s = e.stats().disk.unwrap();
    assert_eq!((s.mismatched_blocks, s.corrupt_blocks), (1, 0));
    assert!(!file(ha[1]).exists(), "the mismatched file is removed");
    // Stored again, A's block is A's.
    e.store(&a, &payload(&a), X).unwrap();
    assert!(e.flush(Duration::from_secs(10)));
    drop(e);
    let e = disk_engine(dir.path(), 16);
    assert_eq!(e.load(&a, &mut out, X).unwrap(), 2 * BS);
    assert_eq!(out, payload(&a));
}

#[test]
fn the_digest_is_what_a_block_is_checked_against_so_the_hash_alone_cannot_serve_it() {
    // Two prefixes that end in the same block have different digests for it (it chains over the
    // parent), and a prefix of a request has the request's digests.
    let a: Vec<u32> = (1..=12).collect();
    let mut b = a.clone();
    b[0] = 999;
    let (da, db) = (block_digests(&a, BS), block_digests(&b, BS));
    assert!(da.iter().zip(&db).all(|(x, y)| x != y));
    assert_eq!(block_digests(&a[..8], BS), da[..2]);
}

#[test]
fn a_disk_block_with_the_right_key_and_another_digest_is_a_miss() {
    // The key (namespace, hash) alone is not enough: only the digest tells a colliding prefix.
    use xconnector_core::disk_tier::DiskTier;
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path(), 7, 64 * (BB + HEADER) as u64, BB, false).unwrap();
    let (a, other): (Vec<u32>, Vec<u32>) = ((1..=BS as u32).collect(), (900..900 + BS as u32).collect());
    let hash = sequence_hashes(&a, BS, X)[0];
    let (da, d_other) = (block_digests(&a, BS)[0], block_digests(&other, BS)[0]);
    tier.put(7, hash, d_other, 0, &payload(&other), None).unwrap();
    let mut out = vec![0u8; BB];
    assert!(!tier.get(7, hash, da, &mut out), "another prefix's block under the same key");
    let s = tier.stats();
    assert_eq!((s.mismatched_blocks, s.corrupt_blocks, s.entries), (1, 0, 0));
    tier.put(7, hash, da, 0, &payload(&a), None).unwrap();
    assert!(tier.get(7, hash, da, &mut out));
    assert_eq!(out, payload(&a));
}

#[test]
fn a_block_changed_through_a_view_is_never_served_again() {
    // What `torch.frombuffer(view)` allows despite the read-only buffer: a write into the cache.
    let e = Engine::new(EngineConfig {
        block_size: BS,
        block_bytes: BB,
        capacity_bytes: 16 * BB as u64,
        namespace: Namespace { model: "m".into(), ..Namespace::default() },
        disk: None,
        redis: None,
        events: None,
    })
    .unwrap();
    let a: Vec<u32> = (1..=3 * BS as u32).collect();
    e.store(&a, &payload(&a), X).unwrap();
    let mut out = vec![0u8; 3 * BB];
    assert_eq!(e.load(&a, &mut out, X).unwrap(), 3 * BS, "nothing exported yet: served");
    {
        let views = e.pin_prefix(&a, X, usize::MAX).unwrap();
        assert_eq!(views.len(), 3);
        // What a consumer writing through the view does: one byte of the second block.
        // SAFETY: the block is pinned (the view lives) and BB bytes long; nothing else reads it now.
        unsafe { *(views[1].as_ptr() as *mut u8) ^= 0xFF };
    }
    assert_eq!(e.load(&a, &mut out, X).unwrap(), BS, "the changed block ends the prefix");
    assert_eq!(&out[..BB], &payload(&a)[..BB]);
    assert_eq!(e.stats().tier.spoiled_blocks, 1);
    assert_eq!(e.pin_prefix(&a, X, usize::MAX).unwrap().len(), 1, "nor is it exported again");
    assert_eq!(e.stats().tier.pinned, 0);
    e.check_invariants().unwrap();
}
