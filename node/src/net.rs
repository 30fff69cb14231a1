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
use libp2p::core::Transport as _;
use libp2p::kad::{
    self, store::MemoryStore, store::MemoryStoreConfig, Mode, QueryId, QueryResult, Quorum, Record,
    RecordKey,
};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, identify, identity, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId,
    StreamProtocol, Swarm,
};
use protocol::{Announcement, Request, Response};
use tokio::sync::{mpsc, oneshot};

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
}

/// A cloneable handle to the event loop.
#[derive(Clone)]
pub struct Network {
    cmd: mpsc::Sender<Command>,
    peer_id: PeerId,
    /// In a private swarm (TCP only).
    private: bool,
    shaping: Option<Shaping>,
    /// Peers whose last connection closed: a client watching its chain learns at once
    /// that a TCP peer died (QUIC peers that vanish are only noticed by timeouts).
    disconnects: tokio::sync::broadcast::Sender<PeerId>,
    /// The subset of those that were DHT servers (they may have held our records).
    dht_departures: tokio::sync::broadcast::Sender<PeerId>,
    data: Arc<DataStreams>,
}

/// The outbound half of the data plane: one stream per peer, opened on first use and
/// kept. Frames are written from the sending task itself, not through the event loop.
struct DataStreams {
    /// Where inbound data-plane messages go straight from the task reading their stream
    /// (see [`Network::on_data`]); the inbound queue when unset.
    sink: Arc<std::sync::RwLock<Option<DataSink>>>,
    /// Cloned for each stream opened: one shared control opens one stream at a time, and
    /// an open that hangs (a peer that died) must not hold up the others.
    control: std::sync::Mutex<libp2p_stream::Control>,
    open: std::sync::Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<Option<libp2p::Stream>>>>>,
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

/// Whether `addr` is a TCP address (the only kind a private swarm can use).
pub fn is_tcp(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::Tcp(_)))
        && !addr
            .iter()
            .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic | Protocol::Udp(_)))
}

/// The node's protocols: Kademlia, identify, ping, request-response, the data plane,
/// and mDNS when `lan` is set.
fn behaviour(key: &identity::Keypair, lan: bool) -> Behaviour {
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
    let identify =
        identify::Behaviour::new(identify::Config::new("/shoal/id/1".into(), key.public()));
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
    Behaviour {
        blocked: allow_block_list::Behaviour::default(),
        mdns: Toggle::from(mdns),
        kad,
        identify,
        ping: ping::Behaviour::new(ping::Config::new()),
        rr,
        stream: libp2p_stream::Behaviour::new(),
    }
}

