//! A panic or error in the middle of a store, load or promotion leaves nothing behind: no slot
//! stuck reserved (the key can be stored again, the capacity is whole), no block left pinned.
//! Fault points are process-wide, so this binary has one test that runs the cases in order.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use xconnector_core::disk_tier::HEADER;
use xconnector_core::faults::{inject, Fault, FaultPoint};
use xconnector_core::{DiskConfig, Engine, EngineConfig, HashExtras, Namespace};

const BS: usize = 4;
const BB: usize = 64;
const X: HashExtras<'static> = HashExtras { lora_name: None, cache_salt: None, lora_id: None };

fn payload(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| (0..BB / BS).map(move |i| (*t as usize * 13 + i) as u8)).collect()
}

fn engine(blocks: u64, disk: Option<&std::path::Path>) -> Engine {
    Engine::new(EngineConfig {
        block_size: BS,
        block_bytes: BB,
        capacity_bytes: blocks * BB as u64,
        namespace: Namespace { model: "m".into(), ..Namespace::default() },
        disk: disk.map(|d| DiskConfig {
            dir: d.to_path_buf(),
            capacity_bytes: 64 * (BB + HEADER) as u64,
            queue_blocks: 64,
            shared: false,
        }),
        redis: None,
        events: None,
    })
    .unwrap()
}

fn quiet<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = catch_unwind(AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    out
}

#[test]
fn faults_inside_the_copy_loops_leave_nothing_behind() {
    let t: Vec<u32> = (1..=4 * BS as u32).collect();
    let p = payload(&t);

    // A panic while a store copies: its reserved slots are taken back.
    let e = engine(4, None);
    inject(FaultPoint::StoreCopy, Fault::Panic);
    assert!(quiet(|| e.store(&t, &p, X)).is_err());
    inject(FaultPoint::StoreCopy, Fault::None);
    e.check_invariants().unwrap();
    let s = e.stats();
    assert_eq!((s.tier.entries, s.tier.pinned), (0, 0));
    assert_eq!(e.lookup(&t, X).unwrap(), 0);
    // The same key is storable again and the whole budget (4 blocks) is there.
    assert_eq!(e.store(&t, &p, X).unwrap().stored, 4);
    let mut out = vec![0u8; p.len()];
    assert_eq!(e.load(&t, &mut out, X).unwrap(), t.len());
    assert_eq!(out, p);

    // A panic while a load copies: its pins are released.
    inject(FaultPoint::LoadCopy, Fault::Panic);
    assert!(quiet(|| e.load(&t, &mut out, X)).is_err());
    inject(FaultPoint::LoadCopy, Fault::None);
    assert_eq!(e.stats().tier.pinned, 0);
    e.check_invariants().unwrap();
    // Nothing pinned: a store of other blocks can evict all four.
    let u: Vec<u32> = (1000..1000 + 4 * BS as u32).collect();
    assert_eq!(e.store(&u, &payload(&u), X).unwrap().stored, 4);

    // An error while a load copies is a short load, never a wrong one.
    inject(FaultPoint::LoadCopy, Fault::Error);
    let mut buf = vec![0u8; p.len()];
    assert_eq!(e.load(&u, &mut buf, X).unwrap(), 0);
    inject(FaultPoint::LoadCopy, Fault::None);
    assert_eq!(buf, vec![0u8; p.len()]);

    // An error while a store copies stores nothing of what it did not copy.
    let e = engine(8, None);
    inject(FaultPoint::StoreCopy, Fault::Error);
    let out = e.store(&t, &p, X).unwrap();
    inject(FaultPoint::StoreCopy, Fault::None);
    assert_eq!((out.stored, out.rejected), (0, 4));
    assert_eq!(e.lookup(&t, X).unwrap(), 0);
    assert_eq!(e.store(&t, &p, X).unwrap().stored, 4);
    e.check_invariants().unwrap();

    // A panic while a promotion copies from disk into memory: nothing stuck either.
    let dir = tempfile::tempdir().unwrap();
    {
        let e = engine(8, Some(dir.path()));
        e.store(&t, &p, X).unwrap();
        assert!(e.flush(Duration::from_secs(10)));
    }
    let e = engine(8, Some(dir.path()));
    let mut out = vec![0u8; p.len()];
    inject(FaultPoint::StoreCopy, Fault::Panic);
    assert!(quiet(|| e.load(&t, &mut out, X)).is_err());
    inject(FaultPoint::StoreCopy, Fault::None);
    e.check_invariants().unwrap();
    assert_eq!((e.stats().tier.entries, e.stats().tier.pinned), (0, 0));
    assert_eq!(e.load(&t, &mut out, X).unwrap(), t.len());
    assert_eq!(out, p);
}
