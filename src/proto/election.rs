//! Master election: the leader-election half of Raft (terms, persisted votes, pre-vote, joint
//! consensus for voter changes) with a leader lease, and no replicated log. It is a pure state
//! machine: inputs are messages and clock ticks (monotonic milliseconds), outputs are messages
//! to send and state to persist.
//!
//! Safety argument in brief (the full one is in `docs/architecture.md`):
//! * at most one leader per term, because a leader needs votes from a quorum and each voter
//!   persists at most one vote per term;
//! * a leader acts as master only while a quorum acknowledged a heartbeat it sent less than
//!   `lease_ms` ago, and a voter that acknowledged a heartbeat grants no vote for
//!   `election_min_ms > lease_ms` after receiving it, so a new master cannot exist while an
//!   old one still believes its lease (with clock rates bounded, monotonic time on both sides).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::crdt::NodeId;

/// Election timing in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How often the leader sends heartbeats.
    pub heartbeat_ms: u64,
    /// How long a quorum acknowledgement keeps the leader's lease valid.
    pub lease_ms: u64,
    /// Shortest silence after which a voter campaigns; also how long a voter refuses to vote
    /// after hearing from a leader.
    pub election_min_ms: u64,
    /// Longest randomised election timeout.
    pub election_max_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_ms: 250,
            lease_ms: 900,
            election_min_ms: 1_200,
            election_max_ms: 1_800,
        }
    }
}

/// Position of a membership configuration: (term that created it, index). Larger is newer.
pub type Position = (u64, u64);

/// The voter configuration. During a change (`joining` set) decisions need a quorum of both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Term of the leader that created this configuration.
    pub term: u64,
    /// Sequence number of this configuration.
    pub index: u64,
    /// Current voters.
    pub voters: BTreeSet<NodeId>,
    /// Voters being moved to (joint consensus), if a change is under way.
    pub joining: Option<BTreeSet<NodeId>>,
}

impl Membership {
    /// The configuration of a brand-new mesh whose only voter is `founder`.
    pub fn founding(founder: &NodeId) -> Self {
        Self {
            term: 0,
            index: 1,
            voters: [founder.clone()].into_iter().collect(),
            joining: None,
        }
    }

    /// This configuration's position.
    pub fn position(&self) -> Position {
        (self.term, self.index)
    }

    /// Whether `id` votes in this configuration (old or new side).
    pub fn is_voter(&self, id: &NodeId) -> bool {
        self.voters.contains(id) || self.joining.as_ref().is_some_and(|j| j.contains(id))
    }

    /// Everyone who votes in this configuration.
    pub fn all_voters(&self) -> BTreeSet<NodeId> {
        let mut all = self.voters.clone();
        if let Some(joining) = &self.joining {
            all.extend(joining.iter().cloned());
        }
        all
    }

    /// Whether `granted` holds a majority of the voters (of both sides during a change).
    pub fn is_quorum(&self, granted: &BTreeSet<NodeId>) -> bool {
        let majority = |set: &BTreeSet<NodeId>| {
            !set.is_empty() && set.intersection(granted).count() * 2 > set.len()
        };
        majority(&self.voters) && self.joining.as_ref().is_none_or(majority)
    }
}

/// What must survive a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// Current term (the lease epoch).
    pub term: u64,
    /// Whom we voted for in `term`.
    pub voted_for: Option<NodeId>,
    /// Latest voter configuration we know.
    pub membership: Membership,
}

