//! BLAKE2b-128, unkeyed: the digest of namespace fingerprints and LoRA identities. Python's
//! `hashlib.blake2b(digest_size=16)` computed them before they moved here, and keys already on
//! disk and in Redis hold those values, so this must match it byte for byte (the tests check
//! hashlib's outputs). The `blake2` crate's `Blake2b<U16>` sets the digest length in the
//! parameter block, as hashlib does (a truncated 64-byte digest would differ).

use blake2::digest::consts::U16;
use blake2::Digest;

/// An incremental BLAKE2b-128 hasher.
#[derive(Default)]
pub struct Blake2b128(blake2::Blake2b<U16>);

impl Blake2b128 {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest as lowercase hex, as `hexdigest()` writes it.
    pub fn hex(self) -> String {
        self.0.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex16(data: &[u8]) -> String {
        let mut h = Blake2b128::new();
        h.update(data);
        h.hex()
    }

    #[test]
    fn matches_python_hashlib() {
        // hashlib.blake2b(data, digest_size=16).hexdigest()
        assert_eq!(hex16(b""), "cae66941d9efbd404e4d88758ea67670");
        assert_eq!(hex16(b"abc"), "cf4ab791c62b8d2b2109c90275287816");
        let long: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(hex16(&long), "bca120dfd89cd95d82898473a5b01c90");
        assert_eq!(hex16(&long[..128]), "a74787004ef589e31149183900d0294a");
    }

    #[test]
    fn split_updates_equal_one_update() {
        let data: Vec<u8> = (0..777u32).map(|i| (i * 7) as u8).collect();
        for cut in [0, 1, 127, 128, 129, 256, 776] {
            let mut h = Blake2b128::new();
            h.update(&data[..cut]);
            h.update(&data[cut..]);
            assert_eq!(h.hex(), hex16(&data), "cut at {cut}");
        }
    }
}
