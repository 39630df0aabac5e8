//! The lookup service over real Unix sockets in this process: answers, the minimum over ranks,
//! a hung rank, garbage, the connection cap, stale and foreign files at the path, and close.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xconnector_core::lookup_service::{
    socket_path, ClientConfig, LookupClient, LookupFn, LookupServer, ServerConfig, ServerStats,
};
use xconnector_core::{CoreError, HashExtras};

const NONE: HashExtras<'static> = HashExtras { lora_name: None, cache_salt: None, lora_id: None };

/// A private directory (0700) inside a fresh temp dir.
fn private_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("socks");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    (tmp, dir)
}

/// A lookup that answers `hit` capped at the prompt, or the salt's length when one is given.
fn answers(hit: usize) -> LookupFn {
    Arc::new(move |tokens: &[u32], x: HashExtras<'_>| Ok(x.cache_salt.map_or(hit, str::len).min(tokens.len())))
}

fn serve(dir: &Path, rank: u32, hit: usize) -> LookupServer {
    LookupServer::bind(&socket_path(dir, "e", rank), answers(hit), ServerConfig::default()).unwrap()
}

fn client(dir: &Path, ranks: u32, timeout_ms: u64) -> LookupClient {
    let paths = (0..ranks).map(|r| socket_path(dir, "e", r)).collect();
    LookupClient::new(paths, ClientConfig { timeout: Duration::from_millis(timeout_ms), ..Default::default() })
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// True once the server has closed `conn` (end of stream, or a reset for unread bytes).
fn closed_by_peer(conn: &mut UnixStream) -> bool {
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 8];
    match conn.read(&mut buf) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn the_answer_is_the_smallest_hit_over_ranks() {
    let (_tmp, dir) = private_dir();
    let servers: Vec<_> = [(0, 96), (1, 64), (2, 128)].into_iter().map(|(r, h)| serve(&dir, r, h)).collect();
    let c = client(&dir, 3, 5000);
    let prompt: Vec<u32> = (0..128).collect();
    assert_eq!(c.lookup(&prompt, NONE).unwrap(), 64);
    assert_eq!(c.lookup(&prompt[..40], NONE).unwrap(), 40);
    assert_eq!(c.lookup(&prompt, HashExtras { cache_salt: Some("salt"), ..NONE }).unwrap(), 4);
    let s = c.stats();
    assert_eq!((s.lookups, s.answered, s.missed), (3, 3, 0), "{s:?}");
    // One connection per rank, kept between lookups.
    assert!(servers.iter().all(|s| s.stats().connections == 1 && s.stats().requests == 3));
    drop(servers);
    assert_eq!(c.lookup(&prompt, NONE).unwrap(), 0);
    assert_eq!(c.stats().missed, 1);
}

#[test]
fn a_hung_rank_costs_one_timeout_then_is_left_alone() {
    let (_tmp, dir) = private_dir();
    let _up = serve(&dir, 0, 64);
    // Rank 1 listens but never accepts: the connect succeeds (backlog), no reply ever comes.
    let _hung = UnixListener::bind(socket_path(&dir, "e", 1)).unwrap();
    let _up2 = serve(&dir, 2, 64);
    let c = client(&dir, 3, 200);
    let t0 = Instant::now();
    assert_eq!(c.lookup(&[1; 64], NONE).unwrap(), 0);
    let first = t0.elapsed();
    let t1 = Instant::now();
    assert_eq!(c.lookup(&[1; 64], NONE).unwrap(), 0);
    let second = t1.elapsed();
    let s = c.stats();
    assert_eq!((s.timeouts, s.backing_off, s.missed), (1, 1, 2), "{s:?}");
    assert!(first < Duration::from_secs(30) && second < first, "{first:?} then {second:?}");
}

#[test]
fn garbage_and_huge_requests_close_only_their_connection() {
    let (_tmp, dir) = private_dir();
    let server = serve(&dir, 0, 32);
    let path = socket_path(&dir, "e", 0);
    let mut junk = UnixStream::connect(&path).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(closed_by_peer(&mut junk), "the server closes a connection speaking another protocol");
    let mut huge = UnixStream::connect(&path).unwrap();
    huge.write_all(b"XCL1").unwrap();
    huge.write_all(&7u64.to_le_bytes()).unwrap();
    huge.write_all(&u32::MAX.to_le_bytes()).unwrap();
    assert!(closed_by_peer(&mut huge), "and one claiming 4G tokens");
    assert_eq!(client(&dir, 1, 5000).lookup(&[5; 40], NONE).unwrap(), 32);
    let s = server.stats();
    assert_eq!((s.bad_requests, s.requests), (2, 1), "{s:?}");
}

#[test]
fn a_stalled_request_times_out_and_an_idle_connection_is_reconnected() {
    let (_tmp, dir) = private_dir();
    let path = socket_path(&dir, "e", 0);
    let cfg = ServerConfig {
        io_timeout: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let server = LookupServer::bind(&path, answers(16), cfg).unwrap();
    let mut slow = UnixStream::connect(&path).unwrap();
    slow.write_all(b"XCL1\x01").unwrap(); // begins a request, never finishes it
    assert!(closed_by_peer(&mut slow));
    let c = client(&dir, 1, 5000);
    assert_eq!(c.lookup(&[1; 16], NONE).unwrap(), 16);
    wait_for("the idle connection to close", || server.stats().active == 0);
    assert_eq!(c.lookup(&[1; 16], NONE).unwrap(), 16, "the client reconnects, no spurious miss");
    let s = server.stats();
    assert_eq!((s.timeouts, s.connections, s.requests), (1, 3, 2), "{s:?}");
    assert_eq!(c.stats().errors, 0);
}

#[test]
fn connections_over_the_cap_are_closed() {
    let (_tmp, dir) = private_dir();
    let path = socket_path(&dir, "e", 0);
    let cfg = ServerConfig { max_connections: 2, ..Default::default() };
    let server = LookupServer::bind(&path, answers(16), cfg).unwrap();
    let held: Vec<_> = (0..2).map(|_| UnixStream::connect(&path).unwrap()).collect();
    wait_for("two connections", || server.stats().active == 2);
    let mut third = UnixStream::connect(&path).unwrap();
    assert!(closed_by_peer(&mut third));
    assert_eq!(server.stats().refused_busy, 1);
    drop(held);
    wait_for("the held connections to end", || server.stats().active == 0);
    assert_eq!(client(&dir, 1, 5000).lookup(&[1; 16], NONE).unwrap(), 16);
}

#[test]
fn stale_sockets_are_replaced_anything_else_is_refused() {
    let (_tmp, dir) = private_dir();
    let path = socket_path(&dir, "e", 0);
    drop(UnixListener::bind(&path).unwrap()); // a socket file nobody listens on
    let server = serve(&dir, 0, 16);
    assert_eq!(client(&dir, 1, 5000).lookup(&[1; 16], NONE).unwrap(), 16);
    let live = LookupServer::bind(&path, answers(16), ServerConfig::default());
    assert!(matches!(live, Err(CoreError::Io { ref context, .. }) if context.contains("serving lookups there")));
    server.close();
    assert!(!path.exists(), "close removes the socket");
    fs::write(&path, b"not a socket").unwrap();
    let err = LookupServer::bind(&path, answers(16), ServerConfig::default()).err().unwrap();
    assert!(err.to_string().contains("not a socket"), "{err}");
}

#[test]
fn an_open_directory_is_refused_by_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("open");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let err = LookupServer::bind(&socket_path(&dir, "e", 0), answers(16), ServerConfig::default()).err().unwrap();
    assert!(err.to_string().contains("open to other users"), "{err}");
    // A listener there anyway (as another process of this user might have made): not asked.
    let _l = UnixListener::bind(socket_path(&dir, "e", 0)).unwrap();
    let c = client(&dir, 1, 5000);
    assert_eq!(c.lookup(&[1; 16], NONE).unwrap(), 0);
    assert_eq!(c.stats().unsafe_dirs, 1);
}

#[test]
fn close_stops_accepting_and_ends_connections() {
    let (_tmp, dir) = private_dir();
    let server = serve(&dir, 0, 16);
    let c = client(&dir, 1, 5000);
    assert_eq!(c.lookup(&[1; 16], NONE).unwrap(), 16);
    server.close();
    server.close();
    wait_for("connections to end", || server.stats().active == 0);
    assert_eq!(server.stats(), ServerStats { connections: 1, requests: 1, ..Default::default() });
    assert_eq!(c.lookup(&[1; 16], NONE).unwrap(), 0);
    // A new server at the same path is reached by the same client.
    let _again = serve(&dir, 0, 16);
    assert_eq!(c.lookup(&[1; 16], NONE).unwrap(), 16);
}

#[test]
fn a_failing_lookup_is_a_zero_not_a_dead_server() {
    let (_tmp, dir) = private_dir();
    let path = socket_path(&dir, "e", 0);
    let failing: LookupFn = Arc::new(|tokens: &[u32], _: HashExtras<'_>| {
        if tokens.len() == 1 {
            panic!("boom");
        }
        Err(CoreError::Cache("down".into()))
    });
    let server = LookupServer::bind(&path, failing, ServerConfig::default()).unwrap();
    let c = client(&dir, 1, 5000);
    assert_eq!(c.lookup(&[1], NONE).unwrap(), 0);
    assert_eq!(c.lookup(&[1, 2], NONE).unwrap(), 0);
    assert_eq!((server.stats().lookup_errors, c.stats().answered), (2, 2));
}
