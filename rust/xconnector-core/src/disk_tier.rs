//! The local disk tier: one file per block under a directory, with a byte budget and LRU
//! eviction (deepest blocks of a chain first, so a kept block's prefix stays).
//!
//! Files are `<dir>/<space>/<hash byte>/<ns>-<hash>.xcb`, where `<space>` is the engine's namespace:
//! engines of different models or tensor-parallel ranks sharing one `local_disk` each keep (and
//! evict within) their own subtree, while processes of the same engine share theirs. A file has a
//! 64-byte header (magic, format version,
//! namespace, hash, payload length, XXH3 checksum of the payload, the block's digest of its tokens
//! and parent) and the payload. A file is served only to the request it is the KV of: namespace,
//! hash and digest must all be the request's. A block is written to a
//! unique temporary file and renamed into place, so readers (this or another process sharing
//! the directory) see a whole file or none. A file whose header or checksum does not match is a
//! miss, counted and deleted, never served. KV reveals the prompts it came from: the directory
//! must be this user's and writable by nobody else (`disk_dir`), files are opened as untrusted
//! (`disk_files`). Entries written before a restart are found again when the tier opens, and what
//! a crash left (temporary files, truncated blocks) is removed and counted then.
//!
//! A full filesystem (ENOSPC, or the user's quota) is survived: the tier evicts its own oldest
//! blocks and retries, and if that is not enough lowers its budget to what fits, raising it again
//! when the filesystem has room. One warning per episode; the rest is counted.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64;

use crate::block_journal::{BlockChange, BlockJournal, Medium};
use crate::disk_dir;
use crate::disk_files::{self, Found};
use crate::error::{CoreError, Result};

const MAGIC: &[u8; 4] = b"XCB2";
const FORMAT: u32 = 2;
/// Bytes before the payload in every block file.
pub const HEADER: usize = 64;
const EXT: &str = "xcb";

type Key = (u64, u64);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub entries: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub written_blocks: u64,
    pub read_blocks: u64,
    pub evicted_blocks: u64,
    /// Files found damaged (bad header, checksum, truncated) and removed.
    pub corrupt_blocks: u64,
    /// Intact files that are not the KV asked for (another key's block, another prefix with the
    /// same hash) and removed.
    pub mismatched_blocks: u64,
    /// Failed write attempts (a full filesystem's included, also when a retry after evicting
    /// succeeded).
    pub write_errors: u64,
    /// Files a crash left (temporary files, truncated or special files where a block should be),
    /// removed when the tier opened, and their bytes.
    pub leftover_files: u64,
    pub leftover_bytes: u64,
    /// Times the filesystem was found full; `budget_bytes` is the budget while it is lowered.
    pub full_episodes: u64,
    pub budget_bytes: u64,
}

struct Entry {
    bytes: u64,
    tick: u64,
    depth: u32,
    /// Its storing was reported as a block event, so its removal is too.
    reported: bool,
}

#[derive(Default)]
struct Index {
    entries: HashMap<Key, Entry>,
    /// (tick, Reverse(depth) as u32::MAX - depth, key): first = evicted first.
    lru: BTreeSet<(u64, u32, Key)>,
    used: u64,
    tick: u64,
    /// Where block events go, once the host asked for them. Pushed to under the index lock, so
    /// a block's stored and removed events are in the order they happened.
    journal: Option<Arc<BlockJournal>>,
}

impl Index {
    /// Indexes a block; `change` (its stored event) is reported now. A block indexed already
    /// (another thread found its file meanwhile) keeps its entry, and is reported if it was not.
    fn insert(&mut self, key: Key, bytes: u64, depth: u32, change: Option<BlockChange>) {
        if self.entries.get(&key).is_some_and(|e| e.bytes == bytes) {
            if self.entries.get(&key).is_some_and(|e| !e.reported) && self.report(change) {
                self.entries.get_mut(&key).expect("looked up under this lock").reported = true;
            }
            return;
        }
        self.remove(&key);
        self.tick += 1;
        let reported = self.report(change);
        let e = Entry { bytes, tick: self.tick, depth, reported };
        self.lru.insert((e.tick, u32::MAX - depth, key));
        self.used += bytes;
        self.entries.insert(key, e);
    }

