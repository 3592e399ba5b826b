//! What the API reads about the mesh: this node's status, the node views, the join ticket,
//! and operator actions on nodes.

use std::collections::BTreeSet;
use std::str::FromStr;

use libp2p::{Multiaddr, PeerId};

use super::views::{ActionError, MemberCount, NodeAction, NodeView, StatusView};
use super::{unix_ms, with_peer, Mesh};
use crate::proto::crdt::{Lww, NodeId};
use crate::proto::records::{
    validate_tag, Key, MasterInfo, NodeAdmin, NodeInfo, Record, MAX_SLOTS,
};
use crate::ticket::{Ticket, MAX_TICKET_ADDRS};

impl Mesh {
    pub(super) fn ticket(&self) -> Ticket {
        let now = self.now();
        let mut addrs: Vec<Multiaddr> = self
            .listen_addrs
            .iter()
            .map(|a| with_peer(a, self.peer_id))
            .collect();
        for (_, record) in self.state.with_prefix("node/") {
            if let Record::Node(info) = record {
                let info = &info.value;
                if info.id == self.id || !self.liveness.is_online(&info.id, now) {
                    continue;
                }
                if let Ok(peer) = PeerId::from_str(&info.id) {
                    let theirs = info
                        .addrs
                        .iter()
                        .filter_map(|a| a.parse::<Multiaddr>().ok());
                    addrs.extend(theirs.take(2).map(|a| with_peer(&a, peer)));
                }
            }
        }
        addrs.truncate(MAX_TICKET_ADDRS);
        Ticket {
            mesh_key: self.config.mesh_key.clone(),
            addrs,
        }
    }

    pub(super) fn master_record(&self) -> Option<&MasterInfo> {
        match self.state.get("master") {
            Some(Record::Master(m)) => Some(&m.0),
            _ => None,
        }
    }

    /// The voters as the newest lease record says (every node has it), or as our own
    /// configuration says when that is newer or no record exists yet.
    pub(super) fn displayed_voters(&self) -> BTreeSet<NodeId> {
        match self.master_record() {
            Some(r) if r.epoch >= self.election.term() => r.voters.clone(),
            _ => self.election.membership().all_voters(),
        }
    }