/// Starts the swarm and its event loop; returns the handle and the inbound requests.
pub fn start(config: NetConfig) -> anyhow::Result<(Network, mpsc::Receiver<Inbound>)> {
    let keypair = config
        .identity
        .clone()
        .unwrap_or_else(identity::Keypair::generate_ed25519);
    let peer_id = keypair.public().to_peer_id();
    // V1Lazy: a request's first bytes go out with the protocol name instead of waiting
    // a round trip for the other side to confirm it (one per hop per token).
    let swarm_config = |c: libp2p::swarm::Config| {
        c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT)
            .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
    };
    let private = config.swarm_key.is_some();
    let lan = config.mdns;
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
            .with_behaviour(|key| behaviour(key, lan))
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
                .with_behaviour(|key| behaviour(key, lan))
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
        finish_soon: Vec::new(),
        strikes: HashMap::new(),
        lan: HashMap::new(),
        budgets: HashMap::new(),
        to_self: cmd_tx.downgrade(),
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
            data: Arc::new(DataStreams {
                sink,
                control: std::sync::Mutex::new(control),
                open: std::sync::Mutex::new(HashMap::new()),
            }),
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
            .send(Command::Announce { announcement })
            .await
            .map_err(|_| anyhow!("network event loop has stopped"))
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

    /// Latest measured round-trip time to each connected peer.
    pub async fn rtts(&self) -> anyhow::Result<HashMap<PeerId, Duration>> {
        self.call(|reply| Command::Rtts { reply }).await
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
    rtts: HashMap<PeerId, Duration>,
    disconnects: tokio::sync::broadcast::Sender<PeerId>,
    dht_departures: tokio::sync::broadcast::Sender<PeerId>,
    /// Connected peers that identified as DHT servers.
    dht_peers: HashSet<PeerId>,
    all_server_queries: HashMap<QueryId, ProviderQuery>,
    /// Queries to finish at a given time (see [`PROVIDER_SETTLE`]).
    finish_soon: Vec<(Instant, QueryId)>,
    /// Garbage received per peer (see [`BAN_AFTER_STRIKES`]).
    strikes: HashMap<PeerId, u32>,
    /// Nodes found on the LAN by mDNS and not expired, with their addresses.
    lan: HashMap<PeerId, Vec<Multiaddr>>,
    /// Request budget per peer: tokens left and when they were counted.
    budgets: HashMap<PeerId, (f64, Instant)>,
    /// To schedule commands to itself (an unban) without keeping the loop alive.
    to_self: mpsc::WeakSender<Command>,
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
                let id = self
                    .swarm
                    .behaviour_mut()
                    .rr
                    .send_request_with_addresses(&peer, request, addrs);
                self.pending_requests.insert(id, reply);
            }
            Command::AddAddresses { peer, addrs, reply } => {
                for a in addrs {
                    self.swarm.add_peer_address(peer, a);
                }
                let _ = reply.send(());
            }
            Command::Misbehaved { peer, reason } => {
                let strikes = self.strikes.entry(peer).or_default();
                *strikes += 1;
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
            Command::Respond { channel, response } => {
                // Fails only if the requester has gone; nothing to do then.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .rr
                    .send_response(channel, response);
            }
            Command::Announce { announcement } => {
                let kad = &mut self.swarm.behaviour_mut().kad;
                let Ok(value) = protocol::encode(&announcement) else {
                    tracing::error!("announcement does not encode");
                    return;
                };
                let record = Record {
                    key: announcement_key(&announcement.model_id, &announcement.peer_id),
                    value,
                    publisher: None,
                    expires: Some(Instant::now() + ANNOUNCE_TTL),
                };
                // Stored locally first; the query spreads it to the closest peers, and a
                // quorum failure on a tiny swarm is harmless.
                if let Err(e) = kad.put_record(record, Quorum::One) {
                    tracing::warn!("cannot store announcement: {e}");
                }
                for key in [provider_key(&announcement.model_id), all_servers_key()] {
                    if let Err(e) = kad.start_providing(key) {
                        tracing::warn!("cannot provide a key: {e}");
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
                let addrs = self
                    .listen_addrs
                    .iter()
                    .map(|a| a.clone().with(Protocol::P2p(me)))
                    .collect();
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
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
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
                num_established: 0,
                ..
            } => {
                let _ = self.disconnects.send(peer_id);
                if self.dht_peers.remove(&peer_id) {
                    let _ = self.dht_departures.send(peer_id);
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
                info,
                ..
            })) => {
                let kad_proto = StreamProtocol::new("/shoal/kad/1.0.0");
                if info.protocols.contains(&kad_proto) {
                    self.dht_peers.insert(peer_id);
                    for addr in info.listen_addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                self.rtts.insert(peer, rtt);
            }
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
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad(event),
            _ => {}
        }
    }

    /// Takes one request from `peer`'s budget; false if it has none left.
    fn within_budget(&mut self, peer: PeerId) -> bool {
        let now = Instant::now();
        if self.budgets.len() > 10_000 {
            // Forget peers whose budget has refilled: they are as good as new.
            self.budgets.retain(|_, (_, at)| {
                now.duration_since(*at).as_secs_f64() * REQUESTS_PER_SECOND < REQUEST_BURST
            });
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
                    Err(_) => done = true,
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
