//! What the API shows and accepts: read-only views of the mesh and node actions.

use serde::Serialize;
use thiserror::Error;

use crate::proto::records::Gpu;

/// Counts of mesh members.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MemberCount {
    /// Members heard from recently.
    pub online: usize,
    /// Members not removed.
    pub total: usize,
}

/// This node's view of the mesh (`GET /api/v1/status`).
#[derive(Clone, Debug, Serialize)]
pub struct StatusView {
    /// This node's id.
    pub node_id: String,
    /// This node's name.
    pub name: String,
    /// Public mesh id (derived from the mesh key).
    pub mesh_id: String,
    /// Node id of the master, if one is known to hold the lease.
    pub master: Option<String>,
    /// Name of the master.
    pub master_name: Option<String>,
    /// Since when the master holds the lease (Unix ms).
    pub master_since_ms: Option<u64>,
    /// The lease epoch.
    pub epoch: u64,
    /// Whether this node acts as master right now.
    pub is_master: bool,
    /// Current voters.
    pub voters: Vec<String>,
    /// Member counts.
    pub members: MemberCount,
    /// Peers with an open connection.
    pub peers_connected: usize,
    /// Addresses other peers can dial, with `/p2p/<id>`.
    pub listen_addrs: Vec<String>,
    /// codex-mesh version.
    pub version: String,
}

/// One node as the API shows it (`GET /api/v1/nodes`).
#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Effective tags (operator edit or the node's own, whichever is newer).
    pub tags: Vec<String>,
    /// Effective job slots.
    pub slots: u32,
    /// Heard from within the liveness window.
    pub online: bool,
    /// Takes no new jobs.
    pub draining: bool,
    /// Removed from the mesh (refused until re-admitted).
    pub removed: bool,
    /// `online`, `offline`, `draining` or `removed`.
    pub state: &'static str,
    /// May hold the master lease.
    pub master_eligible: bool,
    /// Holds the master lease.
    pub is_master: bool,
    /// Votes in master elections.
    pub is_voter: bool,
    /// Operating system.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// GPUs.
    pub gpus: Vec<Gpu>,
    /// codex-mesh version.
    pub version: String,
    /// Dialable addresses.
    pub addrs: Vec<String>,
    /// HTTP API base URL.
    pub api_url: Option<String>,
    /// Process start (Unix ms).
    pub started_at_ms: u64,
    /// Last time this node was heard from (Unix ms).
    pub last_seen_ms: u64,
    /// Agents the node can run.
    pub agents: Vec<String>,
    /// Jobs may name local repository paths on it.
    pub local_repos: bool,
}

/// An operator action on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeAction {
    /// Stop giving it new jobs.
    Drain,
    /// Give it jobs again.
    Undrain,
    /// Remove it: every peer refuses it until re-admitted.
    Remove,
    /// Re-admit a removed node.
    Admit,
    /// Change tags and/or slots.
    Edit {
        /// New tags.
        tags: Option<Vec<String>>,
        /// New slot count.
        slots: Option<u32>,
    },
}

/// Why a node action failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ActionError {
    /// No node has that id or name.
    #[error("no node with id or name {0:?}")]
    NotFound(String),
    /// The action's arguments are invalid.
    #[error("{0}")]
    Invalid(String),
    /// The change could not be stored.
    #[error("could not store the change: {0}")]
    Store(String),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Unavailable,
}

/// Who is master, as `GET /api/v1/events` reports it (`master` events).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MasterView {
    /// Node id of the master, if one is known to hold the lease.
    pub master: Option<String>,
    /// Name of the master.
    pub master_name: Option<String>,
    /// The lease epoch.
    pub epoch: u64,
    /// Since when the master holds the lease (Unix ms).
    pub since_ms: Option<u64>,
    /// Current voters.
    pub voters: Vec<String>,
}
