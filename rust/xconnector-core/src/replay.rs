//! `xconnector bench`'s replay: a seeded workload ([`crate::workload`]) through an [`Engine`] as a
//! worker uses it: look the prompt up, load the cached prefix it can use, store the rest.
//!
//! What each figure of the [`Report`] is:
//!
//! - hit tokens: prompt tokens the lookups found cached (the hit rate is over all prompt tokens);
//! - saved tokens: prefill a worker skips, [`usable_prefix`] of each hit (the block holding a
//!   prompt's last token is always recomputed, its logits are needed); the replay loads only
//!   those blocks;
//! - store: bytes copied into the cache over the time of the stores that copied them (a store
//!   whose blocks are all cached copies nothing), split into the stores made while the cache was
//!   filling (first touch of its memory: page faults) and once it was full (from the first
//!   eviction on: slots reused). Each store reads its payload from a ring of buffers larger than
//!   the last-level cache;
//! - load: not timed during the replay, where a prefix is often loaded right after it was stored
//!   or loaded and would come from the CPU caches, into a buffer the last load also used. After
//!   the replay, up to `cold_loads` of the requests that loaded a prefix, spread evenly over the
//!   run, reload what is still cached of it, each after reading twice the last-level cache, into
//!   a part of a ring larger than that cache: blocks and destination come from memory, as after
//!   a forward pass.

use std::hint::black_box;
use std::ops::{ControlFlow, Range};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::engine::{Engine, EngineConfig};
use crate::error::{CoreError, Result};
use crate::hashing::HashExtras;
use crate::namespace::Namespace;
use crate::prefix::usable_prefix;
use crate::workload::{requests, WorkloadConfig};

/// The last-level cache assumed where sysfs cannot tell.
pub const FALLBACK_LLC_BYTES: usize = 32 << 20;
/// Requests between two progress reports.
pub const PROGRESS_EVERY: usize = 50;

#[derive(Clone, Debug)]
pub struct ReplayConfig {
    pub requests: usize,
    pub seed: u64,
    pub cache_bytes: u64,
    pub block_bytes: usize,
    pub block_size: usize,
    /// Loads timed after the replay.
    pub cold_loads: usize,
    /// The CPU's last-level cache: the rings and the sweep before each cold load are sized from it.
    pub llc_bytes: usize,
    pub workload: WorkloadConfig,
}

impl ReplayConfig {
    /// `xconnector bench`'s settings: 16-token blocks, 200 cold loads, this machine's LLC.
    pub fn new(requests: usize, seed: u64, cache_bytes: u64, block_bytes: usize) -> Self {
        Self {
            requests,
            seed,
            cache_bytes,
            block_bytes,
            block_size: 16,
            cold_loads: 200,
            llc_bytes: last_level_cache_bytes(Path::new("/sys/devices/system/cpu/cpu0/cache")),
            workload: WorkloadConfig::default(),
        }
    }
}

/// One request of the replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub prompt_tokens: usize,
    pub hit_tokens: usize,
    pub saved_tokens: usize,
    pub lookup: Duration,
}

/// Timed copies: the stores that copied blocks into the cache in one phase, or the cold loads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copies {
    pub bytes: u64,
    pub time: Duration,
    /// Stores or loads counted.
    pub count: u64,
}

impl Copies {
    fn add(&mut self, bytes: u64, time: Duration) {
        self.bytes += bytes;
        self.time += time;
        self.count += 1;
    }

    /// Both phases together.
    pub fn plus(self, other: Copies) -> Copies {
        Copies { bytes: self.bytes + other.bytes, time: self.time + other.time, count: self.count + other.count }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub samples: Vec<Sample>,
    pub prompt_tokens: u64,
    pub hit_tokens: u64,
    pub saved_tokens: u64,
    pub lookup_p50: Duration,
    pub lookup_p99: Duration,
    /// Stores while the cache filled, and once it was full.
    pub store_filling: Copies,
    pub store_full: Copies,
    /// The cold loads after the replay.
    pub load: Copies,
    pub evicted_blocks: u64,
    pub llc_bytes: usize,
}

/// Where the replay is: `done` of `total` requests replayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
}

