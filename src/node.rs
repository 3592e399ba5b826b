//! Starting a node: data dir, store, HTTP listener, network, mesh task; then serve until
//! SIGINT/SIGTERM and shut down cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libp2p::Multiaddr;
use thiserror::Error;

use crate::cli::{default_data_dir, NodeArgs};
use crate::datadir::{mesh_id, DataDir, DataDirError};
use crate::mesh::{Mesh, MeshConfig};
use crate::metrics::Metrics;
use crate::net::NetError;
use crate::proto::election::Timing;
use crate::proto::records::validate_tag;
use crate::runner::agent::{find_program, parse_agent, Agents};
use crate::runner::credentials::CredentialPolicy;
use crate::runner::isolation::{self, Isolation, IsolationError};
use crate::runner::repos::RepoConfig;
use crate::runner::retention::Retention;
use crate::runner::spares::{SpareConfig, SPARES_DIR};
use crate::runner::RunnerConfig;
use crate::store::{Store, StoreError};
use crate::ticket::{Ticket, TicketError};
use std::collections::BTreeMap;

/// How the node was started.
#[derive(Debug)]
pub enum StartMode {
    /// `codex-mesh up`: create a mesh the first time, resume afterwards.
    Up,
    /// `codex-mesh join <ticket>`.
    Join(String),
}

