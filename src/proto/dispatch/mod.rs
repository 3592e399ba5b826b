//! Scheduling as a pure state machine, shared by the runtime and the simulation: which queued
//! job goes where, how an assignment reaches its worker, and what happens to jobs whose node
//! went away.
//!
//! A new master first reads from a quorum of voters the assignments they accepted in earlier
//! terms, and binds those attempts to their nodes ([`commit`]). Then an assignment travels in
//! two steps: the master asks every voter to accept it; only when a quorum did is it written
//! into the replicated record and delivered to the worker, which judges it against its own
//! record ([`worker`]). Every step is idempotent and repeated until it gets a definite answer:
//!
//! * a voter's conflict (its replica shows the attempt ended) ends the try, and the master
//!   merges the voter's record;
//! * a worker's definite refusal re-queues the same attempt under a newer key (the worker will
//!   never run the refused one);
//! * an unclear answer (a timeout, a closed connection) is followed by the same assignment
//!   again, never by a re-queue, since the worker may run it;
//! * an acknowledged assignment not `preparing` within [`ACK_DEADLINE_MS`] is delivered again,
//!   which re-checks it with the worker;
//! * a job whose worker is offline, or restarted since it reported the attempt, is `lost`, and
//!   re-queued as a new attempt while attempts remain.
//!
//! The dispatcher keeps only in-memory bookkeeping: a new master rebuilds it from the records.

pub mod commit;
#[cfg(test)]
mod tests;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::crdt::{MaxReg, NodeId, Stamp};
use super::jobs::{Assignment, JobRecord, JobStatus, Progress};
use super::schedule::{choose, Decision, NodeLoad};
use commit::Accepted;

/// An acknowledged assignment not `preparing` within this is checked with its worker again.
pub const ACK_DEADLINE_MS: u64 = 5_000;
/// An assignment without an answer is sent again after this.
pub const RESEND_EVERY_MS: u64 = 1_000;
/// How long a node that refused a job is skipped for it.
pub const REFUSAL_BACKOFF_MS: u64 = 10_000;

/// What the dispatcher asks the runtime to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Merge this record locally, persist and replicate it.
    Write(Box<JobRecord>),
    /// Ask every voter (this node included) for the assignments it accepted
    /// ([`Dispatcher::on_read_answer`]).
    Read,
    /// Ask every voter (this node included) to accept the record's assignment (the record is
    /// the job with its new assignment, `assigned`).
    Commit(Box<JobRecord>),
    /// Give the committed assignment to its worker.
    Deliver(Box<JobRecord>),
}

/// A voter's answer to [`Step::Commit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitAnswer {
    /// Accepted and persisted.
    Accepted,
    /// The voter knows a newer state: its record.
    Conflict(Box<JobRecord>),
    /// No answer, or a refusal that may pass later (say, the voter is behind in terms).
    Unclear(String),
}

/// A worker's answer to [`Step::Deliver`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliverAnswer {
    /// It runs (or ran) the assignment.
    Ack,
    /// It will never run it.
    Refused(String),
    /// No answer: it may or may not have it.
    Unclear(String),
}

/// The facts a scheduling round works from.
pub struct World<'a> {
    /// This node's monotonic clock (ms).
    pub now: u64,
    /// This node's wall clock (Unix ms), for attempt times.
    pub wall_ms: u64,
    /// This node.
    pub me: &'a NodeId,
    /// The current term (assignment epoch).
    pub term: u64,
    /// Every member, with `running` left at 0 (the round counts).
    pub nodes: &'a [NodeLoad],
    /// When each member's process started (Unix ms), as its node record says.
    pub started_at_ms: &'a BTreeMap<NodeId, u64>,
    /// How many times a lost job is queued again.
    pub lost_requeues: u32,
    /// Stamps for the records the round writes.
    pub stamp: &'a mut dyn FnMut() -> Stamp,
}

impl World<'_> {
    fn name(&self, id: &NodeId) -> String {
        self.nodes
            .iter()
            .find(|n| &n.id == id)
            .map_or_else(|| id.clone(), |n| n.name.clone())
    }

    fn online(&self, id: &NodeId) -> bool {
        id == self.me || self.nodes.iter().any(|n| &n.id == id && n.online)
    }
}

/// An assignment on its way to the worker.
#[derive(Clone, Debug)]
struct Delivery {
    record: Box<JobRecord>,
    key: (u64, u64),
    accepted: BTreeSet<NodeId>,
    committed: bool,
    last_try: u64,
    acked_at: Option<u64>,
}

