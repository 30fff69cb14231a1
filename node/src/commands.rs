//! What each subcommand does, on top of the library's pieces.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use libp2p::Multiaddr;
use protocol::WireDType;
use serde::Serialize;
use shard::candle_core::Device;
use shard::{ModelFile, SamplingParams, Span};
use tokio::io::AsyncBufReadExt;

use crate::cli::{
    BenchArgs, DemoArgs, GenerateArgs, InspectArgs, ModelArg, SamplingArgs, SimArgs, StatusArgs,
};
use crate::client::{connect_any, Reroute};
use crate::generation::{
    prompt_tokens, run_generation, start_client, swarm_client, ClientSide, GenerateRequest,
    Generation, RouteEntry,
};
use crate::model_cache::{model_path, open_model};
use crate::net::{self, NetConfig};

#[derive(Serialize)]
struct GenerateJson {
    #[serde(flatten)]
    generation: Generation,
    route: Vec<RouteEntry>,
    reroutes: Vec<Reroute>,
}

fn sampling_params(s: &SamplingArgs) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed,
    }
}

/// Longest a client on its way out waits for its connections to close (they close in
/// well under a millisecond on loopback): without the goodbye, servers keep what they
/// hold for it until QUIC's idle timeout (10 s) tells them it has gone.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// `shoal generate`.
pub async fn generate_cmd(args: GenerateArgs) -> anyhow::Result<()> {
    let side = ClientSide::load(open_model(&args.model)?)?;
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        chat: args.chat,
        max_tokens: args.sampling.max_tokens,
        sampling: sampling_params(&args.sampling),
        top_logits: args.top_logits,
        ..Default::default()
    };
    let client = swarm_client(&args.swarm, args.emulate.shaping()).await?;
    let json = args.json;
    let mut stdout = std::io::stdout();
    let result = run_generation(
        &side,
        client.as_ref(),
        &req,
        args.swarm.wire_dtype,
        Duration::from_secs_f64(args.swarm.route_timeout),
        |piece| {
            if !json {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        },
    )
    .await;
    if let Some(c) = &client {
        c.net().close_all(GOODBYE_TIMEOUT).await;
    }
    let (generation, trip) = result?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&GenerateJson {
                generation,
                route: trip.route,
                reroutes: trip.reroutes,
            })?
        );
    } else {
        println!();
        eprintln!(
            "[{} tokens, {:.1} tokens/s, route: {}]",
            generation.completion_tokens.len(),
            generation.tokens_per_second,
            trip.route
                .iter()
                .map(|r| {
                    let how = match r.link.as_deref() {
                        Some(l) if l != "direct" => format!(" ({})", short_link(l)),
                        _ => String::new(),
                    };
                    format!("{}..{}@{}{how}", r.start, r.end, short(&r.peer))
                })
                .collect::<Vec<_>>()
                .join(" -> ")
        );
    }
    Ok(())
}

/// A server's reachability as `shoal status` shows it: what the server found out
/// (public, relayed, ...) and, where it differs, how this node reached it (a server
/// behind a NAT reached directly after a hole punch shows `relayed, hole-punched`).
fn reach(r: protocol::Reachability, link: Option<&str>) -> String {
    match link {
        Some("hole-punched") => format!("{r}, hole-punched"),
        Some(l) if l.starts_with("relayed:") && r != protocol::Reachability::Relayed => {
            format!("{r}, {}", short_link(l))
        }
        Some(l) if l.starts_with("relayed:") => format!("{r} via {}", short(&l[8..])),
        _ => r.to_string(),
    }
}

/// A link as shown to people: `relayed via <relay, short>` or `hole-punched`.
fn short_link(link: &str) -> String {
    match link.strip_prefix("relayed:") {
        Some(relay) => format!("relayed via {}", short(relay)),
        None => link.to_string(),
    }
}

fn short(peer: &str) -> &str {
    &peer[peer.len().saturating_sub(6)..]
}

/// Servers started by this process on loopback; they die with it.
pub struct LocalSwarm {
    children: Vec<tokio::process::Child>,
    /// The first server's address.
    pub bootstrap: Multiaddr,
}

