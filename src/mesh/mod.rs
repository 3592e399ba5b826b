//! The mesh runtime: one task that owns the replicated state, the store and the election, and
//! drives them from network events, API requests and timers.
//!
//! * Replica ([`replica`]): records, store, clock and read snapshots, kept in step; every
//!   change is persisted, applied, handed to the snapshot writer, then gossiped as a delta.
//! * Reads ([`snapshot`], [`read`]): immutable snapshots and the change feed; the views are
//!   functions over a snapshot, so the API never waits on this task.
//! * Replication: on every
//!   new connection and every few seconds with a random peer, anti-entropy compares summaries
//!   and pulls and pushes what differs ([`sync`]).
//! * Membership: node records are written by their owners; liveness comes from gossip
//!   heartbeats; operators drain, edit, remove and re-admit nodes through admin records.
//! * Election: [`crate::proto::election`] over its own request-response protocol; the master
//!   writes the lease record and manages the voters ([`duties`]).

pub mod clock;
mod duties;
pub mod handle;
mod history;
pub mod jobs;
mod liveness;
mod network;
mod peers;
pub mod read;
pub mod replica;
pub mod runs;
mod scheduler;
pub mod snapshot;
mod status;
mod sync;
mod trust;
pub mod views;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::net::{self, Client};
use crate::proto::crdt::{Lww, NodeId, Stamp};
use crate::proto::election::{Election, HardState, Membership, Timing};
use crate::proto::lookup::RecordLookup;
use crate::proto::records::{Key, NodeAdmin, Record};
use crate::runner::{JobUpdate, RunnerConfig};
use crate::store::{Store, StoreError};
use crate::sysinfo::MachineInfo;
use crate::wire::{Gossip, Response};

pub use handle::{ApiRequest, MeshHandle};
use peers::Peers;
use views::ActionError;

const ELECTION_META: &str = "election";
const BOOTSTRAP_META: &str = "bootstrap_peers";
const SETTINGS_META: &str = "own_settings";
const TICK: Duration = Duration::from_millis(50);
const HEARTBEAT_EVERY_MS: u64 = 2_000;
const RECORD_REFRESH_EVERY_MS: u64 = 15_000;
const ANTI_ENTROPY_EVERY_MS: u64 = 5_000;
const REDIAL_EVERY_MS: u64 = 1_000;
/// Longest time between two published snapshots while nothing changes (liveness and the
/// lease move without record changes).
const SNAPSHOT_EVERY_MS: u64 = 250;

