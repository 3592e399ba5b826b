//! One node's steps as the runtime takes them: election actions and their persistence, ticks,
//! the master's voter changes and lease record, local writes, merges, crashes and restarts.

use codex_mesh::proto::crdt::{Lww, MaxReg, Stamp};
use codex_mesh::proto::dispatch::worker::lost_at_restart;
use codex_mesh::proto::dispatch::Dispatcher;
use codex_mesh::proto::election::{Action, Election, HardState, Timing};
use codex_mesh::proto::hlc::HlcClock;
use codex_mesh::proto::lookup::RecordLookup;
use codex_mesh::proto::records::{Key, NodeAdmin, Record};
use codex_mesh::proto::voters::Candidate;

use crate::net::Payload;
use crate::sim::{master_duties, node_id, Event, Sim};
use crate::trace::{show_config, Failure};
use crate::{ANTI_ENTROPY_PERMILLE, EXTRA_IDS, TICK_MS, WRITE_PERMILLE};

/// Whether a written field (if any) is what the store now holds.
fn took_effect<T: PartialEq>(written: &Option<T>, stored: &Option<T>) -> bool {
    written.is_none() || written == stored
}

impl Sim {
    /// A stamp from node `i`'s hybrid clock.
    pub fn stamp(&mut self, i: usize) -> Stamp {
        let wall = self.wall(i);
        let node = &mut self.nodes[i];
        Stamp {
            at: node.hlc.tick(wall),
            by: node.id.clone(),
        }
    }

    /// Carry out a batch of election actions of node `i`, in order (persist before send).
    pub fn apply(&mut self, i: usize, actions: Vec<Action>) -> Result<(), Failure> {
        for action in actions {
            match action {
                Action::Persist(hard) => self.persist(i, hard)?,
                Action::Send { to, msg } => {
                    let Some(j) = self.index_of(&to) else {
                        return Err(self.fail(format!("n{i} sends to unknown node {to:?}")));
                    };
                    if j == i {
                        return Err(self.fail(format!("n{i} sends to itself: {msg:?}")));
                    }
                    self.send(i, j, Payload::Election(msg));
                }
            }
        }
        Ok(())
    }

    fn persist(&mut self, i: usize, hard: HardState) -> Result<(), Failure> {
        let old = &self.nodes[i].persisted;
        if hard.term < old.term {
            return Err(self.fail(format!(
                "invariant 3: n{i} persisted term {} after term {}",
                hard.term, old.term
            )));
        }
        if hard.term == old.term && old.voted_for.is_some() && hard.voted_for != old.voted_for {
            return Err(self.fail(format!(
                "n{i} changed its vote in term {} from {:?} to {:?}",
                hard.term, old.voted_for, hard.voted_for
            )));
        }
        if hard.term > old.term {
            // Terms come from candidates only: a node moves to a new term because it campaigns
            // in it, or because it heard of it from someone who did (pre-vote must not raise
            // terms by itself).
            if hard.voted_for.as_ref() == Some(&self.nodes[i].id) {
                self.campaigned.insert(hard.term);
            } else if !self.campaigned.contains(&hard.term) {
                return Err(self.fail(format!(
                    "n{i} moved to term {} (from {}), in which nobody campaigned",
                    hard.term, old.term
                )));
            }
        }
        let position = hard.membership.position();
        match self.configs.get(&position) {
            Some(known) if known != &hard.membership => {
                return Err(self.fail(format!(
                    "n{i} persisted configuration {} but {} has the same position",
                    show_config(&hard.membership),
                    show_config(known)
                )));
            }
            Some(_) => {}
            None => {
                self.configs.insert(position, hard.membership.clone());
            }
        }
        trace!(
            self,
            "n{i} persists t{} vote={:?} {}",
            hard.term,
            hard.voted_for,
            show_config(&hard.membership)
        );
        self.stats.max_term = self.stats.max_term.max(hard.term);
        self.nodes[i].persisted = hard;
        Ok(())
    }

