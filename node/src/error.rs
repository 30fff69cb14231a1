//! [`NodeError`]: how the library's entry points fail, sorted so that a caller decides by
//! variant, never by reading message text: the gateway picks an HTTP status by it, the
//! command line could pick its words.
//!
//! Inside the crate errors are `anyhow` chains with context added as they climb. A cause
//! a caller must be able to tell apart is raised deep down as a typed error of its own
//! ([`NoRoute`]); at an entry point, [`NodeError::from`] finds it anywhere in the chain
//! and files the whole chain (message and context kept) under its variant.

/// How a call into the node library failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The request cannot be served as asked, whatever the swarm does: an empty prompt,
    /// one longer than the model's context, messages the chat template refuses.
    #[error("{0}")]
    InvalidRequest(String),
    /// No chain of servers covers every block of the model with room for the session,
    /// within the time allowed to look (at the start or after a failure mid-way).
    #[error("{0:#}")]
    NoRoute(anyhow::Error),
    /// Anything else: the model computation, the network, a file, a server that broke
    /// every failover allowed.
    #[error("{0:#}")]
    Other(anyhow::Error),
}

/// Raised where a route is looked for and none found (see [`NodeError::NoRoute`]).
#[derive(Debug, thiserror::Error)]
#[error("no chain of servers for model {model} with room for {max_len} tokens")]
pub struct NoRoute {
    /// The model looked for.
    pub model: String,
    /// The sequence length the session needed room for.
    pub max_len: u32,
}

impl From<anyhow::Error> for NodeError {
    /// Files `e` by the first cause found in it: a [`NoRoute`], or a `NodeError` that
    /// went up through code that speaks `anyhow` (its variant kept).
    fn from(e: anyhow::Error) -> Self {
        match e.downcast_ref::<NodeError>() {
            Some(NodeError::InvalidRequest(_)) => NodeError::InvalidRequest(format!("{e:#}")),
            Some(NodeError::NoRoute(_)) => NodeError::NoRoute(e),
            _ if e.downcast_ref::<NoRoute>().is_some() => NodeError::NoRoute(e),
            _ => NodeError::Other(e),
        }
    }
}

impl From<shard::ShardError> for NodeError {
    fn from(e: shard::ShardError) -> Self {
        NodeError::Other(e.into())
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::{NoRoute, NodeError};

    /// A route failure keeps its variant however much context it gathered on the way up,
    /// and keeps that context in its message; other failures are `Other`.
    #[test]
    fn a_missing_route_is_found_under_its_context() {
        let deep: anyhow::Result<()> = Err(NoRoute {
            model: "m".into(),
            max_len: 9,
        }
        .into());
        let e = NodeError::from(
            deep.context("failing over at position 12")
                .context("generating")
                .expect_err("an error"),
        );
        assert!(matches!(e, NodeError::NoRoute(_)), "{e:?}");
        let text = e.to_string();
        assert!(text.starts_with("generating: failing over at position 12: no chain of servers for model m with room for 9 tokens"), "{text}");

        // Added as context over the planner's last reason, as the client does.
        let planned: anyhow::Result<()> = Err(anyhow::anyhow!("blocks 3..4: nobody serves them"));
        let e = NodeError::from(
            planned
                .context(NoRoute {
                    model: "m".into(),
                    max_len: 9,
                })
                .context("opening a session")
                .expect_err("an error"),
        );
        assert!(matches!(e, NodeError::NoRoute(_)), "{e:?}");

        // A NodeError that went up through `anyhow` code (a session's step inside the
        // generation loop) keeps its variant.
        let inner = NodeError::from(anyhow::Error::new(NoRoute {
            model: "m".into(),
            max_len: 9,
        }));
        let climbed: anyhow::Result<()> = Err(anyhow::Error::new(inner));
        let e = NodeError::from(
            climbed
                .context("step at position 40")
                .expect_err("an error"),
        );
        assert!(matches!(e, NodeError::NoRoute(_)), "{e:?}");
        let refused: anyhow::Result<()> =
            Err(NodeError::InvalidRequest("the prompt is empty".into()).into());
        let e = NodeError::from(refused.context("generating").expect_err("an error"));
        assert!(matches!(e, NodeError::InvalidRequest(_)), "{e:?}");

        let other = NodeError::from(anyhow::anyhow!("no chain of servers, says the text"));
        assert!(matches!(other, NodeError::Other(_)), "{other:?}");
    }
}
