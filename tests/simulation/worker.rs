//! Jobs, the worker's half: an assignment is merged and judged with `worker::judge`, a run
//! reports `preparing`, `running` and its end under its run key, a run whose job moved on
//! (`must_stop`) is stopped, and a crash kills every run of the node.
//!
//! Every run start is checked against a mesh-wide table of live runs: a second live run of one
//! `(job, attempt)` anywhere is a failure.

use codex_mesh::proto::crdt::{MaxReg, NodeId};
use codex_mesh::proto::dispatch::worker::{judge, must_stop, Fence, RunKey, Verdict};
use codex_mesh::proto::jobs::{JobStatus, Progress};
use codex_mesh::proto::records::{Key, Record};

use crate::net::Response;
use crate::sim::{Event, Phase, Run, Sim};
use crate::trace::{short, Failure};

/// From the start of a run to its `preparing` report.
const PREPARE_MS: (u64, u64) = (5, 100);
/// From `preparing` to `running`.
const CLONE_MS: (u64, u64) = (50, 1_000);
/// How long the agent runs.
const AGENT_MS: (u64, u64) = (100, 6_000);
/// How long a stopped run takes to exit.
const STOP_MS: (u64, u64) = (1, 200);

impl Sim {
    /// A worker's answer to an assignment from `from` (the master, maybe this node).
    pub fn accept_assignment(
        &mut self,
        i: usize,
        record: &codex_mesh::proto::jobs::JobRecord,
        from: &NodeId,
    ) -> Result<Response, Failure> {
        let id = record.spec.id.clone();
        // The run is judged against the merged record before the record may stop it, so that
        // a run can adopt a newer key of its attempt.
        self.judging = true;
        let merged = self.merge(
            i,
            &Key::Job(id.to_string()).encode(),
            &Record::Job(Box::new(record.clone())),
        );
        self.judging = false;
        merged?;
        let answer = self.judge_assignment(i, record, from)?;
        self.job_changed(i, &id)?;
        Ok(answer)
    }

    fn judge_assignment(
        &mut self,
        i: usize,
        record: &codex_mesh::proto::jobs::JobRecord,
        from: &NodeId,
    ) -> Result<Response, Failure> {
        let id = record.spec.id.clone();
        let (Some(merged), Some(incoming)) = (
            self.job(i, &id),
            record.assignment.as_ref().map(|a| a.0.clone()),
        ) else {
            return Ok(Response::Refused("no such job or no assignment".into()));
        };
        let node = &self.nodes[i];
        let Some(election) = node.election.as_ref() else {
            return Ok(Response::Refused("down".into()));
        };
        let running = node.waiting.get(&id).copied().or_else(|| {
            node.runs
                .get(&id)
                .filter(|r| r.phase != Phase::Stopping)
                .map(|r| r.key)
        });
        let fence = Fence {
            me: &node.id,
            term: election.term(),
            leader: election.leader(),
            from,
        };
        let verdict = judge(
            &merged,
            &incoming,
            running,
            node.refused.get(&id).copied(),
            fence,
        );
        trace!(
            self,
            "n{i} judges job {} {:?}: {verdict:?}",
            short(&id),
            incoming.key()
        );
        let key = RunKey::of(&incoming);
        Ok(match verdict {
            Verdict::Start => {
                if self.nodes[i].runs.contains_key(&id) {
                    // The older run ends first; this one starts after it.
                    self.stop_run(i, &id);
                    self.nodes[i].waiting.insert(id, key);
                } else {
                    self.start_run(i, &id, key)?;
                }
                Response::Ack
            }
            Verdict::Adopt => {
                // The same attempt under a newer key: the run goes on under that key.
                self.stats.adopted += 1;
                if let Some(waiting) = self.nodes[i].waiting.get_mut(&id) {
                    *waiting = key;
                } else if let Some(run) = self.nodes[i].runs.get_mut(&id) {
                    let old = std::mem::replace(&mut run.key, key);
                    trace!(
                        self,
                        "n{i} adopts {key:?} for its run of {} {old:?}",
                        short(&id)
                    );
                }
                Response::Ack
            }
            Verdict::AlreadyRunning | Verdict::AlreadyEnded => Response::Ack,
            Verdict::Refuse(why) => {
                self.stats.refusals += 1;
                let refused = self.nodes[i].refused.entry(id).or_insert(key.assignment);
                *refused = (*refused).max(key.assignment);
                Response::Refused(why)
            }
        })
    }

    /// Node `i` holds a changed record of job `id`: wake the scheduler, stop a superseded run.
    pub fn job_changed(&mut self, i: usize, id: &str) -> Result<(), Failure> {
        self.nodes[i].woken = true;
        if self.judging {
            return Ok(());
        }
        let Some(run) = self.nodes[i].runs.get(id) else {
            return Ok(());
        };
        if run.phase == Phase::Stopping {
            return Ok(());
        }
        let key = run.key;
        if let Some(job) = self.job(i, id) {
            if let Some(why) = must_stop(&job, key, &self.nodes[i].id) {
                trace!(self, "n{i} stops its run of {} {key:?}: {why}", short(id));
                self.stop_run(i, id);
            }
        }
        Ok(())
    }

