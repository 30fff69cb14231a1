//! The discrete-event engine.
//!
//! Virtual time only moves when the next event is taken from a queue ordered by (time,
//! sequence), so a run is a pure function of the topology and the seed. Every decision a
//! real node or client makes — span choice, rebalancing, routes, bans — is made here by
//! the same `coordinator` functions; only time comes from a cost model:
//!
//! - compute: a batch of `t` rows over `b` blocks, its sessions at contexts `c`, takes
//!   `max(flops / node_flops, bytes / node_bandwidth) + step_overhead`, with
//!   `flops = b (2 P t + 4 h Σ c t)` and `bytes = b (weight bytes + Σ c kv bytes)`:
//!   the weights are read once for all rows, so rows are nearly free until compute
//!   binds;
//! - batching: steps of several clients that reach a node while it is busy wait for
//!   its current batch to end and then run together, as one batch (as a server
//!   batches the steps it has when it starts one). A step that joins a batch that is
//!   already scheduled but not started delays it; the steps already in it keep the
//!   end they were given (a small error);
//! - transfer: half the regions' round trip plus `t h 4 bytes` over the slower of the
//!   sender's uplink and the receiver's downlink. A server's uplink carries its output
//!   to the next server and then a copy to the client (kept for replays after a
//!   failure); a send waits for the uplink to be free;
//! - the client: after each step's output arrives it spends its own `step_ms` (LM
//!   head, sampling) and, speculating, `draft_ms` per token it proposes, before the
//!   next step leaves. A speculating client's decode step carries `1 + drafts` rows
//!   and gives `1 + drafts x acceptance` tokens (the group's averages);
//! - queueing: a node runs one batch at a time, in the order steps are simulated (a
//!   step is simulated whole when it starts, so a later step that would reach a node
//!   first still queues behind it: a small error, noted here so nobody trusts it more);
//! - failures: a step that reaches a departed or moved node is noticed after the client's
//!   timeout and probe (as in `node::client`), the node is banned, the chain is re-planned
//!   from its first block, and the replacements replay the history before the step goes on.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::time::Duration;

use coordinator::{Bans, ServerView, SpanView};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::model::ModelShape;
use crate::report::{Percentiles, Report};
use crate::topology::{parse_span, Topology};

/// KV-cache tokens a node reserves per block it serves (what `shoal serve` keeps room
/// for when its budget allows). How many blocks fit a node's memory is
/// `coordinator::budget`'s decision, as in `shoal serve`.
const CACHE_TOKENS: usize = 4096;
/// Reading a span's weights from disk when joining or moving, bytes per second.
const LOAD_BYTES_PER_S: f64 = 1.0e9;
/// The client's liveness probe of a suspected server (its step timeout is
/// `coordinator::timeouts::step_timeout`, as in `node::client`).
const PROBE_S: f64 = coordinator::timeouts::DEATH_PROBE_TIMEOUT.as_secs_f64();
/// How long a client waits for a route before the generation counts as lost.
const ROUTE_TIMEOUT_S: f64 = 20.0;
/// Retry interval while no route exists.
const ROUTE_RETRY_S: f64 = 1.0;
/// Servers per block a client considers when planning (the best by expected time). A
/// real client sees every server; with thousands, the best few per block decide.
const CANDIDATES_PER_BLOCK: usize = 8;
/// Interval of the "blocks uncovered" samples.
const SAMPLE_S: f64 = 60.0;
/// Move only for this gain of the weakest block (as `shoal serve`'s default).
const REBALANCE_THRESHOLD: f32 = 0.15;

#[derive(Clone, Copy, Debug)]
enum Ev {
    NodeJoin(usize),
    NodeLeave(usize),
    Rebalance(usize),
    Client(usize),
    Sample,
    Region(usize, bool),
}

