//! Shoal's discrete-event swarm simulator.
//!
//! `shoal sim TOPOLOGY.toml` answers "what happens to tokens/s if ..." for swarms of
//! thousands of nodes on one machine. A [`Topology`] (regions with round trips, groups
//! of nodes with hardware profiles and churn, groups of clients, scripted events) runs in
//! virtual time; every decision comes from `coordinator`, the code the real node runs,
//! and time from the cost model documented in the engine. The result is a [`Report`].
//!
//! Depends on `coordinator` (decisions) and `protocol` (shared vocabulary); never on the
//! node, the network or the model code.

mod engine;
pub mod model;
pub mod report;
pub mod topology;

pub use engine::{run, Options};
pub use report::{Percentiles, Report};
pub use topology::Topology;

/// What can go wrong reading a topology.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A problem at a place in the file.
    #[error("line {line}, field `{field}`: {message}")]
    Topology {
        /// 1-based line.
        line: usize,
        /// The field concerned.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A problem with the topology as a whole.
    #[error("{0}")]
    Invalid(String),
}
