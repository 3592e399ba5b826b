//! Node and status views over a [`Snapshot`], and the one rule for who is master.

use std::collections::BTreeSet;

use crate::mesh::snapshot::Snapshot;
use crate::mesh::views::{ActionError, MasterView, MemberCount, NodeView, StatusView};
use crate::proto::crdt::{Lww, NodeId};
use crate::proto::lookup::RecordLookup;
use crate::proto::records::{NodeAdmin, NodeInfo};

/// Who is master as a node sees it: itself while it holds the lease, else the leader its
/// election heard from, else the lease record's holder, as long as that node is online.
/// Every view and every decision that names the master uses this rule.
pub fn pick_master(
    me: &NodeId,
    holds_lease: bool,
    leader: Option<&NodeId>,
    record_holder: Option<&NodeId>,
    online: impl Fn(&NodeId) -> bool,
) -> Option<NodeId> {
    if holds_lease {
        return Some(me.clone());
    }
    let other_online = |id: &&NodeId| *id != me && online(id);
    leader
        .filter(other_online)
        .or(record_holder.filter(other_online))
        .cloned()
}

/// The master of [`pick_master`] in `snap`.
pub fn master_of(snap: &Snapshot) -> Option<NodeId> {
    let local = snap.local();
    pick_master(
        &local.id,
        local.is_master_now(),
        local.leader.as_ref(),
        snap.master().map(|r| &r.master),
        |id| local.liveness.is_online(id, local.at),
    )
}

/// The voters as the newest lease record says (every node has it), or as this node's own
/// configuration says when that is newer or no record exists yet.
pub fn displayed_voters(snap: &Snapshot) -> BTreeSet<NodeId> {
    match snap.master() {
        Some(r) if r.epoch >= snap.local().term => r.voters.clone(),
        _ => snap.local().voters.clone(),
    }
}

/// `GET /api/v1/status`.
pub fn status(snap: &Snapshot) -> StatusView {
    let local = snap.local();
    let record = snap.master();
    let master = master_of(snap);
    let since = master
        .as_ref()
        .and_then(|m| record.filter(|r| &r.master == m))
        .map(|r| r.since_ms);
    let nodes = node_views(snap);
    let members = MemberCount {
        online: nodes.iter().filter(|n| n.online && !n.removed).count(),
        total: nodes.iter().filter(|n| !n.removed).count(),
    };
    let master_name = master
        .as_ref()
        .and_then(|m| nodes.iter().find(|n| &n.id == m))
        .map(|n| n.name.clone());
    StatusView {
        node_id: local.id.clone(),
        name: local.name.clone(),
        mesh_id: local.mesh_id.clone(),
        master,
        master_name,
        master_since_ms: since,
        epoch: local.term.max(record.map_or(0, |r| r.epoch)),
        is_master: local.is_master_now(),
        voters: displayed_voters(snap).into_iter().collect(),
        members,
        peers_connected: local.connected,
        listen_addrs: local.listen_addrs.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Who is master (the `master` event of the change feed).
pub fn master_view(snap: &Snapshot) -> MasterView {
    let status = status(snap);
    MasterView {
        master: status.master,
        master_name: status.master_name,
        epoch: status.epoch,
        since_ms: status.master_since_ms,
        voters: status.voters,
    }
}

fn node_infos(snap: &Snapshot) -> impl Iterator<Item = &NodeInfo> {
    snap.all_nodes().map(|info| &info.value)
}

/// All nodes, by name.
pub fn node_views(snap: &Snapshot) -> Vec<NodeView> {
    let master = master_of(snap);
    let voters = displayed_voters(snap);
    let mut views: Vec<NodeView> = node_infos(snap)
        .map(|info| node_view(snap, info, master.as_ref(), &voters))
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    views
}

/// The node with id `id`.
pub fn node_by_id(snap: &Snapshot, id: &str) -> Option<NodeView> {
    let info = snap.node(id)?;
    let master = master_of(snap);
    Some(node_view(
        snap,
        &info.value,
        master.as_ref(),
        &displayed_voters(snap),
    ))
}

/// Operator decisions about node `id`.
pub fn admin<'a>(snap: &'a Snapshot, id: &str) -> Option<&'a NodeAdmin> {
    snap.admin(id)
}

