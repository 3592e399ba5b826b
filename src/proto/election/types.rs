//! The election's data: timing, voter configurations, the durable hard state, the messages
//! peers exchange, the actions the runtime carries out, and why a message or change is refused.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::proto::crdt::NodeId;

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

/// Most voters on either side of a configuration a peer may send (the mesh keeps 1, 3 or 5).
pub const MAX_VOTERS: usize = 9;
/// Longest node id accepted inside an election message.
pub const MAX_ID_LEN: usize = 128;
/// Largest step above our own term that a message may carry. Honest terms grow by one per
/// election, so this leaves room for a node that missed millions of elections, while a peer
/// that sends huge terms cannot exhaust the term space (2^40 accepted messages would be
/// needed to reach `u64::MAX`).
pub const MAX_TERM_LEAP: u64 = 1 << 24;
/// How often a leader tells the non-voting members (learners) about itself.
pub const LEARNER_HEARTBEAT_MS: u64 = 2_000;
/// How long a learner hears no leader before it asks the voters it knows who leads.
pub const LEARNER_QUIET_MS: u64 = 5_000;

/// Why a message was not admitted into the election.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Only voters (of the receiver's configuration) take part in the election.
    #[error("election message from {0}, which is not a voter")]
    NotAVoter(NodeId),
    /// The term is implausibly far ahead, or would leave no room to campaign.
    #[error("term {0} is out of range")]
    TermOutOfRange(u64),
    /// A heartbeat's voter configuration is empty, oversized or malformed.
    #[error("invalid voter configuration: {0}")]
    BadMembership(&'static str),
}

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

    /// Check the shape of a configuration received from a peer: both sides non-empty, at most
    /// [`MAX_VOTERS`] each, ids bounded, and a next index that does not overflow.
    pub fn check(&self) -> Result<(), Refusal> {
        let side = |set: &BTreeSet<NodeId>| {
            if set.is_empty() {
                Err(Refusal::BadMembership("no voters"))
            } else if set.len() > MAX_VOTERS {
                Err(Refusal::BadMembership("too many voters"))
            } else if set.iter().any(|id| id.is_empty() || id.len() > MAX_ID_LEN) {
                Err(Refusal::BadMembership("malformed voter id"))
            } else {
                Ok(())
            }
        };
        side(&self.voters)?;
        if let Some(joining) = &self.joining {
            side(joining)?;
        }
        if self.index == u64::MAX {
            return Err(Refusal::BadMembership("index out of range"));
        }
        Ok(())
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
        /// With a refusal: the leader of `term` as the receiver knows it, so that a voter that
        /// missed voter changes learns, from a voter it trusts, whose heartbeats to take.
        #[serde(default)]
        leader: Option<NodeId>,
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
    /// A non-voter that heard no leader for a while asks a voter it knows who leads; the
    /// answer is a refused `PreVoteReply` naming the leader. Changes no state.
    WhoLeads {
        /// The asker's term.
        term: u64,
    },
}

impl Message {
    /// The term the message carries.
    pub fn term(&self) -> u64 {
        match self {
            Message::PreVote { term, .. }
            | Message::PreVoteReply { term, .. }
            | Message::Vote { term, .. }
            | Message::VoteReply { term, .. }
            | Message::Heartbeat { term, .. }
            | Message::HeartbeatAck { term, .. }
            | Message::WhoLeads { term } => *term,
        }
    }
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
    /// Configuration indexes are used up (never in practice).
    #[error("no configuration index left")]
    Exhausted,
}
