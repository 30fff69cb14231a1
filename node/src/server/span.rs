//! What span a server can hold and loading it: the memory policy
//! (`coordinator::budget`, which the simulator calls too) over a model file's block
//! sizes, loading blocks with progress, and measuring their decode speed.

use std::time::Instant;

use coordinator::budget;
use shard::candle_core::Device;
use shard::{ModelFile, Span};

// Memory policy: `coordinator::budget`'s functions (which the simulator calls too) over
// this file's block sizes.

/// `coordinator::budget::node_overhead` for `file`.
pub fn node_overhead(file: &ModelFile) -> u64 {
    let biggest = (0..file.config().n_layers)
        .map(|i| file.block_bytes(i))
        .max()
        .unwrap_or(0);
    budget::node_overhead(biggest)
}

/// Block `block` of `file` as a budget sees it.
pub(super) fn block_cost(file: &ModelFile, block: usize) -> budget::BlockCost {
    budget::BlockCost {
        weight_bytes: file.block_bytes(block),
        kv_bytes_per_token: file.config().kv_bytes_per_token(1) as u64,
    }
}

/// Estimated resident bytes of one block of `file` with `cache_tokens` KV-cache tokens
/// reserved for it.
pub fn block_memory(file: &ModelFile, block: usize, cache_tokens: usize) -> u64 {
    budget::block_memory(block_cost(file, block), cache_tokens)
}

/// How many blocks fit `budget` bytes.
pub fn blocks_for_budget(file: &ModelFile, bytes: u64, cache_tokens: usize) -> usize {
    budget::blocks_for_budget(
        bytes,
        node_overhead(file),
        block_cost(file, 0),
        cache_tokens,
    )
}

/// KV-cache tokens that fill what `budget` leaves after `blocks` blocks' weights.
pub fn cache_tokens_for_budget(file: &ModelFile, bytes: u64, blocks: usize) -> usize {
    budget::cache_tokens_for_budget(bytes, node_overhead(file), block_cost(file, 0), blocks)
}

/// On a GPU: 90% of its free memory (the weights and caches live there). On the CPU:
/// half of the memory the kernel says is available, so a volunteer's machine keeps
/// working while it serves.
pub(super) fn default_budget(device: &Device) -> u64 {
    if let Some((free, _total)) = shard::device::gpu_memory(device) {
        return free / 10 * 9;
    }
    let avail_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(4 << 20);
    avail_kb * 1024 / 2
}

/// Measures a decode step over the whole span: tokens per second.
pub fn measure_throughput(span: &Span) -> anyhow::Result<f32> {
    let x = shard::candle_core::Tensor::zeros(
        (1, span.config().hidden),
        shard::candle_core::DType::F32,
        span.device(),
    )?;
    let mut cache = span.new_cache(8);
    let t = Instant::now();
    for _ in 0..4 {
        span.forward(&x, &mut cache)?;
    }
    // A GPU runs the steps asynchronously: wait for them before reading the clock.
    span.device().synchronize()?;
    Ok(4.0 / t.elapsed().as_secs_f32().max(1e-6))
}

pub(super) fn load_span(
    file: &ModelFile,
    start: usize,
    end: usize,
    device: &Device,
) -> anyhow::Result<(Span, f32)> {
    let t = Instant::now();
    let span = Span::load(file, start, end, device, |done, total| {
        if done == total || done % 8 == 0 {
            tracing::info!("loaded {done}/{total} blocks");
        }
    })?;
    span.warm_up()?;
    let throughput = measure_throughput(&span)?;
    tracing::info!(
        "blocks {start}..{end} ready in {:.1}s, {throughput:.0} tokens/s per decode step",
        t.elapsed().as_secs_f32()
    );
    Ok((span, throughput))
}
