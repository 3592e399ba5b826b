//! Jobs running on this node: judge an incoming assignment against the merged record
//! ([`worker::judge`]), start it once per (attempt, assignment), record its status changes and
//! attempt history, and stop it when its attempt ended elsewhere, was cancelled, or a newer
//! assignment replaced it ([`worker::must_stop`]). A new assignment of a job whose older run
//! is still stopping starts when that run has ended.

use super::{unix_ms, Input, Mesh};
use crate::metrics::Metrics;
use crate::proto::crdt::Crdt;
use crate::proto::dispatch::worker::{self, Fence, RunKey, Verdict};
use crate::proto::jobs::{JobRecord, JobStatus, Progress};
use crate::proto::lookup::RecordLookup;
use crate::proto::records::{Key, Record};
use crate::runner::{self, logs, JobUpdate, RunHandle};
use crate::wire::{Request, Response};

/// Most refused assignments remembered (oldest forgotten first).
const MAX_REFUSED_REMEMBERED: usize = 10_000;

/// A run of a job on this node.
pub struct Run {
    /// The assignment the run reports under (newer than `started` after an adoption).
    key: RunKey,
    /// The assignment the run was started for (the key of the runner's updates).
    started: RunKey,
    /// The last status it reported.
    status: JobStatus,
    handle: RunHandle,
    stopping: bool,
    /// A newer assignment of the job, to start once this run has ended.
    next: Option<Box<JobRecord>>,
}

impl Mesh {
    /// A worker's checks on an assignment (see [`worker::judge`]): this node's election fences
    /// it (current term, from that term's leader), it must be the current assignment of the
    /// merged record, and a slot and the agent must be free here. Starting is idempotent.
    pub(super) fn accept_assignment(&mut self, record: &JobRecord, from: &String) -> Response {
        let Some(incoming) = record.assignment.as_ref().map(|a| a.0.clone()) else {
            return Response::Refused("the assignment is missing".into());
        };
        let id = record.spec.id.clone();
        let key = Key::Job(id.clone()).encode();
        if incoming.node != self.id {
            return Response::Refused("the job is assigned to another node".into());
        }
        // Judge the merge before applying it: applying first would stop a run that the
        // assignment only moves to a newer key.
        let mut merged = match self.replica.state().get(&key) {
            Some(Record::Job(job)) => (**job).clone(),
            _ => record.clone(),
        };
        merged.merge(record);
        let running = self.runs.get(&id).map(|r| r.key);
        let pending = self
            .runs
            .get(&id)
            .and_then(|r| r.next.as_ref())
            .and_then(|n| n.assignment.as_ref())
            .map(|a| RunKey::of(&a.0));
        let verdict = if pending == Some(RunKey::of(&incoming)) {
            Verdict::AlreadyRunning
        } else {
            let refused = self.refused_assignments.get(&id).copied();
            let fence = Fence {
                me: &self.id,
                term: self.election.term(),
                leader: self.election.leader(),
                from,
            };
            worker::judge(&merged, &incoming, running, refused, fence)
        };
        let verdict = match verdict {
            Verdict::Start => match self.free_slot_for(&merged) {
                Ok(()) => Verdict::Start,
                Err(why) => Verdict::Refuse(why),
            },
            other => other,
        };
        // A run already being stopped cannot be adopted: the new key starts after it.
        let verdict = match verdict {
            Verdict::Adopt if self.runs.get(&id).is_some_and(|r| r.stopping) => Verdict::Start,
            other => other,
        };
        if let Verdict::Adopt = verdict {
            if let Some(run) = self.runs.get_mut(&id) {
                tracing::info!(job = %id, key = ?incoming.key(), "the run continues under a newer assignment");
                run.key = RunKey::of(&incoming);
            }
        }
        if !matches!(verdict, Verdict::Refuse(_)) {
            self.apply_remote(vec![(key.clone(), Record::Job(Box::new(record.clone())))]);
        }
        let current = match self.replica.state().get(&key) {
            Some(Record::Job(job)) => Some((**job).clone()),
            _ => None,
        };
        let holds = current
            .as_ref()
            .is_some_and(|j| j.assignment.as_ref().map(|a| &a.0) == Some(&incoming));
        match verdict {
            Verdict::AlreadyRunning | Verdict::AlreadyEnded => Response::Ack,
            Verdict::Adopt => {
                if let (Some(job), Some(run)) = (current, self.runs.get(&id)) {
                    let update = JobUpdate {
                        id: id.clone(),
                        attempt: run.key.attempt,
                        assignment: run.key.assignment,
                        status: run.status,
                        reason: None,
                        result: None,
                    };
                    self.record_update(&job, update);
                }
                Response::Ack
            }
            Verdict::Start if holds => {
                if let Some(job) = current {
                    self.start_run(Box::new(job));
                }
                Response::Ack
            }
            Verdict::Start => {
                self.remember_refusal(&id, incoming.key());
                Response::Refused("the job record was refused".into())
            }
            Verdict::Refuse(why) => {
                // Only the current master's assignments are remembered: a forged one must not
                // make this node refuse the real one.
                let fenced =
                    incoming.epoch == self.election.term() && self.election.leader() == Some(from);
                if fenced {
                    self.remember_refusal(&id, incoming.key());
                }
                Response::Refused(why)
            }
        }
    }

