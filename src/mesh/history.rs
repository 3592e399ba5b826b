//! History duties: the master moves the mesh's horizon (`--job-history-days`), and every
//! node compacts the finished jobs the horizon covers, a batch per tick so no tick holds the
//! control task for long, and removes their logs on a blocking task.

use std::path::PathBuf;

use super::{unix_ms, Mesh};
use crate::metrics::Metrics;
use crate::proto::crdt::MaxReg;
use crate::proto::history::{next_horizon, Horizon};
use crate::proto::lookup::RecordLookup;
use crate::proto::records::{Key, Record};
use crate::runner::logs;

/// Jobs compacted per tick (one store transaction).
pub const COMPACT_BATCH: usize = 512;

/// Where this node stands with the history duties.
#[derive(Debug)]
pub struct HistoryDuty {
    /// `--job-history-days` (0 keeps all history); only the master's counts.
    pub days: u32,
    /// Jobs may be left to compact (a new horizon, or the start of the process).
    pub pending: bool,
}

impl HistoryDuty {
    /// Duties under `--job-history-days days`; a pass runs at start for a stored horizon.
    pub fn new(days: u32) -> HistoryDuty {
        HistoryDuty {
            days,
            pending: true,
        }
    }
}

impl Mesh {
    /// On the master: move the horizon once `--job-history-days` says it is due.
    pub(super) fn move_horizon(&mut self) {
        let now = unix_ms();
        let Some(before_ms) = next_horizon(self.replica.horizon(), now, self.history.days) else {
            return;
        };
        let record = Record::History(MaxReg(Horizon {
            before_ms,
            epoch: self.election.term(),
            set_by: self.id.clone(),
        }));
        match self.commit_local(Key::History.encode(), record) {
            Ok(()) => tracing::info!(
                before_ms,
                days = self.history.days,
                "moved the history horizon"
            ),
            Err(e) => tracing::warn!("cannot move the history horizon: {e}"),
        }
    }

    /// Compact one batch of the jobs the horizon covers, and remove their logs off the
    /// control task. Compaction is not gossiped: every node compacts its own copies, and
    /// anti-entropy carries compacted records to nodes that have not yet.
    pub(super) fn compact_history_batch(&mut self) {
        if !self.history.pending {
            return;
        }
        let ids = match self.replica.compact_history(COMPACT_BATCH) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!("cannot compact job history: {e}");
                return;
            }
        };
        self.history.pending = ids.len() >= COMPACT_BATCH;
        if ids.is_empty() {
            return;
        }
        tracing::info!(jobs = ids.len(), "compacted job history");
        Metrics::add(&self.metrics.jobs_compacted, ids.len() as u64);
        let paths: Vec<PathBuf> = ids
            .iter()
            .map(|id| logs::log_path(&self.config.runner.log_dir, id))
            .collect();
        tokio::task::spawn_blocking(move || remove_logs(&paths));
    }
}

/// Remove the logs of compacted jobs (missing ones are fine: not every node has each log).
fn remove_logs(paths: &[PathBuf]) {
    for path in paths {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove the log {}: {e}", path.display()),
        }
    }
}
