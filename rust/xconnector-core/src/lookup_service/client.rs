//! The scheduler's side: asks every rank at once (send to all, then read all, one deadline) and
//! answers the minimum, or 0 unless every rank answered in time. Connections are kept between
//! lookups and made again lazily; a rank that timed out or was refused is not asked again for
//! `retry_after` (lookups answer 0 at once meanwhile), so a hung rank costs one timeout per
//! `retry_after`, not one per lookup.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{CoreError, Result};
use crate::hashing::HashExtras;

use super::dir::check_private_dir;
use super::sys::{self, euid};
use super::wire::{self, REPLY_BYTES};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How long one lookup waits for all ranks together.
    pub timeout: Duration,
    /// How long a rank that timed out or was refused is left alone before it is asked again.
    pub retry_after: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self { timeout: Duration::from_millis(100), retry_after: Duration::from_secs(1) }
    }
}

/// Lookups count once in `lookups` and once in either `answered` or `missed`; the other fields
/// count ranks, per lookup, by why they did not answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub lookups: u64,
    /// Every rank answered: the answer was their minimum.
    pub answered: u64,
    /// Answered 0 because some rank did not answer.
    pub missed: u64,
    /// No server to connect to (not started yet, or gone).
    pub unreachable: u64,
    /// No answer within the timeout (or a server that stopped accepting).
    pub timeouts: u64,
    /// Refused: the server runs as another user. Nothing was sent to it.
    pub foreign_servers: u64,
    /// Refused: the socket directory is not private to this user. Nothing was sent.
    pub unsafe_dirs: u64,
    /// A reply of another protocol or request, or more tokens than asked.
    pub mismatches: u64,
    /// The connection failed mid-request (closed or reset).
    pub errors: u64,
    /// Lookups answered 0 without asking: a rank failed less than `retry_after` ago.
    pub backing_off: u64,
}

#[derive(Default)]
struct Counters {
    lookups: AtomicU64,
    answered: AtomicU64,
    missed: AtomicU64,
    unreachable: AtomicU64,
    timeouts: AtomicU64,
    foreign_servers: AtomicU64,
    unsafe_dirs: AtomicU64,
    mismatches: AtomicU64,
    errors: AtomicU64,
    backing_off: AtomicU64,
    logged_unsafe: AtomicBool,
    logged_foreign: AtomicBool,
    logged_timeout: AtomicBool,
    logged_mismatch: AtomicBool,
}

/// Why a rank did not answer.
enum Fail {
    Unreachable(String),
    TimedOut,
    Foreign(String),
    UnsafeDir(String),
    Mismatch,
    Broken(String),
}

struct Rank {
    path: PathBuf,
    conn: Option<UnixStream>,
    retry_at: Option<Instant>,
}

/// Asks the lookup servers at `paths` (one per rank).
pub struct LookupClient {
    cfg: ClientConfig,
    uid: u32,
    ranks: Mutex<Vec<Rank>>,
    /// The process the connections belong to: after a fork the child makes its own, so parent
    /// and child never interleave requests on one socket.
    pid: AtomicU32,
    next_id: AtomicU64,
    counters: Counters,
}

impl LookupClient {
    pub fn new(paths: Vec<PathBuf>, cfg: ClientConfig) -> Self {
        let ranks = paths.into_iter().map(|path| Rank { path, conn: None, retry_at: None }).collect();
        Self {
            cfg,
            uid: euid(),
            ranks: Mutex::new(ranks),
            pid: AtomicU32::new(std::process::id()),
            next_id: AtomicU64::new(1),
            counters: Counters::default(),
        }
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        self.ranks.lock().iter().map(|r| r.path.clone()).collect()
    }

    /// Tokens every rank can load: the smallest hit over the ranks, or 0 unless all answered in
    /// time. Errors only for a request that cannot be sent at all (over a size bound).
    pub fn lookup(&self, tokens: &[u32], extras: HashExtras<'_>) -> Result<usize> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let request = wire::encode_request(id, tokens, extras)?;
        let c = &self.counters;
        c.lookups.fetch_add(1, Relaxed);
        // Another lookup in flight (or a lock a fork left held in this child) is waited for only
        // up to the deadline; past it, this one is a miss, never a hang.
        let Some(mut ranks) = self.ranks.try_lock_for(self.cfg.timeout) else {
            c.timeouts.fetch_add(1, Relaxed);
            c.missed.fetch_add(1, Relaxed);
            return Ok(0);
        };
        let hit = self.ask_all(&mut ranks, &request, id, tokens.len());
        match hit {
            Some(_) => c.answered.fetch_add(1, Relaxed),
            None => c.missed.fetch_add(1, Relaxed),
        };
        Ok(hit.unwrap_or(0))
    }

