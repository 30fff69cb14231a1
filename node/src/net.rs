//! The libp2p side of a node: one `Swarm`, owned by one event-loop task.
//!
//! The rest of the program talks to it through [`Network`], a cloneable handle that
//! sends [`Command`]s (each with a `oneshot` for its reply) to the [`EventLoop`]; pending
//! replies wait in maps keyed by query, dial or request id. Inbound requests are handed
//! to the application as [`Inbound`] values, with the channel to answer on. No model
//! code ever runs on this task.
//!
//! Transports: QUIC (libp2p's quinn-based transport) first, TCP + Noise + Yamux as
//! fallback. A private swarm (`--swarm-key`) uses TCP alone, each connection first
//! passing libp2p's pre-shared-key handshake (pnet), which wraps a byte stream and so
//! cannot wrap QUIC. Kademlia holds announcements: each server *provides* the key
//! `/shoal/<model>` and puts its [`Announcement`] under `/shoal/<model>/<peer>`, both with
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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use futures::{AsyncWriteExt, StreamExt};
use libp2p::core::transport::ListenerId;
use libp2p::core::ConnectedPoint;
use libp2p::core::Transport as _;
use libp2p::kad::{
    self, store::MemoryStore, store::MemoryStoreConfig, Mode, QueryId, QueryResult, Quorum, Record,
    RecordKey,
};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, autonat, dcutr, identify, identity, mdns, noise, ping, relay, tcp, yamux,
    Multiaddr, PeerId, StreamProtocol, Swarm,
};
use protocol::{Announcement, Reachability, Request, Response};
use tokio::sync::{mpsc, oneshot, watch};

use crate::codec::ShoalCodec;

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

#[derive(NetworkBehaviour)]
struct Behaviour {
    /// Peers banned for sending garbage: their connections are refused both ways.
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Nodes on the same LAN, found by multicast DNS (off with `--no-mdns`).
    mdns: Toggle<mdns::tokio::Behaviour>,
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    rr: request_response::Behaviour<ShoalCodec>,
    stream: libp2p_stream::Behaviour,
    /// Reaching nodes behind NATs through relays (every node).
    relay_client: relay::client::Behaviour,
    /// Relaying for others (servers and relays, unless turned off).
    relay: Toggle<crate::relay_server::RelayServer>,
    /// Hole punching over relayed connections (every node).
    dcutr: dcutr::Behaviour,
    /// Finding out whether this node can be dialled, and telling others (servers and
    /// relays).
    autonat: Toggle<autonat::Behaviour>,
}

/// An inbound request, to be answered through [`Network::respond`].
pub struct Inbound {
    /// Who sent it.
    pub peer: PeerId,
    /// What they asked.
    pub request: Request,
    /// Where the answer goes; `None` for a one-way message of the data plane
    /// ([`Network::send`]), which gets no answer.
    pub channel: Option<ResponseChannel<Response>>,
}

enum Command {
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<anyhow::Result<PeerId>>,
    },
    Request {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
        reply: oneshot::Sender<anyhow::Result<Response>>,
    },
    Respond {
        channel: ResponseChannel<Response>,
        response: Response,
    },
    Announce {
        announcement: Announcement,
        /// Told when the records have been stored with peers (or failed to be).
        stored: Option<oneshot::Sender<()>>,
    },
    FindServers {
        model_id: String,
        settle: Duration,
        reply: oneshot::Sender<Vec<Announcement>>,
    },
    FindAllServers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Rtts {
        reply: oneshot::Sender<HashMap<PeerId, Duration>>,
    },
    DhtPeers {
        reply: oneshot::Sender<Vec<(PeerId, Vec<Multiaddr>)>>,
    },
    AddAddresses {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<()>,
    },
    /// `peer` sent something undecodable: a strike against it.
    Misbehaved {
        peer: PeerId,
        reason: String,
    },
    /// A ban has run its time.
    Unban {
        peer: PeerId,
    },
    LanPeers {
        reply: oneshot::Sender<Vec<(PeerId, Vec<Multiaddr>)>>,
    },
    Links {
        reply: oneshot::Sender<HashMap<PeerId, Link>>,
    },
    ServerRecord {
        peer: PeerId,
        reply: oneshot::Sender<Option<Announcement>>,
    },
    /// A hole punch to `peer` succeeded a moment ago: close its relayed connections.
    CloseRelayed {
        peer: PeerId,
    },
    /// Close every connection; answered when none is left.
    CloseAll {
        reply: oneshot::Sender<()>,
    },
}

/// A cloneable handle to the event loop.
#[derive(Clone)]
pub struct Network {
    cmd: mpsc::Sender<Command>,
    peer_id: PeerId,
    /// In a private swarm (TCP only).
    private: bool,
    shaping: Option<Shaping>,
    /// Peers whose [`Presence`] ended: their last connection closed, or they came back
    /// as a new process. A client watching its chain learns at once that a TCP peer
    /// died (QUIC peers that vanish are only noticed by QUIC's idle timeout, 10 s).
    disconnects: tokio::sync::broadcast::Sender<PeerId>,
    /// The subset of those that were DHT servers (they may have held our records).
    dht_departures: tokio::sync::broadcast::Sender<PeerId>,
    data: Arc<DataStreams>,
    status: watch::Receiver<NetStatus>,
    /// The current presence of every connected peer, kept by the event loop.
    presences: Presences,
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

/// The outbound half of the data plane: one stream per peer, opened on first use and
/// kept. Frames are written from the sending task itself, not through the event loop.
///
/// One per-connection leak is left, in libp2p-stream 0.5.0-alpha itself: its `Shared`
/// keeps a channel sender for every connection it has seen (`senders` in its
/// `shared.rs` is never pruned), about 250 bytes each (heaptrack, server heap after 30
/// and 330 clients). A server's resident memory grew ~1.4 KB per fresh client over
/// 1,200 of them (`FRESH=1200 SAME=0 bench/soak.sh`), against ~85 KB before the stream
/// to each departed peer was dropped.
struct DataStreams {
    /// Where inbound data-plane messages go straight from the task reading their stream
    /// (see [`Network::on_data`]); the inbound queue when unset.
    sink: Arc<std::sync::RwLock<Option<DataSink>>>,
    /// Cloned for each stream opened: one shared control opens one stream at a time, and
    /// an open that hangs (a peer that died) must not hold up the others.
    control: std::sync::Mutex<libp2p_stream::Control>,
    /// The stream to each peer. An entry lives from the first send to the peer until
    /// the peer's presence ends (the event loop calls [`DataStreams::forget`]: a stream
    /// holds its connection's state, ~85 KB for QUIC, so one kept per departed client
    /// was a server's steady leak) or until a send finds no way to open one.
    open: std::sync::Mutex<HashMap<PeerId, DataSlot>>,
}

/// The stream to one peer, opened by whichever send needs it first; sends to a peer
/// take turns on it.
type DataSlot = Arc<tokio::sync::Mutex<Option<libp2p::Stream>>>;

impl DataStreams {
    /// Drops the stream to `peer` (its presence ended: the connection it ran on is gone
    /// or going). A write under way finishes on it; the next send opens a new one.
    fn forget(&self, peer: &PeerId) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer);
    }
}

/// Takes an inbound data-plane message without blocking; false if its receiver is gone.
pub type DataSink = Arc<dyn Fn(Inbound) -> bool + Send + Sync>;

