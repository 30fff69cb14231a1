//! `shoal serve`: choosing a span, loading it, serving it, and moving when the swarm
//! would be better off.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coordinator::budget;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use shard::candle_core::Device;
use shard::{ModelFile, Span};

use crate::cli::ServeArgs;
use crate::client::connect_any;
use crate::net::{self, NetConfig, Network, REANNOUNCE_EVERY};
use crate::server::{Server, ServerHandle, ServerLimits};

/// Upper bound on a session's length when the model allows more: the KV cache of a
/// longer context would dwarf a volunteer's memory. `--max-seq-len` overrides it.
pub const DEFAULT_MAX_SEQ_LEN: usize = 8192;

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
fn block_cost(file: &ModelFile, block: usize) -> budget::BlockCost {
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
fn default_budget(device: &Device) -> u64 {
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

fn load_span(
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

/// Picks the address to print: the first non-loopback one when there is a choice,
/// QUIC before TCP.
fn best_addr(addrs: &[Multiaddr]) -> Option<Multiaddr> {
    let is_loopback = |a: &Multiaddr| {
        a.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_loopback(),
            Protocol::Ip6(ip) => ip.is_loopback(),
            _ => false,
        })
    };
    let is_quic = |a: &Multiaddr| a.iter().any(|p| matches!(p, Protocol::QuicV1));
    let mut sorted: Vec<&Multiaddr> = addrs.iter().collect();
    sorted.sort_by_key(|a| (is_loopback(a), !is_quic(a)));
    sorted.first().map(|a| (*a).clone())
}

/// `listen`, or by default QUIC and TCP on every interface at `port` (0: any); a
/// private swarm (`open` false) runs over TCP only.
fn listen_or_default(listen: &[Multiaddr], open: bool, port: u16) -> Vec<Multiaddr> {
    if !listen.is_empty() {
        return listen.to_vec();
    }
    let tcp = Multiaddr::empty()
        .with(Protocol::Ip4(std::net::Ipv4Addr::UNSPECIFIED))
        .with(Protocol::Tcp(port));
    if !open {
        return vec![tcp];
    }
    let quic = Multiaddr::empty()
        .with(Protocol::Ip4(std::net::Ipv4Addr::UNSPECIFIED))
        .with(Protocol::Udp(port))
        .with(Protocol::QuicV1);
    vec![quic, tcp]
}

async fn wait_listen_addrs(net: &Network) -> anyhow::Result<Vec<Multiaddr>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let addrs = net.listen_addrs().await?;
        if !addrs.is_empty() {
            // Every interface of a wildcard listener is reported in the same burst.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return net.listen_addrs().await;
        }
        if Instant::now() > deadline {
            bail!("not listening on any address after 10s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn views(found: &[protocol::Announcement], me: &str) -> Vec<coordinator::SpanView> {
    found
        .iter()
        .filter(|a| a.peer_id != me)
        .map(|a| coordinator::SpanView {
            start: a.span.start,
            end: a.span.end,
            throughput: a.throughput,
        })
        .collect()
}

/// Requests to stop, one per signal (the binary sends one per Ctrl-C): the first starts
/// a graceful shutdown ([`serve`] hands its sessions over; [`relay`] stops), a second
/// during it quits at once. A dropped sender asks nothing.
pub type StopSignals = tokio::sync::mpsc::UnboundedReceiver<()>;

/// `shoal serve`, until `stop` asks it to leave.
pub async fn serve(args: ServeArgs, mut stop: StopSignals) -> anyhow::Result<()> {
    let file = crate::model_cache::open_model(&args.model)?;
    let device = shard::device::open(args.device)?;
    tracing::info!(
        "blocks run on {} (this build: cpu{})",
        shard::device::describe(&device),
        shard::device::compiled_backends()
            .iter()
            .map(|b| format!(", {b}"))
            .collect::<String>()
    );
    let cfg = file.config().clone();
    if let Some((start, end)) = args.blocks {
        if end > cfg.n_layers {
            bail!(
                "--blocks {start}..{end} is outside the model: {} has blocks 0..{}",
                file.path().display(),
                cfg.n_layers
            );
        }
    }
    let max_seq_len = args
        .max_seq_len
        .unwrap_or(cfg.max_seq_len.min(DEFAULT_MAX_SEQ_LEN))
        .min(cfg.max_seq_len);
    let mut max_cache_tokens = args.max_cache_tokens.unwrap_or(max_seq_len * 4);
    // Bound before anything slow, so a bad address fails at once.
    let metrics_listener = match &args.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics {addr}: cannot listen there"))?,
        ),
        None => None,
    };
    let swarm_key = args.swarm_key.load()?;
    let swarm_key_is_none = swarm_key.is_none();
    let listen = listen_or_default(&args.listen, swarm_key_is_none, 0);
    let (net, mut inbound) = net::start(NetConfig {
        listen,
        dht_server: true,
        shaping: args.emulate.shaping(),
        swarm_key,
        identity: args.identity.load()?,
        mdns: !args.no_mdns && swarm_key_is_none,
        relay: (!args.no_relay).then(|| args.relay.limits()),
    })?;
    connect_any(
        &net,
        &args.bootstrap,
        Duration::from_secs_f64(args.connect_timeout),
    )
    .await?;
    let me = net.peer_id().to_string();
    let n_blocks = cfg.n_layers as u32;
    let (start, end) = match args.blocks {
        Some(b) => b,
        None => {
            let budget = args
                .memory_budget
                .unwrap_or_else(|| default_budget(&device));
            // Without --max-cache-tokens, the blocks come first: as many as fit beside
            // room for one full-length session, then the cache takes what is left (up
            // to its usual 4 sessions). The budget is kept either way: weights, cache
            // and the node itself (tested: node/tests/spans.rs).
            let cache_for_fit = args.max_cache_tokens.unwrap_or(max_seq_len);
            let fit = blocks_for_budget(&file, budget, cache_for_fit);
            if fit == 0 {
                bail!(
                    "--memory-budget {} MiB is too small: one block of this model needs about {} MiB (weights and {} cache tokens) on top of {} MiB for the node itself",
                    budget >> 20,
                    block_memory(&file, 0, cache_for_fit) >> 20,
                    cache_for_fit,
                    node_overhead(&file) >> 20
                );
            }
            let fit = fit.min(cfg.n_layers);
            if args.max_cache_tokens.is_none() {
                max_cache_tokens = cache_tokens_for_budget(&file, budget, fit).min(max_seq_len * 4);
            }
            let found = if args.bootstrap.is_empty() {
                Vec::new()
            } else {
                net.find_servers(file.id()).await.unwrap_or_default()
            };
            let (s, e) = coordinator::choose_span(&views(&found, &me), n_blocks, fit as u32);
            tracing::info!(
                "budget {} MiB fits {fit} blocks and {max_cache_tokens} cache tokens; the swarm ({} servers) is weakest at {s}..{e}",
                budget >> 20,
                found.len()
            );
            (s as usize, e as usize)
        }
    };
    tracing::info!(
        model = file.id(),
        "loading blocks {start}..{end} of {}",
        cfg.n_layers
    );
    let (span, throughput) = tokio::task::block_in_place(|| load_span(&file, start, end, &device))?;
    let addrs = wait_listen_addrs(&net).await?;
    let shown = best_addr(&addrs).context("no listen address")?;
    let limits = ServerLimits {
        max_sessions: args.max_sessions,
        max_sessions_per_peer: args.max_sessions_per_peer,
        lie: args.debug_lie,
        allowed: match &args.allow_peers {
            Some(path) => Some(crate::cli::load_allowed_peers(path)?),
            None => None,
        },
        max_seq_len,
        max_cache_tokens,
        public_name: args.name.clone(),
    };
    let (total, active) = file.params();
    let params = protocol::ModelParams { total, active };
    let server = Server::new(
        span,
        file.id().to_string(),
        params,
        limits,
        throughput,
        net.clone(),
    );
    let public = server.public_view();
    let metrics = server.metrics();
    let handle = server.spawn(REANNOUNCE_EVERY)?;
    print_listening(&shown)?;
    if let Some(listener) = metrics_listener {
        let mut registry = crate::metrics::registry();
        metrics.register(&mut registry);
        let at = listener.local_addr()?;
        let app = crate::metrics::router(Arc::new(registry));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!("the metrics endpoint stopped: {e}");
            }
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "metrics http://{at}/metrics")?;
        out.flush()?;
    }
    if args.blocks.is_none() && args.rebalance_interval > 0.0 {
        let current = Arc::new(Mutex::new(coordinator::SpanView {
            start: start as u32,
            end: end as u32,
            throughput,
        }));
        tokio::spawn(rebalance(
            file,
            device.clone(),
            net.clone(),
            handle.clone(),
            current,
            Duration::from_secs_f64(args.rebalance_interval),
            args.rebalance_threshold,
        ));
    }
    // Steps go from the task reading their stream straight to the compute thread.
    let direct = handle.clone();
    net.on_data(Arc::new(move |m| direct.submit(m)));
    // A peer that leaves may have held our provider record and announcement: put them
    // again soon, or lookups may miss this server until the next regular announcement
    // (seen under churn: a span's servers all unfindable for up to REANNOUNCE_EVERY).
    tokio::spawn(reannounce_on_departures(net.clone(), handle.clone()));
    // Behind a NAT the addresses change (relay slots come and go): announce them at once.
    tokio::spawn(reannounce_on_reachability(net.clone(), handle.clone()));
    loop {
        tokio::select! {
            msg = inbound.recv() => match msg {
                Some(m) if matches!(m.request, protocol::Request::Info) => {
                    // Answered here, not behind queued steps: clients use it to tell a
                    // busy server from a dead one.
                    let a = public.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    net.respond(m.channel, protocol::Response::Info(a)).await;
                }
                Some(m) => {
                    if !handle.submit(m) {
                        bail!("the compute thread stopped");
                    }
                }
                None => bail!("the network stopped"),
            },
            Some(()) = stop.recv() => {
                return shutdown(&net, &handle, &public, &mut stop).await;
            }
        }
    }
}

