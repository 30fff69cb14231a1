//! What the event loop does with each swarm event: connections, identify, ping,
//! AutoNAT, relays, hole punching, and requests and responses.

use std::time::Instant;

use anyhow::anyhow;
use libp2p::core::ConnectedPoint;
use libp2p::kad::Mode;
use libp2p::request_response::{self};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::SwarmEvent;
use libp2p::{autonat, dcutr, identify, mdns, ping, relay, StreamProtocol};
use protocol::{Request, Response};

use super::event_loop::Conn;
use super::event_loop::EventLoop;
use super::handle::Command;
use super::nat::relay_of;
use super::peers::refilled;
use super::transport::instance_of;
use super::transport::BehaviourEvent;
use super::Inbound;
use super::BUDGET_SWEEP_AT;
use super::RELAYED_GRACE;
use super::REQUESTS_PER_SECOND;

impl EventLoop {
    pub(super) async fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
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

    pub(super) async fn on_rr(&mut self, event: request_response::Event<Request, Response>) {
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
                        channel,
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
}
