//! What each subcommand does: parse (clap, in [`crate::args`]), then call the library.
//! One file per subcommand; `shoal serve` and `shoal relay` are
//! [`crate::server::serve`] itself, called from the binary with its stop signals.
//!
//! What lives here is presentation (what a command prints, its JSON) and wiring; a
//! decision or a piece of the protocol found here belongs in a layer below.

mod api;
mod bench;
mod demo;
mod generate;
mod inspect;
mod keygen;
mod make_model;
mod sim;
mod status;

pub use api::api;
pub use bench::bench;
pub use demo::{demo, LocalSwarm};
pub use generate::generate_cmd;
pub use inspect::inspect;
pub use keygen::keygen;
pub use make_model::make_model;
pub use sim::simulate;
pub use status::status;

use std::time::Duration;

use shard::SamplingParams;

use crate::args::SamplingArgs;

fn sampling_params(s: &SamplingArgs) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed,
    }
}

/// Longest a client on its way out waits for its connections to close (they close in
/// well under a millisecond on loopback): without the goodbye, servers keep what they
/// hold for it until QUIC's idle timeout (10 s) tells them it has gone.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// A link as shown to people: `relayed via <relay, short>` or `hole-punched`.
fn short_link(link: &str) -> String {
    match link.strip_prefix("relayed:") {
        Some(relay) => format!("relayed via {}", short(relay)),
        None => link.to_string(),
    }
}

fn short(peer: &str) -> &str {
    &peer[peer.len().saturating_sub(6)..]
}