    fn remove(&mut self, key: &Key) -> Option<u64> {
        let e = self.entries.remove(key)?;
        self.lru.remove(&(e.tick, u32::MAX - e.depth, *key));
        self.used -= e.bytes;
        if e.reported {
            self.report(Some(BlockChange::Removed { medium: Medium::Disk, hashes: vec![key.1] }));
        }
        Some(e.bytes)
    }

    /// Hands `change` to the journal; true if there is one to take it.
    fn report(&self, change: Option<BlockChange>) -> bool {
        match (&self.journal, change) {
            (Some(journal), Some(change)) => {
                journal.push(change);
                true
            }
            _ => false,
        }
    }

    fn touch(&mut self, key: &Key, tick: u64) {
        if let Some(e) = self.entries.get_mut(key) {
            self.lru.remove(&(e.tick, u32::MAX - e.depth, *key));
            e.tick = tick;
            self.lru.insert((tick, u32::MAX - e.depth, *key));
        }
    }
}

/// While the budget is lowered because the filesystem was full, the free space is looked at
/// again every this many writes.
const RAISE_EVERY: u64 = 64;
const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

pub struct DiskTier {
    dir: PathBuf,
    modes: disk_dir::Modes,
    capacity: u64,
    /// The budget in force: `capacity`, or less while the filesystem is full.
    budget: AtomicU64,
    block_bytes: usize,
    index: Mutex<Index>,
    written: AtomicU64,
    read: AtomicU64,
    evicted: AtomicU64,
    corrupt: AtomicU64,
    mismatched: AtomicU64,
    write_errors: AtomicU64,
    leftover_files: AtomicU64,
    leftover_bytes: AtomicU64,
    full_episodes: AtomicU64,
    /// When a write-failure episode was last logged: at most one line per `LOG_EVERY`, so a
    /// filesystem that keeps filling up (or a quota statvfs does not show) cannot flood the log.
    last_log: Mutex<Option<std::time::Instant>>,
    /// Successful writes since the budget was last lowered or raised.
    since_lowered: AtomicU64,
    /// The budget is lowered (a full-filesystem episode, already logged).
    degraded: AtomicBool,
    /// Writes are failing for another reason (an episode, already logged).
    failing: AtomicBool,
}

/// Why a block file was not served.
enum Reject {
    Damaged,
    Mismatch,
}

fn io_err(what: String, e: std::io::Error) -> CoreError {
    CoreError::Io { context: what, source: e }
}

fn parse_name(name: &str) -> Option<Key> {
    let stem = name.strip_suffix(".xcb")?;
    let (ns, hash) = stem.split_once('-')?;
    if ns.len() != 16 || hash.len() != 16 {
        return None;
    }
    Some((u64::from_str_radix(ns, 16).ok()?, u64::from_str_radix(hash, 16).ok()?))
}