/// The read of accepted assignments a master makes once per term.
#[derive(Debug, Default)]
struct Read {
    term: u64,
    replied: BTreeSet<NodeId>,
    reported: Accepted,
    done: bool,
    last_ask: u64,
}

/// The master's scheduling state.
#[derive(Debug, Default)]
pub struct Dispatcher {
    epoch: u64,
    seq: u64,
    refusals: HashMap<String, Vec<(NodeId, u64)>>,
    deliveries: BTreeMap<String, Delivery>,
    read: Read,
}

/// Whether a job still needs the scheduler: not finished, or lost with attempts left (and
/// not yet past the history horizon: a compacted job is final).
pub fn is_open(job: &JobRecord, lost_requeues: u32) -> bool {
    let progress = &job.progress.0;
    !progress.status.is_terminal()
        || (progress.status == JobStatus::Lost
            && progress.attempt <= lost_requeues
            && !job.compacted)
}

fn is_active(status: JobStatus) -> bool {
    matches!(
        status,
        JobStatus::Assigned | JobStatus::Preparing | JobStatus::Running
    )
}

/// The current attempt's assignment, when the job is active under it.
pub fn active_assignment(job: &JobRecord) -> Option<&Assignment> {
    let progress = &job.progress.0;
    let assignment = &job.assignment.as_ref()?.0;
    (is_active(progress.status)
        && assignment.attempt == progress.attempt
        && assignment.key() == progress.assignment)
        .then_some(assignment)
}

impl Dispatcher {
    /// Forget the bookkeeping of a previous term (a new master starts afresh).
    fn next_key(&mut self, term: u64) -> (u64, u64) {
        if self.epoch != term {
            self.epoch = term;
            self.seq = 0;
        }
        self.seq += 1;
        (term, self.seq)
    }

    /// One scheduling round over the open jobs (see [`is_open`]).
    pub fn round(&mut self, jobs: &[JobRecord], world: &mut World<'_>) -> Vec<Step> {
        let now = world.now;
        if self.read.term != world.term {
            self.deliveries.clear();
            self.read = Read {
                term: world.term,
                last_ask: now,
                ..Read::default()
            };
            return vec![Step::Read];
        }
        if !self.read.done {
            if now >= self.read.last_ask + RESEND_EVERY_MS {
                self.read.last_ask = now;
                return vec![Step::Read];
            }
            return Vec::new();
        }
        let mut steps = Vec::new();
        let mut loads: Vec<NodeLoad> = world.nodes.to_vec();
        let mut queued: Vec<&JobRecord> = Vec::new();
        let open: BTreeSet<&str> = jobs.iter().map(|j| j.spec.id.as_str()).collect();
        self.deliveries.retain(|id, _| open.contains(id.as_str()));
        for job in jobs {
            let progress = &job.progress.0;
            if progress.status == JobStatus::Lost {
                if is_open(job, world.lost_requeues) {
                    let why = progress
                        .reason
                        .clone()
                        .unwrap_or_else(|| "it was lost".into());
                    steps.push(requeue(job, &why, world));
                }
                continue;
            }
            if progress.status == JobStatus::Queued {
                queued.push(job);
                continue;
            }
            let Some(assignment) = active_assignment(job) else {
                continue;
            };
            let node = assignment.node.clone();
            if !world.online(&node) {
                let why = format!("node {} went offline", world.name(&node));
                steps.push(lose(job, &why, world));
                continue;
            }
            let restarted = world.started_at_ms.get(&node).is_some_and(|&started| {
                progress.stamp.by == node && progress.stamp.at.wall_ms < started
            });
            if restarted && node != *world.me {
                let why = format!("node {} restarted", world.name(&node));
                steps.push(lose(job, &why, world));
                continue;
            }
            if let Some(load) = loads.iter_mut().find(|l| l.id == node) {
                load.running += 1;
            }
            if progress.status == JobStatus::Assigned {
                if assignment.epoch < world.term {
                    // Committed by an earlier master: the attempt stays on its node, under a
                    // key of this term (a worker running it keeps its run).
                    match self.deliveries.get_mut(&job.spec.id) {
                        None => steps.push(self.assign(job, node, world)),
                        Some(d) if !d.committed && now >= d.last_try + RESEND_EVERY_MS => {
                            d.last_try = now;
                            steps.push(Step::Commit(d.record.clone()));
                        }
                        Some(_) => {}
                    }
                } else {
                    steps.extend(self.drive(job, assignment, now));
                }
            }
        }
        queued.sort_by(|a, b| {
            (a.spec.submitted_at_ms, &a.spec.id).cmp(&(b.spec.submitted_at_ms, &b.spec.id))
        });
        for job in queued {
            if let Some(d) = self.deliveries.get(&job.spec.id) {
                // Committing right now: wait for the voters (or retry the commit).
                if !d.committed && now < d.last_try + RESEND_EVERY_MS {
                    continue;
                }
            }
            let skip: Vec<NodeId> = self
                .refusals
                .get(&job.spec.id)
                .map(|r| {
                    r.iter()
                        .filter(|(_, until)| *until > now)
                        .map(|(n, _)| n.clone())
                        .collect()
                })
                .unwrap_or_default();
            if let Some(node) = commit::bind(&self.read.reported, job).cloned() {
                // An earlier term may have given this attempt to `node`: only it may run it.
                if world.online(&node) {
                    steps.push(self.assign(job, node, world));
                } else {
                    let why = format!("node {} went offline", world.name(&node));
                    steps.push(lose(job, &why, world));
                }
                continue;
            }
            match choose(&job.spec, &loads, &skip) {
                Decision::Assign(node) => {
                    if let Some(load) = loads.iter_mut().find(|l| l.id == node) {
                        load.running += 1;
                    }
                    steps.push(self.assign(job, node, world));
                }
                Decision::Wait(reason) => {
                    if job.progress.0.reason.as_deref() != Some(reason.as_str()) {
                        let progress = Progress {
                            reason: Some(reason),
                            stamp: (world.stamp)(),
                            ..job.progress.0.clone()
                        };
                        steps.push(Step::Write(Box::new(with_progress(job, progress))));
                    }
                }
            }
        }
        self.refusals
            .retain(|_, r| r.iter().any(|(_, until)| *until > now));
        steps
    }