/// Longest wait to write one frame (a prefill chunk can be megabytes on a slow link).
const DATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait to open a data stream, dialling included.
const OPEN_DATA_TIMEOUT: Duration = Duration::from_secs(5);

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
    fn delay(&self, request: &Request) -> Duration {
        let bytes = match request {
            Request::Step(s) => s.hidden.bytes.len(),
            Request::Output(o) => o.hidden.bytes.len(),
            _ => 0,
        };
        let transfer = self.bytes_per_s.map_or(0.0, |bw| bytes as f64 / bw);
        self.one_way + Duration::from_secs_f64(transfer)
    }
}

fn provider_key(model_id: &str) -> RecordKey {
    RecordKey::new(&format!("/shoal/{model_id}"))
}

/// Provided by every server of every model, so `shoal status` can list them all.
fn all_servers_key() -> RecordKey {
    RecordKey::new(&"/shoal/servers")
}

/// A server's announcement under its peer id alone, whatever its model: how `shoal
/// status` finds the addresses of a server it knows only as a provider of
/// [`all_servers_key`] (one behind a NAT is in nobody's routing table).
fn server_key(peer: &str) -> RecordKey {
    RecordKey::new(&format!("/shoal/server/{peer}"))
}

fn announcement_key(model_id: &str, peer: &str) -> RecordKey {
    RecordKey::new(&format!("/shoal/{model_id}/{peer}"))
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What identify tells peers this node runs: its version and a random tag of this
/// process. A peer that sees the same peer id with another tag knows that the process
/// it knew is gone (see `EventLoop::on_identified`).
fn agent_version(instance: u64) -> String {
    format!(
        "shoal/{} instance/{instance:016x}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The process tag in a peer's agent version; `None` for software that sends none.
fn instance_of(agent_version: &str) -> Option<u64> {
    let tag = agent_version
        .split_whitespace()
        .find_map(|w| w.strip_prefix("instance/"))?;
    u64::from_str_radix(tag, 16).ok()
}

/// Whether `addr` is a TCP address (the only kind a private swarm can use).
pub fn is_tcp(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::Tcp(_)))
        && !addr
            .iter()
            .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic | Protocol::Udp(_)))
}

/// What [`behaviour`] includes beyond what every node runs.
#[derive(Clone, Copy)]
struct Extras {
    /// mDNS.
    lan: bool,
    /// Relay for others.
    relay: Option<RelayLimits>,
    /// AutoNAT (servers and relays; a pure client dials out and need not know).
    autonat: bool,
}

/// The node's protocols: Kademlia, identify, ping, request-response, the data plane,
/// relay client and hole punching; mDNS, relay server and AutoNAT as `extras` say.
fn behaviour(
    key: &identity::Keypair,
    relay_client: relay::client::Behaviour,
    extras: Extras,
    instance: u64,
) -> Behaviour {
    let lan = extras.lan;
    let id = key.public().to_peer_id();
    let mut kcfg = kad::Config::new(StreamProtocol::new("/shoal/kad/1.0.0"));
    kcfg.set_query_timeout(QUERY_TIMEOUT);
    kcfg.set_record_ttl(Some(ANNOUNCE_TTL));
    kcfg.set_provider_record_ttl(Some(ANNOUNCE_TTL));
    // Servers re-announce themselves on their own schedule (fresh numbers each
    // time); Kademlia's own republication would only repeat stale ones.
    kcfg.set_publication_interval(None);
    kcfg.set_provider_publication_interval(None);
    kcfg.set_replication_interval(None);
    // Routing tables are filled by dialling bootstrap nodes and by identify;
    // a timer that warns "no known peers" on a swarm's first node helps no one.
    kcfg.set_periodic_bootstrap_interval(None);
    let store = MemoryStore::with_config(
        id,
        MemoryStoreConfig {
            // Sized for a swarm of ~10k servers of a handful of models.
            max_records: 65_536,
            // An announcement is a few hundred bytes.
            max_value_bytes: 16 * 1024,
            max_providers_per_key: 10_000,
            max_provided_keys: 64,
        },
    );
    let kad = kad::Behaviour::with_config(id, store, kcfg);
    let identify = identify::Behaviour::new(
        identify::Config::new("/shoal/id/1".into(), key.public())
            .with_agent_version(agent_version(instance)),
    );
    let rr = request_response::Behaviour::with_codec(
        ShoalCodec,
        [(
            StreamProtocol::new(protocol::INFERENCE_PROTOCOL),
            ProtocolSupport::Full,
        )],
        request_response::Config::default()
            .with_request_timeout(REQUEST_TIMEOUT)
            .with_max_concurrent_streams(4096),
    );
    let mdns = if lan {
        match mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id()) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("LAN discovery (mDNS) is off: {e}");
                None
            }
        }
    } else {
        None
    };
    let relay = extras.relay.map(|limits| {
        let config = relay::Config {
            max_reservations: limits.slots,
            max_reservations_per_peer: 2,
            max_circuits: limits.slots * 8,
            max_circuits_per_peer: 32,
            // A generation's connection lives as long as the generation; the byte limit
            // is the one that bounds what a relay gives away.
            max_circuit_duration: Duration::from_secs(3600),
            max_circuit_bytes: limits.circuit_bytes,
            ..relay::Config::default()
        };
        let mut server = relay::Behaviour::new(id, config);
        // Offered from the start by a dedicated relay; by a server only while AutoNAT
        // says it is public (see the event loop). Left to itself, libp2p's relay offers
        // slots as soon as the node has any confirmed external address, and a relayed
        // address counts: servers behind NATs would offer to relay for each other.
        server.set_status(Some(if limits.always {
            relay::Status::Enable
        } else {
            relay::Status::Disable
        }));
        crate::relay_server::RelayServer::new(server)
    });
    let autonat = extras.autonat.then(|| {
        autonat::Behaviour::new(
            id,
            autonat::Config {
                // Probe soon after joining (the default waits 15 s), again every 20 s
                // until sure, and every 5 minutes after that.
                boot_delay: Duration::from_secs(2),
                retry_interval: Duration::from_secs(20),
                refresh_interval: Duration::from_secs(300),
                throttle_server_period: Duration::from_secs(10),
                timeout: Duration::from_secs(15),
                ..autonat::Config::default()
            },
        )
    });
    Behaviour {
        blocked: allow_block_list::Behaviour::default(),
        mdns: Toggle::from(mdns),
        kad,
        identify,
        ping: ping::Behaviour::new(ping::Config::new()),
        rr,
        stream: libp2p_stream::Behaviour::new(),
        relay_client,
        relay: Toggle::from(relay),
        dcutr: dcutr::Behaviour::new(id),
        autonat: Toggle::from(autonat),
    }
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
        inbound_tx.clone(),
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