/// Subdirectories the tier writes: two hex digits, the hash's top byte.
fn is_subdir_name(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn word(buf: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(buf[i..i + 8].try_into().unwrap_or([0; 8]))
}

/// Whether `head` is the header of a whole block file of `len` bytes (of any block size).
fn is_header_of(head: &[u8; HEADER], len: u64) -> bool {
    let format = u32::from_le_bytes(head[4..8].try_into().unwrap_or([0; 4]));
    &head[0..4] == MAGIC && format == FORMAT && word(head, 24).checked_add(HEADER as u64) == Some(len)
}

impl DiskTier {
    /// Opens (creating if needed) the tier of engine namespace `space` under `dir`, indexing what
    /// earlier runs left there and removing what a crash left. Refuses a directory other users
    /// can write to, unless `shared`.
    pub fn open(dir: &Path, space: u64, capacity_bytes: u64, block_bytes: usize, shared: bool) -> Result<Self> {
        let top = disk_dir::prepare(dir, shared)?;
        let dir = disk_dir::prepare(&top.join(format!("{space:016x}")), shared)?;
        let tier = Self {
            dir,
            modes: disk_dir::modes(shared),
            capacity: capacity_bytes,
            budget: AtomicU64::new(capacity_bytes),
            block_bytes,
            index: Mutex::new(Index::default()),
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            leftover_files: AtomicU64::new(0),
            leftover_bytes: AtomicU64::new(0),
            full_episodes: AtomicU64::new(0),
            last_log: Mutex::new(None),
            since_lowered: AtomicU64::new(0),
            degraded: AtomicBool::new(false),
            failing: AtomicBool::new(false),
        };
        tier.scan(shared)?;
        Ok(tier)
    }

    fn file_len(&self) -> u64 {
        (HEADER + self.block_bytes) as u64
    }

    /// Indexes existing block files, oldest first, so LRU order survives a restart; checks every
    /// subdirectory can be trusted; removes crash leftovers.
    fn scan(&self, shared: bool) -> Result<()> {
        let mut found: Vec<(std::time::SystemTime, Key, u64)> = Vec::new();
        let top = fs::read_dir(&self.dir).map_err(|e| io_err(format!("reading {}", self.dir.display()), e))?;
        for sub in top.flatten() {
            if !sub.file_name().to_str().is_some_and(is_subdir_name) {
                continue; // not a name the tier uses: never read, not ours to judge
            }
            disk_dir::check(&sub.path(), shared)?;
            self.scan_subdir(&sub.path(), &mut found);
        }
        let (files, bytes) = (self.leftover_files.load(Relaxed), self.leftover_bytes.load(Relaxed));
        if files > 0 {
            tracing::warn!(
                dir = %self.dir.display(),
                "disk tier: removed {files} file(s), {bytes} bytes, left by a crash or a power loss \
                 (temporary, truncated or special files)"
            );
        }
        found.sort();
        let mut index = self.index.lock();
        for (_, key, len) in found {
            index.insert(key, len, 0, None);
        }
        let victims = Self::over_budget(&mut index, self.capacity);
        drop(index);
        self.delete(victims);
        Ok(())
    }

    fn scan_subdir(&self, dir: &Path, found: &mut Vec<(std::time::SystemTime, Key, u64)>) {
        let Ok(files) = fs::read_dir(dir) else { return };
        for f in files.flatten() {
            let name = f.file_name();
            let Some(name) = name.to_str() else { continue };
            // DirEntry::metadata does not follow a link.
            let Ok(meta) = f.metadata() else { continue };
            if name.starts_with(".tmp-") {
                if disk_files::is_stale_tmp(name, &meta) {
                    self.remove_leftover(&f.path(), meta.len());
                }
                continue;
            }
            let Some(key) = parse_name(name) else { continue };
            let kind = meta.file_type();
            if kind.is_file() && meta.len() == self.file_len() {
                // Depth is not stored: after a restart, ties are broken by age alone.
                found.push((meta.modified().unwrap_or(std::time::UNIX_EPOCH), key, meta.len()));
            } else if kind.is_file() && self.is_other_geometry(&f.path(), meta.len()) {
                // Another engine's block size sharing the directory: its files, its budget.
            } else if kind.is_symlink() || kind.is_file() || disk_files::is_special(&kind) {
                self.remove_leftover(&f.path(), if kind.is_file() { meta.len() } else { 0 });
            }
        }
    }

    fn is_other_geometry(&self, path: &Path, len: u64) -> bool {
        let mut head = [0u8; HEADER];
        match disk_files::open_block(path, len) {
            Found::File(mut f) => std::io::Read::read_exact(&mut f, &mut head).is_ok() && is_header_of(&head, len),
            _ => false,
        }
    }

    fn remove_leftover(&self, path: &Path, bytes: u64) {
        if fs::remove_file(path).is_ok() {
            self.leftover_files.fetch_add(1, Relaxed);
            self.leftover_bytes.fetch_add(bytes, Relaxed);
        }
    }

    fn path(&self, key: Key) -> PathBuf {
        let (ns, hash) = key;
        self.dir.join(format!("{:02x}", hash >> 56)).join(format!("{ns:016x}-{hash:016x}.{EXT}"))
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// How many blocks the budget in force holds at most.
    pub fn block_room(&self) -> usize {
        (self.budget.load(Relaxed) / self.file_len()) as usize
    }

    /// The directory the tier uses (resolved).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Leading blocks of `hashes` present (another process's files count once seen on disk).
    pub fn contains_prefix(&self, ns: u64, hashes: &[u64]) -> usize {
        let mut n = 0;
        let mut admitted = false;
        for &h in hashes {
            let key = (ns, h);
            let known = self.index.lock().entries.contains_key(&key);
            if known {
                n += 1;
                continue;
            }
            // Written by another process sharing the directory?
            if !disk_files::is_block_file(&self.path(key), self.file_len()) {
                break;
            }
            self.admit(key, self.file_len(), n as u32, None);
            admitted = true;
            n += 1;
        }
        if !admitted {
            return n;
        }
        // Admitting may have evicted an earlier block of this very prefix: promise only what is
        // still indexed.
        let index = self.index.lock();
        hashes[..n].iter().take_while(|&&h| index.entries.contains_key(&(ns, h))).count()
    }

    /// Reads block `hash` into `out` (`block_bytes` long) if it is the KV of the block with
    /// `digest`. False on a miss, a file deleted meanwhile, or a damaged, mismatched or special
    /// file (which is removed). `out` may hold junk after a false return.
    pub fn get(&self, ns: u64, hash: u64, digest: u128, out: &mut [u8]) -> bool {
        let key = (ns, hash);
        let path = self.path(key);
        if out.len() != self.block_bytes {
            return false;
        }
        let mut head = [0u8; HEADER];
        let read = match disk_files::open_block(&path, self.file_len()) {
            Found::Missing => {
                self.index.lock().remove(&key);
                return false;
            }
            // Out of file descriptors, or the like: a miss, and the file is left alone.
            Found::Unreadable => return false,
            Found::NotABlock => Err(Reject::Damaged),
            Found::File(f) => match disk_files::read_block(f, &mut head, out) {
                true => self.check(&head, out, key, digest),
                false => Err(Reject::Damaged),
            },
        };
        if let Err(why) = read {
            self.reject(&path, key, why);
            return false;
        }
        let mut index = self.index.lock();
        index.tick += 1;
        let tick = index.tick;
        index.touch(&key, tick);
        self.read.fetch_add(1, Relaxed);
        true
    }

    fn reject(&self, path: &Path, key: Key, why: Reject) {
        let (counter, what) = match why {
            Reject::Damaged => (&self.corrupt, "damaged, truncated or not a regular file"),
            Reject::Mismatch => (&self.mismatched, "not the KV of the block asked for"),
        };
        if counter.fetch_add(1, Relaxed) == 0 {
            tracing::warn!(path = %path.display(), "disk-tier block removed: {what} (logged once per kind, counted)");
        }
        let _ = fs::remove_file(path);
        self.index.lock().remove(&key);
    }

    fn check(&self, head: &[u8; HEADER], payload: &[u8], key: Key, digest: u128) -> std::result::Result<(), Reject> {
        if !is_header_of(head, self.file_len()) || word(head, 32) != xxh3_64(payload) {
            return Err(Reject::Damaged);
        }
        let stored_digest = u128::from_le_bytes(head[40..56].try_into().unwrap_or([0; 16]));
        if word(head, 8) != key.0 || word(head, 16) != key.1 || stored_digest != digest {
            return Err(Reject::Mismatch);
        }
        Ok(())
    }

    /// Writes one block (`depth`: its index in the chain, deeper ones are evicted first; `digest`:
    /// of its tokens and parent). On a full filesystem, makes room by evicting and retries once;
    /// still full, the budget is lowered to what the tier holds.
    /// `change`, its stored event, is reported once the block is on disk (or now, if it already
    /// was but had not been reported: found there from an earlier run).
    pub fn put(
        &self,
        ns: u64,
        hash: u64,
        digest: u128,
        depth: u32,
        data: &[u8],
        change: Option<BlockChange>,
    ) -> Result<()> {
        let key = (ns, hash);
        {
            let mut index = self.index.lock();
            let unreported = index.entries.get(&key).map(|e| !e.reported);
            if let Some(unreported) = unreported {
                if unreported && index.report(change) {
                    index.entries.get_mut(&key).expect("looked up under this lock").reported = true;
                }
                return Ok(());
            }
        }
        let size = self.file_len();
        if self.degraded.load(Relaxed) {
            self.maybe_raise_budget(size);
        }
        if data.len() != self.block_bytes || size > self.budget.load(Relaxed) {
            return Ok(()); // cannot fit (the budget may be lowered: the filesystem is full)
        }
        let path = self.path(key);
        let mut result = self.write_file(&path, key, digest, data);
        if result.as_ref().is_err_and(disk_files::is_full) {
            self.write_errors.fetch_add(1, Relaxed);
            self.make_room(size);
            result = self.write_file(&path, key, digest, data);
            self.lower_budget(result.as_ref().err());
        }
        if let Err(e) = result {
            self.write_errors.fetch_add(1, Relaxed);
            if !disk_files::is_full(&e) && !self.failing.swap(true, Relaxed) && self.may_log() {
                tracing::warn!(
                    dir = %self.dir.display(), error = %e,
                    "disk tier writes are failing; blocks stay in memory only (logged once per episode, \
                     counted in disk_write_errors)"
                );
            }
            return Err(io_err(format!("writing {}", path.display()), e));
        }
        self.failing.store(false, Relaxed);
        self.admit(key, size, depth, change);
        self.written.fetch_add(1, Relaxed);
        Ok(())
    }

    fn write_file(&self, path: &Path, key: Key, digest: u128, data: &[u8]) -> std::io::Result<()> {
        let parent = path.parent().unwrap_or(&self.dir);
        let mut b = fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, self.modes.dir);
        match b.create(parent) {
            Ok(()) => disk_dir::set_mode(parent, self.modes.dir)?,
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            Err(_) => {}
        }
        let mut header = [0u8; HEADER];
        header[0..4].copy_from_slice(MAGIC);
        header[4..8].copy_from_slice(&FORMAT.to_le_bytes());
        header[8..16].copy_from_slice(&key.0.to_le_bytes());
        header[16..24].copy_from_slice(&key.1.to_le_bytes());
        header[24..32].copy_from_slice(&(data.len() as u64).to_le_bytes());
        header[32..40].copy_from_slice(&xxh3_64(data).to_le_bytes());
        header[40..56].copy_from_slice(&digest.to_le_bytes());
        disk_files::write_block(parent, path, self.modes.file, &header, data)
    }

    /// Whether an episode's warning may be logged now (and notes that it is).
    fn may_log(&self) -> bool {
        let mut last = self.last_log.lock();
        let now = std::time::Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < LOG_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Evicts least recently used blocks until `bytes` are freed (or the tier is empty).
    fn make_room(&self, bytes: u64) {
        let victims = {
            let mut index = self.index.lock();
            let target = index.used.saturating_sub(bytes);
            Self::over_budget(&mut index, target)
        };
        self.delete(victims);
    }

    /// After a write that found the filesystem full: the budget becomes what the tier holds (plus
    /// the block just written, if the retry succeeded). Logged once per episode.
    fn lower_budget(&self, retry_failed: Option<&std::io::Error>) {
        let used = self.index.lock().used;
        let budget = if retry_failed.is_some() { used } else { used + self.file_len() };
        let before = self.budget.swap(budget.min(self.capacity), Relaxed);
        self.since_lowered.store(0, Relaxed);
        if self.degraded.swap(true, Relaxed) {
            return; // the same episode
        }
        self.full_episodes.fetch_add(1, Relaxed);
        if self.may_log() {
            tracing::warn!(
                dir = %self.dir.display(),
                "disk tier: the filesystem is full; evicted to make room and lowered the budget from {before} \
                 to {budget} bytes (raised again as space frees; logged once per episode, at most every 10 min)"
            );
        }
    }

    /// While the budget is lowered, every `RAISE_EVERY`-th write looks at the filesystem's free
    /// space again and raises the budget to what it holds plus 90% of that (if that is still too
    /// much, the next full write lowers it again, silently).
    fn maybe_raise_budget(&self, step: u64) {
        if self.since_lowered.fetch_add(1, Relaxed) + 1 < RAISE_EVERY {
            return;
        }
        self.since_lowered.store(0, Relaxed);
        let used = self.index.lock().used;
        let budget = self.budget.load(Relaxed);
        // statvfs does not see quotas: grow by at most a quarter at a time, within the free space.
        let room = disk_files::available_bytes(&self.dir).map_or(step, |free| free / 10 * 9);
        let raised = (used + room).min(budget + (budget / 4).max(step)).max(budget).min(self.capacity);
        self.budget.store(raised, Relaxed);
        if raised == self.capacity && self.degraded.swap(false, Relaxed) {
            tracing::info!(dir = %self.dir.display(), "disk tier: back to its full budget of {raised} bytes");
        }
    }

    /// Indexes a block and, under the same lock, takes the least recently used entries out
    /// until the budget holds again, so the index never counts more than the budget (their
    /// files are deleted after the lock is released).
    fn admit(&self, key: Key, bytes: u64, depth: u32, change: Option<BlockChange>) {
        let victims = {
            let mut index = self.index.lock();
            index.insert(key, bytes, depth, change);
            Self::over_budget(&mut index, self.budget.load(Relaxed))
        };
        self.delete(victims);
    }

    fn over_budget(index: &mut Index, capacity: u64) -> Vec<Key> {
        let mut victims = Vec::new();
        while index.used > capacity {
            let Some(&(_, _, key)) = index.lru.iter().next() else { break };
            index.remove(&key);
            victims.push(key);
        }
        victims
    }

    fn delete(&self, victims: Vec<Key>) {
        for key in victims {
            let _ = fs::remove_file(self.path(key));
            self.evicted.fetch_add(1, Relaxed);
        }
    }

    /// Reports blocks written from now on (and their removal) to `journal`.
    pub fn report_to(&self, journal: Arc<BlockJournal>) {
        self.index.lock().journal = Some(journal);
    }

    pub fn stats(&self) -> DiskStats {
        let index = self.index.lock();
        DiskStats {
            entries: index.entries.len() as u64,
            used_bytes: index.used,
            capacity_bytes: self.capacity,
            written_blocks: self.written.load(Relaxed),
            read_blocks: self.read.load(Relaxed),
            evicted_blocks: self.evicted.load(Relaxed),
            corrupt_blocks: self.corrupt.load(Relaxed),
            mismatched_blocks: self.mismatched.load(Relaxed),
            write_errors: self.write_errors.load(Relaxed),
            leftover_files: self.leftover_files.load(Relaxed),
            leftover_bytes: self.leftover_bytes.load(Relaxed),
            full_episodes: self.full_episodes.load(Relaxed),
            budget_bytes: self.budget.load(Relaxed),
        }
    }
}
