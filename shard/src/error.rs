//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// The model path does not exist or cannot be read.
    #[error("cannot open model {path}: {source}")]
    Open {
        /// Path given.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file exists but is not a model this crate can read.
    #[error("{path} is not a usable model: {reason}")]
    BadModel {
        /// Path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An architecture this crate does not implement.
    #[error("unsupported architecture {arch:?} (supported: llama, mistral, qwen2)")]
    UnsupportedArch {
        /// Name found in the file.
        arch: String,
    },
    /// A span outside the model or empty.
    #[error("span {start}..{end} is not inside the model's {blocks} blocks")]
    BadSpan {
        /// Requested start.
        start: usize,
        /// Requested end.
        end: usize,
        /// Blocks in the model.
        blocks: usize,
    },
    /// A sequence longer than allowed.
    #[error("sequence of {len} tokens exceeds the limit of {max}")]
    TooLong {
        /// Length requested.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// An input tensor of the wrong shape.
    #[error("bad input: {0}")]
    BadInput(String),
    /// The device asked for cannot be used.
    #[error("{0}")]
    Device(String),
    /// Tokenizer or chat template problems.
    #[error("text: {0}")]
    Text(String),
    /// A tensor operation failed.
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// A candle error's message alone. With `RUST_BACKTRACE` set, candle attaches a
/// backtrace to some errors and its `Display` prints it: 35 frames of candle's internals
/// under a one-line message, which a user asking why a file will not load does not need.
pub(crate) fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error;
    match e {
        Error::WithBacktrace { inner, .. } => candle_message(inner),
        Error::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), candle_message(inner))
        }
        other => other.to_string(),
    }
}