impl Network {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(make(tx))
            .await
            .map_err(|_| anyhow!("network event loop has stopped"))?;
        rx.await
            .map_err(|_| anyhow!("network event loop has stopped"))
    }

    /// Dials `addr` and waits for the connection, at most `timeout`.
    pub async fn dial(&self, addr: Multiaddr, timeout: Duration) -> anyhow::Result<PeerId> {
        let shown = addr.to_string();
        if self.private && !is_tcp(&addr) {
            anyhow::bail!(
                "a private swarm (--swarm-key) runs over TCP only: {shown} is not a TCP address"
            );
        }
        let hint = if self.private {
            "this node uses --swarm-key: the other must hold the same key"
        } else {
            "if that swarm is private, join it with its --swarm-key"
        };
        match tokio::time::timeout(timeout, self.call(|reply| Command::Dial { addr, reply })).await {
            Ok(r) => r?.with_context(|| format!("cannot connect to {shown} ({hint})")),
            Err(_) => Err(anyhow!(
                "no answer from {shown} within {timeout:?}: is a shoal node running there, and is the address right? ({hint})"
            )),
        }
    }

    /// Sends a request and waits for its response.
    pub async fn request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
    ) -> anyhow::Result<Response> {
        if let Some(shaping) = self.shaping {
            tokio::time::sleep(shaping.delay(&request)).await;
        }
        self.call(|reply| Command::Request {
            peer,
            addrs,
            request,
            reply,
        })
        .await?
    }

    /// Sends a one-way message (a step, an output, a failure report) on the data plane:
    /// the stream to `peer`, opened on first use (dialling `addrs` if need be) and kept.
    /// Returns once the frame is written; nothing is answered. A broken stream is
    /// reopened once.
    pub async fn send(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        message: Request,
    ) -> anyhow::Result<()> {
        if let Some(shaping) = self.shaping {
            tokio::time::sleep(shaping.delay(&message)).await;
        }
        self.send_raw(peer, addrs, protocol::encode_frame(&message)?)
            .await
    }

    /// Writes `frame` as it is to the data stream to `peer`: [`Network::send`] without
    /// the encoding, for tools and tests that probe how a peer takes malformed input.
    pub async fn send_raw(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        frame: Vec<u8>,
    ) -> anyhow::Result<()> {
        let slot = {
            let mut open = self.data.open.lock().unwrap_or_else(|p| p.into_inner());
            open.entry(peer).or_default().clone()
        };
        let mut stream = slot.lock().await;
        let mut last_error = None;
        for _ in 0..2 {
            if stream.is_none() {
                match self.open_data_stream(peer, &addrs).await {
                    Ok(s) => *stream = Some(s),
                    Err(e) => {
                        last_error = Some(e);
                        continue;
                    }
                }
            }
            let Some(s) = stream.as_mut() else { continue };
            let write = async {
                s.write_all(&frame).await?;
                s.flush().await
            };
            match tokio::time::timeout(DATA_TIMEOUT, write).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last_error = Some(anyhow!("writing to {peer}: {e}")),
                Err(_) => last_error = Some(anyhow!("writing to {peer}: timed out")),
            }
            *stream = None;
        }
        // No stream could be opened: the slot goes, or every failed send to peers that
        // left (a server reporting to a client that is gone) would leave one behind.
        drop(stream);
        let mut open = self.data.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.get(&peer).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            open.remove(&peer);
        }
        Err(last_error.unwrap_or_else(|| anyhow!("no data stream to {peer}")))
    }

    async fn open_data_stream(
        &self,
        peer: PeerId,
        addrs: &[Multiaddr],
    ) -> anyhow::Result<libp2p::Stream> {
        if !addrs.is_empty() {
            let addrs = addrs.to_vec();
            self.call(|reply| Command::AddAddresses { peer, addrs, reply })
                .await?;
        }
        let mut control = self
            .data
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let open = control.open_stream(peer, StreamProtocol::new(protocol::DATA_PROTOCOL));
        match tokio::time::timeout(OPEN_DATA_TIMEOUT, open).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(anyhow!("cannot open a data stream to {peer}: {e}")),
            Err(_) => Err(anyhow!("cannot open a data stream to {peer}: timed out")),
        }
    }

    /// Hands every inbound data-plane message (steps, outputs, failure reports) to
    /// `sink`, called on the task that read it, instead of the inbound queue: one task
    /// hop less per hop of a step. The sink must not block.
    pub fn on_data(&self, sink: DataSink) {
        *self.data.sink.write().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// Answers an inbound request (nothing to do for a one-way message).
    pub async fn respond(&self, channel: Option<ResponseChannel<Response>>, response: Response) {
        if let Some(channel) = channel {
            let _ = self.cmd.send(Command::Respond { channel, response }).await;
        }
    }

    /// Puts (or refreshes) this server's announcement in the DHT.
    pub async fn announce(&self, announcement: Announcement) -> anyhow::Result<()> {
        self.cmd
            .send(Command::Announce {
                announcement,
                stored: None,
            })
            .await
            .map_err(|_| anyhow!("network event loop has stopped"))
    }

    /// [`Network::announce`], returning once the records have reached the peers that
    /// keep them (or failed to): for a last announcement before the process exits.
    pub async fn announce_and_wait(&self, announcement: Announcement) -> anyhow::Result<()> {
        self.call(|reply| Command::Announce {
            announcement,
            stored: Some(reply),
        })
        .await
    }

    /// Finds the servers of a model: their announcements from the DHT, unexpired.
    pub async fn find_servers(&self, model_id: &str) -> anyhow::Result<Vec<Announcement>> {
        self.lookup_servers(model_id, PROVIDER_SETTLE).await
    }

    /// [`Network::find_servers`], waiting longer for more of the DHT to answer: for a
    /// retry after a quick lookup found too little.
    pub async fn find_servers_patiently(
        &self,
        model_id: &str,
    ) -> anyhow::Result<Vec<Announcement>> {
        self.lookup_servers(model_id, PATIENT_SETTLE).await
    }

    async fn lookup_servers(
        &self,
        model_id: &str,
        settle: Duration,
    ) -> anyhow::Result<Vec<Announcement>> {
        let model_id = model_id.to_string();
        self.call(|reply| Command::FindServers {
            model_id,
            settle,
            reply,
        })
        .await
    }

    /// Every server of every model the DHT knows (ask each for details with
    /// [`protocol::Request::Info`]).
    pub async fn find_all_servers(&self) -> anyhow::Result<Vec<PeerId>> {
        self.call(|reply| Command::FindAllServers { reply }).await
    }

    /// One server's current announcement from the DHT, whatever its model.
    pub async fn server_record(&self, peer: PeerId) -> anyhow::Result<Option<Announcement>> {
        let lookup = self.call(|reply| Command::ServerRecord { peer, reply });
        Ok(tokio::time::timeout(QUERY_TIMEOUT, lookup)
            .await
            .ok()
            .transpose()?
            .flatten())
    }

    /// Addresses this node listens on, as `.../p2p/<peer id>`.
    pub async fn listen_addrs(&self) -> anyhow::Result<Vec<Multiaddr>> {
        self.call(|reply| Command::ListenAddrs { reply }).await
    }

    /// Peers whose last connection closes, from now on.
    pub fn disconnects(&self) -> tokio::sync::broadcast::Receiver<PeerId> {
        self.disconnects.subscribe()
    }

    /// DHT servers whose last connection closes, from now on: peers that may have held
    /// this node's records.
    pub fn dht_departures(&self) -> tokio::sync::broadcast::Receiver<PeerId> {
        self.dht_departures.subscribe()
    }

    /// The DHT servers in this node's routing table, with their known addresses: whom
    /// to ask directly when lookups come back short.
    pub async fn dht_peers(&self) -> anyhow::Result<Vec<(PeerId, Vec<Multiaddr>)>> {
        self.call(|reply| Command::DhtPeers { reply }).await
    }

    /// Nodes found on the LAN by mDNS (only with [`NetConfig::mdns`]), with addresses.
    pub async fn lan_peers(&self) -> anyhow::Result<Vec<(PeerId, Vec<Multiaddr>)>> {
        self.call(|reply| Command::LanPeers { reply }).await
    }

    /// The current presence of `peer` (`None` when not connected): state kept for a
    /// peer records the presence it was made in, and is stale once this differs.
    pub fn presence(&self, peer: &PeerId) -> Option<Presence> {
        self.presences
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .copied()
    }

    /// Closes every connection, waiting at most `timeout`: a process about to exit
    /// says goodbye, so its peers free what they keep for it at once instead of when
    /// QUIC's idle timeout (10 s) ends the connection.
    pub async fn close_all(&self, timeout: Duration) {
        let closed = self.call(|reply| Command::CloseAll { reply });
        if let Ok(Ok(())) = tokio::time::timeout(timeout, closed).await {
            // The last connection is closed here; its farewell packet goes out on the
            // transport's next turn.
            tokio::time::sleep(CLOSE_FLUSH).await;
        }
    }

    /// Latest measured round-trip time to each connected peer (over its direct
    /// connection where it has one).
    pub async fn rtts(&self) -> anyhow::Result<HashMap<PeerId, Duration>> {
        self.call(|reply| Command::Rtts { reply }).await
    }

    /// How each connected peer is reached: directly, by hole punching, or through a
    /// relay.
    pub async fn links(&self) -> anyhow::Result<HashMap<PeerId, Link>> {
        self.call(|reply| Command::Links { reply }).await
    }

    /// This node's reachability, as it knows it now.
    pub fn status(&self) -> NetStatus {
        self.status.borrow().clone()
    }

    /// [`Network::listen_addrs`] without waiting for the event loop (relayed addresses
    /// included).
    pub fn listen_addrs_now(&self) -> Vec<Multiaddr> {
        self.status.borrow().addrs.clone()
    }

    /// Watches [`Network::status`] for changes.
    pub fn status_changes(&self) -> watch::Receiver<NetStatus> {
        self.status.clone()
    }
}