/// Longest wait for the steps queued before a shutdown to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the clients' notices and the departure record to go out.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(5);

/// Leaves the swarm without losing anyone's generation: the compute thread finishes the
/// steps already queued and stops taking sessions and steps; every open session's
/// client is told to move (an [`protocol::ErrorKind::Leaving`] report, on which it
/// re-routes at once and replays what the replacement missed); the announcement is
/// replaced by an expired one, so lookups stop finding this server. A second stop
/// signal (Ctrl-C) quits at once.
async fn shutdown(
    net: &Network,
    handle: &ServerHandle,
    public: &Mutex<protocol::Announcement>,
    stop: &mut StopSignals,
) -> anyhow::Result<()> {
    tracing::info!(
        "interrupted: finishing queued steps and handing sessions over (Ctrl-C again to quit now)"
    );
    let Some(drained) = handle.drain() else {
        return Ok(());
    };
    let handovers = tokio::select! {
        h = drained => h.unwrap_or_default(),
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("queued steps did not finish within {DRAIN_TIMEOUT:?}");
            Vec::new()
        }
        Some(()) = stop.recv() => return Ok(()),
    };
    let me = net.peer_id().to_string();
    let notices = handovers.iter().map(|h| {
        let notice = protocol::Request::Failed(protocol::StepFailed {
            session: h.session,
            step: h.next_step,
            peer: me.clone(),
            error: protocol::ErrorInfo::new(
                protocol::ErrorKind::Leaving,
                "the server is shutting down",
            ),
        });
        // A request, not a one-way frame: its answer says the client has the notice.
        // A frame written just before the process exits may never leave the machine.
        let net = net.clone();
        let client = h.client;
        async move {
            if let Err(e) = net.request(client, vec![], notice).await {
                tracing::debug!(%client, "could not tell the client to move: {e:#}");
            }
        }
    });
    let mut departure = public.lock().unwrap_or_else(|p| p.into_inner()).clone();
    departure.expires_unix_ms = net::unix_ms();
    departure.free_cache_tokens = 0;
    let farewell = async {
        futures::future::join_all(notices).await;
        // Both records (under the model and under the peer id) must be replaced
        // before the process exits, or a lookup could still find this server.
        let _ = net.announce_and_wait(departure).await;
    };
    tokio::select! {
        _ = tokio::time::timeout(FAREWELL_TIMEOUT, farewell) => {}
        Some(()) = stop.recv() => return Ok(()),
    }
    tracing::info!(
        "left the swarm; {} session(s) handed over to other servers",
        handovers.len()
    );
    Ok(())
}

