//! Block events (what a host reports as vLLM KV events): replaying them must give exactly what
//! each tier holds, every stored block's parent must already be known in its medium, and nothing
//! is recorded until the host asks.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use xconnector_core::block_journal::{BlockChange, Medium};
use xconnector_core::disk_tier::HEADER;
use xconnector_core::{DiskConfig, Engine, EngineConfig, HashExtras, Namespace};

const BS: usize = 4;
const BB: usize = 64;
const X: HashExtras<'static> = HashExtras { lora_name: None, cache_salt: None, lora_id: None };

fn engine(memory_blocks: u64, disk: Option<(&Path, u64)>) -> Engine {
    Engine::new(EngineConfig {
        block_size: BS,
        block_bytes: BB,
        capacity_bytes: memory_blocks * BB as u64,
        namespace: Namespace { model: "m".into(), ..Namespace::default() },
        disk: disk.map(|(dir, blocks)| DiskConfig {
            dir: dir.to_path_buf(),
            capacity_bytes: blocks * (BB + HEADER) as u64,
            queue_blocks: 4096,
            shared: false,
        }),
        redis: None,
        events: None,
    })
    .unwrap()
}

fn prompt(seed: u32, blocks: usize) -> Vec<u32> {
    (0..(blocks * BS) as u32).map(|i| seed * 1000 + i).collect()
}

fn store(e: &Engine, tokens: &[u32]) {
    e.store(tokens, &vec![7u8; tokens.len() / BS * BB], X).unwrap();
}

/// The blocks each medium holds according to the events, checking on the way that every
/// stored run's parent is known in that medium (a router drops a run whose parent it lacks).
#[derive(Default)]
struct Replay {
    memory: HashSet<u64>,
    disk: HashSet<u64>,
    orphans: usize,
}

impl Replay {
    fn apply(&mut self, changes: Vec<BlockChange>) {
        for c in changes {
            match c {
                BlockChange::Stored { medium, parent, hashes, tokens, .. } => {
                    assert_eq!(tokens.len(), hashes.len() * BS, "a stored event carries its blocks' tokens");
                    let set = self.set(medium);
                    if parent.is_some_and(|p| !set.contains(&p)) {
                        self.orphans += 1;
                    }
                    for h in hashes {
                        // A router counts stores: a second one would need a second removal.
                        assert!(self.set(medium).insert(h), "{h:x} stored twice in {medium:?}");
                    }
                }
                BlockChange::Removed { medium, hashes } => {
                    for h in hashes {
                        assert!(self.set(medium).remove(&h), "removed {h:x} from {medium:?}, which was not reported");
                    }
                }
            }
        }
    }

    fn set(&mut self, medium: Medium) -> &mut HashSet<u64> {
        match medium {
            Medium::Memory => &mut self.memory,
            Medium::Disk => &mut self.disk,
        }
    }
}

/// Hashes of the block files under `dir` (`<dir>/<ns>/<hh>/<ns>-<hash>.xcb`).
fn on_disk(dir: &Path) -> HashSet<u64> {
    let mut out = HashSet::new();
    for space in std::fs::read_dir(dir).unwrap().flatten() {
        for sub in std::fs::read_dir(space.path()).unwrap().flatten() {
            for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
                let name = f.file_name().into_string().unwrap();
                let hash = name.strip_suffix(".xcb").and_then(|n| n.split('-').nth(1)).unwrap();
                out.insert(u64::from_str_radix(hash, 16).unwrap());
            }
        }
    }
    out
}

#[test]
fn nothing_is_recorded_until_asked() {
    let e = engine(8, None);
    store(&e, &prompt(1, 3));
    assert!(e.take_block_events().is_empty());
    assert_eq!(e.block_events_stats(), None);
    e.enable_block_events(1024);
    store(&e, &prompt(2, 2));
    let events = e.take_block_events();
    let hashes = e.hashes(&prompt(2, 2), X);
    assert_eq!(
        events,
        vec![BlockChange::Stored {
            medium: Medium::Memory,
            parent: None,
            hashes,
            tokens: prompt(2, 2),
            lora_name: None,
            cache_salt: None
        }]
    );
}

