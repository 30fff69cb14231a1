//! The `shoal` node: libp2p swarm, server runtime, client, gateway and command line.
//!
//! Layers, lowest first; a module uses only those above it in this list, never one
//! below (`tests/layers.rs` checks it over every `crate::` path, so no two modules can
//! import each other either):
//!
//! - [`error`], [`patience`], [`hidden`], [`metrics`]: small shared pieces
//!   ([`NodeError`], waits that say what they wait for, hidden states as tensors, the
//!   Prometheus registries).
//! - [`net`] owns the libp2p `Swarm` in one event-loop task behind a cloneable handle:
//!   transports, behaviours, the DHT, NAT traversal, peer guarding, the data plane.
//! - [`args`] is the command line's shape (clap), read by the layers that take options;
//!   [`model_cache`] finds the model file an option names (fetching the default one).
//! - [`weights`] shares the weights this node holds and fetches from the swarm the part
//!   of a model a node without its file needs (manifests, checked chunks, resumable
//!   parts in the cache).
//! - [`server`] runs a span's blocks on a dedicated compute thread and pushes each
//!   step's output straight to the next server of the chain; [`server::serve`] is
//!   `shoal serve` around it (memory budget, span choice, loading, moving).
//! - [`client`] finds servers in the DHT, plans a chain with `coordinator`, runs a
//!   session's steps through it, fails over and verifies.
//! - [`generation`] is the generation loop on top, and the runner `shoal generate` and
//!   the gateway share.
//! - [`gateway`] is the OpenAI-compatible HTTP gateway (`shoal api`) with its dashboard.
//! - [`cli`] holds one thin file per subcommand: what it prints, and the library calls.
//!
//! Model math lives in `shard`, wire types in `protocol`, decisions (routes, spans,
//! budgets, timeouts, bans) in `coordinator`; this crate only connects them.
//!
//! Reading order for a newcomer: this file, [`generation`] (what one generation does),
//! [`client`] (a chain of servers), [`server`] (what a server does with a step), then
//! [`net`] (how bytes get there).

pub mod args;
pub mod cli;
pub mod client;
pub mod error;
pub mod gateway;
pub mod generation;
pub mod hidden;
pub mod metrics;
pub mod model_cache;
pub mod net;
pub mod patience;
pub mod server;
pub mod weights;

pub use error::NodeError;

/// Requests to stop, one per signal: the binary sends one per Ctrl-C, since signals are
/// its business and not the library's. The first starts a graceful shutdown
/// ([`server::serve::serve`] hands its sessions over; [`server::serve::relay`] and the
/// gateway stop), a second during it quits at once. A dropped sender asks nothing.
pub type StopSignals = tokio::sync::mpsc::UnboundedReceiver<()>;