/// Replays the workload, calling `progress` every [`PROGRESS_EVERY`] requests and after the last
/// (never inside a timed operation). `ControlFlow::Break` from it stops the replay: `Ok(None)`.
pub fn replay(cfg: &ReplayConfig, mut progress: impl FnMut(Progress) -> ControlFlow<()>) -> Result<Option<Report>> {
    let (bs, bb) = (cfg.block_size, cfg.block_bytes);
    if cfg.requests == 0 {
        return Err(CoreError::invalid("requests must be at least 1: there is nothing to measure in 0"));
    }
    let engine = Engine::new(EngineConfig {
        block_size: bs,
        block_bytes: bb,
        capacity_bytes: cfg.cache_bytes,
        namespace: Namespace { model: "xconnector-bench".into(), ..Namespace::default() },
        disk: None,
        redis: None,
        events: None,
    })?;
    let no = HashExtras::default();
    let reqs = requests(cfg.requests, cfg.seed, &cfg.workload);
    let longest = reqs.iter().map(|r| r.tokens.len() / bs * bb).max().unwrap_or(0);
    let mut sources = Ring::new(2 * cfg.llc_bytes + longest);
    let mut destinations = Ring::new(2 * cfg.llc_bytes + longest);
    let mut report = Report { llc_bytes: cfg.llc_bytes, ..Report::default() };
    let mut reused = Vec::new(); // requests that loaded a cached prefix
    let mut cache_full = false; // from the first eviction on: stores reuse evicted slots
    for (i, r) in reqs.iter().enumerate() {
        let toks = &r.tokens[..];
        let t0 = Instant::now();
        let hit = engine.lookup(toks, no)?;
        let lookup = t0.elapsed();
        let saved = usable_prefix(hit, toks.len(), bs);
        if saved > 0 {
            // As a worker: only the blocks it will not recompute. Timed after the replay.
            let dst = destinations.take(saved / bs * bb);
            engine.load(&toks[..saved], &mut destinations.buf[dst], no)?;
            reused.push(i);
        }
        let blocks = toks.len() / bs;
        let src = sources.take(blocks * bb);
        let t0 = Instant::now();
        let new = engine.store(&toks[..blocks * bs], &sources.buf[src], no)?.stored;
        let took = t0.elapsed();
        if new > 0 {
            let phase = if cache_full { &mut report.store_full } else { &mut report.store_filling };
            phase.add((new * bb) as u64, took);
        }
        cache_full = cache_full || engine.stats().tier.evicted_blocks > 0;
        report.samples.push(Sample { prompt_tokens: toks.len(), hit_tokens: hit, saved_tokens: saved, lookup });
        report.prompt_tokens += toks.len() as u64;
        report.hit_tokens += hit as u64;
        report.saved_tokens += saved as u64;
        if (i % PROGRESS_EVERY == 0 || i + 1 == reqs.len())
            && progress(Progress { done: i + 1, total: reqs.len() }).is_break()
        {
            return Ok(None);
        }
    }
    report.evicted_blocks = engine.stats().tier.evicted_blocks;
    let mut lookups: Vec<Duration> = report.samples.iter().map(|s| s.lookup).collect();
    (report.lookup_p50, report.lookup_p99) = percentiles(&mut lookups);
    // Cold loads: see the module's documentation.
    let sweep = vec![1u64; 2 * cfg.llc_bytes / 8];
    let step = reused.len().div_ceil(cfg.cold_loads.max(1)).max(1);
    for &i in reused.iter().step_by(step) {
        let toks = &reqs[i].tokens[..];
        let saved = usable_prefix(engine.lookup(toks, no)?, toks.len(), bs);
        if saved == 0 {
            continue; // evicted since
        }
        let dst = destinations.take(saved / bs * bb);
        black_box(black_box(&sweep[..]).iter().fold(0, |a, &b| a.max(b)));
        let t0 = Instant::now();
        let got = engine.load(&toks[..saved], &mut destinations.buf[dst], no)?;
        report.load.add((got / bs * bb) as u64, t0.elapsed());
    }
    Ok(Some(report))
}

/// (median, 99th percentile) of `values`, sorting them: the median averages the two middle
/// values of an even count; the 99th is the value at index `floor(0.99 * (n - 1))`. Zero when empty.
pub fn percentiles(values: &mut [Duration]) -> (Duration, Duration) {
    let n = values.len();
    if n == 0 {
        return (Duration::ZERO, Duration::ZERO);
    }
    values.sort_unstable();
    let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2 };
    (median, values[(n - 1) * 99 / 100])
}

