//! A running server's upkeep: announcing again when the swarm or its own reachability
//! changes, and moving to another span when `coordinator` says the swarm would be
//! better off.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use shard::candle_core::Device;

use super::span::load_span;
use crate::net::Network;
use crate::server::ServerHandle;
use crate::weights::SpanFiles;

pub(super) fn views(found: &[protocol::Announcement], me: &str) -> Vec<coordinator::SpanView> {
    found
        .iter()
        .filter(|a| a.peer_id != me)
        .map(|a| coordinator::SpanView {
            start: a.span.start,
            end: a.span.end,
            throughput: a.throughput,
        })
        .collect()
}

/// Wait after a peer leaves before announcing again (departures come in bursts).
pub(super) const REANNOUNCE_DEBOUNCE: Duration = Duration::from_secs(1);

/// Announces again whenever DHT servers have left (clients coming and going do not
/// count), at most once per [`REANNOUNCE_DEBOUNCE`].
pub(super) async fn reannounce_on_departures(net: Network, handle: ServerHandle) {
    let mut departures = net.dht_departures();
    loop {
        match departures.recv().await {
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
        // Let a burst of departures settle, then announce once for all of them.
        tokio::time::sleep(REANNOUNCE_DEBOUNCE).await;
        while departures.try_recv().is_ok() {}
        if !handle.announce() {
            return;
        }
    }
}

/// Announces again whenever this node's reachability or relay slots change, so clients
/// find its relayed addresses as soon as it has them.
pub(super) async fn reannounce_on_reachability(net: Network, handle: ServerHandle) {
    let mut changes = net.status_changes();
    let mut last = (protocol::Reachability::Unknown, Vec::new());
    while changes.changed().await.is_ok() {
        // Changes come in bursts (found private, then a relay slot a moment later):
        // announce once, when it has settled. Each announcement is a DHT query that
        // ends at its own time; two racing would leave whichever ends last, possibly
        // the older addresses.
        tokio::time::sleep(REACHABILITY_SETTLE).await;
        let status = changes.borrow_and_update().clone();
        let now = (status.reachability, status.relays.clone());
        if now != last {
            tracing::info!(
                reachability = %status.reachability,
                relays = status.relays.len(),
                "reachability changed; announcing again"
            );
            last = now;
        }
        // Private with no relay slot: nobody can reach it, so an announcement would
        // only send clients to it in vain (a slot is usually a moment away).
        if status.reachability == protocol::Reachability::Private {
            continue;
        }
        if !handle.announce() {
            return;
        }
    }
}

/// How long reachability changes settle before [`reannounce_on_reachability`]
/// announces.
pub(super) const REACHABILITY_SETTLE: Duration = Duration::from_millis(300);

/// Every `interval` (jittered), asks `coordinator::should_move` whether this server's
/// span should move, and moves it when it should.
pub(super) async fn rebalance(
    mut files: SpanFiles,
    device: Device,
    net: Network,
    handle: ServerHandle,
    current: Arc<Mutex<coordinator::SpanView>>,
    interval: Duration,
    threshold: f32,
) {
    let me = net.peer_id().to_string();
    let n_blocks = files.file().config().n_layers as u32;
    let model_id = files.file().id().to_string();
    let mut rng: rand::rngs::StdRng = rand::make_rng();
    loop {
        tokio::time::sleep(coordinator::jittered(interval, &mut rng)).await;
        let Ok(found) = net.find_servers(&model_id).await else {
            return;
        };
        let mine = *current.lock().unwrap_or_else(|p| p.into_inner());
        let Some((s, e)) = coordinator::should_move(&views(&found, &me), mine, n_blocks, threshold)
        else {
            continue;
        };
        tracing::info!(
            "moving from blocks {}..{} to {s}..{e}: the swarm is weaker there",
            mine.start,
            mine.end
        );
        let file = match files.for_span(&net, s as usize, e as usize).await {
            Ok(f) => f,
            Err(err) => {
                tracing::warn!("cannot fetch blocks {s}..{e}: {err:#}");
                continue;
            }
        };
        let loaded =
            tokio::task::block_in_place(|| load_span(&file, s as usize, e as usize, &device));
        match loaded {
            Ok((span, throughput)) => {
                *current.lock().unwrap_or_else(|p| p.into_inner()) = coordinator::SpanView {
                    start: s,
                    end: e,
                    throughput,
                };
                if !handle.replace(span, throughput) {
                    return;
                }
                files.settle(file);
            }
            Err(e) => tracing::warn!("cannot load the new span: {e:#}"),
        }
    }
}