    /// Checks after node `i` handled a tick or a message.
    pub fn after_step(&mut self, i: usize) -> Result<(), Failure> {
        let Some(election) = self.nodes[i].election.as_ref() else {
            return Ok(());
        };
        if election.hard_state() != &self.nodes[i].persisted {
            return Err(self.fail(format!(
                "n{i} holds hard state {:?} in memory but persisted {:?}",
                election.hard_state(),
                self.nodes[i].persisted
            )));
        }
        if election.is_leader() {
            let term = election.term();
            match self.leaders.get(&term) {
                Some(&other) if other != i => {
                    return Err(self.fail(format!(
                        "invariant 1: n{i} leads term {term}, which n{other} led"
                    )));
                }
                Some(_) => {}
                None => {
                    self.leaders.insert(term, i);
                    self.stats.leaders += 1;
                    trace!(self, "n{i} becomes leader of term {term}");
                }
            }
        }
        Ok(())
    }

    pub fn tick(&mut self, i: usize) -> Result<(), Failure> {
        let next = self.rng.range(TICK_MS);
        self.schedule(next, Event::Tick(i));
        if !self.nodes[i].up(self.now) {
            return Ok(());
        }
        let (wall, now) = (self.wall(i), self.mono(i));
        self.observe_clock(i, wall, now);
        let actions = match self.nodes[i].election.as_mut() {
            Some(election) => election.tick(now),
            None => return Ok(()),
        };
        if !actions.is_empty() {
            trace!(self, "n{i} tick: {} actions", actions.len());
        }
        self.apply(i, actions)?;
        self.after_step(i)?;
        self.master_duties(i)?;
        if self.acting_master(i) && now >= self.nodes[i].next_round {
            self.nodes[i].woken = true;
        }
        if self.chaos && self.rng.permille(WRITE_PERMILLE) {
            self.local_write(i)?;
        }
        if self.nodes.len() > 1 && self.rng.permille(ANTI_ENTROPY_PERMILLE) {
            self.start_anti_entropy(i);
        }
        Ok(())
    }

    /// The runtime's clock check: a jump voids the lease (only acknowledgements of heartbeats
    /// sent from now on count again).
    pub fn observe_clock(&mut self, i: usize, wall: u64, mono: u64) {
        let node = &mut self.nodes[i];
        if let Some(jump) = node.lease_clock.observe(wall, mono) {
            if let Some(election) = node.election.as_mut() {
                election.void_lease(mono);
            }
            self.stats.clock_jumps += 1;
            trace!(
                self,
                "n{i} sees its wall clock jump {jump} ms past its monotonic one: lease voided"
            );
        }
    }

