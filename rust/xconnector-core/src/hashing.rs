//! Block and sequence hashes, bit-compatible with Dynamo's KV router (DESIGN section 4), so the
//! blocks XConnector holds can be announced to it and matched against its events.

use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64_with_seed};

/// Dynamo's fixed seed for both the block hash and the chain step.
pub const XXH3_SEED: u64 = 1337;

/// Bumped whenever the hash definition changes; part of every namespace so old entries become misses.
/// Version 2: the namespace holds revision, quantization and pipeline-parallel rank, and values
/// carry a block digest.
pub const HASH_VERSION: u32 = 2;

/// Seed of the block digest: a second, independent chain over the same tokens (see [`block_digests`]).
const DIGEST_SEED: u64 = 0x5843_4f4e_4e44_4947; // "XCONNDIG"

/// The per-request extras Dynamo mixes into the block seed: a LoRA adapter name and a cache salt.
/// Empty strings count as absent, as in Dynamo. `lora_id` says which weights the name stands
/// for (a path, a version): it separates the namespace, not the Dynamo-compatible hashes, so an
/// adapter re-registered under an old name never gets the old adapter's KV.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HashExtras<'a> {
    pub lora_name: Option<&'a str>,
    pub cache_salt: Option<&'a str>,
    pub lora_id: Option<&'a str>,
}

impl HashExtras<'_> {
    pub fn is_empty(&self) -> bool {
        non_empty(self.lora_name).is_none() && non_empty(self.cache_salt).is_none() && non_empty(self.lora_id).is_none()
    }
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

/// Seed for the local (per-block) hash: `1337 + xxh3(lora, 0) + xxh3(salt, 1)` with wrapping adds.
pub fn block_seed(extras: HashExtras<'_>) -> u64 {
    let mut seed = XXH3_SEED;
    if let Some(lora) = non_empty(extras.lora_name) {
        seed = seed.wrapping_add(xxh3_64_with_seed(lora.as_bytes(), 0));
    }
    if let Some(salt) = non_empty(extras.cache_salt) {
        seed = seed.wrapping_add(xxh3_64_with_seed(salt.as_bytes(), 1));
    }
    seed
}

/// XXH3-64 of one block's token ids as little-endian u32 bytes.
pub fn local_hash(block: &[u32], seed: u64) -> u64 {
    if cfg!(target_endian = "little") {
        // SAFETY: u32 has no padding and any byte pattern is a valid u8; on a little-endian
        // target the in-memory bytes are exactly the little-endian encoding Dynamo hashes.
        let bytes = unsafe { std::slice::from_raw_parts(block.as_ptr().cast::<u8>(), block.len() * 4) };
        xxh3_64_with_seed(bytes, seed)
    } else {
        let bytes: Vec<u8> = block.iter().flat_map(|t| t.to_le_bytes()).collect();
        xxh3_64_with_seed(&bytes, seed)
    }
}

/// One chain step: `xxh3(le_u64(parent) ++ le_u64(local), 1337)`.
pub fn chain_hash(parent: u64, local: u64) -> u64 {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&parent.to_le_bytes());
    buf[8..].copy_from_slice(&local.to_le_bytes());
    xxh3_64_with_seed(&buf, XXH3_SEED)
}

/// Local hashes of every full block; a trailing partial block is dropped.
pub fn local_hashes(tokens: &[u32], block_size: usize, extras: HashExtras<'_>) -> Vec<u64> {
    assert!(block_size > 0, "block_size must be positive");
    let seed = block_seed(extras);
    tokens.chunks_exact(block_size).map(|b| local_hash(b, seed)).collect()
}

/// Sequence hashes of every full block: `seq[0] = local[0]`, `seq[i] = chain(seq[i-1], local[i])`.
pub fn sequence_hashes(tokens: &[u32], block_size: usize, extras: HashExtras<'_>) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
    extend_sequence_hashes(&mut out, tokens, block_size, extras);
    out
}

/// Appends the sequence hashes of `tokens` to `out` (reusing its allocation on hot paths).
pub fn extend_sequence_hashes(out: &mut Vec<u64>, tokens: &[u32], block_size: usize, extras: HashExtras<'_>) {
    assert!(block_size > 0, "block_size must be positive");
    let seed = block_seed(extras);
    let mut parent: Option<u64> = None;
    for block in tokens.chunks_exact(block_size) {
        let local = local_hash(block, seed);
        let seq = match parent {
            None => local,
            Some(p) => chain_hash(p, local),
        };
        out.push(seq);
        parent = Some(seq);
    }
}

