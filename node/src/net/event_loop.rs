//! The task that owns the `Swarm`: its state, its main loop and the commands the
//! [`Network`](super::Network) handle sends it. Swarm events are handled in `events`,
//! the DHT in `dht`, NAT and relays in `nat`, presences and request budgets in `peers`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::kad::{QueryId, Quorum, Record};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::ConnectionId;
use libp2p::{autonat, Multiaddr, PeerId, Swarm};
use protocol::{Announcement, Response};
use tokio::sync::{mpsc, oneshot, watch};

use super::data::DataStreams;
use super::dht::all_servers_key;
use super::dht::announcement_key;
use super::dht::provider_key;
use super::dht::server_key;
use super::handle::Command;
use super::nat::with_peer;
use super::transport::Behaviour;
use super::Inbound;
use super::NetStatus;
use super::Presences;
use super::ANNOUNCE_TTL;
use super::BAN_AFTER_STRIKES;
use super::BAN_FOR;
use super::MAX_TRACKED_PEERS;
use super::STRIKE_MEMORY;

/// A running "find servers" lookup: providers first, then one record per provider.
pub(super) struct Lookup {
    pub(super) model_id: String,
    /// How long to wait for more providers after the first ones arrive.
    pub(super) settle: Duration,
    pub(super) providers: HashSet<PeerId>,
    pub(super) records_pending: usize,
    pub(super) found: Vec<Announcement>,
    pub(super) reply: Option<oneshot::Sender<Vec<Announcement>>>,
}

pub(super) struct EventLoop {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) cmd_rx: mpsc::Receiver<Command>,
    pub(super) inbound_tx: mpsc::Sender<Inbound>,
    pub(super) listen_addrs: Vec<Multiaddr>,
    pub(super) pending_dials: HashMap<ConnectionId, oneshot::Sender<anyhow::Result<PeerId>>>,
    pub(super) pending_requests:
        HashMap<OutboundRequestId, oneshot::Sender<anyhow::Result<Response>>>,
    pub(super) provider_queries: HashMap<QueryId, u64>,
    pub(super) record_queries: HashMap<QueryId, (u64, PeerId)>,
    pub(super) lookups: HashMap<u64, Lookup>,
    pub(super) next_lookup: u64,
    /// Latest round trip to each connected peer; goes when its presence ends.
    pub(super) rtts: HashMap<PeerId, Duration>,
    pub(super) disconnects: tokio::sync::broadcast::Sender<PeerId>,
    pub(super) dht_departures: tokio::sync::broadcast::Sender<PeerId>,
    /// Connected peers that identified as DHT servers.
    pub(super) dht_peers: HashSet<PeerId>,
    pub(super) all_server_queries: HashMap<QueryId, ProviderQuery>,
    /// Announcements whose storing someone waits for: the put queries left, and whom
    /// to tell when none is left.
    pub(super) put_waits: Vec<(HashSet<QueryId>, oneshot::Sender<()>)>,
    /// Lookups of one server's announcement under [`server_key`].
    pub(super) server_record_queries:
        HashMap<QueryId, (PeerId, oneshot::Sender<Option<Announcement>>)>,
    /// Queries to finish at a given time (see [`PROVIDER_SETTLE`]).
    pub(super) finish_soon: Vec<(Instant, QueryId)>,
    /// Garbage received per peer (see [`BAN_AFTER_STRIKES`]) and when the last came.
    /// A strike disconnects the peer, so strikes outlive connections: they are
    /// forgotten [`STRIKE_MEMORY`] after the last one, or at the ban.
    pub(super) strikes: HashMap<PeerId, (u32, Instant)>,
    /// Shared with [`Network::presence`]: an entry from a peer's first connection until
    /// its presence ends (see `EventLoop::presence_ended`).
    pub(super) presences: Presences,
    /// The number of the next presence to begin.
    pub(super) next_presence: u64,
    /// The data plane's outbound streams: the stream to a peer ends with its presence.
    pub(super) data: Arc<DataStreams>,
    /// Callers of [`Network::close_all`] waiting for the last connection to close.
    pub(super) close_waits: Vec<oneshot::Sender<()>>,
    /// Nodes found on the LAN by mDNS, with their addresses; an address goes when mDNS
    /// says it expired (the node stopped answering for its TTL).
    pub(super) lan: HashMap<PeerId, Vec<Multiaddr>>,
    /// Request budget per peer: tokens left and when they were counted. A full budget
    /// is as good as none, so an entry goes once its peer has left and it has refilled:
    /// at the last connection's close if it has by then, else at a later departure's
    /// sweep (past [`BUDGET_SWEEP_AT`] entries) or past [`MAX_TRACKED_PEERS`] entries.
    /// A peer that reconnects at once keeps what it had spent.
    pub(super) budgets: HashMap<PeerId, (f64, Instant)>,
    /// To schedule commands to itself (an unban) without keeping the loop alive.
    pub(super) to_self: mpsc::WeakSender<Command>,
    /// Open connections per peer; a peer's entry goes with its last connection.
    pub(super) conns: HashMap<PeerId, Vec<Conn>>,
    /// Connected peers that offer circuit relay v2 (they said so through identify);
    /// a peer goes when its presence ends.
    pub(super) relay_capable: HashSet<PeerId>,
    /// Relays asked for a slot or holding one, with the listener of that slot.
    pub(super) reservations: HashMap<PeerId, ListenerId>,
    /// When a relay last refused or lost a slot.
    pub(super) relay_failures: HashMap<PeerId, Instant>,
    /// Peers reached directly by hole punching; a peer goes when its presence ends.
    pub(super) punched: HashSet<PeerId>,
    /// What AutoNAT found.
    pub(super) nat: autonat::NatStatus,
    /// Configured to keep DHT records (a server or relay).
    pub(super) dht_server: bool,
    /// Relays for others whenever AutoNAT finds it public (a server, unless
    /// `--no-relay`); a dedicated relay always does.
    pub(super) relay_when_public: bool,
    pub(super) status_tx: watch::Sender<NetStatus>,
}

/// One open connection.
pub(super) struct Conn {
    pub(super) id: ConnectionId,
    /// The relay it runs through; `None` for a direct connection.
    pub(super) relay: Option<PeerId>,
    /// The peer's address on it.
    pub(super) remote: Multiaddr,
    /// This node dialled it (the peer is reachable at `remote`).
    pub(super) dialer: bool,
    /// When it was established.
    pub(super) since: Instant,
    /// The tag of the peer's process, once identify has told it.
    pub(super) instance: Option<u64>,
}

/// Providers found so far, and where the answer goes.
pub(super) type ProviderQuery = (HashSet<PeerId>, Option<oneshot::Sender<Vec<PeerId>>>);

impl EventLoop {
    pub(super) async fn run(mut self) {
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

    pub(super) fn on_command(&mut self, cmd: Command) {
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
}