    /// Propose a new assignment of `job` to `node`.
    fn assign(&mut self, job: &JobRecord, node: NodeId, world: &mut World<'_>) -> Step {
        let key = self.next_key(world.term);
        let attempt = job.progress.0.attempt;
        let assignment = Assignment {
            epoch: key.0,
            seq: key.1,
            attempt,
            node,
        };
        let progress = Progress {
            attempt,
            assignment: key,
            status: JobStatus::Assigned,
            reason: None,
            result: None,
            stamp: (world.stamp)(),
        };
        let record = Box::new(JobRecord {
            compacted: false,
            assignment: Some(MaxReg(assignment)),
            ..with_progress(job, progress)
        });
        self.deliveries.insert(
            job.spec.id.clone(),
            Delivery {
                record: record.clone(),
                key,
                accepted: BTreeSet::new(),
                committed: false,
                last_try: world.now,
                acked_at: None,
            },
        );
        Step::Commit(record)
    }

    /// The next step for an `assigned` job, if one is due.
    fn drive(&mut self, job: &JobRecord, assignment: &Assignment, now: u64) -> Option<Step> {
        let key = assignment.key();
        let fresh = || Delivery {
            record: Box::new(job.clone()),
            key,
            accepted: BTreeSet::new(),
            committed: true,
            last_try: 0,
            acked_at: None,
        };
        let d = self
            .deliveries
            .entry(job.spec.id.clone())
            .or_insert_with(fresh);
        if d.key != key {
            *d = fresh();
        }
        if !d.committed {
            // In the replica, so a quorum accepted it (this master restarted its bookkeeping).
            d.committed = true;
            d.last_try = 0;
        }
        let due = match d.acked_at {
            Some(acked) => now >= acked + ACK_DEADLINE_MS,
            None => now >= d.last_try + RESEND_EVERY_MS,
        };
        if due {
            d.last_try = now;
            d.acked_at = None;
            return Some(Step::Deliver(d.record.clone()));
        }
        None
    }

    /// A voter answered a commit of `key` for job `id`. `quorum` tells whether a set of
    /// voters is a quorum of the current configuration.
    pub fn on_commit_answer(
        &mut self,
        id: &str,
        key: (u64, u64),
        voter: &NodeId,
        answer: CommitAnswer,
        now: u64,
        quorum: &dyn Fn(&BTreeSet<NodeId>) -> bool,
    ) -> Vec<Step> {
        let Some(d) = self.deliveries.get_mut(id).filter(|d| d.key == key) else {
            return match answer {
                CommitAnswer::Conflict(record) => vec![Step::Write(record)],
                _ => Vec::new(),
            };
        };
        match answer {
            CommitAnswer::Accepted => {
                d.accepted.insert(voter.clone());
                if !d.committed && quorum(&d.accepted) {
                    d.committed = true;
                    d.last_try = now;
                    return vec![
                        Step::Write(d.record.clone()),
                        Step::Deliver(d.record.clone()),
                    ];
                }
                Vec::new()
            }
            CommitAnswer::Conflict(record) => {
                self.deliveries.remove(id);
                vec![Step::Write(record)]
            }
            CommitAnswer::Unclear(_) => Vec::new(),
        }
    }

