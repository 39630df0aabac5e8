//! A connection to one Redis server over plain TCP whose replies stay in a buffer the caller
//! lends it, values in place. The `redis` crate's parser copies every value out of its own
//! buffer into a fresh `Vec` (the kernel zeroing new pages for each large one, then one more
//! copy), which held loads of 64 KiB values to a third of what Redis serves. Here a pipeline's
//! replies are read with large reads into one reused buffer, and a value is a range of it.
//!
//! It speaks only what the tier sends (AUTH, SELECT, PING, GET, SET, EXISTS, DEL, INFO) in RESP2,
//! whose replies to these are never aggregates: a reply of another type is a protocol error, as
//! is anything that is not RESP. TLS and Unix sockets keep the crate's connection.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::time::{Duration, Instant};

use redis::{ErrorKind, RedisError, RedisResult, Value};

/// One reply; its bytes are a range of the buffer it was read into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Bulk(Range<usize>),
    Nil,
    Int(i64),
    Simple(Range<usize>),
}

/// The room a read is given at least, so reads stay large.
const MIN_READ: usize = 64 << 10;
/// The most a buffer grows ahead of the bytes read into it.
const MAX_GROWTH: usize = 16 << 20;
/// Redis' own limit on a bulk string (`proto-max-bulk-len`): a longer length is not Redis.
const MAX_BULK: i64 = 512 << 20;
/// A reply's first line longer than this (an error message, a simple string) is not Redis.
const MAX_LINE: usize = 64 << 10;

pub struct RespConn {
    stream: TcpStream,
    /// The buffer of replies read as values (`read_values`), kept with the connection: a lookup
    /// or a SET batch must not allocate and zero one per call.
    small: Vec<u8>,
    /// Bytes came that nobody asked for (a proxy's or a server's own message): the connection
    /// is not given back to the pool, rather than have them read as the next call's replies.
    broken: bool,
}

/// Where parsing a reply at some offset got.
enum Parsed {
    /// The reply and the offset after it.
    Done(Reply, usize),
    /// Incomplete: the reply needs at least this many bytes from its start.
    Need(usize),
}

fn protocol_error(what: &str) -> RedisError {
    (ErrorKind::Parse, "not a Redis reply", what.to_owned()).into()
}

pub fn timed_out() -> RedisError {
    io::Error::new(io::ErrorKind::TimedOut, "past the call's deadline").into()
}

/// The error a `-...` reply line (with its CRLF) says, as the crate makes it.
fn server_error(line: &[u8]) -> RedisError {
    match redis::parse_redis_value(line).and_then(Value::extract_error) {
        Err(e) => e,
        Ok(_) => protocol_error("an error reply that is not one"),
    }
}

fn integer(text: &[u8]) -> RedisResult<i64> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| protocol_error("a length or integer that is not a number"))
}

/// The reply starting at `pos` of `buf`. A server error is an `Err` of its kind.
fn parse(buf: &[u8], pos: usize) -> RedisResult<Parsed> {
    let scan = &buf[pos..buf.len().min(pos + MAX_LINE)];
    let Some(nl) = scan.iter().position(|&b| b == b'\n') else {
        if scan.len() == MAX_LINE {
            return Err(protocol_error("a line without end"));
        }
        return Ok(Parsed::Need(scan.len() + 1));
    };
    if nl == 0 || scan[nl - 1] != b'\r' {
        return Err(protocol_error("a line not ended by CRLF"));
    }
    let (text, after) = (pos + 1..pos + nl - 1, pos + nl + 1);
    let reply = match buf[pos] {
        b'$' => match integer(&buf[text])? {
            -1 => Reply::Nil,
            len if (0..=MAX_BULK).contains(&len) => {
                let end = after + len as usize;
                if buf.len() < end + 2 {
                    return Ok(Parsed::Need(end + 2 - pos));
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(protocol_error("a bulk string longer than its length"));
                }
                return Ok(Parsed::Done(Reply::Bulk(after..end), end + 2));
            }
            _ => return Err(protocol_error("a bulk string length out of range")),
        },
        b':' => Reply::Int(integer(&buf[text])?),
        b'+' => Reply::Simple(text),
        b'-' => return Err(server_error(&buf[pos..after])),
        _ => return Err(protocol_error("a reply of a type the tier never asks for")),
    };
    Ok(Parsed::Done(reply, after))
}

/// A reply read into `buf` as the crate's value.
fn value(buf: &[u8], reply: Reply) -> Value {
    match reply {
        Reply::Bulk(r) => Value::BulkString(buf[r].to_vec()),
        Reply::Simple(r) if &buf[r.clone()] == b"OK" => Value::Okay,
        Reply::Simple(r) => Value::SimpleString(String::from_utf8_lossy(&buf[r]).into_owned()),
        Reply::Int(i) => Value::Int(i),
        Reply::Nil => Value::Nil,
    }
}

