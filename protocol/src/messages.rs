//! The messages of the control plane ([`Request`], [`Response`]) and the data plane
//! ([`Frame`]), and the announcement record kept in the DHT.
//!
//! A generation is a *session* opened on every server of a chain. The client sends each
//! step to the first server; every server runs its blocks and pushes the output straight
//! to the next server (the step carries the rest of the route); the last server sends
//! the final hidden states back to the client as a [`StepOutput`]. Any failure along
//! the way comes back to the client as a [`StepFailed`] naming the peer that failed.

use serde::{Deserialize, Serialize};

use crate::HiddenState;
use crate::WireDType;

/// A session id, chosen at random by the client for each server of its chain. A step
/// carries the ids of the hops after it, so a server pushing to the next one names the
/// next server's session, and a client can replace one hop without touching the others.
pub type SessionId = u64;

/// A half-open range of transformer blocks `[start, end)`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockSpan {
    /// First block served.
    pub start: u32,
    /// One past the last block served.
    pub end: u32,
}

impl BlockSpan {
    /// Builds `[start, end)`.
    pub fn new(start: u32, end: u32) -> Self {
        BlockSpan { start, end }
    }
    /// Number of blocks.
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }
    /// True when the span holds no block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// True when `other` lies inside this span.
    pub fn contains(&self, other: &BlockSpan) -> bool {
        self.start <= other.start && other.end <= self.end
    }
}

impl std::fmt::Display for BlockSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// Whether other nodes can dial a server, as it found out itself (libp2p AutoNAT: a
/// peer is asked to dial it back).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Not found out (yet): no peer able to tell has answered, or every address is a
    /// private one (a LAN, loopback), which reachability is never tested for.
    #[default]
    Unknown,
    /// Dialled back from outside at an address it announces.
    Public,
    /// Behind a NAT or firewall, with no relay slot (yet): others cannot reach it.
    Private,
    /// Behind a NAT or firewall, reachable through a relay (its announced
    /// `/p2p-circuit` addresses); a direct connection may follow by hole punching.
    Relayed,
}

impl std::fmt::Display for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reachability::Unknown => "unknown",
            Reachability::Public => "public",
            Reachability::Private => "private",
            Reachability::Relayed => "relayed",
        })
    }
}

/// What a server tells the swarm about itself. Stored in the DHT under a key derived
/// from the model id and the peer id, and also returned by [`Request::Info`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Announcement {
    /// The server's libp2p peer id (base58).
    pub peer_id: String,
    /// Which model this is (see `shard::ModelId`): servers and clients must agree on it.
    pub model_id: String,
    /// Blocks served.
    pub span: BlockSpan,
    /// Blocks in the whole model, so tools can tell which blocks nobody serves.
    pub n_blocks: u32,
    /// Measured tokens per second of one decode step over the whole span.
    pub throughput: f32,
    /// KV-cache tokens still free for new sessions.
    pub free_cache_tokens: u64,
    /// Sessions open now (routing spreads clients by it).
    pub sessions: u32,
    /// Longest sequence (prompt + completion) a session may reach.
    pub max_seq_len: u32,
    /// Version of the `shoal` binary that serves it.
    pub version: String,
    /// A name the operator chose, shown by status tools.
    pub public_name: String,
    /// Addresses the server listens on, so a client can dial it from the record alone;
    /// behind a NAT, its addresses through relays (`.../p2p/<relay>/p2p-circuit`).
    pub addrs: Vec<String>,
    /// Whether it can be dialled directly.
    pub reachability: Reachability,
    /// Unix time in milliseconds after which the record is stale.
    pub expires_unix_ms: u64,
    /// The size of the whole model.
    pub params: ModelParams,
}

/// How many weights a model has, and how many one token computes with: the same for a
/// dense model; for a mixture of experts, the experts a token does not use are left out
/// (Qwen3-30B-A3B: about 30.5B total, 3.3B active).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ModelParams {
    /// Every weight, embeddings and all experts included.
    pub total: u64,
    /// The weights one token computes with.
    pub active: u64,
}

/// One server of a chain, as named inside a [`Step`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Hop {
    /// Peer id (base58).
    pub peer: String,
    /// Blocks this hop runs for the session.
    pub span: BlockSpan,
    /// Where to reach it (multiaddrs as text), so the previous server can dial it even
    /// if the two have never met.
    pub addrs: Vec<String>,
    /// The session id the client opened on this hop.
    pub session: SessionId,
}

/// Opens a session on a server for `span` (a sub-span of what the server announces).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OpenSession {
    /// Client-chosen id.
    pub session: SessionId,
    /// Must equal the server's model id.
    pub model_id: String,
    /// Blocks to run for this session.
    pub span: BlockSpan,
    /// Longest sequence the session will reach: the server reserves cache for it.
    pub max_len: u32,
    /// Element type of hidden states the server sends on.
    pub wire_dtype: WireDType,
}

/// One forward step: hidden states for positions `position..position + tokens`.
///
/// Step indices only grow within a session: a server refuses an index it has already
/// passed, so a retried step is never applied twice. Replays after a failover take fresh
/// indices from the same counter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Step {
    /// Session the step belongs to.
    pub session: SessionId,
    /// Index of the step in the session, counted by the client from 0.
    pub step: u64,
    /// Position of the first token in `hidden`.
    pub position: u32,
    /// Input hidden states, `[tokens, hidden]`.
    pub hidden: HiddenState,
    /// Servers still to run after this one, in order; empty on the last server.
    pub next: Vec<Hop>,
    /// The client's peer id: where the final output and failures go.
    pub reply_to: String,
}

