//! Faults: partitions, cut links, crashes, pauses, freezes (the monotonic clock stops with
//! the process, the wall clock does not) and the Byzantine peer's forgeries.

use std::collections::BTreeSet;

use codex_mesh::proto::crdt::{MaxReg, NodeId};
use codex_mesh::proto::election::{Membership, Message};
use codex_mesh::proto::records::{Key, MasterInfo, Record};

use crate::net::Payload;
use crate::sim::{Event, Sim};
use crate::trace::{show_payload, Failure};
use crate::{BYZANTINE, DELAY_MS};

/// How long a freeze lasts: short ones, within the margin between the lease and the voters'
/// silence (`election_min_ms - lease_ms`, less the clock-rate spread), which the clock check
/// need not see, and long ones it must see (a wall advance over the lease at any rate).
const FREEZE_MS: [(u64, u64); 2] = [(10, 60), (1_200, 8_000)];
/// Freezes longer than that margin yet too short for the clock check (see `Params`).
const GAP_FREEZE_MS: (u64, u64) = (300, 900);

/// A `master` record claiming the lease for `master` in `epoch`.
fn forged_lease(epoch: u64, master: &NodeId) -> Record {
    Record::Master(MaxReg(MasterInfo {
        epoch,
        config_index: 1,
        master: master.clone(),
        since_ms: 0,
        voters: [master.clone()].into_iter().collect(),
    }))
}

impl Sim {
    /// A node to hurt: often the current master (the interesting case), else any.
    fn victim(&mut self) -> usize {
        if !self.masters.is_empty() && self.rng.permille(400) {
            self.masters[0]
        } else {
            self.rng.index(self.nodes.len())
        }
    }

    pub fn fault(&mut self) {
        if !self.chaos {
            return;
        }
        let n = self.nodes.len();
        match self.rng.below(100) {
            0..=17 if n > 1 && self.split.is_none() => {
                let mut side: Vec<bool> = (0..n).map(|_| self.rng.below(2) == 0).collect();
                if side.iter().all(|&s| s == side[0]) {
                    let k = self.rng.index(n);
                    side[k] = !side[k];
                }
                let duration = self.rng.range((500, 15_000));
                self.split_generation += 1;
                self.stats.splits += 1;
                trace!(self, "-- partition {side:?} for {duration} ms");
                self.split = Some(side);
                self.schedule(duration, Event::HealSplit(self.split_generation));
            }
            18..=32 if n > 2 => {
                // One link fails: connectivity is no longer transitive.
                let a = self.rng.index(n);
                let b = (a + 1 + self.rng.index(n - 1)) % n;
                let link = (a.min(b), a.max(b));
                let duration = self.rng.range((500, 10_000));
                self.stats.link_cuts += 1;
                trace!(
                    self,
                    "-- link n{}-n{} cut for {duration} ms",
                    link.0,
                    link.1
                );
                self.cuts.insert(link);
                self.schedule(duration, Event::HealLink(link.0, link.1));
                if self.rng.below(3) == 0 {
                    // Correlated: a third node's process restarts while the link is down
                    // (e.g. a voter that acknowledged the master a moment before).
                    let c = (0..n)
                        .filter(|&c| c != a && c != b)
                        .nth(self.rng.index(n - 2));
                    if let Some(c) = c {
                        let at = self.rng.range((1, duration));
                        self.schedule(at, Event::Bounce(c));
                    }
                }
            }
            33..=54 => {
                let i = self.victim();
                if self.nodes[i].election.is_some() {
                    let down = match self.rng.below(3) {
                        0 => self.rng.range((1, 150)),
                        1 => self.rng.range((150, 1_000)),
                        _ => self.rng.range((1_000, 8_000)),
                    };
                    self.crash(i, down);
                }
            }
            55..=69 => {
                let i = self.victim();
                if self.nodes[i].up(self.now) {
                    let duration = self.rng.range((100, 4_000));
                    self.stats.pauses += 1;
                    trace!(self, "-- n{i} paused for {duration} ms");
                    self.nodes[i].paused_until = self.now + duration;
                }
            }
            80..=94 => self.forge(),
            95..=99 => {
                let i = self.victim();
                if self.nodes[i].up(self.now) {
                    self.freeze(i);
                }
            }
            70..=79 => {
                self.drop_permille = self.rng.range((50, 200));
                self.dup_permille = self.rng.range((0, 50));
                self.slow_permille = self.rng.range((0, 20));
                trace!(
                    self,
                    "-- network: drop {}‰ dup {}‰ slow {}‰",
                    self.drop_permille,
                    self.dup_permille,
                    self.slow_permille
                );
            }
            _ => {}
        }
        let next = self.rng.range((100, 2_500));
        self.schedule(next, Event::Fault);
    }

