//! Topology files: the swarm to simulate, in TOML.
//!
//! ```toml
//! name = "home-lan"
//! model = "smollm2-135m"        # a preset (see `model::PRESETS`), or a [custom_model] table
//! duration_s = 600              # virtual time to simulate
//! seed = 1
//!
//! [[region]]
//! name = "home"
//! rtt_ms = { home = 0.5 }       # round trip to every region, itself included
//!
//! [[nodes]]                     # a group of identical nodes
//! count = 2
//! region = "home"
//! memory_gb = 8                 # memory for blocks and caches
//! tflops = 0.4                  # effective compute, TFLOP/s
//! mem_bandwidth_gbs = 20        # weights are read once per decode step
//! uplink_mbps = 1000
//! downlink_mbps = 1000
//! step_overhead_ms = 0.3        # optional: fixed cost of one step on a node
//! blocks = "0..15"              # optional; default: chosen like `shoal serve` without --blocks
//! lifetime_s = 1200             # optional churn: mean time before a node leaves...
//! rejoin_s = 60                 # ...and before a replacement joins
//! start_s = 0                   # optional: when the group appears
//!
//! [[clients]]
//! count = 1
//! region = "home"
//! prompt_tokens = 64
//! new_tokens = 128
//! think_s = 2.0                 # pause between generations
//! start_s = 0
//! step_ms = 1.5                 # optional: the client's own work per step (LM head, sampling)
//! link_mbps = 100               # optional: the client's link, both ways
//! speculate = { drafts = 3.4, acceptance = 0.47, draft_ms = 5.0 }   # optional
//!
//! [[events]]                    # optional scripted events
//! at_s = 300
//! kind = "region_down"          # or "region_up"
//! region = "home"
//! ```
//!
//! Errors name the line and the field: a file a person wrote deserves better than a
//! byte offset.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::model::{self, ModelShape};
use crate::SimError;

/// A parsed, checked topology.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Name shown in reports.
    pub name: String,
    /// What the topology is for.
    #[serde(default)]
    pub description: String,
    /// A preset model name.
    #[serde(default)]
    pub model: Option<Spanned<String>>,
    /// A model shape given in full, instead of `model`.
    #[serde(default)]
    pub custom_model: Option<ModelShape>,
    /// Virtual seconds to simulate.
    #[serde(default = "default_duration")]
    pub duration_s: f64,
    /// Seed of every random choice (`--seed` overrides it).
    #[serde(default)]
    pub seed: u64,
    /// Seconds between a node's checks whether to move its span (jittered).
    #[serde(default = "default_rebalance")]
    pub rebalance_interval_s: f64,
    /// Regions and the round trips between them.
    #[serde(rename = "region")]
    pub regions: Vec<Region>,
    /// Groups of nodes.
    pub nodes: Vec<NodeGroup>,
    /// Groups of clients.
    #[serde(default)]
    pub clients: Vec<ClientGroup>,
    /// Scripted events.
    #[serde(default)]
    pub events: Vec<Event>,
}

fn default_duration() -> f64 {
    600.0
}
fn default_rebalance() -> f64 {
    60.0
}

/// A region.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Its name.
    pub name: String,
    /// Round-trip time to each region (itself included), milliseconds.
    pub rtt_ms: Spanned<BTreeMap<String, f64>>,
}

/// A group of identical nodes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeGroup {
    /// How many.
    pub count: u32,
    /// Their region.
    pub region: Spanned<String>,
    /// Memory for blocks and KV caches, GB.
    pub memory_gb: f64,
    /// Effective compute, TFLOP/s.
    pub tflops: f64,
    /// Memory bandwidth, GB/s.
    pub mem_bandwidth_gbs: f64,
    /// Upload bandwidth, Mbit/s.
    pub uplink_mbps: f64,
    /// Fixed cost of one step on this node, milliseconds (framework, queues, wake-ups).
    #[serde(default = "default_overhead")]
    pub step_overhead_ms: f64,
    /// Download bandwidth, Mbit/s.
    pub downlink_mbps: f64,
    /// A fixed span `A..B`; default: chosen from memory where the swarm is weakest.
    #[serde(default)]
    pub blocks: Option<Spanned<String>>,
    /// Mean lifetime in seconds (exponentially distributed); none = never leaves.
    #[serde(default)]
    pub lifetime_s: Option<f64>,
    /// Seconds before a replacement joins after a node leaves.
    #[serde(default = "default_rejoin")]
    pub rejoin_s: f64,
    /// When the group appears.
    #[serde(default)]
    pub start_s: f64,
}

