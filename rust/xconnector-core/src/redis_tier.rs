//! The shared tier: one Redis server or a Redis Cluster (`backend.rs`), through the `redis`
//! crate's synchronous connections (a small pool, helper threads for requests' reads, two writer
//! threads): its async connection re-parses a large reply from the start as each chunk arrives,
//! which made 1 MiB blocks three times slower than raw SET/GET.
//!
//! Keys are `<prefix>:<namespace>:<sequence hash>` (hex), so engines of different models never
//! meet and two engines of the same model, in any processes, share blocks. Values carry a header
//! (`value.rs`: magic, format version, namespace, sequence hash, the block's digest of its tokens
//! and parent, payload length, XXH3 of the payload, and with a shared secret a MAC), so a value is
//! bound to its key: a truncated, damaged, foreign or unauthenticated value, or one copied under
//! another key, is a miss, counted by reason, never served (damaged and mismatched ones deleted). Writes go behind stores
//! through a bounded queue, in pipelined batches; a full queue drops blocks (counted) rather than
//! block the worker.
//!
//! # A slow, hung or wrong Redis never stalls a request
//! Each request's Redis call runs on a helper thread and the request waits for it at most its
//! deadline, whatever the server does (no reply, a reply dripping in, a stalled TLS handshake).
//! A lookup's EXISTS, whose reply is a few bytes, gets the budget (`timeout`, from
//! `remote_timeout_ms`). A load's pipeline of GETs gets the budget plus its bytes at `READ_RATE`:
//! Redis copies each value into its reply before sending a byte of it, so 4 MiB of values take
//! tens of milliseconds even over loopback, and a budget that fits a lookup (or a first-byte
//! bound of that size) would fail every large legitimate read. The socket's own timeouts are the
//! same, so the helper is free again as soon as the request stops waiting (a cluster's pipeline
//! is the crate's, whose reads each get the full timeout: there a helper may stay busy longer).
//! A hung Redis thus costs the one request that finds it hung its budget (a load: plus one 4 MiB
//! chunk's allowance, 125 ms, since loads go in chunks). A call past
//! its deadline is a miss and opens the circuit breaker (`breaker.rs`): until a background PING
//! succeeds, requests do not touch Redis (one atomic load) and writers drop their batches
//! (counted). One WARNING when the breaker opens, one INFO when it closes, counters for the rest;
//! a breaker that trips again within 30 s of closing is the same episode (not logged again, and
//! probed less and less often).
//! An endpoint that answers but not in Redis' protocol is "not a Redis server": an error at open,
//! the episode's log line later.
//!
//! # Threat model of authenticated values (`auth_key`)
//! Keys derive from public model fields and Dynamo's public hash seed, so anyone who can write to
//! the shared Redis can plant KV under the key of a popular prompt. Without a shared secret, the
//! header stops damage, values copied under other keys and foreign values, but not forgery: a
//! writer can compute a valid header. With `auth_key`, every value carries a keyed BLAKE3 MAC over
//! its full Redis key and its content, checked before anything is copied out; values without a
//! valid MAC (forged, planted, unkeyed or under another secret) are misses, counted as
//! `unauthenticated_values`. Not covered: replay of an old authentic value under the same key (it
//! is still the KV of that block, written by a key holder), confidentiality (values are
//! plaintext), and availability (anyone with write access can delete). Redis ACLs and TLS remain
//! the first line; the MAC limits what a breach of them can inject.

mod backend;
mod breaker;
mod calls;
mod resp;
mod server_memory;
pub mod value;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::secrets::redact_url;
use crate::error::{CoreError, Result};
use backend::{Client, Conn};
use breaker::Breaker;
use calls::{Helpers, Started};
use server_memory::warn_about_memory;
use value::{Block, Format, Reject};

pub use value::AuthKey;

