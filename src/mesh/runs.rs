//! Jobs running on this node: start them when an assignment is accepted, record their status
//! changes, and stop them when the job is cancelled or taken over elsewhere.

use super::{Input, Mesh};
use crate::proto::crdt::MaxReg;
use crate::proto::jobs::{JobRecord, JobStatus, Progress};
use crate::proto::records::{Key, Record};
use crate::runner::{self, JobUpdate};

impl Mesh {
    /// Start running an accepted assignment (once).
    pub(super) fn start_run(&mut self, record: &JobRecord) {
        let Some(assignment) = record.assignment.as_ref().map(|a| a.0.clone()) else {
            return;
        };
        let id = record.spec.id.clone();
        if self.runs.contains_key(&id) {
            return;
        }
        let inputs = self.inputs_tx.clone();
        let handle = runner::start(
            record.spec.clone(),
            assignment.attempt,
            assignment.key(),
            self.config.runner.clone(),
            move |update| {
                let _ = inputs.send(Input::JobUpdate(update));
            },
        );
        tracing::info!(job = %id, attempt = assignment.attempt, "running");
        self.runs
            .insert(id, (assignment.attempt, assignment.key(), handle));
    }

    /// Record a status change reported by a run.
    pub(super) fn on_job_update(&mut self, update: JobUpdate) {
        if update.status.is_terminal() {
            self.runs.remove(&update.id);
        }
        let key = Key::Job(update.id.clone()).encode();
        let Some(Record::Job(job)) = self.state.get(&key).cloned() else {
            return;
        };
        let progress = Progress {
            attempt: update.attempt,
            assignment: update.assignment,
            status: update.status,
            reason: update.reason,
            result: update.result,
            stamp: self.stamp(),
        };
        let record = JobRecord {
            progress: MaxReg(progress),
            ..*job
        };
        if let Err(e) = self.commit_local(key, Record::Job(Box::new(record))) {
            tracing::error!("cannot record the status of job {}: {e}", update.id);
        }
    }

    /// Stop our run of `job` if the job was cancelled, or moved to another attempt or node.
    pub(super) fn check_run(&mut self, job: &JobRecord) {
        let Some((attempt, key, handle)) = self.runs.get(&job.spec.id) else {
            return;
        };
        let progress = &job.progress.0;
        let ours = progress.attempt == *attempt && progress.assignment == *key;
        let cancelled = ours && progress.status == JobStatus::Cancelled;
        let superseded = progress.attempt > *attempt
            || (progress.attempt == *attempt && progress.assignment > *key);
        if cancelled || superseded {
            tracing::info!(job = %job.spec.id, cancelled, superseded, "stopping the run");
            handle.cancel();
        }
    }
}
