//! Weights from the swarm: a node with no model file fetches the part of the model it
//! needs from the nodes that hold it, and every node shares what it holds.
//!
//! A model is named by the hash of its manifest (`shard::manifest`): its GGUF header and
//! a SHA-256 per 4 MiB chunk of every tensor. A node serving a model answers
//! [`protocol::WEIGHTS_PROTOCOL`] requests for that manifest, for which tensors it holds,
//! and for chunks of them ([`share`]), within an upload rate and a number of transfers
//! at once. A node that needs a part (a server's span, a client's embeddings and LM
//! head) fetches it chunk by chunk from every peer that holds it at once, checks every
//! chunk against the manifest, bans a peer that sends a bad one, and writes the part as
//! a GGUF file of those tensors in the cache ([`fetch`], [`store`]); an interrupted fetch
//! resumes from what it had.

mod fetch;
mod join;
mod share;
mod spans;
mod store;

pub use fetch::{fetch_manifest, fetch_part, Fetched, Source};
pub use join::{client_model, here, join_model, store, swarm_models, Joined, SwarmModel};
pub use share::{share, ShareLimits, Sharing};
pub use spans::SpanFiles;
pub use store::{head_tensors, span_tensors, PartStore};
