//! The client side of the swarm: finding servers, planning a chain, and running a
//! session's steps through it.
//!
//! A step goes to the first server of the chain with the rest of the route attached;
//! servers push it along and the last one sends the output back here as a request of
//! its own ([`protocol::Request::Output`]), which the node's dispatcher hands to the
//! waiting session through [`Client::deliver`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use libp2p::{Multiaddr, PeerId};
use protocol::{
    Announcement, BlockSpan, HiddenState, Hop, OpenSession, Request, Response, SessionId, Step,
    WireDType,
};
use tokio::sync::mpsc;

use crate::net::Network;

/// What the last server (or a failing one) sends a session.
#[derive(Debug)]
pub enum Delivery {
    /// Final hidden states of a step.
    Output(protocol::StepOutput),
    /// A step failed somewhere in the chain.
    Failed(protocol::StepFailed),
}

type SessionTable = Arc<Mutex<HashMap<SessionId, mpsc::UnboundedSender<Delivery>>>>;

/// A swarm client: the network handle plus the table of sessions awaiting outputs.
#[derive(Clone)]
pub struct Client {
    net: Network,
    sessions: SessionTable,
}

/// One server of a planned chain.
#[derive(Clone, Debug)]
pub struct PlannedHop {
    /// Who.
    pub peer: PeerId,
    /// Where to reach it.
    pub addrs: Vec<Multiaddr>,
    /// Blocks it runs for us.
    pub span: BlockSpan,
}

/// Time a step may take end to end before the client gives up on the chain: generous,
/// since a long prefill chunk on a slow CPU takes seconds.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