    pub(super) fn status_view(&self) -> StatusView {
        let now = self.now();
        let is_master = self.election.is_master(now);
        let record = self.master_record();
        let (master, since) = if is_master {
            (
                Some(self.id.clone()),
                record.filter(|r| r.master == self.id).map(|r| r.since_ms),
            )
        } else {
            // Another node's claim, as long as it is alive; never our own lapsed lease.
            match (self.election.leader(), record) {
                (Some(leader), _) if leader != &self.id && self.liveness.is_online(leader, now) => {
                    let since = record.filter(|r| &r.master == leader).map(|r| r.since_ms);
                    (Some(leader.clone()), since)
                }
                (_, Some(r)) if r.master != self.id && self.liveness.is_online(&r.master, now) => {
                    (Some(r.master.clone()), Some(r.since_ms))
                }
                _ => (None, None),
            }
        };
        let epoch = self.election.term().max(record.map_or(0, |r| r.epoch));
        let nodes = self.node_views();
        let members = MemberCount {
            online: nodes.iter().filter(|n| n.online && !n.removed).count(),
            total: nodes.iter().filter(|n| !n.removed).count(),
        };
        let master_name = master
            .as_ref()
            .and_then(|m| nodes.iter().find(|n| &n.id == m))
            .map(|n| n.name.clone());
        let voters = self.displayed_voters().into_iter().collect();
        StatusView {
            node_id: self.id.clone(),
            name: self.config.name.clone(),
            mesh_id: self.config.mesh_id.clone(),
            master,
            master_name,
            master_since_ms: since,
            epoch,
            is_master,
            voters,
            members,
            peers_connected: self.connected.len(),
            listen_addrs: self
                .listen_addrs
                .iter()
                .map(|a| with_peer(a, self.peer_id).to_string())
                .collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    pub(super) fn node_views(&self) -> Vec<NodeView> {
        let now = self.now();
        let master = self.status_master_id(now);
        let voters = self.displayed_voters();
        let mut views: Vec<NodeView> = self
            .state
            .with_prefix("node/")
            .filter_map(|(_, r)| match r {
                Record::Node(info) => {
                    Some(self.node_view(&info.value, now, master.as_ref(), &voters))
                }
                _ => None,
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        views
    }

    /// The master as this node knows it: itself while it holds the lease, else the leader its
    /// election heard from (voters and learners alike), else the lease record's holder, as long
    /// as that node is online.
    pub(super) fn status_master_id(&self, now: u64) -> Option<NodeId> {
        if self.election.is_master(now) {
            return Some(self.id.clone());
        }
        let online = |id: &NodeId| id != &self.id && self.liveness.is_online(id, now);
        if let Some(leader) = self.election.leader().filter(|l| online(l)) {
            return Some(leader.clone());
        }
        self.master_record()
            .filter(|r| online(&r.master))
            .map(|r| r.master.clone())
    }

    pub(super) fn node_view(
        &self,
        info: &NodeInfo,
        now: u64,
        master: Option<&NodeId>,
        voters: &BTreeSet<NodeId>,
    ) -> NodeView {
        let admin = self.admin(&info.id);
        let tags = match admin.and_then(|a| a.tags.as_ref()) {
            Some(t) if t.stamp > info.settings_stamp => t.value.clone(),
            _ => info.tags.clone(),
        };
        let slots = match admin.and_then(|a| a.slots.as_ref()) {
            Some(s) if s.stamp > info.settings_stamp => s.value,
            _ => info.slots,
        };
        let removed = self.admin_flag(&info.id, |a| &a.removed);
        let draining = self.admin_flag(&info.id, |a| &a.draining);
        let online = !removed && (info.id == self.id || self.liveness.is_online(&info.id, now));
        let state = match (removed, online, draining) {
            (true, _, _) => "removed",
            (_, false, _) => "offline",
            (_, true, true) => "draining",
            _ => "online",
        };
        let last_seen_ms = if info.id == self.id {
            unix_ms()
        } else {
            self.liveness
                .last_heard_unix(&info.id, now, unix_ms())
                .unwrap_or(info.heartbeat_ms)
        };
        NodeView {
            id: info.id.clone(),
            name: info.name.clone(),
            tags,
            slots,
            online,
            draining,
            removed,
            state,
            master_eligible: info.master_eligible,
            is_master: master == Some(&info.id),
            is_voter: voters.contains(&info.id),
            os: info.os.clone(),
            arch: info.arch.clone(),
            cpus: info.cpus,
            memory_bytes: info.memory_bytes,
            gpus: info.gpus.clone(),
            version: info.version.clone(),
            addrs: info.addrs.clone(),
            api_url: info.api_url.clone(),
            started_at_ms: info.started_at_ms,
            last_seen_ms,
            agents: info.agents.clone(),
            local_repos: info.local_repos,
        }
    }

    /// The name of node `id`, if its record is known.
    pub(super) fn node_name(&self, id: &str) -> Option<String> {
        match self.state.get(&Key::Node(id.to_string()).encode()) {
            Some(Record::Node(info)) => Some(info.value.name.clone()),
            _ => None,
        }
    }

    pub(super) fn resolve_node(&self, target: &str) -> Result<NodeId, ActionError> {
        let mut by_name = Vec::new();
        for (_, record) in self.state.with_prefix("node/") {
            if let Record::Node(info) = record {
                if info.value.id == target {
                    return Ok(info.value.id.clone());
                }
                if info.value.name == target {
                    by_name.push(info.value.id.clone());
                }
            }
        }
        match by_name.len() {
            1 => Ok(by_name.remove(0)),
            0 => Err(ActionError::NotFound(target.to_string())),
            _ => Err(ActionError::Invalid(format!(
                "several nodes are named {target:?}; use the node id"
            ))),
        }
    }

    pub(super) fn node_action(
        &mut self,
        target: &str,
        action: NodeAction,
    ) -> Result<NodeView, ActionError> {
        let id = self.resolve_node(target)?;
        let stamp = self.stamp();
        let flag = |v: bool| Some(Lww::new(stamp.clone(), v));
        let admin = match action {
            NodeAction::Drain => NodeAdmin {
                draining: flag(true),
                ..NodeAdmin::default()
            },
            NodeAction::Undrain => NodeAdmin {
                draining: flag(false),
                ..NodeAdmin::default()
            },
            NodeAction::Remove => {
                if id == self.id {
                    return Err(ActionError::Invalid(
                        "a node cannot remove itself; remove it from another node".into(),
                    ));
                }
                NodeAdmin {
                    removed: flag(true),
                    ..NodeAdmin::default()
                }
            }
            NodeAction::Admit => NodeAdmin {
                removed: flag(false),
                ..NodeAdmin::default()
            },
            NodeAction::Edit { tags, slots } => {
                if tags.is_none() && slots.is_none() {
                    return Err(ActionError::Invalid(
                        "nothing to change: give tags and/or slots".into(),
                    ));
                }
                if let Some(tags) = &tags {
                    if tags.len() > 32 {
                        return Err(ActionError::Invalid("at most 32 tags".into()));
                    }
                    for tag in tags {
                        validate_tag(tag).map_err(ActionError::Invalid)?;
                    }
                }
                if slots.is_some_and(|s| s > MAX_SLOTS) {
                    return Err(ActionError::Invalid(format!(
                        "slots must be at most {MAX_SLOTS}"
                    )));
                }
                NodeAdmin {
                    tags: tags.map(|t| Lww::new(stamp.clone(), t)),
                    slots: slots.map(|s| Lww::new(stamp.clone(), s)),
                    ..NodeAdmin::default()
                }
            }
        };
        let key = Key::Admin(id.clone()).encode();
        let record = Record::Admin(admin);
        self.commit_local(key, record)?;
        if let Ok(peer) = PeerId::from_str(&id) {
            if !self.admin_flag(&id, |a| &a.removed) {
                self.redial.remove(&peer);
            }
        }
        let now = self.now();
        let master = self.status_master_id(now);
        let voters = self.displayed_voters();
        match self.state.get(&Key::Node(id.clone()).encode()) {
            Some(Record::Node(info)) => {
                Ok(self.node_view(&info.value.clone(), now, master.as_ref(), &voters))
            }
            _ => Err(ActionError::NotFound(id)),
        }
    }
}