/// Size of the CPU's last-level cache read from a sysfs cache directory (`index*/level` and
/// `index*/size`, as in `/sys/devices/system/cpu/cpu0/cache`): the largest cache of the highest
/// level, [`FALLBACK_LLC_BYTES`] where it cannot be read.
pub fn last_level_cache_bytes(root: &Path) -> usize {
    let read = || -> Option<usize> {
        let (mut best_level, mut size) = (0, 0);
        for entry in std::fs::read_dir(root).ok()? {
            let dir = entry.ok()?.path();
            if !dir.file_name()?.to_str()?.starts_with("index") {
                continue;
            }
            let level: u32 = std::fs::read_to_string(dir.join("level")).ok()?.trim().parse().ok()?;
            let text = std::fs::read_to_string(dir.join("size")).ok()?.trim().to_uppercase();
            let (digits, unit) = match text.chars().last()? {
                'K' => (&text[..text.len() - 1], 1 << 10),
                'M' => (&text[..text.len() - 1], 1 << 20),
                'G' => (&text[..text.len() - 1], 1 << 30),
                _ => (&text[..], 1),
            };
            let value = digits.parse::<usize>().ok()?.checked_mul(unit)?;
            if level > best_level || (level == best_level && value > size) {
                (best_level, size) = (level, value);
            }
        }
        Some(size).filter(|&s| s > 0)
    };
    read().unwrap_or(FALLBACK_LLC_BYTES)
}

/// A buffer handed out in consecutive slices: a slice's bytes come round again only after
/// `buf.len() - n` other bytes have been handed out.
struct Ring {
    buf: Vec<u8>,
    offset: usize,
}

impl Ring {
    fn new(len: usize) -> Self {
        // Filled, not zeroed: every page is touched now, not inside a timed copy.
        Self { buf: vec![1; len], offset: 0 }
    }

