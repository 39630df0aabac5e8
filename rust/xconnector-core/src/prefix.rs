//! How much of a cached prefix a worker can use.
//!
//! Invariant: a worker never skips the block holding the prompt's last token. Prefill must
//! compute that token to get its logits (the next token is sampled from them), so at least one
//! token is always computed and a block is computed whole. Every caller (the connector, the KV
//! handler, `xconnector bench`) asks [`usable_prefix`] and never re-derives the rule.

/// Tokens of a `prompt_len`-token prompt a worker can load instead of computing, when the first
/// `hit` are cached in blocks of `block_size`: `min(hit, (prompt_len - 1) / block_size *
/// block_size)`, and 0 for an empty prompt (or a zero block size, which caches nothing).
pub fn usable_prefix(hit: usize, prompt_len: usize, block_size: usize) -> usize {
    if prompt_len == 0 || block_size == 0 {
        return 0;
    }
    hit.min((prompt_len - 1) / block_size * block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_holding_the_last_token_is_never_usable() {
        // An exact repeat of 3200 tokens (200 blocks): the last block is computed again.
        assert_eq!(usable_prefix(3200, 3200, 16), 3184);
        assert_eq!(usable_prefix(16, 16, 16), 0);
        // One token past a block boundary: the whole cached block is usable.
        assert_eq!(usable_prefix(16, 17, 16), 16);
        // A hit short of the last token's block is usable whole.
        assert_eq!(usable_prefix(2992, 3150, 16), 2992);
    }

    #[test]
    fn nothing_is_usable_without_a_hit_a_prompt_or_a_block() {
        assert_eq!(usable_prefix(0, 100, 16), 0);
        assert_eq!(usable_prefix(0, 0, 16), 0);
        assert_eq!(usable_prefix(64, 0, 16), 0);
        assert_eq!(usable_prefix(64, 100, 0), 0);
    }

    #[test]
    fn usable_is_block_aligned_below_the_hit_and_leaves_the_last_token() {
        for block in [1, 16, 32] {
            for len in 0..200 {
                for hit in (0..=len).step_by(block) {
                    let u = usable_prefix(hit, len, block);
                    assert!(u <= hit && u.is_multiple_of(block), "hit {hit} len {len} block {block}: {u}");
                    assert!(len == 0 || u < len, "the last token is computed: {hit} {len} {block}");
                    // Maximal: one more block would reach the last token or go past the hit.
                    assert!(u + block > hit || u + block >= len, "{hit} {len} {block}: {u}");
                }
            }
        }
    }
}