fn default_overhead() -> f64 {
    0.3
}

fn default_rejoin() -> f64 {
    60.0
}

/// A group of clients, each generating back to back.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientGroup {
    /// How many.
    pub count: u32,
    /// Their region.
    pub region: Spanned<String>,
    /// Prompt length.
    pub prompt_tokens: u32,
    /// Tokens generated per request.
    pub new_tokens: u32,
    /// Pause between requests, seconds.
    #[serde(default)]
    pub think_s: f64,
    /// When they start.
    #[serde(default)]
    pub start_s: f64,
    /// The client's own work per step, milliseconds: the LM head over the step's
    /// output, sampling, text. (Measured: `shoal generate --json` reports its
    /// `client_seconds` over its `decode_steps`.)
    #[serde(default)]
    pub step_ms: f64,
    /// The client's link, both ways, Mbit/s.
    #[serde(default = "default_client_mbps")]
    pub link_mbps: f64,
    /// Speculative decoding, when these clients use it.
    #[serde(default)]
    pub speculate: Option<Speculation>,
}

fn default_client_mbps() -> f64 {
    100.0
}

/// Speculative decoding as a client group does it, in the numbers `shoal generate
/// --json` reports under `drafts`: each decode step verifies `drafts` proposed tokens
/// (on average) along with the token chosen, and gives one token plus the accepted
/// drafts. How many stand depends on the text and the drafter, so it is an input.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Speculation {
    /// Tokens proposed per verify step, on average (drafted / steps).
    pub drafts: f64,
    /// Share of the proposed tokens accepted (accepted / drafted), 0 to 1.
    pub acceptance: f64,
    /// The client's time to propose one token, milliseconds (a draft model's step;
    /// about 0 for prompt lookup).
    #[serde(default)]
    pub draft_ms: f64,
}

/// A scripted event.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// When, in virtual seconds.
    pub at_s: f64,
    /// `region_down` (every node in it drops off the network) or `region_up`.
    pub kind: Spanned<String>,
    /// Which region.
    pub region: Spanned<String>,
}

/// True for a finite number above zero (NaN is not).
fn positive(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

/// Line (1-based) of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

fn err_at(
    text: &str,
    span: std::ops::Range<usize>,
    field: &str,
    message: impl Into<String>,
) -> SimError {
    SimError::Topology {
        line: line_of(text, span.start),
        field: field.to_string(),
        message: message.into(),
    }
}

/// Parses `[a, b)` written `A..B`.
pub fn parse_span(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once("..")?;
    let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a < b).then_some((a, b))
}