/// Start-up failures, each a one-line explanation with what to do.
#[derive(Debug, Error)]
pub enum NodeError {
    /// Data directory problem.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// Bad ticket.
    #[error(transparent)]
    Ticket(#[from] TicketError),
    /// Store problem.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Network problem.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The HTTP address cannot be used.
    #[error("cannot serve the API on {addr}: {reason}; choose another with --http")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Invalid option.
    #[error("{0}")]
    Config(String),
    /// Agents cannot be isolated as asked.
    #[error(transparent)]
    Isolation(#[from] IsolationError),
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

fn validate(args: &NodeArgs) -> Result<(String, Vec<String>), NodeError> {
    let name = args.name.clone().unwrap_or_else(host_name);
    if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
        return Err(NodeError::Config(format!(
            "invalid --name {name:?}: use 1-64 printable characters"
        )));
    }
    let tags: Vec<String> = args
        .tags
        .iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    for tag in &tags {
        validate_tag(tag).map_err(NodeError::Config)?;
    }
    crate::http::limits::check(args.http_max_connections, args.max_event_streams)
        .map_err(|e| NodeError::Config(e.to_string()))?;
    if args.slots > crate::proto::records::MAX_SLOTS {
        return Err(NodeError::Config(format!(
            "--slots must be at most {}",
            crate::proto::records::MAX_SLOTS
        )));
    }
    Ok((name, tags))
}

/// Run a node until a shutdown signal.
pub async fn run(mode: StartMode, args: NodeArgs) -> Result<(), NodeError> {
    // Agents of the same user must not read this process's environment or memory.
    isolation::make_undumpable();
    let (name, tags) = validate(&args)?;
    let ticket = match &mode {
        StartMode::Join(text) => Some(Ticket::decode(text)?),
        StartMode::Up => None,
    };
    let data = DataDir::open(&args.data_dir.clone().unwrap_or_else(default_data_dir))?;
    // Nothing that marks the directory as a member of a mesh is written before every check
    // that can fail has passed, so a failed first start can simply be retried.
    let (mesh_key, fresh) = data.choose_mesh_key(ticket.as_ref().map(|t| &t.mesh_key))?;
    let founding = fresh && ticket.is_none();
    if founding && args.no_master {
        return Err(NodeError::Config(
            "the first node of a mesh must be able to hold the master lease: drop --no-master"
                .into(),
        ));
    }
    probe_listen(&args.listen)?;
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .map_err(|e| NodeError::Http {
            addr: args.http,
            reason: if e.kind() == std::io::ErrorKind::AddrInUse {
                "address in use".to_string()
            } else {
                e.to_string()
            },
        })?;
    let http_addr = listener.local_addr().map_err(|e| NodeError::Http {
        addr: args.http,
        reason: e.to_string(),
    })?;
    let local_url = if http_addr.ip().is_unspecified() {
        format!("http://127.0.0.1:{}", http_addr.port())
    } else {
        format!("http://{http_addr}")
    };
    let public_url = if http_addr.ip().is_unspecified() {
        format!("http://{}:{}", host_name(), http_addr.port())
    } else {
        local_url.clone()
    };

    let keypair = data.identity()?;
    let peer_id = keypair.public().to_peer_id();
    let token = data.api_token()?;
    // Opening may compact the file (after history compaction freed much of it): off the
    // async runtime.
    let store_path = data.store_path();
    let store = tokio::task::spawn_blocking(move || Store::open(&store_path))
        .await
        .map_err(|e| NodeError::Config(format!("opening the store stopped: {e}")))??;
    let metrics = Arc::new(Metrics::default());
    let (client, events, event_loop) =
        crate::net::build(keypair, *mesh_key.expose(), &args.listen, metrics.clone())?;
    let mut bootstrap: Vec<Multiaddr> = ticket.map(|t| t.addrs).unwrap_or_default();
    bootstrap.extend(args.peers.iter().cloned());
    let config = MeshConfig {
        name: name.clone(),
        tags,
        slots: args.slots,
        master_eligible: !args.no_master,
        founding,
        bootstrap,
        api_url: Some(public_url),
        mesh_id: mesh_id(&mesh_key),
        mesh_key: mesh_key.clone(),
        timing: Timing::default(),
        machine: crate::sysinfo::probe(),
        runner: Arc::new(runner_config(&args, &data)?),
        lost_requeues: args.lost_requeues,
        job_history_days: args.job_history_days,
    };
    let mesh_id = config.mesh_id.clone();
    let net_client = client.clone();
    let (mesh, handle) = Mesh::new(peer_id, config, store, client, metrics.clone())?;
    if fresh {
        data.save_mesh_key(&mesh_key)?;
    }
    let net_task = tokio::spawn(event_loop.run());
    let mesh_task = tokio::spawn(mesh.run(events));

    let streams = crate::http::limits::EventStreams::new(args.max_event_streams);
    let api = crate::http::router(crate::http::ApiState {
        mesh: handle.clone(),
        token: Arc::new(token),
        metrics,
        net: net_client,
        streams: streams.clone(),
    });
    let limits = server_limits(&args);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_for_server = stop_rx.clone();
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop_for_server.wait_for(|stop| *stop).await;
        };
        crate::http::limits::serve(listener, api, limits, shutdown).await
    });
    data.write_api_url(&local_url)?;

    println!(
        "codex-mesh {}: node {name} ({peer_id})",
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "  mesh       {mesh_id}{}",
        if founding { " (new)" } else { "" }
    );
    println!("  api        {local_url}");
    println!("  token      stored in {}", data.token_path().display());
    let ticket_handle = handle.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(ticket) = ticket_handle.ticket().await {
            println!("  join more nodes with:\n    codex-mesh join {ticket}");
        }
    });

    wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    streams.close();
    handle.shutdown();
    let _ = mesh_task.await;
    net_task.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    data.clear_api_url();
    Ok(())
}

/// The HTTP server's limits, from the options and the limit on open files (raised first, as
/// far as the hard limit allows, to what the connection cap needs).
fn server_limits(args: &NodeArgs) -> crate::http::limits::ServerLimits {
    use crate::http::limits;
    let mut max_connections = args.http_max_connections;
    let wanted = u64::from(max_connections) + limits::RESERVED_FILES;
    if let Some(files) = limits::raise_file_limit(wanted) {
        let fitted = limits::fit_connections(max_connections, files);
        if fitted < max_connections {
            tracing::warn!(
                "this process may open {files} files: serving at most {fitted} HTTP connections \
                 instead of --http-max-connections {max_connections} (raise the limit with \
                 `ulimit -n` or LimitNOFILE)"
            );
            max_connections = fitted;
        }
    }
    limits::ServerLimits {
        max_connections,
        header_timeout: Duration::from_secs(args.http_header_timeout_secs),
    }
}

