//! `shoal demo`: a whole swarm on this machine, then one generation through it.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use libp2p::Multiaddr;
use protocol::WireDType;
use shard::{ModelFile, SamplingParams};
use tokio::io::AsyncBufReadExt;

use crate::args::{DemoArgs, ModelArg};
use crate::generation::{run_generation, start_client, ClientSide, GenerateRequest};
use crate::model_cache::model_path;

/// Servers started by this process on loopback; they die with it.
pub struct LocalSwarm {
    children: Vec<tokio::process::Child>,
    /// The first server's address.
    pub bootstrap: Multiaddr,
}

impl LocalSwarm {
    /// Starts `nodes` servers splitting the model's blocks evenly.
    pub async fn start(
        model: &std::path::Path,
        n_blocks: usize,
        nodes: usize,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        if nodes == 0 || nodes > n_blocks {
            bail!("--nodes must be between 1 and the model's {n_blocks} blocks");
        }
        let exe = std::env::current_exe().context("cannot find the shoal executable")?;
        let mut children = Vec::new();
        let mut bootstrap: Option<Multiaddr> = None;
        for i in 0..nodes {
            let (a, b) = (i * n_blocks / nodes, (i + 1) * n_blocks / nodes);
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("serve")
                .arg("--model")
                .arg(model)
                .arg("--blocks")
                .arg(format!("{a}..{b}"))
                .arg("--listen")
                .arg("/ip4/127.0.0.1/udp/0/quic-v1")
                .arg("--name")
                .arg(format!("local-{i}"))
                // A demo or a benchmark stays its own swarm, whatever runs on the LAN.
                .arg("--no-mdns")
                .args(extra)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .kill_on_drop(true);
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "warn");
            }
            if let Some(b) = &bootstrap {
                cmd.arg("--bootstrap").arg(b.to_string());
            }
            let mut child = cmd.spawn().context("cannot start a server process")?;
            let stdout = child.stdout.take().context("no stdout")?;
            children.push(child);
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
                .await
                .context("a server did not start within 120 s")??
                .context("a server exited before it was listening")?;
            let addr: Multiaddr = line
                .strip_prefix("listening ")
                .context("unexpected server output")?
                .parse()?;
            eprintln!("server {} serving blocks {a}..{b} at {addr}", i + 1);
            bootstrap.get_or_insert(addr);
            // Keep reading so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        }
        Ok(LocalSwarm {
            children,
            bootstrap: bootstrap.context("no server")?,
        })
    }

    /// Stops every server.
    pub async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.kill().await;
        }
    }
}

/// `shoal demo`.
pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let path = model_path(&ModelArg { model: args.model })?;
    let file = ModelFile::open(&path)?;
    let n = file.config().n_layers;
    eprintln!(
        "starting {} servers for {} ({} blocks) on loopback ...",
        args.nodes,
        file.config().name,
        n
    );
    let swarm = LocalSwarm::start(&path, n, args.nodes, &[]).await?;
    let side = ClientSide::load(file)?;
    let client = start_client(
        std::slice::from_ref(&swarm.bootstrap),
        Duration::from_secs(10),
        None,
        None,
        None,
        false,
    )
    .await?;
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        chat: true,
        max_tokens: args.max_tokens,
        sampling: SamplingParams::default(),
        ..Default::default()
    };
    eprintln!("\n> {}\n", args.prompt);
    let mut stdout = std::io::stdout();
    let result = run_generation(
        &side,
        Some(&client),
        &req,
        WireDType::F32,
        Duration::from_secs(30),
        |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        },
    )
    .await;
    swarm.stop().await;
    let (g, trip) = result?;
    let route = trip.route;
    println!();
    eprintln!(
        "\n[{} tokens at {:.1} tokens/s through {} servers: {}]",
        g.completion_tokens.len(),
        g.tokens_per_second,
        route.len(),
        route
            .iter()
            .map(|r| format!("blocks {}..{}", r.start, r.end))
            .collect::<Vec<_>>()
            .join(" -> ")
    );
    Ok(())
}