/// A running "find servers" lookup: providers first, then one record per provider.
struct Lookup {
    model_id: String,
    /// How long to wait for more providers after the first ones arrive.
    settle: Duration,
    providers: HashSet<PeerId>,
    records_pending: usize,
    found: Vec<Announcement>,
    reply: Option<oneshot::Sender<Vec<Announcement>>>,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    cmd_rx: mpsc::Receiver<Command>,
    inbound_tx: mpsc::Sender<Inbound>,
    listen_addrs: Vec<Multiaddr>,
    pending_dials: HashMap<ConnectionId, oneshot::Sender<anyhow::Result<PeerId>>>,
    pending_requests: HashMap<OutboundRequestId, oneshot::Sender<anyhow::Result<Response>>>,
    provider_queries: HashMap<QueryId, u64>,
    record_queries: HashMap<QueryId, (u64, PeerId)>,
    lookups: HashMap<u64, Lookup>,
    next_lookup: u64,
    /// Latest round trip to each connected peer; goes when its presence ends.
    rtts: HashMap<PeerId, Duration>,
    disconnects: tokio::sync::broadcast::Sender<PeerId>,
    dht_departures: tokio::sync::broadcast::Sender<PeerId>,
    /// Connected peers that identified as DHT servers.
    dht_peers: HashSet<PeerId>,
    all_server_queries: HashMap<QueryId, ProviderQuery>,
    /// Announcements whose storing someone waits for: the put queries left, and whom
    /// to tell when none is left.
    put_waits: Vec<(HashSet<QueryId>, oneshot::Sender<()>)>,
    /// Lookups of one server's announcement under [`server_key`].
    server_record_queries: HashMap<QueryId, (PeerId, oneshot::Sender<Option<Announcement>>)>,
    /// Queries to finish at a given time (see [`PROVIDER_SETTLE`]).
    finish_soon: Vec<(Instant, QueryId)>,
    /// Garbage received per peer (see [`BAN_AFTER_STRIKES`]) and when the last came.
    /// A strike disconnects the peer, so strikes outlive connections: they are
    /// forgotten [`STRIKE_MEMORY`] after the last one, or at the ban.
    strikes: HashMap<PeerId, (u32, Instant)>,
    /// Shared with [`Network::presence`]: an entry from a peer's first connection until
    /// its presence ends (see `EventLoop::presence_ended`).
    presences: Presences,
    /// The number of the next presence to begin.
    next_presence: u64,
    /// The data plane's outbound streams: the stream to a peer ends with its presence.
    data: Arc<DataStreams>,
    /// Callers of [`Network::close_all`] waiting for the last connection to close.
    close_waits: Vec<oneshot::Sender<()>>,
    /// Nodes found on the LAN by mDNS, with their addresses; an address goes when mDNS
    /// says it expired (the node stopped answering for its TTL).
    lan: HashMap<PeerId, Vec<Multiaddr>>,
    /// Request budget per peer: tokens left and when they were counted. A full budget
    /// is as good as none, so an entry goes once its peer has left and it has refilled:
    /// at the last connection's close if it has by then, else at a later departure's
    /// sweep (past [`BUDGET_SWEEP_AT`] entries) or past [`MAX_TRACKED_PEERS`] entries.
    /// A peer that reconnects at once keeps what it had spent.
    budgets: HashMap<PeerId, (f64, Instant)>,
    /// To schedule commands to itself (an unban) without keeping the loop alive.
    to_self: mpsc::WeakSender<Command>,
    /// Open connections per peer; a peer's entry goes with its last connection.
    conns: HashMap<PeerId, Vec<Conn>>,
    /// Connected peers that offer circuit relay v2 (they said so through identify);
    /// a peer goes when its presence ends.
    relay_capable: HashSet<PeerId>,
    /// Relays asked for a slot or holding one, with the listener of that slot.
    reservations: HashMap<PeerId, ListenerId>,
    /// When a relay last refused or lost a slot.
    relay_failures: HashMap<PeerId, Instant>,
    /// Peers reached directly by hole punching; a peer goes when its presence ends.
    punched: HashSet<PeerId>,
    /// What AutoNAT found.
    nat: autonat::NatStatus,
    /// Configured to keep DHT records (a server or relay).
    dht_server: bool,
    /// Relays for others whenever AutoNAT finds it public (a server, unless
    /// `--no-relay`); a dedicated relay always does.
    relay_when_public: bool,
    status_tx: watch::Sender<NetStatus>,
}

/// One open connection.
struct Conn {
    id: ConnectionId,
    /// The relay it runs through; `None` for a direct connection.
    relay: Option<PeerId>,
    /// The peer's address on it.
    remote: Multiaddr,
    /// This node dialled it (the peer is reachable at `remote`).
    dialer: bool,
    /// When it was established.
    since: Instant,
    /// The tag of the peer's process, once identify has told it.
    instance: Option<u64>,
}

/// The relay a `/p2p/<relay>/p2p-circuit` address goes through.
fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut last = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => last = Some(id),
            Protocol::P2pCircuit => return last,
            _ => {}
        }
    }
    None
}

/// `addr` ending in `/p2p/<peer>` (relayed listen addresses already do).
fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    without_peer(addr).with(Protocol::P2p(peer))
}