    fn free_slot_for(&self, job: &JobRecord) -> Result<(), String> {
        let slots = super::read::nodes::node_by_id(&self.view(), &self.id)
            .map_or(self.config.slots, |n| n.slots);
        let busy = self.runs.keys().filter(|id| **id != job.spec.id).count() as u32;
        if busy >= slots {
            return Err(format!("all {slots} slots are busy"));
        }
        self.config.runner.check(&job.spec.agent)
    }

    fn remember_refusal(&mut self, id: &str, key: (u64, u64)) {
        if self.refused_assignments.len() >= MAX_REFUSED_REMEMBERED
            && !self.refused_assignments.contains_key(id)
        {
            // Job ids are ULIDs: the smallest is the oldest job.
            if let Some(oldest) = self.refused_assignments.keys().next().cloned() {
                self.refused_assignments.remove(&oldest);
            }
        }
        let entry = self.refused_assignments.entry(id.to_string()).or_default();
        *entry = (*entry).max(key);
    }

    /// Start running the current assignment of `record` (after an older run of the job, if
    /// one is still stopping).
    pub(super) fn start_run(&mut self, record: Box<JobRecord>) {
        let Some(assignment) = record.assignment.as_ref().map(|a| a.0.clone()) else {
            return;
        };
        let id = record.spec.id.clone();
        let key = RunKey::of(&assignment);
        if let Some(run) = self.runs.get_mut(&id) {
            if run.key != key {
                run.next = Some(record);
                if !run.stopping {
                    run.stopping = true;
                    run.handle.cancel();
                }
            }
            return;
        }
        let inputs = self.inputs_tx.clone();
        let handle = runner::start(
            record.spec.clone(),
            key.attempt,
            key.assignment,
            self.config.runner.clone(),
            move |update| {
                let _ = inputs.send(Input::JobUpdate(update));
            },
        );
        tracing::info!(job = %id, attempt = key.attempt, "running");
        self.runs.insert(
            id,
            Run {
                key,
                started: key,
                status: JobStatus::Assigned,
                handle,
                stopping: false,
                next: None,
            },
        );
    }

