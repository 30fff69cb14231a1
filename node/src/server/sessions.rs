//! Sessions on a server: opening one (limits, allow list, cache), checking a step
//! against its session, and ending sessions (closed, idle, client gone).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use protocol::{
    BlockSpan, ErrorInfo, ErrorKind, OpenSession, Request, Response, SessionId, Step, WireDType,
};
use shard::KvCache;

use super::compute::Server;
use super::compute::SESSION_IDLE_TIMEOUT;
use crate::net::{Inbound, Presence};

/// A session's cache lives until the first of: its client closes it, its client's
/// presence ends (the client's last connection closed, or it came back as a new
/// process: see [`Server::drop_departed`]), it has been idle [`SESSION_IDLE_TIMEOUT`],
/// or the server moves to another span or shuts down.
pub(super) struct Session {
    /// The client that opened it (told when this server leaves).
    pub(super) client: PeerId,
    /// The client's presence when it opened the session; `None` if it was not
    /// connected by then (the session goes at the next sweep).
    pub(super) presence: Option<Presence>,
    pub(super) cache: KvCache,
    pub(super) wire: WireDType,
    /// Index of the last step applied: a step must carry a larger one.
    pub(super) last_step: Option<u64>,
    pub(super) last_used: Instant,
    /// Time between this session's last two steps: when its next one is due (see
    /// [`Server::due_soon`]).
    pub(super) period: Option<Duration>,
    /// The batch its last step ran in (see [`Server::due_soon`]).
    pub(super) batch: u64,
}

impl Session {
    /// Waiting between turns of a conversation: its cache is full to the length
    /// granted, so no step can run on it until its client resizes it, and a server
    /// short of cache may drop it ([`Server::make_room`]).
    pub(super) fn parked(&self) -> bool {
        self.cache.len() == self.cache.max_len()
    }
}

impl Server {
    pub(super) fn expire_idle(&mut self) {
        let now = Instant::now();
        self.end_sessions("it was idle too long", |_, s| {
            now.duration_since(s.last_used) >= SESSION_IDLE_TIMEOUT
        });
    }

    /// Drops the sessions whose client has gone: its presence ended (its last
    /// connection closed, or it came back as a new process that knows nothing of them).
    pub(super) fn drop_departed(&mut self) {
        let net = self.net.clone();
        self.end_sessions("its client has gone", |_, s| {
            s.presence.is_none() || net.presence(&s.client) != s.presence
        });
    }

