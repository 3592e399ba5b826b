//! What this node accepts from peers beyond the shape checks of [`crate::wire`]: records
//! whose epochs the election backs, and which members hear the leader's heartbeats.
//!
//! Any holder of the mesh key can send any record. Records are not signed, so the one thing
//! the election can still vouch for is an epoch: a lease record or job assignment naming an
//! epoch that no election here has reached is refused (anti-entropy brings it again once this
//! node's election has caught up, so an honest record is delayed, never lost).

use std::collections::BTreeSet;

use super::Mesh;
use crate::proto::crdt::NodeId;
use crate::proto::records::Record;

impl Mesh {
    /// Check a record received from a peer against the election.
    pub(super) fn vouch(&self, record: &Record) -> Result<(), String> {
        match record {
            Record::Master(master) => {
                let info = &master.0;
                if self.election.vouches_for(info.epoch, &info.master) {
                    Ok(())
                } else {
                    Err(format!(
                        "a lease record for {} in epoch {} that the election (term {}) does not back",
                        info.master,
                        info.epoch,
                        self.election.term()
                    ))
                }
            }
            Record::Job(job) => {
                // An assignment names the epoch of the master that made it: one from a term
                // this node's election has not reached would outrank every real one.
                let term = self.election.term();
                let assigned = job.assignment.as_ref().map_or(0, |a| a.0.epoch);
                let reported = job.progress.0.assignment.0;
                if assigned.max(reported) <= term {
                    Ok(())
                } else {
                    Err(format!(
                        "job {} names epoch {} beyond the election's term {term}",
                        job.spec.id,
                        assigned.max(reported)
                    ))
                }
            }
            Record::History(horizon) => {
                // A horizon drops history on every node: only the master of an epoch the
                // election backs may move it, and never to less than a day ago.
                let horizon = &horizon.0;
                if !self.election.vouches_for(horizon.epoch, &horizon.set_by) {
                    return Err(format!(
                        "a history horizon from {} in epoch {} that the election (term {}) does not back",
                        horizon.set_by,
                        horizon.epoch,
                        self.election.term()
                    ));
                }
                crate::proto::history::plausible(horizon, super::unix_ms())
            }
            Record::Node(_) | Record::Admin(_) | Record::Unknown { .. } => Ok(()),
        }
    }

    /// Note a record that names a newer term than this node's election (refused by
    /// [`Mesh::vouch`]): a master of a newer term may exist, so this node stops acting as
    /// master until its election catches up. Only terms a voter of this node's configuration
    /// could have reached count (bounded like election messages), and only for a lease length,
    /// so a forged record cannot stop scheduling for good.
    pub(super) fn note_term_ahead(&mut self, record: &Record) {
        let Record::Master(master) = record else {
            return;
        };
        let (term, epoch) = (self.election.term(), master.0.epoch);
        let plausible = epoch > term
            && epoch - term <= crate::proto::election::MAX_TERM_LEAP
            && self
                .election
                .membership()
                .all_voters()
                .contains(&master.0.master);
        if plausible && self.election.is_leader() {
            tracing::info!(
                epoch,
                term,
                "a newer term may exist; not acting as master for a lease length"
            );
            let until = self.now() + self.config.timing.lease_ms;
            self.term_ahead = Some((epoch, until));
        }
    }

    /// Tell the election which connected members do not vote: as leader it sends them
    /// heartbeats too, so every node knows the current term and master first-hand.
    pub(super) fn refresh_learners(&mut self) {
        let learners: BTreeSet<NodeId> = self
            .peers
            .connected_peers()
            .map(|peer| peer.to_string())
            .filter(|id| !self.admin_flag(id, |a| &a.removed))
            .collect();
        self.election.set_learners(learners);
    }
}
