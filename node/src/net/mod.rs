//! The libp2p side of a node: one `Swarm`, owned by one event-loop task.
//!
//! The rest of the program talks to it through [`Network`], a cloneable handle that
//! sends commands (each with a `oneshot` for its reply) to the event loop; pending
//! replies wait in maps keyed by query, dial or request id. Inbound requests are handed
//! to the application as [`Inbound`] values, with the channel to answer on; inbound
//! data frames as [`InboundFrame`]s, to the sink given to [`Network::on_data`]. No model
//! code ever runs on this task.
//!
//! Files: `transport` (behaviours), `handle` ([`Network`] and its commands),
//! `event_loop` (the task's state and main loop), `events` (swarm events), `dht`,
//! `nat` (relays and hole punching), `peers` (presences, request budgets), `data`
//! (the data plane), `codec` (request-response framing), `relay_server`. Only this
//! module's public items are for the rest of the node; none of the files below it is.
//!
//! Task lifetimes: nothing here outlives its owner. The event loop returns when the
//! last [`Network`] handle is dropped, which drops the `Swarm` and closes every
//! connection; the task accepting data streams ends with the swarm's stream behaviour,
//! and each stream's reader with its stream; per-request tasks end with their request.
//!
//! Transports: QUIC (libp2p's quinn-based transport) first, TCP + Noise + Yamux as
//! fallback. A private swarm (`--swarm-key`) uses TCP alone, each connection first
//! passing libp2p's pre-shared-key handshake (pnet), which wraps a byte stream and so
//! cannot wrap QUIC. Kademlia holds announcements: each server *provides* the key
//! `/shoal/<model>` and puts its [`protocol::Announcement`] under `/shoal/<model>/<peer>`, both with
//! an expiry, and re-announces before they lapse. Identify feeds peers' listen addresses
//! to Kademlia; ping measures round trips for routing.
//!
//! Behind a NAT. Servers (and relays) run AutoNAT: connected peers are asked to dial
//! them back. A server found to be private asks up to [`WANT_RELAYS`] peers that it
//! reached directly and that offer circuit relay v2 for a slot, listens (and announces)
//! at `<relay>/p2p-circuit`, and gets a new slot elsewhere when one is lost. Every node
//! runs DCUtR: over a relayed connection both ends dial each other at once (QUIC reuses
//! the listening socket, which is what lets the packets through the NATs); once a direct
//! connection stands, the relayed one is closed so every stream moves to it, and the
//! round trip measured through the relay is forgotten. Servers relay for others by
//! default, within [`RelayLimits`].
//!
//! Two planes. Control (sessions, probes, lookups) is request-response on
//! [`protocol::INFERENCE_PROTOCOL`], through the event loop. Data (steps, outputs,
//! failure reports) goes on [`protocol::DATA_PROTOCOL`]: one long-lived libp2p stream per
//! pair of peers, written by the sending task and read by a task per stream, so a frame
//! never waits for the event loop, never opens a substream and is never answered.
//! Measured on loopback (2 cores): a hop fell from 0.35-0.5 ms as a request-response to
//! well under that, and the 3-server swarm went from 1.53x to 1.17x the per-token time of
//! one process.

pub(crate) mod codec;
mod data;
mod dht;
mod event_loop;
mod events;
mod handle;
mod nat;
mod peers;
mod relay_server;
mod transport;

