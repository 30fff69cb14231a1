//! Stopping a server: its background tasks, and leaving the swarm without losing
//! anyone's generation (the order is in [`shutdown`]'s doc).

use std::sync::Mutex;
use std::time::Duration;

use crate::net::{self, Network};
use crate::server::ServerHandle;
use crate::StopSignals;

/// Longest wait for the steps queued before a shutdown to finish.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the clients' notices and the departure record to go out.
pub(super) const FAREWELL_TIMEOUT: Duration = Duration::from_secs(5);

/// A server's background tasks (metrics endpoint, rebalancing, re-announcing): one
/// `JoinSet` under one cancellation token, so that stopping them is one call that
/// returns once every one has ended, none left detached.
#[derive(Default)]
pub(super) struct Background {
    tasks: std::sync::Mutex<tokio::task::JoinSet<()>>,
    cancel: tokio_util::sync::CancellationToken,
}

impl Background {
    /// Runs `task` until it ends or the set is stopped.
    pub(super) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spawn(async move {
                cancel.run_until_cancelled(task).await;
            });
    }

    /// Cancels every task and waits for all of them to end (each ends at its next
    /// await point; none holds one long).
    pub(super) async fn stop(self) {
        self.cancel.cancel();
        let mut tasks = self.tasks.into_inner().unwrap_or_else(|p| p.into_inner());
        while tasks.join_next().await.is_some() {}
    }
}

/// Leaves the swarm without losing anyone's generation. The order matters, each step
/// relying on the one before:
///
/// 1. The background tasks stop (and are waited for): no rebalance may swap the span
///    while sessions are handed over, and no re-announcement may put back the record
///    step 4 withdraws.
/// 2. The compute thread finishes the steps already queued and stops taking sessions
///    (refused as busy) and steps (refused as [`protocol::ErrorKind::Leaving`]),
///    handing back the sessions it held.
/// 3. Every open session's client is told to move (a [`protocol::Request::Leaving`]
///    notice; it re-routes at once and replays what the replacement missed), each
///    notice acknowledged, since a frame written just before exit may be lost.
/// 4. The announcement is replaced by an expired one, under the model and under the
///    peer id, so lookups stop finding this server.
/// 5. The caller returns; dropping the last [`ServerHandle`] ends the compute thread and
///    dropping the last [`Network`] the event loop, which closes every connection.
///
/// A second stop signal (Ctrl-C) quits at once, at any of these steps.
pub(super) async fn shutdown(
    net: &Network,
    handle: &ServerHandle,
    public: &Mutex<protocol::Announcement>,
    background: Background,
    stop: &mut StopSignals,
) -> anyhow::Result<()> {
    tracing::info!(
        "interrupted: finishing queued steps and handing sessions over (Ctrl-C again to quit now)"
    );
    tokio::select! {
        () = background.stop() => {}
        Some(()) = stop.recv() => return Ok(()),
    }
    let Some(drained) = handle.drain() else {
        return Ok(());
    };
    let handovers = tokio::select! {
        h = drained => h.unwrap_or_default(),
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("queued steps did not finish within {DRAIN_TIMEOUT:?}");
            Vec::new()
        }
        Some(()) = stop.recv() => return Ok(()),
    };
    let me = net.peer_id().to_string();
    let notices = handovers.iter().map(|h| {
        let notice = protocol::Request::Leaving(protocol::StepFailed {
            session: h.session,
            step: h.next_step,
            peer: me.clone(),
            error: protocol::ErrorInfo::new(
                protocol::ErrorKind::Leaving,
                "the server is shutting down",
            ),
        });
        // A request, not a one-way frame: its answer says the client has the notice.
        // A frame written just before the process exits may never leave the machine.
        let net = net.clone();
        let client = h.client;
        async move {
            if let Err(e) = net.request(client, vec![], notice).await {
                tracing::debug!(%client, "could not tell the client to move: {e:#}");
            }
        }
    });
    let mut departure = public.lock().unwrap_or_else(|p| p.into_inner()).clone();
    departure.expires_unix_ms = net::unix_ms();
    departure.free_cache_tokens = 0;
    let farewell = async {
        futures::future::join_all(notices).await;
        // Both records (under the model and under the peer id) must be replaced
        // before the process exits, or a lookup could still find this server.
        let _ = net.announce_and_wait(departure).await;
    };
    tokio::select! {
        _ = tokio::time::timeout(FAREWELL_TIMEOUT, farewell) => {}
        Some(()) = stop.recv() => return Ok(()),
    }
    tracing::info!(
        "left the swarm; {} session(s) handed over to other servers",
        handovers.len()
    );
    Ok(())
}