/// Wait after a peer leaves before announcing again (departures come in bursts).
const REANNOUNCE_DEBOUNCE: Duration = Duration::from_secs(1);

/// Announces again whenever DHT servers have left (clients coming and going do not
/// count), at most once per [`REANNOUNCE_DEBOUNCE`].
async fn reannounce_on_departures(net: Network, handle: ServerHandle) {
    let mut departures = net.dht_departures();
    loop {
        match departures.recv().await {
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
        // Let a burst of departures settle, then announce once for all of them.
        tokio::time::sleep(REANNOUNCE_DEBOUNCE).await;
        while departures.try_recv().is_ok() {}
        if !handle.announce() {
            return;
        }
    }
}

/// Announces again whenever this node's reachability or relay slots change, so clients
/// find its relayed addresses as soon as it has them.
async fn reannounce_on_reachability(net: Network, handle: ServerHandle) {
    let mut changes = net.status_changes();
    let mut last = (protocol::Reachability::Unknown, Vec::new());
    while changes.changed().await.is_ok() {
        // Changes come in bursts (found private, then a relay slot a moment later):
        // announce once, when it has settled. Each announcement is a DHT query that
        // ends at its own time; two racing would leave whichever ends last, possibly
        // the older addresses.
        tokio::time::sleep(REACHABILITY_SETTLE).await;
        let status = changes.borrow_and_update().clone();
        let now = (status.reachability, status.relays.clone());
        if now != last {
            tracing::info!(
                reachability = %status.reachability,
                relays = status.relays.len(),
                "reachability changed; announcing again"
            );
            last = now;
        }
        // Private with no relay slot: nobody can reach it, so an announcement would
        // only send clients to it in vain (a slot is usually a moment away).
        if status.reachability == protocol::Reachability::Private {
            continue;
        }
        if !handle.announce() {
            return;
        }
    }
}

/// Tells whoever started this node (a script, a test) where to reach it: the first line
/// on stdout, `listening <address>`.
fn print_listening(addr: &Multiaddr) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {addr}")?;
    out.flush()
}

