//! The engine: a namespace, a block geometry and the memory tier, driven by requests' token ids.

use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::arena::SlotId;
use crate::block_journal::{BlockChange, BlockJournal, JournalStats, Medium};
use crate::bulk_copy::BulkCopy;
use crate::disk_tier::DiskTier;
use crate::error::{CoreError, Result};
use crate::faults::{self, FaultPoint};
use crate::hashing::{self, HashExtras};
use crate::memory_tier::MemoryTier;
use crate::namespace::Namespace;
use crate::peer_events::{EventData, EventPublisher, EventsConfig, StoredBlock};
use crate::redis_tier::{RedisConfig, RedisTier, Write};
use crate::router::{Clock, Router, TargetStatus, WritePolicy};
use crate::stats::{add_elapsed, Counters, EngineStats};

/// The largest block payload accepted (all layers of one block): far above any model's, low
/// enough that sizes computed from it never overflow.
pub const MAX_BLOCK_BYTES: usize = 1 << 32;

/// What the engine is created with. `block_bytes` is the size of one block's payload (its KV for
/// all layers); every stored block has exactly this size.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub block_size: usize,
    pub block_bytes: usize,
    pub capacity_bytes: u64,
    pub namespace: Namespace,
    /// A local disk tier below memory, written behind stores and promoted from on loads.
    pub disk: Option<DiskConfig>,
    /// The shared Redis tier below that (hybrid mode), same policy.
    pub redis: Option<RedisConfig>,
    /// Stored/removed block events published to NATS.
    pub events: Option<EventsConfig>,
}

#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub dir: PathBuf,
    pub capacity_bytes: u64,
    /// Blocks waiting to be written; when full, further blocks are dropped (and counted) so a
    /// slow disk never blocks the worker.
    pub queue_blocks: usize,
    /// Several users' workers share the directory on purpose: it may be group-writable, and
    /// blocks are group-readable. Otherwise it must be this user's and writable by nobody else.
    pub shared: bool,
}

/// A block on its way to a lower tier.
struct Pending {
    ns: u64,
    hash: u64,
    digest: u128,
    depth: u32,
    data: Vec<u8>,
    /// What to report once the block is on disk (block events on).
    change: Option<BlockChange>,
}

/// Where a loaded block is read from: a pinned memory slot, or bytes read (and verified) from a
/// tier below that memory had no room to promote them into.
enum Source<'a> {
    Memory(SlotId),
    Below(&'a [u8]),
}

/// The disk tier and the thread that writes to it behind stores.
struct Lower {
    disk: Arc<DiskTier>,
    queue: SyncSender<Pending>,
    in_flight: Arc<AtomicUsize>,
}

/// What a store did with each full block of the request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreOutcome {
    /// Blocks newly stored in memory (and written behind to the tiers below).
    pub stored: usize,
    pub existing: usize,
    /// Blocks stored nowhere.
    pub rejected: usize,
    /// Blocks memory had no room for, sent straight to the tiers below (disk, Redis).
    pub spilled: usize,
    /// Blocks memory had no room for that the tiers below hold already (not sent again).
    pub below: usize,
}

pub struct Engine {
    cfg: EngineConfig,
    namespace_id: u64,
    tier: Arc<MemoryTier>,
    lower: Option<Lower>,
    redis: Option<RedisTier>,
    events: Option<EventPublisher>,
    /// Block events for the host (vLLM's KV events), once it asks for them.
    journal: OnceLock<Arc<BlockJournal>>,
    /// Tier order for lookups and promotion, and each tier's write policy (DESIGN section 6).
    router: Router,
    counters: Arc<Counters>,
    /// The buffer a load reads lower tiers' blocks into, kept for the next load (up to the
    /// memory budget): a fresh one per load cost a page fault per 4 KiB, a third of a Redis
    /// load's time (`benchmarks/redis_bench.py`: 0.66x of redis-benchmark before, 1.05x after).
    scratch: Mutex<Vec<u8>>,
}

/// A tier below memory, as the router names it.
enum Below<'a> {
    Disk(&'a Lower),
    Redis(&'a RedisTier),
}

/// A block held in place: neither evicted nor overwritten until this is dropped.
pub struct PinnedBlock {
    tier: Arc<MemoryTier>,
    slot: SlotId,
}

impl PinnedBlock {
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: the slot stays pinned for the lifetime of `self`.
        unsafe { self.tier.pinned_ptr(self.slot) }
    }

    pub fn len(&self) -> usize {
        self.tier.block_bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: pinned for the lifetime of `self`, so immutable and valid for `len()` bytes.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len()) }
    }
}

impl Drop for PinnedBlock {
    fn drop(&mut self) {
        self.tier.unpin(&[self.slot]);
    }
}

/// Slots reserved by a store or promotion. Whatever has not been published when this is dropped
/// (a failed copy, or a panic unwinding through the copy loop) is taken back, so a panic never
/// leaves a slot stuck in `Writing`: the key stays storable and the capacity is not lost.
struct Reserved<'t> {
    tier: &'t MemoryTier,
    res: crate::memory_tier::Reservation,
}