pub use data::DataSink;
pub use handle::{connect_any, Network};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use libp2p::core::Transport as _;
use libp2p::kad::Mode;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::ResponseChannel;
use libp2p::{autonat, identity, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
use protocol::{Frame, Reachability, Request, Response};
use tokio::sync::{mpsc, watch};

use crate::net::data::accept_data_streams;
use crate::net::data::DataStreams;
use crate::net::event_loop::EventLoop;
use crate::net::transport::behaviour;
use crate::net::transport::Extras;

/// How long an announcement stays valid in the DHT. Short, so a departed server drops
/// out of clients' views within a couple of minutes even if it could not say goodbye.
pub const ANNOUNCE_TTL: Duration = Duration::from_secs(120);

/// How often a server re-announces: well inside [`ANNOUNCE_TTL`], so one lost
/// re-announcement does not make it vanish.
pub const REANNOUNCE_EVERY: Duration = Duration::from_secs(30);

/// Time allowed for one request to be answered. Steps are answered as soon as they are
/// accepted (their output travels separately), so this bounds queueing, not compute.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// DHT queries on a small or loopback swarm finish in milliseconds; this bounds them on
/// a large one.
const QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a provider lookup goes on after its first answer. On a swarm of any size the
/// closest peers answer within a few round trips; waiting for the slowest (or dead) ones
/// would stall a client's failover.
const PROVIDER_SETTLE: Duration = Duration::from_millis(300);

/// The settle time of a patient lookup ([`Network::find_servers_patiently`]), after a
/// quick one left blocks uncovered: the first peers to answer (a node that has just
/// joined, say) may know only part of the swarm.
const PATIENT_SETTLE: Duration = Duration::from_secs(2);

/// Idle connections are kept this long: setting up QUIC costs ~44 ms (DESIGN.md), so a
/// connection is reused across steps and sessions.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(600);

/// Relays a server behind a NAT keeps a slot on: two, so losing one relay leaves it
/// reachable while it finds another.
pub const WANT_RELAYS: usize = 2;

/// A relay that refused or lost a slot is not asked again for this long.
const RELAY_RETRY: Duration = Duration::from_secs(30);

/// After a hole punch, the relayed connection stays this long, so frames already in
/// flight on it arrive, then closes (every stream moves to the direct connection).
const RELAYED_GRACE: Duration = Duration::from_secs(1);

/// A relayed connection this much older than a peer's fresh one through another relay
/// is taken for dead (see `EventLoop::drop_stale_relayed`); younger ones may come
/// from two dials that raced.
const STALE_RELAYED_AGE: Duration = Duration::from_secs(2);

/// What a node serving as a relay allows (`shoal serve --relay-slots`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// Nodes that may hold a slot (be reachable through this one) at once.
    pub slots: usize,
    /// Bytes one relayed connection may carry before the relay closes it (its ends
    /// then reconnect, through a relay again or directly).
    pub circuit_bytes: u64,
    /// Offer slots from the start: the operator says others can dial this node (a
    /// dedicated relay). Otherwise slots are offered only once AutoNAT has confirmed
    /// an outside address (libp2p's relay advertises itself only then).
    pub always: bool,
}

/// How one connected peer is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// A direct connection.
    Direct,
    /// A direct connection made by hole punching (DCUtR) after a relayed one.
    HolePunched,
    /// Only through this relay.
    Relayed(PeerId),
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Link::Direct => f.write_str("direct"),
            Link::HolePunched => f.write_str("hole-punched"),
            Link::Relayed(r) => write!(f, "relayed:{r}"),
        }
    }
}

/// What a node knows of its own reachability.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetStatus {
    /// Whether others can dial it (see [`Reachability`]).
    pub reachability: Reachability,
    /// The relays it holds a slot on.
    pub relays: Vec<PeerId>,
    /// Where it can be reached: its listen addresses and its relayed ones, each ending
    /// in `/p2p/<its peer id>`.
    pub addrs: Vec<Multiaddr>,
}

/// An inbound request of the control plane, to be answered through
/// [`Network::respond`].
pub struct Inbound {
    /// Who sent it.
    pub peer: PeerId,
    /// What they asked.
    pub request: Request,
    /// Where the answer goes.
    pub channel: ResponseChannel<Response>,
}

/// An inbound frame of the data plane (see [`Network::on_data`]); never answered.
#[derive(Debug)]
pub struct InboundFrame {
    /// Who sent it.
    pub peer: PeerId,
    /// The frame.
    pub frame: Frame,
}

/// One stretch of a peer's time with this node: it begins with the peer's first
/// connection and ends when its last connection closes or when it comes back as another
/// process under the same peer id (a client run again with its `--identity`). State
/// this node keeps for a peer (a server's sessions, the data stream to it) belongs to
/// one presence and ends with it; see [`Network::presence`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Presence(u64);

/// Connected peers and their current [`Presence`]; written by the event loop only.
type Presences = Arc<std::sync::RwLock<HashMap<PeerId, Presence>>>;

/// A peer that sent this many undecodable frames or requests is banned...
const BAN_AFTER_STRIKES: u32 = 3;
/// ... for this long. Each strike also closes its connections at once.
const BAN_FOR: Duration = Duration::from_secs(600);
/// Strikes are forgotten this long after a peer's last one: an honest peer that sent
/// one bad frame by accident does not carry it for ever.
const STRIKE_MEMORY: Duration = BAN_FOR;