impl RespConn {
    /// Connects to `host:port` (each address it resolves to in turn), then authenticates and
    /// selects `db` as the URL says, all within `timeout`. A refused AUTH is
    /// `AuthenticationFailed`, whatever the server's words, as with the crate's connection.
    pub fn connect(
        host: &str,
        port: u16,
        timeout: Duration,
        username: Option<&str>,
        password: Option<&str>,
        db: i64,
    ) -> RedisResult<Self> {
        let deadline = Instant::now() + timeout;
        let left = || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(timed_out())
            } else {
                Ok(left)
            }
        };
        let mut last = None;
        for addr in (host, port).to_socket_addrs()? {
            let stream = match TcpStream::connect_timeout(&addr, left()?) {
                Ok(stream) => stream,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            stream.set_nodelay(true)?;
            let mut con = Self { stream, small: Vec::new(), broken: false };
            con.set_timeouts(timeout)?;
            if let Some(password) = password {
                let auth = |con: &mut Self, user: Option<&str>| {
                    let mut auth = redis::cmd("AUTH");
                    auth.arg(user).arg(password);
                    con.query_value(&auth, deadline)
                };
                let refused = |e: RedisError| -> RedisError {
                    match e.kind() {
                        ErrorKind::Server(_) | ErrorKind::Extension => {
                            (ErrorKind::AuthenticationFailed, "Password authentication failed", e.to_string()).into()
                        }
                        _ => e,
                    }
                };
                match auth(&mut con, username) {
                    // Redis before 6 knows no users: AUTH with the password alone, as the crate does.
                    Err(e) if username.is_some() && e.to_string().contains("wrong number of arguments") => {
                        auth(&mut con, None).map_err(refused)?;
                    }
                    answer => {
                        answer.map_err(refused)?;
                    }
                }
            }
            if db != 0 {
                con.query_value(redis::cmd("SELECT").arg(db), deadline)?;
            }
            return Ok(con);
        }
        Err(last
            .map_or_else(|| (ErrorKind::InvalidClientConfig, "could not resolve to any addresses").into(), Into::into))
    }

    /// Whether the connection is in step with the server: not after bytes nobody asked for.
    pub fn reusable(&self) -> bool {
        !self.broken
    }

    pub fn set_timeouts(&mut self, timeout: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))
    }

    /// Sends commands already packed in RESP.
    pub fn send(&mut self, packed: &[u8]) -> RedisResult<()> {
        Ok(self.stream.write_all(packed)?)
    }

    /// Reads `n` replies into `buf` (its bytes reused; `hint`: the bytes expected), each read
    /// bounded by the time left to `deadline`. A server error in any reply is the error.
    pub fn read_replies(
        &mut self,
        n: usize,
        buf: &mut Vec<u8>,
        hint: usize,
        deadline: Instant,
    ) -> RedisResult<Vec<Reply>> {
        let mut filled = 0;
        let want = MIN_READ.max(hint);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let (mut pos, mut replies) = (0, Vec::with_capacity(n));
        while replies.len() < n {
            match parse(&buf[..filled], pos)? {
                Parsed::Done(reply, end) => {
                    replies.push(reply);
                    pos = end;
                }
                Parsed::Need(need) => {
                    // Room for the whole reply (a value arrives in one pass of large reads), but
                    // asked at most `MAX_GROWTH` ahead of the bytes come (a length is only a
                    // claim); the buffer grows by half at least, so it grows a few times only.
                    let want = (pos + need).min(filled + MAX_GROWTH).max(filled + MIN_READ);
                    if buf.len() < want {
                        buf.resize(want.max(buf.len() + buf.len() / 2), 0);
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(timed_out());
                    }
                    self.stream.set_read_timeout(Some(left))?;
                    match self.stream.read(&mut buf[filled..]) {
                        Ok(0) => {
                            return Err(
                                io::Error::new(io::ErrorKind::UnexpectedEof, "Redis closed the connection").into()
                            )
                        }
                        Ok(got) => filled += got,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        if pos < filled {
            self.broken = true;
        }
        Ok(replies)
    }

    /// `n` replies as the crate's values, read into the connection's own buffer.
    pub fn read_values(&mut self, n: usize, deadline: Instant) -> RedisResult<Vec<Value>> {
        let mut buf = std::mem::take(&mut self.small);
        let replies = self.read_replies(n, &mut buf, 0, deadline);
        let values = replies.map(|replies| replies.into_iter().map(|r| value(&buf, r)).collect());
        self.small = buf;
        values
    }

    /// One command and its reply, as the crate's `Value`.
    pub fn query_value(&mut self, cmd: &redis::Cmd, deadline: Instant) -> RedisResult<Value> {
        self.send(&cmd.get_packed_command())?;
        Ok(self.read_values(1, deadline)?.pop().unwrap_or(Value::Nil))
    }

    /// One command, its reply converted, within the socket's read timeout.
    pub fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        let timeout = self.stream.read_timeout()?.unwrap_or(Duration::from_secs(60));
        let value = self.query_value(cmd, Instant::now() + timeout)?;
        Ok(redis::from_redis_value(value)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn all(bytes: &[u8]) -> RedisResult<Vec<Reply>> {
        let mut pos = 0;
        let mut out = Vec::new();
        while pos < bytes.len() {
            match parse(bytes, pos)? {
                Parsed::Done(r, end) => {
                    out.push(r);
                    pos = end;
                }
                Parsed::Need(_) => return Err(protocol_error("incomplete")),
            }
        }
        Ok(out)
    }

    #[test]
    fn replies_are_ranges_of_the_buffer() {
        let b = b"$3\r\nabc\r\n$-1\r\n:7\r\n+OK\r\n$0\r\n\r\n";
        assert_eq!(
            all(b).unwrap(),
            [Reply::Bulk(4..7), Reply::Nil, Reply::Int(7), Reply::Simple(19..21), Reply::Bulk(27..27)]
        );
    }

    #[test]
    fn an_incomplete_reply_says_what_it_needs() {
        let b = b"$10\r\nabc";
        assert!(matches!(parse(b, 0).unwrap(), Parsed::Need(17)));
        assert!(matches!(parse(b"$1", 0).unwrap(), Parsed::Need(3)));
        assert!(matches!(parse(b"", 0).unwrap(), Parsed::Need(1)));
    }

    #[test]
    fn what_is_not_redis_is_a_parse_error_and_server_errors_keep_their_kind() {
        for bad in [&b"HTTP/1.1 400 Bad Request\r\n"[..], b"$3\r\nabcd\r\n", b"$x\r\n", b"$-2\r\n", b"*1\r\n", b"+OK\n"]
        {
            assert_eq!(parse(bad, 0).err().map(|e| e.kind()), Some(ErrorKind::Parse), "{bad:?}");
        }
        assert_eq!(parse(&vec![b'+'; MAX_LINE + 1], 0).err().map(|e| e.kind()), Some(ErrorKind::Parse));
        let e = parse(b"-WRONGPASS invalid username-password pair\r\n", 0).err().unwrap();
        assert!(e.to_string().contains("WRONGPASS"), "{e}");
        let e = parse(b"-OOM command not allowed\r\n", 0).err().unwrap();
        assert!(matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension), "{e:?}");
    }

    /// A server on loopback that reads one command, then writes `chunks` with a pause after
    /// each, then waits for the client to close.
    fn server(chunks: Vec<Vec<u8>>) -> (u16, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut cmd = [0u8; 64];
            let _ = s.read(&mut cmd).unwrap();
            for chunk in chunks {
                s.write_all(&chunk).unwrap();
                s.flush().unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = s.read(&mut cmd);
        });
        (port, handle)
    }

    #[test]
    fn replies_split_across_reads_are_whole_and_bytes_past_them_retire_the_connection() {
        // A value dripping in 9000 bytes at a time, a nil, then a reply nobody asked for.
        let value = vec![b'v'; 70_000];
        let mut chunks = vec![format!("${}\r\n", value.len()).into_bytes()];
        chunks.extend(value.chunks(9_000).map(<[u8]>::to_vec));
        chunks.push(b"\r\n$-1\r\n:1\r\n".to_vec());
        let (port, server) = server(chunks);
        let mut con = RespConn::connect("127.0.0.1", port, Duration::from_secs(5), None, None, 0).unwrap();
        con.send(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = Vec::new();
        let replies = con.read_replies(2, &mut buf, 0, deadline).unwrap();
        let Reply::Bulk(r) = &replies[0] else { panic!("{replies:?}") };
        assert_eq!(&buf[r.clone()], &value[..]);
        assert_eq!(replies[1], Reply::Nil);
        if con.reusable() {
            // The extra reply came in a later read: it is there for the next call to find.
            assert_eq!(con.read_replies(1, &mut buf, 0, deadline).unwrap(), [Reply::Int(1)]);
        }
        drop(con);
        server.join().unwrap();
    }

    #[test]
    fn an_error_reply_mid_pipeline_is_the_calls_error() {
        let (port, server) = server(vec![b"$1\r\na\r\n-WRONGTYPE Operation against a key\r\n$-1\r\n".to_vec()]);
        let mut con = RespConn::connect("127.0.0.1", port, Duration::from_secs(5), None, None, 0).unwrap();
        con.send(b"*1\r\n$4\r\nPING\r\n").unwrap();
        let e = con.read_replies(3, &mut Vec::new(), 0, Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("WRONGTYPE"), "{e}");
        drop(con);
        server.join().unwrap();
    }

    #[test]
    fn a_silent_server_costs_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Sockets wait up to 30 s; the call's deadline, 50 ms, is what ends it.
        let mut con = RespConn::connect("127.0.0.1", port, Duration::from_secs(30), None, None, 0).unwrap();
        con.send(b"*1\r\n$4\r\nPING\r\n").unwrap();
        let t0 = Instant::now();
        let e = con.read_replies(1, &mut Vec::new(), 0, t0 + Duration::from_millis(50)).unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(30), "the socket's timeout, not the deadline, ended it");
        drop(listener);
    }
}
