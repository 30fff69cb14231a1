//! The DHT side of the event loop: record keys, lookups of servers and their
//! announcements, and what Kademlia's query results feed.

use std::time::Instant;

use libp2p::kad::{self, QueryResult, RecordKey};
use libp2p::PeerId;
use protocol::Announcement;

use super::event_loop::EventLoop;
use super::unix_ms;
use super::PROVIDER_SETTLE;

pub(super) fn provider_key(model_id: &str) -> RecordKey {
    RecordKey::new(&format!("/shoal/{model_id}"))
}

/// Provided by every server of every model, so `shoal status` can list them all.
pub(super) fn all_servers_key() -> RecordKey {
    RecordKey::new(&"/shoal/servers")
}

/// A server's announcement under its peer id alone, whatever its model: how `shoal
/// status` finds the addresses of a server it knows only as a provider of
/// [`all_servers_key`] (one behind a NAT is in nobody's routing table).
pub(super) fn server_key(peer: &str) -> RecordKey {
    RecordKey::new(&format!("/shoal/server/{peer}"))
}

pub(super) fn announcement_key(model_id: &str, peer: &str) -> RecordKey {
    RecordKey::new(&format!("/shoal/{model_id}/{peer}"))
}

impl EventLoop {
    pub(super) fn on_kad(&mut self, event: kad::Event) {
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

    pub(super) fn fetch_records(&mut self, lookup: u64) {
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

    pub(super) fn finish_lookup_if_done(&mut self, lookup: u64) {
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
pub(super) fn valid_announcement(
    bytes: &[u8],
    model_id: &str,
    peer: PeerId,
) -> Option<Announcement> {
    let a: Announcement = protocol::decode(bytes).ok()?;
    (a.model_id == model_id && a.peer_id == peer.to_string() && a.expires_unix_ms > unix_ms())
        .then_some(a)
}
