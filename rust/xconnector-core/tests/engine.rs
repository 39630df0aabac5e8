//! Engine behaviour through its public API: round trips, prefix lookups, leaf-first LRU eviction,
//! the byte budget, and concurrent use.

use std::sync::Arc;
use std::thread;

use proptest::prelude::*;
use xconnector_core::{CoreError, Engine, EngineConfig, HashExtras, Namespace};

const BS: usize = 4;
const BB: usize = 64;

fn engine(capacity_blocks: u64) -> Engine {
    engine_ns(capacity_blocks, Namespace { model: "m".into(), ..Default::default() })
}

fn engine_ns(capacity_blocks: u64, namespace: Namespace) -> Engine {
    Engine::new(EngineConfig {
        block_size: BS,
        block_bytes: BB,
        capacity_bytes: capacity_blocks * BB as u64,
        namespace,
        disk: None,
        redis: None,
        events: None,
    })
    .unwrap()
}

/// Deterministic payload: each block's bytes derive from its tokens, so a wrong block is detectable.
fn payload(tokens: &[u32]) -> Vec<u8> {
    tokens
        .chunks_exact(BS)
        .flat_map(|b| {
            let seed = b.iter().fold(17u32, |a, t| a.wrapping_mul(31).wrapping_add(*t));
            (0..BB).map(move |i| (seed.wrapping_add(i as u32 * 7) % 251) as u8)
        })
        .collect()
}

fn seq(start: u32, n: usize) -> Vec<u32> {
    (start..start + n as u32).collect()
}

const NONE: HashExtras<'static> = HashExtras { lora_name: None, cache_salt: None, lora_id: None };

#[test]
fn round_trip_and_prefix_lookup() {
    let e = engine(100);
    let t = seq(1, 4 * BS + 2); // 4 full blocks + partial
    let p = payload(&t);
    let out = e.store(&t, &p, NONE).unwrap();
    assert_eq!((out.stored, out.existing, out.rejected), (4, 0, 0));
    assert_eq!(e.lookup(&t, NONE).unwrap(), 4 * BS);
    let mut buf = vec![0u8; p.len()];
    assert_eq!(e.load(&t, &mut buf, NONE).unwrap(), 4 * BS);
    assert_eq!(buf, p);

    // A request sharing the first two blocks hits exactly those.
    let mut other = t[..2 * BS].to_vec();
    other.extend([999, 998, 997, 996]);
    assert_eq!(e.lookup(&other, NONE).unwrap(), 2 * BS);
    // The same tokens in another namespace, or with a LoRA, miss.
    assert_eq!(e.lookup(&t, HashExtras { lora_name: Some("x"), cache_salt: None, lora_id: None }).unwrap(), 0);
    let e2 = engine_ns(100, Namespace { model: "other".into(), ..Default::default() });
    assert_eq!(e2.lookup(&t, NONE).unwrap(), 0);
    // Storing again finds everything present.
    let again = e.store(&t, &p, NONE).unwrap();
    assert_eq!((again.stored, again.existing), (0, 4));
    e.check_invariants().unwrap();
}

#[test]
fn load_is_capped_by_the_output_buffer() {
    let e = engine(10);
    let t = seq(1, 3 * BS);
    let p = payload(&t);
    e.store(&t, &p, NONE).unwrap();
    let mut buf = vec![0u8; 2 * BB + 10];
    assert_eq!(e.load(&t, &mut buf, NONE).unwrap(), 2 * BS);
    assert_eq!(&buf[..2 * BB], &p[..2 * BB]);
    assert!(buf[2 * BB..].iter().all(|&b| b == 0));
}

#[test]
fn wrong_payload_size_is_a_clear_error_and_stores_nothing() {
    let e = engine(10);
    let t = seq(1, 2 * BS + 1);
    let err = e.store(&t, &[0u8; BB], NONE).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CoreError::InvalidInput(_)));
    assert!(msg.contains("2 full block(s)") && msg.contains(&format!("{}", 2 * BB)), "{msg}");
    assert_eq!(e.lookup(&t, NONE).unwrap(), 0);
    assert_eq!(e.stats().tier.entries, 0);
}

#[test]
fn bad_configs_are_rejected() {
    let ns = Namespace::default();
    let mk = |block_size, block_bytes, capacity_bytes| {
        Engine::new(EngineConfig {
            block_size,
            block_bytes,
            capacity_bytes,
            namespace: ns.clone(),
            disk: None,
            redis: None,
            events: None,
        })
    };
    assert!(matches!(mk(0, 64, 1024), Err(CoreError::Config(_))));
    assert!(matches!(mk(16, 0, 1024), Err(CoreError::Config(_))));
    let err = mk(16, 4096, 100).err().unwrap().to_string();
    assert!(err.contains("smaller than one block"), "{err}");
}

