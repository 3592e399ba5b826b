//! The node's side of the read views (the facts it publishes with each snapshot, the
//! master rule applied to live state), the join ticket, and operator actions on nodes.

use std::str::FromStr;

use libp2p::{Multiaddr, PeerId};

use super::read;
use super::snapshot::{LocalFacts, Snapshot};
use super::views::{ActionError, NodeAction, NodeView};
use super::{unix_ms, with_peer, Mesh, Shown, SNAPSHOT_EVERY_MS};
use crate::proto::crdt::{Lww, NodeId};
use crate::proto::lookup::RecordLookup;
use crate::proto::records::{validate_tag, Key, NodeAdmin, Record, MAX_SLOTS};
use crate::ticket::{Ticket, MAX_TICKET_ADDRS};

impl Mesh {
    pub(super) fn ticket(&self) -> Ticket {
        let now = self.now();
        let mut addrs: Vec<Multiaddr> = self
            .listen_addrs
            .iter()
            .map(|a| with_peer(a, self.peer_id))
            .collect();
        for info in self.replica.all_nodes().map(|info| &info.value) {
            if info.id == self.id || !self.peers.liveness().is_online(&info.id, now) {
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
        addrs.truncate(MAX_TICKET_ADDRS);
        Ticket {
            mesh_key: self.config.mesh_key.clone(),
            addrs,
        }
    }

    /// The master by the one rule of [`read::nodes::pick_master`], as of now.
    pub(super) fn status_master_id(&self, now: u64) -> Option<NodeId> {
        let record = self.replica.master().map(|m| &m.master);
        read::nodes::pick_master(
            &self.id,
            self.election.is_master(now),
            self.election.leader(),
            record,
            |id| self.peers.liveness().is_online(id, now),
        )
    }

    /// A snapshot of the current state (not published): what the views read.
    pub(super) fn view(&self) -> Snapshot {
        self.replica.snapshots().build(self.local_facts())
    }

    /// What this node knows beyond the records, as of now.
    pub(super) fn local_facts(&self) -> LocalFacts {
        let now = self.now();
        LocalFacts {
            id: self.id.clone(),
            name: self.config.name.clone(),
            mesh_id: self.config.mesh_id.clone(),
            at: now,
            at_unix: unix_ms(),
            master_until_unix: self
                .election
                .lease_expires_at(now)
                .map(|until| unix_ms().saturating_add(until.saturating_sub(now))),
            leader: self.election.leader().cloned(),
            term: self.election.term(),
            voters: self.election.membership().all_voters(),
            liveness: self.peers.liveness().clone(),
            connected: self.peers.connected_count(),
            listen_addrs: self
                .listen_addrs
                .iter()
                .map(|a| with_peer(a, self.peer_id).to_string())
                .collect(),
            log_dir: self.config.runner.log_dir.clone(),
            stream: self.started_unix_ms,
        }
    }

    /// Publish a snapshot when something changed, and at least every
    /// [`SNAPSHOT_EVERY_MS`] (liveness and the lease age without record changes). Nodes
    /// that went online or offline and a change of master are reported on the feed.
    pub(super) fn publish_snapshot(&mut self, force: bool) {
        let now = self.now();
        if !force && !self.replica.snapshots().is_dirty() && now < self.next_snapshot {
            return;
        }
        self.next_snapshot = now + SNAPSHOT_EVERY_MS;
        let mut snapshot = self.view();
        let online = read::nodes::online_nodes(&snapshot);
        let master = read::nodes::master_of(&snapshot);
        let flipped: Vec<NodeId> = online
            .symmetric_difference(&self.shown.online)
            .cloned()
            .collect();
        let master_changed = master != self.shown.master;
        if !flipped.is_empty() || master_changed {
            for id in &flipped {
                self.replica
                    .snapshots_mut()
                    .touch(&Key::Node(id.clone()).encode());
            }
            if master_changed {
                self.replica.snapshots_mut().touch(&Key::Master.encode());
                // The old and the new master's `is_master` changed too.
                for id in self.shown.master.iter().chain(master.iter()) {
                    self.replica
                        .snapshots_mut()
                        .touch(&Key::Node(id.clone()).encode());
                }
            }
            snapshot = self.view();
            self.shown = Shown { online, master };
        }
        self.replica.snapshots_mut().publish(snapshot);
    }

    pub(super) fn node_action(
        &mut self,
        target: &str,
        action: NodeAction,
    ) -> Result<NodeView, ActionError> {
        let id = read::nodes::resolve_node(&self.view(), target)?;
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
                self.peers.reset_backoff(&peer);
            }
        }
        read::nodes::node_by_id(&self.view(), &id).ok_or(ActionError::NotFound(id))
    }
}
