//! What a Redis value holds, and the checks a value passes before any of it is served.
//!
//! Unkeyed values (no shared secret configured), unchanged since format 2:
//! `"XCR2" | format 2 | namespace | hash | digest | length | XXH3 | payload` (a 56-byte header).
//! Keyed values (format 3) carry a MAC after the same fields:
//! `"XCR3" | format 3 | namespace | hash | digest | length | XXH3 | MAC | payload` (88 bytes), where
//! MAC = keyed BLAKE3 over the value's full Redis key (length-prefixed), the 56 bytes of fields and
//! the payload. The key is `blake3::derive_key(CONTEXT, secret)`; the secret itself is not kept.
//!
//! Order of the checks (each a reason counted on its own): shape and format (`Foreign`), then the
//! payload's XXH3 (`Damaged`), then the MAC (`Unauthenticated`), then the binding to the block asked
//! for (`Mismatch`). A keyed reader calls any XConnector value without a valid MAC unauthenticated,
//! format 2 included; an unkeyed reader sees keyed values as foreign.

use xxhash_rust::xxh3::xxh3_64;

use crate::error::{CoreError, Result};

const MAGIC: &[u8; 4] = b"XCR2";
const FORMAT: u32 = 2;
const MAGIC_KEYED: &[u8; 4] = b"XCR3";
const FORMAT_KEYED: u32 = 3;
/// magic 4, format 4, namespace 8, hash 8, digest 16, length 8, checksum 8.
const FIELDS: usize = 56;
const MAC: usize = 32;
/// blake3's `derive_key` context: globally unique, fixed for this purpose and format.
const CONTEXT: &str = "XConnector 2025 redis_tier value MAC key v1";

/// The key of the values' MAC, derived from the shared secret. Its `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey([u8; 32]);

impl AuthKey {
    /// The MAC key for `secret` (an error if it is empty: no one would notice values "signed"
    /// with nothing).
    pub fn from_secret(secret: &[u8]) -> Result<Self> {
        if secret.is_empty() {
            return Err(CoreError::config(
                "the Redis auth key is empty; give a long random secret shared by all workers, or none",
            ));
        }
        Ok(Self(blake3::derive_key(CONTEXT, secret)))
    }
}

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(<redacted>)")
    }
}

/// Why a value was not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Not an XConnector value of this format and block size.
    Foreign,
    /// Its payload fails its checksum.
    Damaged,
    /// (Keyed readers) no valid MAC: forged, planted, written without the key or with another one,
    /// or moved from another key.
    Unauthenticated,
    /// Intact (and authentic) but not the KV of the block asked for.
    Mismatch,
}

/// The value format of one tier: its MAC key (if any) and block size.
pub struct Format {
    pub key: Option<AuthKey>,
    pub block_bytes: usize,
}

/// The parts of a block written to Redis.
pub struct Block<'a> {
    pub ns: u64,
    pub hash: u64,
    pub digest: u128,
    pub data: &'a [u8],
}

fn mac(key: &AuthKey, redis_key: &str, fields: &[u8], payload: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(&(redis_key.len() as u64).to_le_bytes());
    h.update(redis_key.as_bytes());
    h.update(fields);
    h.update(payload);
    h.finalize()
}

impl Format {
    /// Bytes before the payload.
    pub fn header(&self) -> usize {
        if self.key.is_some() {
            FIELDS + MAC
        } else {
            FIELDS
        }
    }

    /// The value stored under `redis_key` for `b`.
    pub fn encode(&self, redis_key: &str, b: &Block<'_>) -> Vec<u8> {
        let mut value = Vec::with_capacity(self.header() + b.data.len());
        self.encode_into(redis_key, b, &mut value);
        value
    }

    /// Appends the value stored under `redis_key` for `b` to `value` (a pipeline being packed).
    pub fn encode_into(&self, redis_key: &str, b: &Block<'_>, value: &mut Vec<u8>) {
        let at = value.len();
        let (magic, format) = if self.key.is_some() { (MAGIC_KEYED, FORMAT_KEYED) } else { (MAGIC, FORMAT) };
        value.extend_from_slice(magic);
        value.extend_from_slice(&format.to_le_bytes());
        value.extend_from_slice(&b.ns.to_le_bytes());
        value.extend_from_slice(&b.hash.to_le_bytes());
        value.extend_from_slice(&b.digest.to_le_bytes());
        value.extend_from_slice(&(b.data.len() as u64).to_le_bytes());
        value.extend_from_slice(&xxh3_64(b.data).to_le_bytes());
        if let Some(key) = &self.key {
            let tag = mac(key, redis_key, &value[at..at + FIELDS], b.data);
            value.extend_from_slice(tag.as_bytes());
        }
        value.extend_from_slice(b.data);
    }