impl Client {
    /// A client over `net`.
    pub fn new(net: Network) -> Self {
        Client {
            net,
            sessions: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The network handle.
    pub fn net(&self) -> &Network {
        &self.net
    }

    /// Hands an output or failure to the session waiting for it. Returns false when no
    /// such session is open here.
    pub fn deliver(&self, session: SessionId, d: Delivery) -> bool {
        let table = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match table.get(&session) {
            Some(tx) => tx.send(d).is_ok(),
            None => false,
        }
    }

    /// Dials the bootstrap nodes; at least one must answer within `timeout`.
    pub async fn connect(&self, bootstrap: &[Multiaddr], timeout: Duration) -> anyhow::Result<()> {
        connect_any(&self.net, bootstrap, timeout).await
    }

    /// Looks up the model's servers until they cover all `n_blocks` or `timeout` passes,
    /// then plans the fastest chain.
    pub async fn plan(
        &self,
        model_id: &str,
        n_blocks: u32,
        timeout: Duration,
    ) -> anyhow::Result<Vec<PlannedHop>> {
        let deadline = Instant::now() + timeout;
        let mut last_err;
        loop {
            let found = self.net.find_servers(model_id).await?;
            match self.route_from(&found, n_blocks).await {
                Ok(route) => return Ok(route),
                Err(e) => last_err = e,
            }
            if Instant::now() >= deadline {
                return Err(last_err.context(format!(
                    "no complete chain of servers for model {model_id} within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn route_from(
        &self,
        found: &[Announcement],
        n_blocks: u32,
    ) -> anyhow::Result<Vec<PlannedHop>> {
        let rtts = self.net.rtts().await.unwrap_or_default();
        let views: Vec<coordinator::ServerView> = found
            .iter()
            .map(|a| coordinator::ServerView {
                id: a.peer_id.clone(),
                start: a.span.start,
                end: a.span.end,
                throughput: a.throughput.max(1e-3),
                rtt: a
                    .peer_id
                    .parse::<PeerId>()
                    .ok()
                    .and_then(|p| rtts.get(&p))
                    .map(|d| d.as_secs_f32()),
            })
            .collect();
        let route = coordinator::plan_route(&views, n_blocks)?;
        route
            .into_iter()
            .map(|h| {
                let a = &found[h.server];
                Ok(PlannedHop {
                    peer: a
                        .peer_id
                        .parse()
                        .context("announcement with a bad peer id")?,
                    addrs: a.addrs.iter().filter_map(|x| x.parse().ok()).collect(),
                    span: BlockSpan::new(h.start, h.end),
                })
            })
            .collect()
    }

    /// Opens a session on every server of `route`.
    pub async fn open_session(
        &self,
        route: Vec<PlannedHop>,
        model_id: &str,
        max_len: u32,
        wire: WireDType,
    ) -> anyhow::Result<RemoteSession> {
        let id: SessionId = rand::random();
        let (tx, rx) = mpsc::unbounded_channel();
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let opens: Vec<_> = route
            .iter()
            .map(|hop| {
                let req = Request::Open(OpenSession {
                    session: id,
                    model_id: model_id.to_string(),
                    span: hop.span,
                    max_len,
                    wire_dtype: wire,
                });
                let net = self.net.clone();
                let (peer, addrs) = (hop.peer, hop.addrs.clone());
                async move { (peer, net.request(peer, addrs, req).await) }
            })
            .collect();
        let session = RemoteSession {
            client: self.clone(),
            id,
            route,
            rx,
            step: 0,
            position: 0,
        };
        for (peer, r) in futures::future::join_all(opens).await {
            match r {
                Ok(Response::Opened { .. }) => {}
                Ok(Response::Error(e)) => {
                    session.close().await;
                    bail!("server {peer} refused the session: {e}");
                }
                Ok(other) => {
                    session.close().await;
                    bail!("server {peer} answered the session request with {other:?}");
                }
                Err(e) => {
                    session.close().await;
                    return Err(e.context(format!("opening a session on {peer}")));
                }
            }
        }
        Ok(session)
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
    let results = futures::future::join_all(dials).await;
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

/// A generation's state on a chain of servers.
pub struct RemoteSession {
    client: Client,
    id: SessionId,
    route: Vec<PlannedHop>,
    rx: mpsc::UnboundedReceiver<Delivery>,
    step: u64,
    position: u32,
}

impl RemoteSession {
    /// The chain in use.
    pub fn route(&self) -> &[PlannedHop] {
        &self.route
    }

    /// Runs `hidden` (`[tokens, hidden]`) through the whole chain.
    pub async fn forward(&mut self, hidden: HiddenState) -> anyhow::Result<HiddenState> {
        let tokens = hidden.shape.first().copied().unwrap_or(0);
        let first = &self.route[0];
        let next: Vec<Hop> = self.route[1..]
            .iter()
            .map(|h| Hop {
                peer: h.peer.to_string(),
                span: h.span,
                addrs: h.addrs.iter().map(|a| a.to_string()).collect(),
            })
            .collect();
        let step = Step {
            session: self.id,
            step: self.step,
            position: self.position,
            hidden,
            next,
            reply_to: self.client.net.peer_id().to_string(),
        };
        match self
            .client
            .net
            .request(first.peer, first.addrs.clone(), Request::Step(step))
            .await
            .with_context(|| format!("sending step {} to {}", self.step, first.peer))?
        {
            Response::Accepted => {}
            Response::Error(e) => bail!("server {} refused step {}: {e}", first.peer, self.step),
            other => bail!("server {} answered a step with {other:?}", first.peer),
        }
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let d = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .map_err(|_| anyhow!("step {} got no output within {STEP_TIMEOUT:?}", self.step))?
                .ok_or_else(|| anyhow!("session table closed"))?;
            match d {
                Delivery::Output(o) if o.step == self.step => {
                    self.step += 1;
                    self.position += tokens;
                    return Ok(o.hidden);
                }
                Delivery::Failed(f) if f.step == self.step => {
                    bail!("step {} failed at server {}: {}", f.step, f.peer, f.error)
                }
                // Leftovers of an earlier step: ignore.
                _ => continue,
            }
        }
    }

    /// Closes the session on every server (best effort) and forgets it.
    pub async fn close(self) {
        self.client
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        let closes = self.route.iter().map(|h| {
            let net = self.client.net.clone();
            let (peer, addrs, session) = (h.peer, h.addrs.clone(), self.id);
            async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    net.request(peer, addrs, Request::Close { session }),
                )
                .await;
            }
        });
        futures::future::join_all(closes).await;
    }
}
