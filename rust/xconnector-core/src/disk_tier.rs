//! The local disk tier: one file per block under a directory, with a byte budget and LRU
//! eviction (deepest blocks of a chain first, so a kept block's prefix stays).
//!
//! Files are `<dir>/<hash byte>/<ns>-<hash>.xcb`: a 64-byte header (magic, format version,
//! namespace, hash, payload length, XXH3 checksum of the payload, the block's digest of its tokens
//! and parent) and the payload. A file is served only to the request it is the KV of: namespace,
//! hash and digest must all be the request's. A block is written to a
//! unique temporary file and renamed into place, so readers (this or another process sharing
//! the directory) see a whole file or none. A file whose header or checksum does not match is a
//! miss, counted and deleted, never served. The directory is 0700 and files 0600: KV reveals the
//! prompts it came from. Entries written before a restart are found again (the directory is
//! scanned when the tier opens).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64;

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
    pub write_errors: u64,
}

struct Entry {
    bytes: u64,
    tick: u64,
    depth: u32,
}

#[derive(Default)]
struct Index {
    entries: HashMap<Key, Entry>,
    /// (tick, Reverse(depth) as u32::MAX - depth, key): first = evicted first.
    lru: BTreeSet<(u64, u32, Key)>,
    used: u64,
    tick: u64,
}

impl Index {
    fn insert(&mut self, key: Key, bytes: u64, depth: u32) {
        self.remove(&key);
        self.tick += 1;
        let e = Entry { bytes, tick: self.tick, depth };
        self.lru.insert((e.tick, u32::MAX - depth, key));
        self.used += bytes;
        self.entries.insert(key, e);
    }

    fn remove(&mut self, key: &Key) -> Option<u64> {
        let e = self.entries.remove(key)?;
        self.lru.remove(&(e.tick, u32::MAX - e.depth, *key));
        self.used -= e.bytes;
        Some(e.bytes)
    }

    fn touch(&mut self, key: &Key, tick: u64) {
        if let Some(e) = self.entries.get_mut(key) {
            self.lru.remove(&(e.tick, u32::MAX - e.depth, *key));
            e.tick = tick;
            self.lru.insert((tick, u32::MAX - e.depth, *key));
        }
    }
}

pub struct DiskTier {
    dir: PathBuf,
    capacity: u64,
    block_bytes: usize,
    index: Mutex<Index>,
    written: AtomicU64,
    read: AtomicU64,
    evicted: AtomicU64,
    corrupt: AtomicU64,
    mismatched: AtomicU64,
    write_errors: AtomicU64,
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

impl DiskTier {
    /// Opens (creating if needed) the tier in `dir`, indexing what earlier runs left there.
    pub fn open(dir: &Path, capacity_bytes: u64, block_bytes: usize) -> Result<Self> {
        create_private_dir(dir)?;
        let tier = Self {
            dir: dir.to_path_buf(),
            capacity: capacity_bytes,
            block_bytes,
            index: Mutex::new(Index::default()),
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
        };
        tier.scan()?;
        Ok(tier)
    }

    /// Indexes existing block files, oldest first, so LRU order survives a restart.
    fn scan(&self) -> Result<()> {
        let mut found: Vec<(std::time::SystemTime, Key, u64)> = Vec::new();
        let read_dir = |p: &Path| fs::read_dir(p).map_err(|e| io_err(format!("reading {}", p.display()), e));
        for sub in read_dir(&self.dir)? {
            let Ok(sub) = sub else { continue };
            if !sub.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(files) = fs::read_dir(sub.path()) else { continue };
            for f in files.flatten() {
                let name = f.file_name();
                let Some(key) = name.to_str().and_then(parse_name) else { continue };
                let Ok(meta) = f.metadata() else { continue };
                if meta.len() != (HEADER + self.block_bytes) as u64 {
                    continue; // another geometry or truncated: left alone, never indexed
                }
                found.push((meta.modified().unwrap_or(std::time::UNIX_EPOCH), key, meta.len()));
            }
        }
        found.sort();
        let mut index = self.index.lock();
        for (_, key, len) in found {
            index.insert(key, len, 0);
        }
        let victims = Self::over_budget(&mut index, self.capacity);
        drop(index);
        self.delete(victims);
        Ok(())
    }

