//! The mesh runtime: one task that owns the replicated state, the store and the election, and
//! drives them from network events, API requests and timers.
//!
//! * Replication: every local change is applied, persisted, then gossiped as a delta; on every
//!   new connection and every few seconds with a random peer, anti-entropy compares summaries
//!   and pulls and pushes what differs ([`sync`]).
//! * Membership: node records are written by their owners; liveness comes from gossip
//!   heartbeats; operators drain, edit, remove and re-admit nodes through admin records.
//! * Election: [`crate::proto::election`] over request-response; the master writes the lease
//!   record and manages the voters.

pub mod handle;
pub mod jobs;
mod liveness;
pub mod runs;
mod scheduler;
mod sync;
pub mod views;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::net::{self, Client};
use crate::proto::crdt::{Lww, MaxReg, NodeId, Stamp};
use crate::proto::election::{Action, Election, HardState, Membership, Timing};
use crate::proto::hlc::HlcClock;
use crate::proto::records::{
    validate_tag, Key, MasterInfo, NodeAdmin, NodeInfo, Record, MAX_SLOTS,
};
use crate::proto::state::ReplicatedState;
use crate::proto::voters::{desired_voters, Candidate};
use crate::runner::{JobUpdate, RunHandle, RunnerConfig};
use crate::store::{Store, StoreError};
use crate::sysinfo::MachineInfo;
use crate::ticket::{Ticket, MAX_TICKET_ADDRS};
use crate::wire::{Gossip, Request, Response, MAX_RECORDS_PER_MESSAGE};

pub use handle::{ApiRequest, MeshHandle};
use liveness::Liveness;
pub use runs::LogSource;
use views::{ActionError, MemberCount, NodeAction, NodeView, StatusView};

const ELECTION_META: &str = "election";
const BOOTSTRAP_META: &str = "bootstrap_peers";
const SETTINGS_META: &str = "own_settings";
const HIGHEST_EPOCH_META: &str = "highest_epoch";
const TICK: Duration = Duration::from_millis(50);
const HEARTBEAT_EVERY_MS: u64 = 2_000;
const RECORD_REFRESH_EVERY_MS: u64 = 15_000;
const ANTI_ENTROPY_EVERY_MS: u64 = 5_000;
const REDIAL_EVERY_MS: u64 = 1_000;
const VOTER_CHANGE_SETTLE_MS: u64 = 5_000;
const VOTER_CHECK_EVERY_MS: u64 = 1_000;

/// How a node starts.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// Display name.
    pub name: String,
    /// Tags from the command line.
    pub tags: Vec<String>,
    /// Job slots from the command line.
    pub slots: u32,
    /// May hold the master lease.
    pub master_eligible: bool,
    /// Whether this node founds a new mesh (only voter at first).
    pub founding: bool,
    /// Peer addresses to dial at start (ticket and `--peer`).
    pub bootstrap: Vec<Multiaddr>,
    /// Base URL of this node's API.
    pub api_url: Option<String>,
    /// Public mesh id.
    pub mesh_id: String,
    /// Mesh key (for tickets).
    pub mesh_key: [u8; 32],
    /// Election timing.
    pub timing: Timing,
    /// Machine facts.
    pub machine: MachineInfo,
    /// How this node runs jobs.
    pub runner: Arc<RunnerConfig>,
    /// How many times the master re-queues a job whose node went offline.
    pub lost_requeues: u32,
}

/// Inputs of the mesh task.
#[derive(Debug)]
pub enum Input {
    /// From the network.
    Net(net::Event),
    /// From the API.
    Api(ApiRequest),
    /// An outbound request finished.
    RpcDone {
        /// The peer asked.
        peer: PeerId,
        /// Why we asked.
        purpose: Purpose,
        /// The answer.
        result: Result<Response, String>,
    },
    /// A job running here changed status.
    JobUpdate(JobUpdate),
    /// Stop.
    Shutdown,
}