    /// The Byzantine peer sends one forged message to a node that has a voter configuration.
    fn forge(&mut self) {
        let targets: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !self.nodes[i].persisted.membership.all_voters().is_empty())
            .collect();
        if targets.is_empty() {
            return;
        }
        let to = targets[self.rng.index(targets.len())];
        let term = self.nodes[to].persisted.term;
        let byz: NodeId = BYZANTINE.to_string();
        let ids = |list: &[&NodeId]| list.iter().map(|id| (*id).clone()).collect();
        let victim = self.nodes[to].id.clone();
        let near = term + self.rng.range((1, 3));
        let huge = (term, u64::MAX);
        let message = |membership: Membership, term: u64| Message::Heartbeat {
            term,
            membership,
            sent_at: 0,
        };
        let joint = |voters: BTreeSet<NodeId>| Membership {
            term,
            index: u64::MAX - 1,
            voters,
            joining: None,
        };
        let payload = match self.rng.below(10) {
            0 => Payload::Election(message(joint(ids(&[&byz])), u64::MAX)),
            1 => Payload::Election(message(joint(ids(&[&byz, &victim])), near)),
            2 => Payload::Election(message(joint(BTreeSet::new()), near)),
            3 => Payload::Election(Message::Vote {
                term: near,
                position: huge,
            }),
            4 => Payload::Election(Message::PreVote {
                term: near,
                position: huge,
            }),
            5 => Payload::Election(Message::HeartbeatAck {
                term: u64::MAX,
                sent_at: 0,
                ok: true,
                position: huge,
            }),
            6 => Payload::Election(Message::VoteReply {
                term,
                granted: true,
            }),
            7 => Payload::Election(Message::PreVoteReply {
                term: near,
                granted: false,
                leader: Some(byz.clone()),
            }),
            8 => Payload::Delta(Key::Master.encode(), Box::new(forged_lease(u64::MAX, &byz))),
            _ => Payload::Delta(Key::Master.encode(), Box::new(forged_lease(near, &byz))),
        };
        self.stats.forged += 1;
        let delay = self.rng.range(DELAY_MS);
        self.schedule(delay, Event::Forged { to, payload });
    }

    pub fn deliver_forged(&mut self, to: usize, payload: Payload) -> Result<(), Failure> {
        if !self.nodes[to].up(self.now) {
            return Ok(());
        }
        trace!(self, "{BYZANTINE} -> n{to}: {}", show_payload(&payload));
        match payload {
            Payload::Election(msg) => {
                let now = self.mono(to);
                let actions = match self.nodes[to].election.as_mut() {
                    Some(election) => election.step(&BYZANTINE.to_string(), msg, now),
                    None => return Ok(()),
                };
                if !actions.is_empty() {
                    return Err(self.fail(format!(
                        "n{to} acted on a forged election message: {actions:?}"
                    )));
                }
                Ok(())
            }
            Payload::Delta(key, record) => self.merge(to, &key, &record),
            _ => Ok(()),
        }
    }

    /// Freeze node `i`: no ticks, no input, and its monotonic clock stands still.
    fn freeze(&mut self, i: usize) {
        let duration = if self.params.gap_freezes && self.rng.below(2) == 0 {
            self.rng.range(GAP_FREEZE_MS)
        } else {
            let band = FREEZE_MS[self.rng.index(FREEZE_MS.len())];
            self.rng.range(band)
        };
        self.stats.freezes += 1;
        trace!(self, "-- n{i} frozen for {duration} ms");
        let now = self.now;
        let node = &mut self.nodes[i];
        node.frozen_until = now + duration;
        node.clock.frozen_since = Some(now);
        let incarnation = node.incarnation;
        self.schedule(
            duration,
            Event::Thaw {
                node: i,
                incarnation,
            },
        );
    }

    /// End a freeze: the clocks run again and the node checks them at once.
    pub fn thaw(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.nodes[i];
        if node.clock.frozen_since.is_none() {
            return;
        }
        node.clock.thaw(now);
        node.frozen_until = 0;
        trace!(self, "-- n{i} thaws");
        let (wall, mono) = (self.wall(i), self.mono(i));
        self.observe_clock(i, wall, mono);
    }
}
