//! The shared tier: Redis, through the `redis` crate's synchronous connections (a small pool
//! for reads, one writer thread): its async connection re-parses a large reply from the start
//! as each chunk arrives, which made 1 MiB blocks three times slower than raw SET/GET.
//!
//! Keys are `<prefix>:<namespace>:<sequence hash>` (hex), so engines of different models never
//! meet and two engines of the same model, in any processes, share blocks. Values carry a header
//! (magic, format version, namespace, sequence hash, the block's digest of its tokens and parent,
//! payload length, XXH3 of the payload), so a value is bound to its key: a truncated, damaged or
//! foreign value, or one copied under another key, is a miss, counted by reason and deleted,
//! never served. Writes go behind stores through a bounded queue,
//! in pipelined batches; a full queue drops blocks (counted) rather than block the worker. When
//! Redis is down or slow, operations fail fast for a backoff period that doubles per consecutive
//! failure (capped); the connection manager reconnects; callers only ever see misses.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{CoreError, Result};

const MAGIC: &[u8; 4] = b"XCR2";
const FORMAT: u32 = 2;
/// magic 4, format 4, namespace 8, hash 8, digest 16, length 8, checksum 8.
const HEADER: usize = 56;
/// Writer threads (and connections) for write-behind.
const WRITERS: usize = 2;

#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]` or `rediss://...` (TLS).
    pub url: String,
    pub key_prefix: String,
    pub queue_blocks: usize,
    /// Blocks per pipelined write.
    pub batch_blocks: usize,
    pub timeout: Duration,
    /// PEM file of the CA that signed the server's certificate (`rediss://` with a private CA);
    /// None: the public web roots.
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedisStats {
    pub reads: u64,
    pub hit_blocks: u64,
    /// Values under our keys that are not XConnector blocks of this format and size.
    pub foreign_values: u64,
    /// XConnector values whose payload fails its checksum.
    pub corrupt_values: u64,
    /// Intact XConnector values that are not the KV asked for (written or copied under another
    /// key, or another prefix with the same hash).
    pub mismatched_values: u64,
    pub written_blocks: u64,
    /// Blocks not written: the queue was full, or Redis failed the batch.
    pub dropped_blocks: u64,
    pub errors: u64,
    pub connected: bool,
}

struct Health {
    retry_at: Option<Instant>,
    failures: u32,
}

pub struct Write {
    pub ns: u64,
    pub hash: u64,
    pub digest: u128,
    pub data: Vec<u8>,
}

/// Why a value was not served.
enum Reject {
    Foreign,
    Damaged,
    Mismatch,
}

struct Shared {
    client: redis::Client,
    cfg: RedisConfig,
    block_bytes: usize,
    /// Idle connections; a connection that fails is dropped, a new one made on demand.
    pool: Mutex<Vec<redis::Connection>>,
    health: Mutex<Health>,
    reads: AtomicU64,
    hits: AtomicU64,
    foreign: AtomicU64,
    corrupt: AtomicU64,
    mismatched: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
}

pub struct RedisTier {
    shared: Arc<Shared>,
    queue: SyncSender<Write>,
}

/// The URL with any password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

fn is_auth_error(e: &redis::RedisError) -> bool {
    let text = e.to_string();
    text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("invalid password")
        || text.contains("Authentication")
}

impl Shared {
    fn key(&self, ns: u64, hash: u64) -> String {
        format!("{}:{ns:016x}:{hash:016x}", self.cfg.key_prefix)
    }

