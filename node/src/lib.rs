//! The `shoal` node: libp2p swarm, server runtime, client, and command line.
//!
//! - [`net`] owns the libp2p `Swarm` in one event-loop task behind a cloneable handle.
//! - [`server`] runs a span's blocks on a dedicated compute thread and pushes each
//!   step's output straight to the next server of the chain; [`server::serve`] is
//!   `shoal serve` around it (memory budget, span choice, loading, moving).
//! - [`client`] finds servers in the DHT, plans a chain with `coordinator`, and runs a
//!   session's steps through it; [`generation`] is the generation loop on top, and
//!   the runner `shoal generate` and the gateway share.
//! - [`api`] is the OpenAI-compatible HTTP gateway (`shoal api`) with its dashboard;
//!   [`metrics`] holds what servers and the gateway export to Prometheus.
//! - [`commands`] wires these into the subcommands defined in [`cli`].
//!
//! Model math lives in `shard`, wire types in `protocol`, decisions in `coordinator`;
//! this crate only connects them.

pub mod api;
pub mod cli;
pub mod client;
pub mod codec;
pub mod commands;
pub mod generation;
pub mod hidden;
pub mod metrics;
pub mod model_cache;
pub mod net;
pub mod relay_server;
pub mod server;
pub mod survey;