    /// Closes every connection (they are made again by the next lookup).
    pub fn close(&self) {
        for rank in self.ranks.lock().iter_mut() {
            rank.conn = None;
        }
    }

    pub fn stats(&self) -> ClientStats {
        let c = &self.counters;
        ClientStats {
            lookups: c.lookups.load(Relaxed),
            answered: c.answered.load(Relaxed),
            missed: c.missed.load(Relaxed),
            unreachable: c.unreachable.load(Relaxed),
            timeouts: c.timeouts.load(Relaxed),
            foreign_servers: c.foreign_servers.load(Relaxed),
            unsafe_dirs: c.unsafe_dirs.load(Relaxed),
            mismatches: c.mismatches.load(Relaxed),
            errors: c.errors.load(Relaxed),
            backing_off: c.backing_off.load(Relaxed),
        }
    }

    fn ask_all(&self, ranks: &mut [Rank], request: &[u8], id: u64, n: usize) -> Option<usize> {
        if ranks.is_empty() {
            return None;
        }
        let start = Instant::now();
        let pid = std::process::id();
        if self.pid.swap(pid, Relaxed) != pid {
            for rank in ranks.iter_mut() {
                rank.conn = None;
            }
        }
        drop_closed(ranks);
        for rank in ranks.iter_mut() {
            if rank.conn.is_some() {
                continue;
            }
            if rank.retry_at.is_some_and(|t| start < t) {
                self.counters.backing_off.fetch_add(1, Relaxed);
                return None;
            }
            match self.connect(&rank.path) {
                Ok(conn) => rank.conn = Some(conn),
                Err(fail) => {
                    self.fail(rank, fail);
                    return None;
                }
            }
        }
        let hits = self.exchange(ranks, request, id, n, start + self.cfg.timeout)?;
        for rank in ranks.iter_mut() {
            rank.retry_at = None;
        }
        hits.into_iter().min().map(|h| h as usize)
    }