/// `addr` without a trailing `/p2p/<peer>`.
fn without_peer(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// Providers found so far, and where the answer goes.
type ProviderQuery = (HashSet<PeerId>, Option<oneshot::Sender<Vec<PeerId>>>);

impl EventLoop {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                biased;
                _ = tick.tick(), if !self.finish_soon.is_empty() => {
                    let now = Instant::now();
                    let due: Vec<QueryId> = self.finish_soon.iter().filter(|(t, _)| *t <= now).map(|(_, q)| *q).collect();
                    self.finish_soon.retain(|(t, _)| *t > now);
                    for q in due {
                        if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&q) {
                            query.finish();
                        }
                    }
                }
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    // Every handle is gone: the program is done with the network.
                    None => return,
                },
                event = self.swarm.select_next_some() => self.on_event(event).await,
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { addr, reply } => {
                let peer = addr.iter().find_map(|p| match p {
                    Protocol::P2p(id) => Some(id),
                    _ => None,
                });
                let opts = match peer {
                    Some(p) => DialOpts::peer_id(p).addresses(vec![addr.clone()]).build(),
                    None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
                };
                let id = opts.connection_id();
                if let Some(p) = peer {
                    if self.swarm.is_connected(&p) {
                        let _ = reply.send(Ok(p));
                        return;
                    }
                }
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dials.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(anyhow!("cannot dial {addr}: {e}")));
                    }
                }
            }
            Command::Request {
                peer,
                addrs,
                request,
                reply,
            } => {
                self.dial_beside(peer, &addrs);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .rr
                    .send_request_with_addresses(&peer, request, addrs);
                self.pending_requests.insert(id, reply);
            }
            Command::AddAddresses { peer, addrs, reply } => {
                self.dial_beside(peer, &addrs);
                for a in addrs {
                    self.swarm.add_peer_address(peer, a);
                }
                let _ = reply.send(());
            }
            Command::Misbehaved { peer, reason } => {
                let now = Instant::now();
                if self.strikes.len() > MAX_TRACKED_PEERS {
                    self.strikes
                        .retain(|_, (_, last)| now.duration_since(*last) < STRIKE_MEMORY);
                }
                let (strikes, last) = self.strikes.entry(peer).or_insert((0, now));
                if now.duration_since(*last) >= STRIKE_MEMORY {
                    *strikes = 0;
                }
                *strikes += 1;
                *last = now;
                let strikes = *strikes;
                let _ = self.swarm.disconnect_peer_id(peer);
                if strikes >= BAN_AFTER_STRIKES {
                    tracing::warn!(%peer, "banned for {BAN_FOR:?} after {strikes} strikes; the last: {reason}");
                    self.swarm.behaviour_mut().blocked.block_peer(peer);
                    self.strikes.remove(&peer);
                    let to_self = self.to_self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(BAN_FOR).await;
                        if let Some(cmd) = to_self.upgrade() {
                            let _ = cmd.send(Command::Unban { peer }).await;
                        }
                    });
                } else {
                    tracing::warn!(%peer, "disconnected (strike {strikes} of {BAN_AFTER_STRIKES}): {reason}");
                }
            }
            Command::Unban { peer } => {
                self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            }
            Command::LanPeers { reply } => {
                let _ = reply.send(self.lan.iter().map(|(p, a)| (*p, a.clone())).collect());
            }
            Command::Links { reply } => {
                let links = self
                    .conns
                    .keys()
                    .filter_map(|p| Some((*p, self.link_of(p)?)))
                    .collect();
                let _ = reply.send(links);
            }
            Command::ServerRecord { peer, reply } => {
                let qid = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_record(server_key(&peer.to_string()));
                self.server_record_queries.insert(qid, (peer, reply));
            }
            Command::CloseRelayed { peer } => {
                let Some(conns) = self.conns.get(&peer) else {
                    return;
                };
                if conns.iter().any(|c| c.relay.is_none()) {
                    let relayed: Vec<ConnectionId> = conns
                        .iter()
                        .filter(|c| c.relay.is_some())
                        .map(|c| c.id)
                        .collect();
                    for id in relayed {
                        self.swarm.close_connection(id);
                    }
                }
            }
            Command::CloseAll { reply } => {
                let peers: Vec<PeerId> = self.conns.keys().copied().collect();
                for peer in peers {
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
                if self.conns.is_empty() {
                    let _ = reply.send(());
                } else {
                    self.close_waits.push(reply);
                }
            }
            Command::Respond { channel, response } => {
                // Fails only if the requester has gone; nothing to do then.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .rr
                    .send_response(channel, response);
            }
            Command::Announce {
                announcement,
                stored,
            } => {
                let mut puts = Vec::new();
                let kad = &mut self.swarm.behaviour_mut().kad;
                let Ok(value) = protocol::encode(&announcement) else {
                    tracing::error!("announcement does not encode");
                    return;
                };
                // Stored locally first; the query spreads it to the closest peers, and a
                // quorum failure on a tiny swarm is harmless.
                for key in [
                    announcement_key(&announcement.model_id, &announcement.peer_id),
                    server_key(&announcement.peer_id),
                ] {
                    let record = Record {
                        key,
                        value: value.clone(),
                        publisher: None,
                        expires: Some(Instant::now() + ANNOUNCE_TTL),
                    };
                    // Whoever waits (a departing server) needs every copy replaced, not
                    // just one.
                    let quorum = if stored.is_some() {
                        Quorum::All
                    } else {
                        Quorum::One
                    };
                    match kad.put_record(record, quorum) {
                        Ok(q) => puts.push(q),
                        Err(e) => tracing::warn!("cannot store announcement: {e}"),
                    }
                }
                for key in [provider_key(&announcement.model_id), all_servers_key()] {
                    if let Err(e) = kad.start_providing(key) {
                        tracing::warn!("cannot provide a key: {e}");
                    }
                }
                if let Some(reply) = stored {
                    if puts.is_empty() {
                        let _ = reply.send(());
                    } else {
                        self.put_waits.push((puts.into_iter().collect(), reply));
                    }
                }
            }
            Command::FindServers {
                model_id,
                settle,
                reply,
            } => {
                let lookup = self.next_lookup;
                self.next_lookup += 1;
                let qid = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(provider_key(&model_id));
                self.provider_queries.insert(qid, lookup);
                self.lookups.insert(
                    lookup,
                    Lookup {
                        model_id,
                        settle,
                        providers: HashSet::new(),
                        records_pending: 0,
                        found: Vec::new(),
                        reply: Some(reply),
                    },
                );
            }
            Command::FindAllServers { reply } => {
                let qid = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(all_servers_key());
                self.all_server_queries
                    .insert(qid, (HashSet::new(), Some(reply)));
            }
            Command::ListenAddrs { reply } => {
                let me = self.swarm.local_peer_id().to_owned();
                let addrs = self.listen_addrs.iter().map(|a| with_peer(a, me)).collect();
                let _ = reply.send(addrs);
            }
            Command::Rtts { reply } => {
                let _ = reply.send(self.rtts.clone());
            }
            Command::DhtPeers { reply } => {
                let mut peers = Vec::new();
                for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
                    for entry in bucket.iter() {
                        let addrs = entry.node.value.iter().cloned().collect();
                        peers.push((*entry.node.key.preimage(), addrs));
                    }
                }
                let _ = reply.send(peers);
            }
        }
    }

    async fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::debug!(%address, "listening");
                if let Some(relay) = relay_of(&address) {
                    tracing::info!(%relay, "reachable through a relay at {address}");
                }
                self.listen_addrs.push(address);
                self.publish_status();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                self.publish_status();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                addresses,
                ..
            } => {
                self.listen_addrs.retain(|a| !addresses.contains(a));
                let lost = self
                    .reservations
                    .iter()
                    .find(|(_, l)| **l == listener_id)
                    .map(|(p, _)| *p);
                if let Some(relay) = lost {
                    let why = match &reason {
                        Ok(()) => "closed".to_string(),
                        Err(e) => e.to_string(),
                    };
                    tracing::info!(%relay, "lost the relay slot ({why}); looking for another");
                    self.reservations.remove(&relay);
                    self.relay_failures.insert(relay, Instant::now());
                    self.reserve_relays();
                }
                self.publish_status();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let (remote, dialer) = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address.clone(), true),
                    ConnectedPoint::Listener { send_back_addr, .. } => {
                        (send_back_addr.clone(), false)
                    }
                };
                let relay = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => relay_of(address),
                    ConnectedPoint::Listener { local_addr, .. } => relay_of(local_addr),
                };
                self.conns.entry(peer_id).or_default().push(Conn {
                    id: connection_id,
                    relay,
                    remote,
                    dialer,
                    since: Instant::now(),
                    instance: None,
                });
                self.begin_presence(peer_id, false);
                if let Some(relay) = relay {
                    tracing::info!(peer = %peer_id, %relay, "connected through a relay");
                    if !dialer {
                        self.drop_stale_relayed(peer_id, connection_id, relay);
                    }
                } else if self
                    .conns
                    .get(&peer_id)
                    .is_some_and(|cs| cs.iter().any(|c| c.relay.is_some()))
                {
                    // A direct connection to a peer reached so far only through a relay:
                    // the other side's hole punch (DCUtR reports it on one side only).
                    tracing::info!(peer = %peer_id, "direct connection by hole punching");
                    self.punched.insert(peer_id);
                    self.rtts.remove(&peer_id);
                }
                if dialer && relay.is_none() && self.relay_capable.contains(&peer_id) {
                    self.reserve_relays();
                }
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    // A dialled bootstrap node: it is a DHT server, so teach Kademlia
                    // where it is and ask it about the rest of the swarm.
                    let addr = endpoint.get_remote_address().clone();
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    kad.add_address(&peer_id, addr);
                    let _ = kad.bootstrap();
                    let _ = reply.send(Ok(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                if let Some(conns) = self.conns.get_mut(&peer_id) {
                    conns.retain(|c| c.id != connection_id);
                }
                if num_established > 0 {
                    return;
                }
                // The peer has gone: everything kept for it goes too.
                self.conns.remove(&peer_id);
                let now = Instant::now();
                if self.budgets.get(&peer_id).is_some_and(|b| refilled(b, now)) {
                    self.budgets.remove(&peer_id);
                }
                if self.budgets.len() > BUDGET_SWEEP_AT {
                    // Those that left just after a request are full again by now.
                    self.budgets.retain(|_, b| !refilled(b, now));
                }
                self.presence_ended(peer_id);
                if self.conns.is_empty() {
                    for reply in self.close_waits.drain(..) {
                        let _ = reply.send(());
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(anyhow!("connection failed: {error}")));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                connection_id,
                info,
            })) => {
                self.on_identified(peer_id, connection_id, instance_of(&info.agent_version));
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME)
                    && self.relay_capable.insert(peer_id)
                {
                    self.reserve_relays();
                }
                let kad_proto = StreamProtocol::new("/shoal/kad/1.0.0");
                if info.protocols.contains(&kad_proto) {
                    self.dht_peers.insert(peer_id);
                    for addr in info.listen_addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                } else if self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .remove_peer(&peer_id)
                    .is_some()
                {
                    // No longer a DHT server (a server that found itself behind a NAT
                    // switches to client mode and says so): out of the routing table,
                    // or lookups keep handing its undialable addresses to everyone.
                    // Records it kept are out of reach now, as if it had left.
                    tracing::debug!(peer = %peer_id, "left the DHT's routing table");
                    if self.dht_peers.remove(&peer_id) {
                        let _ = self.dht_departures.send(peer_id);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Ok(rtt),
            })) => {
                // Where a direct connection stands beside a relayed one, only the direct
                // one's round trip counts: one slow relay measurement must not keep a
                // hole-punched peer looking far away.
                let conns = self.conns.get(&peer);
                let relayed = conns
                    .and_then(|cs| cs.iter().find(|c| c.id == connection))
                    .is_some_and(|c| c.relay.is_some());
                let has_direct = conns.is_some_and(|cs| cs.iter().any(|c| c.relay.is_none()));
                if !(relayed && has_direct) {
                    self.rtts.insert(peer, rtt);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                new,
                ..
            })) => {
                match &new {
                    autonat::NatStatus::Public(addr) => {
                        tracing::info!("reachable from outside at {addr}");
                        // Relay slots are for nodes that cannot be dialled.
                        for (_, listener) in self.reservations.drain() {
                            self.swarm.remove_listener(listener);
                        }
                    }
                    autonat::NatStatus::Private => {
                        tracing::info!("not reachable from outside (behind a NAT or firewall); asking relays for a slot");
                    }
                    autonat::NatStatus::Unknown => {}
                }
                // A node others cannot dial must not be in their DHT routing tables:
                // every lookup that picked it would wait for a dial that cannot work.
                // It keeps using the DHT as a client; its records live on public nodes.
                if self.relay_when_public {
                    let offer = if new.is_public() {
                        relay::Status::Enable
                    } else {
                        relay::Status::Disable
                    };
                    if let Some(r) = self.swarm.behaviour_mut().relay.as_mut() {
                        r.inner_mut().set_status(Some(offer));
                    }
                }
                if self.dht_server {
                    let mode = match &new {
                        autonat::NatStatus::Private => Some(Mode::Client),
                        autonat::NatStatus::Public(_) => Some(Mode::Server),
                        autonat::NatStatus::Unknown => None,
                    };
                    if let Some(mode) = mode {
                        self.swarm.behaviour_mut().kad.set_mode(Some(mode));
                    }
                }
                self.nat = new;
                self.reserve_relays();
                self.publish_status();
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal: false,
                    ..
                },
            )) => {
                tracing::info!(relay = %relay_peer_id, "holding a slot on a relay");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(
                relay::Event::ReservationReqAccepted {
                    src_peer_id,
                    renewed: false,
                },
            )) => {
                tracing::info!(peer = %src_peer_id, "relaying for a node behind a NAT");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => {
                    if self.punched.insert(remote_peer_id) {
                        tracing::info!(peer = %remote_peer_id, "direct connection by hole punching");
                    }
                    // Measured through the relay: forget it, the next ping is direct.
                    self.rtts.remove(&remote_peer_id);
                    let to_self = self.to_self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(RELAYED_GRACE).await;
                        if let Some(cmd) = to_self.upgrade() {
                            let _ = cmd
                                .send(Command::CloseRelayed {
                                    peer: remote_peer_id,
                                })
                                .await;
                        }
                    });
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, "hole punching failed ({e}); staying relayed");
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Rr(event)) => self.on_rr(event).await,
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                // A node on the LAN: into the DHT's routing table, and a connection so
                // identify tells whether it is a DHT server.
                for (peer, addr) in found {
                    tracing::debug!(%peer, %addr, "found on the LAN");
                    let known = self.lan.entry(peer).or_default();
                    if !known.contains(&addr) {
                        known.push(addr.clone());
                    }
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                for (peer, addr) in gone {
                    if let Some(known) = self.lan.get_mut(&peer) {
                        known.retain(|a| *a != addr);
                        if known.is_empty() {
                            self.lan.remove(&peer);
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad(event),
            _ => {}
        }
    }

    /// Begins a presence of `peer`: at its first connection, or (`anew`) when it came
    /// back as a new process.
    fn begin_presence(&mut self, peer: PeerId, anew: bool) {
        let mut presences = self.presences.write().unwrap_or_else(|p| p.into_inner());
        if anew || !presences.contains_key(&peer) {
            presences.insert(peer, Presence(self.next_presence));
            self.next_presence += 1;
        }
    }

    /// Ends the current presence of `peer` (see [`Presence`]): the data stream to it,
    /// its round trip and its relay and hole-punch flags go (a process that comes back
    /// is measured and identified afresh), and whoever keeps state for it hears (servers drop its sessions, clients
    /// fail over from it, a departed DHT server's records are put again elsewhere).
    fn presence_ended(&mut self, peer: PeerId) {
        self.presences
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer);
        self.data.forget(&peer);
        self.rtts.remove(&peer);
        self.punched.remove(&peer);
        self.relay_capable.remove(&peer);
        let _ = self.disconnects.send(peer);
        if self.dht_peers.remove(&peer) {
            let _ = self.dht_departures.send(peer);
        }
    }

    /// Identify told which process of `peer` is on `connection`. If its other
    /// connections belong to another process, that process has gone and the peer came
    /// back under the same peer id (a client run again with its `--identity`, a server
    /// restarted with its own): the old connections are closed at once (QUIC would hold
    /// them for its 10 s idle timeout, and frames written to streams on them vanish:
    /// a server's output went to the dead process and its new one waited a minute for
    /// it), and the old presence ends, with all that was kept for it.
    fn on_identified(&mut self, peer: PeerId, connection: ConnectionId, instance: Option<u64>) {
        let Some(instance) = instance else { return };
        let Some(conns) = self.conns.get_mut(&peer) else {
            return;
        };
        let mut stale = Vec::new();
        for c in conns.iter_mut() {
            if c.id == connection {
                c.instance = Some(instance);
            } else if c.instance.is_some_and(|i| i != instance) {
                stale.push(c.id);
            }
        }
        if stale.is_empty() {
            return;
        }
        tracing::info!(
            %peer,
            "came back as a new process: closing {} connection(s) of its previous one",
            stale.len()
        );
        conns.retain(|c| !stale.contains(&c.id));
        for id in stale {
            self.swarm.close_connection(id);
        }
        self.presence_ended(peer);
        self.begin_presence(peer, true);
    }

    /// Dials `peer` at `addrs` unless connected to it, even while another dial to it is
    /// under way. Request-response and stream dials give way to a dial in flight, and
    /// one may be Kademlia's, to addresses a lookup was told about (a NAT'd server's
    /// private ones, which time out after seconds); the request then failed with that
    /// dial although `addrs` (a relayed address from its announcement) would work.
    fn dial_beside(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        if addrs.is_empty() || self.swarm.is_connected(&peer) {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::Disconnected)
            .addresses(addrs.to_vec())
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, "cannot dial: {e}");
        }
    }

    /// `peer` has just dialled this node afresh through `relay`: it does so only when it
    /// holds no connection to this node (no dial of ours or libp2p's makes a second
    /// relayed connection to a connected peer), so the connections this node still
    /// holds with it through other relays, established well before, are dead, their
    /// relay gone, and this end has not noticed yet (QUIC's idle timeout takes 10 s or
    /// more). Closed now: frames written to streams on them would vanish without an
    /// error (a server's output to its client once did, and the client waited a minute
    /// for it). Recent ones stay: two dials that raced may each have taken a relay.
    fn drop_stale_relayed(&mut self, peer: PeerId, fresh: ConnectionId, relay: PeerId) {
        let Some(conns) = self.conns.get(&peer) else {
            return;
        };
        let stale: Vec<(ConnectionId, PeerId)> = conns
            .iter()
            .filter(|c| c.id != fresh && c.since.elapsed() > STALE_RELAYED_AGE)
            .filter_map(|c| Some((c.id, c.relay?)))
            .filter(|(_, r)| *r != relay)
            .collect();
        for (id, old) in stale {
            tracing::info!(
                %peer,
                relay = %old,
                "closing the connection through a relay the peer no longer uses"
            );
            self.swarm.close_connection(id);
        }
    }

    /// How `peer` is reached now; `None` if not connected.
    fn link_of(&self, peer: &PeerId) -> Option<Link> {
        let conns = self.conns.get(peer)?;
        if conns.iter().any(|c| c.relay.is_none()) {
            Some(if self.punched.contains(peer) {
                Link::HolePunched
            } else {
                Link::Direct
            })
        } else {
            conns.iter().find_map(|c| c.relay).map(Link::Relayed)
        }
    }

    /// Updates what [`Network::status`] says.
    fn publish_status(&mut self) {
        let relays: Vec<PeerId> = self.listen_addrs.iter().filter_map(relay_of).collect();
        let reachability = match &self.nat {
            autonat::NatStatus::Public(_) => Reachability::Public,
            _ if !relays.is_empty() => Reachability::Relayed,
            autonat::NatStatus::Private => Reachability::Private,
            autonat::NatStatus::Unknown => Reachability::Unknown,
        };
        let me = *self.swarm.local_peer_id();
        let addrs = self.listen_addrs.iter().map(|a| with_peer(a, me)).collect();
        let status = NetStatus {
            reachability,
            relays,
            addrs,
        };
        self.status_tx.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
    }

    /// Behind a NAT, asks relays for slots until [`WANT_RELAYS`] are held or asked:
    /// peers offering circuit relay that this node dialled directly (so others can
    /// too), the closest first.
    fn reserve_relays(&mut self) {
        if !matches!(self.nat, autonat::NatStatus::Private)
            || self.reservations.len() >= WANT_RELAYS
        {
            return;
        }
        let me = *self.swarm.local_peer_id();
        let mut candidates: Vec<(PeerId, Multiaddr)> = self
            .relay_capable
            .iter()
            .filter(|p| **p != me && !self.reservations.contains_key(p))
            .filter(|p| {
                self.relay_failures
                    .get(p)
                    .is_none_or(|t| t.elapsed() > RELAY_RETRY)
            })
            .filter_map(|p| {
                let c = self
                    .conns
                    .get(p)?
                    .iter()
                    .find(|c| c.relay.is_none() && c.dialer)?;
                Some((*p, without_peer(&c.remote)))
            })
            .collect();
        candidates.sort_by_key(|(p, _)| self.rtts.get(p).copied().unwrap_or(Duration::MAX));
        tracing::debug!(
            relays = self.relay_capable.len(),
            usable = candidates.len(),
            held = self.reservations.len(),
            "looking for relay slots"
        );
        for (relay, addr) in candidates {
            if self.reservations.len() >= WANT_RELAYS {
                break;
            }
            let circuit = addr.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    tracing::debug!(%relay, "asking for a relay slot at {circuit}");
                    self.reservations.insert(relay, listener);
                }
                Err(e) => {
                    tracing::debug!(%relay, "cannot ask for a relay slot: {e}");
                    self.relay_failures.insert(relay, Instant::now());
                }
            }
        }
    }

    /// Takes one request from `peer`'s budget; false if it has none left.
    fn within_budget(&mut self, peer: PeerId) -> bool {
        let now = Instant::now();
        if self.budgets.len() > MAX_TRACKED_PEERS {
            self.budgets.retain(|_, b| !refilled(b, now));
        }
        let (tokens, at) = self.budgets.entry(peer).or_insert((REQUEST_BURST, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * REQUESTS_PER_SECOND)
            .min(REQUEST_BURST);
        *at = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }

    async fn on_rr(&mut self, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    if !self.within_budget(peer) {
                        let busy = Response::Error(protocol::ErrorInfo::new(
                            protocol::ErrorKind::Busy,
                            format!(
                                "more than {REQUESTS_PER_SECOND} requests per second from {peer}"
                            ),
                        ));
                        let _ = self.swarm.behaviour_mut().rr.send_response(channel, busy);
                        return;
                    }
                    let inbound = Inbound {
                        peer,
                        request,
                        channel: Some(channel),
                    };
                    if self.inbound_tx.send(inbound).await.is_err() {
                        tracing::debug!("no one handles inbound requests any more");
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_requests.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(anyhow!("request to {peer} failed: {error}")));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => match error {
                request_response::InboundFailure::Io(e)
                    if e.kind() == std::io::ErrorKind::InvalidData =>
                {
                    self.on_command(Command::Misbehaved {
                        peer,
                        reason: format!("undecodable request: {e}"),
                    });
                }
                error => tracing::debug!(%peer, "inbound request failed: {error}"),
            },
            _ => {}
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        if let kad::Event::InboundRequest { request } = &event {
            tracing::trace!(?request, "DHT request");
        }
        let kad::Event::OutboundQueryProgressed {
            id, result, step, ..
        } = event
        else {
            return;
        };
        match result {
            QueryResult::GetProviders(res) if self.all_server_queries.contains_key(&id) => {
                let mut done = step.last;
                match res {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        tracing::debug!(
                            found = providers.len(),
                            last = step.last,
                            "servers of every model"
                        );
                        if let Some(q) = self.all_server_queries.get_mut(&id) {
                            q.0.extend(providers);
                        }
                    }
                    _ => done = true,
                }
                if done {
                    if let Some((found, Some(reply))) = self.all_server_queries.remove(&id) {
                        let _ = reply.send(found.into_iter().collect());
                    }
                }
            }
            QueryResult::GetProviders(res) => {
                let Some(&lookup) = self.provider_queries.get(&id) else {
                    return;
                };
                let mut done = step.last;
                match res {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        tracing::debug!(found = providers.len(), "providers");
                        let mut settle = PROVIDER_SETTLE;
                        if let Some(l) = self.lookups.get_mut(&lookup) {
                            l.providers.extend(providers);
                            settle = l.settle;
                        }
                        // Providers arrive from the first peers asked; a dead peer in
                        // the routing table would hold the query until its timeout. Give
                        // the others a moment, then finish.
                        self.finish_soon.push((Instant::now() + settle, id));
                    }
                    Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => done = true,
                    Err(e) => {
                        tracing::debug!("provider lookup ended: {e}");
                        done = true;
                    }
                }
                if done {
                    self.provider_queries.remove(&id);
                    self.fetch_records(lookup);
                }
            }
            QueryResult::PutRecord(_) if step.last => {
                for (left, _) in &mut self.put_waits {
                    left.remove(&id);
                }
                let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.put_waits)
                    .into_iter()
                    .partition(|(left, _)| left.is_empty());
                self.put_waits = waiting;
                for (_, reply) in done {
                    let _ = reply.send(());
                }
            }
            QueryResult::GetRecord(res) if self.server_record_queries.contains_key(&id) => {
                let found = match res {
                    Ok(kad::GetRecordOk::FoundRecord(found)) => Some(found.record.value),
                    _ => None,
                };
                if found.is_some() || step.last {
                    if let Some((peer, reply)) = self.server_record_queries.remove(&id) {
                        let a = found.and_then(|v| {
                            let a: Announcement = protocol::decode(&v).ok()?;
                            valid_announcement(&v, &a.model_id, peer)
                        });
                        let _ = reply.send(a);
                    }
                    if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                }
            }
            QueryResult::GetRecord(res) => {
                let Some(&(lookup, peer)) = self.record_queries.get(&id) else {
                    return;
                };
                let mut done = step.last;
                match res {
                    Ok(kad::GetRecordOk::FoundRecord(found)) => {
                        if let Some(l) = self.lookups.get_mut(&lookup) {
                            if let Some(a) =
                                valid_announcement(&found.record.value, &l.model_id, peer)
                            {
                                l.found.push(a);
                            }
                        }
                        // One fresh copy is enough.
                        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                            q.finish();
                        }
                    }
                    Ok(kad::GetRecordOk::FinishedWithNoAdditionalRecord { .. }) => done = true,
                    Err(e) => {
                        tracing::debug!(%peer, "no announcement: {e}");
                        done = true
                    }
                }
                if done {
                    self.record_queries.remove(&id);
                    if let Some(l) = self.lookups.get_mut(&lookup) {
                        l.records_pending = l.records_pending.saturating_sub(1);
                    }
                    self.finish_lookup_if_done(lookup);
                }
            }
            _ => {}
        }
    }

    fn fetch_records(&mut self, lookup: u64) {
        let Some(l) = self.lookups.get_mut(&lookup) else {
            return;
        };
        let providers: Vec<PeerId> = l.providers.iter().copied().collect();
        let model_id = l.model_id.clone();
        l.records_pending = providers.len();
        for p in providers {
            let qid = self
                .swarm
                .behaviour_mut()
                .kad
                .get_record(announcement_key(&model_id, &p.to_string()));
            self.record_queries.insert(qid, (lookup, p));
        }
        self.finish_lookup_if_done(lookup);
    }

    fn finish_lookup_if_done(&mut self, lookup: u64) {
        let done = self
            .lookups
            .get(&lookup)
            .is_some_and(|l| l.records_pending == 0);
        if done {
            if let Some(mut l) = self.lookups.remove(&lookup) {
                // Several copies of one server's record may arrive; keep the newest.
                l.found.sort_by(|a, b| {
                    a.peer_id
                        .cmp(&b.peer_id)
                        .then(b.expires_unix_ms.cmp(&a.expires_unix_ms))
                });
                l.found.dedup_by(|a, b| a.peer_id == b.peer_id);
                if let Some(reply) = l.reply.take() {
                    let _ = reply.send(l.found);
                }
            }
        }
    }
}