impl Reserved<'_> {
    /// Fills the new blocks in order with `fill(block_index, slot_bytes)` until it declines a
    /// block (false) or an injected `store_copy` error stops it; returns how many were filled.
    fn fill(&self, mut fill: impl FnMut(usize, &mut [u8]) -> bool) -> usize {
        let mut filled = 0;
        for &(i, slot) in &self.res.new_blocks {
            if faults::check(FaultPoint::StoreCopy).is_err() {
                break; // the blocks from here on are not stored
            }
            let mut done = false;
            self.tier.fill_reserved(slot, |dst| done = fill(i, dst));
            if !done {
                break;
            }
            filled += 1;
        }
        filled
    }

    /// Publishes the first `filled` new blocks and takes back the rest.
    fn publish(self, filled: usize) -> crate::memory_tier::Reservation {
        self.publish_pinning_last(filled, false).0
    }

    /// `publish`, the last block published pinned (returned) when `pin_last`.
    fn publish_pinning_last(
        mut self,
        filled: usize,
        pin_last: bool,
    ) -> (crate::memory_tier::Reservation, Option<SlotId>) {
        self.tier.abort(&mut self.res, filled);
        let last = self.tier.publish_pinning_last(&self.res, pin_last);
        (std::mem::take(&mut self.res), last)
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.tier.abort(&mut self.res, 0);
    }
}

/// Slots pinned for the duration of a copy, unpinned on drop (a panic included).
struct Pins<'t> {
    tier: &'t MemoryTier,
    slots: Vec<SlotId>,
}

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        self.tier.unpin(&self.slots);
    }
}

/// A request's cached prefix, pinned by [`Engine::pin_for_load`]: its blocks in memory are
/// neither evicted nor rewritten until this is dropped, which also counts the load.
pub struct PinnedPrefix<'e> {
    engine: &'e Engine,
    pins: Pins<'e>,
    /// Verified blocks read from the tiers below that memory had no room for, back to back:
    /// those that continue memory's prefix, and only those.
    below: Vec<u8>,
    blocks: usize,
    /// An injected torn copy: junk is handed over for the block after the last.
    torn: bool,
    started: Instant,
}

impl PinnedPrefix<'_> {
    /// Blocks of the prefix.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Tokens of the prefix.
    pub fn tokens(&self) -> usize {
        self.blocks * self.engine.cfg.block_size
    }

    /// Hands each block of the prefix to `read(block_index, bytes)`, in order. May be called
    /// again: the bytes do not change while this is alive.
    pub fn read(&self, mut read: impl FnMut(usize, &[u8])) {
        let bb = self.engine.cfg.block_bytes;
        let memory = self.pins.slots.iter().map(|&slot| Source::Memory(slot));
        for (i, source) in memory.chain(self.below.chunks_exact(bb).map(Source::Below)).take(self.blocks).enumerate() {
            match source {
                Source::Memory(slot) => self.engine.tier.with_pinned(slot, |src| read(i, src)),
                Source::Below(bytes) => read(i, bytes),
            }
        }
        if self.torn {
            read(self.blocks, &vec![0x5A; bb]);
        }
    }
}

impl Drop for PinnedPrefix<'_> {
    fn drop(&mut self) {
        let c = &self.engine.counters;
        let n = self.blocks as u64;
        c.loads.fetch_add(1, Relaxed);
        c.loaded_blocks.fetch_add(n, Relaxed);
        c.loaded_bytes.fetch_add(n * self.engine.cfg.block_bytes as u64, Relaxed);
        let took = self.started.elapsed();
        add_elapsed(&c.load_ns, took);
        c.load_hist.observe(took);
    }
}

