//! Peers as the event loop tracks them: presences (from a peer's first connection to
//! its last, or until it comes back as a new process) and per-peer request budgets.

use std::time::Instant;

use libp2p::swarm::ConnectionId;
use libp2p::PeerId;

use super::event_loop::EventLoop;
use super::Presence;
use super::MAX_TRACKED_PEERS;
use super::REQUESTS_PER_SECOND;
use super::REQUEST_BURST;

impl EventLoop {
    /// Begins a presence of `peer`: at its first connection, or (`anew`) when it came
    /// back as a new process.
    pub(super) fn begin_presence(&mut self, peer: PeerId, anew: bool) {
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
    pub(super) fn presence_ended(&mut self, peer: PeerId) {
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
    pub(super) fn on_identified(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        instance: Option<u64>,
    ) {
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

    /// Takes one request from `peer`'s budget; false if it has none left.
    pub(super) fn within_budget(&mut self, peer: PeerId) -> bool {
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
}

/// Whether a request budget (tokens left, when counted) is full again by `now`: such a
/// peer is as good as new, and its entry can go.
pub(super) fn refilled(&(tokens, at): &(f64, Instant), now: Instant) -> bool {
    tokens + now.duration_since(at).as_secs_f64() * REQUESTS_PER_SECOND >= REQUEST_BURST
}
