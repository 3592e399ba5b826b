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

mod membership_change;
mod types;

use std::collections::{BTreeMap, BTreeSet};

use super::crdt::NodeId;
pub use types::{
    Action, ChangeError, HardState, Membership, Message, Position, Refusal, Timing,
    LEARNER_HEARTBEAT_MS, LEARNER_QUIET_MS, MAX_ID_LEN, MAX_TERM_LEAP, MAX_VOTERS,
};

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
    /// When the learners are told about us next.
    next_learner_heartbeat: u64,
    /// Only heartbeats sent at or after this time count for the lease (see `void_lease`).
    lease_floor: u64,
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
    /// Members that do not vote but learn the leader and term from its heartbeats, so that
    /// they can check assignments and lease records against the election.
    learners: BTreeSet<NodeId>,
    /// A leader that a voter of our configuration named (term, id): its heartbeats are
    /// admitted although it may not vote in our (possibly outdated) configuration.
    vouched: Option<(u64, NodeId)>,
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
            learners: BTreeSet::new(),
            vouched: None,
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

    /// Forget every acknowledgement this leader holds: it is master again only once a quorum
    /// acknowledged a heartbeat sent from now on (its clock may have missed time, so older
    /// acknowledgements may be older than they look). A heartbeat goes out at the next tick.
    pub fn void_lease(&mut self, now: u64) {
        if let Role::Leader(l) = &mut self.role {
            l.acked.clear();
            l.lease_floor = now;
            l.next_heartbeat = now;
        }
    }

    /// When leading: the time (on the clock passed to `tick` and `step`) at which the newest
    /// heartbeat that `node` acknowledged was sent. `None` when not leading or when `node` has
    /// acknowledged none of this term's heartbeats.
    pub fn acked_at(&self, node: &NodeId) -> Option<u64> {
        match &self.role {
            Role::Leader(l) => l.acked.get(node).copied(),
            _ => None,
        }
    }

    /// Set the non-voting members the leader keeps informed (voters among them are ignored).
    pub fn set_learners(&mut self, mut learners: BTreeSet<NodeId>) {
        learners.remove(&self.id);
        let newcomer = learners.iter().any(|l| !self.learners.contains(l));
        self.learners = learners;
        if let (true, Role::Leader(l)) = (newcomer, &mut self.role) {
            // A member that just connected hears who leads before any voter change names it.
            l.next_learner_heartbeat = 0;
            l.next_heartbeat = 0;
        }
    }

    /// Whether a message from `from` may enter the election at all. The term must be
    /// within [`MAX_TERM_LEAP`] of ours and leave room for the next one, a heartbeat's
    /// configuration must be well-formed, and the sender must vote in our configuration, with
    /// exceptions: a node that has no configuration yet takes part as a new voter would and
    /// takes its first configuration from a heartbeat (trust on first use); and heartbeats of
    /// a leader that a voter of our configuration named in a refused pre-vote are admitted (a
    /// voter that missed voter changes catches up through a voter it trusts).
    pub fn admits(&self, from: &NodeId, msg: &Message) -> Result<(), Refusal> {
        let term = msg.term();
        if term == u64::MAX || term > self.hard.term.saturating_add(MAX_TERM_LEAP) {
            return Err(Refusal::TermOutOfRange(term));
        }
        if let Message::Heartbeat { membership, .. } = msg {
            membership.check()?;
            if membership.term > term {
                return Err(Refusal::BadMembership("made in a later term"));
            }
        }
        let unconfigured = self.hard.membership.all_voters().is_empty();
        let question = matches!(msg, Message::WhoLeads { .. });
        if unconfigured || question || self.hard.membership.is_voter(from) {
            return Ok(());
        }
        let vouched = matches!(msg, Message::Heartbeat { .. })
            && self
                .vouched
                .as_ref()
                .is_some_and(|(t, leader)| leader == from && term >= *t);
        if vouched {
            Ok(())
        } else {
            Err(Refusal::NotAVoter(from.clone()))
        }
    }

    /// Whether the election backs a claim that `master` holds the lease of `epoch`: the epoch
    /// is one this node's election has reached, and if it is the current term, its leader (when
    /// known) is `master`. Epochs nobody granted are refused, so a forged record cannot fence
    /// out the real master.
    pub fn vouches_for(&self, epoch: u64, master: &NodeId) -> bool {
        epoch < self.hard.term
            || (epoch == self.hard.term && self.leader.as_ref().is_none_or(|l| l == master))
    }

    /// Whether this node may act as master at `now`: it leads and a quorum acknowledged one of
    /// its heartbeats sent within the lease.
    pub fn is_master(&self, now: u64) -> bool {
        match &self.role {
            Role::Leader(l) => self.quorum_since(
                l,
                now.saturating_sub(self.timing.lease_ms).max(l.lease_floor),
            ),
            _ => false,
        }
    }

    /// When leading: the send time of the newest heartbeat that a quorum (with this node)
    /// acknowledged, or `None` when no quorum acknowledged one of this term's heartbeats.
    /// `now` minus this is how old the lease's evidence is.
    pub fn quorum_acked_at(&self) -> Option<u64> {
        let Role::Leader(l) = &self.role else {
            return None;
        };
        if self.sole_voter() {
            return None;
        }
        let mut sent: Vec<u64> = l.acked.values().copied().collect();
        sent.sort_unstable_by(|a, b| b.cmp(a));
        sent.into_iter()
            .find(|&cutoff| self.quorum_since(l, cutoff))
    }

    /// When leading: the time (on the clock of `tick` and `step`) at which [`Election::is_master`]
    /// turns false unless more acknowledgements arrive; `None` when not master now.
    pub fn lease_expires_at(&self, now: u64) -> Option<u64> {
        let Role::Leader(l) = &self.role else {
            return None;
        };
        if !self.is_master(now) {
            return None;
        }
        if self.sole_voter() {
            return Some(u64::MAX);
        }
        let acked = self.quorum_acked_at()?;
        Some(
            acked
                .max(l.lease_floor)
                .saturating_add(self.timing.lease_ms),
        )
    }

    fn quorum_since(&self, l: &LeaderState, cutoff: u64) -> bool {
        self.quorum_with_us(l.acked.iter().filter(|(_, &sent)| sent >= cutoff))
    }

    /// Whether the peers of `entries`, with this node, hold a quorum.
    fn quorum_with_us<'a, V: 'a>(&self, entries: impl Iterator<Item = (&'a NodeId, V)>) -> bool {
        let mut ids: BTreeSet<NodeId> = entries.map(|(id, _)| id.clone()).collect();
        ids.insert(self.id.clone());
        self.hard.membership.is_quorum(&ids)
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
        } else if self.is_learner() && now >= self.leader_contact + LEARNER_QUIET_MS {
            // The leader may be one our configuration does not know yet: the voters we know
            // can name it (see `vouched`).
            self.leader_contact = now;
            self.broadcast(
                Message::WhoLeads {
                    term: self.hard.term,
                },
                &mut out,
            );
        }
        out
    }

    /// Configured, but not a voter of its own configuration.
    fn is_learner(&self) -> bool {
        let m = &self.hard.membership;
        !m.all_voters().is_empty() && !m.is_voter(&self.id)
    }

    fn start_pre_vote(&mut self, now: u64, out: &mut Vec<Action>) {
        self.election_deadline = now + self.random_timeout();
        let Some(next_term) = self.hard.term.checked_add(1) else {
            return; // no term left to campaign in
        };
        let granted: BTreeSet<NodeId> = [self.id.clone()].into_iter().collect();
        if self.hard.membership.is_quorum(&granted) {
            self.start_election(now, out);
            return;
        }
        self.role = Role::PreCandidate { granted };
        self.broadcast(
            Message::PreVote {
                term: next_term,
                position: self.hard.membership.position(),
            },
            out,
        );
    }

    fn start_election(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(next_term) = self.hard.term.checked_add(1) else {
            return;
        };
        self.hard.term = next_term;
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
            next_learner_heartbeat: now,
            lease_floor: 0,
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
        let mut tell_learners = false;
        if let Role::Leader(l) = &mut self.role {
            l.next_heartbeat = now + self.timing.heartbeat_ms;
            if now >= l.next_learner_heartbeat {
                l.next_learner_heartbeat = now + LEARNER_HEARTBEAT_MS;
                tell_learners = true;
            }
        }
        let heartbeat = Message::Heartbeat {
            term: self.hard.term,
            membership: self.hard.membership.clone(),
            sent_at: now,
        };
        if tell_learners {
            let voters = self.hard.membership.all_voters();
            for to in self.learners.iter().filter(|l| !voters.contains(*l)) {
                out.push(Action::Send {
                    to: to.clone(),
                    msg: heartbeat.clone(),
                });
            }
        }
        self.broadcast(heartbeat, out);
    }

    /// Handle a message from `from`. Messages [`Election::admits`] refuses change nothing.
    pub fn step(&mut self, from: &NodeId, msg: Message, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.admits(from, &msg).is_err() {
            return out;
        }
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
                let leader = if granted {
                    None
                } else {
                    self.leader.clone().filter(|l| l != from)
                };
                reply(
                    Message::PreVoteReply {
                        term,
                        granted,
                        leader,
                    },
                    &mut out,
                );
                if self.should_step_in(from, position) {
                    self.start_pre_vote(now, &mut out);
                }
            }
            Message::WhoLeads { .. } => {
                let leader = self.leader.clone().filter(|l| l != from);
                if leader.is_some() && self.hard.membership.is_voter(&self.id) {
                    reply(
                        Message::PreVoteReply {
                            term: self.hard.term,
                            granted: false,
                            leader,
                        },
                        &mut out,
                    );
                }
            }
            Message::PreVoteReply {
                term,
                granted,
                leader,
            } => {
                if !granted {
                    if term > self.hard.term && !self.is_leader() {
                        self.adopt_term(term, now, &mut out);
                    }
                    if let Some(leader) = leader.filter(|_| term >= self.hard.term) {
                        self.vouched = Some((term, leader));
                    }
                } else if let Role::PreCandidate { granted: votes } = &mut self.role {
                    if Some(term) == self.hard.term.checked_add(1) {
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
                    // Learners only listen: their acknowledgements count for nothing.
                    if self.hard.membership.is_voter(&self.id) {
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
}

#[cfg(test)]
mod tests;