/// Writer threads (and connections) for write-behind.
const WRITERS: usize = 2;
/// Idle connections kept.
const POOL: usize = 8;
/// The rate a large read is allowed on top of the budget: a conservative 32 MiB/s (a 1 MiB block
/// adds 31 ms). A load of 64 blocks of 1 MiB took 300-600 ms on a busy 2-core test machine
/// (Redis alone: first byte after ~50 ms, last after ~80 ms; the rest is this client's parsing
/// and the copies), so only a Redis several times slower than that times out.
const READ_RATE: f64 = (32u64 << 20) as f64;
/// Keys per EXISTS pipeline of a lookup, and bytes per GET pipeline of a load (`get_prefix`).
const LOOKUP_CHUNK: usize = 1024;
const READ_CHUNK: usize = 4 << 20;
/// Reply buffers kept for loads (each about one chunk): as many as loads read at once commonly.
const READ_BUFFERS: usize = 4;
/// Spare write buffers are freed after the writers have been idle this long: while writes keep
/// coming they are reused, so a store does not fault in fresh zeroed pages for every block's copy
/// (the kernel zeroing them was a fifth of a 64 KiB store's time).
const SPARES_IDLE: Duration = Duration::from_secs(5);
/// The most spare write buffers hold (and at most as many blocks as the queue): a burst beyond
/// it pays for fresh pages again rather than keep a large queue's peak for good.
const SPARES_BYTES: usize = 128 << 20;
/// Writers (background) wait at least this long per socket read or write: a healthy Redis may
/// pause on a big pipelined write (a fork for a snapshot), and no request waits on them.
const WRITE_TIMEOUT_FLOOR: Duration = Duration::from_secs(1);
/// The first contact at open waits at least this long, so a wrong password or a server that is
/// not Redis is an error at startup even on a busy machine.
const OPEN_TIMEOUT_FLOOR: Duration = Duration::from_secs(1);
/// The budget's bounds: below a millisecond every call would time out; above a minute it is no
/// longer a bound on a request.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest lifetime a value may be given (`remote_ttl_s`): a year.
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]` or `rediss://...` (TLS); a Redis Cluster as
    /// `redis-cluster://[:password@]host:port[,host:port...]` or `rediss-cluster://...`.
    pub url: String,
    pub key_prefix: String,
    pub queue_blocks: usize,
    /// Blocks per pipelined write.
    pub batch_blocks: usize,
    /// The budget: the longest a request waits on Redis (plus `bytes / READ_RATE` for a load).
    pub timeout: Duration,
    /// How long each value lives from its write (SET .. PX; hits do not renew it); None: until
    /// Redis evicts it.
    pub ttl: Option<Duration>,
    /// PEM file of the CA that signed the server's certificate (`rediss://` with a private CA);
    /// None: the public web roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Values carry a MAC with this key, and only values with a valid one are served.
    pub auth_key: Option<AuthKey>,
}

impl std::fmt::Debug for RedisConfig {
    /// The URL without its password: a config printed while debugging must not leak it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("queue_blocks", &self.queue_blocks)
            .field("batch_blocks", &self.batch_blocks)
            .field("timeout", &self.timeout)
            .field("ttl", &self.ttl)
            .field("ca_file", &self.ca_file)
            .field("auth_key", &self.auth_key)
            .finish()
    }
}

/// The time `bytes` of values are allowed on top of the budget (`READ_RATE`).
fn read_allowance(bytes: usize) -> Duration {
    Duration::from_secs_f64(bytes as f64 / READ_RATE)
}

/// The budget from seconds, as the binding's `redis_timeout` gives it.
pub fn timeout_from_secs(secs: f64) -> Result<Duration> {
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if (MIN_TIMEOUT..=MAX_TIMEOUT).contains(&d) => Ok(d),
        _ => Err(CoreError::config(format!(
            "redis_timeout must be seconds from 0.001 to 60, the longest a request waits on Redis \
             (e.g. redis_timeout=0.02 for 20 ms), got {secs}"
        ))),
    }
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
    /// (With an auth key) XConnector values without a valid MAC: forged, planted, written
    /// without the key or with another one.
    pub unauthenticated_values: u64,
    pub written_blocks: u64,
    /// Blocks not written: the queue was full, the breaker open, or Redis failed the batch.
    pub dropped_blocks: u64,
    /// Failed Redis operations (timeouts included).
    pub errors: u64,
    /// Operations past their deadline or socket timeout.
    pub timeouts: u64,
    /// Times the breaker opened.
    pub breaker_trips: u64,
    /// Requests' Redis calls skipped (a miss) while the breaker was open.
    pub skipped_calls: u64,
    pub breaker_open: bool,
    /// Redis answers (the breaker is closed).
    pub connected: bool,
}

/// Why an endpoint is "not a Redis server" (the parser's own message lists byte values).
const NOT_RESP: &str = "it answered, but not in Redis' protocol: an HTTP, NATS or other server on that port?";

pub struct Write {
    pub ns: u64,
    pub hash: u64,
    pub digest: u128,
    pub data: Vec<u8>,
}

