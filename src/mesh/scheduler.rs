//! The scheduler, run by the master: queued jobs in submission order go to nodes chosen by
//! [`crate::proto::schedule::choose`]; the assignment carries the lease epoch and goes to the
//! worker by request-response; a refusal or failure puts the job back in the queue for another
//! node; jobs on a node that went offline are marked `lost` and re-queued once.

use std::collections::HashMap;

use libp2p::PeerId;

use super::{Mesh, Purpose};
use crate::proto::crdt::{MaxReg, NodeId};
use crate::proto::jobs::{Assignment, JobRecord, JobStatus, Progress};
use crate::proto::records::{Key, Record};
use crate::proto::schedule::{choose, Decision, NodeLoad};
use crate::wire::{Request, Response};

/// How often the master looks at the queue without being woken (for waits that end by time:
/// a node coming back, a refusal backoff running out).
pub const SCHEDULE_EVERY_MS: u64 = 250;
/// How long a node that refused a job is skipped for it.
const REFUSAL_BACKOFF_MS: u64 = 10_000;

/// The master's scheduling bookkeeping (in memory: a new master starts afresh).
#[derive(Debug, Default)]
pub struct SchedulerState {
    /// Sequence number of the last assignment made in the current epoch.
    seq: u64,
    /// Epoch `seq` belongs to.
    epoch: u64,
    /// Per job: nodes that refused it, until when.
    refusals: HashMap<String, Vec<(NodeId, u64)>>,
    /// Something changed that may let a queued job run: schedule after the current input.
    woken: bool,
}

impl SchedulerState {
    /// Ask for a scheduling round as soon as the current input is handled.
    pub fn wake(&mut self) {
        self.woken = true;
    }
}

fn is_active(status: JobStatus) -> bool {
    matches!(
        status,
        JobStatus::Assigned | JobStatus::Preparing | JobStatus::Running
    )
}

/// The node running a job's current attempt, if it is active.
fn active_node(job: &JobRecord) -> Option<&NodeId> {
    let progress = &job.progress.0;
    let assignment = &job.assignment.as_ref()?.0;
    (is_active(progress.status) && assignment.attempt == progress.attempt)
        .then_some(&assignment.node)
}

impl Mesh {
    fn next_assignment_key(&mut self) -> (u64, u64) {
        let epoch = self.election.term();
        let s = &mut self.scheduler;
        if s.epoch != epoch {
            s.epoch = epoch;
            s.seq = 0;
        }
        s.seq += 1;
        (epoch, s.seq)
    }

    /// Jobs not finished yet (queued or active): all a scheduling round needs. Finished ones,
    /// with their results, are left uncopied.
    fn open_jobs(&self) -> Vec<JobRecord> {
        self.state
            .with_prefix("job/")
            .filter_map(|(_, r)| match r {
                Record::Job(job) if !job.progress.0.status.is_terminal() => Some((**job).clone()),
                _ => None,
            })
            .collect()
    }

    fn node_loads(&self, jobs: &[JobRecord]) -> Vec<NodeLoad> {
        let mut running: HashMap<&NodeId, u32> = HashMap::new();
        for job in jobs {
            if let Some(node) = active_node(job) {
                *running.entry(node).or_default() += 1;
            }
        }
        self.node_views()
            .into_iter()
            .map(|n| NodeLoad {
                running: running.get(&n.id).copied().unwrap_or(0),
                id: n.id,
                name: n.name,
                tags: n.tags,
                slots: n.slots,
                online: n.online,
                draining: n.draining,
                removed: n.removed,
                agents: n.agents,
                local_repos: n.local_repos,
            })
            .collect()
    }

    fn write_progress(
        &mut self,
        job: &JobRecord,
        progress: Progress,
        assignment: Option<Assignment>,
    ) {
        let record = JobRecord {
            spec: job.spec.clone(),
            assignment: assignment.map(MaxReg).or_else(|| job.assignment.clone()),
            progress: MaxReg(progress),
        };
        let key = Key::Job(job.spec.id.clone()).encode();
        if let Err(e) = self.commit_local(key, Record::Job(Box::new(record))) {
            tracing::error!("scheduler cannot record job {}: {e}", job.spec.id);
        }
    }