/// Past this many peers in a per-peer table that outlives connections (request budgets,
/// strikes), entries that no longer matter are dropped: a public node meets thousands
/// of short-lived clients a day, each with a fresh peer id.
const MAX_TRACKED_PEERS: usize = 10_000;

/// Past this many request budgets kept, each departure sweeps out those that have
/// refilled (most clients leave right after their last request, budget not yet full).
const BUDGET_SWEEP_AT: usize = 1024;

/// After [`Network::close_all`] sees the last connection closed, time for the QUIC
/// transport to send its farewell (CONNECTION_CLOSE) packets before the process exits.
const CLOSE_FLUSH: Duration = Duration::from_millis(50);

/// Requests (sessions, probes, lookups: the control plane) a peer may send per second
/// on average, and in a burst; past that they are refused as busy without reaching the
/// server. Steps travel on the data plane and are bounded by sessions instead.
const REQUESTS_PER_SECOND: f64 = 200.0;
const REQUEST_BURST: f64 = 400.0;

/// How to start a node's network.
pub struct NetConfig {
    /// Addresses to listen on; empty = none (a pure client still dials out).
    pub listen: Vec<Multiaddr>,
    /// True for servers: Kademlia answers queries and stores records. Clients stay in
    /// client mode so they are never asked to hold the swarm's records.
    pub dht_server: bool,
    /// Emulated link for every request this node sends (checking the simulator on
    /// loopback); `None` in normal use.
    pub shaping: Option<Shaping>,
    /// A private swarm's pre-shared key: only nodes holding it can connect (TCP only).
    pub swarm_key: Option<PreSharedKey>,
    /// The node's key pair (its peer id); `None` = a new random one.
    pub identity: Option<identity::Keypair>,
    /// Find and join nodes on the same LAN by multicast DNS, without a bootstrap
    /// address.
    pub mdns: bool,
    /// Relay for nodes behind NATs, within these limits; `None` = never.
    pub relay: Option<RelayLimits>,
}

/// An emulated network link, applied by the sender to each request it sends: a one-way
/// delay plus the time its hidden states take at a given bandwidth. Used to run a real
/// swarm on loopback with the latencies and bandwidths of a simulator topology.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shaping {
    /// One-way delay (half the round trip).
    pub one_way: Duration,
    /// Link bandwidth in bytes per second, if limited.
    pub bytes_per_s: Option<f64>,
}

impl Shaping {
    /// The emulated time for a message carrying `bytes` of hidden states.
    fn delay(&self, bytes: usize) -> Duration {
        let transfer = self.bytes_per_s.map_or(0.0, |bw| bytes as f64 / bw);
        self.one_way + Duration::from_secs_f64(transfer)
    }

    /// Waits out the emulated time of a message carrying `bytes`, on a thread of the
    /// blocking pool. The runtime's timer fires on whole milliseconds and late:
    /// measured (40 waits of 5 ms, idle machine), `tokio::time::sleep` took 6.1 ms on
    /// average and a thread's sleep here 5.2 ms. The lateness is in every hop of a
    /// chain, and the simulator, given the link, cannot know of it.
    pub(crate) async fn wait(&self, bytes: usize) {
        let delay = self.delay(bytes);
        if !delay.is_zero() {
            let _ = tokio::task::spawn_blocking(move || std::thread::sleep(delay)).await;
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether `addr` is a TCP address (the only kind a private swarm can use).
pub fn is_tcp(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::Tcp(_)))
        && !addr
            .iter()
            .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic | Protocol::Udp(_)))
}