struct Node {
    group: usize,
    region: usize,
    alive: bool,
    span: (u32, u32),
    throughput: f32,
    /// When the last batch scheduled on it ends.
    busy_until: f64,
    /// That batch.
    batch: Batch,
    /// When its uplink has sent all it was given.
    uplink_free: f64,
    auto: bool,
    /// Counted in `members`/`tput` (alive, and its region reachable).
    present: bool,
    /// Clients whose route includes it.
    sessions: u32,
}

/// The rows of one batch on a node: what it costs.
#[derive(Clone, Copy, Debug, Default)]
struct Batch {
    start: f64,
    blocks: u32,
    /// Rows through the weights.
    rows: f64,
    /// Sum over rows of the context each attends over.
    attended: f64,
    /// Sum over sessions of their contexts (cache read once per session).
    cached: f64,
}

struct Client {
    region: usize,
    group: usize,
    route: Vec<(usize, u32, u32)>,
    /// Tokens already through the whole chain.
    pos: u32,
    /// Tokens of this generation so far (fractional: a speculating client gains an
    /// average number per step).
    generated: f64,
    /// Block to re-plan from after a failure (None: not recovering).
    replan_from: Option<u32>,
    waiting_since: Option<f64>,
    bans: Bans,
    step_ewma: Option<f64>,
    tokens: f64,
}

/// Options of a run besides the topology.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Overrides the topology's seed.
    pub seed: Option<u64>,
}

struct Sim<'a> {
    topo: &'a Topology,
    model: ModelShape,
    rng: StdRng,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    payloads: Vec<Ev>,
    seq: u64,
    now: f64,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    members: Vec<Vec<usize>>,
    tput: Vec<f32>,
    region_up: Vec<bool>,
    // Results.
    decode_latencies: Vec<f32>,
    /// Per decode step, its time per token gained.
    token_times: Vec<f32>,
    completed: u64,
    lost: u64,
    reroutes: u64,
    rebalances: u64,
    uncovered: Vec<(f64, u32)>,
    events: u64,
}

fn nanos(t: f64) -> u64 {
    (t * 1e9) as u64
}

impl<'a> Sim<'a> {
    fn push(&mut self, at: f64, ev: Ev) {
        self.payloads.push(ev);
        self.queue.push(Reverse((nanos(at), self.seq)));
        self.seq += 1;
    }

    fn rtt(&self, a: usize, b: usize) -> f64 {
        let to = &self.topo.regions[b].name;
        self.topo.regions[a]
            .rtt_ms
            .get_ref()
            .get(to)
            .copied()
            .unwrap_or(0.0)
            / 1e3
    }

    fn exp(&mut self, mean: f64) -> f64 {
        let u: f64 = self.rng.random::<f64>();
        -mean * (1.0 - u).ln()
    }

    /// One session's step of `tokens` rows at context `ctx` on its own.
    fn compute_s(&self, node: usize, blocks: u32, tokens: u32, ctx: u32) -> f64 {
        let (t, c) = (tokens as f64, ctx as f64);
        self.batch_s(
            node,
            &Batch {
                start: 0.0,
                blocks,
                rows: t,
                attended: c * t,
                cached: c,
            },
        )
    }

    /// A batch's time on `node`.
    fn batch_s(&self, node: usize, batch: &Batch) -> f64 {
        let g = &self.topo.nodes[self.nodes[node].group];
        let m = &self.model;
        let b = batch.blocks as f64;
        // A mixture of experts computes with the experts its tokens use and reads those.
        let flops =
            b * (2.0 * m.params_per_token() * batch.rows + 4.0 * m.hidden as f64 * batch.attended);
        let read = m.params_read(batch.rows.ceil() as u32);
        let bytes = b * (read * m.bytes_per_param + batch.cached * m.kv_bytes_per_token);
        (flops / (g.tflops * 1e12)).max(bytes / (g.mem_bandwidth_gbs * 1e9))
            + g.step_overhead_ms / 1e3
    }

