//! The `codex-mesh` binary: parse the command line and run it.

use std::process::ExitCode;

use clap::Parser;
use codex_mesh::cli::{client, jobs, Cli, Command};
use codex_mesh::node::{self, StartMode};
use tracing_subscriber::EnvFilter;

/// Log filter for node processes when `RUST_LOG` is unset.
const NODE_LOG_DEFAULT: &str = "info,libp2p_swarm=warn,libp2p_gossipsub=warn,libp2p_tcp=warn";

fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    // A `.env` in the working directory supplies defaults; real environment variables win.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => {
                init_logging(NODE_LOG_DEFAULT);
                node::run(StartMode::Up, args)
                    .await
                    .map_err(|e| e.to_string())
            }
            Command::Join { ticket, node: args } => {
                init_logging(NODE_LOG_DEFAULT);
                node::run(StartMode::Join(ticket), args)
                    .await
                    .map_err(|e| e.to_string())
            }
            Command::Status(args) => client::status(args).await.map_err(|e| e.to_string()),
            Command::Nodes(args) => client::nodes(args).await.map_err(|e| e.to_string()),
            Command::Ticket(args) => client::ticket(args).await.map_err(|e| e.to_string()),
            Command::Submit(args) => match jobs::submit(args).await {
                Ok(true) => Ok(()),
                Ok(false) => Err("the job did not succeed".to_string()),
                Err(e) => Err(e.to_string()),
            },
            Command::Jobs {
                status,
                node,
                limit,
                client,
            } => jobs::list(status, node, limit, client)
                .await
                .map_err(|e| e.to_string()),
            Command::Job { id, client } => jobs::show(id, client).await.map_err(|e| e.to_string()),
            Command::Logs { id, follow, client } => jobs::logs(id, follow, client)
                .await
                .map_err(|e| e.to_string()),
            Command::Cancel { id, client } => jobs::act(id, "cancel", client)
                .await
                .map_err(|e| e.to_string()),
            Command::Retry { id, client } => jobs::act(id, "retry", client)
                .await
                .map_err(|e| e.to_string()),
            Command::Node { action } => client::node_command(action)
                .await
                .map_err(|e| e.to_string()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
