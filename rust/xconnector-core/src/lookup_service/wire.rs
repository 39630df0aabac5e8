//! The lookup wire format (see the module docs), with every size bounded before anything is
//! allocated for it, and every read of a request bounded by one deadline.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::error::{CoreError, Result};
use crate::hashing::HashExtras;

pub const MAGIC: [u8; 4] = *b"XCL1";
/// Most tokens one request may carry (64 MiB of token ids).
pub const MAX_TOKENS: usize = 1 << 24;
/// Most bytes of each string (LoRA name, cache salt, LoRA id).
pub const MAX_TEXT_BYTES: usize = u16::MAX as usize;
pub const REPLY_BYTES: usize = 20;
const HEAD_BYTES: usize = 16;
/// Token bytes read per step: a request that claims many tokens costs memory only as they arrive.
const CHUNK_BYTES: usize = 1 << 20;

/// A decoded request; empty strings are `None`.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub tokens: Vec<u32>,
    pub lora_name: Option<String>,
    pub cache_salt: Option<String>,
    pub lora_id: Option<String>,
}

impl Request {
    pub fn extras(&self) -> HashExtras<'_> {
        HashExtras {
            lora_name: self.lora_name.as_deref(),
            cache_salt: self.cache_salt.as_deref(),
            lora_id: self.lora_id.as_deref(),
        }
    }
}

pub fn encode_request(id: u64, tokens: &[u32], extras: HashExtras<'_>) -> Result<Vec<u8>> {
    if tokens.len() > MAX_TOKENS {
        return Err(CoreError::invalid(format!(
            "a lookup carries at most {MAX_TOKENS} tokens; this prompt has {}",
            tokens.len()
        )));
    }
    let texts = [("lora_name", extras.lora_name), ("cache_salt", extras.cache_salt), ("lora_id", extras.lora_id)];
    let mut out = Vec::with_capacity(HEAD_BYTES + 4 * tokens.len() + 6);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for (name, text) in texts {
        let raw = text.unwrap_or("").as_bytes();
        if raw.len() > MAX_TEXT_BYTES {
            return Err(CoreError::invalid(format!(
                "{name} is {} bytes; at most {MAX_TEXT_BYTES} fit a lookup",
                raw.len()
            )));
        }
        out.extend_from_slice(&(raw.len() as u16).to_le_bytes());
        out.extend_from_slice(raw);
    }
    Ok(out)
}

pub fn encode_reply(id: u64, hit: u64) -> [u8; REPLY_BYTES] {
    let mut out = [0u8; REPLY_BYTES];
    out[..4].copy_from_slice(&MAGIC);
    out[4..12].copy_from_slice(&id.to_le_bytes());
    out[12..].copy_from_slice(&hit.to_le_bytes());
    out
}

/// `(id, hit)` of a well-formed reply, or None.
pub fn decode_reply(buf: &[u8; REPLY_BYTES]) -> Option<(u64, u64)> {
    if buf[..4] != MAGIC {
        return None;
    }
    let id = u64::from_le_bytes(buf[4..12].try_into().ok()?);
    let hit = u64::from_le_bytes(buf[12..].try_into().ok()?);
    Some((id, hit))
}

/// Why no request was read.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed the connection between requests.
    Closed,
    /// No request began within the idle timeout.
    Idle,
    /// A request began but did not arrive in full within the I/O timeout.
    TimedOut,
    /// Not this protocol, or over a bound.
    Bad(String),
    Io(io::Error),
}

/// Reads one request: waits up to `idle` for its first byte, then up to `io` for all of it.
pub fn read_request(stream: &mut UnixStream, idle: Duration, io: Duration) -> std::result::Result<Request, ReadError> {
    let mut head = [0u8; HEAD_BYTES];
    stream.set_read_timeout(Some(idle)).map_err(ReadError::Io)?;
    let first = loop {
        match stream.read(&mut head) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if timed_out(&e) => return Err(ReadError::Idle),
            Err(e) => return Err(ReadError::Io(e)),
        }
    };
    let deadline = Instant::now() + io;
    read_by(stream, &mut head[first..], deadline)?;
    if head[..4] != MAGIC {
        return Err(ReadError::Bad(format!("not an XConnector lookup (starts with {:02x?})", &head[..4])));
    }
    let id = u64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
    let n = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as usize;
    if n > MAX_TOKENS {
        return Err(ReadError::Bad(format!("{n} tokens, over the limit of {MAX_TOKENS}")));
    }
    let mut raw = Vec::with_capacity((4 * n).min(CHUNK_BYTES));
    while raw.len() < 4 * n {
        let start = raw.len();
        raw.resize(start + (4 * n - start).min(CHUNK_BYTES), 0);
        read_by(stream, &mut raw[start..], deadline)?;
    }
    let tokens = raw.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    let mut texts = [None, None, None];
    for text in &mut texts {
        let mut len = [0u8; 2];
        read_by(stream, &mut len, deadline)?;
        let mut buf = vec![0u8; u16::from_le_bytes(len) as usize];
        read_by(stream, &mut buf, deadline)?;
        if !buf.is_empty() {
            *text = Some(String::from_utf8(buf).map_err(|_| ReadError::Bad("a string is not UTF-8".into()))?);
        }
    }
    let [lora_name, cache_salt, lora_id] = texts;
    Ok(Request { id, tokens, lora_name, cache_salt, lora_id })
}

/// Fills `buf` or fails once `deadline` has passed.
fn read_by(stream: &mut UnixStream, mut buf: &mut [u8], deadline: Instant) -> std::result::Result<(), ReadError> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::TimedOut);
        }
        stream.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
        match stream.read(buf) {
            Ok(0) => return Err(ReadError::Bad("the client closed the connection mid-request".into())),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => return Err(ReadError::TimedOut),
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(())
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn a_request_round_trips() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let extras = HashExtras { lora_name: Some("sql"), cache_salt: None, lora_id: Some("7") };
        a.write_all(&encode_request(42, &[1, 2, u32::MAX], extras).unwrap()).unwrap();
        let req = read_request(&mut b, T, T).unwrap();
        assert_eq!(req.id, 42);
        assert_eq!(req.tokens, vec![1, 2, u32::MAX]);
        assert_eq!(req.extras(), extras);
        drop(a);
        assert!(matches!(read_request(&mut b, T, T), Err(ReadError::Closed)));
        assert_eq!(decode_reply(&encode_reply(42, 96)), Some((42, 96)));
        assert_eq!(decode_reply(&[0; REPLY_BYTES]), None);
    }

    #[test]
    fn bounds_are_checked_before_allocating() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&1u64.to_le_bytes());
        head.extend_from_slice(&u32::MAX.to_le_bytes());
        a.write_all(&head).unwrap();
        assert!(matches!(read_request(&mut b, T, T), Err(ReadError::Bad(m)) if m.contains("over the limit")));
        a.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(matches!(read_request(&mut b, T, T), Err(ReadError::Bad(_))));
        let long = "x".repeat(MAX_TEXT_BYTES + 1);
        let extras = HashExtras { cache_salt: Some(&long), ..Default::default() };
        assert!(encode_request(1, &[1], extras).is_err());
    }

    #[test]
    fn a_partial_request_times_out_and_silence_is_idle() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let short = Duration::from_millis(50);
        assert!(matches!(read_request(&mut b, short, short), Err(ReadError::Idle)));
        a.write_all(&encode_request(1, &[1, 2, 3], HashExtras::default()).unwrap()[..10]).unwrap();
        assert!(matches!(read_request(&mut b, T, short), Err(ReadError::TimedOut)));
    }
}