    /// Ends every session `gone` picks, with all kept for it.
    pub(super) fn end_sessions(
        &mut self,
        why: &str,
        mut gone: impl FnMut(&SessionId, &Session) -> bool,
    ) {
        let ended: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(id, s)| gone(id, s))
            .map(|(id, _)| *id)
            .collect();
        if ended.is_empty() {
            return;
        }
        for id in &ended {
            if let Some(s) = self.sessions.remove(id) {
                tracing::info!(session = id, client = %s.client, "session ended: {why}");
            }
        }
        self.forwards.forget(&ended);
        self.refresh_public();
    }

    pub(super) fn handle(&mut self, inbound: Inbound) {
        let Inbound {
            peer,
            request,
            channel,
        } = inbound;
        match request {
            Request::Info => self
                .net
                .respond_blocking(channel, Response::Info(self.announcement())),
            Request::Open(open) => {
                let r = self.open(open, peer);
                self.answer_open(channel, r);
            }
            Request::Resize { session, max_len } => {
                let r = self.resize(session, max_len, peer);
                self.answer_open(channel, r);
            }
            Request::Close { session } => {
                // Only its own client may close a session.
                if self
                    .sessions
                    .get(&session)
                    .is_some_and(|s| s.client == peer)
                {
                    self.sessions.remove(&session);
                    self.forwards.forget(&[session]);
                }
                self.net.respond_blocking(channel, Response::Accepted);
                self.refresh_public();
            }
            Request::Leaving(_) => self.net.respond_blocking(
                channel,
                Response::Error(ErrorInfo::new(
                    ErrorKind::BadRequest,
                    "this node is a server; notices of leaving servers go to clients",
                )),
            ),
        }
    }

    /// Answers an open or a resize, counting refusals.
    fn answer_open(
        &mut self,
        channel: libp2p::request_response::ResponseChannel<Response>,
        r: Result<Response, ErrorInfo>,
    ) {
        let r = r.unwrap_or_else(|e| {
            self.metrics
                .refused_sessions
                .get_or_create(&[("kind", e.kind.name())])
                .inc();
            Response::Error(e)
        });
        self.net.respond_blocking(channel, r);
        self.refresh_public();
    }

    /// The cache tokens a new client could have here (what is announced): those free,
    /// and those of sessions parked between turns by clients holding more than their
    /// share once it comes (see [`Server::make_room`]).
    pub(super) fn offered_cache_tokens(&self) -> usize {
        let held = self.held_by_client();
        let share = self.limits.max_cache_tokens / (held.len() + 1);
        let parked: usize = self
            .sessions
            .values()
            .filter(|s| s.parked())
            .filter(|s| held.get(&s.client).is_some_and(|&h| h > share))
            .map(|s| s.cache.max_len())
            .sum();
        self.free_cache_tokens() + parked
    }

    /// Cache tokens reserved by each client's sessions.
    fn held_by_client(&self) -> HashMap<PeerId, usize> {
        let mut held: HashMap<PeerId, usize> = HashMap::new();
        for s in self.sessions.values() {
            *held.entry(s.client).or_default() += s.cache.max_len();
        }
        held
    }

    /// Makes room for `client` to hold one more session (when `new_session`) and
    /// reserve `tokens` more cache tokens, dropping sessions that wait between turns of
    /// a conversation if it must: those parked (their cache full to the length granted:
    /// no step can run on them until their client resizes them), least recently used
    /// first. A client's own parked sessions go first; another client's go only if that
    /// client holds more than its share of the cache (the budget over the clients
    /// holding sessions, the asking one counted) and the asking one stays within its
    /// own. So a gateway keeping many conversations warm uses the cache nobody else
    /// needs, and gives it back as others come; a client past its share pushes out no
    /// one else. Refused as [`ErrorKind::Busy`] when even that is not enough.
    fn make_room(
        &mut self,
        client: PeerId,
        new_session: bool,
        tokens: usize,
        keep: Option<SessionId>,
    ) -> Result<(), ErrorInfo> {
        let mut held = self.held_by_client();
        let clients = held.len() + usize::from(!held.contains_key(&client));
        let share = self.limits.max_cache_tokens / clients.max(1);
        let within = held.get(&client).copied().unwrap_or(0) + tokens <= share;
        let mut free = self.free_cache_tokens();
        let mut total = self.sessions.len();
        let new = usize::from(new_session);
        let fits = |free: usize, total: usize, mine: usize| {
            tokens <= free
                && total + new <= self.limits.max_sessions
                && mine + new <= self.limits.max_sessions_per_peer
        };
        let mut mine = self
            .sessions
            .values()
            .filter(|s| s.client == client)
            .count();
        let mut parked: Vec<(bool, Instant, SessionId, PeerId, usize)> = self
            .sessions
            .iter()
            .filter(|(id, s)| s.parked() && Some(**id) != keep)
            .map(|(id, s)| {
                let own = s.client == client;
                (!own, s.last_used, *id, s.client, s.cache.max_len())
            })
            .collect();
        parked.sort();
        let mut dropped = Vec::new();
        for (other, _, id, owner, reserved) in parked {
            if fits(free, total, mine) {
                break;
            }
            let over = held.get(&owner).is_some_and(|&h| h > share);
            if other && !(within && over) {
                continue;
            }
            dropped.push(id);
            free += reserved;
            total -= 1;
            if let Some(h) = held.get_mut(&owner) {
                *h -= reserved;
            }
            if !other {
                mine -= 1;
            }
        }
        if !dropped.is_empty() {
            self.end_sessions(
                "it was waiting between turns and its cache was needed",
                |id, _| dropped.contains(id),
            );
        }
        if self.sessions.len() + new > self.limits.max_sessions {
            return Err(ErrorInfo::new(
                ErrorKind::Busy,
                format!("{} sessions open, the limit", self.sessions.len()),
            ));
        }
        if mine + new > self.limits.max_sessions_per_peer {
            return Err(ErrorInfo::new(
                ErrorKind::Busy,
                format!(
                    "{mine} sessions open for this client, the limit per client (--max-sessions-per-peer)"
                ),
            ));
        }
        if tokens > free {
            let yours = held.get(&client).copied().unwrap_or(0);
            return Err(ErrorInfo::new(
                ErrorKind::Busy,
                format!(
                    "{tokens} more cache tokens asked for, {free} free (--max-cache-tokens {}; this client holds {yours}, its share is {share})",
                    self.limits.max_cache_tokens
                ),
            ));
        }
        Ok(())
    }

    /// A session length this server allows.
    fn check_length(&self, max_len: u32) -> Result<(), ErrorInfo> {
        if max_len == 0 || max_len as usize > self.limits.max_seq_len {
            return Err(ErrorInfo::new(
                ErrorKind::TooLong,
                format!(
                    "session of {max_len} tokens requested, this server allows 1..={}",
                    self.limits.max_seq_len
                ),
            ));
        }
        Ok(())
    }

    /// Changes an open session's longest sequence ([`Request::Resize`]).
    pub(super) fn resize(
        &mut self,
        session: SessionId,
        max_len: u32,
        client: PeerId,
    ) -> Result<Response, ErrorInfo> {
        let unknown = || {
            ErrorInfo::new(
                ErrorKind::UnknownSession,
                format!("no session {session} of this client"),
            )
        };
        let s = self
            .sessions
            .get(&session)
            .filter(|s| s.client == client)
            .ok_or_else(unknown)?;
        let reserved = s.cache.max_len();
        self.check_length(max_len)?;
        let wanted = max_len as usize;
        if wanted > reserved {
            self.make_room(client, false, wanted - reserved, Some(session))?;
        }
        let s = self.sessions.get_mut(&session).ok_or_else(unknown)?;
        // Positions past the new length are drafts its client rejected (it takes a
        // session back without a round trip, see `check_step`): dropped now.
        s.cache.truncate(wanted);
        s.cache
            .set_max_len(wanted)
            .map_err(|e| ErrorInfo::new(ErrorKind::BadRequest, e.to_string()))?;
        s.last_used = Instant::now();
        Ok(Response::Opened { session, max_len })
    }

    pub(super) fn open(
        &mut self,
        open: OpenSession,
        client: PeerId,
    ) -> Result<Response, ErrorInfo> {
        if self.draining {
            return Err(ErrorInfo::new(
                ErrorKind::Busy,
                "this server is shutting down",
            ));
        }
        if self
            .limits
            .allowed
            .as_ref()
            .is_some_and(|a| !a.contains(&client))
        {
            return Err(ErrorInfo::new(
                ErrorKind::Forbidden,
                format!("{client} is not on this server's --allow-peers list"),
            ));
        }
        if open.model_id != self.model_id {
            return Err(ErrorInfo::new(
                ErrorKind::WrongModel,
                format!("this server hosts {}, not {}", self.model_id, open.model_id),
            ));
        }
        let served = BlockSpan::new(self.span.start() as u32, self.span.end() as u32);
        if open.span.is_empty() || !served.contains(&open.span) {
            return Err(ErrorInfo::new(
                ErrorKind::SpanNotServed,
                format!("blocks {} requested, {} served", open.span, served),
            ));
        }
        self.check_length(open.max_len)?;
        if self.sessions.contains_key(&open.session) {
            return Err(ErrorInfo::new(
                ErrorKind::BadRequest,
                "session id already in use",
            ));
        }
        self.make_room(client, true, open.max_len as usize, None)?;
        let cache = self
            .span
            .new_cache_for(
                open.span.start as usize,
                open.span.end as usize,
                open.max_len as usize,
            )
            .map_err(|e| ErrorInfo::new(ErrorKind::SpanNotServed, e.to_string()))?;
        self.sessions.insert(
            open.session,
            Session {
                client,
                presence: self.net.presence(&client),
                cache,
                wire: open.wire_dtype,
                last_step: None,
                last_used: Instant::now(),
                period: None,
                batch: 0,
            },
        );
        Ok(Response::Opened {
            session: open.session,
            max_len: open.max_len,
        })
    }

    pub(super) fn check_step(&self, step: &Step) -> Result<(), ErrorInfo> {
        if self.draining {
            return Err(ErrorInfo::new(
                ErrorKind::Leaving,
                "the server is shutting down",
            ));
        }
        let s = self.sessions.get(&step.session).ok_or_else(|| {
            ErrorInfo::new(
                ErrorKind::UnknownSession,
                format!("no session {}", step.session),
            )
        })?;
        if let Some(last) = s.last_step.filter(|l| step.step <= *l) {
            return Err(ErrorInfo::new(
                ErrorKind::BadRequest,
                format!("step {} already applied (last step {last})", step.step),
            ));
        }
        // A step may start before the session's end: the positions from there on were
        // drafts its client has rejected (speculative decoding), dropped as it runs.
        if step.position as usize > s.cache.len() {
            return Err(ErrorInfo::new(
                ErrorKind::BadRequest,
                format!(
                    "step {} at position {}, but the session is at position {}",
                    step.step,
                    step.position,
                    s.cache.len()
                ),
            ));
        }
        step.hidden
            .validate()
            .map_err(|e| ErrorInfo::new(ErrorKind::BadRequest, e.to_string()))?;
        let hidden = self.span.config().hidden as u32;
        match step.hidden.shape[..] {
            [tokens, h] if h == hidden && tokens > 0 => {
                if step.position as usize + tokens as usize > s.cache.max_len() {
                    return Err(ErrorInfo::new(
                        ErrorKind::TooLong,
                        format!(
                            "{} tokens past position {} exceed the session's {}",
                            tokens,
                            step.position,
                            s.cache.max_len()
                        ),
                    ));
                }
            }
            _ => {
                return Err(ErrorInfo::new(
                    ErrorKind::BadRequest,
                    format!(
                        "hidden states of shape {:?}, expected [tokens, {hidden}]",
                        step.hidden.shape
                    ),
                ))
            }
        }
        if step.reply_to.parse::<PeerId>().is_err() {
            return Err(ErrorInfo::new(
                ErrorKind::BadRequest,
                "reply_to is not a peer id",
            ));
        }
        Ok(())
    }
}