/// Why an operation failed, as logged.
enum Cause<'e> {
    TimedOut(Duration),
    /// The endpoint answered, but not in Redis' protocol.
    NotRedis,
    /// Redis answered with an error (out of memory, loading, no permission): no stall, so the
    /// breaker stays closed.
    Refused(&'e redis::RedisError),
    Failed(&'e redis::RedisError),
}

fn cause(e: &redis::RedisError, timeout: Duration) -> Cause<'_> {
    if e.is_timeout() {
        Cause::TimedOut(timeout)
    } else if e.kind() == redis::ErrorKind::Parse {
        Cause::NotRedis
    } else if matches!(e.kind(), redis::ErrorKind::Server(_) | redis::ErrorKind::Extension) && !is_auth_error(e) {
        Cause::Refused(e)
    } else {
        Cause::Failed(e)
    }
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    hits: AtomicU64,
    foreign: AtomicU64,
    corrupt: AtomicU64,
    mismatched: AtomicU64,
    unauthenticated: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    skipped: AtomicU64,
    in_flight: AtomicU64,
}

struct Shared {
    client: Client,
    cfg: RedisConfig,
    /// The URL without its password, for messages.
    shown: String,
    format: Format,
    /// Idle connections; a connection that fails is dropped, a new one made on demand.
    pool: Mutex<Vec<Conn>>,
    breaker: Breaker,
    helpers: Arc<Helpers>,
    refusal_logged: AtomicBool,
    /// The process that opened the tier (see `usable`).
    pid: u32,
    fork_logged: AtomicBool,
    /// Buffers of written blocks, for the next blocks' copies (`write_buffer`): at most as many
    /// as the queue holds and `SPARES_BYTES`, freed when the writers are idle (`SPARES_IDLE`).
    spares: Mutex<Vec<Vec<u8>>>,
    /// Buffers that loads' replies are read into, kept for the next loads (`READ_BUFFERS`).
    read_buffers: Mutex<Vec<Vec<u8>>>,
    n: Counters,
}

/// A request's Redis call under way on a helper.
struct Call<T> {
    started: Started<redis::RedisResult<T>>,
    limit: Duration,
    deadline: Instant,
}

/// The replies of a load's GETs: the buffer they were read into and each value's range of it.
type Values = (Vec<u8>, Vec<Option<std::ops::Range<usize>>>);

pub struct RedisTier {
    shared: Arc<Shared>,
    queue: SyncSender<Write>,
}

