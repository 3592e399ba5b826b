//! The mesh task's network side: connections, gossip, requests from peers, outbound requests
//! and their answers, election actions, and redialling known peers.

use std::collections::HashMap;
use std::str::FromStr;

use libp2p::{Multiaddr, PeerId};

use super::{peer_of, Input, Mesh, Purpose};
use crate::metrics::Metrics;
use crate::net;
use crate::proto::election::Action;
use crate::proto::lookup::RecordLookup;
use crate::wire::{Gossip, Request, Response, MAX_PAGE_BYTES, MAX_RECORDS_PER_MESSAGE};

use super::ELECTION_META;

impl Mesh {
    pub(super) fn redial_known_peers(&mut self, now: u64) {
        let mut targets: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for addr in &self.bootstrap {
            if let Some(peer) = peer_of(addr) {
                targets.entry(peer).or_default().push(addr.clone());
            }
        }
        for info in self.replica.all_nodes() {
            if let Ok(peer) = PeerId::from_str(&info.value.id) {
                let addrs = info.value.addrs.iter().filter_map(|a| a.parse().ok());
                targets.entry(peer).or_default().extend(addrs);
            }
        }
        for (peer, addrs) in targets {
            if peer == self.peer_id
                || addrs.is_empty()
                || self.admin_flag(&peer.to_string(), |a| &a.removed)
            {
                continue;
            }
            if self.peers.should_dial(peer, now) {
                self.client.dial(Some(peer), addrs);
            }
        }
    }

    pub(super) fn on_net(&mut self, event: net::Event) {
        let now = self.now();
        match event {
            net::Event::Listening(addr) => {
                tracing::info!("listening on {addr}");
                self.listen_addrs.push(addr);
                self.own_record_dirty = true;
            }
            net::Event::Connected { peer, .. } => {
                if self.admin_flag(&peer.to_string(), |a| &a.removed) {
                    tracing::info!("refusing removed node {peer}");
                    self.client.disconnect(peer);
                    return;
                }
                self.peers.connected(peer, now);
                self.refresh_learners();
                self.start_sync(peer);
            }
            net::Event::Disconnected(peer) => {
                self.peers.disconnected(&peer);
                self.refresh_learners();
            }
            net::Event::PeerAddrs { .. } => {}
            net::Event::Gossip { source, data } => self.on_gossip(source, &data, now),
            net::Event::Request {
                peer,
                request,
                channel,
            } => match request {
                // File I/O runs on a blocking task, never on the mesh task.
                Request::Log { .. } | Request::StoreLog { .. } => {
                    let work = self.log_request(peer, request, now);
                    let client = self.client.clone();
                    tokio::task::spawn_blocking(move || client.respond(channel, work()));
                }
                request => {
                    let response = self.on_request(peer, request, now);
                    self.client.respond(channel, response);
                }
            },
        }
    }

    pub(super) fn on_gossip(&mut self, source: PeerId, data: &[u8], now: u64) {
        if self.admin_flag(&source.to_string(), |a| &a.removed) {
            Metrics::inc(&self.metrics.gossip_dropped);
            return;
        }
        let gossip = match Gossip::decode(data) {
            Ok(g) => g,
            Err(e) => {
                Metrics::inc(&self.metrics.gossip_dropped);
                tracing::debug!("dropped gossip from {source}: {e}");
                return;
            }
        };
        Metrics::inc(&self.metrics.gossip_in);
        match gossip {
            Gossip::Heartbeat { node, .. } => {
                if node == source.to_string() {
                    self.peers.heard(&node, now);
                } else {
                    Metrics::inc(&self.metrics.gossip_dropped);
                }
            }
            Gossip::Delta(records) => {
                self.peers.heard(&source.to_string(), now);
                self.apply_remote(records);
            }
        }
    }

