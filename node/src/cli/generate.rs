//! `shoal generate`: one generation through the swarm (or locally), streamed to stdout.

use std::io::Write;
use std::time::Duration;

use serde::Serialize;

use super::sampling_params;
use super::short;
use super::short_link;
use super::GOODBYE_TIMEOUT;
use crate::args::GenerateArgs;
use crate::client::Reroute;
use crate::generation::{client_and_side, run_generation, GenerateRequest, Generation, RouteEntry};

#[derive(Serialize)]
struct GenerateJson {
    #[serde(flatten)]
    generation: Generation,
    route: Vec<RouteEntry>,
    reroutes: Vec<Reroute>,
}

/// `shoal generate`.
pub async fn generate_cmd(args: GenerateArgs) -> anyhow::Result<()> {
    let (client, side) = client_and_side(&args.model, &args.swarm, args.emulate.shaping()).await?;
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        chat: args.chat,
        max_tokens: args.sampling.max_tokens,
        sampling: sampling_params(&args.sampling),
        top_logits: args.top_logits,
        speculate: args.speculate,
        draft_model: side.draft_model(args.draft_model.as_deref())?,
        ..Default::default()
    };
    let json = args.json;
    let mut stdout = std::io::stdout();
    let result = run_generation(
        &side,
        client.as_ref(),
        &req,
        args.swarm.wire_dtype,
        Duration::from_secs_f64(args.swarm.route_timeout),
        |piece| {
            if !json {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        },
    )
    .await;
    if let Some(c) = &client {
        c.net().close_all(GOODBYE_TIMEOUT).await;
    }
    let (generation, trip) = result?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&GenerateJson {
                generation,
                route: trip.route,
                reroutes: trip.reroutes,
            })?
        );
    } else {
        println!();
        let drafts = &generation.drafts;
        let drafted = if drafts.drafted > 0 {
            format!(
                ", drafts: {} of {} accepted in {} verify steps",
                drafts.accepted, drafts.drafted, drafts.steps
            )
        } else {
            String::new()
        };
        eprintln!(
            "[{} tokens, {:.1} tokens/s{drafted}, route: {}]",
            generation.completion_tokens.len(),
            generation.tokens_per_second,
            trip.route
                .iter()
                .map(|r| {
                    let how = match r.link.as_deref() {
                        Some(l) if l != "direct" => format!(" ({})", short_link(l)),
                        _ => String::new(),
                    };
                    format!("{}..{}@{}{how}", r.start, r.end, short(&r.peer))
                })
                .collect::<Vec<_>>()
                .join(" -> ")
        );
    }
    Ok(())
}