/// A server's output for a step, sent to the client by every server of the chain: from
/// the last one it is the result; from the others it is a copy of what the next server
/// received, which the client keeps so it can rebuild a replacement server's cache.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// The sending server's session.
    pub session: SessionId,
    /// The step's index.
    pub step: u64,
    /// Position of the first token.
    pub position: u32,
    /// Output hidden states of the server's last block, `[tokens, hidden]`.
    pub hidden: HiddenState,
}

/// A step that could not complete, reported to the client by the server that saw it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StepFailed {
    /// Session the step belongs to.
    pub session: SessionId,
    /// The step's index.
    pub step: u64,
    /// Peer that failed: the reporting server itself or the next hop it could not reach.
    pub peer: String,
    /// What went wrong.
    pub error: ErrorInfo,
}

/// The control plane: requests of [`crate::INFERENCE_PROTOCOL`] (request-response),
/// each answered by exactly one [`Response`]. Sessions, probes and lookups; nothing per
/// token travels here.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Request {
    /// Ask a server what it serves.
    Info,
    /// Open a session.
    Open(OpenSession),
    /// Free a session's cache.
    Close {
        /// The session to close.
        session: SessionId,
    },
    /// A server that is leaving tells a session's client to move it (the report's kind
    /// is [`ErrorKind::Leaving`]). Sent as a request, not a [`Frame`]: the answer tells
    /// the server the client has it before the process exits, where a frame written
    /// just before exiting may never leave the machine.
    Leaving(StepFailed),
    /// Change the longest sequence an open session may reach: a client keeping a
    /// conversation's session between turns shrinks it to the tokens it holds (freeing
    /// the rest of its reservation) and grows it for the next turn. Answered with
    /// [`Response::Opened`] and the new length, or an error ([`ErrorKind::Busy`]: no
    /// room; [`ErrorKind::UnknownSession`]: the server has dropped it). Appended last,
    /// so every earlier message keeps its encoding: a server too old to know it fails
    /// to decode it and the client opens a fresh session instead.
    Resize {
        /// The session.
        session: SessionId,
        /// Its new longest sequence. Positions the server holds past it are dropped
        /// (drafts the client rejected: a client takes its session back without a
        /// round trip, and the server drops them at the next step or here).
        max_len: u32,
    },
}

/// The data plane: one-way frames of [`crate::DATA_PROTOCOL`], never answered. What
/// travels per token: steps along the chain, and outputs and failure reports back to
/// the client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Frame {
    /// Run a step and push its output on.
    Step(Step),
    /// Final hidden states of a step (or a copy of a server's output), server to client.
    Output(StepOutput),
    /// A step failed somewhere in the chain, server to client.
    Failed(StepFailed),
}

impl Frame {
    /// Bytes of hidden states the frame carries (what a link's bandwidth is spent on).
    pub fn hidden_bytes(&self) -> usize {
        match self {
            Frame::Step(s) => s.hidden.bytes.len(),
            Frame::Output(o) => o.hidden.bytes.len(),
            Frame::Failed(_) => 0,
        }
    }
}

/// Replies on the control plane ([`crate::INFERENCE_PROTOCOL`]). Every [`Request`]
/// gets exactly one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Response {
    /// Reply to [`Request::Info`].
    Info(Announcement),
    /// The session is open; `max_len` is what the server granted.
    Opened {
        /// The session.
        session: SessionId,
        /// Granted maximum sequence length.
        max_len: u32,
    },
    /// The request was taken.
    Accepted,
    /// The request was refused.
    Error(ErrorInfo),
}

/// Why a request was refused.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The frame or its fields make no sense (wrong shape, bad bytes).
    BadRequest,
    /// No such session on this server (closed, expired, never opened).
    UnknownSession,
    /// The server hosts another model.
    WrongModel,
    /// The requested blocks are not all served here.
    SpanNotServed,
    /// The sequence would exceed the allowed length.
    TooLong,
    /// The server is at a limit (sessions, cache); try another.
    Busy,
    /// The next server in the chain could not be reached.
    Unreachable,
    /// The model computation failed.
    Internal,
    /// The server is shutting down: its sessions must move to other servers. Sent to
    /// each open session's client, whatever step it is at.
    Leaving,
    /// The server serves only the clients on its allow list.
    Forbidden,
    /// The weights asked for are not held here (another model, or a tensor outside
    /// this node's part of the model).
    NotHeld,
}

impl ErrorKind {
    /// A short snake_case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::UnknownSession => "unknown_session",
            ErrorKind::WrongModel => "wrong_model",
            ErrorKind::SpanNotServed => "span_not_served",
            ErrorKind::TooLong => "too_long",
            ErrorKind::Busy => "busy",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Internal => "internal",
            ErrorKind::Leaving => "leaving",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotHeld => "not_held",
        }
    }
}

/// A refusal: a kind for programs and a message for people.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorInfo {
    /// Category.
    pub kind: ErrorKind,
    /// Human-readable detail.
    pub message: String,
}

impl ErrorInfo {
    /// Builds an error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorInfo {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}