    /// A connection to the server at `path`, made only if its directory is private and the
    /// server runs as this user.
    fn connect(&self, path: &Path) -> std::result::Result<UnixStream, Fail> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        match check_private_dir(dir) {
            Ok(()) => {}
            Err(CoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(Fail::Unreachable(format!("{} does not exist", dir.display())))
            }
            Err(e) => return Err(Fail::UnsafeDir(e.to_string())),
        }
        let conn = match sys::connect_nonblocking(path) {
            Ok(conn) => conn,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(Fail::TimedOut),
            Err(e) => return Err(Fail::Unreachable(e.to_string())),
        };
        match sys::peer_uid(&conn) {
            Ok(uid) if uid == self.uid => Ok(conn),
            Ok(uid) => Err(Fail::Foreign(format!("uid {uid}"))),
            Err(e) => Err(Fail::Foreign(format!("an unknown uid ({e})"))),
        }
    }

    /// Sends `request` to every rank, then reads every reply, all by `deadline`; the hits, or
    /// None (the failing ranks noted, every connection with a request in flight closed).
    fn exchange(&self, ranks: &mut [Rank], request: &[u8], id: u64, n: usize, deadline: Instant) -> Option<Vec<u64>> {
        let mut sent = vec![0usize; ranks.len()];
        let mut replies = vec![[0u8; REPLY_BYTES]; ranks.len()];
        let mut got = vec![0usize; ranks.len()];
        let mut hits = vec![0u64; ranks.len()];
        let mut pending: Vec<usize> = (0..ranks.len()).collect();
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(ranks.len());
        let mut failed: Option<(usize, Fail)> = None;
        'wait: while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            fds.clear();
            for &i in &pending {
                let fd = ranks[i].conn.as_ref().map_or(-1, |c| c.as_raw_fd());
                let events = if sent[i] < request.len() { libc::POLLOUT } else { libc::POLLIN };
                fds.push(libc::pollfd { fd, events, revents: 0 });
            }
            if let Err(e) = sys::poll(&mut fds, left) {
                failed = Some((pending[0], Fail::Broken(format!("poll: {e}"))));
                break;
            }
            let mut still = Vec::with_capacity(pending.len());
            for (k, &i) in pending.iter().enumerate() {
                let fd = fds[k].fd;
                if fds[k].revents == 0 {
                    still.push(i);
                } else if sent[i] < request.len() {
                    match sys::send(fd, &request[sent[i]..], true) {
                        Ok(k) => sent[i] += k,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            failed = Some((i, Fail::Broken(e.to_string())));
                            break 'wait;
                        }
                    }
                    still.push(i);
                } else {
                    match sys::recv_nonblocking(fd, &mut replies[i][got[i]..]) {
                        Ok(0) => {
                            failed = Some((i, Fail::Broken("the server closed the connection".into())));
                            break 'wait;
                        }
                        Ok(k) => got[i] += k,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            failed = Some((i, Fail::Broken(e.to_string())));
                            break 'wait;
                        }
                    }
                    if got[i] < REPLY_BYTES {
                        still.push(i);
                        continue;
                    }
                    match wire::decode_reply(&replies[i]) {
                        Some((rid, hit)) if rid == id && hit <= n as u64 => hits[i] = hit,
                        _ => {
                            failed = Some((i, Fail::Mismatch));
                            break 'wait;
                        }
                    }
                }
            }
            pending = still;
        }
        if pending.is_empty() && failed.is_none() {
            return Some(hits);
        }
        match failed {
            Some((i, fail)) => {
                self.fail(&mut ranks[i], fail);
                for &j in &pending {
                    ranks[j].conn = None; // a request in flight: its reply must never be read as another's
                }
            }
            None => {
                for &j in &pending {
                    self.fail(&mut ranks[j], Fail::TimedOut);
                }
            }
        }
        None
    }

    /// Counts and (once per kind) logs why `rank` did not answer, closes its connection, and for
    /// a timeout or a refusal leaves it alone for `retry_after`.
    fn fail(&self, rank: &mut Rank, fail: Fail) {
        let c = &self.counters;
        let path = rank.path.display();
        rank.conn = None;
        let back_off = match fail {
            Fail::Unreachable(why) => {
                c.unreachable.fetch_add(1, Relaxed);
                tracing::debug!("lookup rank at {path} not reachable ({why}); this lookup answers 0");
                false
            }
            Fail::Broken(why) => {
                c.errors.fetch_add(1, Relaxed);
                tracing::debug!("lookup rank at {path} failed ({why}); this lookup answers 0");
                false
            }
            Fail::TimedOut => {
                c.timeouts.fetch_add(1, Relaxed);
                if !c.logged_timeout.swap(true, Relaxed) {
                    tracing::warn!(
                        "lookup rank at {path} did not answer within {:?}; lookups answer 0 and it is asked again \
                         after {:?} (logged once, counted in timeouts)",
                        self.cfg.timeout,
                        self.cfg.retry_after
                    );
                }
                true
            }
            Fail::Foreign(who) => {
                c.foreign_servers.fetch_add(1, Relaxed);
                if !c.logged_foreign.swap(true, Relaxed) {
                    tracing::error!(
                        "refusing the lookup server at {path}: it runs as {who}, not as this user (uid {}); nothing \
                         was sent to it and lookups answer 0. Another local user may have bound the path: remove it \
                         and check the socket directory (logged once, counted in foreign_servers)",
                        self.uid
                    );
                }
                true
            }
            Fail::UnsafeDir(why) => {
                c.unsafe_dirs.fetch_add(1, Relaxed);
                if !c.logged_unsafe.swap(true, Relaxed) {
                    tracing::error!("{why}; lookups answer 0 (logged once, counted in unsafe_dirs)");
                }
                true
            }
            Fail::Mismatch => {
                c.mismatches.fetch_add(1, Relaxed);
                if !c.logged_mismatch.swap(true, Relaxed) {
                    tracing::warn!(
                        "lookup rank at {path} sent a reply that does not match the request (another version of \
                         XConnector?); lookups answer 0 (logged once, counted in mismatches)"
                    );
                }
                true
            }
        };
        if back_off {
            rank.retry_at = Some(Instant::now() + self.cfg.retry_after);
        }
    }
}

/// Forgets connections the server has closed (idle timeout, restart): on an idle connection of
/// this protocol, anything readable is an end of stream.
fn drop_closed(ranks: &mut [Rank]) {
    let mut fds: Vec<libc::pollfd> = ranks
        .iter()
        .map(|r| libc::pollfd { fd: r.conn.as_ref().map_or(-1, |c| c.as_raw_fd()), events: libc::POLLIN, revents: 0 })
        .collect();
    if sys::poll(&mut fds, Duration::ZERO).unwrap_or(0) == 0 {
        return;
    }
    for (rank, fd) in ranks.iter_mut().zip(&fds) {
        if fd.revents != 0 {
            rank.conn = None;
        }
    }
}