    /// A voter answered the read of this term: the assignments it accepted.
    pub fn on_read_answer(
        &mut self,
        term: u64,
        voter: &NodeId,
        entries: Vec<(String, Assignment)>,
        quorum: &dyn Fn(&BTreeSet<NodeId>) -> bool,
    ) {
        if term != self.read.term || self.read.done {
            return;
        }
        for (job, assignment) in entries {
            commit::remember(&mut self.read.reported, &job, &assignment);
        }
        self.read.replied.insert(voter.clone());
        self.read.done = quorum(&self.read.replied);
    }

    /// Whether this term's read is complete (the master schedules only then).
    pub fn ready(&self, term: u64) -> bool {
        self.read.term == term && self.read.done
    }

    /// The worker answered a delivery of `key` for `job` (this node's current record).
    pub fn on_deliver_answer(
        &mut self,
        job: &JobRecord,
        key: (u64, u64),
        answer: DeliverAnswer,
        world: &mut World<'_>,
    ) -> Vec<Step> {
        let id = &job.spec.id;
        let Some(d) = self.deliveries.get_mut(id).filter(|d| d.key == key) else {
            return Vec::new();
        };
        let why = match answer {
            DeliverAnswer::Ack => {
                d.acked_at = Some(world.now);
                return Vec::new();
            }
            DeliverAnswer::Unclear(_) => {
                d.last_try = world.now;
                return Vec::new();
            }
            DeliverAnswer::Refused(why) => why,
        };
        let node = d
            .record
            .assignment
            .as_ref()
            .map(|a| a.0.node.clone())
            .unwrap_or_default();
        self.deliveries.remove(id);
        self.refusals
            .entry(id.clone())
            .or_default()
            .push((node.clone(), world.now + REFUSAL_BACKOFF_MS));
        let current = &job.progress.0;
        if current.assignment != key || current.status != JobStatus::Assigned {
            return Vec::new(); // the job moved on meanwhile
        }
        let progress = Progress {
            attempt: current.attempt,
            assignment: self.next_key(world.term),
            status: JobStatus::Queued,
            reason: Some(format!("node {} refused the job: {why}", world.name(&node))),
            result: None,
            stamp: (world.stamp)(),
        };
        vec![Step::Write(Box::new(with_progress(job, progress)))]
    }
}

/// `job` with `progress`.
fn with_progress(job: &JobRecord, progress: Progress) -> JobRecord {
    JobRecord {
        compacted: job.compacted,
        spec: job.spec.clone(),
        assignment: job.assignment.clone(),
        progress: MaxReg(progress),
        attempts: job.attempts.clone(),
        extra: job.extra.clone(),
    }
}

/// The job's current attempt ends as `lost` (and is queued again while attempts remain).
fn lose(job: &JobRecord, why: &str, world: &mut World<'_>) -> Step {
    let progress = &job.progress.0;
    let node = active_assignment(job).map(|a| a.node.clone());
    let mut lost = with_progress(
        job,
        Progress {
            status: JobStatus::Lost,
            reason: Some(why.to_string()),
            result: None,
            stamp: (world.stamp)(),
            ..progress.clone()
        },
    );
    lost.attempts.ended(
        progress.attempt,
        node.as_ref(),
        JobStatus::Lost,
        Some(why.to_string()),
        world.wall_ms,
        (world.stamp)(),
    );
    if progress.attempt <= world.lost_requeues {
        requeue(&lost, why, world)
    } else {
        Step::Write(Box::new(lost))
    }
}

/// A new attempt of a lost job, queued.
fn requeue(job: &JobRecord, why: &str, world: &mut World<'_>) -> Step {
    let attempt = job.progress.0.attempt;
    let mut record = with_progress(
        job,
        Progress {
            attempt: attempt + 1,
            assignment: (0, 0),
            status: JobStatus::Queued,
            reason: Some(format!("re-queued: attempt {attempt} was lost ({why})")),
            result: None,
            stamp: (world.stamp)(),
        },
    );
    if record
        .attempts
        .get(attempt)
        .is_none_or(|a| a.ended_at_ms.is_none())
    {
        record.attempts.ended(
            attempt,
            None,
            JobStatus::Lost,
            Some(why.to_string()),
            world.wall_ms,
            (world.stamp)(),
        );
    }
    Step::Write(Box::new(record))
}