/// Starts the swarm and its event loop; returns the handle and the inbound requests.
pub fn start(config: NetConfig) -> anyhow::Result<(Network, mpsc::Receiver<Inbound>)> {
    let keypair = config
        .identity
        .clone()
        .unwrap_or_else(identity::Keypair::generate_ed25519);
    let peer_id = keypair.public().to_peer_id();
    let instance = rand::random::<u64>();
    // Substreams negotiate their protocol the usual way (V1). V1Lazy (the first bytes
    // go out with the protocol name, saving a round trip) silently lost Kademlia's
    // ADD_PROVIDER messages, which are written and closed without an answer: provider
    // records never reached other nodes, and lookups found servers only through the
    // routing-table fallback (seen once servers behind NATs left the routing tables).
    // Steps do not pay for it: they travel on long-lived data streams.
    let swarm_config =
        |c: libp2p::swarm::Config| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT);
    let private = config.swarm_key.is_some();
    let extras = Extras {
        lan: config.mdns,
        relay: config.relay,
        autonat: config.dht_server,
    };
    let mut swarm = match config.swarm_key {
        None => libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .context("setting up TCP")?
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .context("setting up the relay client")?
            .with_behaviour(|key, relay_client| behaviour(key, relay_client, extras, instance))
            .context("setting up behaviours")?
            .with_swarm_config(swarm_config)
            .build(),
        Some(psk) => {
            // A private swarm: every connection starts with the pre-shared-key
            // handshake, which wraps a byte stream; QUIC has none to wrap, so a private
            // node speaks TCP only.
            if let Some(a) = config.listen.iter().find(|a| !is_tcp(a)) {
                anyhow::bail!(
                    "a private swarm (--swarm-key) runs over TCP only: listen on a /tcp/ address, not {a}"
                );
            }
            libp2p::SwarmBuilder::with_existing_identity(keypair)
                .with_tokio()
                .with_other_transport(|key| {
                    let noise = noise::Config::new(key)?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                            .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                            .authenticate(noise)
                            .multiplex(yamux::Config::default()),
                    )
                })
                .context("setting up the private transport")?
                // Relayed connections run inside a connection to the relay, which
                // passed the key's handshake: only key holders reach the relay at all.
                .with_relay_client(noise::Config::new, yamux::Config::default)
                .context("setting up the relay client")?
                .with_behaviour(|key, relay_client| behaviour(key, relay_client, extras, instance))
                .context("setting up behaviours")?
                .with_swarm_config(swarm_config)
                .build()
        }
    };
    swarm
        .behaviour_mut()
        .kad
        .set_mode(Some(if config.dht_server {
            Mode::Server
        } else {
            Mode::Client
        }));
    for addr in config.listen {
        swarm
            .listen_on(addr.clone())
            .with_context(|| format!("cannot listen on {addr}"))?;
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(1024);
    let (disconnects, _) = tokio::sync::broadcast::channel(256);
    let (dht_departures, _) = tokio::sync::broadcast::channel(256);
    let (inbound_tx, inbound_rx) = mpsc::channel(1024);
    let mut control = swarm.behaviour().stream.new_control();
    let incoming = control
        .accept(StreamProtocol::new(protocol::DATA_PROTOCOL))
        .map_err(|e| anyhow!("data plane: {e}"))?;
    let sink = Arc::new(std::sync::RwLock::new(None));
    let data = Arc::new(DataStreams {
        sink: sink.clone(),
        control: std::sync::Mutex::new(control),
        open: std::sync::Mutex::new(HashMap::new()),
    });
    let presences = Presences::default();
    let (status_tx, status) = watch::channel(NetStatus::default());
    tokio::spawn(accept_data_streams(
        incoming,
        sink.clone(),
        cmd_tx.downgrade(),
    ));
    let event_loop = EventLoop {
        swarm,
        cmd_rx,
        inbound_tx,
        listen_addrs: Vec::new(),
        pending_dials: HashMap::new(),
        pending_requests: HashMap::new(),
        provider_queries: HashMap::new(),
        record_queries: HashMap::new(),
        lookups: HashMap::new(),
        next_lookup: 0,
        rtts: HashMap::new(),
        disconnects: disconnects.clone(),
        dht_departures: dht_departures.clone(),
        dht_peers: HashSet::new(),
        all_server_queries: HashMap::new(),
        server_record_queries: HashMap::new(),
        put_waits: Vec::new(),
        finish_soon: Vec::new(),
        strikes: HashMap::new(),
        presences: presences.clone(),
        next_presence: 0,
        data: data.clone(),
        close_waits: Vec::new(),
        lan: HashMap::new(),
        budgets: HashMap::new(),
        to_self: cmd_tx.downgrade(),
        conns: HashMap::new(),
        relay_capable: HashSet::new(),
        reservations: HashMap::new(),
        relay_failures: HashMap::new(),
        punched: HashSet::new(),
        nat: autonat::NatStatus::Unknown,
        dht_server: config.dht_server,
        relay_when_public: config.relay.is_some_and(|l| !l.always),
        status_tx,
    };
    tokio::spawn(event_loop.run());
    Ok((
        Network {
            cmd: cmd_tx,
            peer_id,
            private,
            shaping: config.shaping,
            disconnects,
            dht_departures,
            data,
            status,
            presences,
        },
        inbound_rx,
    ))
}
