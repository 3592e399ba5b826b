//! Duties of the node that holds the lease: the lease record and the voter set; and every
//! node's own record.

use super::liveness;
use super::{unix_ms, Mesh, RECORD_REFRESH_EVERY_MS};
use crate::proto::crdt::{Lww, MaxReg};
use crate::proto::lookup::RecordLookup;
use crate::proto::records::{Key, NodeInfo, Record};
use crate::proto::voters::Candidate;

impl Mesh {
    /// Record (once per epoch and voter configuration) that we hold the lease.
    pub(super) fn publish_lease(&mut self, now: u64) {
        let since_ms = unix_ms()
            .saturating_sub(now.saturating_sub(self.election.leader_since().unwrap_or(now)));
        let Some(info) = self.duties.lease_record(&self.election, since_ms) else {
            return;
        };
        let record = Record::Master(MaxReg(info.clone()));
        if self.commit_local(Key::Master.encode(), record).is_ok() {
            self.duties.lease_written(&info);
        }
    }

    /// Move the voters towards 1, 3 or 5 live master-eligible nodes.
    pub(super) fn manage_voters(&mut self, now: u64) {
        if !self.duties.may_change_voters(&self.election, now) {
            return;
        }
        let candidates = self.voter_candidates(now);
        if let Some(voters) = self.duties.voter_change(&self.election, now, &candidates) {
            tracing::info!(?voters, "changing voters");
            match self.election.change_voters(voters, now) {
                Ok(actions) => self.execute(actions),
                Err(e) => tracing::debug!("voter change not started: {e}"),
            }
        }
    }

    pub(super) fn voter_candidates(&self, now: u64) -> Vec<Candidate> {
        self.replica
            .all_nodes()
            .map(|info| &info.value)
            .map(|info| {
                // An acknowledged heartbeat is a sign of life too (gossip may be what is lost).
                let acked = self.election.acked_at(&info.id);
                let acked_within = |window: u64| acked.is_some_and(|at| at + window >= now);
                let me = info.id == self.id;
                Candidate {
                    id: info.id.clone(),
                    eligible: info.master_eligible && !self.admin_flag(&info.id, |a| &a.removed),
                    online: me
                        || self.peers.liveness().is_online(&info.id, now)
                        || acked_within(liveness::ONLINE_WINDOW_MS),
                    recently_seen: me
                        || self.peers.liveness().recently_seen(&info.id, now)
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
