//! The token ids a multimodal request's blocks are keyed by. Placeholder tokens are the same for
//! every image, so each placeholder position is replaced by ids derived from the item's hash and
//! the position within it (vLLM's prefix cache mixes the same hash into the blocks the item
//! covers): the same text with another image never shares a block past the first placeholder.
//!
//! Invariant: the ids are byte-identical to what the Python adapter computed before this rule
//! moved here (SHAKE-256 of the item's identifier, 4 little-endian bytes per position), because
//! caches already on disk and in Redis are keyed by them.

use std::collections::HashSet;

/// Token ids standing for a multimodal item's placeholder positions have this bit set: real
/// vocabularies are far smaller, so they never equal a text token.
pub const MM_TOKEN_BIT: u32 = 1 << 31;

/// One multimodal item: its identifier (vLLM's `identifier` or `mm_hash`) and the placeholder
/// positions it covers.
#[derive(Clone, Debug)]
pub struct MmItem {
    pub identifier: String,
    pub offset: usize,
    pub length: usize,
}

/// `tokens` with every item's placeholder positions replaced by ids of that item. A position
/// several items cover (audio inside a video) is keyed by all of them, not only the last.
pub fn key_tokens(tokens: &[u32], items: &[MmItem]) -> Vec<u32> {
    let mut out = tokens.to_vec();
    let mut mixed = HashSet::new();
    for item in items {
        // Only the positions inside the prompt: the stream's first 4*n bytes are the same
        // whatever its length, and an item's length is not trusted to size an allocation.
        let n = item.length.min(out.len().saturating_sub(item.offset));
        let stream = shake256(item.identifier.as_bytes(), 4 * n);
        for j in 0..n {
            let mut word = u32::from_le_bytes(stream[4 * j..4 * j + 4].try_into().expect("4 bytes"));
            let pos = item.offset + j;
            if !mixed.insert(pos) {
                word ^= out[pos].wrapping_mul(0x9E37_79B1);
            }
            out[pos] = MM_TOKEN_BIT | (word & (MM_TOKEN_BIT - 1));
        }
    }
    out
}

/// SHAKE-256 (FIPS 202) of `data`, `out_len` bytes, as `hashlib.shake_256(data).digest(n)`.
pub fn shake256(data: &[u8], out_len: usize) -> Vec<u8> {
    use sha3::digest::{ExtendableOutput, Update, XofReader};
    let mut h = sha3::Shake256::default();
    h.update(data);
    let mut out = vec![0u8; out_len];
    h.finalize_xof().read(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn shake256_matches_python_hashlib() {
        assert_eq!(hex(&shake256(b"", 8)), "46b9dd2b0ba88d13");
        assert_eq!(hex(&shake256(b"img-1", 8)), "6827606e1c38374d");
        // Input over one rate block, output over two (squeezing).
        assert_eq!(hex(&shake256(&[b'x'; 200], 300)[292..]), "13b9e2fd5eacf9ca");
    }

    #[test]
    fn placeholders_are_keyed_by_their_item() {
        // Golden values computed by the Python adapter before the rule moved here.
        let tokens: Vec<u32> = (100..130).collect();
        let img = MmItem { identifier: "img-1".into(), offset: 2, length: 5 };
        let one = key_tokens(&tokens, std::slice::from_ref(&img));
        assert_eq!(&one[..8], &[100, 101, 3999278952, 3442948124, 3312135712, 2265095224, 2720938095, 107]);
        assert_eq!(&one[7..], &tokens[7..]);
        // Another image at the same place: other ids, the text around unchanged.
        let other = key_tokens(&tokens, &[MmItem { identifier: "img-2".into(), ..img.clone() }]);
        assert_ne!(other[2..7], one[2..7]);
        assert!(one[2..7].iter().all(|t| t & MM_TOKEN_BIT != 0));
        // An item overlapping another (audio in a video) and running past the end: positions
        // both cover are keyed by both.
        let audio = MmItem { identifier: "aud".into(), offset: 4, length: 40 };
        let both = key_tokens(&tokens, &[img.clone(), audio]);
        assert_eq!(both.len(), 30);
        assert_eq!(&both[..7], &[100, 101, 3999278952, 3442948124, 4111517840, 2832717650, 3211413180]);
        assert_eq!(both[29], 2765334213);
        // A length far past the prompt costs nothing (it once sized the hash output).
        let huge = MmItem { identifier: "img-1".into(), offset: 2, length: usize::MAX / 2 };
        assert_eq!(key_tokens(&tokens[..7], &[huge]), one[..7]);
        // Past the end entirely: nothing changes.
        assert_eq!(key_tokens(&tokens, &[MmItem { identifier: "x".into(), offset: 40, length: 3 }]), tokens);
    }
}