    /// Runs a step of `rows` rows at context `ctx` over `blocks` blocks on node `n`,
    /// arriving at `t`: in a batch of its own if the node is free, else in the batch
    /// after the current one. Returns when its output is ready.
    fn run_on(&mut self, n: usize, t: f64, blocks: u32, rows: f64, ctx: f64) -> f64 {
        let step = Batch {
            start: t,
            blocks,
            rows,
            attended: ctx * rows,
            cached: ctx,
        };
        let node = &self.nodes[n];
        let batch = if t >= node.busy_until {
            step
        } else if node.batch.start > t {
            // Scheduled, not started: join it.
            let b = node.batch;
            Batch {
                start: b.start,
                blocks: b.blocks.max(blocks),
                rows: b.rows + rows,
                attended: b.attended + step.attended,
                cached: b.cached + ctx,
            }
        } else {
            // Running: the next batch starts when it ends.
            Batch {
                start: node.busy_until,
                ..step
            }
        };
        let done = batch.start + self.batch_s(n, &batch);
        let node = &mut self.nodes[n];
        node.batch = batch;
        node.busy_until = node.busy_until.max(done);
        done
    }

    /// Sends `tokens` rows from node `n` (done computing at `t`) over its uplink to a
    /// receiver in `to_region` with `down_mbps`; returns the arrival.
    fn send_from(
        &mut self,
        n: usize,
        t: f64,
        to_region: usize,
        down_mbps: f64,
        tokens: f64,
    ) -> f64 {
        let g = &self.topo.nodes[self.nodes[n].group];
        let start = t.max(self.nodes[n].uplink_free);
        let bits = self.model.hidden_bytes(1) * tokens * 8.0;
        let wire = bits / (g.uplink_mbps.min(down_mbps) * 1e6);
        self.nodes[n].uplink_free = start + wire;
        start + wire + self.rtt(self.nodes[n].region, to_region) / 2.0
    }

    fn transfer_s(
        &self,
        from_region: usize,
        up_mbps: f64,
        to_region: usize,
        down_mbps: f64,
        tokens: f64,
    ) -> f64 {
        let bits = self.model.hidden_bytes(1) * tokens * 8.0;
        self.rtt(from_region, to_region) / 2.0 + bits / (up_mbps.min(down_mbps) * 1e6)
    }

    fn set_presence(&mut self, n: usize, present: bool) {
        if self.nodes[n].present == present {
            return;
        }
        self.nodes[n].present = present;
        let (s, e) = self.nodes[n].span;
        let t = self.nodes[n].throughput;
        for b in s..e {
            if present {
                self.members[b as usize].push(n);
                self.tput[b as usize] += t;
            } else {
                self.members[b as usize].retain(|&x| x != n);
                self.tput[b as usize] = (self.tput[b as usize] - t).max(0.0);
                if self.members[b as usize].is_empty() {
                    self.tput[b as usize] = 0.0;
                }
            }
        }
    }

    fn node_join(&mut self, group: usize) {
        let g = &self.topo.nodes[group];
        let region = self.topo.region_index(g.region.get_ref()).unwrap_or(0);
        let n_blocks = self.model.blocks;
        let (span, auto) = match g.blocks.as_ref().and_then(|b| parse_span(b.get_ref())) {
            Some(s) => (s, false),
            None => {
                let fit = self
                    .model
                    .blocks_in((g.memory_gb * 1e9) as u64, CACHE_TOKENS)
                    as u32;
                if fit == 0 {
                    return; // too small to hold a block: it never joins
                }
                (
                    coordinator::choose_span_in(&self.tput, fit.min(n_blocks)),
                    true,
                )
            }
        };
        let (lifetime, rebalance) = (g.lifetime_s, self.topo.rebalance_interval_s);
        let n = self.nodes.len();
        self.nodes.push(Node {
            group,
            region,
            alive: true,
            span,
            throughput: 0.0,
            busy_until: 0.0,
            batch: Batch::default(),
            uplink_free: 0.0,
            auto,
            present: false,
            sessions: 0,
        });
        let len = span.1 - span.0;
        self.nodes[n].throughput = (1.0 / self.compute_s(n, len, 1, 0)) as f32;
        self.nodes[n].busy_until =
            self.now + len as f64 * self.model.block_bytes() / LOAD_BYTES_PER_S;
        let up = self.region_up[region];
        self.set_presence(n, up);
        if let Some(mean) = lifetime {
            let at = self.now + self.exp(mean);
            self.push(at, Ev::NodeLeave(n));
        }
        if auto && rebalance > 0.0 {
            let at = self.now
                + coordinator::jittered(Duration::from_secs_f64(rebalance), &mut self.rng)
                    .as_secs_f64();
            self.push(at, Ev::Rebalance(n));
        }
    }

