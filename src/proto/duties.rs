//! What the node holding the lease does besides the election itself, as I/O-free decisions:
//! record the lease once per (term, voter configuration), and move the voter set towards
//! 1, 3 or 5 live master-eligible nodes once the term has settled. The runtime and the
//! simulation both call this; they differ only in how they gather candidates and carry out
//! the answer.

use std::collections::BTreeSet;

use super::election::Election;
use super::records::MasterInfo;
use super::voters::{desired_voters, Candidate};
use crate::proto::crdt::NodeId;

/// A new master waits this long before changing voters, so that nodes it has not heard from
/// yet (its term is seconds old) are not taken for silent ones.
pub const VOTER_CHANGE_SETTLE_MS: u64 = 5_000;

/// How often the master reconsiders the voter set.
pub const VOTER_CHECK_EVERY_MS: u64 = 1_000;

/// The master's duties and what it already did for the current term.
#[derive(Clone, Debug)]
pub struct MasterDuties {
    settle_ms: u64,
    lease_written: Option<(u64, u64)>,
    next_voter_check: u64,
}

impl Default for MasterDuties {
    fn default() -> Self {
        MasterDuties::new(VOTER_CHANGE_SETTLE_MS)
    }
}

impl MasterDuties {
    /// Duties that wait `settle_ms` into a term before changing voters.
    pub fn new(settle_ms: u64) -> MasterDuties {
        MasterDuties {
            settle_ms,
            lease_written: None,
            next_voter_check: 0,
        }
    }

    /// The lease record to write, when the record for the election's current term and voter
    /// configuration was not written yet. `since_ms` is when the term began, on whichever
    /// clock the record carries. Call [`MasterDuties::lease_written`] once it is stored.
    pub fn lease_record(&self, election: &Election, since_ms: u64) -> Option<MasterInfo> {
        let membership = election.membership();
        let key = (election.term(), membership.index);
        if self.lease_written == Some(key) {
            return None;
        }
        Some(MasterInfo {
            epoch: key.0,
            config_index: key.1,
            master: election.id().clone(),
            since_ms,
            voters: membership.all_voters(),
        })
    }

    /// `record` (from [`MasterDuties::lease_record`]) is stored: do not write it again.
    pub fn lease_written(&mut self, record: &MasterInfo) {
        self.lease_written = Some((record.epoch, record.config_index));
    }

    /// Whether the voter set is due for a check at `now` (every [`VOTER_CHECK_EVERY_MS`]);
    /// a `true` answer schedules the next one.
    pub fn voter_check_due(&mut self, now: u64) -> bool {
        if now < self.next_voter_check {
            return false;
        }
        self.next_voter_check = now + VOTER_CHECK_EVERY_MS;
        true
    }

    /// Whether the term is old enough and no voter change is in flight, so that
    /// [`MasterDuties::voter_change`] may be asked (gathering candidates costs a scan).
    pub fn may_change_voters(&self, election: &Election, now: u64) -> bool {
        let settled = election
            .leader_since()
            .is_some_and(|since| now >= since.saturating_add(self.settle_ms));
        settled && election.can_change_voters(now)
    }

    /// The voter set to move to, given what the master knows of the candidates; `None` when
    /// the current set is right or a change may not start now.
    pub fn voter_change(
        &self,
        election: &Election,
        now: u64,
        candidates: &[Candidate],
    ) -> Option<BTreeSet<NodeId>> {
        if !self.may_change_voters(election, now) {
            return None;
        }
        desired_voters(&election.membership().voters, election.id(), candidates)
    }
}

#[cfg(test)]
mod tests;