/// Whether the operator flag `field` of node `id` is set.
pub fn admin_flag(
    snap: &Snapshot,
    id: &str,
    field: impl Fn(&NodeAdmin) -> &Option<Lww<bool>>,
) -> bool {
    admin(snap, id)
        .and_then(|a| field(a).as_ref())
        .is_some_and(|l| l.value)
}

/// Whether node `id` is online as of the snapshot (this node always is).
pub fn is_online(snap: &Snapshot, id: &str) -> bool {
    let local = snap.local();
    id == local.id || local.liveness.is_online(id, local.at)
}

/// One node's view.
pub fn node_view(
    snap: &Snapshot,
    info: &NodeInfo,
    master: Option<&NodeId>,
    voters: &BTreeSet<NodeId>,
) -> NodeView {
    let local = snap.local();
    let admin = admin(snap, &info.id);
    let tags = match admin.and_then(|a| a.tags.as_ref()) {
        Some(t) if t.stamp > info.settings_stamp => t.value.clone(),
        _ => info.tags.clone(),
    };
    let slots = match admin.and_then(|a| a.slots.as_ref()) {
        Some(s) if s.stamp > info.settings_stamp => s.value,
        _ => info.slots,
    };
    let removed = admin_flag(snap, &info.id, |a| &a.removed);
    let draining = admin_flag(snap, &info.id, |a| &a.draining);
    let online = !removed && is_online(snap, &info.id);
    let state = match (removed, online, draining) {
        (true, _, _) => "removed",
        (_, false, _) => "offline",
        (_, true, true) => "draining",
        _ => "online",
    };
    let last_seen_ms = if info.id == local.id {
        local.at_unix
    } else {
        local
            .liveness
            .last_heard_unix(&info.id, local.at, local.at_unix)
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
pub fn node_name(snap: &Snapshot, id: &str) -> Option<String> {
    snap.node(id).map(|info| info.value.name.clone())
}

/// The node with id or name `target`; a name several nodes carry is refused.
pub fn resolve_node(snap: &Snapshot, target: &str) -> Result<NodeId, ActionError> {
    let mut by_name = Vec::new();
    for info in node_infos(snap) {
        if info.id == target {
            return Ok(info.id.clone());
        }
        if info.name == target {
            by_name.push(info.id.clone());
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

/// The nodes that are online as of the snapshot (this node included).
pub fn online_nodes(snap: &Snapshot) -> BTreeSet<NodeId> {
    node_infos(snap)
        .filter(|info| is_online(snap, &info.id))
        .map(|info| info.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_is_this_node_then_the_live_leader_then_the_live_record_holder() {
        let (me, b, c) = ("a".to_string(), "b".to_string(), "c".to_string());
        let all_online = |_: &NodeId| true;
        let none_online = |_: &NodeId| false;
        assert_eq!(
            pick_master(&me, true, Some(&b), Some(&c), none_online),
            Some(me.clone())
        );
        assert_eq!(
            pick_master(&me, false, Some(&b), Some(&c), all_online),
            Some(b.clone())
        );
        let only_c = |id: &NodeId| id == "c";
        assert_eq!(
            pick_master(&me, false, Some(&b), Some(&c), only_c),
            Some(c.clone())
        );
        assert_eq!(
            pick_master(&me, false, Some(&b), Some(&c), none_online),
            None
        );
        // Never this node on a lapsed lease, whatever the record says.
        assert_eq!(
            pick_master(&me, false, Some(&me), Some(&me), all_online),
            None
        );
    }
}