fn is_auth_error(e: &redis::RedisError) -> bool {
    if e.kind() == redis::ErrorKind::AuthenticationFailed {
        return true;
    }
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

    /// Counts a failed operation; opens the breaker (logging the episode's one line) unless Redis
    /// answered with an error of its own.
    fn failed(&self, op: &str, cause: Cause<'_>) {
        self.n.errors.fetch_add(1, Relaxed);
        let shown = &self.shown;
        let what = match cause {
            Cause::TimedOut(limit) => {
                self.n.timeouts.fetch_add(1, Relaxed);
                format!("Redis tier {shown}: {op} timed out after {} ms", limit.as_millis())
            }
            Cause::NotRedis => format!("Redis tier {shown} is not a Redis server ({NOT_RESP})"),
            Cause::Failed(e) => format!("Redis tier {shown}: {op} failed ({e})"),
            Cause::Refused(e) => {
                if !self.refusal_logged.swap(true, Relaxed) {
                    tracing::warn!("Redis tier {shown}: Redis refused a {op} ({e}); counted as errors, logged once");
                }
                return;
            }
        };
        if let Some(new_episode) = self.breaker.trip() {
            self.pool.lock().clear(); // idle connections are suspect now; probes make new ones
            if new_episode {
                tracing::warn!(
                    "{what}; requests treat Redis as a miss (local tiers keep serving) until it answers a PING \
                     again (one line per episode; counted in redis_timeouts/redis_breaker_trips)"
                );
            }
        }
    }

    /// Runs `f` on a pooled connection (made on demand), every socket read and write bounded by
    /// `timeout`; the connection goes back to the pool only if `f` succeeded.
    fn with_connection<T>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut Conn) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let pooled = self.pool.lock().pop();
        let mut con = match pooled {
            Some(mut c) => {
                c.set_timeouts(timeout)?;
                c
            }
            None => self.client.connect(timeout)?,
        };
        let out = f(&mut con)?;
        let mut pool = self.pool.lock();
        if pool.len() < POOL && con.reusable() {
            pool.push(con);
        }
        Ok(out)
    }

    /// A request's Redis call: on a helper, waited for at most `limit` (its socket reads and
    /// writes too; `f` is handed the call's deadline). None (counted, maybe tripping the
    /// breaker) if it failed or is late.
    fn call<T: Send + 'static>(
        self: &Arc<Self>,
        op: &str,
        limit: Duration,
        f: impl FnOnce(&mut Conn, Instant) -> redis::RedisResult<T> + Send + 'static,
    ) -> Option<T> {
        self.finish(op, self.start_call(limit, f))
    }

    /// `call`, started now and waited for by `finish` (dropped instead: abandoned).
    fn start_call<T: Send + 'static>(
        self: &Arc<Self>,
        limit: Duration,
        f: impl FnOnce(&mut Conn, Instant) -> redis::RedisResult<T> + Send + 'static,
    ) -> Call<T> {
        let me = Arc::clone(self);
        let deadline = Instant::now() + limit;
        let started = self.helpers.start(move || me.with_connection(limit, |con| f(con, deadline)));
        Call { started, limit, deadline }
    }

    fn finish<T>(&self, op: &str, call: Call<T>) -> Option<T> {
        match call.started.wait(call.deadline) {
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                self.failed(op, cause(&e, call.limit));
                None
            }
            None => {
                self.failed(op, Cause::TimedOut(call.limit));
                None
            }
        }
    }

    fn write_batch(&self, batch: &[Write], packed: &mut Vec<u8>) {
        let n = batch.len() as u64;
        let timeout = self.cfg.timeout.max(WRITE_TIMEOUT_FLOOR);
        let result = self.with_connection(timeout, |con| {
            let blocks = batch
                .iter()
                .map(|w| (self.key(w.ns, w.hash), Block { ns: w.ns, hash: w.hash, digest: w.digest, data: &w.data }));
            // SET .. PX rather than PSETEX: an ACL that allows SET need not allow PSETEX.
            let ttl = self.cfg.ttl.map(|t| t.as_millis().max(1) as u64);
            con.set_all(&self.format, blocks, ttl, packed, |bytes| timeout + read_allowance(bytes))
        });
        match result {
            Ok(()) => {
                self.n.written.fetch_add(n, Relaxed);
            }
            Err(e) => {
                self.n.dropped.fetch_add(n, Relaxed);
                self.failed("write", cause(&e, timeout));
            }
        }
        self.n.in_flight.fetch_sub(n, Relaxed);
    }

    /// One of the writer threads: takes a batch from the shared queue and writes it. Two of
    /// them overlap one batch's encoding with the other's round trip to Redis.
    fn writer(&self, rx: &Mutex<Receiver<Write>>) {
        let mut packed = Vec::new();
        loop {
            let batch = {
                let rx = rx.lock();
                let first = match rx.recv_timeout(SPARES_IDLE) {
                    Ok(w) => w,
                    Err(RecvTimeoutError::Timeout) => {
                        // Idle: the spare buffers (and this writer's packing buffer) are freed,
                        // outside the locks.
                        drop(rx);
                        let spares = std::mem::take(&mut *self.spares.lock());
                        drop(spares);
                        packed = Vec::new();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                let mut batch = vec![first];
                while batch.len() < self.cfg.batch_blocks.max(1) {
                    match rx.try_recv() {
                        Ok(w) => batch.push(w),
                        Err(_) => break,
                    }
                }
                batch
            };
            if self.breaker.is_open() {
                let n = batch.len() as u64;
                self.n.dropped.fetch_add(n, Relaxed);
                self.n.in_flight.fetch_sub(n, Relaxed);
            } else {
                self.write_batch(&batch, &mut packed);
            }
            let most = self.cfg.queue_blocks.min(SPARES_BYTES / self.format.block_bytes.max(1));
            let mut batch = batch;
            let mut spares = self.spares.lock();
            let room = most.saturating_sub(spares.len()).min(batch.len());
            spares.extend(batch.drain(..room).map(|w| w.data));
            drop(spares); // the rest of the batch is freed outside the lock
        }
    }

    /// The prober thread: while the breaker is open, PINGs Redis on a new connection (bounded by
    /// the budget) at growing intervals, and closes the breaker when Redis answers.
    fn prober(&self) {
        while self.breaker.wait_to_probe() {
            let t = self.cfg.timeout;
            // A panic in the client (a probe is its code running on a topology it just read)
            // must not end the prober, or the breaker would stay open for good.
            let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.client.connect(t).and_then(|mut con| {
                    con.query::<String>(&redis::cmd("PING"))?;
                    Ok(con)
                })
            }));
            match answered {
                Ok(Ok(con)) => {
                    let mut pool = self.pool.lock();
                    if pool.len() < POOL && con.reusable() {
                        pool.push(con);
                    }
                    drop(pool);
                    if let Some(after) = self.breaker.close() {
                        tracing::info!(
                            "Redis tier {} answers again after {:.1} s; requests use it again",
                            self.shown,
                            after.as_secs_f64()
                        );
                    }
                }
                Ok(Err(_)) | Err(_) => self.breaker.probe_failed(),
            }
        }
    }

    /// Copies the leading valid values into `out`; how many. A value of another XConnector format
    /// or without this reader's MAC is a miss but not deleted: keyed and unkeyed workers (a key
    /// being rolled out) must not wipe each other's values, and the next store overwrites it.
    fn accept(
        self: &Arc<Self>,
        ns: u64,
        keys: &[String],
        values: &[Option<&[u8]>],
        hashes: &[u64],
        digests: &[u128],
        out: &mut [u8],
    ) -> usize {
        let mut n = 0;
        for (i, (value, chunk)) in values.iter().zip(out.chunks_exact_mut(self.format.block_bytes)).enumerate() {
            let Some(value) = value else { break };
            match self.format.check(&keys[i], value, ns, hashes[i], digests[i]) {
                Ok(payload) => chunk.copy_from_slice(payload),
                Err(why) => {
                    let (counter, what, delete) = match why {
                        Reject::Foreign => (&self.n.foreign, "not an XConnector block of this size and format", false),
                        Reject::Damaged => (&self.n.corrupt, "damaged", true),
                        Reject::Unauthenticated => (
                            &self.n.unauthenticated,
                            "no valid MAC (forged, planted, or written without this remote_auth_key)",
                            false,
                        ),
                        Reject::Mismatch => (&self.n.mismatched, "not the KV of the block asked for", true),
                    };
                    if counter.fetch_add(1, Relaxed) == 0 {
                        tracing::warn!(key = %keys[i], "Redis value not served: {what} (logged once per kind)");
                    }
                    if delete {
                        self.delete_later(keys[i].clone());
                    }
                    break;
                }
            }
            n += 1;
        }
        n
    }

    /// Whether a request may use Redis now: not while the breaker is open, and never in a process
    /// forked from the one that opened the tier (its helper, writer and prober threads are not
    /// there, and its pooled sockets are the parent's).
    fn usable(&self) -> bool {
        if self.pid != std::process::id() {
            if !self.fork_logged.swap(true, Relaxed) {
                tracing::warn!(
                    "Redis tier {}: this engine was created before a fork; the Redis tier is off in this \
                     process (create the engine after forking)",
                    self.shown
                );
            }
            self.n.skipped.fetch_add(1, Relaxed);
            return false;
        }
        if self.breaker.is_open() {
            self.n.skipped.fetch_add(1, Relaxed);
            return false;
        }
        true
    }

    /// Deletes a rejected value in the background, so the next store of that block can write a
    /// good one.
    fn delete_later(self: &Arc<Self>, key: String) {
        let me = Arc::clone(self);
        self.helpers.spawn_background(Box::new(move || {
            if !me.breaker.is_open() {
                let _ = me.with_connection(me.cfg.timeout, |con| con.query::<()>(redis::cmd("DEL").arg(&key)));
            }
        }));
    }
}

