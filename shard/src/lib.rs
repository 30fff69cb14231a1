//! Shoal's model side: everything that touches weights, tensors and text.
//!
//! - [`ModelFile`] opens a GGUF file or a Hugging Face directory (config.json +
//!   safetensors) by memory map and reads the model's shape ([`ModelConfig`]) without
//!   loading any weight.
//! - [`Span`] loads the blocks `[start, end)` and nothing else, so a node's memory grows
//!   with its span, and runs them over a session's [`KvCache`].
//! - [`Head`] is the client side: token embeddings, final norm and LM head.
//! - [`TextCodec`] is the tokenizer and chat template; [`Sampler`] picks tokens.
//! - [`device`] picks where blocks run: the CPU, or a GPU in builds with the `cuda` or
//!   `metal` feature.
//!
//! The blocks are written here from candle-core / candle-nn primitives because
//! candle-transformers keeps its decoder blocks private (DESIGN.md). This crate knows
//! nothing of networks or wire formats: `node` converts tensors to and from the
//! protocol's hidden states.

mod blocks;
mod config;
pub mod device;
mod error;
mod file;
mod gguf;
mod head;
pub mod kernels;
mod kquants;
pub mod manifest;
mod sampling;
pub mod synth;
mod text;

pub use blocks::{KvCache, Span};
pub use candle_core;
pub use config::{Arch, Experts, Latent, ModelConfig, RopeStyle, SlidingWindow, Yarn};
pub use error::ShardError;
pub use file::{hf_name, ModelFile, WeightFormat};
pub use head::Head;
pub use sampling::{argmax, Sampler, SamplingParams};
pub use text::{ChatMessage, TextCodec};

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, ShardError>;