    /// Record a status change reported by a run (unless the run was replaced: its report
    /// must not override the current assignment).
    pub(super) fn on_job_update(&mut self, mut update: JobUpdate) {
        let started = RunKey {
            attempt: update.attempt,
            assignment: update.assignment,
        };
        let finished = update.status.is_terminal();
        let run = self
            .runs
            .get_mut(&update.id)
            .filter(|r| r.started == started);
        let ours = run.is_some();
        let mut key = started;
        if let Some(run) = run {
            run.status = update.status;
            key = run.key;
            update.assignment = run.key.assignment;
        }
        let next = if finished && ours {
            self.runs.remove(&update.id).and_then(|r| r.next)
        } else {
            None
        };
        let record_key = Key::Job(update.id.clone()).encode();
        if let Some(Record::Job(job)) = self.replica.state().get(&record_key).cloned() {
            if ours && worker::must_stop(&job, key, &self.id).is_none() {
                self.record_update(&job, update.clone());
            }
        }
        if finished {
            if ours {
                self.copy_log_to_master(&update.id);
                self.forget_run_files(&update.id);
            }
            if let Some(next) = next {
                self.start_pending(next);
            }
        }
    }

    fn record_update(&mut self, job: &JobRecord, update: JobUpdate) {
        let mut record = job.clone();
        record.progress.0 = Progress {
            attempt: update.attempt,
            assignment: update.assignment,
            status: update.status,
            reason: update.reason.clone(),
            result: update.result,
            stamp: self.stamp(),
        };
        let (me, wall) = (self.id.clone(), unix_ms());
        if update.status == JobStatus::Preparing {
            let stamp = self.stamp();
            record.attempts.started(update.attempt, &me, wall, stamp);
        } else if update.status.is_terminal() {
            let stamp = self.stamp();
            record.attempts.ended(
                update.attempt,
                Some(&me),
                update.status,
                update.reason,
                wall,
                stamp,
            );
        }
        let key = Key::Job(update.id.clone()).encode();
        if let Err(e) = self.commit_local(key, Record::Job(Box::new(record))) {
            tracing::error!("cannot record the status of job {}: {e}", update.id);
        }
    }

    /// Start an assignment that waited for an older run of its job, if it is still current.
    fn start_pending(&mut self, next: Box<JobRecord>) {
        let key = Key::Job(next.spec.id.clone()).encode();
        let Some(Record::Job(current)) = self.replica.state().get(&key).cloned() else {
            return;
        };
        let Some(assignment) = next.assignment.as_ref().map(|a| &a.0) else {
            return;
        };
        let still_current = current.assignment.as_ref().map(|a| &a.0) == Some(assignment)
            && current.progress.0.status == JobStatus::Assigned
            && worker::must_stop(&current, RunKey::of(assignment), &self.id).is_none();
        if still_current {
            self.start_run(current);
        }
    }

    /// Stop our run of `job` if its attempt ended elsewhere, was cancelled, or moved on.
    pub(super) fn check_run(&mut self, job: &JobRecord) {
        let Some(run) = self.runs.get_mut(&job.spec.id) else {
            return;
        };
        if let Some(next) = &run.next {
            let stale = next
                .assignment
                .as_ref()
                .is_none_or(|a| worker::must_stop(job, RunKey::of(&a.0), &self.id).is_some());
            if stale {
                run.next = None;
            }
        }
        if run.stopping {
            return;
        }
        if let Some(why) = worker::must_stop(job, run.key, &self.id) {
            tracing::info!(job = %job.spec.id, "stopping the run: {why}");
            run.stopping = true;
            run.handle.cancel();
        }
    }

    /// Forget the files a finished run left for recovery after a crash.
    fn forget_run_files(&self, id: &str) {
        let (config, id) = (self.config.runner.clone(), id.to_string());
        tokio::task::spawn_blocking(move || runner::forget_run(&config, &id));
    }