/// Why an outbound request was sent (to route its answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A job assignment: which job, under which (epoch, seq).
    Assign {
        /// Job id.
        job: String,
        /// Assignment key.
        key: (u64, u64),
    },
    /// Election message: answer is only an acknowledgement.
    Election,
    /// Anti-entropy step 1.
    SyncBuckets,
    /// Anti-entropy step 2.
    SyncDigests,
    /// Anti-entropy push.
    SyncPush,
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct OwnSettings {
    tags: Vec<String>,
    slots: u32,
    stamp: Stamp,
}

/// The running mesh node.
pub struct Mesh {
    id: NodeId,
    peer_id: PeerId,
    config: MeshConfig,
    started: Instant,
    started_unix_ms: u64,
    state: ReplicatedState,
    store: Store,
    clock: HlcClock,
    election: Election,
    client: Client,
    metrics: Arc<Metrics>,
    liveness: Liveness,
    connected: BTreeSet<PeerId>,
    listen_addrs: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    own_settings: OwnSettings,
    own_record_dirty: bool,
    sync_sessions: HashMap<PeerId, u32>,
    redial: HashMap<PeerId, (u64, u64)>,
    master_written: Option<(u64, u64)>,
    inputs_tx: mpsc::UnboundedSender<Input>,
    inputs_rx: Option<mpsc::UnboundedReceiver<Input>>,
    next_heartbeat: u64,
    next_record_refresh: u64,
    next_anti_entropy: u64,
    next_redial: u64,
    next_voter_check: u64,
    next_schedule: u64,
    scheduler: scheduler::SchedulerState,
    highest_epoch: u64,
    runs: HashMap<String, (u32, (u64, u64), RunHandle)>,
    rng: u64,
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    if peer_of(addr).is_some() {
        addr.clone()
    } else {
        addr.clone().with(Protocol::P2p(peer))
    }
}

impl Mesh {
    /// Load state from the store and prepare the node. Call [`Mesh::run`] next.
    pub fn new(
        peer_id: PeerId,
        config: MeshConfig,
        store: Store,
        client: Client,
        metrics: Arc<Metrics>,
    ) -> Result<(Mesh, MeshHandle), StoreError> {
        let id = peer_id.to_string();
        let mut state = ReplicatedState::default();
        let mut clock = HlcClock::default();
        for (key, record) in store.load_records()? {
            clock.observe(record.latest_hlc(), unix_ms());
            if let Err(e) = state.apply(&key, &record) {
                tracing::warn!("ignoring stored record {key}: {e}");
            }
        }
        let hard = match store.get_meta::<HardState>(ELECTION_META)? {
            Some(hard) => hard,
            None => {
                let hard = HardState {
                    membership: if config.founding {
                        Membership::founding(&id)
                    } else {
                        Membership::default()
                    },
                    ..HardState::default()
                };
                store.put_meta(ELECTION_META, &hard)?;
                hard
            }
        };
        let mut bootstrap: Vec<Multiaddr> = store
            .get_meta::<Vec<String>>(BOOTSTRAP_META)?
            .unwrap_or_default()
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        for addr in &config.bootstrap {
            if !bootstrap.contains(addr) {
                bootstrap.push(addr.clone());
            }
        }
        bootstrap.truncate(64);
        let strings: Vec<String> = bootstrap.iter().map(|a| a.to_string()).collect();
        store.put_meta(BOOTSTRAP_META, &strings)?;

        let own_settings = match store.get_meta::<OwnSettings>(SETTINGS_META)? {
            Some(s) if s.tags == config.tags && s.slots == config.slots => s,
            _ => {
                let s = OwnSettings {
                    tags: config.tags.clone(),
                    slots: config.slots,
                    stamp: Stamp {
                        at: clock.tick(unix_ms()),
                        by: id.clone(),
                    },
                };
                store.put_meta(SETTINGS_META, &s)?;
                s
            }
        };
        let highest_epoch = store.get_meta::<u64>(HIGHEST_EPOCH_META)?.unwrap_or(0);
        let seed = u64::from_le_bytes(rand::random::<[u8; 8]>());
        let election = Election::new(
            id.clone(),
            hard,
            config.timing,
            config.master_eligible,
            0,
            seed,
        );
        let (inputs_tx, inputs_rx) = mpsc::unbounded_channel();
        let handle = MeshHandle {
            inputs: inputs_tx.clone(),
        };
        let mesh = Mesh {
            id,
            peer_id,
            config,
            started: Instant::now(),
            started_unix_ms: unix_ms(),
            state,
            store,
            clock,
            election,
            client,
            metrics,
            liveness: Liveness::default(),
            connected: BTreeSet::new(),
            listen_addrs: Vec::new(),
            bootstrap,
            own_settings,
            own_record_dirty: true,
            sync_sessions: HashMap::new(),
            redial: HashMap::new(),
            master_written: None,
            inputs_tx: inputs_tx.clone(),
            inputs_rx: Some(inputs_rx),
            next_heartbeat: 0,
            next_record_refresh: RECORD_REFRESH_EVERY_MS,
            next_anti_entropy: ANTI_ENTROPY_EVERY_MS,
            next_redial: 0,
            next_voter_check: 0,
            next_schedule: 0,
            scheduler: scheduler::SchedulerState::default(),
            highest_epoch,
            runs: HashMap::new(),
            rng: seed | 1,
        };
        Ok((mesh, handle))
    }

