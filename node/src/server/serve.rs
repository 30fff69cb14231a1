//! `shoal serve` and `shoal relay`: joining the swarm, choosing and loading a span,
//! serving it until asked to stop.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coordinator::budget;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

use super::shutdown::shutdown;
use super::shutdown::Background;
use super::span::block_memory;
use super::span::blocks_for_budget;
use super::span::cache_tokens_for_budget;
use super::span::default_budget;
use super::span::load_span;
use super::span::node_overhead;
use super::upkeep::reannounce_on_departures;
use super::upkeep::reannounce_on_reachability;
use super::upkeep::rebalance;
use super::upkeep::views;
use crate::args::ServeArgs;
use crate::net::connect_any;
use crate::net::{self, NetConfig, Network, REANNOUNCE_EVERY};
use crate::server::{Refused, Server, ServerLimits};
use crate::{NodeError, StopSignals};

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

/// `shoal serve`, until `stop` asks it to leave.
pub async fn serve(args: ServeArgs, stop: StopSignals) -> Result<(), NodeError> {
    serve_until_stopped(args, stop)
        .await
        .map_err(NodeError::from)
}

async fn serve_until_stopped(args: ServeArgs, mut stop: StopSignals) -> anyhow::Result<()> {
    // Without --model but with --bootstrap, the model is the swarm's (see below); a
    // given file is opened first, so a bad one fails before anything else.
    let fileless = args.model.model.is_none() && !args.bootstrap.is_empty();
    let given = if fileless {
        None
    } else {
        Some(crate::model_cache::open_model(&args.model)?)
    };
    let device = shard::device::open(args.device)?;
    tracing::info!(
        "blocks run on {} (this build: cpu{})",
        shard::device::describe(&device),
        shard::device::compiled_backends()
            .iter()
            .map(|b| format!(", {b}"))
            .collect::<String>()
    );
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
    let store = crate::weights::store(&args.from_swarm);
    // The model: the file given, or the swarm's (a file here with its id, or its
    // manifest, from which the span is planned and then fetched).
    let (file, from_swarm) = match given {
        Some(f) => (f, None),
        None => match join_swarm_model(&net, &args).await? {
            SwarmJoin::File(f) => (*f, None),
            SwarmJoin::Fetch(model, manifest) => (
                shard::ModelFile::of_manifest(manifest.clone())?,
                Some((model, manifest)),
            ),
        },
    };
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
        .unwrap_or(cfg.max_seq_len.min(budget::DEFAULT_MAX_SEQ_LEN))
        .min(cfg.max_seq_len);
    let mut max_cache_tokens = args.max_cache_tokens.unwrap_or(max_seq_len * 4);
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
    // A node fetching from the swarm fetches its span's tensors now, then opens them.
    let file = match &from_swarm {
        None => file,
        Some((model, manifest)) => {
            let names = crate::weights::span_tensors(manifest, start, end);
            let label = format!("blocks-{start}-{end}");
            let fetched =
                crate::weights::fetch_part(&net, manifest, &names, &model.sources, &store, &label)
                    .await?;
            shard::ModelFile::open(&fetched.path)?
        }
    };
    tracing::info!(
        model = file.id(),
        "loading blocks {start}..{end} of {}",
        cfg.n_layers
    );
    let (span, throughput) = tokio::task::block_in_place(|| load_span(&file, start, end, &device))?;
    let file = Arc::new(file);
    let sharing = crate::weights::Sharing::new(
        file.clone(),
        crate::weights::ShareLimits {
            bytes_per_second: (args.share_mbps > 0.0)
                .then_some((args.share_mbps * 125_000.0) as u64),
            max_transfers: args.share_transfers,
            corrupt: args.debug_corrupt_chunks,
        },
    );
    let sharing = match sharing {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::info!("not sharing weights: {e:#}");
            None
        }
    };
    let files = match from_swarm {
        None => crate::weights::SpanFiles::Whole(file.clone()),
        Some((_, manifest)) => crate::weights::SpanFiles::Fetched {
            current: file.clone(),
            manifest,
            store,
            sharing: sharing.clone(),
        },
    };
    let addrs = wait_listen_addrs(&net).await?;
    let shown = best_addr(&addrs).context("no listen address")?;
    let limits = ServerLimits {
        max_sessions: args.max_sessions,
        max_sessions_per_peer: args.max_sessions_per_peer,
        lie: args.debug_lie,
        allowed: match &args.allow_peers {
            Some(path) => Some(crate::args::load_allowed_peers(path)?),
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
    // The server's background tasks: each runs until the server stops (see
    // `shutdown` for the order things stop in).
    let background = Background::default();
    if let Some(s) = sharing {
        background.spawn(crate::weights::share(&net, s)?);
    }
    if let Some(listener) = metrics_listener {
        let mut registry = crate::metrics::registry();
        metrics.register(&mut registry);
        let at = listener.local_addr()?;
        let app = crate::metrics::router(Arc::new(registry));
        background.spawn(async move {
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
        background.spawn(rebalance(
            files,
            device.clone(),
            net.clone(),
            handle.clone(),
            current,
            Duration::from_secs_f64(args.rebalance_interval),
            args.rebalance_threshold,
        ));
    }
    // Steps go from the task reading their stream straight to the compute thread.
    // A server takes only steps there; outputs and failure reports are for clients.
    let direct = handle.clone();
    let refuser = net.clone();
    net.on_data(Arc::new(move |m| match m.frame {
        protocol::Frame::Step(step) => match direct.submit_step(step) {
            Ok(()) => true,
            Err(Refused::Busy(step)) => {
                refuse_busy_step(&refuser, *step);
                true
            }
            Err(Refused::Stopped) => false,
        },
        protocol::Frame::Output(_) | protocol::Frame::Failed(_) => {
            tracing::debug!(peer = %m.peer, "an output or failure report sent to a server: dropped");
            true
        }
    }));
    // A peer that leaves may have held our provider record and announcement: put them
    // again soon, or lookups may miss this server until the next regular announcement
    // (seen under churn: a span's servers all unfindable for up to REANNOUNCE_EVERY).
    background.spawn(reannounce_on_departures(net.clone(), handle.clone()));
    // Behind a NAT the addresses change (relay slots come and go): announce them at once.
    background.spawn(reannounce_on_reachability(net.clone(), handle.clone()));
    loop {
        tokio::select! {
            msg = inbound.recv() => match msg {
                Some(m) if matches!(m.request, protocol::Request::Info) => {
                    // Answered here, not behind queued steps: clients use it to tell a
                    // busy server from a dead one.
                    let a = public.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    net.respond(m.channel, protocol::Response::Info(a)).await;
                }
                Some(m) => match handle.submit(m) {
                    Ok(()) => {}
                    Err(Refused::Busy(m)) => {
                        let busy = protocol::ErrorInfo::new(
                            protocol::ErrorKind::Busy,
                            "the server's queue of requests is full",
                        );
                        net.respond(m.channel, protocol::Response::Error(busy)).await;
                    }
                    Err(Refused::Stopped) => bail!("the compute thread stopped"),
                },
                None => bail!("the network stopped"),
            },
            Some(()) = stop.recv() => {
                return shutdown(&net, &handle, &public, background, &mut stop).await;
            }
        }
    }
}

/// The model of a node started without --model.
enum SwarmJoin {
    /// A file here (the default model, or the one the swarm serves, found here).
    File(Box<shard::ModelFile>),
    /// The swarm's model, to be fetched: its servers and manifest.
    Fetch(crate::weights::SwarmModel, Arc<shard::manifest::Manifest>),
}

/// The swarm's model for a node started without --model: found here if the default
/// model is that model, else fetched; the default model when the swarm serves none.
async fn join_swarm_model(net: &Network, args: &ServeArgs) -> anyhow::Result<SwarmJoin> {
    let here = crate::weights::here(&args.from_swarm);
    let joined =
        crate::weights::join_model(net, args.from_swarm.model_id.as_deref(), &here).await?;
    Ok(match joined {
        None => {
            tracing::info!("the swarm serves no model yet: serving the default model");
            SwarmJoin::File(Box::new(crate::model_cache::open_model(&args.model)?))
        }
        Some(crate::weights::Joined::Here(path)) => {
            SwarmJoin::File(Box::new(shard::ModelFile::open(path)?))
        }
        Some(crate::weights::Joined::FromSwarm { model, manifest }) => {
            tracing::info!(
                "joining model {} from the swarm ({} servers hold it)",
                model.id,
                model.sources.len()
            );
            SwarmJoin::Fetch(model, manifest)
        }
    })
}

/// Tells a step's client that this server's inbox is full (see
/// [`crate::server::INBOX_LIMIT`]): its client fails over as for any refused step.
fn refuse_busy_step(net: &Network, step: protocol::Step) {
    let Ok(client) = step.reply_to.parse::<libp2p::PeerId>() else {
        return;
    };
    let report = protocol::Frame::Failed(protocol::StepFailed {
        session: step.session,
        step: step.step,
        peer: net.peer_id().to_string(),
        error: protocol::ErrorInfo::new(
            protocol::ErrorKind::Busy,
            "the server's queue of steps is full",
        ),
    });
    let net = net.clone();
    tokio::spawn(async move {
        let _ = net.send(client, vec![], report).await;
    });
}

/// Tells whoever started this node (a script, a test) where to reach it: the first line
/// on stdout, `listening <address>`.
fn print_listening(addr: &Multiaddr) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {addr}")?;
    out.flush()
}

/// `shoal relay`: a node without a model that keeps the DHT, answers reachability
/// probes and relays for servers behind NATs, until `stop` asks it to.
pub async fn relay(args: crate::args::RelayArgs, stop: StopSignals) -> Result<(), NodeError> {
    relay_until_stopped(args, stop)
        .await
        .map_err(NodeError::from)
}

async fn relay_until_stopped(
    args: crate::args::RelayArgs,
    mut stop: StopSignals,
) -> anyhow::Result<()> {
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
