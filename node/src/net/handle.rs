//! [`Network`], the handle the rest of the node holds: each call sends a [`Command`] to
//! the event loop and waits for its reply.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use protocol::{Announcement, Request, Response};
use tokio::sync::{mpsc, oneshot, watch};

use super::data::DataStreams;
use super::is_tcp;
use super::Link;
use super::NetStatus;
use super::Presence;
use super::Presences;
use super::Shaping;
use super::CLOSE_FLUSH;
use super::PATIENT_SETTLE;
use super::PROVIDER_SETTLE;
use super::QUERY_TIMEOUT;

pub(super) enum Command {
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
    pub(super) cmd: mpsc::Sender<Command>,
    pub(super) peer_id: PeerId,
    /// In a private swarm (TCP only).
    pub(super) private: bool,
    pub(super) shaping: Option<Shaping>,
    /// Peers whose [`Presence`] ended: their last connection closed, or they came back
    /// as a new process. A client watching its chain learns at once that a TCP peer
    /// died (QUIC peers that vanish are only noticed by QUIC's idle timeout, 10 s).
    pub(super) disconnects: tokio::sync::broadcast::Sender<PeerId>,
    /// The subset of those that were DHT servers (they may have held our records).
    pub(super) dht_departures: tokio::sync::broadcast::Sender<PeerId>,
    pub(super) data: Arc<DataStreams>,
    pub(super) status: watch::Receiver<NetStatus>,
    /// The current presence of every connected peer, kept by the event loop.
    pub(super) presences: Presences,
}

impl Network {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    pub(super) async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> anyhow::Result<T> {
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
            shaping.wait(0).await;
        }
        self.call(|reply| Command::Request {
            peer,
            addrs,
            request,
            reply,
        })
        .await?
    }

    /// Answers an inbound request.
    pub async fn respond(&self, channel: ResponseChannel<Response>, response: Response) {
        let _ = self.cmd.send(Command::Respond { channel, response }).await;
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

    pub(super) async fn lookup_servers(
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

    /// Nodes found on the LAN by mDNS (only with [`super::NetConfig::mdns`]), with addresses.
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

impl Network {
    /// [`Network::respond`] for threads outside the async runtime (the compute thread).
    pub fn respond_blocking(&self, channel: ResponseChannel<Response>, response: Response) {
        let _ = self
            .cmd
            .blocking_send(Command::Respond { channel, response });
    }
}

/// Dials each address; succeeds when at least one answers within `timeout`.
pub async fn connect_any(
    net: &Network,
    bootstrap: &[Multiaddr],
    timeout: Duration,
) -> anyhow::Result<()> {
    if bootstrap.is_empty() {
        return Ok(());
    }
    let dials = bootstrap.iter().map(|a| net.dial(a.clone(), timeout));
    let shown = || {
        let addrs: Vec<String> = bootstrap.iter().map(|a| a.to_string()).collect();
        format!("a bootstrap node to answer ({})", addrs.join(", "))
    };
    let results = crate::patience::noting_wait(shown, futures::future::join_all(dials)).await;
    if results.iter().any(|r| r.is_ok()) {
        return Ok(());
    }
    let reasons: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect();
    Err(anyhow!(
        "could not reach any bootstrap node: {}",
        reasons.join("; ")
    ))
}