    /// What the runtime does on the master, through the same duties it runs: change voters,
    /// publish the `master` record.
    fn master_duties(&mut self, i: usize) -> Result<(), Failure> {
        let now = self.now;
        let local = self.mono(i);
        if !self.acting_master(i) {
            return Ok(());
        }
        let online: Vec<bool> = (0..self.nodes.len())
            .map(|j| j == i || (self.nodes[j].up(now) && self.reachable(i, j)))
            .collect();
        for (j, &up) in online.iter().enumerate() {
            if up {
                self.last_seen[j] = now;
            }
        }
        let node = &mut self.nodes[i];
        let due = node.duties.voter_check_due(local);
        let Some(election) = node.election.as_ref() else {
            return Ok(());
        };
        if due && node.duties.may_change_voters(election, local) {
            let candidates: Vec<Candidate> = (0..self.nodes.len())
                .map(|j| Candidate {
                    id: self.nodes[j].id.clone(),
                    eligible: true,
                    online: online[j],
                    recently_seen: online[j] || now < self.last_seen[j] + self.grace_ms,
                })
                .collect();
            let change = self.nodes[i].election.as_ref().and_then(|election| {
                let voters = self.nodes[i]
                    .duties
                    .voter_change(election, local, &candidates)?;
                Some((show_config(election.membership()), voters))
            });
            if let Some((from, voters)) = change {
                trace!(self, "n{i} changes voters from {from} to {voters:?}");
                let result = match self.nodes[i].election.as_mut() {
                    Some(election) => election.change_voters(voters, local),
                    None => return Ok(()),
                };
                match result {
                    Ok(actions) => {
                        self.stats.voter_changes += 1;
                        self.apply(i, actions)?;
                        self.after_step(i)?;
                        if self.chaos && self.rng.permille(300) {
                            // Crash during the change: the master, or any node.
                            let victim = if self.rng.below(2) == 0 {
                                i
                            } else {
                                self.rng.index(self.nodes.len())
                            };
                            let at = self.rng.range((1, 400));
                            self.schedule(at, Event::Bounce(victim));
                        }
                    }
                    Err(err) => {
                        return Err(self.fail(format!(
                            "n{i}: change_voters refused ({err}) although the duties allowed it"
                        )));
                    }
                }
            }
        }
        if !self.acting_master(i) {
            return Ok(());
        }
        let node = &self.nodes[i];
        let Some(election) = node.election.as_ref() else {
            return Ok(());
        };
        let since = election.leader_since().unwrap_or(local);
        if let Some(info) = node.duties.lease_record(election, since) {
            self.nodes[i].duties.lease_written(&info);
            self.write(i, Key::Master.encode(), Record::Master(MaxReg(info)))?;
        }
        Ok(())
    }

    /// Write an `admin/<id>` record with this node's clock, as an operator command would.
    fn local_write(&mut self, i: usize) -> Result<(), Failure> {
        let n = self.nodes.len();
        let target = self.rng.index(n + EXTRA_IDS.len());
        let target = if target < n {
            node_id(target)
        } else {
            EXTRA_IDS[target - n].to_string()
        };
        let stamp = self.stamp(i);
        let admin = match self.rng.below(4) {
            0 => NodeAdmin {
                draining: Some(Lww::new(stamp, self.rng.below(2) == 0)),
                ..NodeAdmin::default()
            },
            1 => NodeAdmin {
                removed: Some(Lww::new(stamp, self.rng.below(2) == 0)),
                ..NodeAdmin::default()
            },
            2 => NodeAdmin {
                tags: Some(Lww::new(stamp, vec![format!("t{}", self.rng.below(5))])),
                ..NodeAdmin::default()
            },
            _ => NodeAdmin {
                slots: Some(Lww::new(stamp, self.rng.below(16) as u32)),
                ..NodeAdmin::default()
            },
        };
        self.stats.writes += 1;
        self.write(
            i,
            Key::Admin(target.to_string()).encode(),
            Record::Admin(admin),
        )
    }

    /// Apply a local change and gossip it to every peer.
    pub fn write(&mut self, i: usize, key: String, record: Record) -> Result<(), Failure> {
        trace!(self, "n{i} writes {key}");
        if let Err(err) = self.nodes[i].state.apply(&key, &record) {
            return Err(self.fail(format!("n{i} refused its own write of {key}: {err}")));
        }
        // The hybrid clock stamps a local write after everything the node holds (also after a
        // restart), so the write wins locally.
        if let (Record::Admin(written), Some(Record::Admin(stored))) =
            (&record, self.nodes[i].state.get(&key))
        {
            let effective = took_effect(&written.draining, &stored.draining)
                && took_effect(&written.removed, &stored.removed)
                && took_effect(&written.tags, &stored.tags)
                && took_effect(&written.slots, &stored.slots);
            if !effective {
                return Err(self.fail(format!(
                    "n{i}'s write {written:?} of {key} lost to the older {stored:?}"
                )));
            }
        }
        for j in 0..self.nodes.len() {
            if j != i {
                self.send(i, j, Payload::Delta(key.clone(), Box::new(record.clone())));
            }
        }
        // The simulation's job ids are short, not ULIDs: match the kind by its prefix.
        if let Some(id) = key.strip_prefix(Key::JOB_PREFIX) {
            self.job_changed(i, id)?;
        }
        Ok(())
    }

