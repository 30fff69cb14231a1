//! Behind a NAT: relayed addresses, relay slots, dialling beside a stale dial, and
//! dropping a relayed connection once a direct one stands.

use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::ConnectionId;
use libp2p::{autonat, Multiaddr, PeerId};
use protocol::Reachability;

use super::event_loop::EventLoop;
use super::Link;
use super::NetStatus;
use super::RELAY_RETRY;
use super::STALE_RELAYED_AGE;
use super::WANT_RELAYS;

/// The relay a `/p2p/<relay>/p2p-circuit` address goes through.
pub(super) fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
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
pub(super) fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    without_peer(addr).with(Protocol::P2p(peer))
}

/// `addr` without a trailing `/p2p/<peer>`.
pub(super) fn without_peer(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

impl EventLoop {
    /// Dials `peer` at `addrs` unless connected to it, even while another dial to it is
    /// under way. Request-response and stream dials give way to a dial in flight, and
    /// one may be Kademlia's, to addresses a lookup was told about (a NAT'd server's
    /// private ones, which time out after seconds); the request then failed with that
    /// dial although `addrs` (a relayed address from its announcement) would work.
    pub(super) fn dial_beside(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
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
    pub(super) fn drop_stale_relayed(&mut self, peer: PeerId, fresh: ConnectionId, relay: PeerId) {
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
    pub(super) fn link_of(&self, peer: &PeerId) -> Option<Link> {
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
    pub(super) fn publish_status(&mut self) {
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
    pub(super) fn reserve_relays(&mut self) {
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
}