    fn node_leave(&mut self, n: usize) {
        if !self.nodes[n].alive {
            return;
        }
        self.set_presence(n, false);
        self.nodes[n].alive = false;
        let g = self.nodes[n].group;
        let at = self.now + self.topo.nodes[g].rejoin_s;
        self.push(at, Ev::NodeJoin(g));
    }

    fn rebalance(&mut self, n: usize) {
        if !self.nodes[n].alive {
            return;
        }
        let interval = self.topo.rebalance_interval_s;
        let at = self.now
            + coordinator::jittered(Duration::from_secs_f64(interval), &mut self.rng).as_secs_f64();
        self.push(at, Ev::Rebalance(n));
        if !self.nodes[n].present {
            return;
        }
        let node = &self.nodes[n];
        let me = SpanView {
            start: node.span.0,
            end: node.span.1,
            throughput: node.throughput,
        };
        let mut others = self.tput.clone();
        for b in me.start..me.end {
            others[b as usize] = (others[b as usize] - me.throughput).max(0.0);
            if self.members[b as usize].len() <= 1 {
                others[b as usize] = 0.0;
            }
        }
        if let Some((s, e)) = coordinator::should_move_in(&others, me, REBALANCE_THRESHOLD) {
            self.set_presence(n, false);
            self.nodes[n].span = (s, e);
            let load = (e - s) as f64 * self.model.block_bytes() / LOAD_BYTES_PER_S;
            self.nodes[n].busy_until = self.nodes[n].busy_until.max(self.now) + load;
            self.set_presence(n, true);
            self.rebalances += 1;
        }
    }

    /// The fastest chain from block `from` for client `c`, over the best few servers
    /// per block, decided by `coordinator::plan_route`.
    fn plan(&mut self, c: usize, from: u32) -> Option<Vec<(usize, u32, u32)>> {
        let region = self.clients[c].region;
        let now = Duration::from_secs_f64(self.now);
        let mut picked: Vec<usize> = Vec::new();
        let mut seen: HashSet<usize> = HashSet::new();
        let banned: HashSet<usize> = self.clients[c]
            .bans
            .banned(now)
            .filter_map(|p| p.parse().ok())
            .collect();
        for b in from..self.model.blocks {
            let mut cands: Vec<(f64, usize)> = self.members[b as usize]
                .iter()
                .filter(|&&n| !banned.contains(&n))
                .map(|&n| {
                    let node = &self.nodes[n];
                    let per_block =
                        1.0 / (node.throughput as f64 * (node.span.1 - node.span.0) as f64);
                    (self.rtt(region, node.region) + per_block, n)
                })
                .collect();
            let k = CANDIDATES_PER_BLOCK.min(cands.len());
            if k == 0 {
                return None;
            }
            cands.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for &(_, n) in &cands[..k] {
                if seen.insert(n) {
                    picked.push(n);
                }
            }
        }
        picked.sort_unstable();
        let views: Vec<ServerView> = picked
            .iter()
            .map(|&n| {
                let node = &self.nodes[n];
                ServerView {
                    id: n.to_string(),
                    start: node.span.0,
                    end: node.span.1,
                    throughput: node.throughput,
                    rtt: Some(self.rtt(region, node.region) as f32),
                    sessions: node.sessions,
                    relayed: false,
                }
            })
            .collect();
        let route = coordinator::plan_route(&views, from, self.model.blocks).ok()?;
        Some(
            route
                .iter()
                .map(|h| (picked[h.server], h.start, h.end))
                .collect(),
        )
    }

