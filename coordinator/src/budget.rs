//! How much of a model a server can hold in a memory budget: what `shoal serve
//! --memory-budget` decides and what the simulator's joining nodes decide, by the same
//! numbers.
//!
//! A server's resident memory is a fixed overhead (runtime, network stack, buffers, and
//! while loading one block's file pages and copies in flight), plus per block its
//! loaded weights ([`WEIGHT_FACTOR`] times their stored size) and the KV cache of the
//! tokens it keeps room for.

/// Upper bound on a session's length when the model allows more: the KV cache of a
/// longer context would dwarf a volunteer's memory. Servers reserve no more per session
/// (`shoal serve --max-seq-len` overrides it) and clients ask for no more.
pub const DEFAULT_MAX_SEQ_LEN: usize = 8192;

/// Memory a server needs besides its blocks: runtime, network stack, buffers. Measured
/// on the default model: a 1-block node resident at 36 MiB, of which 2 MiB block.
pub const BASE_OVERHEAD_BYTES: u64 = 64 << 20;

/// Loaded weights against their stored size. Measured resident (VmRSS) after loading,
/// with the file's pages released block by block: the default model (Q4_1, repacked for
/// Shoal's kernels) 0.99x (1 -> 21 blocks: +43.8 MiB for 44.3 MiB stored); an 8B-shaped
/// Q4_0 span of 8 blocks 1.065x; 24 blocks of a Qwen3-30B-A3B Q4_K_M file 9.08 GB peak
/// for 24 x 380 MB (K-quants held once, `shard::kquants`). (It was 2x while the file's
/// pages stayed resident until the whole span had loaded, the figure the simulator
/// used to carry.)
pub const WEIGHT_FACTOR: f64 = 1.1;

/// One block's memory as a budget sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockCost {
    /// Bytes of the block's weights once loaded (before [`WEIGHT_FACTOR`]).
    pub weight_bytes: u64,
    /// Bytes of KV cache one token takes in the block.
    pub kv_bytes_per_token: u64,
}

/// A server's memory besides its blocks' weights and caches: [`BASE_OVERHEAD_BYTES`]
/// and, while loading, the biggest block's pages and copies in flight (an 8-block 8B
/// span peaked 117 MiB, one block, above where it settled).
pub fn node_overhead(biggest_block_bytes: u64) -> u64 {
    BASE_OVERHEAD_BYTES + biggest_block_bytes
}

/// Estimated resident bytes of one block with `cache_tokens` KV-cache tokens reserved.
pub fn block_memory(block: BlockCost, cache_tokens: usize) -> u64 {
    (block.weight_bytes as f64 * WEIGHT_FACTOR) as u64
        + block.kv_bytes_per_token * cache_tokens as u64
}

/// How many blocks like `block` fit `budget` bytes, each with `cache_tokens` of cache.
pub fn blocks_for_budget(
    budget: u64,
    overhead: u64,
    block: BlockCost,
    cache_tokens: usize,
) -> usize {
    let per = block_memory(block, cache_tokens).max(1);
    (budget.saturating_sub(overhead) / per) as usize
}

/// KV-cache tokens that fill what `budget` leaves after `blocks` blocks' weights.
pub fn cache_tokens_for_budget(
    budget: u64,
    overhead: u64,
    block: BlockCost,
    blocks: usize,
) -> usize {
    let weights = block_memory(block, 0) * blocks as u64;
    let left = budget.saturating_sub(overhead + weights);
    let per_token = block.kv_bytes_per_token * blocks.max(1) as u64;
    (left / per_token.max(1)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_and_cache_share_the_budget() {
        let block = BlockCost {
            weight_bytes: 100 << 20,
            kv_bytes_per_token: 4096,
        };
        let overhead = node_overhead(100 << 20);
        let budget = overhead + 10 * block_memory(block, 1024);
        assert_eq!(blocks_for_budget(budget, overhead, block, 1024), 10);
        assert_eq!(cache_tokens_for_budget(budget, overhead, block, 10), 1024);
        // Fewer blocks leave room for more cache.
        assert!(cache_tokens_for_budget(budget, overhead, block, 5) > 1024);
        assert_eq!(blocks_for_budget(overhead / 2, overhead, block, 1024), 0);
    }
}