/// Agents and directories for running jobs, from the options.
fn runner_config(args: &NodeArgs, data: &DataDir) -> Result<RunnerConfig, NodeError> {
    let mut commands = BTreeMap::new();
    for text in args.agents.iter().filter(|t| !t.trim().is_empty()) {
        let agent = parse_agent(text).map_err(NodeError::Config)?;
        commands.insert(agent.name.clone(), agent);
    }
    let codex = find_program(&args.codex_bin);
    if codex.is_none() {
        tracing::warn!(
            "codex CLI {:?} not found: this node will not take codex jobs",
            args.codex_bin
        );
    }
    let pass_env = args
        .pass_env
        .iter()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .map(|name| {
            let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if valid {
                Ok(name)
            } else {
                Err(NodeError::Config(format!(
                    "--pass-env {name:?}: not an environment variable name (letters, digits and _, not starting with a digit)"
                )))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    crate::runner::repos::tune_git();
    let workdir_root = args
        .workdir_root
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("codex-mesh-jobs"));
    let isolation = Isolation::setup(isolation::Options {
        agent_user: args.agent_user.as_deref(),
        allow_root_agents: args.allow_root_agents,
        bwrap: &args.bwrap,
        data_dir: data.root(),
        workdir_root: &workdir_root,
    })?;
    let runs_dir = data.root().join("runs");
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let io = |source| IsolationError::Io {
            path: runs_dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&runs_dir)
            .map_err(io)?;
        std::fs::set_permissions(&runs_dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(RunnerConfig {
        repos: RepoConfig {
            mirror_root: data.root().join("mirrors"),
            github_url: args.github_url.clone(),
            token: args.github_token.clone().filter(|t| !t.expose().is_empty()),
            credentials: CredentialPolicy::new(
                &args.github_url,
                &args.credential_hosts,
                args.allow_http_credentials,
            )
            .map_err(|e| NodeError::Config(e.to_string()))?,
            allow_local: args.allow_local_repos,
            spares: SpareConfig {
                root: workdir_root.join(SPARES_DIR),
                max: args.spare_checkouts,
            },
        },
        workdir_root,
        log_dir: data.root().join("job-logs"),
        runs_dir,
        max_log_bytes: args.max_log_mb << 20,
        agents: Agents { codex, commands },
        retention: Retention {
            keep: args.keep_workdirs,
            max_age: std::time::Duration::from_secs(args.workdir_max_age_hours * 3600),
            keep_failed: args.keep_failed_workdirs,
        },
        active: Default::default(),
        isolation,
        pass_env,
    })
}

/// Fail early, with a clear message, if a fixed mesh port is taken: libp2p listens with
/// `SO_REUSEPORT`, so a second process on the same port would otherwise start silently and
/// share the incoming connections.
fn probe_listen(addr: &Multiaddr) -> Result<(), NodeError> {
    use libp2p::multiaddr::Protocol;
    let mut parts = addr.iter();
    let ip: std::net::IpAddr = match parts.next() {
        Some(Protocol::Ip4(ip)) => ip.into(),
        Some(Protocol::Ip6(ip)) => ip.into(),
        _ => return Ok(()),
    };
    let port = match parts.next() {
        Some(Protocol::Tcp(port)) if port != 0 => port,
        _ => return Ok(()),
    };
    match std::net::TcpListener::bind((ip, port)) {
        Ok(_) => Ok(()),
        Err(e) => Err(NodeError::Net(NetError::Listen {
            addr: addr.clone(),
            reason: if e.kind() == std::io::ErrorKind::AddrInUse {
                "address in use".to_string()
            } else {
                e.to_string()
            },
        })),
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
