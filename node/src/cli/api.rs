//! `shoal api`: the OpenAI-compatible gateway over a swarm client.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::generation::client_and_side;

/// `shoal api`: the OpenAI-compatible gateway.
pub async fn api(args: crate::args::ApiArgs, mut stop: crate::StopSignals) -> anyhow::Result<()> {
    let (client, side) = client_and_side(&args.model, &args.swarm, None).await?;
    let draft_model = side.draft_model(args.draft_model.as_deref())?;
    let mut state = crate::gateway::ApiState::new(
        side,
        client,
        args.swarm.wire_dtype,
        Duration::from_secs_f64(args.swarm.route_timeout),
    );
    state.speculate = args.speculate;
    state.draft_model = draft_model;
    state.set_limits(args.max_running, args.max_queued);
    if !args.conversation_idle.is_finite() || args.conversation_idle < 0.0 {
        anyhow::bail!(
            "--conversation-idle {}: give a number of seconds, 0 or more",
            args.conversation_idle
        );
    }
    state.keep_conversations(
        args.keep_conversations,
        Duration::from_secs_f64(args.conversation_idle),
    );
    let state = Arc::new(state);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening http://{addr}")?;
        out.flush()?;
    }
    axum::serve(listener, crate::gateway::router(state))
        .with_graceful_shutdown(async move {
            let _ = stop.recv().await;
        })
        .await?;
    Ok(())
}
