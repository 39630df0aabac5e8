//! One rank's lookup server: an accept thread and a thread per connection (at most
//! `max_connections`), each answering with the engine's own lookup; no Python involved.
//!
//! A connection is served only if its peer runs as this user (`SO_PEERCRED`). Every request must
//! begin within `idle_timeout` and arrive in full within `io_timeout` of its first byte, with its
//! sizes bounded (wire.rs), so a misbehaving local client can hold a thread only that long.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::error::{CoreError, Result};
use crate::hashing::HashExtras;

use super::dir::ensure_private_dir;
use super::sys::{self, euid};
use super::wire::{self, ReadError};

/// What answers a lookup: tokens hit for `(tokens, extras)`; an error is answered as 0.
pub type LookupFn = Arc<dyn Fn(&[u32], HashExtras<'_>) -> Result<usize> + Send + Sync>;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// A request must arrive in full (and its reply leave) within this long of its first byte.
    pub io_timeout: Duration,
    /// A connection with no request for this long is closed (the client reconnects when it needs to).
    pub idle_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { max_connections: 32, io_timeout: Duration::from_secs(2), idle_timeout: Duration::from_secs(300) }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections served (accepted, of this user, under the cap).
    pub connections: u64,
    /// Connections being served now.
    pub active: u64,
    /// Connections closed at once because `max_connections` were being served.
    pub refused_busy: u64,
    /// Connections dropped because the peer runs as another user (or its uid was unknown).
    pub foreign_clients: u64,
    /// Requests answered.
    pub requests: u64,
    /// Connections closed for a request that was not this protocol or over a size bound.
    pub bad_requests: u64,
    /// Connections closed for a request that did not arrive in full within `io_timeout`.
    pub timeouts: u64,
    /// Lookups that failed or panicked in the engine (answered 0).
    pub lookup_errors: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    refused_busy: AtomicU64,
    foreign_clients: AtomicU64,
    requests: AtomicU64,
    bad_requests: AtomicU64,
    timeouts: AtomicU64,
    lookup_errors: AtomicU64,
    logged_foreign: AtomicBool,
    logged_busy: AtomicBool,
    logged_bad: AtomicBool,
}

struct Shared {
    path: PathBuf,
    listener: UnixListener,
    lookup: LookupFn,
    cfg: ServerConfig,
    uid: u32,
    closed: AtomicBool,
    /// A second handle on every connection being served, to shut them down on close.
    conns: Mutex<HashMap<u64, UnixStream>>,
    next_conn: AtomicU64,
    counters: Counters,
}

/// Serves lookups on `path` until closed or dropped.
pub struct LookupServer {
    shared: Arc<Shared>,
    /// (device, inode) of the socket bound, so close removes this socket and never a successor's.
    inode: (u64, u64),
    /// The process that bound it: a forked child (which has none of its threads) must neither
    /// shut down the listening socket it shares with its parent nor remove the parent's socket.
    pid: u32,
}

impl LookupServer {
    /// Binds `path`, whose directory must be private to this user (created 0700 if missing). A
    /// stale socket of this user at `path` is replaced; a live one, or anything else, is refused.
    pub fn bind(path: &Path, lookup: LookupFn, cfg: ServerConfig) -> Result<Self> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        ensure_private_dir(dir)?;
        clear_stale(path)?;
        let io_err = |e: io::Error| CoreError::Io { context: format!("lookup socket {}", path.display()), source: e };
        let listener = UnixListener::bind(path).map_err(io_err)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        let meta = fs::symlink_metadata(path).map_err(io_err)?;
        let shared = Arc::new(Shared {
            path: path.to_owned(),
            listener,
            lookup,
            cfg,
            uid: euid(),
            closed: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let server = Self { shared: Arc::clone(&shared), inode: (meta.dev(), meta.ino()), pid: std::process::id() };
        std::thread::Builder::new()
            .name("xconnector-lookup".into())
            .spawn(move || shared.accept_loop())
            .map_err(|e| CoreError::Io { context: "starting the lookup server thread".into(), source: e })?;
        tracing::debug!(path = %path.display(), "lookup server listening");
        Ok(server)
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.counters;
        ServerStats {
            connections: c.connections.load(Relaxed),
            active: self.shared.conns.lock().len() as u64,
            refused_busy: c.refused_busy.load(Relaxed),
            foreign_clients: c.foreign_clients.load(Relaxed),
            requests: c.requests.load(Relaxed),
            bad_requests: c.bad_requests.load(Relaxed),
            timeouts: c.timeouts.load(Relaxed),
            lookup_errors: c.lookup_errors.load(Relaxed),
        }
    }

    /// Stops accepting, closes every connection and removes the socket. Idempotent; never waits
    /// for the server's threads (they end on their own at once).
    pub fn close(&self) {
        if self.shared.closed.swap(true, Relaxed) || std::process::id() != self.pid {
            return;
        }
        sys::shutdown_listener(&self.shared.listener);
        for conn in self.shared.conns.lock().values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        if let Ok(meta) = fs::symlink_metadata(&self.shared.path) {
            if (meta.dev(), meta.ino()) == self.inode {
                let _ = fs::remove_file(&self.shared.path);
            }
        }
    }
}

impl Drop for LookupServer {
    fn drop(&mut self) {
        self.close();
    }
}

/// Makes way for a new socket at `path`: nothing there, or a socket of this user nobody listens on.
fn clear_stale(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CoreError::Io { context: format!("lookup socket {}", path.display()), source: e }),
    };
    let refuse = |why: String| CoreError::Io {
        context: format!("refusing the lookup socket path {}: {why}", path.display()),
        source: io::ErrorKind::PermissionDenied.into(),
    };
    if !meta.file_type().is_socket() || meta.uid() != euid() {
        let kind = if meta.file_type().is_socket() { "socket" } else { "file that is not a socket" };
        return Err(refuse(format!("it is a {kind} owned by uid {}; remove it", meta.uid())));
    }
    match sys::connect_nonblocking(path) {
        Ok(_) => Err(refuse(
            "another process of this user is serving lookups there (the same engine id and rank twice?)".into(),
        )),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            Err(refuse("another process of this user listens there but does not accept".into()))
        }
        Err(_) => fs::remove_file(path).map_err(|e| CoreError::Io {
            context: format!("removing the stale lookup socket {}", path.display()),
            source: e,
        }),
    }
}