    pub(super) fn on_request(&mut self, peer: PeerId, request: Request, now: u64) -> Response {
        if self.admin_flag(&peer.to_string(), |a| &a.removed) {
            return Response::Refused("this node was removed from the mesh".into());
        }
        if let Err(e) = request.check() {
            Metrics::inc(&self.metrics.wire_dropped);
            return Response::Refused(e);
        }
        self.peers.heard(&peer.to_string(), now);
        match request {
            Request::Election(msg) => {
                let from = peer.to_string();
                if let Err(why) = self.election.admits(&from, &msg) {
                    Metrics::inc(&self.metrics.wire_dropped);
                    return Response::Refused(why.to_string());
                }
                let term = self.election.term();
                let actions = self.election.step(&from, msg, now);
                if self.election.term() > term {
                    // Records of the new term may have been refused while this node had not
                    // heard of it: fetch them now rather than at the next periodic round.
                    self.start_sync(peer);
                }
                let (replies, rest): (Vec<Action>, Vec<Action>) = actions
                    .into_iter()
                    .partition(|a| matches!(a, Action::Send { to, .. } if to == &from));
                // Persist first: a vote must be durable before the candidate learns of it.
                self.execute(rest);
                let replies = replies
                    .into_iter()
                    .filter_map(|a| match a {
                        Action::Send { msg, .. } => Some(msg),
                        Action::Persist(_) => None,
                    })
                    .collect();
                Response::Election(replies)
            }
            Request::SyncBuckets(theirs) => {
                Response::SyncDiffering(self.replica.state().differing_buckets(&theirs))
            }
            Request::SyncDigests { buckets, entries } => {
                let r = self.replica.state().reconcile(
                    &buckets,
                    &entries,
                    MAX_RECORDS_PER_MESSAGE,
                    MAX_PAGE_BYTES,
                    // A random first record: see `reconcile`.
                    rand::random(),
                );
                Response::SyncRecords {
                    records: r.records,
                    want: r.want,
                    more: r.more,
                }
            }
            Request::Assign(record) => self.accept_assignment(&record, &peer.to_string()),
            Request::Commit(record) => self.judge_commit(&peer.to_string(), &record),
            Request::ReadAccepted { term } => self.answer_read(&peer.to_string(), term),
            Request::Log { .. } | Request::StoreLog { .. } => {
                Response::Refused("log requests are answered off the mesh task".into())
            }
            Request::SyncPush(records) => {
                let changed = self.apply_remote(records);
                self.metrics
                    .anti_entropy_records_received
                    .fetch_add(changed as u64, std::sync::atomic::Ordering::Relaxed);
                Response::Ack
            }
        }
    }

    /// Send a request and route its answer back into this task.
    pub(super) fn send(&self, peer: PeerId, request: Request, purpose: Purpose) {
        let rx = self.client.request(peer, request);
        let inputs = self.inputs_tx.clone();
        tokio::spawn(async move {
            let result = rx.await.unwrap_or_else(|_| Err("network stopped".into()));
            let _ = inputs.send(Input::RpcDone {
                peer,
                purpose,
                result,
            });
        });
    }

    pub(super) fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Persist(hard) => {
                    if let Err(e) = self.replica.store().put_meta(ELECTION_META, &hard) {
                        // Never act on a vote or term we could not persist.
                        tracing::error!("cannot persist election state: {e}; stopping");
                        std::process::exit(70);
                    }
                }
                Action::Send { to, msg } => match PeerId::from_str(&to) {
                    Ok(peer) => self.send(peer, Request::Election(msg), Purpose::Election),
                    Err(_) => tracing::warn!("election message for invalid peer id {to}"),
                },
            }
        }
    }

    pub(super) fn on_rpc_done(
        &mut self,
        peer: PeerId,
        purpose: Purpose,
        result: Result<Response, String>,
    ) {
        match (purpose, result) {
            (purpose @ Purpose::Assign { .. }, result) => {
                self.on_assign_answer(peer, purpose, result)
            }
            (purpose @ Purpose::Commit { .. }, result) => {
                self.on_commit_answer(peer, purpose, result)
            }
            (purpose @ Purpose::Read { .. }, result) => self.on_read_answer(peer, purpose, result),
            (Purpose::Election, Ok(Response::Election(replies))) => {
                if replies.len() > 8 {
                    Metrics::inc(&self.metrics.wire_dropped);
                    return;
                }
                let from = peer.to_string();
                for msg in replies {
                    let now = self.now();
                    if self.election.admits(&from, &msg).is_err() {
                        Metrics::inc(&self.metrics.wire_dropped);
                        continue;
                    }
                    let actions = self.election.step(&from, msg, now);
                    self.execute(actions);
                }
            }
            (Purpose::Election | Purpose::SyncPush, _) => {}
            (_, Err(e)) => {
                tracing::debug!("anti-entropy with {peer} failed: {e}");
                self.peers.end_sync(&peer);
            }
            (_, Ok(response)) => self.on_sync_response(peer, response),
        }
    }
}
