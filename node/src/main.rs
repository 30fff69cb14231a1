//! The `shoal` binary: parse arguments, start logging, run the command.

use clap::Parser;
use shoal_node::args::{Cli, Commands};
use shoal_node::cli;

fn main() -> std::process::ExitCode {
    // candle counts the cores (reading /proc/cpuinfo) on every f32 matmul unless this is
    // set: 5% of a decode's time. Set here, before any thread exists.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", shard::kernels::threads().to_string());
    }
    let cli = Cli::parse();
    let default_level = match cli.command {
        Commands::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        // Signals are the binary's business: the library's long-running commands take a
        // channel of stop requests. The first Ctrl-C asks for a graceful stop (a server
        // hands its sessions over; while it is still loading, once loaded); a second
        // quits at once, whatever is under way.
        let stop = || {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() && tx.send(()).is_ok() {
                    eprintln!("interrupted: stopping as soon as it can (Ctrl-C again to quit now)");
                    let _ = tokio::signal::ctrl_c().await;
                    eprintln!("interrupted again: quitting now");
                    std::process::exit(130);
                }
            });
            rx
        };
        match cli.command {
            Commands::Serve(a) => shoal_node::server::serve::serve(a, stop())
                .await
                .map_err(anyhow::Error::from),
            Commands::Generate(a) => cli::generate_cmd(a).await,
            Commands::Demo(a) => cli::demo(a).await,
            Commands::Bench(a) => cli::bench(a).await,
            Commands::Api(a) => cli::api(a, stop()).await,
            Commands::Status(a) => cli::status(a).await,
            Commands::Inspect(a) => cli::inspect(a).await,
            Commands::Keygen(a) => cli::keygen(a),
            Commands::Relay(a) => shoal_node::server::serve::relay(a, stop())
                .await
                .map_err(anyhow::Error::from),
            Commands::MakeModel(a) => cli::make_model(a),
            Commands::Sim(a) => cli::simulate(a),
        }
    });
    // Do not wait for blocking tasks (a stuck dial, a compute thread) on the way out.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