impl LocalSwarm {
    /// Starts `nodes` servers splitting the model's blocks evenly.
    pub async fn start(
        model: &std::path::Path,
        n_blocks: usize,
        nodes: usize,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        if nodes == 0 || nodes > n_blocks {
            bail!("--nodes must be between 1 and the model's {n_blocks} blocks");
        }
        let exe = std::env::current_exe().context("cannot find the shoal executable")?;
        let mut children = Vec::new();
        let mut bootstrap: Option<Multiaddr> = None;
        for i in 0..nodes {
            let (a, b) = (i * n_blocks / nodes, (i + 1) * n_blocks / nodes);
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("serve")
                .arg("--model")
                .arg(model)
                .arg("--blocks")
                .arg(format!("{a}..{b}"))
                .arg("--listen")
                .arg("/ip4/127.0.0.1/udp/0/quic-v1")
                .arg("--name")
                .arg(format!("local-{i}"))
                // A demo or a benchmark stays its own swarm, whatever runs on the LAN.
                .arg("--no-mdns")
                .args(extra)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .kill_on_drop(true);
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "warn");
            }
            if let Some(b) = &bootstrap {
                cmd.arg("--bootstrap").arg(b.to_string());
            }
            let mut child = cmd.spawn().context("cannot start a server process")?;
            let stdout = child.stdout.take().context("no stdout")?;
            children.push(child);
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
                .await
                .context("a server did not start within 120 s")??
                .context("a server exited before it was listening")?;
            let addr: Multiaddr = line
                .strip_prefix("listening ")
                .context("unexpected server output")?
                .parse()?;
            eprintln!("server {} serving blocks {a}..{b} at {addr}", i + 1);
            bootstrap.get_or_insert(addr);
            // Keep reading so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        }
        Ok(LocalSwarm {
            children,
            bootstrap: bootstrap.context("no server")?,
        })
    }

    /// Stops every server.
    pub async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.kill().await;
        }
    }
}

/// `shoal demo`.
pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let path = model_path(&ModelArg { model: args.model })?;
    let file = ModelFile::open(&path)?;
    let n = file.config().n_layers;
    eprintln!(
        "starting {} servers for {} ({} blocks) on loopback ...",
        args.nodes,
        file.config().name,
        n
    );
    let swarm = LocalSwarm::start(&path, n, args.nodes, &[]).await?;
    let side = ClientSide::load(file)?;
    let client = start_client(
        std::slice::from_ref(&swarm.bootstrap),
        Duration::from_secs(10),
        None,
        None,
        None,
        false,
    )
    .await?;
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        chat: true,
        max_tokens: args.max_tokens,
        sampling: SamplingParams::default(),
        ..Default::default()
    };
    eprintln!("\n> {}\n", args.prompt);
    let mut stdout = std::io::stdout();
    let result = run_generation(
        &side,
        Some(&client),
        &req,
        WireDType::F32,
        Duration::from_secs(30),
        |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        },
    )
    .await;
    swarm.stop().await;
    let (g, trip) = result?;
    let route = trip.route;
    println!();
    eprintln!(
        "\n[{} tokens at {:.1} tokens/s through {} servers: {}]",
        g.completion_tokens.len(),
        g.tokens_per_second,
        route.len(),
        route
            .iter()
            .map(|r| format!("blocks {}..{}", r.start, r.end))
            .collect::<Vec<_>>()
            .join(" -> ")
    );
    Ok(())
}

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
    let argmax = |row: &Vec<f32>| -> u32 {
        let best = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        best as u32
    };
    let mut caches: Vec<shard::KvCache> = (0..sessions)
        .map(|_| span.new_cache(prompt.len() + tokens + 1))
        .collect();
    let x = head.embed(prompt)?;
    let mut next = Vec::with_capacity(sessions);
    for cache in caches.iter_mut() {
        let h = span.forward(&x, cache)?.to_device(&Device::Cpu)?;
        next.push(argmax(&head.last_logits(&h)?));
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
        next = logits.iter().map(argmax).collect();
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

/// One server in `shoal status`.
/// `shoal status`: asks every server the DHT knows for its announcement.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (net, _inbound) = net::start(NetConfig {
        listen: vec![],
        dht_server: false,
        shaping: None,
        swarm_key: args.swarm_key.load()?,
        identity: None,
        mdns: false,
        relay: None,
    })?;
    connect_any(
        &net,
        &args.bootstrap,
        Duration::from_secs_f64(args.connect_timeout),
    )
    .await?;
    let what = || "the DHT's records and the servers found to answer".to_string();
    let seen = crate::client::noting_wait(
        what,
        crate::survey::survey(&net, None, Duration::from_secs(5)),
    )
    .await;
    net.close_all(GOODBYE_TIMEOUT).await;
    let coverage = crate::survey::coverage(&seen);
    let (rows, silent): (Vec<_>, Vec<_>) = seen.into_iter().partition(|s| s.answering());
    if args.json {
        let cov: serde_json::Map<String, serde_json::Value> = coverage
            .iter()
            .map(|(m, (_, c))| (m.clone(), serde_json::json!(c)))
            .collect();
        println!(
            "{}",
            serde_json::json!({"servers": rows, "silent": silent, "coverage": cov})
        );
        return Ok(());
    }
    println!(
        "{:<54} {:>9} {:>10} {:>11} {:>8}  {:<28} name",
        "peer", "blocks", "tokens/s", "free cache", "rtt ms", "reachability"
    );
    for r in &rows {
        let a = &r.announcement;
        println!(
            "{:<54} {:>9} {:>10.1} {:>11} {:>8.1}  {:<28} {}",
            a.peer_id,
            a.span.to_string(),
            a.throughput,
            a.free_cache_tokens,
            r.rtt_ms.unwrap_or(f64::NAN),
            reach(a.reachability, r.link.as_deref()),
            a.public_name
        );
    }
    for s in &silent {
        let a = &s.announcement;
        println!(
            "{:<54} {:>9}  not answering (announced {})",
            a.peer_id,
            a.span.to_string(),
            a.public_name
        );
    }
    for (model, (n, counts)) in &coverage {
        let size = rows
            .iter()
            .map(|r| &r.announcement)
            .find(|a| &a.model_id == model && a.params.total > 0)
            .map(|a| describe_params(a.params))
            .unwrap_or_default();
        println!("\n{model}: {n} blocks{size}, servers per block:");
        let mut at = 0usize;
        while at < counts.len() {
            let mut end = at;
            while end < counts.len() && counts[end] == counts[at] {
                end += 1;
            }
            let note = if counts[at] == 0 {
                "  <- nobody serves these"
            } else {
                ""
            };
            println!("  {at:>4}..{end:<4} x{}{note}", counts[at]);
            at = end;
        }
    }
    if rows.is_empty() {
        println!("(no servers found)");
    }
    Ok(())
}