/// Election messages between peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// "Would you vote for me in `term`?" Changes no state at the receiver.
    PreVote {
        /// The term the sender would campaign in.
        term: u64,
        /// Sender's membership position.
        position: Position,
    },
    /// Answer to a pre-vote.
    PreVoteReply {
        /// The term asked about, or the receiver's higher term when refused.
        term: u64,
        /// Whether the vote would be granted.
        granted: bool,
    },
    /// Request a vote in `term`.
    Vote {
        /// Candidate's term.
        term: u64,
        /// Candidate's membership position.
        position: Position,
    },
    /// Answer to a vote request.
    VoteReply {
        /// Receiver's term.
        term: u64,
        /// Whether the vote was granted.
        granted: bool,
    },
    /// Leader heartbeat, carrying the voter configuration.
    Heartbeat {
        /// Leader's term.
        term: u64,
        /// Leader's configuration.
        membership: Membership,
        /// Leader's clock when sent (echoed back; meaningful only to the leader).
        sent_at: u64,
    },
    /// Acknowledgement of a heartbeat.
    HeartbeatAck {
        /// Receiver's term.
        term: u64,
        /// The heartbeat's `sent_at`.
        sent_at: u64,
        /// Whether the heartbeat was accepted (false: stale term).
        ok: bool,
        /// Receiver's membership position after the heartbeat.
        position: Position,
    },
}

/// Something the runtime must do. Persist before sending messages from the same batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write the hard state durably.
    Persist(HardState),
    /// Send a message to a peer.
    Send {
        /// Destination.
        to: NodeId,
        /// The message.
        msg: Message,
    },
}