    /// Drops hops `from..` of client `c`'s route, releasing their sessions.
    fn truncate_route(&mut self, c: usize, from: usize) {
        let dropped: Vec<usize> = self.clients[c].route.drain(from..).map(|h| h.0).collect();
        for n in dropped {
            self.nodes[n].sessions = self.nodes[n].sessions.saturating_sub(1);
        }
    }

    fn next_generation(&mut self, c: usize, at: f64) {
        self.truncate_route(c, 0);
        let cl = &mut self.clients[c];
        cl.pos = 0;
        cl.generated = 0.0;
        cl.replan_from = None;
        cl.waiting_since = None;
        self.push(at, Ev::Client(c));
    }

    fn client(&mut self, c: usize) {
        let group = &self.topo.clients[self.clients[c].group];
        let (prompt, new_tokens, think) = (group.prompt_tokens, group.new_tokens, group.think_s);
        let (client_s, link_mbps) = (group.step_ms / 1e3, group.link_mbps);
        let speculate = group.speculate.clone();
        // Plan (a new generation, or a failover).
        let needs_plan = self.clients[c].route.is_empty() || self.clients[c].replan_from.is_some();
        if needs_plan {
            let from = self.clients[c].replan_from.unwrap_or(0);
            match self.plan(c, from) {
                None => {
                    let since = *self.clients[c].waiting_since.get_or_insert(self.now);
                    if self.now - since > ROUTE_TIMEOUT_S {
                        self.lost += 1;
                        let at = self.now + think;
                        self.next_generation(c, at);
                    } else {
                        let at = self.now + ROUTE_RETRY_S;
                        self.push(at, Ev::Client(c));
                    }
                    return;
                }
                Some(tail) => {
                    self.clients[c].waiting_since = None;
                    let recovering = self.clients[c].replan_from.take().is_some();
                    // Replay: the new servers rebuild their caches step by step.
                    let mut replay = 0.0;
                    if recovering && self.clients[c].pos > 0 {
                        let pos = self.clients[c].pos;
                        for &(n, s, e) in &tail {
                            replay += self.compute_s(n, e - s, prompt.min(pos), 0);
                            for ctx in prompt..pos {
                                replay += self.compute_s(n, e - s, 1, ctx);
                            }
                        }
                        self.reroutes += 1;
                    } else if recovering {
                        self.reroutes += 1;
                    }
                    for &(n, _, _) in &tail {
                        self.nodes[n].sessions += 1;
                    }
                    self.clients[c].route.extend(tail);
                    if replay > 0.0 {
                        let at = self.now + replay;
                        self.push(at, Ev::Client(c));
                        return;
                    }
                }
            }
        }
        // Run one step through the chain: the prompt, a token, or a token and drafts.
        let (pos, region) = (self.clients[c].pos, self.clients[c].region);
        let (rows, gain, drafting_s) = match (&speculate, pos) {
            (_, 0) => (prompt as f64, 1.0, 0.0),
            (Some(s), _) => (
                1.0 + s.drafts,
                1.0 + s.drafts * s.acceptance,
                s.drafts * s.draft_ms / 1e3,
            ),
            (None, _) => (1.0, 1.0, 0.0),
        };
        let mut t = self.now;
        let route = self.clients[c].route.clone();
        for (i, &(n, s, e)) in route.iter().enumerate() {
            let g = &self.topo.nodes[self.nodes[n].group];
            if i == 0 {
                t += self.transfer_s(
                    region,
                    link_mbps,
                    self.nodes[n].region,
                    g.downlink_mbps,
                    rows,
                );
            }
            let node = &self.nodes[n];
            let serving = node.present && node.span.0 <= s && e <= node.span.1;
            if !serving {
                // A decode step's timeout, as the node's client sets it; the simulated
                // client keeps no prediction from announced speeds (0: none), so before
                // its first step it waits the floor.
                let timeout =
                    coordinator::timeouts::step_timeout(self.clients[c].step_ewma, 0.0, 1)
                        .as_secs_f64();
                let noticed = self.now.max(t) + timeout + PROBE_S;
                let now = Duration::from_secs_f64(self.now);
                self.clients[c].bans.fail(&n.to_string(), now);
                self.truncate_route(c, i);
                self.clients[c].replan_from = Some(s);
                self.push(noticed, Ev::Client(c));
                return;
            }
            let done = self.run_on(n, t, e - s, rows, pos as f64);
            // The output to the next server (or, from the last, to the client), then
            // the client's copy on the same uplink.
            match route.get(i + 1) {
                Some(&(next, _, _)) => {
                    let down = self.topo.nodes[self.nodes[next].group].downlink_mbps;
                    let to = self.nodes[next].region;
                    t = self.send_from(n, done, to, down, rows);
                    let sent = self.nodes[n].uplink_free;
                    self.send_from(n, sent, region, link_mbps, rows);
                }
                None => t = self.send_from(n, done, region, link_mbps, rows),
            }
        }
        // The client's own work before its next step leaves.
        t += client_s + drafting_s;
        let latency = t - self.now;
        let cl = &mut self.clients[c];
        let gained = if pos > 0 {
            self.decode_latencies.push(latency as f32);
            self.token_times.push((latency / gain) as f32);
            cl.step_ewma = Some(cl.step_ewma.map_or(latency, |p| 0.8 * p + 0.2 * latency));
            gain.min(new_tokens as f64 - cl.generated)
        } else {
            1.0
        };
        cl.generated += gained;
        cl.tokens += gained;
        cl.pos = prompt + cl.generated.floor() as u32;
        if cl.generated >= new_tokens as f64 {
            self.completed += 1;
            self.next_generation(c, t + think);
        } else {
            self.push(t, Ev::Client(c));
        }
    }

