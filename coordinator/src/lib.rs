//! Shoal's decisions, as pure functions over plain data.
//!
//! This crate knows nothing of sockets, tensors or clocks: callers pass in what they
//! measured, the current time and a random generator, and the same code runs inside a
//! real node and inside the simulator.
//!
//! - [`route`]: the fastest chain of servers through the blocks, with alternatives.
//! - [`spans`]: which blocks a joining server takes, and when a server should move.
//! - [`bans`]: avoiding failing peers for a time that grows with repeated failures.
//! - [`budget`]: how many blocks, and how much cache, a server's memory budget holds.
//! - [`timeouts`]: when a client presumes a chain broken.

pub mod bans;
pub mod budget;
pub mod route;
pub mod spans;
pub mod timeouts;

pub use bans::Bans;
pub use route::{alternatives, plan_route, RouteError, RouteHop, ServerView};
pub use spans::{
    block_throughputs, choose_span, choose_span_in, jittered, should_move, should_move_in, SpanView,
};