/// Whether a Redis server at `url` answers a PING within `limit` (connecting, TLS and the
/// password included), for a check at startup. Nothing is written. The PING runs on a thread of
/// its own, so a server that stalls the handshake costs the caller `limit`, not more. The error
/// says what happened without the password: `CoreError::Config` for what the tier would refuse
/// to open with (a malformed URL, an unreadable CA file, refused credentials, a server that is
/// not Redis), `CoreError::Cache` for a server that does not answer (yet).
pub fn ping(url: &str, ca_file: Option<&std::path::Path>, limit: Duration) -> Result<()> {
    /// Why the check failed: servers other than the URL says, refused credentials or not Redis,
    /// or no answer.
    enum Failure {
        Wrong(String),
        Refused(String),
        Silent(String),
    }
    let client = backend::client(url, ca_file)?;
    let shown = redact_url(url);
    let (tx, rx) = std::sync::mpsc::channel();
    let about = shown.clone();
    std::thread::Builder::new()
        .name("xconnector-redis-ping".into())
        .spawn(move || {
            let answer = client.connect(limit).and_then(|mut con| con.query::<String>(&redis::cmd("PING")));
            let failure = match answer {
                Err(e) if is_auth_error(&e) || e.kind() == redis::ErrorKind::Parse => {
                    Some(Failure::Refused(redact_url(&e.to_string())))
                }
                Err(e) if e.is_timeout() => Some(Failure::Silent(redact_url(&e.to_string()))),
                answer => match client.mode_mismatch(&about, limit) {
                    Some(wrong) => Some(Failure::Wrong(wrong)),
                    None => answer.err().map(|e| Failure::Silent(redact_url(&e.to_string()))),
                },
            };
            let _ = tx.send(failure);
        })
        .map_err(|e| CoreError::Io { context: "starting the Redis check".into(), source: e })?;
    match rx.recv_timeout(limit) {
        Ok(None) => Ok(()),
        Ok(Some(Failure::Wrong(e))) => Err(CoreError::config(e)),
        Ok(Some(Failure::Refused(e))) => Err(CoreError::config(format!(
            "Redis at {shown} refused the connection ({e}); check the password in the URL and that it is a Redis \
             server"
        ))),
        Ok(Some(Failure::Silent(e))) => Err(CoreError::Cache(e)),
        Err(_) => Err(CoreError::Cache(format!("no answer within {} ms", limit.as_millis()))),
    }
}

