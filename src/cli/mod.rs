//! The command line: node commands (`up`, `join`) and client commands that talk to a node's
//! HTTP API (`status`, `nodes`, `ticket`, `node ...`).

pub mod client;
pub mod jobs;
pub mod sse;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::secret::Secret;
use libp2p::Multiaddr;

/// Run many Codex coding agents on your own servers, as one private mesh.
#[derive(Debug, Parser)]
#[command(name = "codex-mesh", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a node; the first time, create a new mesh and print its join ticket.
    Up(NodeArgs),
    /// Start a node that joins the mesh of TICKET (resumes if the data dir already joined).
    Join {
        /// Join ticket printed by `codex-mesh up` or `codex-mesh ticket`.
        ticket: String,
        /// Node options.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Show this node's view of the mesh: master, epoch, voters, members.
    Status(ClientArgs),
    /// List the nodes of the mesh.
    Nodes(ClientArgs),
    /// Print a join ticket for adding nodes.
    Ticket(ClientArgs),
    /// Submit a job: a prompt, optional repositories, and where to run it.
    Submit(SubmitArgs),
    /// List jobs, newest first.
    Jobs {
        /// Only jobs with this status (queued, running, succeeded, failed, ...).
        #[arg(long)]
        status: Option<String>,
        /// Only jobs on this node (id or name).
        #[arg(long)]
        node: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// API options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one job with its status and result.
    Job {
        /// Job id.
        id: String,
        /// API options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a job's log; with -f, follow it until the job ends.
    Logs {
        /// Job id.
        id: String,
        /// Keep printing new output until the job has finished.
        #[arg(short, long)]
        follow: bool,
        /// API options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: String,
        /// API options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run a finished job again as a new attempt.
    Retry {
        /// Job id.
        id: String,
        /// API options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Act on a node: drain, undrain, remove, admit, edit.
    Node {
        /// The action.
        #[command(subcommand)]
        action: NodeCommand,
    },
}

/// Options of `codex-mesh submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The prompt; `-` reads it from standard input.
    pub prompt: String,
    /// Run on this node (id or name).
    #[arg(long, conflicts_with_all = ["tag", "any"])]
    pub node: Option<String>,
    /// Run on a node with this tag.
    #[arg(long, conflicts_with = "any")]
    pub tag: Option<String>,
    /// Run on any node (the default).
    #[arg(long)]
    pub any: bool,
    /// Repository to clone: owner/name, a URL or a path, optionally with #branch (repeatable).
    #[arg(long = "repo")]
    pub repos: Vec<String>,
    /// Agent to run (default: codex).
    #[arg(long)]
    pub agent: Option<String>,
    /// Model for the agent.
    #[arg(long)]
    pub model: Option<String>,
    /// Sandbox: read-only, workspace-write (default) or danger-full-access.
    #[arg(long)]
    pub sandbox: Option<String>,
    /// Wall-clock limit in seconds (default 3600).
    #[arg(long)]
    pub timeout: Option<u32>,
    /// Limit on agent silence in seconds (default 600).
    #[arg(long)]
    pub idle_timeout: Option<u32>,
    /// Wait for the job to finish; exit non-zero unless it succeeds.
    #[arg(long)]
    pub wait: bool,
    /// API options.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Operator actions on a node.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Stop giving the node new jobs.
    Drain(NodeTarget),
    /// Give the node jobs again.
    Undrain(NodeTarget),
    /// Remove the node: every peer refuses it until it is re-admitted.
    Remove(NodeTarget),
    /// Re-admit a removed node.
    Admit(NodeTarget),
    /// Change a node's tags and/or slots.
    Edit {
        /// The node.
        #[command(flatten)]
        target: NodeTarget,
        /// New tags (comma-separated; empty string clears them).
        #[arg(long, value_delimiter = ',')]
        tags: Option<Vec<String>>,
        /// New number of job slots.
        #[arg(long)]
        slots: Option<u32>,
    },
}

/// Which node, and how to reach the API.
#[derive(Debug, Args)]
pub struct NodeTarget {
    /// Node id or name.
    pub node: String,
    /// API options.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Options of a node process.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Data directory (identity, mesh key, store, API token).
    #[arg(long, env = "CODEX_MESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Node name shown in the dashboard and chat (default: host name).
    #[arg(long, env = "CODEX_MESH_NAME")]
    pub name: Option<String>,
    /// Tags for targeting jobs, comma-separated.
    #[arg(long, env = "CODEX_MESH_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,
    /// Jobs this node runs at once.
    #[arg(long, env = "CODEX_MESH_SLOTS", default_value_t = 2)]
    pub slots: u32,
    /// Mesh listen address (libp2p multiaddress).
    #[arg(
        long,
        env = "CODEX_MESH_LISTEN",
        default_value = "/ip4/0.0.0.0/tcp/7781"
    )]
    pub listen: Multiaddr,
    /// HTTP API and dashboard address.
    #[arg(long, env = "CODEX_MESH_HTTP", default_value = "0.0.0.0:7780")]
    pub http: SocketAddr,
    /// Most HTTP connections open at once; more clients wait until one closes (lowered to
    /// what the limit on open files allows).
    #[arg(
        long,
        env = "CODEX_MESH_HTTP_MAX_CONNECTIONS",
        default_value_t = crate::http::limits::DEFAULT_MAX_CONNECTIONS,
        value_parser = clap::value_parser!(u32).range(1..=crate::http::limits::MAX_CAP as i64)
    )]
    pub http_max_connections: u32,
    /// Seconds a client has to send a request's headers; an idle connection is closed after
    /// as long.
    #[arg(
        long,
        env = "CODEX_MESH_HTTP_HEADER_TIMEOUT_SECS",
        default_value_t = crate::http::limits::DEFAULT_HEADER_TIMEOUT_SECS,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub http_header_timeout_secs: u64,
    /// Most event streams (server-sent events) this node serves at once; more get 503. Must
    /// be below --http-max-connections.
    #[arg(
        long,
        env = "CODEX_MESH_MAX_EVENT_STREAMS",
        default_value_t = crate::http::limits::DEFAULT_MAX_EVENT_STREAMS,
        value_parser = clap::value_parser!(u32).range(1..=crate::http::limits::MAX_CAP as i64)
    )]
    pub max_event_streams: u32,
    /// Worker only: never hold the master lease nor vote.
    #[arg(long, env = "CODEX_MESH_NO_MASTER")]
    pub no_master: bool,
    /// Extra peer address to dial (repeatable; `/p2p/<id>` suffix recommended).
    #[arg(long = "peer", env = "CODEX_MESH_PEERS", value_delimiter = ',')]
    pub peers: Vec<Multiaddr>,
    /// Define an agent: NAME=COMMAND, with {prompt}, {workdir} and {model} placeholders
    /// (repeatable; in the variable, one definition per line).
    #[arg(long = "agent", env = "CODEX_MESH_AGENTS", value_delimiter = '\n')]
    pub agents: Vec<String>,
    /// Pass this environment variable on to agents too, e.g. another agent's API key
    /// (repeatable; comma-separated in the variable). Agents otherwise see only PATH, HOME,
    /// USER, LANG, TERM, TMPDIR, CODEX_HOME, OPENAI_API_KEY, CODEX_API_KEY and OPENAI_BASE_URL.
    #[arg(long = "pass-env", env = "CODEX_MESH_PASS_ENV", value_delimiter = ',')]
    pub pass_env: Vec<String>,
    /// The codex CLI to run for `codex` jobs (a name on PATH or a path).
    #[arg(long, env = "CODEX_MESH_CODEX_BIN", default_value = "codex")]
    pub codex_bin: String,
    /// Where job work directories are made (default: <temp dir>/codex-mesh-jobs).
    #[arg(long, env = "CODEX_MESH_WORKDIR_ROOT")]
    pub workdir_root: Option<PathBuf>,
    /// Token for fetching private repositories over https (never stored in a URL); sent only
    /// to the --github-url host and --credential-hosts.
    #[arg(long, env = "CODEX_MESH_GITHUB_TOKEN", hide_env_values = true)]
    pub github_token: Option<Secret<String>>,
    /// Base URL that `owner/name` repositories are fetched from; its host receives the token.
    #[arg(
        long,
        env = "CODEX_MESH_GITHUB_URL",
        default_value = "https://github.com"
    )]
    pub github_url: String,
    /// More hosts (`host` or `host:port`) that may receive the token, comma-separated.
    #[arg(long, env = "CODEX_MESH_CREDENTIAL_HOSTS", value_delimiter = ',')]
    pub credential_hosts: Vec<String>,
    /// Send the token to those hosts over plain http too (only on a network you trust).
    #[arg(long, env = "CODEX_MESH_ALLOW_HTTP_CREDENTIALS")]
    pub allow_http_credentials: bool,
    /// Let jobs name repositories by absolute path on this node.
    #[arg(long, env = "CODEX_MESH_ALLOW_LOCAL_REPOS")]
    pub allow_local_repos: bool,
    /// Keep a ready-made checkout of this many recently used repositories, so that the next
    /// job on one of them starts without writing the whole tree (0: off).
    #[arg(long, env = "CODEX_MESH_SPARE_CHECKOUTS", default_value_t = 8)]
    pub spare_checkouts: usize,
    /// Largest log file kept of one job, in MiB; output beyond it is dropped and a note in
    /// the log says so (the master keeps a copy of up to 64 MiB of each log).
    #[arg(
        long,
        env = "CODEX_MESH_MAX_LOG_MB",
        default_value_t = crate::runner::logs::DEFAULT_MAX_LOG_MB,
        value_parser = clap::value_parser!(u64).range(1..=1 << 20)
    )]
    pub max_log_mb: u64,
    /// Keep at most this many job work directories (newest first).
    #[arg(long, env = "CODEX_MESH_KEEP_WORKDIRS", default_value_t = 20)]
    pub keep_workdirs: usize,
    /// Remove job work directories older than this many hours.
    #[arg(long, env = "CODEX_MESH_WORKDIR_MAX_AGE_HOURS", default_value_t = 72)]
    pub workdir_max_age_hours: u64,
    /// How many times a job whose node went offline is queued again (as a new attempt).
    #[arg(long, env = "CODEX_MESH_LOST_REQUEUES", default_value_t = 1)]
    pub lost_requeues: u32,
    /// Finished jobs that ended more than this many days ago are compacted on every node:
    /// the record keeps its summary (status, times, node, repos, token usage), the final
    /// message, diff summary, command list and log are dropped. The master's setting counts;
    /// 0 keeps all history.
    #[arg(
        long,
        env = "CODEX_MESH_JOB_HISTORY_DAYS",
        default_value_t = crate::proto::history::DEFAULT_HISTORY_DAYS,
        value_parser = clap::value_parser!(u32).range(0..=crate::proto::history::MAX_HISTORY_DAYS as i64)
    )]
    pub job_history_days: u32,
    /// Keep the work directories of jobs that did not succeed (for inspection).
    #[arg(long, env = "CODEX_MESH_KEEP_FAILED_WORKDIRS")]
    pub keep_failed_workdirs: bool,
    /// Run agents as this user (uid and primary group): their work directories are handed to
    /// it and HOME and USER are its own. Needs a node that runs as root; give the user a
    /// CODEX_HOME it can write.
    #[arg(long, env = "CODEX_MESH_AGENT_USER")]
    pub agent_user: Option<String>,
    /// Let a node that runs as root, without --agent-user, run agents as root (otherwise it
    /// refuses every job).
    #[arg(long, env = "CODEX_MESH_ALLOW_ROOT_AGENTS")]
    pub allow_root_agents: bool,
    /// bubblewrap program that hides the data directory from agents running as the node's own
    /// user (`none`: do not wrap agents).
    #[arg(long, env = "CODEX_MESH_BWRAP", default_value = "bwrap")]
    pub bwrap: String,
}

/// How a client command finds a node's API.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Data directory of the local node (to find its API URL and token).
    #[arg(long, env = "CODEX_MESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// API base URL (default: the local node's, from the data dir).
    #[arg(long, env = "CODEX_MESH_API")]
    pub api: Option<String>,
    /// API bearer token (default: from the data dir).
    #[arg(long, env = "CODEX_MESH_TOKEN", hide_env_values = true)]
    pub token: Option<Secret<String>>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The default data directory: `$XDG_DATA_HOME/codex-mesh`, `~/.local/share/codex-mesh`, or
/// `./codex-mesh-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("codex-mesh");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/codex-mesh"),
        None => PathBuf::from("codex-mesh-data"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_on_the_command_line_never_print() {
        let cli = Cli::parse_from(["codex-mesh", "up", "--github-token", "ghp_do_not_print_me"]);
        let shown = format!("{cli:?}");
        assert!(!shown.contains("ghp_do_not_print_me"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        let cli = Cli::parse_from(["codex-mesh", "status", "--token", "api-token-secret"]);
        assert!(!format!("{cli:?}").contains("api-token-secret"));
    }
}