#[test]
fn replaying_memory_events_gives_what_memory_holds_under_eviction() {
    let e = engine(10, None);
    e.enable_block_events(1 << 16);
    let mut replay = Replay::default();
    let prompts: Vec<Vec<u32>> = (0..12).map(|s| prompt(s, 1 + (s as usize * 7) % 5)).collect();
    for round in 0..4 {
        for (k, p) in prompts.iter().enumerate() {
            if (k + round) % 3 == 0 {
                continue;
            }
            // A shared prefix (prompt 0's first block) under some prompts: parents shared.
            let mut tokens = if k % 2 == 0 { prompts[0][..BS].to_vec() } else { Vec::new() };
            tokens.extend(p);
            store(&e, &tokens);
            replay.apply(e.take_block_events());
            // Memory only: a prompt's lookup is the run of its blocks memory holds.
            for q in &prompts {
                let held = e.lookup(q, X).unwrap() / BS;
                let reported = e.hashes(q, X).iter().take_while(|h| replay.memory.contains(h)).count();
                assert_eq!(reported, held, "round {round}, prompt {k}: events disagree with memory");
            }
        }
    }
    assert_eq!(replay.orphans, 0);
    let stats = e.block_events_stats().unwrap();
    assert_eq!(stats.dropped_blocks, 0);
    assert!(stats.reported_blocks > 40, "eviction happened: {stats:?}");
}

#[test]
fn disk_events_follow_the_files_and_promotion_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(4, Some((dir.path(), 8)));
    e.enable_block_events(1 << 16);
    let mut replay = Replay::default();
    let (a, b, c) = (prompt(1, 4), prompt(2, 4), prompt(3, 4));
    store(&e, &a);
    store(&e, &b); // memory holds 4: a is evicted from memory, disk holds both
    assert!(e.flush(Duration::from_secs(10)));
    replay.apply(e.take_block_events());
    assert_eq!(replay.disk, on_disk(dir.path()));
    assert_eq!(replay.disk.len(), 8);
    assert_eq!(replay.memory, e.hashes(&b, X).into_iter().collect());
    // A load of `a` promotes it from disk into memory (evicting b there): reported.
    assert_eq!(e.load(&a, &mut vec![0u8; 4 * BB], X).unwrap(), a.len());
    replay.apply(e.take_block_events());
    assert_eq!(replay.memory, e.hashes(&a, X).into_iter().collect());
    // c pushes the least recently used blocks (b's) off the disk: reported as removed there.
    store(&e, &c);
    assert!(e.flush(Duration::from_secs(10)));
    replay.apply(e.take_block_events());
    assert_eq!(replay.disk, on_disk(dir.path()));
    assert!(e.hashes(&b, X).iter().all(|h| !replay.disk.contains(h)));
    assert_eq!(replay.memory, e.hashes(&c, X).into_iter().collect());
    assert_eq!(replay.orphans, 0);
}

#[test]
fn blocks_from_an_earlier_run_are_reported_once_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let a = prompt(3, 3);
    {
        let e = engine(8, Some((dir.path(), 16)));
        store(&e, &a);
        assert!(e.flush(Duration::from_secs(10)));
    }
    let e = engine(8, Some((dir.path(), 16)));
    e.enable_block_events(1024);
    assert!(e.take_block_events().is_empty(), "found on disk: no tokens to report");
    store(&e, &a);
    assert!(e.flush(Duration::from_secs(10)));
    let mut replay = Replay::default();
    replay.apply(e.take_block_events());
    assert_eq!(replay.disk, on_disk(dir.path()));
    assert_eq!(replay.disk.len(), 3);
}

#[test]
fn a_journal_nobody_drains_stays_bounded() {
    let e = engine(64, None);
    e.enable_block_events(10);
    for s in 0..8 {
        store(&e, &prompt(s, 4));
    }
    let stats = e.block_events_stats().unwrap();
    assert_eq!(stats.dropped_blocks, 6 * 4, "two 4-block stores fit in 10: {stats:?}");
    assert_eq!(e.take_block_events().iter().map(BlockChange::blocks).sum::<usize>(), 8);
}