impl RedisTier {
    /// Connects (checking the password and that the server is Redis), and starts the writers and
    /// the prober. Redis being unreachable or silent now is not an error (the breaker opens and
    /// the prober waits for it); a refused password, a server that is not Redis or a malformed
    /// URL is.
    pub fn open(cfg: RedisConfig, block_bytes: usize) -> Result<Self> {
        let shown = redact_url(&cfg.url);
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&cfg.timeout) {
            return Err(CoreError::config(format!(
                "the Redis timeout must be from 1 ms to 60 s (remote_timeout_ms), got {:?}",
                cfg.timeout
            )));
        }
        let client = backend::client(&cfg.url, cfg.ca_file.as_deref())?;
        let (queue, rx) = sync_channel::<Write>(cfg.queue_blocks.max(1));
        let shared = Arc::new(Shared {
            client,
            format: Format { key: cfg.auth_key.clone(), block_bytes },
            shown: shown.clone(),
            pool: Mutex::new(Vec::new()),
            breaker: Breaker::default(),
            helpers: Arc::new(Helpers::default()),
            refusal_logged: AtomicBool::new(false),
            pid: std::process::id(),
            fork_logged: AtomicBool::new(false),
            spares: Mutex::new(Vec::new()),
            read_buffers: Mutex::new(Vec::new()),
            n: Counters::default(),
            cfg,
        });
        // From here on, dropping `tier` stops the threads.
        let tier = Self { shared: Arc::clone(&shared), queue };
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map(drop)
                .map_err(|e| CoreError::Io { context: "starting the Redis tier's threads".into(), source: e })
        };
        let prober = Arc::clone(&shared);
        spawn("xconnector-redis-probe".into(), Box::new(move || prober.prober()))?;
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..WRITERS {
            let (writer, rx) = (Arc::clone(&shared), Arc::clone(&rx));
            spawn(format!("xconnector-redis-{i}"), Box::new(move || writer.writer(&rx)))?;
        }
        let limit = shared.cfg.timeout.max(OPEN_TIMEOUT_FLOOR);
        let first = Arc::clone(&shared);
        let ping = move || first.with_connection(limit, |con| con.query::<String>(&redis::cmd("PING")));
        let answer = shared.helpers.run(limit, ping);
        // Only a server that answered can say what it is (a silent one would cost `limit` again).
        if matches!(&answer, Some(Ok(_))) || matches!(&answer, Some(Err(e)) if !is_auth_error(e) && !e.is_timeout()) {
            let checked = Arc::clone(&shared);
            let mode = move || checked.client.mode_mismatch(&checked.shown, limit);
            if let Some(Some(wrong)) = shared.helpers.run(limit, mode) {
                return Err(CoreError::config(wrong));
            }
        }
        match answer {
            Some(Ok(_)) => {
                // The server's memory settings, for advice only: a server that refuses, renames
                // or delays INFO (an ACL without @dangerous, a proxy) is no failure of the tier.
                let probe = Arc::clone(&shared);
                let info = move || probe.with_connection(limit, Conn::memory_info);
                if let Some(Ok(infos)) = shared.helpers.run(limit, info) {
                    // One warning per tier: the first node (of a cluster) that would refuse writes.
                    infos.iter().any(|info| warn_about_memory(&shown, info, shared.cfg.ttl.is_some()));
                }
            }
            Some(Err(e)) if is_auth_error(&e) => {
                return Err(CoreError::config(format!(
                    "remote_url {shown}: Redis refused the credentials ({e}); check the password in the URL"
                )));
            }
            Some(Err(e)) if e.kind() == redis::ErrorKind::Parse => {
                return Err(CoreError::config(format!(
                    "remote_url {shown} is not a Redis server ({NOT_RESP}); point remote_url at a Redis server"
                )));
            }
            Some(Err(e)) => shared.failed("connect", cause(&e, limit)),
            None => shared.failed("connect", Cause::TimedOut(limit)),
        }
        Ok(tier)
    }

    /// Leading blocks of `hashes` in Redis (0 while the breaker is open, or past the budget). Asked
    /// `LOOKUP_CHUNK` keys at a time, each chunk within the budget, stopping at the first miss: a
    /// long prompt's lookup neither trips the breaker on a healthy Redis nor asks past its end.
    pub fn contains_prefix(&self, ns: u64, hashes: &[u64]) -> usize {
        let s = &self.shared;
        let mut n = 0;
        for chunk in hashes.chunks(LOOKUP_CHUNK) {
            if !s.usable() {
                break;
            }
            let keys: Vec<String> = chunk.iter().map(|&h| s.key(ns, h)).collect();
            let found = s.call("lookup", s.cfg.timeout, move |con, deadline| {
                con.pipeline_until::<bool>(keys.iter().map(|k| redis::cmd("EXISTS").arg(k).clone()).collect(), deadline)
            });
            let here = found.map_or(0, |found| found.iter().take_while(|&&f| f).count());
            n += here;
            if here < chunk.len() {
                break;
            }
        }
        n
    }

    /// Reads the leading blocks of `hashes` (whose digests are `digests`) into `out` (blocks back
    /// to back) until the first missing or invalid one; returns how many were read. Reads go in
    /// pipelines of GETs of at most `READ_CHUNK` bytes, each within the budget plus its bytes at
    /// `READ_RATE`: a Redis that stalls costs one chunk's allowance (then the breaker opens), and
    /// what was read and verified before is kept. A damaged or mismatched value is deleted, so the next
    /// store of that block can write a good one.
    /// `on_verified` is handed the blocks read and verified so far (`out`'s first ones) after each
    /// chunk, while the next chunk is read.
    pub fn get_prefix(
        &self,
        ns: u64,
        hashes: &[u64],
        digests: &[u128],
        out: &mut [u8],
        on_verified: &mut dyn FnMut(&[u8]),
    ) -> usize {
        let s = &self.shared;
        let value_len = s.format.header() + s.format.block_bytes;
        let per = (READ_CHUNK / value_len).max(1);
        let bb = s.format.block_bytes;
        let chunks: Vec<&[u64]> = hashes.chunks(per).collect();
        // Once a chunk's values have all come, the next chunk's read starts before they are
        // checked, so Redis and a helper read the next values while this thread checks and
        // copies these. Not after a miss or a failure: a stalled Redis holds one helper per
        // load, and a short prefix asks for nothing past its end. A chunk read ahead of a value
        // that fails its check is abandoned.
        let read = |c: usize| -> Option<(Vec<String>, Call<Values>)> {
            let chunk = chunks.get(c)?;
            if !s.usable() {
                return None;
            }
            let keys: Vec<String> = chunk.iter().map(|&h| s.key(ns, h)).collect();
            let limit = s.cfg.timeout + read_allowance(keys.len() * value_len);
            let me = Arc::clone(s);
            let asked = keys.clone();
            // The helper reads into a buffer of its own (the caller may stop waiting and return
            // while it still reads); the caller checks and copies the values out, and keeps it.
            let call = s.start_call(limit, move |con, deadline| {
                let mut buf = me.read_buffers.lock().pop().unwrap_or_default();
                let values = con.get_all(&asked, value_len, deadline, &mut buf)?;
                Ok((buf, values))
            });
            Some((keys, call))
        };
        let mut n = 0;
        let mut next = read(0);
        for (c, chunk) in chunks.iter().enumerate() {
            let Some((keys, call)) = next.take() else { break };
            let Some((buf, values)) = s.finish("read", call) else { break };
            if values.iter().all(Option::is_some) {
                next = read(c + 1);
            }
            s.n.reads.fetch_add(1, Relaxed);
            let start = c * per;
            let values: Vec<Option<&[u8]>> = values.iter().map(|v| v.clone().map(|r| &buf[r])).collect();
            let got = s.accept(ns, &keys, &values, &hashes[start..], &digests[start..], &mut out[start * bb..]);
            let mut kept = s.read_buffers.lock();
            if kept.len() < READ_BUFFERS && buf.len() <= 2 * (READ_CHUNK + value_len) {
                kept.push(buf);
            }
            drop(kept);
            n += got;
            if got > 0 {
                on_verified(&out[..n * bb]);
            }
            if got < chunk.len() {
                break;
            }
        }
        s.n.hits.fetch_add(n as u64, Relaxed);
        n
    }

    /// A copy of `block` for `put_behind`, in a spare buffer of a block already written when
    /// there is one.
    pub fn write_buffer(&self, block: &[u8]) -> Vec<u8> {
        let mut data = self.shared.spares.lock().pop().unwrap_or_default();
        data.clear();
        data.extend_from_slice(block);
        data
    }

    /// Queues a block to be written; false (and counted) when the queue is full.
    pub fn put_behind(&self, w: Write) -> bool {
        let s = &self.shared;
        if s.pid != std::process::id() {
            s.n.dropped.fetch_add(1, Relaxed); // no writer threads in a forked child
            return false;
        }
        s.n.in_flight.fetch_add(1, Relaxed);
        if self.queue.try_send(w).is_err() {
            s.n.in_flight.fetch_sub(1, Relaxed);
            s.n.dropped.fetch_add(1, Relaxed);
            return false;
        }
        true
    }

    pub fn in_flight(&self) -> u64 {
        // A forked child inherits the parent's count, not its writers: nothing of it is ours.
        if self.shared.pid != std::process::id() {
            return 0;
        }
        self.shared.n.in_flight.load(Relaxed)
    }

    pub fn stats(&self) -> RedisStats {
        let s = &self.shared;
        let open = s.breaker.is_open();
        RedisStats {
            reads: s.n.reads.load(Relaxed),
            hit_blocks: s.n.hits.load(Relaxed),
            foreign_values: s.n.foreign.load(Relaxed),
            corrupt_values: s.n.corrupt.load(Relaxed),
            mismatched_values: s.n.mismatched.load(Relaxed),
            unauthenticated_values: s.n.unauthenticated.load(Relaxed),
            written_blocks: s.n.written.load(Relaxed),
            dropped_blocks: s.n.dropped.load(Relaxed),
            errors: s.n.errors.load(Relaxed),
            timeouts: s.n.timeouts.load(Relaxed),
            breaker_trips: s.breaker.trips(),
            skipped_calls: s.n.skipped.load(Relaxed),
            breaker_open: open,
            connected: !open,
        }
    }
}

