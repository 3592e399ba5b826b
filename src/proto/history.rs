//! Job history that stops growing: the master writes a horizon (record `history`), and every
//! node compacts the finished jobs that ended before it. A compacted job keeps its summary
//! (spec, status, reason, times, node, attempts, token usage, exit code, durations, and
//! fields of newer versions such as pull-request links); its agent's final message, diff
//! summary and command list are dropped, and so is its log, on every node.
//!
//! Compaction is part of the job record's merge rule (see [`super::jobs::JobRecord`]): the
//! `compacted` flag only goes from false to true, and a compacted record strips every
//! result merged into it. So a node that comes back with full copies after the horizon
//! converges to the compacted records, and its copies never bring the dropped data back.

use serde::{Deserialize, Serialize};

use super::crdt::NodeId;
use super::jobs::{JobRecord, JobResult};

/// One day in milliseconds.
pub const DAY_MS: u64 = 24 * 3600 * 1000;
/// Default of `--job-history-days`.
pub const DEFAULT_HISTORY_DAYS: u32 = 30;
/// Largest accepted `--job-history-days` (about 27 years).
pub const MAX_HISTORY_DAYS: u32 = 10_000;
/// The master moves the horizon only in steps of at least this much, so the record is
/// rewritten about once an hour, not on every tick.
pub const HORIZON_STEP_MS: u64 = 3600 * 1000;

/// The mesh's history horizon, key `history`. Ordered by `before_ms` first, so the merge
/// (a max register) only moves it forward: history dropped once is not expected back.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Horizon {
    /// Finished jobs that ended before this time (Unix ms) are compacted.
    pub before_ms: u64,
    /// Lease epoch of the master that wrote it.
    pub epoch: u64,
    /// The master that wrote it.
    pub set_by: NodeId,
}

/// Where the master should move the horizon to now, if anywhere: `days` before `now_ms`,
/// once that is at least [`HORIZON_STEP_MS`] past the current one. `days == 0` keeps all
/// history.
pub fn next_horizon(current: Option<&Horizon>, now_ms: u64, days: u32) -> Option<u64> {
    if days == 0 {
        return None;
    }
    let target = now_ms.checked_sub(u64::from(days) * DAY_MS)?;
    match current {
        Some(h) if target < h.before_ms.saturating_add(HORIZON_STEP_MS) => None,
        _ => Some(target),
    }
}

/// Clock difference between nodes tolerated when judging a horizon from a peer.
pub const MAX_SKEW_MS: u64 = HORIZON_STEP_MS;

/// Whether a horizon from a peer could have been written by an honest master whose clock is
/// within [`MAX_SKEW_MS`] of `now_ms`: the shortest history is one day, so a horizon newer
/// than a day ago would drop recent jobs and is refused.
pub fn plausible(horizon: &Horizon, now_ms: u64) -> Result<(), String> {
    let latest = now_ms.saturating_add(MAX_SKEW_MS).saturating_sub(DAY_MS);
    if horizon.before_ms > latest {
        return Err(format!(
            "a history horizon at {} ms, less than a day before this node's clock ({now_ms} ms)",
            horizon.before_ms
        ));
    }
    Ok(())
}

/// When the job's current attempt ended (Unix ms), if it has ended: the attempt history's
/// end time, else the time of the terminal report.
pub fn ended_at_ms(job: &JobRecord) -> Option<u64> {
    let progress = &job.progress.0;
    if !progress.status.is_terminal() {
        return None;
    }
    let recorded = job
        .attempts
        .get(progress.attempt)
        .and_then(|entry| entry.ended_at_ms);
    Some(recorded.unwrap_or(progress.stamp.at.wall_ms))
}

/// Whether `job` is still to be compacted under a horizon at `before_ms`.
pub fn is_due(job: &JobRecord, before_ms: u64) -> bool {
    !job.compacted && ended_at_ms(job).is_some_and(|ended| ended < before_ms)
}

/// Compact `job`: mark it and drop what only the full record needs. Returns whether anything
/// changed. Idempotent.
pub fn compact(job: &mut JobRecord) -> bool {
    let marked = !job.compacted;
    job.compacted = true;
    let stripped = job.progress.0.result.as_mut().is_some_and(strip_result);
    marked | stripped
}

/// Drop the parts of a result a compacted job does not keep. Returns whether anything was
/// dropped.
pub fn strip_result(result: &mut JobResult) -> bool {
    let had =
        result.final_message.is_some() || !result.diffs.is_empty() || !result.commands.is_empty();
    result.final_message = None;
    result.diffs = Vec::new();
    result.commands = Vec::new();
    had
}

/// Whether a result carries nothing a compacted job drops.
pub fn is_stripped(result: &JobResult) -> bool {
    result.final_message.is_none() && result.diffs.is_empty() && result.commands.is_empty()
}

#[cfg(test)]
pub(crate) mod tests;