/// Why a voter change was not started.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// Only a leader with a valid lease changes voters.
    #[error("not the master")]
    NotMaster,
    /// One change at a time.
    #[error("a voter change is already under way")]
    Busy,
    /// The new set must include the leader and not be empty.
    #[error("the new voter set must contain the master")]
    Invalid,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Role {
    Follower,
    PreCandidate { granted: BTreeSet<NodeId> },
    Candidate { granted: BTreeSet<NodeId> },
    Leader(LeaderState),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct LeaderState {
    since: u64,
    next_heartbeat: u64,
    /// Per peer: `sent_at` of the newest acknowledged heartbeat.
    acked: BTreeMap<NodeId, u64>,
    /// Per peer: membership position acknowledged.
    positions: BTreeMap<NodeId, Position>,
}

/// One node's election state machine.
#[derive(Clone, Debug)]
pub struct Election {
    id: NodeId,
    timing: Timing,
    hard: HardState,
    role: Role,
    leader: Option<NodeId>,
    /// Last time we heard from a leader (or started: a restarted voter must not vote at once).
    leader_contact: u64,
    election_deadline: u64,
    eligible: bool,
    rng: u64,
}

impl Election {
    /// A state machine for node `id`, resuming from `hard`, at time `now`. `eligible` is false
    /// for worker-only nodes, which never campaign. `seed` randomises election timeouts.
    pub fn new(
        id: NodeId,
        hard: HardState,
        timing: Timing,
        eligible: bool,
        now: u64,
        seed: u64,
    ) -> Self {
        let mut election = Self {
            id,
            timing,
            hard,
            role: Role::Follower,
            leader: None,
            leader_contact: now,
            election_deadline: now,
            eligible,
            rng: seed | 1,
        };
        election.election_deadline = if election.sole_voter() {
            now
        } else {
            now + election.random_timeout()
        };
        election
    }

    /// This node's id.
    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// The durable state.
    pub fn hard_state(&self) -> &HardState {
        &self.hard
    }

    /// Current term (lease epoch).
    pub fn term(&self) -> u64 {
        self.hard.term
    }

    /// Current voter configuration.
    pub fn membership(&self) -> &Membership {
        &self.hard.membership
    }

    /// The leader we know of in the current term (ourselves when leading).
    pub fn leader(&self) -> Option<&NodeId> {
        self.leader.as_ref()
    }

    /// Whether we lead the current term (the lease may still have lapsed: see `is_master`).
    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader(_))
    }

    /// When this node became leader, if it is one.
    pub fn leader_since(&self) -> Option<u64> {
        match &self.role {
            Role::Leader(l) => Some(l.since),
            _ => None,
        }
    }

    /// Whether this node may act as master at `now`: it leads and a quorum acknowledged one of
    /// its heartbeats sent within the lease.
    pub fn is_master(&self, now: u64) -> bool {
        match &self.role {
            Role::Leader(l) => self.quorum_since(l, now.saturating_sub(self.timing.lease_ms)),
            _ => false,
        }
    }

    fn quorum_since(&self, l: &LeaderState, cutoff: u64) -> bool {
        let mut fresh: BTreeSet<NodeId> = l
            .acked
            .iter()
            .filter(|(_, &sent)| sent >= cutoff)
            .map(|(id, _)| id.clone())
            .collect();
        fresh.insert(self.id.clone());
        self.hard.membership.is_quorum(&fresh)
    }

    fn sole_voter(&self) -> bool {
        let m = &self.hard.membership;
        m.joining.is_none() && m.voters.len() == 1 && m.voters.contains(&self.id)
    }

    fn random_timeout(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let span = self
            .timing
            .election_max_ms
            .saturating_sub(self.timing.election_min_ms)
            + 1;
        self.timing.election_min_ms + self.rng % span
    }

    fn peers(&self) -> Vec<NodeId> {
        self.hard
            .membership
            .all_voters()
            .into_iter()
            .filter(|p| p != &self.id)
            .collect()
    }

    fn broadcast(&self, msg: Message, out: &mut Vec<Action>) {
        for to in self.peers() {
            out.push(Action::Send {
                to,
                msg: msg.clone(),
            });
        }
    }

    fn can_campaign(&self) -> bool {
        self.eligible && self.hard.membership.is_voter(&self.id)
    }

    /// Whether to campaign although we are no voter, because a voter of our configuration
    /// campaigns with an older one. That happens when a leader finished a voter change that
    /// left itself out and lost its lease before the new voters heard of the end: they cannot
    /// win with the old configuration (its voters refuse them as out of date), and only a
    /// leader hands configurations on. So we campaign (as any Raft server may) to lead them.
    fn should_step_in(&self, from: &NodeId, position: Position) -> bool {
        let m = &self.hard.membership;
        self.eligible
            && !self.is_leader()
            && !m.is_voter(&self.id)
            && m.is_voter(from)
            && position < m.position()
    }

    /// Whether we would grant a vote for a candidate at `term` with `position` now.
    fn would_grant(&self, from: &NodeId, term: u64, position: Position, now: u64) -> bool {
        // `leader_contact` starts at our own start time: a voter that just restarted may
        // have acknowledged a leader's heartbeat right before, so it waits as if it had.
        let recently_led =
            self.is_leader() || now < self.leader_contact + self.timing.election_min_ms;
        let up_to_date = position >= self.hard.membership.position();
        let vote_free = term > self.hard.term
            || (term == self.hard.term && self.hard.voted_for.as_ref().is_none_or(|v| v == from));
        !recently_led && up_to_date && vote_free
    }

    /// Advance timers: campaign after silence, send heartbeats, step down without a quorum.
    pub fn tick(&mut self, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if let Role::Leader(l) = &self.role {
            let (next_heartbeat, since) = (l.next_heartbeat, l.since);
            let cutoff = now.saturating_sub(self.timing.election_max_ms);
            let lost_quorum = !self.quorum_since(l, cutoff);
            if now >= next_heartbeat {
                self.send_heartbeats(now, &mut out);
            }
            let grace_over = now >= since + self.timing.election_max_ms;
            if grace_over && lost_quorum {
                // Check-quorum: a leader cut off from its voters stops leading.
                self.become_follower(None, now);
            }
        } else if now >= self.election_deadline && self.can_campaign() {
            self.start_pre_vote(now, &mut out);
        }
        out
    }

    fn start_pre_vote(&mut self, now: u64, out: &mut Vec<Action>) {
        self.election_deadline = now + self.random_timeout();
        let granted: BTreeSet<NodeId> = [self.id.clone()].into_iter().collect();
        if self.hard.membership.is_quorum(&granted) {
            self.start_election(now, out);
            return;
        }
        self.role = Role::PreCandidate { granted };
        self.broadcast(
            Message::PreVote {
                term: self.hard.term + 1,
                position: self.hard.membership.position(),
            },
            out,
        );
    }

    fn start_election(&mut self, now: u64, out: &mut Vec<Action>) {
        self.hard.term += 1;
        self.hard.voted_for = Some(self.id.clone());
        self.leader = None;
        self.election_deadline = now + self.random_timeout();
        out.push(Action::Persist(self.hard.clone()));
        let granted: BTreeSet<NodeId> = [self.id.clone()].into_iter().collect();
        if self.hard.membership.is_quorum(&granted) {
            self.become_leader(now, out);
            return;
        }
        self.role = Role::Candidate { granted };
        self.broadcast(
            Message::Vote {
                term: self.hard.term,
                position: self.hard.membership.position(),
            },
            out,
        );
    }

    fn become_leader(&mut self, now: u64, out: &mut Vec<Action>) {
        self.leader = Some(self.id.clone());
        self.role = Role::Leader(LeaderState {
            since: now,
            next_heartbeat: now,
            acked: BTreeMap::new(),
            positions: BTreeMap::new(),
        });
        self.send_heartbeats(now, out);
    }

    fn become_follower(&mut self, leader: Option<NodeId>, now: u64) {
        self.role = Role::Follower;
        self.leader = leader;
        self.election_deadline = now + self.random_timeout();
    }

    fn adopt_term(&mut self, term: u64, now: u64, out: &mut Vec<Action>) {
        if term > self.hard.term {
            self.hard.term = term;
            self.hard.voted_for = None;
            self.become_follower(None, now);
            out.push(Action::Persist(self.hard.clone()));
        }
    }

    fn send_heartbeats(&mut self, now: u64, out: &mut Vec<Action>) {
        if let Role::Leader(l) = &mut self.role {
            l.next_heartbeat = now + self.timing.heartbeat_ms;
        }
        self.broadcast(
            Message::Heartbeat {
                term: self.hard.term,
                membership: self.hard.membership.clone(),
                sent_at: now,
            },
            out,
        );
    }

    /// Handle a message from `from`.
    pub fn step(&mut self, from: &NodeId, msg: Message, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let reply = |msg: Message, out: &mut Vec<Action>| {
            out.push(Action::Send {
                to: from.clone(),
                msg,
            })
        };
        match msg {
            Message::PreVote { term, position } => {
                let granted = term >= self.hard.term && self.would_grant(from, term, position, now);
                // A refusal carries our own term: echoing the term asked about would make the
                // pre-candidate adopt it, raising terms without an election, which is what
                // pre-vote is there to prevent.
                let term = if granted { term } else { self.hard.term };
                reply(Message::PreVoteReply { term, granted }, &mut out);
                if self.should_step_in(from, position) {
                    self.start_pre_vote(now, &mut out);
                }
            }
            Message::PreVoteReply { term, granted } => {
                if !granted {
                    if term > self.hard.term && !self.is_leader() {
                        self.adopt_term(term, now, &mut out);
                    }
                } else if let Role::PreCandidate { granted: votes } = &mut self.role {
                    if term == self.hard.term + 1 {
                        votes.insert(from.clone());
                        if self.hard.membership.is_quorum(votes) {
                            self.start_election(now, &mut out);
                        }
                    }
                }
            }
            Message::Vote { term, position } => {
                // A vote request while a leader is alive is ignored without touching our term,
                // so a node coming back from a partition cannot depose a healthy leader.
                let granted = self.would_grant(from, term, position, now);
                if granted {
                    self.adopt_term(term, now, &mut out);
                    self.hard.voted_for = Some(from.clone());
                    self.election_deadline = now + self.random_timeout();
                    out.push(Action::Persist(self.hard.clone()));
                }
                reply(
                    Message::VoteReply {
                        term: self.hard.term,
                        granted,
                    },
                    &mut out,
                );
            }
            Message::VoteReply { term, granted } => {
                if term > self.hard.term {
                    self.adopt_term(term, now, &mut out);
                } else if let Role::Candidate { granted: votes } = &mut self.role {
                    if granted && term == self.hard.term {
                        votes.insert(from.clone());
                        if self.hard.membership.is_quorum(votes) {
                            self.become_leader(now, &mut out);
                        }
                    }
                }
            }
            Message::Heartbeat {
                term,
                membership,
                sent_at,
            } => {
                if term < self.hard.term {
                    reply(
                        Message::HeartbeatAck {
                            term: self.hard.term,
                            sent_at,
                            ok: false,
                            position: self.hard.membership.position(),
                        },
                        &mut out,
                    );
                } else {
                    self.adopt_term(term, now, &mut out);
                    if !matches!(self.role, Role::Follower) || self.leader.as_ref() != Some(from) {
                        self.become_follower(Some(from.clone()), now);
                    }
                    self.leader_contact = now;
                    self.election_deadline = now + self.random_timeout();
                    // Within one term configurations only move forward: a delayed heartbeat
                    // must not roll back a change we already acknowledged (the leader may have
                    // counted us to finish it, and the rollback would let an old quorum elect a
                    // second leader). A configuration made in an earlier term yields to the
                    // leader's, as an uncommitted Raft log suffix yields to the leader's log.
                    let newer = membership.position() > self.hard.membership.position();
                    let from_earlier_term = self.hard.membership.term < term;
                    if membership != self.hard.membership && (newer || from_earlier_term) {
                        self.hard.membership = membership;
                        out.push(Action::Persist(self.hard.clone()));
                    }
                    reply(
                        Message::HeartbeatAck {
                            term,
                            sent_at,
                            ok: true,
                            position: self.hard.membership.position(),
                        },
                        &mut out,
                    );
                }
            }
            Message::HeartbeatAck {
                term,
                sent_at,
                ok,
                position,
            } => {
                if term > self.hard.term {
                    self.adopt_term(term, now, &mut out);
                } else if let Role::Leader(l) = &mut self.role {
                    if ok && term == self.hard.term && sent_at <= now {
                        let newest = l.acked.entry(from.clone()).or_insert(sent_at);
                        *newest = (*newest).max(sent_at);
                        l.positions.insert(from.clone(), position);
                        self.advance_membership(now, &mut out);
                    }
                }
            }
        }
        out
    }

    fn committed(&self, position: Position) -> bool {
        let Role::Leader(l) = &self.role else {
            return false;
        };
        let mut holders: BTreeSet<NodeId> = l
            .positions
            .iter()
            .filter(|(_, &p)| p >= position)
            .map(|(id, _)| id.clone())
            .collect();
        holders.insert(self.id.clone());
        self.hard.membership.is_quorum(&holders)
    }

    /// Finish a joint change once the joint configuration is held by a quorum of both sides.
    fn advance_membership(&mut self, now: u64, out: &mut Vec<Action>) {
        let m = &self.hard.membership;
        let Some(joining) = m.joining.clone() else {
            return;
        };
        if !self.committed(m.position()) {
            return;
        }
        let leaving: Vec<NodeId> = m.voters.difference(&joining).cloned().collect();
        self.hard.membership = Membership {
            term: self.hard.term,
            index: m.index + 1,
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
        self.hard.membership = Membership {
            term: self.hard.term,
            index: m.index + 1,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> BTreeSet<NodeId> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn membership(list: &[&str]) -> Membership {
        Membership {
            term: 0,
            index: 1,
            voters: ids(list),
            joining: None,
        }
    }

    fn node(id: &str, voters: &[&str], now: u64) -> Election {
        let hard = HardState {
            membership: membership(voters),
            ..HardState::default()
        };
        Election::new(id.into(), hard, Timing::default(), true, now, 7)
    }

    #[test]
    fn quorum_needs_a_majority_of_both_sides_during_a_change() {
        let mut m = membership(&["a", "b", "c"]);
        m.joining = Some(ids(&["c", "d", "e"]));
        assert!(!m.is_quorum(&ids(&["a", "b"])));
        assert!(!m.is_quorum(&ids(&["d", "e"])));
        assert!(m.is_quorum(&ids(&["a", "c", "d"])));
        assert!(!Membership::default().is_quorum(&ids(&["a"])));
    }

    #[test]
    fn a_sole_voter_is_master_at_once() {
        let mut e = Election::new(
            "a".into(),
            HardState {
                membership: Membership::founding(&"a".into()),
                ..HardState::default()
            },
            Timing::default(),
            true,
            0,
            1,
        );
        let actions = e.tick(0);
        assert!(e.is_master(0));
        assert_eq!(e.term(), 1);
        assert!(matches!(actions[0], Action::Persist(_)));
    }

    #[test]
    fn a_worker_only_node_never_campaigns() {
        let hard = HardState {
            membership: membership(&["w"]),
            ..HardState::default()
        };
        let mut e = Election::new("w".into(), hard, Timing::default(), false, 0, 1);
        assert!(e.tick(100_000).is_empty());
        assert!(!e.is_leader());
    }

    #[test]
    fn a_voter_that_just_heard_the_leader_refuses_votes_and_keeps_its_term() {
        let mut b = node("b", &["a", "b", "c"], 0);
        b.step(
            &"a".into(),
            Message::Heartbeat {
                term: 1,
                membership: membership(&["a", "b", "c"]),
                sent_at: 10,
            },
            10,
        );
        let out = b.step(
            &"c".into(),
            Message::Vote {
                term: 5,
                position: (0, 1),
            },
            20,
        );
        assert_eq!(b.term(), 1);
        assert!(out.contains(&Action::Send {
            to: "c".into(),
            msg: Message::VoteReply {
                term: 1,
                granted: false
            }
        }));
    }

    #[test]
    fn the_lease_lapses_without_fresh_acknowledgements() {
        let t = Timing::default();
        let mut a = node("a", &["a", "b", "c"], 0);
        let mut now = t.election_max_ms + 1;
        // Campaign: pre-vote, then vote, answered by b.
        a.tick(now);
        a.step(
            &"b".into(),
            Message::PreVoteReply {
                term: 1,
                granted: true,
            },
            now,
        );
        a.step(
            &"b".into(),
            Message::VoteReply {
                term: 1,
                granted: true,
            },
            now,
        );
        assert!(a.is_leader());
        assert!(!a.is_master(now), "no heartbeat acknowledged yet");
        a.step(
            &"b".into(),
            Message::HeartbeatAck {
                term: 1,
                sent_at: now,
                ok: true,
                position: (0, 1),
            },
            now + 2,
        );
        assert!(a.is_master(now + 2));
        now += t.lease_ms + 1;
        assert!(!a.is_master(now));
    }

    #[test]
    fn a_delayed_heartbeat_does_not_roll_back_a_configuration_of_the_same_term() {
        let mut b = node("b", &["a", "b", "c"], 0);
        let heartbeat = |membership: Membership, sent_at: u64| Message::Heartbeat {
            term: 1,
            membership,
            sent_at,
        };
        let old = membership(&["a", "b", "c"]);
        let joint = Membership {
            term: 1,
            index: 2,
            voters: ids(&["a", "b", "c"]),
            joining: Some(ids(&["a", "b"])),
        };
        let new = Membership {
            term: 1,
            index: 3,
            voters: ids(&["a", "b"]),
            joining: None,
        };
        b.step(&"a".into(), heartbeat(joint, 20), 30);
        b.step(&"a".into(), heartbeat(new.clone(), 40), 50);
        // The heartbeat sent before the change arrives last.
        let out = b.step(&"a".into(), heartbeat(old.clone(), 10), 60);
        assert_eq!(b.membership(), &new);
        assert!(!out.iter().any(|a| matches!(a, Action::Persist(_))));
        assert!(out.contains(&Action::Send {
            to: "a".into(),
            msg: Message::HeartbeatAck {
                term: 1,
                sent_at: 10,
                ok: true,
                position: (1, 3),
            },
        }));
        // A leader of a later term still imposes its configuration.
        b.step(
            &"c".into(),
            Message::Heartbeat {
                term: 2,
                membership: old.clone(),
                sent_at: 70,
            },
            80,
        );
        assert_eq!(b.membership(), &old);
    }

    #[test]
    fn a_refused_pre_vote_does_not_raise_the_candidates_term() {
        let t = Timing::default();
        let voters = ["a", "b", "c"];
        let heartbeat = Message::Heartbeat {
            term: 1,
            membership: membership(&voters),
            sent_at: 10,
        };
        let mut b = node("b", &voters, 0);
        let mut c = node("c", &voters, 0);
        c.step(&"a".into(), heartbeat.clone(), 10);
        // c loses the leader and asks b, which still hears from it.
        let now = 10 + t.election_max_ms + 1;
        b.step(&"a".into(), heartbeat, now - 100);
        let asked = c.tick(now);
        assert!(asked.contains(&Action::Send {
            to: "b".into(),
            msg: Message::PreVote {
                term: 2,
                position: (0, 1)
            }
        }));
        let refusal = Message::PreVoteReply {
            term: 1,
            granted: false,
        };
        let out = b.step(
            &"c".into(),
            Message::PreVote {
                term: 2,
                position: (0, 1),
            },
            now,
        );
        assert_eq!(
            out,
            vec![Action::Send {
                to: "c".into(),
                msg: refusal.clone()
            }]
        );
        assert!(c.step(&"b".into(), refusal, now).is_empty());
        assert_eq!(c.term(), 1);
    }

    /// Deliver `actions` of `from` and everything they cause, at once, between `nodes`.
    fn deliver(nodes: &mut BTreeMap<NodeId, Election>, from: &str, actions: Vec<Action>, now: u64) {
        let mut queue: Vec<(NodeId, NodeId, Message)> = Vec::new();
        let sends =
            |from: &str, actions: Vec<Action>, queue: &mut Vec<(NodeId, NodeId, Message)>| {
                for action in actions {
                    if let Action::Send { to, msg } = action {
                        queue.push((from.to_string(), to, msg));
                    }
                }
            };
        sends(from, actions, &mut queue);
        while !queue.is_empty() {
            let (from, to, msg) = queue.remove(0);
            if let Some(node) = nodes.get_mut(&to) {
                let out = node.step(&from, msg, now);
                sends(&to, out, &mut queue);
            }
        }
    }

    #[test]
    fn a_voter_that_missed_the_end_of_a_change_is_brought_up_to_date() {
        // b, leader of term 2, began moving the voters from {a, b, c} to {b}. c won term 3,
        // finished the change and lost its lease; b was down then and restarted holding the
        // joint configuration, which a and c refuse as out of date.
        let joint = Membership {
            term: 2,
            index: 4,
            voters: ids(&["a", "b", "c"]),
            joining: Some(ids(&["b"])),
        };
        let done = Membership {
            term: 3,
            index: 5,
            voters: ids(&["b"]),
            joining: None,
        };
        let mut nodes = BTreeMap::new();
        for (id, membership, seed) in [("a", &done, 3), ("b", &joint, 5), ("c", &done, 9)] {
            let hard = HardState {
                term: 3,
                voted_for: Some("c".into()),
                membership: membership.clone(),
            };
            let election = Election::new(id.into(), hard, Timing::default(), true, 0, seed);
            nodes.insert(id.to_string(), election);
        }
        let mut now = 0;
        while now < 20_000 && !nodes.values().any(|e| e.is_master(now)) {
            now += 50;
            for id in ["a", "b", "c"] {
                let out = nodes.get_mut(id).map(|e| e.tick(now)).unwrap_or_default();
                deliver(&mut nodes, id, out, now);
            }
        }
        assert!(
            nodes.values().any(|e| e.is_master(now)),
            "no master after {now} ms"
        );
        assert!(nodes["b"].membership().position() >= done.position());
    }
}