    fn available(&self) -> bool {
        self.health.lock().retry_at.is_none_or(|at| Instant::now() >= at)
    }

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        self.errors.fetch_add(1, Relaxed);
        let mut h = self.health.lock();
        h.failures = h.failures.saturating_add(1);
        let backoff = Duration::from_millis(100).saturating_mul(1 << h.failures.min(9)).min(Duration::from_secs(30));
        h.retry_at = Some(Instant::now() + backoff);
        if h.failures == 1 {
            tracing::warn!(error = %e, "Redis tier {what} failed; local tiers keep serving, retrying in {backoff:?}");
        }
    }

    fn succeeded(&self) {
        let mut h = self.health.lock();
        if h.failures > 0 {
            tracing::info!("Redis tier reachable again");
        }
        h.failures = 0;
        h.retry_at = None;
    }

    /// Runs `f` on a pooled connection (made on demand, with the configured timeouts); the
    /// connection goes back to the pool only if `f` succeeded.
    fn with_connection<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let pooled = self.pool.lock().pop();
        let mut con = match pooled {
            Some(c) => c,
            None => {
                let c = self.client.get_connection_with_timeout(self.cfg.timeout)?;
                c.set_read_timeout(Some(self.cfg.timeout))?;
                c.set_write_timeout(Some(self.cfg.timeout))?;
                c
            }
        };
        let out = f(&mut con)?;
        let mut pool = self.pool.lock();
        if pool.len() < 8 {
            pool.push(con);
        }
        Ok(out)
    }

    /// The payload of `value` if it is the KV of block `(ns, hash)` with `digest`.
    fn check<'v>(&self, value: &'v [u8], ns: u64, hash: u64, digest: u128) -> std::result::Result<&'v [u8], Reject> {
        if value.len() != HEADER + self.block_bytes || &value[..4] != MAGIC {
            return Err(Reject::Foreign);
        }
        let word = |i: usize| u64::from_le_bytes(value[i..i + 8].try_into().unwrap_or([0; 8]));
        let format = u32::from_le_bytes(value[4..8].try_into().unwrap_or([0; 4]));
        if format != FORMAT || word(40) != self.block_bytes as u64 {
            return Err(Reject::Foreign);
        }
        let payload = &value[HEADER..];
        if word(48) != xxh3_64(payload) {
            return Err(Reject::Damaged);
        }
        let stored_digest = u128::from_le_bytes(value[24..40].try_into().unwrap_or([0; 16]));
        if word(8) != ns || word(16) != hash || stored_digest != digest {
            return Err(Reject::Mismatch);
        }
        Ok(payload)
    }

    fn encode(w: &Write) -> Vec<u8> {
        let mut value = Vec::with_capacity(HEADER + w.data.len());
        value.extend_from_slice(MAGIC);
        value.extend_from_slice(&FORMAT.to_le_bytes());
        value.extend_from_slice(&w.ns.to_le_bytes());
        value.extend_from_slice(&w.hash.to_le_bytes());
        value.extend_from_slice(&w.digest.to_le_bytes());
        value.extend_from_slice(&(w.data.len() as u64).to_le_bytes());
        value.extend_from_slice(&xxh3_64(&w.data).to_le_bytes());
        value.extend_from_slice(&w.data);
        value
    }

    fn write_batch(&self, batch: Vec<Write>) {
        let n = batch.len() as u64;
        let result = self.with_connection(|con| {
            let mut pipe = redis::pipe();
            for w in &batch {
                pipe.set(self.key(w.ns, w.hash), Self::encode(w)).ignore();
            }
            pipe.query::<()>(con)
        });
        match result {
            Ok(()) => {
                self.written.fetch_add(n, Relaxed);
                self.succeeded();
            }
            Err(e) => {
                self.dropped.fetch_add(n, Relaxed);
                self.failed("write", &e);
            }
        }
        self.in_flight.fetch_sub(n, Relaxed);
    }

    /// One of the writer threads: takes a batch from the shared queue and writes it. Two of
    /// them overlap one batch's encoding with the other's round trip to Redis.
    fn writer(&self, rx: &Mutex<Receiver<Write>>) {
        loop {
            let batch = {
                let rx = rx.lock();
                let Ok(first) = rx.recv() else { return };
                let mut batch = vec![first];
                while batch.len() < self.cfg.batch_blocks.max(1) {
                    match rx.try_recv() {
                        Ok(w) => batch.push(w),
                        Err(_) => break,
                    }
                }
                batch
            };
            if self.available() {
                self.write_batch(batch);
            } else {
                let n = batch.len() as u64;
                self.dropped.fetch_add(n, Relaxed);
                self.in_flight.fetch_sub(n, Relaxed);
            }
        }
    }
}