impl Engine {
    pub fn new(mut cfg: EngineConfig) -> Result<Self> {
        if cfg.block_size == 0 || cfg.block_size > u32::MAX as usize {
            return Err(CoreError::config(format!(
                "block_size must be a positive number of tokens (got {}); vLLM uses 16 or 32",
                cfg.block_size
            )));
        }
        if cfg.block_bytes == 0 {
            return Err(CoreError::config(
                "block_bytes must be positive: it is the size of one block's KV payload for all layers",
            ));
        }
        if cfg.block_bytes > MAX_BLOCK_BYTES {
            return Err(CoreError::config(format!(
                "block_bytes ({}) is over {MAX_BLOCK_BYTES} (4 GiB): it is one block's KV for all layers; \
                 check the layer count and shapes it was computed from",
                cfg.block_bytes
            )));
        }
        if cfg.capacity_bytes < cfg.block_bytes as u64 {
            return Err(CoreError::config(format!(
                "capacity_bytes ({}) is smaller than one block ({} bytes); raise the cache size or use smaller blocks",
                cfg.capacity_bytes, cfg.block_bytes
            )));
        }
        cfg.namespace.block_size = cfg.block_size as u32;
        let tier = Arc::new(MemoryTier::new(cfg.block_bytes, cfg.capacity_bytes));
        let namespace_id = cfg.namespace.id();
        tracing::debug!(
            namespace = format_args!("{namespace_id:016x}"),
            block_size = cfg.block_size,
            block_bytes = cfg.block_bytes,
            capacity_blocks = tier.capacity_blocks(),
            "engine created"
        );
        let counters = Arc::new(Counters::default());
        let lower = match &cfg.disk {
            None => None,
            Some(d) if d.dir.as_os_str().is_empty() => {
                return Err(CoreError::config("disk_path is empty: give the disk tier's directory, or leave it out"));
            }
            Some(d) if d.capacity_bytes < (crate::disk_tier::HEADER + cfg.block_bytes) as u64 => {
                return Err(CoreError::config(format!(
                    "disk_capacity_bytes ({}) is smaller than one block file ({} bytes); give the disk tier's \
                     budget (max_local_disk_size), or leave disk_path out",
                    d.capacity_bytes,
                    crate::disk_tier::HEADER + cfg.block_bytes
                )));
            }
            // A directory that cannot be used or trusted turns the tier off, not the engine.
            Some(d) => match Self::start_disk(d, namespace_id, cfg.block_bytes) {
                Ok(lower) => Some(lower),
                Err(e) => {
                    tracing::error!("disk tier off: {e}");
                    counters.disk_refused.store(1, Relaxed);
                    None
                }
            },
        };
        let redis = match &cfg.redis {
            None => None,
            Some(r) => Some(RedisTier::open(r.clone(), cfg.block_bytes)?),
        };
        let events = match &cfg.events {
            None => None,
            Some(e) => Some(EventPublisher::start(e.clone(), &*crate::runtime::runtime()?)?),
        };
        let router = Router::new(Clock::monotonic(), Duration::from_millis(100), Duration::from_secs(30));
        router.add("memory", "tier", 0, WritePolicy::WriteThrough)?;
        if lower.is_some() {
            router.add("disk", "tier", 1, WritePolicy::WriteBehind)?;
        }
        if redis.is_some() {
            router.add("redis", "tier", 2, WritePolicy::WriteBehind)?;
        }
        Ok(Self {
            cfg,
            namespace_id,
            tier,
            lower,
            redis,
            events,
            journal: OnceLock::new(),
            router,
            counters,
            scratch: Mutex::new(Vec::new()),
        })
    }

