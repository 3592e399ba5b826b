//! Duties of the node that holds the lease: the lease record and the voter set; and every
//! node's own record.

use super::liveness;
use super::{unix_ms, Mesh, RECORD_REFRESH_EVERY_MS, VOTER_CHANGE_SETTLE_MS};
use crate::proto::crdt::{Lww, MaxReg};
use crate::proto::records::{Key, MasterInfo, NodeInfo, Record};
use crate::proto::voters::{desired_voters, Candidate};

impl Mesh {
    /// Record (once per epoch and voter configuration) that we hold the lease.
    pub(super) fn publish_lease(&mut self, now: u64) {
        let term = self.election.term();
        let membership = self.election.membership().clone();
        if self.master_written != Some((term, membership.index)) {
            let since_ms = unix_ms()
                .saturating_sub(now.saturating_sub(self.election.leader_since().unwrap_or(now)));
            let record = Record::Master(MaxReg(MasterInfo {
                epoch: term,
                config_index: membership.index,
                master: self.id.clone(),
                since_ms,
                voters: membership.all_voters(),
            }));
            if self.commit_local("master".into(), record).is_ok() {
                self.master_written = Some((term, membership.index));
            }
        }
    }

    /// Move the voters towards 1, 3 or 5 live master-eligible nodes.
    pub(super) fn manage_voters(&mut self, now: u64) {
        let membership = self.election.membership().clone();
        let settled = self
            .election
            .leader_since()
            .is_some_and(|since| now >= since + VOTER_CHANGE_SETTLE_MS);
        if settled && self.election.can_change_voters(now) {
            let candidates = self.voter_candidates(now);
            if let Some(voters) = desired_voters(&membership.voters, &self.id, &candidates) {
                tracing::info!(?voters, "changing voters");
                match self.election.change_voters(voters, now) {
                    Ok(actions) => self.execute(actions),
                    Err(e) => tracing::debug!("voter change not started: {e}"),
                }
            }
        }
    }

    pub(super) fn voter_candidates(&self, now: u64) -> Vec<Candidate> {
        self.replica
            .state()
            .with_prefix("node/")
            .filter_map(|(_, record)| match record {
                Record::Node(info) => Some(&info.value),
                _ => None,
            })
            .map(|info| {
                // An acknowledged heartbeat is a sign of life too (gossip may be what is lost).
                let acked = self.election.acked_at(&info.id);
                let acked_within = |window: u64| acked.is_some_and(|at| at + window >= now);
                let me = info.id == self.id;
                Candidate {
                    id: info.id.clone(),
                    eligible: info.master_eligible && !self.admin_flag(&info.id, |a| &a.removed),
                    online: me
                        || self.liveness.is_online(&info.id, now)
                        || acked_within(liveness::ONLINE_WINDOW_MS),
                    recently_seen: me
                        || self.liveness.recently_seen(&info.id, now)
                        || acked_within(liveness::VOTER_GRACE_MS),
                }
            })
            .collect()
    }

    pub(super) fn own_info(&self) -> NodeInfo {
        let m = &self.config.machine;
        NodeInfo {
            id: self.id.clone(),
            name: self.config.name.clone(),
            tags: self.own_settings.tags.clone(),
            slots: self.own_settings.slots,
            settings_stamp: self.own_settings.stamp.clone(),
            master_eligible: self.config.master_eligible,
            os: m.os.clone(),
            arch: m.arch.clone(),
            cpus: m.cpus,
            memory_bytes: m.memory_bytes,
            gpus: m.gpus.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            addrs: self
                .listen_addrs
                .iter()
                .take(16)
                .map(|a| a.to_string())
                .collect(),
            api_url: self.config.api_url.clone(),
            started_at_ms: self.started_unix_ms,
            heartbeat_ms: unix_ms(),
            agents: self.config.runner.agents.names(),
            local_repos: self.config.runner.repos.allow_local,
            extra: Default::default(),
        }
    }

    pub(super) fn write_own_record(&mut self) {
        self.own_record_dirty = false;
        self.next_record_refresh = self.now() + RECORD_REFRESH_EVERY_MS;
        let stamp = self.stamp();
        let record = Record::Node(Lww::new(stamp, self.own_info()));
        let key = Key::Node(self.id.clone()).encode();
        if let Err(e) = self.commit_local(key, record) {
            tracing::warn!("cannot write own node record: {e}");
        }
    }
}