/// Digests of every full block: `d[i] = XXH3-128(le_u128(d[i-1]) ++ tokens of block i)`
/// (`d[-1] = 0`) under a seed of its own. Stored with each value and compared on every load, so a
/// value under the wrong key, or a 64-bit sequence-hash collision between two prefixes, is a
/// miss: both the hash and this digest (192 independent bits) would have to collide.
pub fn block_digests(tokens: &[u32], block_size: usize) -> Vec<u128> {
    assert!(block_size > 0, "block_size must be positive");
    let mut out = Vec::with_capacity(tokens.len() / block_size);
    let mut buf = Vec::with_capacity(16 + block_size * 4);
    let mut parent = 0u128;
    for block in tokens.chunks_exact(block_size) {
        buf.clear();
        buf.extend_from_slice(&parent.to_le_bytes());
        for t in block {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        parent = xxh3_128_with_seed(&buf, DIGEST_SEED);
        out.push(parent);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL_1_64: [u64; 4] = [0xea06fc71a5ee6e88, 0x1fbf39bd106be0b5, 0xa8562fe663b7a097, 0x4bad57d34048b86a];
    const SEQ_1_64: [u64; 4] = [0xea06fc71a5ee6e88, 0xad01835a37dd294c, 0x0d55e56c2bccbd1a, 0x445502a8048d6688];

    fn range(n: u32) -> Vec<u32> {
        (1..=n).collect()
    }

    #[test]
    fn dynamo_vectors_local_and_sequence() {
        let tokens = range(64);
        assert_eq!(local_hashes(&tokens, 16, HashExtras::default()), LOCAL_1_64);
        assert_eq!(sequence_hashes(&tokens, 16, HashExtras::default()), SEQ_1_64);
    }

    #[test]
    fn partial_block_is_dropped() {
        let tokens = range(35);
        assert_eq!(sequence_hashes(&tokens, 16, HashExtras::default()), SEQ_1_64[..2]);
        assert!(sequence_hashes(&range(15), 16, HashExtras::default()).is_empty());
    }

    #[test]
    fn extras_change_only_the_block_seed() {
        let tokens = range(32);
        let lora = HashExtras { lora_name: Some("adapter-a"), ..Default::default() };
        let seed = XXH3_SEED.wrapping_add(xxh3_64_with_seed(b"adapter-a", 0));
        assert_eq!(block_seed(lora), seed);
        let seq = sequence_hashes(&tokens, 16, lora);
        let l0 = local_hash(&tokens[..16], seed);
        let l1 = local_hash(&tokens[16..], seed);
        // The chain step keeps seed 1337.
        assert_eq!(seq, vec![l0, chain_hash(l0, l1)]);
        assert_ne!(seq, SEQ_1_64[..2]);
    }

    #[test]
    fn digests_chain_over_the_parent_and_differ_from_the_hashes() {
        let a = range(48);
        let mut b = a.clone();
        b[5] += 1; // first block differs: every digest after it differs too
        let (da, db) = (block_digests(&a, 16), block_digests(&b, 16));
        assert_eq!(da.len(), 3);
        assert!(da.iter().zip(&db).all(|(x, y)| x != y));
        // Same last block, other parents: other digests.
        assert_ne!(block_digests(&a[16..], 16)[1], da[2]);
        assert_eq!(block_digests(&a[..32], 16), da[..2]);
    }

    #[test]
    fn lora_id_separates_nothing_in_the_hashes() {
        let tokens = range(32);
        let named = HashExtras { lora_name: Some("a"), ..Default::default() };
        let with_id = HashExtras { lora_id: Some("/adapters/a/v2"), ..named };
        assert_eq!(sequence_hashes(&tokens, 16, named), sequence_hashes(&tokens, 16, with_id));
        assert!(!HashExtras { lora_id: Some("x"), ..Default::default() }.is_empty());
    }

    #[test]
    fn empty_extras_count_as_absent() {
        let empty = HashExtras { lora_name: Some(""), cache_salt: Some(""), lora_id: Some("") };
        assert!(empty.is_empty());
        assert_eq!(block_seed(empty), XXH3_SEED);
        let salt = HashExtras { cache_salt: Some("s"), ..Default::default() };
        assert_eq!(block_seed(salt), XXH3_SEED.wrapping_add(xxh3_64_with_seed(b"s", 1)));
    }
}