    /// The tiers below memory in the router's order (for lookups and promotion).
    fn below(&self) -> Vec<Below<'_>> {
        self.router
            .order(Some("tier"))
            .iter()
            .filter_map(|name| match name.as_str() {
                "disk" => self.lower.as_ref().map(Below::Disk),
                "redis" => self.redis.as_ref().map(Below::Redis),
                _ => None,
            })
            .collect()
    }

    /// The tiers in order, with their write policy and health.
    pub fn tiers(&self) -> Vec<TargetStatus> {
        self.router.status()
    }

    fn start_disk(d: &DiskConfig, space: u64, block_bytes: usize) -> Result<Lower> {
        let disk = Arc::new(DiskTier::open(&d.dir, space, d.capacity_bytes, block_bytes, d.shared)?);
        let (queue, rx) = sync_channel::<Pending>(d.queue_blocks.max(1));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (writer, pending) = (Arc::clone(&disk), Arc::clone(&in_flight));
        std::thread::Builder::new()
            .name("xconnector-disk".into())
            .spawn(move || {
                // Ends when the engine (the only sender) is dropped.
                for p in rx {
                    // Failures are counted and logged once per episode by the tier.
                    let _ = writer.put(p.ns, p.hash, p.digest, p.depth, &p.data, p.change);
                    pending.fetch_sub(1, Relaxed);
                }
            })
            .map_err(|e| CoreError::Io { context: "starting the disk tier writer".into(), source: e })?;
        Ok(Lower { disk, queue, in_flight })
    }

    /// Waits (up to `timeout`) until blocks queued for lower tiers are written. True if done.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let pending = || {
            self.lower.as_ref().map_or(0, |l| l.in_flight.load(Relaxed) as u64)
                + self.redis.as_ref().map_or(0, RedisTier::in_flight)
                + self.events.as_ref().map_or(0, EventPublisher::in_flight)
        };
        while pending() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The usable budget: `capacity_bytes` rounded down to whole blocks.
    pub fn capacity_bytes(&self) -> u64 {
        self.tier.capacity_bytes()
    }

    pub fn namespace_id(&self) -> u64 {
        self.namespace_id
    }

    /// Starts recording what the memory and disk tiers gain and lose (see [`BlockJournal`]), at
    /// most `capacity` blocks between two [`Self::take_block_events`]. Idempotent.
    pub fn enable_block_events(&self, capacity: usize) {
        let journal = self.journal.get_or_init(|| Arc::new(BlockJournal::new(capacity)));
        if let Some(lower) = &self.lower {
            lower.disk.report_to(Arc::clone(journal));
        }
    }

    /// The block changes since the last call (empty while block events are off).
    pub fn take_block_events(&self) -> Vec<BlockChange> {
        self.journal.get().map_or_else(Vec::new, |j| j.take())
    }

    pub fn block_events_stats(&self) -> Option<JournalStats> {
        self.journal.get().map(|j| j.stats())
    }

    fn namespace_for(&self, extras: HashExtras<'_>) -> u64 {
        if extras.is_empty() {
            self.namespace_id
        } else {
            self.cfg.namespace.id_with(extras)
        }
    }

    /// Sequence hashes of the request's full blocks.
    pub fn hashes(&self, tokens: &[u32], extras: HashExtras<'_>) -> Vec<u64> {
        hashing::sequence_hashes(tokens, self.cfg.block_size, extras)
    }

    /// Digests of the request's full blocks (of their tokens and parents): what each stored value
    /// is checked against on load.
    pub fn digests(&self, tokens: &[u32]) -> Vec<u128> {
        hashing::block_digests(tokens, self.cfg.block_size)
    }

    /// Whether `[addr, addr + len)` overlaps the memory tier: such a buffer must never be a
    /// load's destination (it would overwrite cached KV).
    pub fn overlaps_cache(&self, addr: usize, len: usize) -> bool {
        self.tier.overlaps(addr, len)
    }

    /// Number of leading tokens whose KV is cached (a multiple of the block size).
    pub fn lookup(&self, tokens: &[u32], extras: HashExtras<'_>) -> Result<usize> {
        faults::check(FaultPoint::Lookup)?;
        let t0 = Instant::now();
        let hashes = self.hashes(tokens, extras);
        let ns = self.namespace_for(extras);
        let mut blocks = self.tier.contiguous_ready(ns, &hashes);
        for tier in self.below() {
            blocks += match tier {
                Below::Disk(lower) => lower.disk.contains_prefix(ns, &hashes[blocks..]),
                Below::Redis(redis) => redis.contains_prefix(ns, &hashes[blocks..]),
            };
        }
        let hit = blocks * self.cfg.block_size;
        let c = &self.counters;
        c.lookups.fetch_add(1, Relaxed);
        c.hit_tokens.fetch_add(hit as u64, Relaxed);
        c.miss_tokens.fetch_add((tokens.len() - hit) as u64, Relaxed);
        let took = t0.elapsed();
        add_elapsed(&c.lookup_ns, took);
        c.lookup_hist.observe(took);
        Ok(hit)
    }

    /// Stores the KV of the request's full blocks. `payload` holds exactly those blocks back to back.
    pub fn store(&self, tokens: &[u32], payload: &[u8], extras: HashExtras<'_>) -> Result<StoreOutcome> {
        self.store_from(tokens, 0, payload, extras)
    }

    /// Stores full blocks `first_block..` of `tokens` from `payload` (exactly those blocks, back
    /// to back), for a caller that moves a long request in parts: the blocks before must be
    /// cached already, and one that is not (evicted since the caller's lookup) stops the store
    /// there, since its KV is not in `payload`.
    pub fn store_from(
        &self,
        tokens: &[u32],
        first_block: usize,
        payload: &[u8],
        extras: HashExtras<'_>,
    ) -> Result<StoreOutcome> {
        let bs = self.cfg.block_size;
        let bb = self.cfg.block_bytes;
        let blocks = (tokens.len() / bs).saturating_sub(first_block);
        if blocks.checked_mul(bb) != Some(payload.len()) {
            return Err(CoreError::invalid(format!(
                "payload is {} bytes, but {} tokens make {blocks} full block(s) from block {first_block} of \
                 {bb} bytes = {} bytes; pass exactly the KV of those blocks (a trailing partial block of {} \
                 token(s) is not cached)",
                payload.len(),
                tokens.len(),
                blocks as u128 * bb as u128,
                tokens.len() % bs
            )));
        }
        let copy = BulkCopy::for_transfer(payload.len());
        self.store_filling(tokens, extras, |i, dst| {
            let Some(at) = i.checked_sub(first_block) else { return false };
            copy.copy(dst, &payload[at * bb..(at + 1) * bb]);
            true
        })
    }

    /// Stores the request's full blocks, filling each newly reserved slot in place with
    /// `fill(block_index, slot_bytes)`: no staging copy, and no work for blocks already cached.
    /// `fill` cannot fail: validate what it reads before calling this.
    pub fn store_with(
        &self,
        tokens: &[u32],
        extras: HashExtras<'_>,
        mut fill: impl FnMut(usize, &mut [u8]),
    ) -> Result<StoreOutcome> {
        self.store_filling(tokens, extras, |i, dst| {
            fill(i, dst);
            true
        })
    }

    /// `store_with` whose `fill` may decline a block (false): it and the blocks after it are not
    /// stored.
    fn store_filling(
        &self,
        tokens: &[u32],
        extras: HashExtras<'_>,
        mut fill: impl FnMut(usize, &mut [u8]) -> bool,
    ) -> Result<StoreOutcome> {
        faults::check(FaultPoint::Store)?;
        let t0 = Instant::now();
        let bb = self.cfg.block_bytes;
        let hashes = self.hashes(tokens, extras);
        let digests = self.digests(tokens);
        let ns = self.namespace_for(extras);
        let reserved = Reserved { tier: &self.tier, res: self.tier.reserve(ns, &hashes, &digests)? };
        // Redis the only tier written behind: each block is queued for it as soon as it is
        // filled, so the writers start while the rest of the store is copied (they used to wait
        // for the whole store: a quarter of a 64 KiB store's CPU time was idle).
        let redis_first = match (&self.lower, &self.redis) {
            (None, Some(redis)) => self
                .router
                .write_plan(Some("tier"))
                .iter()
                .any(|(name, policy)| name == "redis" && *policy == WritePolicy::WriteBehind)
                .then_some(redis),
            _ => None,
        };
        let filled = reserved.fill(|i, dst| {
            if !fill(i, dst) {
                return false;
            }
            if let Some(redis) = redis_first {
                let data = redis.write_buffer(dst);
                redis.put_behind(Write { ns, hash: hashes[i], digest: digests[i], data });
            }
            true
        });
        let all_filled = filled == reserved.res.new_blocks.len();
        let (rejected, out_of_room) = (reserved.res.rejected, reserved.res.out_of_room);
        // Copied for the lower tiers while the slots are still ours: once published they may be
        // evicted and reused at any moment.
        let mut behind: Vec<Pending> = match (&self.lower, &self.redis) {
            (None, None) => Vec::new(),
            _ if redis_first.is_some() => Vec::new(),
            _ => reserved.res.new_blocks[..filled]
                .iter()
                .map(|&(i, slot)| {
                    let mut data = Vec::new();
                    self.tier.fill_reserved(slot, |b| {
                        data = self.redis.as_ref().map_or_else(|| b.to_vec(), |r| r.write_buffer(b));
                    });
                    let change = self.journal.get().map(|_| {
                        BlockChange::stored(Medium::Disk, &hashes, tokens, self.cfg.block_size, i..i + 1, extras)
                    });
                    Pending { ns, hash: hashes[i], digest: digests[i], depth: i as u32, data, change }
                })
                .collect(),
        };
        let res = reserved.publish(filled);
        // Whether the disk took every new block of this store (none to take counts as all).
        let mut disk_took_all = behind.is_empty();
        if !behind.is_empty() {
            for (name, policy) in self.router.write_plan(Some("tier")) {
                if policy != WritePolicy::WriteBehind {
                    continue; // memory is written through above
                }
                match (name.as_str(), &self.redis, &self.lower) {
                    ("redis", Some(redis), _) => {
                        // Without a disk tier Redis is the copy's last user: moved, not copied again.
                        let last = self.lower.is_none();
                        for p in &mut behind {
                            let data = if last { std::mem::take(&mut p.data) } else { p.data.clone() };
                            redis.put_behind(Write { ns: p.ns, hash: p.hash, digest: p.digest, data });
                        }
                    }
                    ("disk", _, Some(lower)) => disk_took_all = self.write_behind(lower, &behind),
                    _ => {}
                }
            }
        }
        // A prompt longer than memory holds: the blocks memory has no room for go straight to
        // the tiers below, after their parents (queued above), so disk and Redis hold the whole prompt.
        let (below, spilled) = if out_of_room && all_filled {
            // The disk takes spilled blocks only on top of their parents: all of the prefix
            // before them held there or queued above, else they could never be reached there.
            let parents = res.existing;
            let on_disk = |l: &Lower| l.disk.contains_prefix(ns, &hashes[..parents]) == parents;
            let disk_ok = disk_took_all && self.lower.as_ref().is_some_and(on_disk);
            let from = hashes.len() - rejected;
            self.spill(tokens, extras, &hashes, &digests, ns, from, disk_ok, &mut fill)
        } else {
            (0, 0)
        };
        if let Some(events) = &self.events {
            self.announce(events, tokens, extras, &hashes, &res);
        }
        self.journal_memory(tokens, extras, &hashes, &res);
        let out = StoreOutcome {
            stored: res.new_blocks.len(),
            existing: res.existing,
            rejected: res.rejected - spilled - below,
            spilled,
            below,
        };
        let c = &self.counters;
        c.stores.fetch_add(1, Relaxed);
        c.stored_blocks.fetch_add(out.stored as u64, Relaxed);
        c.store_existing_blocks.fetch_add(out.existing as u64, Relaxed);
        c.store_rejected_blocks.fetch_add(out.rejected as u64, Relaxed);
        c.store_spilled_blocks.fetch_add(out.spilled as u64, Relaxed);
        c.stored_bytes.fetch_add((out.stored * bb) as u64, Relaxed);
        let took = t0.elapsed();
        add_elapsed(&c.store_ns, took);
        c.store_hist.observe(took);
        if out.rejected > 0 {
            tracing::debug!(rejected = out.rejected, stored = out.stored, "store kept only a prefix");
        }
        Ok(out)
    }

    /// Copies the longest cached prefix (at most `out.len() / block_bytes` blocks) into `out`,
    /// blocks back to back from offset 0. Returns the number of tokens loaded.
    pub fn load(&self, tokens: &[u32], out: &mut [u8], extras: HashExtras<'_>) -> Result<usize> {
        self.load_from(tokens, 0, out, extras)
    }

    /// Copies blocks `first_block..` of the longest cached prefix into `out` (as many as fit,
    /// back to back from offset 0), for a caller that moves a long request in parts. Returns the
    /// tokens of the prefix loaded, those before `first_block` included: fewer than
    /// `first_block` blocks' means it no longer reaches `out`'s first block.
    pub fn load_from(
        &self,
        tokens: &[u32],
        first_block: usize,
        out: &mut [u8],
        extras: HashExtras<'_>,
    ) -> Result<usize> {
        let bb = self.cfg.block_bytes;
        let max_blocks = first_block.saturating_add(out.len() / bb);
        let copy = BulkCopy::for_transfer(out.len());
        self.load_with(tokens, extras, max_blocks, |i, src| {
            if let Some(at) = i.checked_sub(first_block) {
                copy.copy(&mut out[at * bb..(at + 1) * bb], src);
            }
        })
    }

    /// Hands the longest cached prefix (at most `max_blocks` blocks) to `read(block_index, bytes)`,
    /// each block pinned while it is read. Returns the number of tokens loaded: a block whose
    /// stored digest is not the request's ends the prefix.
    pub fn load_with(
        &self,
        tokens: &[u32],
        extras: HashExtras<'_>,
        max_blocks: usize,
        mut read: impl FnMut(usize, &[u8]),
    ) -> Result<usize> {
        let prefix = self.pin_for_load(tokens, extras, max_blocks)?;
        prefix.read(&mut read);
        Ok(prefix.tokens())
    }

    /// Pins the longest cached prefix of `tokens` (at most `max_blocks` blocks) for reading,
    /// promoting what the tiers below hold: the blocks stay put until the result is dropped, so
    /// a caller may read them more than once (one layer at a time) and from another thread.
    pub fn pin_for_load(&self, tokens: &[u32], extras: HashExtras<'_>, max_blocks: usize) -> Result<PinnedPrefix<'_>> {
        faults::check(FaultPoint::Load)?;
        let started = Instant::now();
        let bb = self.cfg.block_bytes;
        let hashes = self.hashes(tokens, extras);
        let digests = self.digests(tokens);
        let ns = self.namespace_for(extras);
        let max_blocks = max_blocks.min(hashes.len());
        let (below_from, mut below) = if self.lower.is_some() || self.redis.is_some() {
            self.promote(ns, &hashes[..max_blocks], &digests[..max_blocks], tokens, extras)
        } else {
            (0, Vec::new())
        };
        let mut pins = Pins { tier: &self.tier, slots: self.tier.pin_prefix(ns, &hashes, &digests, max_blocks) };
        self.tier.verify_exported(&mut pins.slots, false);
        // Memory's prefix, then (when it reaches them) the verified blocks read from below that
        // memory had no room for: a prompt longer than memory still loads whole. Only those are
        // kept (a layer-wise load pins a whole step's prefixes at once); none when memory lost
        // blocks before those read from below, since they then continue no prefix.
        match pins.slots.len().checked_sub(below_from) {
            Some(skip) if skip * bb < below.len() => below = below.split_off(skip * bb),
            _ => {
                // Memory took all of it (the usual case): the buffer serves the next load, kept
                // up to the memory budget (the load's peak needed that much anyway); else freed.
                let spent = std::mem::take(&mut below);
                let mut scratch = self.scratch.lock();
                if spent.capacity() > scratch.capacity() && spent.capacity() as u64 <= self.cfg.capacity_bytes {
                    *scratch = spent;
                }
            }
        }
        let available = pins.slots.len() + below.len() / bb;
        let (mut blocks, mut torn) = (0, false);
        while blocks < available {
            if faults::check(FaultPoint::LoadCopy).is_err() {
                torn = faults::garbage(FaultPoint::LoadCopy); // a torn copy: junk where the block was to go
                break; // an injected error: a short load, as if the rest were evicted
            }
            blocks += 1;
        }
        Ok(PinnedPrefix { engine: self, pins, below, blocks, torn, started })
    }

    /// Stored events for the new blocks, removed events for what their room cost.
    fn announce(
        &self,
        events: &EventPublisher,
        tokens: &[u32],
        extras: HashExtras<'_>,
        hashes: &[u64],
        res: &crate::memory_tier::Reservation,
    ) {
        if !res.evicted.is_empty() {
            events.emit(EventData::Removed { block_hashes: res.evicted.iter().map(|&(_, h)| h).collect() });
        }
        let Some(&(first, _)) = res.new_blocks.first() else { return };
        let local = hashing::local_hashes(tokens, self.cfg.block_size, extras);
        let blocks =
            res.new_blocks.iter().map(|&(i, _)| StoredBlock { block_hash: hashes[i], tokens_hash: local[i] }).collect();
        let parent_hash = first.checked_sub(1).map(|p| hashes[p]);
        events.emit(EventData::Stored { parent_hash, blocks });
    }

    /// Block events for what a reservation did to the memory tier: the blocks it evicted, then
    /// each run of consecutive new blocks (their parents are held: earlier blocks of the request).
    fn journal_memory(
        &self,
        tokens: &[u32],
        extras: HashExtras<'_>,
        hashes: &[u64],
        res: &crate::memory_tier::Reservation,
    ) {
        let Some(journal) = self.journal.get() else { return };
        if !res.evicted.is_empty() {
            let hashes = res.evicted.iter().map(|&(_, h)| h).collect();
            journal.push(BlockChange::Removed { medium: Medium::Memory, hashes });
        }
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for &(i, _) in &res.new_blocks {
            match runs.last_mut() {
                Some(run) if run.end == i => run.end += 1,
                _ => runs.push(i..i + 1),
            }
        }
        for run in runs {
            journal.push(BlockChange::stored(Medium::Memory, hashes, tokens, self.cfg.block_size, run, extras));
        }
    }

    /// Sends blocks `from..` of a store (those memory had no room for) straight to the
    /// write-behind tiers below (the disk only if `disk_ok`), one block at a time (never more
    /// than one block's copy at once): skipping the leading run the first of them holds
    /// already, and stopping at the first block no queue takes. Returns (blocks held already,
    /// blocks queued).
    #[allow(clippy::too_many_arguments)]
    fn spill(
        &self,
        tokens: &[u32],
        extras: HashExtras<'_>,
        hashes: &[u64],
        digests: &[u128],
        ns: u64,
        from: usize,
        disk_ok: bool,
        fill: &mut impl FnMut(usize, &mut [u8]) -> bool,
    ) -> (usize, usize) {
        let behind = |tier: &str| {
            self.router.write_plan(Some("tier")).iter().any(|(name, p)| name == tier && *p == WritePolicy::WriteBehind)
        };
        let mut disk = self.lower.as_ref().filter(|_| disk_ok && behind("disk"));
        let mut redis = self.redis.as_ref().filter(|_| behind("redis"));
        let held = match (disk, redis) {
            (Some(lower), _) => lower.disk.contains_prefix(ns, &hashes[from..]),
            (None, Some(redis)) => redis.contains_prefix(ns, &hashes[from..]),
            (None, None) => return (0, 0),
        };
        // The disk takes no more of a prompt than its budget holds (its own later blocks would
        // evict its earlier ones); Redis takes the rest.
        let disk_end = disk.map_or(0, |lower| lower.disk.block_room());
        let mut spilled = 0;
        for i in from + held..hashes.len() {
            if i >= disk_end {
                disk = None;
            }
            if disk.is_none() && redis.is_none() {
                break;
            }
            if faults::check(FaultPoint::StoreCopy).is_err() {
                break; // the blocks from here on are not stored
            }
            let mut data = vec![0; self.cfg.block_bytes];
            if !fill(i, &mut data) {
                break; // declined: its KV is not the caller's to give
            }
            let (hash, digest) = (hashes[i], digests[i]);
            // A tier that refused a block takes none after it: a child must not land without
            // its parent.
            let mut queued = false;
            if let Some(r) = redis {
                let data = if disk.is_some() { data.clone() } else { std::mem::take(&mut data) };
                if r.put_behind(Write { ns, hash, digest, data }) {
                    queued = true;
                } else {
                    redis = None;
                }
            }
            if let Some(lower) = disk {
                let change = self
                    .journal
                    .get()
                    .map(|_| BlockChange::stored(Medium::Disk, hashes, tokens, self.cfg.block_size, i..i + 1, extras));
                if self.queue_disk(lower, Pending { ns, hash, digest, depth: i as u32, data, change }) {
                    queued = true;
                } else {
                    disk = None;
                }
            }
            if !queued {
                break; // no tier took it: the rest would be dropped too
            }
            spilled += 1;
        }
        (held, spilled)
    }

    /// Queues newly stored blocks for the disk tier; a full queue drops them (counted). Whether
    /// it took them all.
    fn write_behind(&self, lower: &Lower, blocks: &[Pending]) -> bool {
        let mut all = true;
        for p in blocks {
            let p = Pending {
                ns: p.ns,
                hash: p.hash,
                digest: p.digest,
                depth: p.depth,
                data: p.data.clone(),
                change: p.change.clone(),
            };
            all &= self.queue_disk(lower, p);
        }
        all
    }

    /// Queues one block for the disk tier; false (counted) when the queue is full.
    fn queue_disk(&self, lower: &Lower, p: Pending) -> bool {
        lower.in_flight.fetch_add(1, Relaxed);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = lower.queue.try_send(p) {
            lower.in_flight.fetch_sub(1, Relaxed);
            self.counters.write_behind_dropped.fetch_add(1, Relaxed);
            return false;
        }
        true
    }

    /// Copies the blocks after the memory tier's prefix that lower tiers hold (in the router's
    /// order: disk, then Redis) up into memory. Each tier checks that what it returns is the KV of
    /// the block with that digest. Returns what was read from below, `(index of its first block,
    /// bytes)`, so that a load serves the blocks memory had no room for from it.
    fn promote(
        &self,
        ns: u64,
        hashes: &[u64],
        digests: &[u128],
        tokens: &[u32],
        extras: HashExtras<'_>,
    ) -> (usize, Vec<u8>) {
        // The memory prefix stays pinned meanwhile, so the reservation below finds it all present
        // and only ever reserves blocks read from below.
        let pinned = Pins { tier: &self.tier, slots: self.tier.pin_prefix(ns, hashes, digests, hashes.len()) };
        let in_memory = pinned.slots.len();
        let bb = self.cfg.block_bytes;
        // The last load's buffer, its bytes kept: only what it lacks is zero-filled (the whole
        // of it each load was a pass over memory as large as the load), and a block's bytes are
        // only read back once a tier has written and checked them.
        let mut buf = std::mem::take(&mut *self.scratch.lock());
        // Blocks read from below go into memory as they come (Redis' chunk by chunk, while the
        // next chunk is read), so that copy overlaps the reads. Memory's chain of this prefix
        // grows block `chain` on, its last block pinned (by `pinned`, then by `tail`): only
        // unpinned leaves are evicted, so none of it goes meanwhile and each reservation walks
        // only the new blocks. Blocks `in_memory..upto` are `earlier` (the runs of tiers before)
        // then `run`. The chain stops growing where memory has no room, holds another block, or
        // already holds the next one (a store of it meanwhile); what memory did not take is
        // served from `buf`.
        let mut tail = Pins { tier: &self.tier, slots: Vec::new() };
        let (mut chain, mut chain_ends) = (in_memory, false);
        let mut promote = |earlier: &[u8], run: &[u8], upto: usize| {
            if chain_ends || upto <= chain {
                return;
            }
            let parent = tail.slots.last().or(pinned.slots.last()).copied();
            let Ok(res) = self.tier.reserve_from(ns, &hashes[..upto], &digests[..upto], chain, parent) else {
                chain_ends = true;
                return;
            };
            let reserved = Reserved { tier: &self.tier, res };
            let filled = reserved.fill(|i, dst| {
                let at = (i - in_memory) * bb;
                let src = match at.checked_sub(earlier.len()) {
                    None => &earlier[at..at + bb],
                    Some(at) => &run[at..at + bb],
                };
                dst.copy_from_slice(src);
                true
            });
            let (res, last) = reserved.publish_pinning_last(filled, true);
            let whole = res.existing + res.new_blocks.len() == upto - chain;
            // All of them stored meanwhile (another request of this prefix): the chain goes on
            // from their last, pinned now if it is still there.
            let last = last.or_else(|| {
                let at = upto - 1..upto;
                whole.then(|| self.tier.pin_prefix(ns, &hashes[at.clone()], &digests[at], 1).pop()).flatten()
            });
            if let Some(last) = last {
                let old = std::mem::replace(&mut tail.slots, vec![last]);
                self.tier.unpin(&old);
            }
            self.counters.promoted_blocks.fetch_add(res.new_blocks.len() as u64, Relaxed);
            self.journal_memory(tokens, extras, hashes, &res);
            // Memory took fewer than asked, or the last is gone already.
            chain_ends = !whole || last.is_none();
            chain = upto;
        };
        let (mut got, mut filled) = (0, 0);
        for tier in self.below() {
            let from = in_memory + got;
            let (rest, rest_digests) = (&hashes[from..], &digests[from..]);
            if rest.is_empty() {
                break;
            }
            let start = filled;
            let mut room = |blocks: usize| {
                let end = start + blocks * bb;
                if buf.len() < end {
                    buf.resize(end, 0);
                }
                end
            };
            let n = match tier {
                Below::Disk(lower) => {
                    let on_disk = lower.disk.contains_prefix(ns, rest);
                    let end = room(on_disk);
                    let mut n = 0;
                    for (k, chunk) in buf[start..end].chunks_exact_mut(bb).enumerate() {
                        if !lower.disk.get(ns, rest[k], rest_digests[k], chunk) {
                            break; // damaged, mismatched or gone: the run ends here
                        }
                        n += 1;
                    }
                    if n > 0 {
                        promote(&buf[..start], &buf[start..start + n * bb], from + n);
                    }
                    n
                }
                Below::Redis(redis) => {
                    let end = room(rest.len());
                    let (earlier, run) = buf[..end].split_at_mut(start);
                    redis.get_prefix(ns, rest, rest_digests, run, &mut |verified| {
                        promote(earlier, verified, from + verified.len() / bb);
                    })
                }
            };
            filled = start + n * bb;
            got += n;
        }
        buf.truncate(filled);
        drop(pinned);
        (in_memory, buf)
    }

    /// Pins the longest cached prefix (at most `max_blocks`) for zero-copy reads (views). Each
    /// block gets a checksum at its first export, checked before every later load or export.
    pub fn pin_prefix(&self, tokens: &[u32], extras: HashExtras<'_>, max_blocks: usize) -> Result<Vec<PinnedBlock>> {
        faults::check(FaultPoint::Load)?;
        let hashes = self.hashes(tokens, extras);
        let digests = self.digests(tokens);
        let mut slots = self.tier.pin_prefix(self.namespace_for(extras), &hashes, &digests, max_blocks);
        self.tier.verify_exported(&mut slots, true);
        Ok(slots.into_iter().map(|slot| PinnedBlock { tier: Arc::clone(&self.tier), slot }).collect())
    }

    pub fn stats(&self) -> EngineStats {
        self.counters.snapshot(
            self.tier.stats(),
            self.lower.as_ref().map(|l| l.disk.stats()),
            self.redis.as_ref().map(RedisTier::stats),
            self.events.as_ref().map(EventPublisher::stats),
            self.block_events_stats(),
        )
    }

    /// This engine's metrics in Prometheus' text format, with `labels` on every sample.
    pub fn prometheus(&self, labels: &[(&str, String)]) -> String {
        let c = &self.counters;
        crate::metrics::render(
            &self.stats(),
            &[
                ("xconnector_lookup_duration_seconds", "Time per prefix lookup.", c.lookup_hist.snapshot()),
                ("xconnector_store_duration_seconds", "Time per store of a request's blocks.", c.store_hist.snapshot()),
                ("xconnector_load_duration_seconds", "Time per load of a request's blocks.", c.load_hist.snapshot()),
            ],
            labels,
        )
    }

    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.tier.check_invariants()
    }
}
