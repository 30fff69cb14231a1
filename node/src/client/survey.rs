//! A look at the whole swarm: every server the DHT knows, asked for its current state.
//!
//! Used by `shoal status` and by the gateway's dashboard. Servers come from three
//! places, so that one lost record does not hide a server: the DHT's list of all
//! servers, the model's announcements, and the DHT servers in this node's routing table.
//! Each is asked for its announcement ([`Request::Info`], answered by servers without
//! waiting for queued steps); one that does not answer in time is listed as silent with
//! what it last announced.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use protocol::{Announcement, Request, Response};
use serde::Serialize;

use crate::net::Network;

/// One server as seen now.
#[derive(Serialize, Debug, Clone)]
pub struct Seen {
    /// Its announcement: fresh from the server when it answered, else from the DHT.
    #[serde(flatten)]
    pub announcement: Announcement,
    /// Round trip of the `Info` request; `None` when it did not answer.
    pub rtt_ms: Option<f64>,
    /// How this node reached it: "direct", "hole-punched" or `"relayed:<relay>"`.
    pub link: Option<String>,
}

impl Seen {
    /// Whether the server answered.
    pub fn answering(&self) -> bool {
        self.rtt_ms.is_some()
    }
}

/// Every server found, answering or not, optionally of one model only, sorted by model,
/// first block and peer id. Servers that announced themselves for a model (this one, or
/// any model an answering server serves) but do not answer are listed as silent.
pub async fn survey(net: &Network, model_id: Option<&str>, ask_timeout: Duration) -> Vec<Seen> {
    let mut first: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
    for p in net.find_all_servers().await.unwrap_or_default() {
        first.entry(p).or_default();
    }
    for (p, addrs) in net.dht_peers().await.unwrap_or_default() {
        first.insert(p, addrs);
    }
    // A server known only as a provider (behind a NAT it is in nobody's routing table):
    // its addresses, relayed ones included, come from its announcement.
    let unknown: Vec<PeerId> = first
        .iter()
        .filter(|(_, a)| a.is_empty())
        .map(|(p, _)| *p)
        .collect();
    // (Only the addresses: whether a server that does not answer is listed as silent
    // is decided from its model's announcements below, as for every server; a copy of
    // this record that a departing server could not replace in time must not list it.)
    let records = futures::future::join_all(unknown.iter().map(|p| net.server_record(*p))).await;
    for (p, r) in unknown.into_iter().zip(records) {
        if let Ok(Some(a)) = r {
            first.insert(p, a.addrs.iter().filter_map(|x| x.parse().ok()).collect());
        }
    }
    let asked: Vec<PeerId> = first.keys().copied().collect();
    let answered = ask_all(
        net,
        first.into_iter().map(|(p, a)| (p, a, None)),
        ask_timeout,
    )
    .await;
    let mut seen: Vec<Seen> = answered.into_iter().flatten().collect();
    let mut silent = Vec::new();
    // The models' announcements: servers the first pass missed, or that do not answer.
    let mut models: Vec<String> = match model_id {
        Some(m) => vec![m.to_string()],
        None => seen
            .iter()
            .map(|s| s.announcement.model_id.clone())
            .collect(),
    };
    models.sort();
    models.dedup();
    let mut second = Vec::new();
    for model in &models {
        for a in net.find_servers(model).await.unwrap_or_default() {
            let Ok(p) = a.peer_id.parse::<PeerId>() else {
                continue;
            };
            let known = seen.iter().any(|s| s.announcement.peer_id == a.peer_id)
                || second.iter().any(|(q, _, _)| *q == p)
                || silent
                    .iter()
                    .any(|s: &Seen| s.announcement.peer_id == a.peer_id);
            if known {
                continue;
            }
            if asked.contains(&p) {
                // Asked already, and it did not answer.
                silent.push(Seen {
                    announcement: a,
                    rtt_ms: None,
                    link: None,
                });
            } else {
                let addrs = a.addrs.iter().filter_map(|s| s.parse().ok()).collect();
                second.push((p, addrs, Some(a)));
            }
        }
    }
    seen.extend(
        ask_all(net, second, ask_timeout)
            .await
            .into_iter()
            .flatten(),
    );
    seen.extend(silent);
    seen.retain(|s| model_id.is_none_or(|m| s.announcement.model_id == m));
    let links = net.links().await.unwrap_or_default();
    for s in &mut seen {
        s.link = s
            .announcement
            .peer_id
            .parse::<PeerId>()
            .ok()
            .and_then(|p| links.get(&p))
            .map(|l| l.to_string());
    }
    seen.sort_by(|a, b| {
        let key = |s: &Seen| {
            (
                s.announcement.model_id.clone(),
                s.announcement.span.start,
                s.announcement.peer_id.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    seen
}

/// Asks each peer for its announcement at once; one that does not answer is listed
/// silent with what it recorded in the DHT, or left out if it recorded nothing.
async fn ask_all(
    net: &Network,
    peers: impl IntoIterator<Item = (PeerId, Vec<Multiaddr>, Option<Announcement>)>,
    ask_timeout: Duration,
) -> Vec<Option<Seen>> {
    let asks = peers.into_iter().map(|(peer, addrs, recorded)| {
        let net = net.clone();
        async move {
            let t = Instant::now();
            let r =
                tokio::time::timeout(ask_timeout, net.request(peer, addrs.clone(), Request::Info))
                    .await;
            let why = match r {
                Ok(Ok(Response::Info(a))) => {
                    return Some(Seen {
                        announcement: a,
                        rtt_ms: Some(t.elapsed().as_secs_f64() * 1e3),
                        link: None,
                    })
                }
                Ok(Ok(other)) => format!("answered {other:?}"),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer in time".to_string(),
            };
            tracing::debug!(%peer, ?addrs, "not answering: {why}");
            recorded.map(|a| Seen {
                announcement: a,
                rtt_ms: None,
                link: None,
            })
        }
    });
    futures::future::join_all(asks).await
}

/// Per model: its number of blocks and how many answering servers serve each block.
pub fn coverage(seen: &[Seen]) -> BTreeMap<String, (u32, Vec<u32>)> {
    let mut coverage: BTreeMap<String, (u32, Vec<u32>)> = BTreeMap::new();
    for s in seen.iter().filter(|s| s.answering()) {
        let a = &s.announcement;
        let entry = coverage
            .entry(a.model_id.clone())
            .or_insert_with(|| (a.n_blocks, vec![0; a.n_blocks as usize]));
        for b in a.span.start..a.span.end.min(entry.0) {
            entry.1[b as usize] += 1;
        }
    }
    coverage
}
