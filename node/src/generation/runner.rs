//! Running a generation for `shoal generate` and the gateway alike: the client side of
//! a model ([`ClientSide`]), a client node connected to the swarm ([`start_client`]),
//! and [`run_generation`], which runs the generation loop (the parent module) with the
//! blocks here (`--local`) or through a session on the swarm and reports the route.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use libp2p::Multiaddr;
use protocol::{ErrorInfo, ErrorKind, Frame, Request, Response, WireDType};
use serde::Serialize;
use shard::candle_core::Device;
use shard::{Head, ModelFile, Span, TextCodec};

use super::{budget, generate, prompt_tokens, Blocks, ClientHead, GenerateRequest, Generation};
use crate::client::{Client, Delivery, RemoteSession, Reroute};
use crate::net::{self, NetConfig};
use crate::NodeError;
use coordinator::budget::DEFAULT_MAX_SEQ_LEN;

/// One hop of the route, as printed by `--json`.
#[derive(Serialize, Debug, Clone)]
pub struct RouteEntry {
    /// Peer id.
    pub peer: String,
    /// First block.
    pub start: u32,
    /// One past the last block.
    pub end: u32,
    /// How the client reached it at the end: "direct", "hole-punched" or
    /// `"relayed:<relay peer id>"` (absent for a local generation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// What a generation did besides generating: the route it ended on and its failovers.
#[derive(Serialize, Debug, Default, Clone)]
pub struct Trip {
    /// The chain used at the end.
    pub route: Vec<RouteEntry>,
    /// Failovers, in order.
    pub reroutes: Vec<Reroute>,
}

/// A session's route now (with how each server is reached) and its failovers so far.
/// (A future that holds no borrow of the session: a session is not `Sync`.)
pub(super) fn trip(session: &RemoteSession) -> impl std::future::Future<Output = Trip> + Send {
    let links = session.links();
    let hops: Vec<(libp2p::PeerId, u32, u32)> = session
        .route()
        .iter()
        .map(|h| (h.hop.peer, h.hop.span.start, h.hop.span.end))
        .collect();
    let reroutes = session.reroutes.clone();
    async move {
        let links = links.await;
        Trip {
            route: hops
                .into_iter()
                .map(|(peer, start, end)| RouteEntry {
                    peer: peer.to_string(),
                    start,
                    end,
                    link: links.get(&peer).map(|l| l.to_string()),
                })
                .collect(),
            reroutes,
        }
    }
}

/// A client loaded and ready: model head, tokenizer, and maybe a swarm connection.
pub struct ClientSide {
    file: ModelFile,
    head: ClientHead,
    text: TextCodec,
    /// Where the blocks run when a generation runs them all here (`--local`).
    local_device: Device,
}

impl ClientSide {
    /// Loads the client-side tensors and tokenizer of a model.
    pub fn load(file: ModelFile) -> anyhow::Result<Self> {
        let head = ClientHead::start(Head::load(&file, &Device::Cpu)?)?;
        let text = TextCodec::from_model(&file)?;
        Ok(ClientSide {
            file,
            head,
            text,
            local_device: Device::Cpu,
        })
    }

    /// Runs local generations' blocks on `device` (the head stays on the CPU).
    pub fn with_local_device(mut self, device: Device) -> Self {
        self.local_device = device;
        self
    }

    /// The model file.
    pub fn file(&self) -> &ModelFile {
        &self.file
    }

    /// Tokenizer and chat template.
    pub fn text(&self) -> &TextCodec {
        &self.text
    }

    /// Embeddings and the LM head.
    pub fn head(&self) -> &ClientHead {
        &self.head
    }