    /// Run a scheduling round if one was asked for and this node acts as master.
    pub(super) fn schedule_if_due(&mut self) {
        if !self.scheduler.woken {
            return;
        }
        self.scheduler.woken = false;
        let now = self.now();
        if self.election.is_master(now) {
            self.next_schedule = now + SCHEDULE_EVERY_MS;
            self.schedule(now);
            // Records written by this round wake the scheduler again; nothing is left to do.
            self.scheduler.woken = false;
        }
    }

    /// One scheduling round. Only call while this node acts as master.
    fn schedule(&mut self, now: u64) {
        let mut jobs = self.open_jobs();
        if self.handle_lost_jobs(&jobs, now) {
            jobs = self.open_jobs();
        }
        let mut loads = self.node_loads(&jobs);
        let mut queued: Vec<&JobRecord> = jobs
            .iter()
            .filter(|j| j.progress.0.status == JobStatus::Queued)
            .collect();
        queued.sort_by(|a, b| {
            (a.spec.submitted_at_ms, &a.spec.id).cmp(&(b.spec.submitted_at_ms, &b.spec.id))
        });
        for job in queued {
            let skip: Vec<NodeId> = self
                .scheduler
                .refusals
                .get(&job.spec.id)
                .map(|r| {
                    r.iter()
                        .filter(|(_, until)| *until > now)
                        .map(|(n, _)| n.clone())
                        .collect()
                })
                .unwrap_or_default();
            match choose(&job.spec, &loads, &skip) {
                Decision::Assign(node) => {
                    if let Some(load) = loads.iter_mut().find(|l| l.id == node) {
                        load.running += 1;
                    }
                    self.assign(job, node);
                }
                Decision::Wait(reason) => {
                    if job.progress.0.reason.as_deref() != Some(reason.as_str()) {
                        let progress = Progress {
                            reason: Some(reason),
                            stamp: self.stamp(),
                            ..job.progress.0.clone()
                        };
                        self.write_progress(job, progress, None);
                    }
                }
            }
        }
        self.scheduler
            .refusals
            .retain(|_, r| r.iter().any(|(_, until)| *until > now));
    }

    fn assign(&mut self, job: &JobRecord, node: NodeId) {
        let (epoch, seq) = self.next_assignment_key();
        let attempt = job.progress.0.attempt;
        let assignment = Assignment {
            epoch,
            seq,
            attempt,
            node: node.clone(),
        };
        let progress = Progress {
            attempt,
            assignment: (epoch, seq),
            status: JobStatus::Assigned,
            reason: None,
            result: None,
            stamp: self.stamp(),
        };
        self.write_progress(job, progress, Some(assignment));
        let Some(Record::Job(record)) = self
            .state
            .get(&Key::Job(job.spec.id.clone()).encode())
            .cloned()
        else {
            return;
        };
        tracing::info!(job = %job.spec.id, %node, epoch, seq, "assigning");
        let purpose = Purpose::Assign {
            job: job.spec.id.clone(),
            key: (epoch, seq),
        };
        if node == self.id {
            let from = self.id.clone();
            let response = self.accept_assignment(&record, &from);
            self.on_assign_answer(self.peer_id, purpose, Ok(response));
        } else {
            match node.parse::<PeerId>() {
                Ok(peer) => self.send(peer, Request::Assign(record), purpose),
                Err(_) => self.on_assign_answer(self.peer_id, purpose, Err("bad node id".into())),
            }
        }
    }

