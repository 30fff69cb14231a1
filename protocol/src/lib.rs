//! Shoal's wire protocol: the messages nodes and clients exchange, and their codecs.
//!
//! This crate owns the bytes on the wire and nothing else: no I/O, no model code, no
//! libp2p. Peers are named by their libp2p peer id in its usual base58 text form, so the
//! simulator can speak the same types without a network stack.
//!
//! Every message travels as one frame: a 4-byte little-endian length, then a bincode
//! body (see [`codec`]). The body starts with a protocol version, so a node can refuse a
//! peer that speaks another version with a clear error instead of misreading it.
//! Decoding never panics and never allocates more than [`MAX_FRAME_BYTES`], whatever
//! bytes arrive.

pub mod codec;
mod hidden;
mod messages;
mod weights;

pub use codec::{decode, decode_frame_len, encode, encode_frame, ProtocolError, MAX_FRAME_BYTES};
pub use hidden::{HiddenState, WireDType};
pub use messages::*;
pub use weights::{WeightsRequest, WeightsResponse};

/// The libp2p protocol name of the inference protocol. The trailing number is bumped
/// together with [`PROTOCOL_VERSION`] when the message layout changes.
pub const INFERENCE_PROTOCOL: &str = "/shoal/inference/4";

/// The libp2p protocol name of the data plane: one long-lived stream per pair of peers
/// carrying [`Frame`]s (steps, outputs and failure reports; no answer per frame), in the
/// framing of [`encode_frame`]. [`Request`]s (sessions, probes, lookups) stay
/// request-response on [`INFERENCE_PROTOCOL`]; the two are separate types, so neither
/// plane can be handed the other's message.
pub const DATA_PROTOCOL: &str = "/shoal/data/4";

/// The libp2p protocol name of the weights protocol: a stream per request, carrying one
/// [`WeightsRequest`] and its [`WeightsResponse`] (a model's manifest, which tensors a
/// peer holds, a chunk of a tensor).
pub const WEIGHTS_PROTOCOL: &str = "/shoal/weights/1";

/// Version carried in every frame. A frame with any other version is refused.
pub const PROTOCOL_VERSION: u16 = 4;
