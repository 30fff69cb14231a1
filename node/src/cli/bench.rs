//! `shoal bench`: decode speed of one process against a local swarm, and how many
//! blocks fit this machine.

use std::time::{Duration, Instant};

use protocol::WireDType;
use serde::Serialize;
use shard::candle_core::Device;
use shard::{ModelFile, SamplingParams, Span};

use super::demo::LocalSwarm;
use crate::args::BenchArgs;
use crate::generation::{
    prompt_tokens, run_generation, start_client, ClientSide, GenerateRequest, Speculate,
};
use crate::model_cache::model_path;

#[derive(Serialize, Debug)]
struct BenchRow {
    setup: String,
    decode_tokens_per_second: f64,
    prefill_tokens_per_second: f64,
}

#[derive(Serialize, Debug)]
struct ConcurrencyRow {
    sessions: usize,
    /// Tokens of all sessions over the wall time from the first start to the last end.
    aggregate_tokens_per_second: f64,
    /// The same number of sessions decoded in lock step as one batch in this process,
    /// with no network: what this machine's cores can compute, the ceiling of any swarm
    /// running on it.
    local_batch_tokens_per_second: f64,
}

/// How fast one node could decode with every block on `device`, against the bound of
/// reading each block's weights once per token at the device's measured bandwidth.
#[derive(Serialize, Debug)]
struct Bound {
    device: String,
    read_bytes_per_second: f64,
    block_bytes_per_token: u64,
    bound_tokens_per_second: f64,
    /// One token at a time through all blocks (a growing cache, 64 positions), no
    /// network, no LM head: what a server holding the whole model does per step.
    blocks_tokens_per_second: f64,
    fraction_of_bound: f64,
}

fn blocks_bound(file: &ModelFile, device: &Device) -> anyhow::Result<Bound> {
    let read = shard::device::read_bandwidth(device)?;
    let n = file.config().n_layers;
    let bytes: u64 = (0..n).map(|i| file.block_bytes(i)).sum();
    let span = Span::load(file, 0, n, device, |_, _| {})?;
    span.warm_up()?;
    let x = shard::candle_core::Tensor::zeros(
        (1, file.config().hidden),
        shard::candle_core::DType::F32,
        device,
    )?;
    let steps = 64;
    let mut best = 0.0f64;
    for _ in 0..3 {
        let mut cache = span.new_cache(steps);
        device.synchronize()?;
        let t = Instant::now();
        for _ in 0..steps {
            span.forward(&x, &mut cache)?;
        }
        device.synchronize()?;
        best = best.max(steps as f64 / t.elapsed().as_secs_f64());
    }
    let bound = read / bytes.max(1) as f64;
    Ok(Bound {
        device: shard::device::describe(device),
        read_bytes_per_second: read,
        block_bytes_per_token: bytes,
        bound_tokens_per_second: bound,
        blocks_tokens_per_second: best,
        fraction_of_bound: best / bound,
    })
}

/// Tokens/s of `sessions` greedy generations decoded in lock step as one batch in this
/// process (blocks and LM head each one product for all sessions).
fn local_batch_rate(
    head: &shard::Head,
    span: &Span,
    prompt: &[u32],
    sessions: usize,
    tokens: usize,
) -> anyhow::Result<f64> {
    let mut caches: Vec<shard::KvCache> = (0..sessions)
        .map(|_| span.new_cache(prompt.len() + tokens + 1))
        .collect();
    let x = head.embed(prompt)?;
    let mut next = Vec::with_capacity(sessions);
    for cache in caches.iter_mut() {
        let h = span.forward(&x, cache)?.to_device(&Device::Cpu)?;
        // Greedy, as generation picks (shard's, compiled optimised: a loop of this
        // crate's took a fifth of a batched step in the dev profile).
        next.push(shard::argmax(&head.last_logits(&h)?));
    }
    let started = Instant::now();
    for _ in 0..tokens {
        let xs: Vec<_> = next
            .iter()
            .map(|&t| head.embed(&[t]))
            .collect::<Result<_, _>>()?;
        let ys = span.forward_batch(xs.iter().zip(caches.iter_mut()).collect())?;
        let rows = shard::candle_core::Tensor::cat(&ys, 0)?.to_device(&Device::Cpu)?;
        let logits = head.logits(&rows)?.to_vec2::<f32>()?;
        next = logits.iter().map(|row| shard::argmax(row)).collect();
    }
    Ok((sessions * tokens) as f64 / started.elapsed().as_secs_f64())
}