    /// Run until shutdown. `events` comes from [`net::build`].
    pub async fn run(mut self, mut events: mpsc::UnboundedReceiver<net::Event>) {
        let Some(mut inputs) = self.inputs_rx.take() else {
            return;
        };
        for addr in self.bootstrap.clone() {
            self.client.dial(peer_of(&addr), vec![addr]);
        }
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.on_tick(),
                Some(event) = events.recv() => self.on_net(event),
                input = inputs.recv() => match input {
                    Some(Input::Shutdown) | None => break,
                    Some(Input::Net(event)) => self.on_net(event),
                    Some(Input::Api(request)) => self.on_api(request),
                    Some(Input::RpcDone { peer, purpose, result }) => self.on_rpc_done(peer, purpose, result),
                    Some(Input::JobUpdate(update)) => self.on_job_update(update),
                },
            }
            self.schedule_if_due();
        }
        tracing::info!("mesh task stopped; store is consistent");
    }

    /// Monotonic milliseconds since start.
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn stamp(&mut self) -> Stamp {
        Stamp {
            at: self.clock.tick(unix_ms()),
            by: self.id.clone(),
        }
    }

    // ---- timers ---------------------------------------------------------------------

    fn on_tick(&mut self) {
        let now = self.now();
        let actions = self.election.tick(now);
        self.execute(actions);
        let is_master = self.election.is_master(now);
        Metrics::set(&self.metrics.is_master, is_master as u64);
        Metrics::set(&self.metrics.election_term, self.election.term());
        if is_master {
            self.publish_lease(now);
            if now >= self.next_voter_check {
                self.next_voter_check = now + VOTER_CHECK_EVERY_MS;
                self.manage_voters(now);
            }
            if now >= self.next_schedule {
                self.scheduler.wake();
            }
        }
        if self.own_record_dirty || now >= self.next_record_refresh {
            self.write_own_record();
        }
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + HEARTBEAT_EVERY_MS;
            let beat = Gossip::Heartbeat {
                node: self.id.clone(),
                at_ms: unix_ms(),
            };
            self.client.publish(beat.encode());
            Metrics::set(&self.metrics.records, self.state.len() as u64);
            Metrics::set(&self.metrics.store_bytes, self.store.size_bytes());
        }
        if now >= self.next_anti_entropy {
            self.next_anti_entropy = now + ANTI_ENTROPY_EVERY_MS;
            let peers: Vec<PeerId> = self.connected.iter().copied().collect();
            if !peers.is_empty() {
                let pick = peers[(self.next_random() as usize) % peers.len()];
                self.start_sync(pick);
            }
        }
        if now >= self.next_redial {
            self.next_redial = now + REDIAL_EVERY_MS;
            self.redial_known_peers(now);
        }
    }

    /// Record (once per epoch and voter configuration) that we hold the lease.
    fn publish_lease(&mut self, now: u64) {
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
    fn manage_voters(&mut self, now: u64) {
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

    fn voter_candidates(&self, now: u64) -> Vec<Candidate> {
        self.state
            .with_prefix("node/")
            .filter_map(|(_, record)| match record {
                Record::Node(info) => Some(&info.value),
                _ => None,
            })
            .map(|info| Candidate {
                id: info.id.clone(),
                eligible: info.master_eligible && !self.admin_flag(&info.id, |a| &a.removed),
                online: info.id == self.id || self.liveness.is_online(&info.id, now),
                recently_seen: info.id == self.id || self.liveness.recently_seen(&info.id, now),
            })
            .collect()
    }

    fn redial_known_peers(&mut self, now: u64) {
        let mut targets: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for addr in &self.bootstrap {
            if let Some(peer) = peer_of(addr) {
                targets.entry(peer).or_default().push(addr.clone());
            }
        }
        for (_, record) in self.state.with_prefix("node/") {
            if let Record::Node(info) = record {
                if let Ok(peer) = PeerId::from_str(&info.value.id) {
                    let addrs = info.value.addrs.iter().filter_map(|a| a.parse().ok());
                    targets.entry(peer).or_default().extend(addrs);
                }
            }
        }
        for (peer, addrs) in targets {
            if peer == self.peer_id
                || self.connected.contains(&peer)
                || addrs.is_empty()
                || self.admin_flag(&peer.to_string(), |a| &a.removed)
            {
                continue;
            }
            let (due, backoff) = self.redial.get(&peer).copied().unwrap_or((0, 500));
            if now < due {
                continue;
            }
            self.redial
                .insert(peer, (now + backoff, (backoff * 2).min(30_000)));
            self.client.dial(Some(peer), addrs);
        }
    }

    // ---- local writes ---------------------------------------------------------------

    /// Persist, apply, then gossip a change made here. Nothing is applied in memory unless
    /// it is in the store first.
    fn commit_local(&mut self, key: String, record: Record) -> Result<(), ActionError> {
        let merged = match self.state.merged(&key, &record) {
            Ok(Some(merged)) => merged,
            Ok(None) => return Ok(()),
            Err(e) => return Err(ActionError::Invalid(e.to_string())),
        };
        self.store
            .put_records(&[(&key, &merged)])
            .map_err(|e| ActionError::Store(e.to_string()))?;
        let _ = self.state.apply(&key, &merged);
        self.after_change(&key, &merged);
        let delta = Gossip::Delta(vec![(key, merged)]).encode();
        if delta.len() <= crate::wire::MAX_GOSSIP_BYTES {
            self.client.publish(delta);
        }
        Ok(())
    }

    fn own_info(&self) -> NodeInfo {
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
        }
    }

    fn write_own_record(&mut self) {
        self.own_record_dirty = false;
        self.next_record_refresh = self.now() + RECORD_REFRESH_EVERY_MS;
        let stamp = self.stamp();
        let record = Record::Node(Lww::new(stamp, self.own_info()));
        let key = Key::Node(self.id.clone()).encode();
        if let Err(e) = self.commit_local(key, record) {
            tracing::warn!("cannot write own node record: {e}");
        }
    }

    // ---- remote changes -------------------------------------------------------------

    /// Merge records from a peer: the changed ones are persisted in one transaction, then
    /// applied. If the store refuses the batch, nothing is applied (anti-entropy brings the
    /// records again later). Returns how many changed.
    fn apply_remote(&mut self, records: Vec<(String, Record)>) -> usize {
        let now_unix = unix_ms();
        let mut changed: BTreeMap<String, Record> = BTreeMap::new();
        for (key, record) in records {
            let base = changed.get(&key).cloned();
            let result = match base {
                // The same key twice in one batch: merge onto what this batch already has.
                Some(mut pending) => Ok(pending.merge(&record).then_some(pending)),
                None => self.state.merged(&key, &record),
            };
            match result {
                Ok(Some(merged)) => {
                    self.clock.observe(record.latest_hlc(), now_unix);
                    changed.insert(key, merged);
                }
                Ok(None) => {}
                Err(e) => {
                    Metrics::inc(&self.metrics.wire_dropped);
                    tracing::debug!("refused a record from a peer: {e}");
                }
            }
        }
        let rows: Vec<(&str, &Record)> = changed.iter().map(|(k, r)| (k.as_str(), r)).collect();
        if let Err(e) = self.store.put_records(&rows) {
            tracing::error!("cannot persist replicated records, dropping the batch: {e}");
            return 0;
        }
        for (key, record) in &changed {
            let _ = self.state.apply(key, record);
            self.after_change(key, record);
        }
        changed.len()
    }

    /// Side effects of a changed record.
    fn after_change(&mut self, key: &str, record: &Record) {
        match record {
            Record::Admin(admin) => {
                let removed = admin.removed.as_ref().is_some_and(|r| r.value);
                if let (true, Some(id)) = (removed, key.strip_prefix("admin/")) {
                    if let Ok(peer) = PeerId::from_str(id) {
                        if peer != self.peer_id {
                            self.client.disconnect(peer);
                        }
                    }
                }
            }
            Record::Master(master) => self.observe_epoch(master.0.epoch),
            Record::Job(job) => {
                self.check_run(job);
                // A new queued job or a freed slot: the master schedules right away.
                let status = job.progress.0.status;
                if status == crate::proto::jobs::JobStatus::Queued || status.is_terminal() {
                    self.scheduler.wake();
                }
            }
            Record::Node(_) => {}
        }
    }

    /// Remember (durably) the highest lease epoch seen, for fencing assignments.
    fn observe_epoch(&mut self, epoch: u64) {
        if epoch > self.highest_epoch {
            self.highest_epoch = epoch;
            if let Err(e) = self.store.put_meta(HIGHEST_EPOCH_META, &epoch) {
                tracing::error!("cannot persist the highest epoch: {e}");
            }
        }
    }

    fn admin(&self, id: &str) -> Option<&NodeAdmin> {
        match self.state.get(&Key::Admin(id.to_string()).encode()) {
            Some(Record::Admin(a)) => Some(a),
            _ => None,
        }
    }

    fn admin_flag(&self, id: &str, field: impl Fn(&NodeAdmin) -> &Option<Lww<bool>>) -> bool {
        self.admin(id)
            .and_then(|a| field(a).as_ref())
            .is_some_and(|l| l.value)
    }

    // ---- network --------------------------------------------------------------------

    fn on_net(&mut self, event: net::Event) {
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
                self.connected.insert(peer);
                self.redial.remove(&peer);
                self.liveness.heard(&peer.to_string(), now);
                self.start_sync(peer);
            }
            net::Event::Disconnected(peer) => {
                self.connected.remove(&peer);
                self.sync_sessions.remove(&peer);
            }
            net::Event::PeerAddrs { .. } => {}
            net::Event::Gossip { source, data } => self.on_gossip(source, &data, now),
            net::Event::Request {
                peer,
                request,
                channel,
            } => {
                let response = self.on_request(peer, request, now);
                self.client.respond(channel, response);
            }
        }
    }

    fn on_gossip(&mut self, source: PeerId, data: &[u8], now: u64) {
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
                    self.liveness.heard(&node, now);
                } else {
                    Metrics::inc(&self.metrics.gossip_dropped);
                }
            }
            Gossip::Delta(records) => {
                self.liveness.heard(&source.to_string(), now);
                self.apply_remote(records);
            }
        }
    }

    fn on_request(&mut self, peer: PeerId, request: Request, now: u64) -> Response {
        if self.admin_flag(&peer.to_string(), |a| &a.removed) {
            return Response::Refused("this node was removed from the mesh".into());
        }
        if let Err(e) = request.check() {
            Metrics::inc(&self.metrics.wire_dropped);
            return Response::Refused(e);
        }
        self.liveness.heard(&peer.to_string(), now);
        match request {
            Request::Election(msg) => {
                let from = peer.to_string();
                let actions = self.election.step(&from, msg, now);
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
                Response::SyncDiffering(self.state.differing_buckets(&theirs))
            }
            Request::SyncDigests { buckets, entries } => {
                let r = self
                    .state
                    .reconcile(&buckets, &entries, MAX_RECORDS_PER_MESSAGE);
                Response::SyncRecords {
                    records: r.records,
                    want: r.want,
                    more: r.more,
                }
            }
            Request::Assign(record) => self.accept_assignment(&record),
            Request::Log { job, offset } => self.serve_log(&job, offset),
            Request::StoreLog { job, offset, data } => self.store_log(&job, offset, &data),
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
    fn send(&self, peer: PeerId, request: Request, purpose: Purpose) {
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

    fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Persist(hard) => {
                    if let Err(e) = self.store.put_meta(ELECTION_META, &hard) {
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

    fn on_rpc_done(&mut self, peer: PeerId, purpose: Purpose, result: Result<Response, String>) {
        match (purpose, result) {
            (purpose @ Purpose::Assign { .. }, result) => {
                self.on_assign_answer(peer, purpose, result)
            }
            (Purpose::Election, Ok(Response::Election(replies))) => {
                if replies.len() > 8 {
                    Metrics::inc(&self.metrics.wire_dropped);
                    return;
                }
                let from = peer.to_string();
                for msg in replies {
                    let now = self.now();
                    let actions = self.election.step(&from, msg, now);
                    self.execute(actions);
                }
            }
            (Purpose::Election | Purpose::SyncPush, _) => {}
            (_, Err(e)) => {
                tracing::debug!("anti-entropy with {peer} failed: {e}");
                self.sync_sessions.remove(&peer);
            }
            (_, Ok(response)) => self.on_sync_response(peer, response),
        }
    }

    // ---- API ------------------------------------------------------------------------

    fn on_api(&mut self, request: ApiRequest) {
        match request {
            ApiRequest::Status(reply) => {
                let _ = reply.send(self.status_view());
            }
            ApiRequest::Nodes(reply) => {
                let _ = reply.send(self.node_views());
            }
            ApiRequest::Ticket(reply) => {
                let _ = reply.send(self.ticket().encode());
            }
            ApiRequest::NodeAction {
                target,
                action,
                reply,
            } => {
                let _ = reply.send(self.node_action(&target, action));
            }
            ApiRequest::SubmitJob { request, reply } => {
                let _ = reply.send(self.submit_job(*request));
            }
            ApiRequest::Jobs { query, reply } => {
                let _ = reply.send(self.list_jobs(&query));
            }
            ApiRequest::LogSource { id, reply } => {
                let _ = reply.send(self.log_source(&id));
            }
            ApiRequest::Job { id, reply } => {
                let _ = reply.send(self.get_job(&id));
            }
            ApiRequest::JobAction { id, action, reply } => {
                let _ = reply.send(self.job_action(&id, action));
            }
        }
    }

    fn ticket(&self) -> Ticket {
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
            mesh_key: self.config.mesh_key,
            addrs,
        }
    }

    fn master_record(&self) -> Option<&MasterInfo> {
        match self.state.get("master") {
            Some(Record::Master(m)) => Some(&m.0),
            _ => None,
        }
    }

    /// The voters as the newest lease record says (every node has it), or as our own
    /// configuration says when that is newer or no record exists yet.
    fn displayed_voters(&self) -> BTreeSet<NodeId> {
        match self.master_record() {
            Some(r) if r.epoch >= self.election.term() => r.voters.clone(),
            _ => self.election.membership().all_voters(),
        }
    }

    fn status_view(&self) -> StatusView {
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

    fn node_views(&self) -> Vec<NodeView> {
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

    fn status_master_id(&self, now: u64) -> Option<NodeId> {
        if self.election.is_master(now) {
            return Some(self.id.clone());
        }
        self.master_record()
            .filter(|r| r.master != self.id && self.liveness.is_online(&r.master, now))
            .map(|r| r.master.clone())
    }

    fn node_view(
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
    fn node_name(&self, id: &str) -> Option<String> {
        match self.state.get(&Key::Node(id.to_string()).encode()) {
            Some(Record::Node(info)) => Some(info.value.name.clone()),
            _ => None,
        }
    }

    fn resolve_node(&self, target: &str) -> Result<NodeId, ActionError> {
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

    fn node_action(&mut self, target: &str, action: NodeAction) -> Result<NodeView, ActionError> {
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