/// `, 30.5B parameters (3.3B active)` (the active count only for a mixture of
/// experts).
fn describe_params(p: protocol::ModelParams) -> String {
    let human = |n: u64| {
        let n = n as f64;
        if n >= 1e9 {
            format!("{:.1}B", n / 1e9)
        } else {
            format!("{:.0}M", n / 1e6)
        }
    };
    if p.active < p.total {
        format!(
            ", {} parameters ({} active)",
            human(p.total),
            human(p.active)
        )
    } else {
        format!(", {} parameters", human(p.total))
    }
}

/// `shoal keygen`: a new random swarm key, in the usual `swarm.key` format.
pub fn keygen(args: crate::cli::KeygenArgs) -> anyhow::Result<()> {
    use std::io::ErrorKind;
    let identity = libp2p::identity::Keypair::generate_ed25519();
    let key = libp2p::pnet::PreSharedKey::new(rand::random());
    let out = args.out.clone().unwrap_or_else(|| {
        if args.identity {
            "node.key"
        } else {
            "swarm.key"
        }
        .into()
    });
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if args.force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&out).map_err(|e| match e.kind() {
        ErrorKind::AlreadyExists => anyhow::anyhow!(
            "{} exists; --force replaces it (nodes holding the old key will no longer connect)",
            out.display()
        ),
        _ => anyhow::Error::new(e).context(format!("cannot write {}", out.display())),
    })?;
    if args.identity {
        file.write_all(&identity.to_protobuf_encoding()?)?;
        println!(
            "wrote {}: peer id {} (give the file to --identity, the peer id to servers' --allow-peers)",
            out.display(),
            identity.public().to_peer_id()
        );
        return Ok(());
    }
    writeln!(file, "{key}")?;
    println!(
        "wrote {} (fingerprint {}): give it to every node of the swarm with --swarm-key",
        out.display(),
        key.fingerprint()
    );
    Ok(())
}

