//! The weights protocol ([`crate::WEIGHTS_PROTOCOL`]): a node hands out its model's
//! manifest and the chunks of the tensors it holds, so a node with no model file can
//! fetch the part it needs from the swarm. One request and one response per stream,
//! in [`crate::encode_frame`]'s framing.
//!
//! A model is named by its id, which is a hash of its manifest; every chunk is checked
//! against the manifest's hash for it before it is kept (in `shard::manifest`).

use serde::{Deserialize, Serialize};

use crate::ErrorInfo;

/// What one asks of a peer that shares weights.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum WeightsRequest {
    /// The manifest of model `model_id` (its encoding, which hashes to the id).
    Manifest {
        /// The model.
        model_id: String,
    },
    /// Which of model `model_id`'s tensors the peer holds.
    Holdings {
        /// The model.
        model_id: String,
    },
    /// Chunk `index` of tensor `tensor` (see `shard::manifest::CHUNK_BYTES`).
    Chunk {
        /// The model.
        model_id: String,
        /// The tensor's name in the GGUF file.
        tensor: String,
        /// Which chunk of it.
        index: u32,
    },
}

/// The answer to a [`WeightsRequest`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum WeightsResponse {
    /// The manifest's encoding.
    Manifest(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The tensors held, by name; `all` when the peer has the whole file.
    Holdings {
        /// The whole model.
        all: bool,
        /// The tensors held (empty when `all`).
        tensors: Vec<String>,
    },
    /// A chunk's bytes.
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Refused: no such model or tensor here, or busy (`ErrorKind::Busy`: try another).
    Error(ErrorInfo),
}
