//! What the API reads, as functions over an immutable [`super::snapshot::Snapshot`]: no read
//! waits on the mesh task.

pub mod jobs;
pub mod nodes;