    fn start_run(&mut self, i: usize, id: &str, key: RunKey) -> Result<(), Failure> {
        let slot = (id.to_string(), key.attempt);
        if let Some(&other) = self.live.get(&slot) {
            return Err(self.fail(format!(
                "double run: job {id} attempt {} starts on n{i} ({:?}) while it runs on n{other}",
                key.attempt, key.assignment
            )));
        }
        self.live.insert(slot, i);
        self.stats.runs += 1;
        let run = self.fresh_id();
        trace!(self, "n{i} starts job {} {key:?}", short(id));
        self.nodes[i].runs.insert(
            id.to_string(),
            Run {
                id: run,
                key,
                phase: Phase::Started,
            },
        );
        let delay = self.rng.range(PREPARE_MS);
        self.schedule_run(i, id, run, delay);
        Ok(())
    }

    fn schedule_run(&mut self, i: usize, id: &str, run: u64, delay: u64) {
        let event = Event::RunStep {
            node: i,
            job: id.to_string(),
            run,
        };
        self.schedule(delay, event);
    }

    fn stop_run(&mut self, i: usize, id: &str) {
        let Some(run) = self.nodes[i].runs.get_mut(id) else {
            return;
        };
        if run.phase == Phase::Stopping {
            return;
        }
        run.phase = Phase::Stopping;
        let run = run.id;
        let delay = self.rng.range(STOP_MS);
        self.schedule_run(i, id, run, delay);
    }

    /// Every run of a crashing node dies with it.
    pub fn kill_runs(&mut self, i: usize) {
        let runs = std::mem::take(&mut self.nodes[i].runs);
        for (id, run) in runs {
            self.stats.killed_runs += 1;
            self.live.remove(&(id, run.key.attempt));
        }
        self.nodes[i].waiting.clear();
    }

    /// The next step of a run: a report, or its end.
    pub fn run_step(&mut self, i: usize, id: &str, run: u64) -> Result<(), Failure> {
        let Some(current) = self.nodes[i].runs.get(id).filter(|r| r.id == run).cloned() else {
            return Ok(()); // ended, killed, or an older step of a stopped run
        };
        if !self.nodes[i].up(self.now) {
            // The node is stopped: its reports wait until it runs again.
            let delay = self.nodes[i].resumes_at() - self.now + 1;
            self.schedule_run(i, id, run, delay);
            return Ok(());
        }
        let key = current.key;
        let next = match current.phase {
            Phase::Started => Some((Phase::Preparing, CLONE_MS)),
            Phase::Preparing => Some((Phase::Running, AGENT_MS)),
            Phase::Running | Phase::Stopping => None,
        };
        if let Some((phase, delay)) = next {
            let status = if phase == Phase::Preparing {
                JobStatus::Preparing
            } else {
                JobStatus::Running
            };
            if let Some(run) = self.nodes[i].runs.get_mut(id) {
                run.phase = phase;
            }
            self.report(i, id, key, status, None)?;
            let delay = self.rng.range(delay);
            self.schedule_run(i, id, run, delay);
            return Ok(());
        }
        self.nodes[i].runs.remove(id);
        self.live.remove(&(id.to_string(), key.attempt));
        let me = self.nodes[i].id.clone();
        let superseded = self.job(i, id).and_then(|job| must_stop(&job, key, &me));
        if current.phase == Phase::Stopping {
            self.stats.stopped_runs += 1;
            trace!(self, "n{i}'s run of {} {key:?} ended (stopped)", short(id));
            if superseded.is_none() {
                self.report(i, id, key, JobStatus::Cancelled, Some("stopped".into()))?;
            }
        } else {
            let status = match self.rng.below(10) {
                0..=6 => JobStatus::Succeeded,
                7 | 8 => JobStatus::Failed,
                _ => JobStatus::TimedOut,
            };
            trace!(self, "n{i}'s run of {} {key:?} ends {status:?}", short(id));
            if superseded.is_none() {
                self.report(i, id, key, status, None)?;
            }
        }
        if let Some(next) = self.nodes[i].waiting.remove(id) {
            let moved_on = self.job(i, id).and_then(|job| must_stop(&job, next, &me));
            if moved_on.is_none() {
                self.start_run(i, id, next)?;
            }
        }
        Ok(())
    }

    /// Write a run's status under its run key (with the attempt's start or end).
    fn report(
        &mut self,
        i: usize,
        id: &str,
        key: RunKey,
        status: JobStatus,
        reason: Option<String>,
    ) -> Result<(), Failure> {
        let Some(mut record) = self.job(i, id) else {
            return Ok(());
        };
        let me = self.nodes[i].id.clone();
        let wall = self.wall(i);
        record.progress = MaxReg(Progress {
            attempt: key.attempt,
            assignment: key.assignment,
            status,
            reason: reason.clone(),
            result: None,
            stamp: self.stamp(i),
        });
        let stamp = self.stamp(i);
        if status == JobStatus::Preparing {
            record.attempts.started(key.attempt, &me, wall, stamp);
        } else if status.is_terminal() {
            record
                .attempts
                .ended(key.attempt, Some(&me), status, reason, wall, stamp);
        }
        self.write(
            i,
            Key::Job(id.to_string()).encode(),
            Record::Job(Box::new(record)),
        )
    }
}
