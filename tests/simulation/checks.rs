//! The invariants: checked after every step, and at the end of a run.

use codex_mesh::proto::election::MAX_TERM_LEAP;
use codex_mesh::proto::jobs::JobStatus;
use codex_mesh::proto::lookup::RecordLookup;
use codex_mesh::proto::records::{Key, Record};
use codex_mesh::proto::state::ReplicatedState;
use codex_mesh::proto::voters::target_size;

use crate::sim::Sim;
use crate::trace::{show_config, Failure};
use crate::LOST_REQUEUES;

impl Sim {
    /// Invariant 2, at the current instant, over every running (possibly paused) node, each on
    /// its own clock (a frozen node does not act; when it thaws it checks its clock first).
    pub fn check_masters(&mut self) -> Result<(), Failure> {
        let masters: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.acting_master(i))
            .collect();
        if masters.len() > 1 {
            let detail: Vec<String> = masters
                .iter()
                .map(|&i| {
                    let e = self.nodes[i].election.as_ref();
                    format!(
                        "n{i} (term {}, leader since {:?}, {})",
                        e.map_or(0, |e| e.term()),
                        e.and_then(|e| e.leader_since()),
                        e.map_or_else(String::new, |e| show_config(e.membership()))
                    )
                })
                .collect();
            return Err(self.fail(format!(
                "invariant 2: several masters at once: {}",
                detail.join("; ")
            )));
        }
        if masters != self.masters {
            trace!(self, "-- master now: {masters:?}");
            self.masters = masters;
        }
        Ok(())
    }

    pub fn final_check(&self) -> Result<(), Failure> {
        let masters: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.acting_master(i))
            .collect();
        let [master] = masters[..] else {
            return Err(self.fail(format!("after healing, masters are {masters:?}")));
        };
        let Some(leader) = self.nodes[master].election.as_ref() else {
            return Err(self.fail(format!("master n{master} is down")));
        };
        let membership = leader.membership();
        let want = target_size(self.nodes.len());
        if membership.joining.is_some() || membership.voters.len() != want {
            return Err(self.fail(format!(
                "after healing the voters are {}, expected {want} voters",
                show_config(membership)
            )));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(election) = node.election.as_ref() else {
                return Err(self.fail(format!("n{i} is down after healing")));
            };
            if election.term() >= MAX_TERM_LEAP {
                return Err(self.fail(format!(
                    "n{i} reached term {}: forged terms got in",
                    election.term()
                )));
            }
            if election.leader() != Some(&self.nodes[master].id) {
                return Err(self.fail(format!(
                    "n{i} believes the leader is {:?}, the master is n{master}",
                    election.leader()
                )));
            }
            if election.membership() != membership {
                return Err(self.fail(format!(
                    "n{i} holds configuration {}, the master {}",
                    show_config(election.membership()),
                    show_config(membership)
                )));
            }
            if node.state != self.nodes[0].state {
                let keys =
                    |s: &ReplicatedState| s.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
                return Err(self.fail(format!(
                    "replicas differ: n0 has {:?}, n{i} has {:?}",
                    keys(&self.nodes[0].state),
                    keys(&node.state)
                )));
            }
            match node.state.master() {
                Some(info)
                    if info.master == self.nodes[master].id && info.epoch == leader.term() => {}
                other => {
                    return Err(self.fail(format!(
                        "n{i}'s master record is {other:?}, the master is n{master} in term {}",
                        leader.term()
                    )));
                }
            }
        }
        self.final_jobs_check()
    }

    /// After healing: every job ended everywhere, none lost with attempts left, no run left.
    fn final_jobs_check(&self) -> Result<(), Failure> {
        let jobs = self.nodes[0].state.all_jobs().count() as u64;
        if jobs != self.submitted {
            return Err(self.fail(format!(
                "{} jobs were submitted, the replicas hold {jobs}",
                self.submitted
            )));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            for (key, record) in node.state.records_from(Key::JOB_PREFIX) {
                let Record::Job(job) = record else {
                    return Err(self.fail(format!("n{i} holds a non-job under {key}")));
                };
                let progress = &job.progress.0;
                if !progress.status.is_terminal() {
                    return Err(self.fail(format!(
                        "after healing {key} is stuck on n{i}: attempt {} {:?} under {:?} ({:?})",
                        progress.attempt, progress.status, progress.assignment, progress.reason
                    )));
                }
                if progress.status == JobStatus::Lost && progress.attempt <= LOST_REQUEUES {
                    return Err(self.fail(format!(
                        "{key} ended lost in attempt {} with attempts left ({:?})",
                        progress.attempt, progress.reason
                    )));
                }
            }
            if !node.runs.is_empty() {
                return Err(self.fail(format!(
                    "n{i} still runs {:?} after every job ended",
                    node.runs.keys().collect::<Vec<_>>()
                )));
            }
        }
        if !self.live.is_empty() {
            return Err(self.fail(format!("runs left: {:?}", self.live)));
        }
        Ok(())
    }
}