/// Whether a request budget (tokens left, when counted) is full again by `now`: such a
/// peer is as good as new, and its entry can go.
fn refilled(&(tokens, at): &(f64, Instant), now: Instant) -> bool {
    tokens + now.duration_since(at).as_secs_f64() * REQUESTS_PER_SECOND >= REQUEST_BURST
}

/// Decodes an announcement and checks it is current and names the peer it is filed under.
fn valid_announcement(bytes: &[u8], model_id: &str, peer: PeerId) -> Option<Announcement> {
    let a: Announcement = protocol::decode(bytes).ok()?;
    (a.model_id == model_id && a.peer_id == peer.to_string() && a.expires_unix_ms > unix_ms())
        .then_some(a)
}

impl Network {
    /// [`Network::respond`] for threads outside the async runtime (the compute thread).
    pub fn respond_blocking(&self, channel: Option<ResponseChannel<Response>>, response: Response) {
        if let Some(channel) = channel {
            let _ = self
                .cmd
                .blocking_send(Command::Respond { channel, response });
        }
    }
}

/// Accepts the data-plane streams other peers open to this node, and reads each in a
/// task of its own: frames go straight to the inbound queue, never through the event
/// loop. A frame that does not decode, or a message that does not belong on the data
/// plane, ends that stream (the sender reopens one if it is honest).
async fn accept_data_streams(
    mut incoming: libp2p_stream::IncomingStreams,
    inbound: mpsc::Sender<Inbound>,
    sink: Arc<std::sync::RwLock<Option<DataSink>>>,
    report: mpsc::WeakSender<Command>,
) {
    while let Some((peer, mut stream)) = incoming.next().await {
        let inbound = inbound.clone();
        let sink = sink.clone();
        let report = report.clone();
        tokio::spawn(async move {
            let misbehaved = |reason: String| async move {
                if let Some(cmd) = report.upgrade() {
                    let _ = cmd.send(Command::Misbehaved { peer, reason }).await;
                }
            };
            loop {
                let request: Request = match crate::codec::read_frame(&mut stream).await {
                    Ok(r) => r,
                    Err(e) => {
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            misbehaved(format!("undecodable frame on the data plane: {e}")).await;
                        } else if e.kind() != std::io::ErrorKind::UnexpectedEof {
                            tracing::debug!(%peer, "data stream closed: {e}");
                        }
                        return;
                    }
                };
                if !matches!(
                    request,
                    Request::Step(_) | Request::Output(_) | Request::Failed(_)
                ) {
                    misbehaved("a request-response message on the data plane".into()).await;
                    return;
                }
                let message = Inbound {
                    peer,
                    request,
                    channel: None,
                };
                let direct = sink.read().unwrap_or_else(|p| p.into_inner()).clone();
                let delivered = match direct {
                    Some(sink) => sink(message),
                    None => inbound.send(message).await.is_ok(),
                };
                if !delivered {
                    return;
                }
            }
        });
    }
}