    fn take(&mut self, n: usize) -> Range<usize> {
        if self.offset + n > self.buf.len() {
            self.offset = 0;
        }
        self.offset += n;
        self.offset - n..self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(requests: usize, cache_bytes: u64) -> ReplayConfig {
        ReplayConfig {
            requests,
            seed: 0,
            cache_bytes,
            block_bytes: 1 << 10,
            block_size: 16,
            cold_loads: 20,
            llc_bytes: 1 << 20,
            workload: WorkloadConfig::default(),
        }
    }

    fn run(cfg: &ReplayConfig) -> Report {
        replay(cfg, |_| ControlFlow::Continue(())).unwrap().unwrap()
    }

    #[test]
    fn shared_prefixes_hit_and_savings_follow_the_usable_prefix_rule() {
        let cfg = small(300, 64 << 20);
        let r = run(&cfg);
        assert_eq!(r.samples.len(), 300);
        assert!(r.hit_tokens > 0 && r.hit_tokens < r.prompt_tokens, "{} of {}", r.hit_tokens, r.prompt_tokens);
        let reqs = requests(300, 0, &cfg.workload);
        for (s, q) in r.samples.iter().zip(&reqs) {
            assert_eq!(s.prompt_tokens, q.tokens.len());
            assert!(s.hit_tokens <= s.prompt_tokens && s.hit_tokens % 16 == 0);
            // The rule, computed here independently: never the block holding the last token.
            assert_eq!(s.saved_tokens, s.hit_tokens.min((s.prompt_tokens - 1) / 16 * 16));
            assert!(s.saved_tokens < s.prompt_tokens);
        }
        assert_eq!(r.saved_tokens, r.samples.iter().map(|s| s.saved_tokens as u64).sum::<u64>());
        assert_eq!(r.hit_tokens, r.samples.iter().map(|s| s.hit_tokens as u64).sum::<u64>());
        assert!(r.saved_tokens <= r.hit_tokens);
        // A cache this large never evicts: every store copies while it fills, and every reused
        // prefix is still there to reload.
        assert_eq!(r.evicted_blocks, 0);
        assert_eq!(r.store_full, Copies::default());
        assert!(r.store_filling.count > 0 && r.store_filling.bytes.is_multiple_of(1024));
        assert!(r.load.count > 0 && r.load.count <= 20 && r.load.bytes >= r.load.count * 1024);
        assert!(r.lookup_p50 <= r.lookup_p99);
    }

    #[test]
    fn a_small_cache_evicts_and_the_stores_split_into_filling_and_full() {
        let r = run(&small(300, 2 << 20)); // 2048 blocks, far under the working set
        assert!(r.evicted_blocks > 0);
        assert!(r.store_filling.count > 0 && r.store_full.count > 0);
        let copied = r.store_filling.plus(r.store_full).bytes;
        assert!(copied > r.evicted_blocks * 1024, "everything evicted was copied in first");
        assert!(r.hit_tokens > 0);
    }

    #[test]
    fn a_seed_replays_the_same_counts() {
        let (a, b) = (run(&small(120, 1 << 20)), run(&small(120, 1 << 20)));
        assert_eq!((a.prompt_tokens, a.hit_tokens, a.saved_tokens), (b.prompt_tokens, b.hit_tokens, b.saved_tokens));
        assert_eq!(a.evicted_blocks, b.evicted_blocks);
        assert_eq!(a.store_filling.bytes + a.store_full.bytes, b.store_filling.bytes + b.store_full.bytes);
    }

    #[test]
    fn progress_reports_every_fifty_requests_and_the_last_and_can_stop() {
        let mut seen = Vec::new();
        replay(&small(120, 8 << 20), |p| {
            seen.push(p);
            ControlFlow::Continue(())
        })
        .unwrap()
        .unwrap();
        let done: Vec<usize> = seen.iter().map(|p| p.done).collect();
        assert_eq!(done, [1, 51, 101, 120]);
        assert!(seen.iter().all(|p| p.total == 120));
        let mut calls = 0;
        let stopped = replay(&small(120, 8 << 20), |_| {
            calls += 1;
            if calls == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert!(stopped.is_none() && calls == 2);
    }

    #[test]
    fn no_requests_or_a_cache_under_one_block_is_an_error() {
        let mut cfg = small(10, 512);
        cfg.block_bytes = 1024;
        assert!(matches!(replay(&cfg, |_| ControlFlow::Continue(())), Err(CoreError::Config(_))));
        assert!(matches!(replay(&small(0, 1 << 20), |_| ControlFlow::Continue(())), Err(CoreError::InvalidInput(_))));
    }

    #[test]
    fn percentiles_are_the_median_and_the_99th_by_index() {
        let ms = |v: &[u64]| v.iter().map(|&x| Duration::from_millis(x)).collect::<Vec<_>>();
        assert_eq!(percentiles(&mut ms(&[])), (Duration::ZERO, Duration::ZERO));
        assert_eq!(percentiles(&mut ms(&[3, 1, 2])), (Duration::from_millis(2), Duration::from_millis(2)));
        assert_eq!(percentiles(&mut ms(&[4, 1, 3, 2])).0, Duration::from_micros(2500));
        let mut hundred: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        // floor(0.99 * 99) = 98: the 99th smallest.
        assert_eq!(percentiles(&mut hundred), (Duration::from_micros(50_500), Duration::from_millis(99)));
    }

    #[test]
    fn the_last_level_cache_is_the_largest_of_the_highest_level() {
        let dir = tempfile::tempdir().unwrap();
        for (index, level, size) in
            [("index0", 1, "32K"), ("index2", 2, "1024K"), ("index3", 3, "16M"), ("index4", 3, "8M")]
        {
            std::fs::create_dir(dir.path().join(index)).unwrap();
            std::fs::write(dir.path().join(index).join("level"), format!("{level}\n")).unwrap();
            std::fs::write(dir.path().join(index).join("size"), format!("{size}\n")).unwrap();
        }
        std::fs::create_dir(dir.path().join("power")).unwrap(); // not a cache
        assert_eq!(last_level_cache_bytes(dir.path()), 16 << 20);
        assert_eq!(last_level_cache_bytes(&dir.path().join("missing")), FALLBACK_LLC_BYTES);
        std::fs::write(dir.path().join("index3").join("size"), "lots\n").unwrap();
        assert_eq!(last_level_cache_bytes(dir.path()), FALLBACK_LLC_BYTES);
    }

    #[test]
    fn the_ring_hands_out_consecutive_slices_and_wraps() {
        let mut ring = Ring::new(10);
        assert_eq!((ring.take(4), ring.take(4), ring.take(4), ring.take(10)), (0..4, 4..8, 0..4, 0..10));
    }
}
