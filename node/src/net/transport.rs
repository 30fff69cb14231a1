//! What a node speaks: its libp2p behaviours and how identify names its process.

use std::time::Duration;

use libp2p::kad::{self, store::MemoryStore, store::MemoryStoreConfig};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, autonat, dcutr, identify, identity, mdns, ping, relay, StreamProtocol,
};

use super::RelayLimits;
use super::ANNOUNCE_TTL;
use super::QUERY_TIMEOUT;
use super::REQUEST_TIMEOUT;
use crate::net::codec::ShoalCodec;

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    /// Peers banned for sending garbage: their connections are refused both ways.
    pub(super) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Nodes on the same LAN, found by multicast DNS (off with `--no-mdns`).
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) kad: kad::Behaviour<MemoryStore>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) rr: request_response::Behaviour<ShoalCodec>,
    pub(super) stream: libp2p_stream::Behaviour,
    /// Reaching nodes behind NATs through relays (every node).
    pub(super) relay_client: relay::client::Behaviour,
    /// Relaying for others (servers and relays, unless turned off).
    pub(super) relay: Toggle<crate::net::relay_server::RelayServer>,
    /// Hole punching over relayed connections (every node).
    pub(super) dcutr: dcutr::Behaviour,
    /// Finding out whether this node can be dialled, and telling others (servers and
    /// relays).
    pub(super) autonat: Toggle<autonat::Behaviour>,
}

/// What identify tells peers this node runs: its version and a random tag of this
/// process. A peer that sees the same peer id with another tag knows that the process
/// it knew is gone (see `EventLoop::on_identified`).
pub(super) fn agent_version(instance: u64) -> String {
    format!(
        "shoal/{} instance/{instance:016x}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The process tag in a peer's agent version; `None` for software that sends none.
pub(super) fn instance_of(agent_version: &str) -> Option<u64> {
    let tag = agent_version
        .split_whitespace()
        .find_map(|w| w.strip_prefix("instance/"))?;
    u64::from_str_radix(tag, 16).ok()
}

/// What [`behaviour`] includes beyond what every node runs.
#[derive(Clone, Copy)]
pub(super) struct Extras {
    /// mDNS.
    pub(super) lan: bool,
    /// Relay for others.
    pub(super) relay: Option<RelayLimits>,
    /// AutoNAT (servers and relays; a pure client dials out and need not know).
    pub(super) autonat: bool,
}

/// The node's protocols: Kademlia, identify, ping, request-response, the data plane,
/// relay client and hole punching; mDNS, relay server and AutoNAT as `extras` say.
pub(super) fn behaviour(
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
        crate::net::relay_server::RelayServer::new(server)
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