/// `shoal bench`: decode and prefill speed, in one process and through a loopback swarm,
/// and the aggregate speed of several concurrent sessions on the swarm.
///
/// History on the 2-core build machine (default model, dev profile): candle's CPU pool,
/// whose workers spin 25,000 rounds after every op, and its scalar Q4_1 kernel held a
/// local decode to 35 tok/s and 4 concurrent sessions to 6.3 tok/s in aggregate; our own
/// kernels on a pool that sleeps when idle (`shard::kernels`) took them to 141.5 and
/// 100.3, and weights repacked into 8-row octets to 273.5 and 193.4 (swarm decode 198.9,
/// llama.cpp ~140-150 on the same file and threads). `bench/llama-cpp.sh` runs this
/// beside llama.cpp.
pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let path = model_path(&args.model)?;
    let device = shard::device::open(args.device)?;
    let device_args = vec!["--device".to_string(), args.device.to_string()];
    let side = ClientSide::load(ModelFile::open(&path)?)?.with_local_device(device.clone());
    let n = side.file().config().n_layers;
    let bound = tokio::task::block_in_place(|| blocks_bound(side.file(), &device))?;
    // A decode prompt, and a prefill prompt of exactly --prompt-tokens tokens.
    let decode_req = GenerateRequest {
        prompt: "Write a long story about a lighthouse keeper.".into(),
        chat: true,
        max_tokens: args.tokens,
        sampling: SamplingParams::default(),
        // The kernels' own speed, one token per step, as llama.cpp's is measured.
        speculate: Speculate::Off,
        ..Default::default()
    };
    let words: String = (0..args.prompt_tokens * 2)
        .map(|i| format!("w{i} "))
        .collect();
    let ids = side.text().encode(&words, false)?;
    let prefill_text = side
        .text()
        .decode(&ids[..args.prompt_tokens.min(ids.len())])?;
    let prefill_req = GenerateRequest {
        prompt: prefill_text,
        chat: false,
        max_tokens: 1,
        sampling: SamplingParams::default(),
        ..Default::default()
    };
    let swarm = LocalSwarm::start(&path, n, args.nodes, &device_args).await?;
    let client = start_client(
        std::slice::from_ref(&swarm.bootstrap),
        Duration::from_secs(10),
        None,
        None,
        None,
        false,
    )
    .await?;
    let mut rows = Vec::new();
    for (name, c) in [
        ("local".to_string(), None),
        (format!("swarm-{}", args.nodes), Some(&client)),
    ] {
        let mut decode: f64 = 0.0;
        let mut prefill: f64 = 0.0;
        let once = async |req: &GenerateRequest| {
            run_generation(
                &side,
                c,
                req,
                WireDType::F32,
                Duration::from_secs(30),
                |_| {},
            )
            .await
        };
        for _ in 0..args.repeats.max(1) {
            let (g, _) = once(&decode_req).await?;
            decode = decode.max(g.tokens_per_second);
            let (p, _) = once(&prefill_req).await?;
            prefill = prefill.max(p.prompt_tokens.len() as f64 / p.prefill_seconds.max(1e-9));
        }
        rows.push(BenchRow {
            setup: name,
            decode_tokens_per_second: decode,
            prefill_tokens_per_second: prefill,
        });
    }
    // Aggregate speed of N generations at once on the swarm (each its own session), and
    // the same N batched in this process: the ceiling.
    let span = Span::load(side.file(), 0, n, &device, |_, _| {})?;
    let decode_prompt = prompt_tokens(side.text(), &decode_req)?;
    let mut concurrency = Vec::new();
    for &n in &args.sessions {
        let local_batch = tokio::task::block_in_place(|| {
            local_batch_rate(
                side.head().head(),
                &span,
                &decode_prompt,
                n.max(1),
                args.tokens,
            )
        })?;
        let started = Instant::now();
        let runs = (0..n.max(1)).map(|_| {
            run_generation(
                &side,
                Some(&client),
                &decode_req,
                WireDType::F32,
                Duration::from_secs(60),
                |_| {},
            )
        });
        let results = futures::future::join_all(runs).await;
        let mut tokens = 0usize;
        for r in results {
            tokens += r?.0.completion_tokens.len();
        }
        concurrency.push(ConcurrencyRow {
            sessions: n.max(1),
            aggregate_tokens_per_second: tokens as f64 / started.elapsed().as_secs_f64(),
            local_batch_tokens_per_second: local_batch,
        });
    }
    swarm.stop().await;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": path,
                "threads": shard::kernels::threads(),
                "bound": bound,
                "runs": rows,
                "concurrency": concurrency,
            })
        );
    } else {
        println!(
            "{}: reads {:.1} GB/s; the blocks are {:.1} MB per token, so at most {:.1} tok/s; \
             one token at a time through all blocks: {:.1} tok/s ({:.0}% of that bound)",
            bound.device,
            bound.read_bytes_per_second / 1e9,
            bound.block_bytes_per_token as f64 / 1e6,
            bound.bound_tokens_per_second,
            bound.blocks_tokens_per_second,
            100.0 * bound.fraction_of_bound
        );
        println!(
            "{:<10} {:>14} {:>16}",
            "setup", "decode tok/s", "prefill tok/s"
        );
        for r in &rows {
            println!(
                "{:<10} {:>14.1} {:>16.1}",
                r.setup, r.decode_tokens_per_second, r.prefill_tokens_per_second
            );
        }
        if let [local, swarm] = &rows[..] {
            println!(
                "swarm/local per-token decode time: {:.3}",
                local.decode_tokens_per_second / swarm.decode_tokens_per_second.max(1e-9)
            );
        }
        println!(
            "{:<10} {:>22} {:>28}",
            "sessions", "aggregate tok/s (swarm)", "one local batch (ceiling)"
        );
        for c in &concurrency {
            println!(
                "{:<10} {:>22.1} {:>28.1}",
                c.sessions, c.aggregate_tokens_per_second, c.local_batch_tokens_per_second
            );
        }
    }
    Ok(())
}