impl Topology {
    /// Parses and checks a topology file's text.
    pub fn parse(text: &str) -> Result<Topology, SimError> {
        let t: Topology = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let line = line_of(text, span.start);
            // The field is the key on the offending line (or the message names it).
            let field = text
                .lines()
                .nth(line.saturating_sub(1))
                .and_then(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
                .unwrap_or_default();
            SimError::Topology {
                line,
                field,
                message: e.message().to_string(),
            }
        })?;
        t.check(text)?;
        Ok(t)
    }

    /// The model shape to simulate.
    pub fn model(&self) -> ModelShape {
        match (&self.custom_model, &self.model) {
            (Some(m), _) => m.clone(),
            (None, Some(name)) => model::preset(name.get_ref()).unwrap_or_else(|| {
                model::preset("smollm2-135m").expect("the default preset exists")
            }),
            (None, None) => model::preset("smollm2-135m").expect("the default preset exists"),
        }
    }

    /// Index of a region by name.
    pub fn region_index(&self, name: &str) -> Option<usize> {
        self.regions.iter().position(|r| r.name == name)
    }

    fn check(&self, text: &str) -> Result<(), SimError> {
        if let Some(name) = &self.model {
            if model::preset(name.get_ref()).is_none() && self.custom_model.is_none() {
                return Err(err_at(
                    text,
                    name.span(),
                    "model",
                    format!(
                        "unknown model {:?}; presets: {}",
                        name.get_ref(),
                        model::PRESETS.join(", ")
                    ),
                ));
            }
        }
        if !positive(self.duration_s) {
            return Err(SimError::Invalid("duration_s must be positive".into()));
        }
        if self.regions.is_empty() || self.nodes.is_empty() {
            return Err(SimError::Invalid(
                "a topology needs at least one [[region]] and one [[nodes]] group".into(),
            ));
        }
        for r in &self.regions {
            for other in &self.regions {
                if !r.rtt_ms.get_ref().contains_key(&other.name) {
                    return Err(err_at(
                        text,
                        r.rtt_ms.span(),
                        "rtt_ms",
                        format!(
                            "region {:?} gives no round trip to region {:?}",
                            r.name, other.name
                        ),
                    ));
                }
            }
            if let Some((k, v)) = r
                .rtt_ms
                .get_ref()
                .iter()
                .find(|(k, v)| self.region_index(k).is_none() || v.is_nan() || **v < 0.0)
            {
                return Err(err_at(
                    text,
                    r.rtt_ms.span(),
                    "rtt_ms",
                    format!("{k} = {v}: not a known region, or not a round trip >= 0"),
                ));
            }
        }
        let n_blocks = self.model().blocks;
        for g in &self.nodes {
            if self.region_index(g.region.get_ref()).is_none() {
                return Err(err_at(
                    text,
                    g.region.span(),
                    "region",
                    format!("no region named {:?}", g.region.get_ref()),
                ));
            }
            if let Some(b) = &g.blocks {
                match parse_span(b.get_ref()) {
                    Some((_, e)) if e <= n_blocks => {}
                    _ => {
                        return Err(err_at(
                            text,
                            b.span(),
                            "blocks",
                            format!(
                                "{:?} is not a span A..B inside the model's {n_blocks} blocks",
                                b.get_ref()
                            ),
                        ))
                    }
                }
            }
            for (field, v) in [
                ("memory_gb", g.memory_gb),
                ("tflops", g.tflops),
                ("mem_bandwidth_gbs", g.mem_bandwidth_gbs),
                ("uplink_mbps", g.uplink_mbps),
                ("downlink_mbps", g.downlink_mbps),
            ] {
                if !positive(v) {
                    return Err(err_at(
                        text,
                        g.region.span(),
                        field,
                        format!("{field} must be positive in this [[nodes]] group"),
                    ));
                }
            }
        }
        for c in &self.clients {
            if self.region_index(c.region.get_ref()).is_none() {
                return Err(err_at(
                    text,
                    c.region.span(),
                    "region",
                    format!("no region named {:?}", c.region.get_ref()),
                ));
            }
            if c.prompt_tokens == 0 || c.new_tokens == 0 {
                return Err(err_at(
                    text,
                    c.region.span(),
                    "prompt_tokens",
                    "prompt_tokens and new_tokens must be at least 1",
                ));
            }
            let at_least_zero = |v: f64| v.is_finite() && v >= 0.0;
            let bad = if !at_least_zero(c.step_ms) {
                Some(("step_ms", "must be a time >= 0"))
            } else if !positive(c.link_mbps) {
                Some(("link_mbps", "must be positive"))
            } else {
                c.speculate.as_ref().and_then(|s| {
                    if !at_least_zero(s.drafts) {
                        Some(("speculate.drafts", "must be a number of tokens >= 0"))
                    } else if !(0.0..=1.0).contains(&s.acceptance) {
                        Some(("speculate.acceptance", "must be a share from 0 to 1"))
                    } else if !at_least_zero(s.draft_ms) {
                        Some(("speculate.draft_ms", "must be a time >= 0"))
                    } else {
                        None
                    }
                })
            };
            if let Some((field, message)) = bad {
                return Err(err_at(
                    text,
                    c.region.span(),
                    field,
                    format!("{field} {message} in this [[clients]] group"),
                ));
            }
        }
        for e in &self.events {
            if !matches!(e.kind.get_ref().as_str(), "region_down" | "region_up") {
                return Err(err_at(
                    text,
                    e.kind.span(),
                    "kind",
                    format!(
                        "unknown event {:?}: use region_down or region_up",
                        e.kind.get_ref()
                    ),
                ));
            }
            if self.region_index(e.region.get_ref()).is_none() {
                return Err(err_at(
                    text,
                    e.region.span(),
                    "region",
                    format!("no region named {:?}", e.region.get_ref()),
                ));
            }
        }
        Ok(())
    }
}