    /// The payload of `value`, read under `redis_key`, if it is the KV of block `(ns, hash)` with
    /// `digest` (and, keyed, authentic). Nothing is trusted before its check.
    pub fn check<'v>(
        &self,
        redis_key: &str,
        value: &'v [u8],
        ns: u64,
        hash: u64,
        digest: u128,
    ) -> std::result::Result<&'v [u8], Reject> {
        let (magic, format) = if self.key.is_some() { (MAGIC_KEYED, FORMAT_KEYED) } else { (MAGIC, FORMAT) };
        if value.len() < 4 || &value[..4] != magic {
            // An unkeyed XConnector value where only keyed ones are accepted: anyone may write it.
            let unkeyed = self.key.is_some() && value.starts_with(MAGIC);
            return Err(if unkeyed { Reject::Unauthenticated } else { Reject::Foreign });
        }
        let header = self.header();
        if value.len() != header + self.block_bytes {
            return Err(Reject::Foreign);
        }
        let word = |i: usize| u64::from_le_bytes(value[i..i + 8].try_into().unwrap_or([0; 8]));
        let stored_format = u32::from_le_bytes(value[4..8].try_into().unwrap_or([0; 4]));
        if stored_format != format || word(40) != self.block_bytes as u64 {
            return Err(Reject::Foreign);
        }
        let payload = &value[header..];
        if word(48) != xxh3_64(payload) {
            return Err(Reject::Damaged);
        }
        if let Some(key) = &self.key {
            let stored: [u8; 32] = value[FIELDS..FIELDS + MAC].try_into().unwrap_or([0; 32]);
            // `blake3::Hash` compares in constant time.
            if mac(key, redis_key, &value[..FIELDS], payload) != blake3::Hash::from_bytes(stored) {
                return Err(Reject::Unauthenticated);
            }
        }
        let stored_digest = u128::from_le_bytes(value[24..40].try_into().unwrap_or([0; 16]));
        if word(8) != ns || word(16) != hash || stored_digest != digest {
            return Err(Reject::Mismatch);
        }
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BB: usize = 64;
    const KEY: &str = "xconnector:00000000000000aa:0000000000000001";

    fn fmt(secret: Option<&[u8]>) -> Format {
        Format { key: secret.map(|s| AuthKey::from_secret(s).unwrap()), block_bytes: BB }
    }

    fn block(data: &[u8]) -> Block<'_> {
        Block { ns: 0xaa, hash: 1, digest: 7, data }
    }

    #[test]
    fn unkeyed_values_keep_format_2() {
        let f = fmt(None);
        let data = [3u8; BB];
        let v = f.encode(KEY, &block(&data));
        assert_eq!((&v[..4], v.len()), (&b"XCR2"[..], 56 + BB));
        assert_eq!(f.check(KEY, &v, 0xaa, 1, 7), Ok(&data[..]));
        // No MAC: the same value under another key is caught by its header only.
        assert_eq!(f.check("other", &v, 0xaa, 1, 7), Ok(&data[..]));
        assert_eq!(f.check(KEY, &v, 0xaa, 2, 7), Err(Reject::Mismatch));
    }

    #[test]
    fn keyed_values_are_served_only_when_authentic() {
        let f = fmt(Some(b"s3cret"));
        let data = [5u8; BB];
        let v = f.encode(KEY, &block(&data));
        assert_eq!((&v[..4], v.len()), (&b"XCR3"[..], 88 + BB));
        assert_eq!(f.check(KEY, &v, 0xaa, 1, 7), Ok(&data[..]));
        // Written with another secret, or without one.
        let other = fmt(Some(b"other")).encode(KEY, &block(&data));
        assert_eq!(f.check(KEY, &other, 0xaa, 1, 7), Err(Reject::Unauthenticated));
        let unkeyed = fmt(None).encode(KEY, &block(&data));
        assert_eq!(f.check(KEY, &unkeyed, 0xaa, 1, 7), Err(Reject::Unauthenticated));
        // Moved under another key (even one whose block the header names correctly).
        assert_eq!(f.check("xconnector:other", &v, 0xaa, 1, 7), Err(Reject::Unauthenticated));
        // A forged payload with a correct checksum.
        let mut forged = v.clone();
        forged[88] ^= 1;
        let sum = xxh3_64(&forged[88..]).to_le_bytes();
        forged[48..56].copy_from_slice(&sum);
        assert_eq!(f.check(KEY, &forged, 0xaa, 1, 7), Err(Reject::Unauthenticated));
        // A forged header field.
        let mut moved = v.clone();
        moved[16] ^= 1;
        assert_eq!(f.check(KEY, &moved, 0xaa, 1 ^ 1, 7), Err(Reject::Unauthenticated));
        // Damage is told apart from forgery.
        let mut damaged = v.clone();
        damaged[100] ^= 1;
        assert_eq!(f.check(KEY, &damaged, 0xaa, 1, 7), Err(Reject::Damaged));
        // Authentic, but another block's KV (a hash collision).
        assert_eq!(f.check(KEY, &v, 0xaa, 1, 8), Err(Reject::Mismatch));
        // An unkeyed reader does not know keyed values.
        assert_eq!(fmt(None).check(KEY, &v, 0xaa, 1, 7), Err(Reject::Foreign));
        assert_eq!(f.check(KEY, b"junk", 0xaa, 1, 7), Err(Reject::Foreign));
        assert_eq!(f.check(KEY, &v[..v.len() - 1], 0xaa, 1, 7), Err(Reject::Foreign));
    }

    #[test]
    fn a_value_encoded_into_a_packed_pipeline_is_the_same_value() {
        for f in [fmt(None), fmt(Some(b"s3cret"))] {
            let data = [9u8; BB];
            let mut packed = b"*3\r\n$3\r\nSET\r\n".to_vec();
            let at = packed.len();
            f.encode_into(KEY, &block(&data), &mut packed);
            assert_eq!(packed[at..], f.encode(KEY, &block(&data))[..]);
            assert_eq!(f.check(KEY, &packed[at..], 0xaa, 1, 7), Ok(&data[..]));
        }
    }

    #[test]
    fn the_secret_is_never_shown_and_never_empty() {
        let key = AuthKey::from_secret(b"hunter2-secret").unwrap();
        assert_eq!(format!("{key:?}"), "AuthKey(<redacted>)");
        let e = AuthKey::from_secret(b"").unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        assert_ne!(key, AuthKey::from_secret(b"hunter2-secreT").unwrap());
    }
}