/// What the last published snapshot showed, to report changes that no record carries.
#[derive(Debug, Default)]
struct Shown {
    online: BTreeSet<NodeId>,
    master: Option<NodeId>,
}

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
    pub mesh_key: crate::datadir::MeshKey,
    /// Election timing.
    pub timing: Timing,
    /// Machine facts.
    pub machine: MachineInfo,
    /// How this node runs jobs.
    pub runner: Arc<RunnerConfig>,
    /// How many times the master re-queues a job whose node went offline.
    pub lost_requeues: u32,
    /// `--job-history-days`: finished jobs older than this are compacted (0: never). Only
    /// the master's setting moves the horizon.
    pub job_history_days: u32,
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
    /// Asking a voter to accept an assignment: which job, under which (epoch, seq).
    Commit {
        /// Job id.
        job: String,
        /// Assignment key.
        key: (u64, u64),
    },
    /// Asking a voter for the assignments it accepted, for the read of `term`.
    Read {
        /// The master's term.
        term: u64,
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
    lease_clock: clock::LeaseClock,
    started_unix_ms: u64,
    replica: replica::Replica,
    election: Election,
    client: Client,
    metrics: Arc<Metrics>,
    peers: Peers,
    listen_addrs: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    own_settings: OwnSettings,
    own_record_dirty: bool,
    duties: crate::proto::duties::MasterDuties,
    history: history::HistoryDuty,
    inputs_tx: mpsc::UnboundedSender<Input>,
    inputs_rx: Option<mpsc::UnboundedReceiver<Input>>,
    next_heartbeat: u64,
    next_record_refresh: u64,
    next_anti_entropy: u64,
    next_redial: u64,
    next_schedule: u64,
    scheduler: scheduler::SchedulerState,
    runs: HashMap<String, runs::Run>,
    refused_assignments: std::collections::BTreeMap<String, (u64, u64)>,
    term_ahead: Option<(u64, u64)>,
    accepted: crate::proto::dispatch::commit::Accepted,
    rng: u64,
    next_snapshot: u64,
    shown: Shown,
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
        let (mut replica, reader) = replica::Replica::open(
            store,
            snapshot::LocalFacts::before_start(
                &id,
                &config.name,
                &config.mesh_id,
                config.runner.log_dir.clone(),
            ),
        )?;
        let store = replica.store();
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
                    stamp: replica.stamp(&id),
                };
                replica.store().put_meta(SETTINGS_META, &s)?;
                s
            }
        };
        let accepted = replica
            .store()
            .get_meta(scheduler::ACCEPTED_META)?
            .unwrap_or_default();
        let seed = u64::from_le_bytes(rand::random::<[u8; 8]>());
        let election = Election::new(
            id.clone(),
            hard,
            config.timing,
            config.master_eligible,
            0,
            seed,
        );
        let jump_threshold = clock::jump_threshold_ms(&config.timing);
        let history_days = config.job_history_days;
        let (inputs_tx, inputs_rx) = mpsc::unbounded_channel();
        let handle = MeshHandle {
            inputs: inputs_tx.clone(),
            reader,
        };
        let mut mesh = Mesh {
            id,
            peer_id,
            config,
            lease_clock: clock::LeaseClock::new(jump_threshold),
            started_unix_ms: unix_ms(),
            replica,
            election,
            client,
            metrics,
            peers: Peers::default(),
            listen_addrs: Vec::new(),
            bootstrap,
            own_settings,
            own_record_dirty: true,
            duties: crate::proto::duties::MasterDuties::default(),
            history: history::HistoryDuty::new(history_days),
            inputs_tx: inputs_tx.clone(),
            inputs_rx: Some(inputs_rx),
            next_heartbeat: 0,
            next_record_refresh: RECORD_REFRESH_EVERY_MS,
            next_anti_entropy: ANTI_ENTROPY_EVERY_MS,
            next_redial: 0,
            next_schedule: 0,
            scheduler: scheduler::SchedulerState::default(),
            runs: HashMap::new(),
            refused_assignments: BTreeMap::new(),
            term_ahead: None,
            accepted,
            rng: seed | 1,
            next_snapshot: 0,
            shown: Shown::default(),
        };
        mesh.publish_snapshot(true);
        Ok((mesh, handle))
    }

    /// Run until shutdown. `events` comes from [`net::build`].
    pub async fn run(mut self, mut events: mpsc::UnboundedReceiver<net::Event>) {
        let Some(mut inputs) = self.inputs_rx.take() else {
            return;
        };
        // Kill what is left of the previous process's agents, and take the results of those
        // that had finished (blocking file and /proc reads, once, before anything else).
        let runner = self.config.runner.clone();
        let recovered = tokio::task::spawn_blocking(move || crate::runner::recover(&runner))
            .await
            .unwrap_or_default();
        self.reconcile_at_start(recovered);
        for addr in self.bootstrap.clone() {
            self.client.dial(peer_of(&addr), vec![addr]);
        }
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let input = tokio::select! {
                _ = ticker.tick() => None,
                Some(event) = events.recv() => Some(Input::Net(event)),
                input = inputs.recv() => Some(input.unwrap_or(Input::Shutdown)),
            };
            // Before anything else: a process that was stopped or suspended must not act on a
            // lease its clock may have overstated.
            self.check_clock();
            match input {
                None => self.on_tick(),
                Some(Input::Shutdown) => break,
                Some(Input::Net(event)) => self.on_net(event),
                Some(Input::Api(request)) => self.on_api(request),
                Some(Input::RpcDone {
                    peer,
                    purpose,
                    result,
                }) => self.on_rpc_done(peer, purpose, result),
                Some(Input::JobUpdate(update)) => self.on_job_update(update),
            }
            self.schedule_if_due();
            self.publish_snapshot(false);
        }
        tracing::info!("mesh task stopped; store is consistent");
    }

    /// Milliseconds since start on the lease clock (`CLOCK_BOOTTIME`: it counts suspend).
    fn now(&self) -> u64 {
        self.lease_clock.now_ms()
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Whether this node may act as master now: it holds the lease (see
    /// `Election::is_master`).
    /// It does not while it heard of a newer term than its own within a lease length (a
    /// real newer term keeps the quorum from acknowledging this node, so its lease lapses
    /// within that time anyway).
    fn acting_master(&self, now: u64) -> bool {
        let doubt = self
            .term_ahead
            .is_some_and(|(epoch, until)| epoch > self.election.term() && now < until);
        self.election.is_master(now) && !doubt
    }

    fn stamp(&mut self) -> Stamp {
        self.replica.stamp(&self.id)
    }

    // ---- timers ---------------------------------------------------------------------

    /// Void the lease when the wall clock moved further than the lease clock since the last
    /// input: the lease clock missed time (a suspend it did not count, or a stalled clock),
    /// so acknowledgements held may be older than they look.
    fn check_clock(&mut self) {
        let now = self.now();
        if let Some(jump) = self.lease_clock.observe(unix_ms(), now) {
            if self.election.is_leader() {
                tracing::warn!(jump_ms = jump, "the wall clock jumped ahead of the lease clock; dropping the lease until a quorum acknowledges again");
            }
            self.election.void_lease(now);
        }
    }

    fn on_tick(&mut self) {
        let now = self.now();
        let actions = self.election.tick(now);
        self.execute(actions);
        let is_master = self.acting_master(now);
        Metrics::set(&self.metrics.is_master, is_master as u64);
        Metrics::set(&self.metrics.election_term, self.election.term());
        if let Some(acked) = self.election.quorum_acked_at() {
            Metrics::raise(&self.metrics.lease_age_max_ms, now.saturating_sub(acked));
        }
        if is_master {
            self.publish_lease(now);
            if self.duties.voter_check_due(now) {
                self.refresh_learners();
                self.manage_voters(now);
            }
            if now >= self.next_schedule {
                self.scheduler.wake();
            }
            self.move_horizon();
        }
        self.compact_history_batch();
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
            Metrics::set(&self.metrics.records, self.replica.state().len() as u64);
            Metrics::set(&self.metrics.store_bytes, self.replica.store().size_bytes());
        }
        if now >= self.next_anti_entropy {
            self.next_anti_entropy = now + ANTI_ENTROPY_EVERY_MS;
            let random = self.next_random();
            if let Some(pick) = self.peers.pick(random) {
                self.start_sync(pick);
            }
        }
        if now >= self.next_redial {
            self.next_redial = now + REDIAL_EVERY_MS;
            self.redial_known_peers(now);
        }
    }

    // ---- local writes ---------------------------------------------------------------

    /// Persist, apply, then gossip a change made here. Nothing is applied in memory unless
    /// it is in the store first.
    fn commit_local(&mut self, key: String, record: Record) -> Result<(), ActionError> {
        let merged = match self.replica.commit(&key, &record) {
            Ok(Some(merged)) => merged,
            Ok(None) => return Ok(()),
            Err(replica::ReplicaError::Invalid(e)) => return Err(ActionError::Invalid(e)),
            Err(replica::ReplicaError::Store(e)) => return Err(ActionError::Store(e.to_string())),
        };
        self.after_change(&key, &merged);
        let delta = Gossip::Delta(vec![(key, merged)]).encode();
        if delta.len() <= crate::wire::MAX_GOSSIP_BYTES {
            self.client.publish(delta);
        }
        Ok(())
    }

    // ---- remote changes -------------------------------------------------------------

    /// Merge records from a peer: the changed ones are persisted in one transaction, then
    /// applied. If the store refuses the batch, nothing is applied (anti-entropy brings the
    /// records again later). Returns how many changed.
    fn apply_remote(&mut self, records: Vec<(String, Record)>) -> usize {
        let mut vouched = Vec::with_capacity(records.len());
        for (key, record) in records {
            match self.vouch(&record) {
                Ok(()) => vouched.push((key, record)),
                Err(e) => {
                    self.note_term_ahead(&record);
                    Metrics::inc(&self.metrics.wire_dropped);
                    tracing::debug!("refused a record from a peer: {e}");
                }
            }
        }
        let (changed, refused) = self.replica.merge_batch(vouched, |_| true);
        self.metrics
            .wire_dropped
            .fetch_add(refused as u64, std::sync::atomic::Ordering::Relaxed);
        let changed = match changed {
            Ok(changed) => changed,
            Err(e) => {
                tracing::error!("cannot persist replicated records, dropping the batch: {e}");
                return 0;
            }
        };
        for (key, record) in &changed {
            self.after_change(key, record);
        }
        changed.len()
    }

    /// Side effects of a changed record.
    fn after_change(&mut self, key: &str, record: &Record) {
        match record {
            Record::Admin(admin) => {
                let removed = admin.removed.as_ref().is_some_and(|r| r.value);
                if let (true, Ok(Key::Admin(id))) = (removed, Key::parse(key)) {
                    if let Ok(peer) = PeerId::from_str(&id) {
                        if peer != self.peer_id {
                            self.client.disconnect(peer);
                        }
                    }
                }
            }
            Record::Master(_) => {}
            // A new horizon: compact what it covers, in batches on the next ticks.
            Record::History(_) => self.history.pending = true,
            Record::Job(job) => {
                self.check_run(job);
                // A new queued job or a freed slot: the master schedules right away.
                let status = job.progress.0.status;
                if status == crate::proto::jobs::JobStatus::Queued || status.is_terminal() {
                    self.scheduler.wake();
                }
            }
            Record::Node(_) | Record::Unknown { .. } => {}
        }
    }

    fn admin(&self, id: &str) -> Option<&NodeAdmin> {
        self.replica.admin(id)
    }

    fn admin_flag(&self, id: &str, field: impl Fn(&NodeAdmin) -> &Option<Lww<bool>>) -> bool {
        self.admin(id)
            .and_then(|a| field(a).as_ref())
            .is_some_and(|l| l.value)
    }

    // ---- API ------------------------------------------------------------------------

    /// Actions from the API. A write is in the published snapshot before its answer goes
    /// out, so that the client's next read at this node sees it.
    fn on_api(&mut self, request: ApiRequest) {
        match request {
            ApiRequest::Ticket(reply) => {
                let _ = reply.send(self.ticket().encode());
            }
            ApiRequest::NodeAction {
                target,
                action,
                reply,
            } => {
                let result = self.node_action(&target, action);
                self.publish_snapshot(false);
                let _ = reply.send(result);
            }
            ApiRequest::SubmitJob { request, reply } => {
                let result = self.submit_job(*request);
                self.publish_snapshot(false);
                let _ = reply.send(result);
            }
            ApiRequest::JobAction { id, action, reply } => {
                let result = self.job_action(&id, action);
                self.publish_snapshot(false);
                let _ = reply.send(result);
            }
        }
    }
}