    /// At start: jobs this node was given or ran before it restarted have no run any more
    /// (agents die with the node). Each takes the outcome of an agent that had finished, or
    /// becomes `lost`, "node restarted".
    pub(super) fn reconcile_at_start(&mut self, recovered: Vec<runner::Recovered>) {
        let mine: Vec<JobRecord> = self
            .replica
            .all_jobs()
            .filter(|job| {
                crate::proto::dispatch::active_assignment(job).is_some_and(|a| a.node == self.id)
            })
            .cloned()
            .collect();
        for job in mine {
            // One run per job at a time; its key may be older than the record's when a new
            // master moved the attempt to a key of its term.
            let found = recovered
                .iter()
                .find(|r| r.id == job.spec.id && r.attempt == job.progress.0.attempt);
            let record = match found.and_then(|r| r.outcome.clone()) {
                Some((status, reason, result)) => {
                    tracing::info!(job = %job.spec.id, ?status, "recovered the result of a run that ended before the restart");
                    let update = JobUpdate {
                        id: job.spec.id.clone(),
                        attempt: job.progress.0.attempt,
                        assignment: job.progress.0.assignment,
                        status,
                        reason,
                        result: Some(result),
                    };
                    self.record_update(&job, update);
                    continue;
                }
                None => {
                    let (me, wall) = (self.id.clone(), unix_ms());
                    let mut stamp = || self.stamp();
                    worker::lost_at_restart(&job, &me, wall, &mut stamp)
                }
            };
            if let Some(record) = record {
                tracing::info!(job = %job.spec.id, "lost: this node restarted");
                let key = Key::Job(job.spec.id.clone()).encode();
                if let Err(e) = self.commit_local(key, Record::Job(Box::new(record))) {
                    tracing::error!("cannot record job {} as lost: {e}", job.spec.id);
                }
            }
        }
        for run in &recovered {
            self.forget_run_files(&run.id);
        }
    }
}

impl Mesh {
    fn log_file(&self, id: &str) -> std::path::PathBuf {
        logs::log_path(&self.config.runner.log_dir, id)
    }

    /// A peer's log request (read a chunk, or keep a chunk the worker copies), checked
    /// here and answered by the returned work, which does the file I/O on a blocking task.
    /// Only logs of jobs this node knows are read or written.
    pub(super) fn log_request(
        &mut self,
        peer: libp2p::PeerId,
        request: Request,
        now: u64,
    ) -> Box<dyn FnOnce() -> Response + Send> {
        let refuse = |why: String| -> Box<dyn FnOnce() -> Response + Send> {
            Box::new(move || Response::Refused(why))
        };
        if self.admin_flag(&peer.to_string(), |a| &a.removed) {
            return refuse("this node was removed from the mesh".into());
        }
        if let Err(e) = request.check() {
            Metrics::inc(&self.metrics.wire_dropped);
            return refuse(e);
        }
        self.peers.heard(&peer.to_string(), now);
        let known = |id: &str| {
            self.replica
                .state()
                .get(&Key::Job(id.to_string()).encode())
                .is_some()
        };
        match request {
            Request::Log { job, offset } if known(&job) => {
                let path = self.log_file(&job);
                Box::new(
                    move || match logs::read_chunk(&path, offset, logs::CHUNK_BYTES) {
                        Ok((data, size)) => Response::Log { data, size },
                        Err(e) => Response::Refused(format!("no log of job {job} here: {e}")),
                    },
                )
            }
            Request::StoreLog { job, offset, data } if known(&job) => {
                let path = self.log_file(&job);
                Box::new(move || match logs::write_chunk(&path, offset, &data) {
                    Ok(()) => Response::Ack,
                    Err(e) => Response::Refused(e.to_string()),
                })
            }
            Request::Log { job, .. } | Request::StoreLog { job, .. } => {
                refuse(format!("unknown job {job}"))
            }
            _ => refuse("not a log request".into()),
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
                let chunk_path = path.clone();
                let read = tokio::task::spawn_blocking(move || {
                    logs::read_chunk(&chunk_path, offset, logs::CHUNK_BYTES)
                })
                .await;
                let Ok(Ok((data, _))) = read else {
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