/// `shoal make-model`: random weights in a real model's shape.
pub fn make_model(args: crate::cli::MakeModelArgs) -> anyhow::Result<()> {
    let names: Vec<&str> = shard::synth::SHAPES.iter().map(|s| s.name).collect();
    let shape = shard::synth::shape(&args.shape).with_context(|| {
        format!(
            "unknown shape `{}`: one of {}",
            args.shape,
            names.join(", ")
        )
    })?;
    if args.out.exists() && !args.force {
        bail!("{} exists; --force replaces it", args.out.display());
    }
    let format = match (&args.dtype, args.format) {
        (Some(d), _) => {
            shard::synth::SynthFormat::for_dtype(d, &args.out).map_err(anyhow::Error::msg)?
        }
        (None, Some(f)) => f,
        (None, None) => shard::synth::SynthFormat::Gguf(shard::synth::GgufWeights::Uniform(
            shard::candle_core::quantized::GgmlDType::Q4_0,
        )),
    };
    let donor_path = match &args.tokenizer_from {
        Some(p) => p.clone(),
        None => crate::model_cache::default_model()?,
    };
    let donor = ModelFile::open(&donor_path)?;
    let started = Instant::now();
    let blocks = args.blocks.unwrap_or(shape.blocks);
    eprintln!(
        "writing a random {} ({blocks} blocks, {:?}) to {}",
        shape.name,
        format,
        args.out.display()
    );
    shard::synth::write(
        &shape,
        args.blocks,
        format,
        &args.out,
        &donor,
        args.seed,
        |done, total| {
            if done == total || done % 8 == 0 {
                eprintln!("  {done}/{total} blocks");
            }
        },
    )?;
    let file = ModelFile::open(&args.out)
        .with_context(|| format!("the written model {} does not open", args.out.display()))?;
    println!(
        "wrote {} in {:.1}s: {} blocks of {} bytes each, model id {}",
        args.out.display(),
        started.elapsed().as_secs_f64(),
        file.config().n_layers,
        file.block_bytes(0),
        file.id()
    );
    Ok(())
}

/// `shoal inspect`: a model's id, shape and per-block memory.
pub async fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let file = open_model(&args.model)?;
    let cfg = file.config();
    let block_bytes = file.block_bytes(0);
    let info = serde_json::json!({
        "path": file.path(),
        "model_id": file.id(),
        "name": cfg.name,
        "blocks": cfg.n_layers,
        "hidden": cfg.hidden,
        "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "context": cfg.max_seq_len,
        "block_bytes": block_bytes,
        "block_memory_estimate": crate::server::serve::block_memory(&file, 0, 0),
        "kv_bytes_per_token_per_block": cfg.kv_bytes_per_token(1),
        "node_overhead_bytes": crate::server::serve::node_overhead(&file),
        "params_total": file.params().0,
        "params_active": file.params().1,
    });
    if args.json {
        println!("{info}");
    } else {
        println!("{}", serde_json::to_string_pretty(&info)?);
    }
    Ok(())
}

/// `shoal sim`: runs a topology in virtual time and prints the report.
pub fn simulate(args: SimArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.topology)
        .with_context(|| format!("cannot read {}", args.topology.display()))?;
    let topo = sim::Topology::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.topology.display()))?;
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {percent}% ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!(
        "simulating {} for {} s",
        topo.name, topo.duration_s
    ));
    let started = Instant::now();
    let report = sim::run(&topo, &sim::Options { seed: args.seed }, |f| {
        bar.set_position((f * 1000.0) as u64)
    });
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let r = &report;
    println!(
        "{} ({}), {} s virtual in {wall:.1} s, seed {}",
        r.topology, r.model, r.duration_s, r.seed
    );
    println!(
        "  nodes: {} started, {} alive at the end ({} chose their span); clients: {}",
        r.nodes_started, r.nodes_alive_at_end, r.auto_nodes, r.clients
    );
    println!(
        "  generations: {} completed, {} lost; tokens: {}",
        r.generations_completed, r.generations_lost, r.tokens_generated
    );
    println!(
        "  tokens/s: {:.1} in total; per client mean {:.2} (min {:.2}, max {:.2})",
        r.tokens_per_second_total,
        r.tokens_per_second_per_client.mean,
        r.tokens_per_second_per_client.min,
        r.tokens_per_second_per_client.max
    );
    println!("  decode: {:.2} tokens/s per generation; step latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms", r.decode_tokens_per_second, r.decode_step_latency_ms.p50, r.decode_step_latency_ms.p95, r.decode_step_latency_ms.p99);
    println!(
        "  re-routes: {}; rebalances: {}; events: {}",
        r.reroutes, r.rebalances, r.events
    );
    let worst = r.uncovered_blocks.iter().map(|x| x.1).max().unwrap_or(0);
    let minutes = r.uncovered_blocks.iter().filter(|x| x.1 > 0).count();
    println!(
        "  blocks uncovered: at most {worst}; in {minutes} of {} one-minute samples",
        r.uncovered_blocks.len()
    );
    Ok(())
}

/// `shoal api`: the OpenAI-compatible gateway.
pub async fn api(args: crate::cli::ApiArgs) -> anyhow::Result<()> {
    let side = ClientSide::load(open_model(&args.model)?)?;
    let client = swarm_client(&args.swarm, None).await?;
    let state = Arc::new(crate::api::ApiState::new(
        side,
        client,
        args.swarm.wire_dtype,
        Duration::from_secs_f64(args.swarm.route_timeout),
    ));
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening http://{addr}")?;
        out.flush()?;
    }
    axum::serve(listener, crate::api::router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