#[test]
fn lru_evicts_least_recently_used_sequence_first() {
    let e = engine(4);
    let a = seq(100, 2 * BS);
    let b = seq(200, 2 * BS);
    e.store(&a, &payload(&a), NONE).unwrap();
    e.store(&b, &payload(&b), NONE).unwrap();
    // Use `a` so that `b` becomes the least recently used.
    let mut buf = vec![0u8; 2 * BB];
    e.load(&a, &mut buf, NONE).unwrap();
    let c = seq(300, 2 * BS);
    e.store(&c, &payload(&c), NONE).unwrap();
    assert_eq!(e.lookup(&a, NONE).unwrap(), 2 * BS);
    assert_eq!(e.lookup(&b, NONE).unwrap(), 0);
    assert_eq!(e.lookup(&c, NONE).unwrap(), 2 * BS);
    assert_eq!(e.stats().tier.evicted_blocks, 2);
    e.check_invariants().unwrap();
}

#[test]
fn eviction_takes_leaves_first_and_keeps_prefixes_reachable() {
    let e = engine(5);
    let long = seq(1, 4 * BS);
    e.store(&long, &payload(&long), NONE).unwrap();
    // One new block forces one eviction: it must be the leaf (block 3), never the root.
    let x = seq(500, BS);
    e.store(&x, &payload(&x), NONE).unwrap();
    let y = seq(600, BS);
    e.store(&y, &payload(&y), NONE).unwrap();
    assert_eq!(e.lookup(&long, NONE).unwrap(), 3 * BS);
    let z = seq(700, BS);
    e.store(&z, &payload(&z), NONE).unwrap();
    assert_eq!(e.lookup(&long, NONE).unwrap(), 2 * BS);
    e.check_invariants().unwrap();
}

#[test]
fn shared_prefix_survives_while_a_branch_is_in_use() {
    let e = engine(4);
    let root = seq(1, BS);
    let mut b1 = root.clone();
    b1.extend(seq(10, BS));
    let mut b2 = root.clone();
    b2.extend(seq(20, BS));
    e.store(&b1, &payload(&b1), NONE).unwrap();
    e.store(&b2, &payload(&b2), NONE).unwrap();
    assert_eq!(e.stats().tier.entries, 3);
    let filler = seq(900, 2 * BS);
    e.store(&filler, &payload(&filler), NONE).unwrap(); // needs 1 eviction: the older leaf b1[1]
    assert_eq!(e.lookup(&b1, NONE).unwrap(), BS);
    assert_eq!(e.lookup(&b2, NONE).unwrap(), 2 * BS);
    e.check_invariants().unwrap();
}

#[test]
fn pinned_blocks_are_never_evicted_and_stores_degrade_to_a_prefix() {
    let e = engine(2);
    let a = seq(1, 2 * BS);
    let p = payload(&a);
    e.store(&a, &p, NONE).unwrap();
    let pins = e.pin_prefix(&a, NONE, usize::MAX).unwrap();
    assert_eq!(pins.len(), 2);
    assert_eq!(pins[1].bytes(), &p[BB..]);
    let b = seq(50, 2 * BS);
    let out = e.store(&b, &payload(&b), NONE).unwrap();
    assert_eq!((out.stored, out.rejected), (0, 2));
    assert_eq!(e.stats().tier.pinned, 2);
    drop(pins);
    assert_eq!(e.stats().tier.pinned, 0);
    let out = e.store(&b, &payload(&b), NONE).unwrap();
    assert_eq!(out.stored, 2);
    assert_eq!(e.lookup(&a, NONE).unwrap(), 0);
    e.check_invariants().unwrap();
}

