//! A server: the compute thread that owns a span and its sessions, and `shoal serve`'s
//! life around it.
//!
//! - `compute`: the thread, its state and its loop ([`Server`]);
//! - `inbox`: what it is sent and the handle that sends it ([`ServerHandle`]), bounded
//!   by [`INBOX_LIMIT`];
//! - `sessions`: opening, checking and ending sessions;
//! - `steps`: running a batch of steps and passing their outputs on;
//! - [`span`]: the memory policy, and loading a span;
//! - [`serve`]: `shoal serve` and `shoal relay` (joining, choosing a span, serving);
//! - `upkeep`: re-announcing and rebalancing while serving;
//! - `shutdown`: stopping, in the order its doc gives.
//!
//! The compute thread must not touch the network beyond the [`crate::net::Network`]
//! handle it is given, and never blocks on it; `serve` wires a network, a compute
//! thread and the coordinator's decisions together.

mod compute;
mod inbox;
pub mod serve;
mod sessions;
mod shutdown;
pub mod span;
mod steps;
mod upkeep;

pub use compute::{Server, ServerLimits, INBOX_LIMIT, SESSION_IDLE_TIMEOUT};
pub use inbox::{Handover, Job, Refused, ServerHandle};