impl RedisTier {
    /// Connects (checking the password), and starts the writer. Redis being unreachable now is
    /// not an error (it is retried later); a refused password or a malformed URL is.
    pub fn open(cfg: RedisConfig, block_bytes: usize) -> Result<Self> {
        let shown = redact(&cfg.url);
        if cfg.url.starts_with("rediss://") {
            // rustls needs a process-wide crypto provider; installing one twice is harmless.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let bad_url = |e: redis::RedisError| {
            CoreError::config(format!("remote_url {shown}: {e}; expected redis://[:password@]host:port"))
        };
        let client = match &cfg.ca_file {
            None => redis::Client::open(cfg.url.as_str()).map_err(bad_url)?,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    CoreError::config(format!("remote_ca_file {}: {e}; give the CA's PEM file", path.display()))
                })?;
                let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
                redis::Client::build_with_tls(cfg.url.as_str(), certs).map_err(bad_url)?
            }
        };
        let (queue, rx) = sync_channel::<Write>(cfg.queue_blocks.max(1));
        let shared = Arc::new(Shared {
            client,
            block_bytes,
            pool: Mutex::new(Vec::new()),
            health: Mutex::new(Health { retry_at: None, failures: 0 }),
            reads: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            cfg,
        });
        match shared.with_connection(|con| redis::cmd("PING").query::<String>(con)) {
            Ok(_) => {}
            Err(e) if is_auth_error(&e) => {
                return Err(CoreError::config(format!(
                    "remote_url {shown}: Redis refused the credentials ({e}); check the password in the URL"
                )));
            }
            Err(e) => shared.failed("connect", &e),
        }
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..WRITERS {
            let (writer, rx) = (Arc::clone(&shared), Arc::clone(&rx));
            std::thread::Builder::new()
                .name(format!("xconnector-redis-{i}"))
                .spawn(move || writer.writer(&rx))
                .map_err(|e| CoreError::Io { context: "starting the Redis tier writers".into(), source: e })?;
        }
        Ok(Self { shared, queue })
    }

    /// Leading blocks of `hashes` in Redis (0 while Redis is unavailable).
    pub fn contains_prefix(&self, ns: u64, hashes: &[u64]) -> usize {
        let s = &self.shared;
        if hashes.is_empty() || !s.available() {
            return 0;
        }
        let keys: Vec<String> = hashes.iter().map(|&h| s.key(ns, h)).collect();
        let found = s.with_connection(|con| {
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.exists(k);
            }
            pipe.query::<Vec<bool>>(con)
        });
        match found {
            Ok(found) => {
                s.succeeded();
                found.iter().take_while(|&&f| f).count()
            }
            Err(e) => {
                s.failed("lookup", &e);
                0
            }
        }
    }

    /// Reads the leading blocks of `hashes` (whose digests are `digests`) into `out` (blocks back
    /// to back) until the first missing or invalid one; returns how many were read. An invalid
    /// value is deleted, so the next store of that block can write a good one.
    pub fn get_prefix(&self, ns: u64, hashes: &[u64], digests: &[u128], out: &mut [u8]) -> usize {
        let s = &self.shared;
        if hashes.is_empty() || !s.available() {
            return 0;
        }
        let keys: Vec<String> = hashes.iter().map(|&h| s.key(ns, h)).collect();
        let values = match s.with_connection(|con| redis::cmd("MGET").arg(&keys).query::<Vec<Option<Vec<u8>>>>(con)) {
            Ok(v) => {
                s.succeeded();
                v
            }
            Err(e) => {
                s.failed("read", &e);
                return 0;
            }
        };
        s.reads.fetch_add(1, Relaxed);
        let bb = s.block_bytes;
        let mut n = 0;
        for (i, (value, chunk)) in values.iter().zip(out.chunks_exact_mut(bb)).enumerate() {
            let Some(value) = value else { break };
            match s.check(value, ns, hashes[i], digests[i]) {
                Ok(payload) => chunk.copy_from_slice(payload),
                Err(why) => {
                    let (counter, what) = match why {
                        Reject::Foreign => (&s.foreign, "not an XConnector block of this size"),
                        Reject::Damaged => (&s.corrupt, "damaged"),
                        Reject::Mismatch => (&s.mismatched, "not the KV of the block asked for"),
                    };
                    if counter.fetch_add(1, Relaxed) == 0 {
                        tracing::warn!(key = %keys[i], "Redis value deleted: {what} (logged once per kind)");
                    }
                    let _ = s.with_connection(|con| redis::cmd("DEL").arg(&keys[i]).query::<()>(con));
                    break;
                }
            }
            n += 1;
        }
        s.hits.fetch_add(n as u64, Relaxed);
        n
    }

    /// Queues a block to be written; false (and counted) when the queue is full.
    pub fn put_behind(&self, w: Write) -> bool {
        let s = &self.shared;
        s.in_flight.fetch_add(1, Relaxed);
        if self.queue.try_send(w).is_err() {
            s.in_flight.fetch_sub(1, Relaxed);
            s.dropped.fetch_add(1, Relaxed);
            return false;
        }
        true
    }

    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Relaxed)
    }

    pub fn stats(&self) -> RedisStats {
        let s = &self.shared;
        RedisStats {
            reads: s.reads.load(Relaxed),
            hit_blocks: s.hits.load(Relaxed),
            foreign_values: s.foreign.load(Relaxed),
            corrupt_values: s.corrupt.load(Relaxed),
            mismatched_values: s.mismatched.load(Relaxed),
            written_blocks: s.written.load(Relaxed),
            dropped_blocks: s.dropped.load(Relaxed),
            errors: s.errors.load(Relaxed),
            connected: s.health.lock().failures == 0,
        }
    }
}