    /// Merge a record received from a peer (unless the node's checks refuse it).
    pub fn merge(&mut self, i: usize, key: &str, record: &Record) -> Result<(), Failure> {
        let now = self.wall(i);
        if let Some(election) = self.nodes[i].election.as_ref() {
            // As the runtime does: a record naming an epoch the election does not back is
            // refused (an honest one comes again with anti-entropy once the election caught up).
            let backed = match record {
                Record::Master(MaxReg(info)) => election.vouches_for(info.epoch, &info.master),
                Record::Job(job) => {
                    let assigned = job.assignment.as_ref().map_or(0, |a| a.0.epoch);
                    assigned.max(job.progress.0.assignment.0) <= election.term()
                }
                _ => true,
            };
            if !backed {
                self.stats.refused_records += 1;
                return Ok(());
            }
        }
        let node = &mut self.nodes[i];
        node.hlc.observe(record.latest_hlc(), now);
        let changed = match node.state.apply(key, record) {
            Ok(changed) => changed.is_some(),
            Err(err) => return Err(self.fail(format!("n{i} refused a peer's {key}: {err}"))),
        };
        match key.strip_prefix(Key::JOB_PREFIX) {
            Some(id) if changed => self.job_changed(i, id),
            _ => Ok(()),
        }
    }

    pub fn crash(&mut self, i: usize, down: u64) {
        self.stats.crashes += 1;
        trace!(self, "-- n{i} crashes for {down} ms");
        let now = self.now;
        let node = &mut self.nodes[i];
        node.clock.thaw(now);
        node.election = None;
        node.incarnation += 1;
        node.paused_until = 0;
        node.frozen_until = 0;
        let incarnation = node.incarnation;
        self.kill_runs(i);
        self.schedule(
            down,
            Event::Restart {
                node: i,
                incarnation,
            },
        );
    }

    /// Rebuild a node from exactly what it persisted; its jobs that were active here are lost.
    pub fn restart(&mut self, i: usize) -> Result<(), Failure> {
        let seed = self.rng.next_u64();
        let (wall, mono) = (self.wall(i), self.mono(i));
        let n = self.nodes.len();
        let node = &mut self.nodes[i];
        node.incarnation += 1;
        node.paused_until = 0;
        node.frozen_until = 0;
        node.election = Some(Election::new(
            node.id.clone(),
            node.persisted.clone(),
            Timing::default(),
            true,
            mono,
            seed,
        ));
        let newest = node
            .state
            .iter()
            .map(|(_, record)| record.latest_hlc())
            .max()
            .unwrap_or_default();
        node.hlc = HlcClock::starting_after(newest);
        node.duties = master_duties();
        node.started_wall = wall;
        node.dispatcher = Dispatcher::default();
        node.pending.clear();
        node.refused.clear();
        node.heard = vec![None; n];
        node.lease_clock = crate::clock::LeaseClock::new(crate::clock::jump_threshold_ms());
        trace!(
            self,
            "-- n{i} restarts from t{} {}",
            self.nodes[i].persisted.term,
            show_config(&self.nodes[i].persisted.membership)
        );
        let jobs: Vec<_> = self.nodes[i].state.all_jobs().cloned().collect();
        let me = self.nodes[i].id.clone();
        for job in jobs {
            let lost = {
                let mut stamp = || self.stamp(i);
                lost_at_restart(&job, &me, wall, &mut stamp)
            };
            if let Some(record) = lost {
                self.stats.lost_attempts += 1;
                trace!(self, "n{i} lost its run of {} at restart", job.spec.id);
                self.write(
                    i,
                    Key::Job(job.spec.id.to_string()).encode(),
                    Record::Job(Box::new(record)),
                )?;
            }
        }
        Ok(())
    }
}