impl Drop for RedisTier {
    /// Stops the prober and the helpers; the writers end when the queue (the sender) goes.
    fn drop(&mut self) {
        self.shared.breaker.shutdown();
        self.shared.helpers.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Instant;

    fn config(url: String) -> RedisConfig {
        RedisConfig {
            url,
            key_prefix: "t".into(),
            queue_blocks: 16,
            batch_blocks: 4,
            timeout: Duration::from_millis(20),
            ttl: None,
            ca_file: None,
            auth_key: None,
        }
    }

    #[test]
    fn the_budget_is_bounded() {
        assert_eq!(timeout_from_secs(0.02).unwrap(), Duration::from_millis(20));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-6, 61.0] {
            let e = timeout_from_secs(bad).unwrap_err().to_string();
            assert!(e.starts_with("redis_timeout must be seconds from 0.001 to 60"), "{e}");
        }
        let mut cfg = config("redis://127.0.0.1:1".into());
        cfg.timeout = Duration::ZERO;
        assert!(RedisTier::open(cfg, 64).is_err());
    }

    #[test]
    fn a_silent_server_opens_the_breaker_and_requests_skip_redis() {
        // Accepts connections (the kernel's backlog) and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://:pw@{}", silent.local_addr().unwrap());
        let t0 = Instant::now();
        let tier = RedisTier::open(config(url), 64).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(30));
        let s = tier.stats();
        assert!(s.breaker_open && !s.connected);
        assert_eq!((s.breaker_trips, s.timeouts, s.errors), (1, 1, 1));
        assert_eq!(tier.contains_prefix(1, &[1, 2]), 0);
        let mut out = vec![0u8; 128];
        assert_eq!(tier.get_prefix(1, &[1, 2], &[0, 0], &mut out, &mut |_| {}), 0);
        assert!(tier.put_behind(Write { ns: 1, hash: 1, digest: 0, data: vec![0; 64] }));
        let deadline = Instant::now() + Duration::from_secs(30);
        while tier.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let s = tier.stats();
        assert_eq!((s.skipped_calls, s.dropped_blocks, s.timeouts, s.breaker_trips), (2, 1, 1, 1));
    }
}