    /// The worker's (or the network's) answer to an assignment.
    pub(super) fn on_assign_answer(
        &mut self,
        peer: PeerId,
        purpose: Purpose,
        result: Result<Response, String>,
    ) {
        let Purpose::Assign { job: id, key } = purpose else {
            return;
        };
        let refusal = match result {
            Ok(Response::Ack) => return,
            Ok(Response::Refused(why)) => why,
            Ok(other) => format!("unexpected answer {other:?}"),
            Err(e) => format!("unreachable ({e})"),
        };
        let Some(Record::Job(job)) = self.state.get(&Key::Job(id.clone()).encode()).cloned() else {
            return;
        };
        let current = &job.progress.0;
        if current.assignment != key || current.status != JobStatus::Assigned {
            return; // the job moved on meanwhile
        }
        let node = job
            .assignment
            .as_ref()
            .map(|a| a.0.node.clone())
            .unwrap_or_default();
        let name = self.node_name(&node).unwrap_or_else(|| peer.to_string());
        tracing::info!(job = %id, node = %name, "assignment refused: {refusal}");
        let until = self.now() + REFUSAL_BACKOFF_MS;
        self.scheduler
            .refusals
            .entry(id)
            .or_default()
            .push((node, until));
        if !self.election.is_master(self.now()) {
            return;
        }
        let progress = Progress {
            attempt: current.attempt,
            assignment: self.next_assignment_key(),
            status: JobStatus::Queued,
            reason: Some(format!("node {name} refused the job: {refusal}")),
            result: None,
            stamp: self.stamp(),
        };
        self.write_progress(&job, progress, None);
    }

    /// Mark jobs whose node went offline as lost, and re-queue them. Returns whether any was.
    fn handle_lost_jobs(&mut self, jobs: &[JobRecord], now: u64) -> bool {
        let mut changed = false;
        for job in jobs {
            let Some(node) = active_node(job).cloned() else {
                continue;
            };
            if node == self.id || self.liveness.is_online(&node, now) {
                continue;
            }
            let name = self.node_name(&node).unwrap_or_else(|| node.clone());
            let current = job.progress.0.clone();
            let lost = Progress {
                status: JobStatus::Lost,
                reason: Some(format!("node {name} went offline")),
                stamp: self.stamp(),
                ..current.clone()
            };
            tracing::info!(job = %job.spec.id, node = %name, "job lost");
            changed = true;
            self.write_progress(job, lost, None);
            if current.attempt <= self.config.lost_requeues {
                let again = Progress {
                    attempt: current.attempt + 1,
                    assignment: (0, 0),
                    status: JobStatus::Queued,
                    reason: Some(format!("re-queued after node {name} went offline")),
                    result: None,
                    stamp: self.stamp(),
                };
                self.write_progress(job, again, None);
            }
        }
        changed
    }

    /// A worker's checks on an assignment: it comes from the master of the current term as
    /// this node's election knows it (the fence: the term is persisted and only grows), it is
    /// for this node, and a slot is free.
    pub(super) fn accept_assignment(&mut self, record: &JobRecord, from: &NodeId) -> Response {
        let Some(assignment) = record.assignment.as_ref().map(|a| a.0.clone()) else {
            return Response::Refused("the assignment is missing".into());
        };
        if assignment.node != self.id {
            return Response::Refused("the job is assigned to another node".into());
        }
        let term = self.election.term();
        if assignment.epoch != term {
            return Response::Refused(format!(
                "epoch {} is not the current term {term} of this node's election",
                assignment.epoch
            ));
        }
        if self.election.leader() != Some(from) {
            return Response::Refused(format!(
                "{from} is not the master of term {term} as this node knows it"
            ));
        }
        let key = Key::Job(record.spec.id.clone()).encode();
        self.apply_remote(vec![(key.clone(), Record::Job(Box::new(record.clone())))]);
        let slots = self
            .node_views()
            .into_iter()
            .find(|n| n.id == self.id)
            .map_or(self.config.slots, |n| n.slots);
        let running = self
            .state
            .with_prefix("job/")
            .filter(|(_, r)| {
                matches!(r, Record::Job(j)
                    if j.spec.id != record.spec.id && active_node(j) == Some(&self.id))
            })
            .count() as u32;
        if running >= slots {
            return Response::Refused(format!("all {slots} slots are busy"));
        }
        if let Err(why) = self.config.runner.check(&record.spec.agent) {
            return Response::Refused(why);
        }
        let current = self.state.get(&key).cloned();
        if let Some(Record::Job(job)) = current {
            self.start_run(&job);
        }
        Response::Ack
    }
}