    fn path(&self, key: Key) -> PathBuf {
        let (ns, hash) = key;
        self.dir.join(format!("{:02x}", hash >> 56)).join(format!("{ns:016x}-{hash:016x}.{EXT}"))
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// Leading blocks of `hashes` present (another process's files count once seen on disk).
    pub fn contains_prefix(&self, ns: u64, hashes: &[u64]) -> usize {
        let mut n = 0;
        for &h in hashes {
            let key = (ns, h);
            let known = self.index.lock().entries.contains_key(&key);
            if known {
                n += 1;
                continue;
            }
            // Written by another process sharing the directory?
            match fs::metadata(self.path(key)) {
                Ok(m) if m.len() == (HEADER + self.block_bytes) as u64 => {
                    self.admit(key, m.len(), n as u32);
                    n += 1;
                }
                _ => break,
            }
        }
        n
    }

    /// Reads block `hash` into `out` (`block_bytes` long) if it is the KV of the block with
    /// `digest`. False on a miss, a file deleted meanwhile, or a damaged or mismatched file
    /// (which is removed).
    pub fn get(&self, ns: u64, hash: u64, digest: u128, out: &mut [u8]) -> bool {
        let key = (ns, hash);
        let path = self.path(key);
        let mut buf = Vec::with_capacity(HEADER + out.len());
        match fs::File::open(&path).and_then(|mut f| f.read_to_end(&mut buf)) {
            Ok(_) => {}
            Err(_) => {
                self.index.lock().remove(&key);
                return false;
            }
        }
        if let Err(why) = self.check(&buf, key, digest, out.len()) {
            let what = match why {
                Reject::Damaged => {
                    self.corrupt.fetch_add(1, Relaxed);
                    "damaged"
                }
                Reject::Mismatch => {
                    self.mismatched.fetch_add(1, Relaxed);
                    "not the KV of the block asked for"
                }
            };
            tracing::warn!(path = %path.display(), "disk-tier block removed: {what}");
            let _ = fs::remove_file(&path);
            self.index.lock().remove(&key);
            return false;
        }
        out.copy_from_slice(&buf[HEADER..]);
        let mut index = self.index.lock();
        index.tick += 1;
        let tick = index.tick;
        index.touch(&key, tick);
        self.read.fetch_add(1, Relaxed);
        true
    }

    fn check(&self, buf: &[u8], key: Key, digest: u128, len: usize) -> std::result::Result<(), Reject> {
        if buf.len() != HEADER + len || &buf[0..4] != MAGIC {
            return Err(Reject::Damaged);
        }
        let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap_or([0; 8]));
        let format = u32::from_le_bytes(buf[4..8].try_into().unwrap_or([0; 4]));
        if format != FORMAT || word(24) != len as u64 || word(32) != xxh3_64(&buf[HEADER..]) {
            return Err(Reject::Damaged);
        }
        let stored_digest = u128::from_le_bytes(buf[40..56].try_into().unwrap_or([0; 16]));
        if word(8) != key.0 || word(16) != key.1 || stored_digest != digest {
            return Err(Reject::Mismatch);
        }
        Ok(())
    }

    /// Writes one block (`depth`: its index in the chain, deeper ones are evicted first; `digest`:
    /// of its tokens and parent).
    pub fn put(&self, ns: u64, hash: u64, digest: u128, depth: u32, data: &[u8]) -> Result<()> {
        let key = (ns, hash);
        if self.index.lock().entries.contains_key(&key) {
            return Ok(());
        }
        let size = (HEADER + data.len()) as u64;
        if size > self.capacity {
            return Ok(()); // cannot fit at all: nothing to do
        }
        let path = self.path(key);
        let result = self.write_file(&path, key, digest, data);
        if let Err(e) = result {
            self.write_errors.fetch_add(1, Relaxed);
            return Err(e);
        }
        self.admit(key, size, depth);
        self.written.fetch_add(1, Relaxed);
        Ok(())
    }

    fn write_file(&self, path: &Path, key: Key, digest: u128, data: &[u8]) -> Result<()> {
        let parent = path.parent().unwrap_or(&self.dir);
        create_private_dir(parent)?;
        let mut header = [0u8; HEADER];
        header[0..4].copy_from_slice(MAGIC);
        header[4..8].copy_from_slice(&FORMAT.to_le_bytes());
        header[8..16].copy_from_slice(&key.0.to_le_bytes());
        header[16..24].copy_from_slice(&key.1.to_le_bytes());
        header[24..32].copy_from_slice(&(data.len() as u64).to_le_bytes());
        header[32..40].copy_from_slice(&xxh3_64(data).to_le_bytes());
        header[40..56].copy_from_slice(&digest.to_le_bytes());
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = parent.join(format!(".tmp-{}-{}", std::process::id(), SEQ.fetch_add(1, Relaxed)));
        let write = || -> std::io::Result<()> {
            let mut f = open_private(&tmp)?;
            f.write_all(&header)?;
            f.write_all(data)?;
            drop(f);
            fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(format!("writing {}", path.display()), e)
        })
    }

    /// Indexes a block and, under the same lock, takes the least recently used entries out
    /// until the budget holds again, so the index never counts more than the budget (their
    /// files are deleted after the lock is released).
    fn admit(&self, key: Key, bytes: u64, depth: u32) {
        let victims = {
            let mut index = self.index.lock();
            index.insert(key, bytes, depth);
            Self::over_budget(&mut index, self.capacity)
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
        }
    }
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new().write(true).create_new(true).open(path)
}

fn create_private_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        match fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
            Ok(()) => Ok(()),
            Err(e) => Err(io_err(format!("creating the disk tier directory {}", dir.display()), e)),
        }
    }
    #[cfg(not(unix))]
    {
        fs::create_dir_all(dir).map_err(|e| io_err(format!("creating {}", dir.display()), e))
    }
}
