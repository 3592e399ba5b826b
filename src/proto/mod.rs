//! Pure, I/O-free protocol logic: replicated record types and their merge rules, the hybrid
//! logical clock, anti-entropy summaries, master election and voter selection. Everything
//! here is deterministic so it can be property-tested and simulated.

pub mod attempts;
pub mod crdt;
pub mod dispatch;
pub mod duties;
pub mod election;
pub mod history;
pub mod hlc;
pub mod ids;
pub mod jobs;
pub mod lookup;
pub mod records;
pub mod repo_spec;
pub mod schedule;
pub mod state;
pub mod voters;