    /// The draft model at `path` (`--draft-model`), checked against this model's
    /// vocabulary; `None` without one.
    pub fn draft_model(
        &self,
        path: Option<&std::path::Path>,
    ) -> anyhow::Result<Option<Arc<super::DraftModel>>> {
        let vocab = self.head.head().config().vocab;
        path.map(|p| Ok(Arc::new(super::DraftModel::load(p, vocab)?)))
            .transpose()
    }
}

/// Starts a client node, connected to `bootstrap`, with its inbound dispatcher.
pub async fn start_client(
    bootstrap: &[Multiaddr],
    connect_timeout: Duration,
    shaping: Option<net::Shaping>,
    swarm_key: Option<libp2p::pnet::PreSharedKey>,
    identity: Option<libp2p::identity::Keypair>,
    mdns: bool,
) -> anyhow::Result<Client> {
    // Without a bootstrap address, look for a node on the LAN (not in a private swarm).
    let lan = bootstrap.is_empty() && swarm_key.is_none() && mdns;
    if bootstrap.is_empty() && !lan {
        bail!("no --bootstrap address: give the `listening` address of any node of the swarm, or use --local");
    }
    // A client listens (on QUIC, any port) only so that a server behind a NAT can
    // punch a hole to it: both ends of a relayed connection dial each other from their
    // listening sockets. Nothing else ever dials a client.
    let listen = match swarm_key {
        None => vec!["/ip4/0.0.0.0/udp/0/quic-v1".parse()?],
        Some(_) => vec![],
    };
    let (net, mut inbound) = net::start(NetConfig {
        listen,
        dht_server: false,
        shaping,
        swarm_key,
        identity,
        mdns: lan,
        relay: None,
    })?;
    let mut bootstrap = bootstrap.to_vec();
    if lan {
        bootstrap = find_on_lan(&net, connect_timeout.min(LAN_SEARCH)).await?;
    }
    let bootstrap = &bootstrap[..];
    let client = Client::new(net.clone());
    // Outputs and failure reports go from the task reading their stream straight to
    // the session waiting for them.
    let direct = client.clone();
    net.on_data(Arc::new(move |m| {
        match m.frame {
            Frame::Output(o) => {
                direct.deliver(o.session, Delivery::Output(o));
            }
            Frame::Failed(f) => {
                direct.deliver(f.session, Delivery::Failed(f));
            }
            Frame::Step(_) => {
                tracing::debug!(peer = %m.peer, "a step sent to a client: dropped");
            }
        }
        true
    }));
    // On the control plane a client takes only the notices of servers that leave.
    let c = client.clone();
    tokio::spawn(async move {
        while let Some(m) = inbound.recv().await {
            let response = match m.request {
                Request::Leaving(f) => {
                    c.deliver(f.session, Delivery::Failed(f));
                    Response::Accepted
                }
                _ => Response::Error(ErrorInfo::new(
                    ErrorKind::BadRequest,
                    "this node is a client, it serves no blocks",
                )),
            };
            c.net().respond(m.channel, response).await;
        }
    });
    client.connect(bootstrap, connect_timeout).await?;
    Ok(client)
}

/// Longest wait for a node on the LAN to answer mDNS (they answer in milliseconds).
const LAN_SEARCH: Duration = Duration::from_secs(3);

/// Addresses of the nodes mDNS finds on the LAN within `timeout` (it keeps looking a
/// moment after the first answer, for the others).
async fn find_on_lan(net: &net::Network, timeout: Duration) -> anyhow::Result<Vec<Multiaddr>> {
    let deadline = Instant::now() + timeout;
    let mut first_seen: Option<Instant> = None;
    loop {
        let found = net.lan_peers().await?;
        if !found.is_empty() {
            let t = *first_seen.get_or_insert_with(Instant::now);
            if t.elapsed() >= Duration::from_millis(300) || Instant::now() >= deadline {
                return Ok(found
                    .into_iter()
                    .flat_map(|(peer, addrs)| {
                        addrs
                            .into_iter()
                            .map(move |a| a.with_p2p(peer).unwrap_or_else(|a| a))
                    })
                    .collect());
            }
        } else if Instant::now() >= deadline {
            bail!(
                "no --bootstrap address, and no shoal node answered on the LAN (mDNS) within {timeout:?}: give the `listening` address of any node of the swarm, or use --local"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The client `generate` and `api` talk to the swarm through, as their shared options
/// ask; `None` with `--local`.
pub async fn swarm_client(
    s: &crate::args::SwarmClientArgs,
    shaping: Option<net::Shaping>,
) -> anyhow::Result<Option<Client>> {
    if s.local {
        return Ok(None);
    }
    let client = start_client(
        &s.bootstrap,
        Duration::from_secs_f64(s.connect_timeout),
        shaping,
        s.swarm_key.load()?,
        s.identity.load()?,
        !s.no_mdns,
    )
    .await?;
    Ok(Some(client.with_verify_rate(s.verify_rate)))
}

/// The swarm client and the model's client side for `generate` and `api`: the model
/// `--model` names, or without it the swarm's (its head fetched when not here).
pub async fn client_and_side(
    model: &crate::args::ModelArg,
    s: &crate::args::SwarmClientArgs,
    shaping: Option<net::Shaping>,
) -> anyhow::Result<(Option<Client>, ClientSide)> {
    let client = swarm_client(s, shaping).await?;
    let net = client.as_ref().map(|c| c.net());
    let file = crate::weights::client_model(model, &s.from_swarm, net).await?;
    Ok((client, ClientSide::load(file)?))
}

/// Runs one generation through the swarm (or locally when `client` is `None`).
pub async fn run_generation(
    side: &ClientSide,
    client: Option<&Client>,
    req: &GenerateRequest,
    wire: WireDType,
    route_timeout: Duration,
    on_text: impl FnMut(&str),
) -> Result<(Generation, Trip), NodeError> {
    let prompt = prompt_tokens(&side.text, req)?;
    let turn = Turn {
        prompt,
        warm: None,
        keep: false,
    };
    let (g, trip, _) = run_turn(side, client, req, turn, wire, route_timeout, on_text).await?;
    Ok((g, trip))
}

/// A session kept open on its servers after a generation, for the next turn of the
/// same conversation, and the tokens its servers' caches hold (the prompt and the
/// completion, less what was chosen last and never fed).
pub struct Warm {
    /// The open session, its servers' caches full of `tokens`.
    pub session: RemoteSession,
    /// What the caches hold, position by position.
    pub tokens: Vec<u32>,
}

/// One generation of a conversation: its prompt, maybe a session kept from an earlier
/// turn, and whether to keep this one's open afterwards.
pub struct Turn {
    /// The prompt's tokens ([`prompt_tokens`]).
    pub prompt: Vec<u32>,
    /// An earlier turn's session: used when its tokens begin this prompt (all but what
    /// they share is dropped), closed otherwise.
    pub warm: Option<Warm>,
    /// Return the session open after the generation, rather than closing it.
    pub keep: bool,
}

/// How many leading tokens a warm session can keep for `prompt`: those it shares with
/// it, less the prompt's last (a generation must feed at least one token to have logits
/// to choose from).
pub fn shared_prefix(tokens: &[u32], prompt: &[u32]) -> usize {
    let same = tokens
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count();
    same.min(prompt.len().saturating_sub(1))
}

/// The warm session ready for a prompt: taken back to the tokens it shares with the
/// prompt and given room for `max_len` tokens. `None` (the session closed) when it
/// shares nothing or a server cannot keep it (dropped, full, gone): the caller opens a
/// fresh session and sends the whole prompt, as without one.
async fn resume(warm: Warm, prompt: &[u32], max_len: u32) -> Option<RemoteSession> {
    let Warm {
        mut session,
        tokens,
    } = warm;
    let keep = shared_prefix(&tokens, prompt);
    if keep == 0 {
        session.close().await;
        return None;
    }
    if let Err(e) = session.resize(max_len).await {
        tracing::info!("a conversation's session cannot be reused: {e:#}; opening a new one");
        session.close().await;
        return None;
    }
    session.rewind(keep as u32);
    // The turn reports its own failovers, not those of the turns before.
    session.reroutes.clear();
    Some(session)
}

/// Runs one turn: the generation through the swarm (reusing `turn.warm` where it
/// fits) or locally when `client` is `None` (nothing is kept then).
pub async fn run_turn(
    side: &ClientSide,
    client: Option<&Client>,
    req: &GenerateRequest,
    turn: Turn,
    wire: WireDType,
    route_timeout: Duration,
    on_text: impl FnMut(&str),
) -> Result<(Generation, Trip, Option<Warm>), NodeError> {
    let cfg = side.file.config();
    let Turn { prompt, warm, keep } = turn;
    let max_new = budget(
        prompt.len(),
        req.max_tokens,
        cfg.max_seq_len.min(DEFAULT_MAX_SEQ_LEN),
    )?;
    let max_len = (prompt.len() + max_new) as u32;
    match client {
        None => {
            if let Some(w) = warm {
                w.session.close().await;
            }
            let span = tokio::task::block_in_place(|| {
                let s = Span::load(&side.file, 0, cfg.n_layers, &side.local_device, |_, _| {})?;
                s.warm_up()?;
                Ok::<_, shard::ShardError>(s)
            })?;
            let mut blocks = Blocks::Local {
                cache: span.new_cache(max_len as usize),
                span: &span,
            };
            let g = generate(
                &side.head,
                &side.text,
                &mut blocks,
                prompt,
                max_new,
                req,
                on_text,
            )
            .await
            .map_err(NodeError::from)?;
            let route = vec![RouteEntry {
                peer: "local".into(),
                start: 0,
                end: cfg.n_layers as u32,
                link: None,
            }];
            Ok((
                g,
                Trip {
                    route,
                    reroutes: Vec::new(),
                },
                None,
            ))
        }
        Some(client) => {
            let resumed = match warm {
                Some(w) => resume(w, &prompt, max_len).await,
                None => None,
            };
            let mut session = match resumed {
                Some(session) => session,
                None => {
                    client
                        .open_session(
                            side.file.id(),
                            cfg.n_layers as u32,
                            max_len,
                            wire,
                            route_timeout,
                            Box::new(|line: &str| eprintln!("{line}")),
                        )
                        .await?
                }
            };
            if let Some(w) = &req.watch {
                (w.0)(&trip(&session).await);
            }
            let mut blocks = Blocks::Swarm {
                session: &mut session,
                wire,
                watch: req.watch.clone(),
            };
            let result = generate(
                &side.head,
                &side.text,
                &mut blocks,
                prompt,
                max_new,
                req,
                on_text,
            )
            .await;
            let trip = trip(&session).await;
            let g = match result {
                Ok(g) => g,
                Err(e) => {
                    session.close().await;
                    return Err(NodeError::from(e));
                }
            };
            if !keep {
                session.close().await;
                return Ok((g, trip, None));
            }
            let held = session.position() as usize;
            let tokens: Vec<u32> = g
                .prompt_tokens
                .iter()
                .chain(&g.completion_tokens)
                .copied()
                .take(held)
                .collect();
            Ok((g, trip, Some(Warm { session, tokens })))
        }
    }
}
