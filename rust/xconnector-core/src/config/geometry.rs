//! The engine's block geometry, the one place it is decided (the validator checks a config with
//! it, and the engine settings build the engine with it): an engine block is `chunk_size` tokens,
//! or one of the worker's KV blocks when `chunk_size` is unset, and must be a whole number of the
//! worker's KV blocks; its payload is that many KV blocks' bytes.

/// An engine block as a number of the worker's KV blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineBlock {
    /// Tokens per engine block.
    pub tokens: u64,
    /// The worker's KV blocks per engine block.
    pub kv_blocks: u64,
}

impl EngineBlock {
    /// Payload bytes of one engine block, given one KV block's bytes (`None` on overflow).
    pub fn bytes(&self, kv_block_bytes: u64) -> Option<u64> {
        self.kv_blocks.checked_mul(kv_block_bytes)
    }
}

/// The engine block for `chunk_size` (None: one KV block) on a worker whose KV blocks hold
/// `kv_block_size` tokens. The error says what to write instead (without a key path: the caller
/// knows where the value came from).
pub fn engine_block(chunk_size: Option<u64>, kv_block_size: u64) -> Result<EngineBlock, String> {
    if kv_block_size == 0 {
        return Err("the worker's block size must be at least 1 token".to_owned());
    }
    let tokens = chunk_size.unwrap_or(kv_block_size);
    if tokens == 0 || !tokens.is_multiple_of(kv_block_size) {
        let use_ = kv_block_size * (tokens / kv_block_size).max(1);
        return Err(format!("{tokens} is not a multiple of the worker's block size {kv_block_size}; use {use_}"));
    }
    Ok(EngineBlock { tokens, kv_blocks: tokens / kv_block_size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_is_a_whole_number_of_kv_blocks() {
        assert_eq!(engine_block(None, 16), Ok(EngineBlock { tokens: 16, kv_blocks: 1 }));
        assert_eq!(engine_block(Some(256), 16), Ok(EngineBlock { tokens: 256, kv_blocks: 16 }));
        assert_eq!(engine_block(Some(64), 64).unwrap().bytes(1000), Some(1000));
        assert_eq!(engine_block(Some(128), 32).unwrap().bytes(1000), Some(4000));
        assert_eq!(
            engine_block(Some(24), 32).unwrap_err(),
            "24 is not a multiple of the worker's block size 32; use 32"
        );
        assert_eq!(
            engine_block(Some(48), 32).unwrap_err(),
            "48 is not a multiple of the worker's block size 32; use 32"
        );
        assert_eq!(
            engine_block(Some(100), 32).unwrap_err(),
            "100 is not a multiple of the worker's block size 32; use 96"
        );
        assert!(engine_block(Some(16), 0).is_err());
        assert_eq!(engine_block(Some(u64::MAX), 1).unwrap().bytes(2), None);
    }
}
