//! Jobs running on this node: start them when an assignment is accepted, record their status
//! changes, and stop them when the job is cancelled or taken over elsewhere.

use super::jobs::JobError;
use super::{Input, Mesh};
use crate::proto::crdt::MaxReg;
use crate::proto::jobs::{JobRecord, JobStatus, Progress};
use crate::proto::records::{Key, Record};
use crate::runner::{self, logs, JobUpdate};
use crate::wire::{Request, Response};

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
        let finished = update.status.is_terminal();
        if finished {
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
        if finished {
            self.copy_log_to_master(&update.id);
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

/// Where a job's log can be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogSource {
    /// In this node's log directory.
    Local(std::path::PathBuf),
    /// On these peers, to be asked in order (the worker, then the master's copy).
    Remote(Vec<libp2p::PeerId>),
}

impl Mesh {
    fn log_file(&self, id: &str) -> std::path::PathBuf {
        logs::log_path(&self.config.runner.log_dir, id)
    }

    /// Where the log of job `id` is.
    pub(super) fn log_source(&self, id: &str) -> Result<LogSource, JobError> {
        let key = Key::Job(id.to_string()).encode();
        let Some(Record::Job(job)) = self.state.get(&key) else {
            return Err(JobError::NotFound(id.to_string()));
        };
        let path = self.log_file(id);
        if path.exists() {
            return Ok(LogSource::Local(path));
        }
        let mut peers = Vec::new();
        if let Some(node) = job.assignment.as_ref().map(|a| &a.0.node) {
            peers.extend(node.parse::<libp2p::PeerId>().ok());
        }
        if let Some(master) = self.status_master_id(self.now()) {
            peers.extend(master.parse::<libp2p::PeerId>().ok());
        }
        peers.retain(|p| *p != self.peer_id);
        peers.dedup();
        Ok(LogSource::Remote(peers))
    }

    /// Answer a peer's request for a log chunk (only of a job this node knows).
    pub(super) fn serve_log(&self, id: &str, offset: u64) -> Response {
        if self.state.get(&Key::Job(id.to_string()).encode()).is_none() {
            return Response::Refused(format!("unknown job {id}"));
        }
        match logs::read_chunk(&self.log_file(id), offset, logs::CHUNK_BYTES) {
            Ok((data, size)) => Response::Log { data, size },
            Err(e) => Response::Refused(format!("no log of job {id} here: {e}")),
        }
    }

    /// Keep a chunk of a log copied by the worker.
    pub(super) fn store_log(&self, id: &str, offset: u64, data: &[u8]) -> Response {
        if self.state.get(&Key::Job(id.to_string()).encode()).is_none() {
            return Response::Refused(format!("unknown job {id}"));
        }
        match logs::write_chunk(&self.log_file(id), offset, data) {
            Ok(()) => Response::Ack,
            Err(e) => Response::Refused(e.to_string()),
        }
    }

    /// Copy a finished job's log to the master, so it survives the loss of this node.
    pub(super) fn copy_log_to_master(&self, id: &str) {
        let Some(master) = self.status_master_id(self.now()) else {
            return;
        };
        let Ok(peer) = master.parse::<libp2p::PeerId>() else {
            return;
        };
        if peer == self.peer_id {
            return;
        }
        let (client, path, id) = (self.client.clone(), self.log_file(id), id.to_string());
        tokio::spawn(async move {
            let mut offset = 0;
            while offset < logs::MAX_LOG_BYTES {
                let Ok((data, _)) = logs::read_chunk(&path, offset, logs::CHUNK_BYTES) else {
                    return;
                };
                if data.is_empty() && offset > 0 {
                    return;
                }
                let len = data.len() as u64;
                let request = Request::StoreLog {
                    job: id.clone(),
                    offset,
                    data,
                };
                match client.request(peer, request).await {
                    Ok(Ok(Response::Ack)) if len > 0 => offset += len,
                    Ok(Ok(Response::Ack)) => return,
                    other => {
                        tracing::debug!("copying the log of {id} to the master stopped: {other:?}");
                        return;
                    }
                }
            }
        });
    }
}