impl Shared {
    fn accept_loop(self: Arc<Self>) {
        loop {
            let accepted = self.listener.accept();
            if self.closed.load(Relaxed) {
                return;
            }
            match accepted {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors or memory, or an aborted connection: let it pass.
                    tracing::debug!(error = %e, "lookup server: accept failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn admit(self: &Arc<Self>, stream: UnixStream) {
        let c = &self.counters;
        match sys::peer_uid(&stream) {
            Ok(uid) if uid == self.uid => {}
            peer => {
                c.foreign_clients.fetch_add(1, Relaxed);
                if !c.logged_foreign.swap(true, Relaxed) {
                    let who = peer.map_or_else(|e| format!("a process of unknown uid ({e})"), |u| format!("uid {u}"));
                    tracing::warn!(
                        "lookup server at {}: dropped a connection from {who}; only processes of this user \
                         (uid {}) may ask (logged once, counted in foreign_clients)",
                        self.path.display(),
                        self.uid
                    );
                }
                return;
            }
        }
        let mut conns = self.conns.lock();
        if conns.len() >= self.cfg.max_connections {
            c.refused_busy.fetch_add(1, Relaxed);
            if !c.logged_busy.swap(true, Relaxed) {
                tracing::warn!(
                    "lookup server at {}: {} connections open, closing new ones (logged once, counted in refused_busy)",
                    self.path.display(),
                    conns.len()
                );
            }
            return;
        }
        let Ok(handle) = stream.try_clone() else { return };
        let id = self.next_conn.fetch_add(1, Relaxed);
        conns.insert(id, handle);
        drop(conns);
        c.connections.fetch_add(1, Relaxed);
        let shared = Arc::clone(self);
        let spawned =
            std::thread::Builder::new().name("xconnector-lookup-conn".into()).spawn(move || shared.serve(id, stream));
        if spawned.is_err() {
            self.conns.lock().remove(&id);
        } else if self.closed.load(Relaxed) {
            // Closed while this one was being admitted: close missed it.
            if let Some(conn) = self.conns.lock().get(&id) {
                let _ = conn.shutdown(Shutdown::Both);
            }
        }
    }

    fn serve(&self, id: u64, mut stream: UnixStream) {
        let _ = stream.set_write_timeout(Some(self.cfg.io_timeout));
        let c = &self.counters;
        loop {
            let req = match wire::read_request(&mut stream, self.cfg.idle_timeout, self.cfg.io_timeout) {
                Ok(req) => req,
                Err(ReadError::Closed | ReadError::Idle) => break,
                Err(ReadError::Io(e)) => {
                    tracing::debug!(error = %e, "lookup server: connection failed");
                    break;
                }
                Err(ReadError::TimedOut) => {
                    c.timeouts.fetch_add(1, Relaxed);
                    break;
                }
                Err(ReadError::Bad(why)) => {
                    c.bad_requests.fetch_add(1, Relaxed);
                    if !c.logged_bad.swap(true, Relaxed) {
                        tracing::warn!(
                            "lookup server at {}: dropped a connection sending {why} (logged once, counted in bad_requests)",
                            self.path.display()
                        );
                    }
                    break;
                }
            };
            c.requests.fetch_add(1, Relaxed);
            let hit = match catch_unwind(AssertUnwindSafe(|| (self.lookup)(&req.tokens, req.extras()))) {
                Ok(Ok(hit)) => hit.min(req.tokens.len()),
                Ok(Err(e)) => {
                    c.lookup_errors.fetch_add(1, Relaxed);
                    tracing::debug!(error = %e, "lookup server: lookup failed, answered 0");
                    0
                }
                Err(_) => {
                    c.lookup_errors.fetch_add(1, Relaxed);
                    0
                }
            };
            if sys::send_all(&stream, &wire::encode_reply(req.id, hit as u64)).is_err() {
                break;
            }
        }
        self.conns.lock().remove(&id);
    }
}