#[test]
fn eight_threads_store_lookup_and_load_concurrently() {
    let e = Arc::new(engine(64));
    let handles: Vec<_> = (0..8u32)
        .map(|t| {
            let e = Arc::clone(&e);
            thread::spawn(move || {
                let mut rng = t.wrapping_mul(2654435761).wrapping_add(1);
                let mut next = || {
                    rng ^= rng << 13;
                    rng ^= rng >> 17;
                    rng ^= rng << 5;
                    rng
                };
                for _ in 0..3000 {
                    // 12 prompts sharing prefixes of varying length.
                    let prompt = next() % 12;
                    let n_blocks = 1 + (next() % 8) as usize;
                    let toks: Vec<u32> = (0..n_blocks * BS)
                        .map(|i| if i < 2 * BS { i as u32 } else { prompt * 1000 + i as u32 })
                        .collect();
                    match next() % 3 {
                        0 => {
                            e.store(&toks, &payload(&toks), NONE).unwrap();
                        }
                        1 => {
                            let hit = e.lookup(&toks, NONE).unwrap();
                            assert_eq!(hit % BS, 0);
                        }
                        _ => {
                            let mut buf = vec![0u8; n_blocks * BB];
                            let got = e.load(&toks, &mut buf, NONE).unwrap();
                            // Every loaded byte is exactly what was stored for those tokens.
                            assert_eq!(&buf[..got / BS * BB], &payload(&toks[..got])[..]);
                        }
                    }
                    let st = e.stats().tier;
                    assert!(st.used_bytes <= st.capacity_bytes);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    e.check_invariants().unwrap();
    let st = e.stats();
    assert!(st.tier.used_bytes <= 64 * BB as u64 && st.tier.allocated_bytes <= 64 * BB as u64);
    assert!(st.tier.evicted_blocks > 0 && st.loaded_blocks > 0, "{st:?}");
    assert_eq!(st.tier.pinned, 0);
}

#[derive(Debug, Clone)]
enum Op {
    Store(u8, u8),
    Load(u8, u8),
    Pin(u8, u8),
    Unpin,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, 1u8..6).prop_map(|(p, n)| Op::Store(p, n)),
        (0u8..6, 1u8..6).prop_map(|(p, n)| Op::Load(p, n)),
        (0u8..6, 1u8..6).prop_map(|(p, n)| Op::Pin(p, n)),
        Just(Op::Unpin),
    ]
}

proptest! {
    /// Any sequence of operations keeps every invariant, never exceeds the budget, and never
    /// serves bytes other than those stored for the same tokens.
    #[test]
    fn random_operations_keep_invariants(ops in proptest::collection::vec(op(), 1..80), cap in 1u64..12) {
        let e = engine(cap);
        let mut pins = Vec::new();
        let tokens = |p: u8, n: u8| -> Vec<u32> {
            // Prompts 0-2 share their first block; 3-5 are distinct.
            (0..n as usize * BS).map(|i| if i < BS && p < 3 { i as u32 } else { u32::from(p) * 100 + i as u32 }).collect()
        };
        for op in ops {
            match op {
                Op::Store(p, n) => { let t = tokens(p, n); e.store(&t, &payload(&t), NONE).unwrap(); }
                Op::Load(p, n) => {
                    let t = tokens(p, n);
                    let hit = e.lookup(&t, NONE).unwrap();
                    let mut buf = vec![0u8; t.len() / BS * BB];
                    let got = e.load(&t, &mut buf, NONE).unwrap();
                    prop_assert_eq!(got, hit);
                    prop_assert_eq!(&buf[..got / BS * BB], &payload(&t[..got])[..]);
                }
                Op::Pin(p, n) => pins.extend(e.pin_prefix(&tokens(p, n), NONE, usize::MAX).unwrap()),
                Op::Unpin => pins.clear(),
            }
            prop_assert!(e.check_invariants().is_ok(), "{:?}", e.check_invariants());
            let st = e.stats().tier;
            prop_assert!(st.used_bytes <= cap * BB as u64);
        }
    }
}

#[test]
fn a_request_moved_in_parts_is_stored_and_loaded_whole() {
    let e = engine(100);
    let t = seq(1, 6 * BS + 1);
    let p = payload(&t);
    // Blocks 0..2, then 2..6 on top of them.
    assert_eq!(e.store_from(&t[..2 * BS], 0, &p[..2 * BB], NONE).unwrap().stored, 2);
    assert_eq!(e.store_from(&t, 2, &p[2 * BB..], NONE).unwrap().stored, 4);
    let mut whole = vec![0u8; p.len()];
    assert_eq!(e.load(&t, &mut whole, NONE).unwrap(), 6 * BS);
    assert_eq!(whole, p);
    // Blocks 3..5 alone: the tokens of the prefix through block 5, and exactly those bytes.
    let mut part = vec![0u8; 2 * BB];
    assert_eq!(e.load_from(&t, 3, &mut part, NONE).unwrap(), 5 * BS);
    assert_eq!(part, p[3 * BB..5 * BB]);
}

#[test]
fn a_part_whose_earlier_blocks_are_not_cached_stores_nothing() {
    let e = engine(100);
    let t = seq(1, 4 * BS);
    let p = payload(&t);
    e.store_from(&t[..BS], 0, &p[..BB], NONE).unwrap();
    // Block 1 is not cached, and blocks 2..4 are all this part holds: nothing may be stored
    // (least of all block 1, whose KV the part does not have).
    let out = e.store_from(&t, 2, &p[2 * BB..], NONE).unwrap();
    assert_eq!(out.stored, 0);
    assert_eq!(e.lookup(&t, NONE).unwrap(), BS);
    let mut whole = vec![0u8; 4 * BB];
    assert_eq!(e.load(&t, &mut whole, NONE).unwrap(), BS);
    // A part past what the cache holds loads nothing of it: the prefix ends before it.
    let mut part = vec![0u8; 2 * BB];
    assert_eq!(e.load_from(&t, 2, &mut part, NONE).unwrap(), BS);
    assert!(part.iter().all(|&b| b == 0));
    // The payload must be exactly the part's blocks.
    let err = e.store_from(&t, 2, &p[..BB], NONE).unwrap_err().to_string();
    assert!(err.contains("from block 2"), "{err}");
}