    fn sample(&mut self) {
        let uncovered = self.tput.iter().filter(|x| **x <= 0.0).count() as u32;
        self.uncovered.push((self.now, uncovered));
        let at = self.now + SAMPLE_S;
        self.push(at, Ev::Sample);
    }

    fn region(&mut self, r: usize, up: bool) {
        self.region_up[r] = up;
        for n in 0..self.nodes.len() {
            if self.nodes[n].region == r && self.nodes[n].alive {
                self.set_presence(n, up);
            }
        }
    }
}

/// Runs a topology to its end; `progress(fraction)` is called as virtual time passes.
pub fn run(topo: &Topology, opts: &Options, mut progress: impl FnMut(f64)) -> Report {
    let model = topo.model();
    let seed = opts.seed.unwrap_or(topo.seed);
    let mut sim = Sim {
        topo,
        rng: StdRng::seed_from_u64(seed),
        queue: BinaryHeap::new(),
        payloads: Vec::new(),
        seq: 0,
        now: 0.0,
        nodes: Vec::new(),
        clients: Vec::new(),
        members: vec![Vec::new(); model.blocks as usize],
        tput: vec![0.0; model.blocks as usize],
        region_up: vec![true; topo.regions.len()],
        decode_latencies: Vec::new(),
        token_times: Vec::new(),
        completed: 0,
        lost: 0,
        reroutes: 0,
        rebalances: 0,
        uncovered: Vec::new(),
        events: 0,
        model,
    };
    // Nodes of a group join one after another (a millisecond apart), as real nodes
    // started together would each see the ones before them.
    let mut order = 0u64;
    for (g, group) in topo.nodes.iter().enumerate() {
        for _ in 0..group.count {
            sim.push(group.start_s + order as f64 * 1e-3, Ev::NodeJoin(g));
            order += 1;
        }
    }
    for (g, group) in topo.clients.iter().enumerate() {
        let region = topo.region_index(group.region.get_ref()).unwrap_or(0);
        for i in 0..group.count {
            let c = sim.clients.len();
            sim.clients.push(Client {
                region,
                group: g,
                route: Vec::new(),
                pos: 0,
                generated: 0.0,
                replan_from: None,
                waiting_since: None,
                bans: Bans::default(),
                step_ewma: None,
                tokens: 0.0,
            });
            // Clients start after the nodes they need, spread over a second.
            let at =
                group.start_s + order as f64 * 1e-3 + 1.0 + i as f64 / group.count.max(1) as f64;
            sim.push(at, Ev::Client(c));
        }
    }
    for e in &topo.events {
        let r = topo.region_index(e.region.get_ref()).unwrap_or(0);
        sim.push(e.at_s, Ev::Region(r, e.kind.get_ref() == "region_up"));
    }
    sim.push(SAMPLE_S, Ev::Sample);
    let end = nanos(topo.duration_s);
    let mut last_report = 0u64;
    while let Some(Reverse((at, seq))) = sim.queue.pop() {
        if at > end {
            break;
        }
        sim.now = at as f64 / 1e9;
        sim.events += 1;
        match sim.payloads[seq as usize] {
            Ev::NodeJoin(g) => sim.node_join(g),
            Ev::NodeLeave(n) => sim.node_leave(n),
            Ev::Rebalance(n) => sim.rebalance(n),
            Ev::Client(c) => sim.client(c),
            Ev::Sample => sim.sample(),
            Ev::Region(r, up) => sim.region(r, up),
        }
        if at - last_report > end / 100 {
            last_report = at;
            progress(at as f64 / end as f64);
        }
    }
    progress(1.0);
    let duration = topo.duration_s;
    let per_client: Vec<f64> = sim
        .clients
        .iter()
        .map(|c| {
            let start = topo.clients[c.group].start_s;
            c.tokens / (duration - start).max(1e-9)
        })
        .collect();
    let total_tokens = sim.clients.iter().map(|c| c.tokens).sum::<f64>().round() as u64;
    let mean_decode = if sim.token_times.is_empty() {
        0.0
    } else {
        sim.token_times.iter().map(|x| *x as f64).sum::<f64>() / sim.token_times.len() as f64
    };
    Report {
        topology: topo.name.clone(),
        model: sim.model.name.clone(),
        seed,
        duration_s: duration,
        nodes_started: sim.nodes.len() as u64,
        nodes_alive_at_end: sim.nodes.iter().filter(|n| n.alive).count() as u64,
        clients: sim.clients.len() as u64,
        generations_completed: sim.completed,
        generations_lost: sim.lost,
        tokens_generated: total_tokens,
        tokens_per_second_total: total_tokens as f64 / duration,
        tokens_per_second_per_client: Percentiles::of(&per_client),
        decode_tokens_per_second: if mean_decode > 0.0 {
            1.0 / mean_decode
        } else {
            0.0
        },
        decode_step_latency_ms: Percentiles::of(
            &sim.decode_latencies
                .iter()
                .map(|x| *x as f64 * 1e3)
                .collect::<Vec<_>>(),
        ),
        reroutes: sim.reroutes,
        rebalances: sim.rebalances,
        uncovered_blocks: sim.uncovered,
        events: sim.events,
        auto_nodes: sim.nodes.iter().filter(|n| n.auto).count() as u64,
    }
}
