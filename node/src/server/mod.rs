//! A server: the compute thread that owns a span and its sessions ([`compute`],
//! re-exported here), and `shoal serve`'s life around it ([`serve`]: the memory budget
//! and the span it buys, loading, announcing, moving when the swarm would be better
//! off, and the relay-only node).
//!
//! `compute` must not touch the network beyond the handle it is given; `serve` wires a
//! network, a compute thread and the coordinator's decisions together.

pub mod compute;
pub mod serve;

pub use compute::*;
