//! `shoal api`: the OpenAI-compatible gateway over a swarm client.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::generation::{swarm_client, ClientSide};

/// `shoal api`: the OpenAI-compatible gateway.
pub async fn api(args: crate::args::ApiArgs, mut stop: crate::StopSignals) -> anyhow::Result<()> {
    let client = swarm_client(&args.swarm, None).await?;
    let file = crate::weights::client_model(
        &args.model,
        &args.swarm.from_swarm,
        client.as_ref().map(|c| c.net()),
    )
    .await?;
    let side = ClientSide::load(file)?;
    let mut state = crate::gateway::ApiState::new(
        side,
        client,
        args.swarm.wire_dtype,
        Duration::from_secs_f64(args.swarm.route_timeout),
    );
    state.speculate = args.speculate;
    if let Some(path) = &args.draft_model {
        let vocab = state.side.head().head().config().vocab;
        state.draft_model = Some(Arc::new(crate::generation::DraftModel::load(path, vocab)?));
    }
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
