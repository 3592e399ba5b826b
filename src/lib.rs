//! codex-mesh: run many Codex coding agents on your own servers as one private mesh.
//!
//! Module map:
//! * [`proto`]: pure protocol logic: records and merge rules, clocks, election, voter choice.
//! * [`store`]: redb persistence, versioned tables.
//! * [`wire`]: messages between peers, with size limits.
//! * [`net`]: the libp2p peer (one event loop owns the swarm; a cloneable client talks to it).
//! * [`mesh`]: the runtime that ties state, store, network and election together.
//! * [`http`]: the REST API and metrics every peer serves.
//! * [`cli`]: the command line and its HTTP client.
//! * [`runner`]: running a job's agent process on this node.
//! * [`node`]: node start-up and shutdown.
//! * [`secret`]: the redacting, self-wiping type every credential lives in.
//! * [`datadir`], [`ticket`], [`sysinfo`], [`metrics`]: supporting pieces.

pub mod cli;
pub mod datadir;
pub mod faults;
pub mod http;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod node;
pub mod proto;
pub mod runner;
pub mod secret;
pub mod store;
pub mod sysinfo;
pub mod ticket;
pub mod wire;