/// How long reachability changes settle before [`reannounce_on_reachability`]
/// announces.
const REACHABILITY_SETTLE: Duration = Duration::from_millis(300);

/// `shoal relay`: a node without a model that keeps the DHT, answers reachability
/// probes and relays for servers behind NATs, until `stop` asks it to.
pub async fn relay(args: crate::cli::RelayArgs, mut stop: StopSignals) -> anyhow::Result<()> {
    let swarm_key = args.swarm_key.load()?;
    let listen = listen_or_default(&args.listen, swarm_key.is_none(), 4001);
    let (net, mut inbound) = net::start(NetConfig {
        listen,
        dht_server: true,
        shaping: None,
        swarm_key,
        identity: args.identity.load()?,
        mdns: false,
        // A dedicated relay is run where others can dial it: slots from the start.
        relay: Some(crate::net::RelayLimits {
            always: true,
            ..args.relay.limits()
        }),
    })?;
    connect_any(
        &net,
        &args.bootstrap,
        Duration::from_secs_f64(args.connect_timeout),
    )
    .await?;
    let addrs = wait_listen_addrs(&net).await?;
    let shown = best_addr(&addrs).context("no listen address")?;
    tracing::info!(
        "relaying for up to {} nodes behind NATs, {} MiB per connection",
        args.relay.relay_slots,
        args.relay.relay_circuit_mib
    );
    print_listening(&shown)?;
    loop {
        tokio::select! {
            msg = inbound.recv() => match msg {
                Some(m) => {
                    let refusal = protocol::Response::Error(protocol::ErrorInfo::new(
                        protocol::ErrorKind::BadRequest,
                        "this node is a relay: it serves no blocks",
                    ));
                    net.respond(m.channel, refusal).await;
                }
                None => bail!("the network stopped"),
            },
            Some(()) = stop.recv() => return Ok(()),
        }
    }
}

/// Every `interval` (jittered), asks `coordinator::should_move` whether this server's
/// span should move, and moves it when it should.
async fn rebalance(
    file: ModelFile,
    device: Device,
    net: Network,
    handle: ServerHandle,
    current: Arc<Mutex<coordinator::SpanView>>,
    interval: Duration,
    threshold: f32,
) {
    let me = net.peer_id().to_string();
    let n_blocks = file.config().n_layers as u32;
    let mut rng: rand::rngs::StdRng = rand::make_rng();
    loop {
        tokio::time::sleep(coordinator::jittered(interval, &mut rng)).await;
        let Ok(found) = net.find_servers(file.id()).await else {
            return;
        };
        let mine = *current.lock().unwrap_or_else(|p| p.into_inner());
        let Some((s, e)) = coordinator::should_move(&views(&found, &me), mine, n_blocks, threshold)
        else {
            continue;
        };
        tracing::info!(
            "moving from blocks {}..{} to {s}..{e}: the swarm is weaker there",
            mine.start,
            mine.end
        );
        let loaded =
            tokio::task::block_in_place(|| load_span(&file, s as usize, e as usize, &device));
        match loaded {
            Ok((span, throughput)) => {
                *current.lock().unwrap_or_else(|p| p.into_inner()) = coordinator::SpanView {
                    start: s,
                    end: e,
                    throughput,
                };
                if !handle.replace(span, throughput) {
                    return;
                }
            }
            Err(e) => tracing::warn!("cannot load the new span: {e:#}"),
        }
    }
}
