//! The shared tier: Redis, through the `redis` crate's synchronous connections (a small pool
//! for reads, one writer thread): its async connection re-parses a large reply from the start
//! as each chunk arrives, which made 1 MiB blocks three times slower than raw SET/GET.
//!
//! Keys are `<prefix>:<namespace>:<sequence hash>` (hex), so engines of different models never
//! meet and two engines of the same model, in any processes, share blocks. Values carry a header
//! (magic, format version, payload length, XXH3 of the payload): a truncated, foreign or garbage
//! value is a miss and is counted, never served. Writes go behind stores through a bounded queue,
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

const MAGIC: &[u8; 4] = b"XCR1";
const FORMAT: u32 = 1;
const HEADER: usize = 24;
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
    /// Values under our keys that are not XConnector blocks of this size (or are damaged).
    pub foreign_values: u64,
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
    pub data: Vec<u8>,
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

    fn valid<'v>(&self, value: &'v [u8]) -> Option<&'v [u8]> {
        if value.len() != HEADER + self.block_bytes || &value[..4] != MAGIC {
            return None;
        }
        let format = u32::from_le_bytes(value[4..8].try_into().ok()?);
        let len = u64::from_le_bytes(value[8..16].try_into().ok()?);
        let sum = u64::from_le_bytes(value[16..24].try_into().ok()?);
        let payload = &value[HEADER..];
        (format == FORMAT && len == self.block_bytes as u64 && sum == xxh3_64(payload)).then_some(payload)
    }

    fn write_batch(&self, batch: Vec<Write>) {
        let n = batch.len() as u64;
        let result = self.with_connection(|con| {
            let mut pipe = redis::pipe();
            for w in &batch {
                let mut value = Vec::with_capacity(HEADER + w.data.len());
                value.extend_from_slice(MAGIC);
                value.extend_from_slice(&FORMAT.to_le_bytes());
                value.extend_from_slice(&(w.data.len() as u64).to_le_bytes());
                value.extend_from_slice(&xxh3_64(&w.data).to_le_bytes());
                value.extend_from_slice(&w.data);
                pipe.set(self.key(w.ns, w.hash), value).ignore();
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

    /// Reads the leading blocks of `hashes` into `out` (blocks back to back) until the first
    /// missing or invalid one; returns how many were read.
    pub fn get_prefix(&self, ns: u64, hashes: &[u64], out: &mut [u8]) -> usize {
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
        for (value, chunk) in values.iter().zip(out.chunks_exact_mut(bb)) {
            let Some(value) = value else { break };
            let Some(payload) = s.valid(value) else {
                s.foreign.fetch_add(1, Relaxed);
                break;
            };
            chunk.copy_from_slice(payload);
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
            written_blocks: s.written.load(Relaxed),
            dropped_blocks: s.dropped.load(Relaxed),
            errors: s.errors.load(Relaxed),
            connected: s.health.lock().failures == 0,
        }
    }
}
