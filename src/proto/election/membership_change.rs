//! Voter changes by joint consensus: starting one, and finishing it once a quorum of both
//! sides holds the joint configuration.

use std::collections::BTreeSet;

use super::*;

impl Election {
    pub(super) fn committed(&self, position: Position) -> bool {
        let Role::Leader(l) = &self.role else {
            return false;
        };
        self.quorum_with_us(l.positions.iter().filter(|(_, &p)| p >= position))
    }

    /// Finish a joint change once the joint configuration is held by a quorum of both sides.
    pub(super) fn advance_membership(&mut self, now: u64, out: &mut Vec<Action>) {
        let m = &self.hard.membership;
        let Some(joining) = m.joining.clone() else {
            return;
        };
        if !self.committed(m.position()) {
            return;
        }
        let Some(index) = m.index.checked_add(1) else {
            return;
        };
        let leaving: Vec<NodeId> = m.voters.difference(&joining).cloned().collect();
        self.hard.membership = Membership {
            term: self.hard.term,
            index,
            voters: joining,
            joining: None,
        };
        out.push(Action::Persist(self.hard.clone()));
        self.send_heartbeats(now, out);
        // Tell the voters that left, so they stop campaigning on a stale configuration.
        for to in leaving.into_iter().filter(|p| p != &self.id) {
            out.push(Action::Send {
                to,
                msg: Message::Heartbeat {
                    term: self.hard.term,
                    membership: self.hard.membership.clone(),
                    sent_at: now,
                },
            });
        }
    }

    /// Whether a new voter change may start now (we are master, none is under way, and the
    /// current configuration is held by a quorum).
    pub fn can_change_voters(&self, now: u64) -> bool {
        self.is_master(now)
            && self.hard.membership.joining.is_none()
            && self.committed(self.hard.membership.position())
    }

    /// Start moving the voters to `voters` (joint consensus). The leader must stay a voter.
    pub fn change_voters(
        &mut self,
        voters: BTreeSet<NodeId>,
        now: u64,
    ) -> Result<Vec<Action>, ChangeError> {
        if !self.is_master(now) {
            return Err(ChangeError::NotMaster);
        }
        if !voters.contains(&self.id) {
            return Err(ChangeError::Invalid);
        }
        if !self.can_change_voters(now) {
            return Err(ChangeError::Busy);
        }
        if voters == self.hard.membership.voters {
            return Ok(Vec::new());
        }
        let m = &self.hard.membership;
        let index = m.index.checked_add(1).ok_or(ChangeError::Exhausted)?;
        self.hard.membership = Membership {
            term: self.hard.term,
            index,
            voters: m.voters.clone(),
            joining: Some(voters),
        };
        let mut out = vec![Action::Persist(self.hard.clone())];
        self.send_heartbeats(now, &mut out);
        // A change that needs no other acknowledgement completes at once.
        self.advance_membership(now, &mut out);
        Ok(out)
    }
}
