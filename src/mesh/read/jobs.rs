//! Job views over a [`Snapshot`]: one job, and pages of jobs newest first from the indexes.

use std::path::PathBuf;

use crate::mesh::jobs::{AttemptView, JobError, JobList, JobQuery, JobView};
use crate::mesh::snapshot::index::current_node;
use crate::mesh::snapshot::Snapshot;
use crate::proto::jobs::{JobRecord, JobStatus};
use crate::proto::lookup::RecordLookup;
use crate::runner::logs;

use super::nodes::{master_of, node_name, resolve_node};

/// Most jobs in one page.
pub const MAX_PAGE: usize = 500;

/// A job as the API shows it.
pub fn job_view(snap: &Snapshot, job: &JobRecord) -> JobView {
    let progress = &job.progress.0;
    let assignment = job
        .assignment
        .as_ref()
        .map(|a| &a.0)
        .filter(|a| a.attempt == progress.attempt);
    let node = assignment.map(|a| a.node.clone());
    let node_name = node.as_ref().and_then(|id| node_name(snap, id));
    JobView {
        status: progress.status,
        attempt: progress.attempt,
        node,
        node_name,
        epoch: assignment.map(|a| a.epoch),
        reason: progress.reason.clone(),
        result: progress.result.clone(),
        updated_at_ms: progress.stamp.at.wall_ms,
        attempts: attempt_views(snap, job),
        compacted: job.compacted,
        spec: job.spec.clone(),
    }
}

/// Every attempt of `job` so far, the current one last.
pub fn attempt_views(snap: &Snapshot, job: &JobRecord) -> Vec<AttemptView> {
    let progress = &job.progress.0;
    let current_node = current_node(job).cloned();
    (1..=progress.attempt)
        .map(|attempt| {
            let entry = job.attempts.get(attempt);
            let current = attempt == progress.attempt;
            let node = match (current, entry.and_then(|e| e.node.clone())) {
                (true, _) if current_node.is_some() => current_node.clone(),
                (_, node) => node,
            };
            let (status, reason) = if current {
                (progress.status, progress.reason.clone())
            } else {
                entry.map_or((JobStatus::Lost, None), |e| (e.status, e.reason.clone()))
            };
            let ended_at = entry.and_then(|e| e.ended_at_ms).or_else(|| {
                (current && progress.status.is_terminal()).then_some(progress.stamp.at.wall_ms)
            });
            AttemptView {
                attempt,
                node_name: node.as_ref().and_then(|n| node_name(snap, n)),
                node,
                status,
                reason,
                started_at: entry.and_then(|e| e.started_at_ms),
                ended_at,
            }
        })
        .collect()
}

/// One job.
pub fn get(snap: &Snapshot, id: &str) -> Result<JobView, JobError> {
    snap.job(id)
        .map(|job| job_view(snap, job))
        .ok_or_else(|| JobError::NotFound(id.to_string()))
}

/// Jobs matching `query`, newest first. Status and node filters walk their index, so a page
/// costs O(offset + page) plus the log of the job count; a text filter reads every job the
/// other filters leave.
pub fn list(snap: &Snapshot, query: &JobQuery) -> Result<JobList, JobError> {
    let node = match &query.node {
        Some(n) => Some(resolve_node(snap, n).map_err(|e| JobError::Invalid(e.to_string()))?),
        None => None,
    };
    let limit = query.limit.clamp(1, MAX_PAGE);
    let index = snap.jobs();
    let ids = index.matching(query.status, node.as_ref()).rev();
    let Some(text) = query.text.as_ref().map(|t| t.to_lowercase()) else {
        let total = index.count(query.status, node.as_ref());
        let jobs = ids
            .skip(query.offset)
            .filter_map(|id| snap.job(id))
            .take(limit)
            .map(|job| job_view(snap, job))
            .collect();
        return Ok(JobList { jobs, total });
    };
    let mut total = 0;
    let mut jobs = Vec::new();
    for job in ids.filter_map(|id| snap.job(id)) {
        let hit = job.spec.id.to_lowercase().contains(&text)
            || job.spec.prompt.to_lowercase().contains(&text);
        if !hit {
            continue;
        }
        if total >= query.offset && jobs.len() < limit {
            jobs.push(job_view(snap, job));
        }
        total += 1;
    }
    Ok(JobList { jobs, total })
}

/// Where a job's log may be read: this node's file (if it exists, which the caller checks
/// off the async runtime), then the peers to ask, worker first, then the master.
pub fn log_places(snap: &Snapshot, id: &str) -> Result<(PathBuf, Vec<libp2p::PeerId>), JobError> {
    let job = snap
        .job(id)
        .ok_or_else(|| JobError::NotFound(id.to_string()))?;
    if job.compacted {
        return Err(JobError::Gone(format!(
            "job {id} ended before the mesh's history horizon (--job-history-days): its log was dropped"
        )));
    }
    let local = snap.local();
    let mut peers = Vec::new();
    if let Some(node) = job.assignment.as_ref().map(|a| &a.0.node) {
        peers.extend(node.parse::<libp2p::PeerId>().ok());
    }
    if let Some(master) = master_of(snap) {
        peers.extend(master.parse::<libp2p::PeerId>().ok());
    }
    peers.retain(|p| p.to_string() != local.id);
    peers.dedup();
    Ok((logs::log_path(&local.log_dir, id), peers))
}
