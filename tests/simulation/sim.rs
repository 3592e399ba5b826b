//! The simulated world: nodes, per-node clocks, the event queue and its main loop.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use codex_mesh::proto::crdt::NodeId;
use codex_mesh::proto::dispatch::commit::Accepted;
use codex_mesh::proto::dispatch::worker::RunKey;
use codex_mesh::proto::dispatch::Dispatcher;
use codex_mesh::proto::duties::MasterDuties;
use codex_mesh::proto::election::{Election, HardState, Membership, Position, Timing};
use codex_mesh::proto::hlc::HlcClock;
use codex_mesh::proto::jobs::JobRecord;
use codex_mesh::proto::lookup::RecordLookup;
use codex_mesh::proto::state::ReplicatedState;

use crate::clock::{Clock, LeaseClock};
use crate::net::{Payload, Pending};
use crate::trace::{Failure, Outcome, Stats, Trace};
use crate::{Params, TICK_MS};

/// A tiny xorshift64* generator: the only source of randomness of a run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so neighbouring seeds give unrelated streams; never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn permille(&mut self, p: u64) -> bool {
        self.below(1000) < p
    }

    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}

#[derive(Debug)]
pub enum Event {
    Deliver {
        from: usize,
        to: usize,
        from_incarnation: u64,
        to_incarnation: u64,
        payload: Payload,
    },
    Tick(usize),
    Fault,
    Restart {
        node: usize,
        incarnation: u64,
    },
    HealSplit(u64),
    /// Crash a node and restart it at once (a supervisor restarting a crashed process).
    Bounce(usize),
    HealLink(usize, usize),
    /// A message from the Byzantine peer arrives at a node.
    Forged {
        to: usize,
        payload: Payload,
    },
    /// The end of a freeze.
    Thaw {
        node: usize,
        incarnation: u64,
    },
    /// A request of `node` got no answer in time.
    Timeout {
        node: usize,
        incarnation: u64,
        id: u64,
    },
    /// A user submits a job at a node.
    Submit(usize),
    /// A user cancels some job at a node.
    Cancel(usize),
    /// The next step of run `run` of `job` on `node`.
    RunStep {
        node: usize,
        job: String,
        run: u64,
    },
    /// Start of the final, fault-free phase.
    Heal,
}

/// An event in the queue, ordered by time and then by insertion (a min-heap via `Ord`).
#[derive(Debug)]
pub struct Scheduled {
    pub at: u64,
    pub seq: u64,
    pub event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Where a run of a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Started,
    Preparing,
    Running,
    /// Told to stop; it ends at its next step.
    Stopping,
}

/// A run of one job on one node.
#[derive(Clone, Debug)]
pub struct Run {
    pub id: u64,
    pub key: RunKey,
    pub phase: Phase,
}

pub struct Node {
    pub id: NodeId,
    /// `None` while crashed.
    pub election: Option<Election>,
    /// What the last `Action::Persist` carried (the initial state before any).
    pub persisted: HardState,
    /// Bumped on crash and on restart; messages of another incarnation are lost.
    pub incarnation: u64,
    /// Paused (SIGSTOP) while `now < paused_until`.
    pub paused_until: u64,
    /// Frozen (clock stopped too) while `now < frozen_until`.
    pub frozen_until: u64,
    /// The record store (durable: it survives crashes).
    pub state: ReplicatedState,
    pub hlc: HlcClock,
    pub clock: Clock,
    pub lease_clock: LeaseClock,
    /// The master's duties as the runtime runs them (in memory: lost on crash); see
    /// [`master_duties`].
    pub duties: MasterDuties,
    /// Wall time of the process start (what its node record would say).
    pub started_wall: u64,
    /// Monotonic time each peer was last heard from (liveness).
    pub heard: Vec<Option<u64>>,
    /// The scheduler's in-memory state (lost on crash).
    pub dispatcher: Dispatcher,
    /// A job changed: schedule after the current event.
    pub woken: bool,
    /// Monotonic time of the next periodic scheduling round.
    pub next_round: u64,
    /// Requests waiting for an answer, by request id.
    pub pending: BTreeMap<u64, Pending>,
    /// This node's runs, by job id.
    pub runs: BTreeMap<String, Run>,
    /// Runs to start once the older run of their job ended.
    pub waiting: BTreeMap<String, RunKey>,
    /// What this node accepted as a voter (durable: it survives crashes).
    pub accepted: Accepted,
    /// The newest assignment of each job this node refused.
    pub refused: BTreeMap<String, (u64, u64)>,
}

impl Node {
    /// Running, and neither paused nor frozen.
    pub fn up(&self, now: u64) -> bool {
        self.election.is_some() && now >= self.paused_until && now >= self.frozen_until
    }

    /// When a stopped node takes input again.
    pub fn resumes_at(&self) -> u64 {
        self.paused_until.max(self.frozen_until)
    }

    /// Frozen: until its thaw event ran (which checks the clocks), even at the instant the
    /// freeze ends, since events of other nodes at that instant may come first.
    pub fn frozen(&self, now: u64) -> bool {
        now < self.frozen_until || self.clock.frozen_since.is_some()
    }
}

/// Mutable context of one run of the simulation.
pub struct Sim {
    pub params: Params,
    pub rng: Rng,
    pub now: u64,
    pub seq: u64,
    pub queue: BinaryHeap<Scheduled>,
    pub nodes: Vec<Node>,
    pub chaos: bool,
    /// Side of each node while the network is split in two.
    pub split: Option<Vec<bool>>,
    pub split_generation: u64,
    /// Individually cut links `(low, high)`.
    pub cuts: BTreeSet<(usize, usize)>,
    pub drop_permille: u64,
    pub dup_permille: u64,
    pub slow_permille: u64,
    /// When the (current) master last saw each node online.
    pub last_seen: Vec<u64>,
    /// Anti-entropy pages in a row, per (node, peer), that changed nothing at the node (as
    /// in the runtime, a session stops after `MAX_IDLE_ROUNDS` of them).
    pub sync_idle: BTreeMap<(usize, usize), u32>,
    /// This run's voter grace window.
    pub grace_ms: u64,
    /// Term -> the node that led it.
    pub leaders: BTreeMap<u64, usize>,
    /// Every configuration ever persisted, by position.
    pub configs: BTreeMap<Position, Membership>,
    /// Terms in which some node started an election (persisted a vote for itself).
    pub campaigned: BTreeSet<u64>,
    /// Nodes acting as master after the previous step (for the trace).
    pub masters: Vec<usize>,
    /// Every live run in the mesh: `(job, attempt)` -> node.
    pub live: BTreeMap<(String, u32), usize>,
    /// Jobs submitted so far (ids are made from this).
    pub submitted: u64,
    /// Ids of requests and runs.
    pub next_id: u64,
    /// A worker is judging an assignment: merged records do not stop its runs meanwhile.
    pub judging: bool,
    pub stats: Stats,
    pub trace: Option<Trace>,
}

pub fn node_id(i: usize) -> NodeId {
    format!("n{i}")
}

/// The runtime's master duties without its settle time before voter changes: a term of the
/// simulation is often shorter than the runtime's 5 s, and voter changes are what the faults
/// should meet as often as possible.
pub fn master_duties() -> MasterDuties {
    MasterDuties::new(0)
}

impl Sim {
    pub fn new(params: Params, trace: Option<Trace>) -> Self {
        let mut rng = Rng::new(params.seed);
        let timing = Timing::default();
        let n = params.nodes;
        let nodes = (0..n)
            .map(|i| {
                let id = node_id(i);
                let hard = if i == 0 {
                    HardState {
                        membership: Membership::founding(&id),
                        ..HardState::default()
                    }
                } else {
                    HardState::default()
                };
                let clock = Clock::draw(&mut rng);
                let election = Election::new(
                    id.clone(),
                    hard.clone(),
                    timing,
                    true,
                    clock.mono(0),
                    rng.next_u64(),
                );
                Node {
                    id,
                    election: Some(election),
                    persisted: hard,
                    incarnation: 0,
                    paused_until: 0,
                    frozen_until: 0,
                    state: ReplicatedState::default(),
                    hlc: HlcClock::default(),
                    lease_clock: LeaseClock::new(crate::clock::jump_threshold_ms()),
                    duties: master_duties(),
                    started_wall: clock.wall(0),
                    heard: vec![None; n],
                    dispatcher: Dispatcher::default(),
                    woken: false,
                    next_round: 0,
                    pending: BTreeMap::new(),
                    runs: BTreeMap::new(),
                    waiting: BTreeMap::new(),
                    refused: BTreeMap::new(),
                    accepted: Accepted::new(),
                    clock,
                }
            })
            .collect();
        let mut sim = Sim {
            params,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            chaos: true,
            split: None,
            split_generation: 0,
            cuts: BTreeSet::new(),
            drop_permille: 50,
            dup_permille: 20,
            slow_permille: 10,
            last_seen: vec![0; n],
            sync_idle: BTreeMap::new(),
            grace_ms: 0,
            leaders: BTreeMap::new(),
            configs: BTreeMap::new(),
            campaigned: BTreeSet::new(),
            masters: Vec::new(),
            live: BTreeMap::new(),
            submitted: 0,
            next_id: 0,
            judging: false,
            stats: Stats::default(),
            trace,
        };
        sim.grace_ms = sim.rng.range(crate::GRACE_MS);
        for i in 0..n {
            let first = sim.rng.range(TICK_MS);
            sim.schedule(first, Event::Tick(i));
        }
        let first_fault = sim.rng.range((200, 2_000));
        sim.schedule(first_fault, Event::Fault);
        sim.schedule(params.chaos_ms, Event::Heal);
        let jobs = sim.rng.range((params.jobs / 2, params.jobs));
        for _ in 0..jobs {
            let at = sim.rng.range((1_000, params.chaos_ms));
            let node = sim.rng.index(n);
            sim.schedule(at, Event::Submit(node));
            if sim.rng.permille(crate::CANCEL_PERMILLE) {
                let at = sim.rng.range((at, params.chaos_ms + 1_000));
                let node = sim.rng.index(n);
                sim.schedule(at, Event::Cancel(node));
            }
        }
        sim
    }

    pub fn push_trace(&mut self, line: String) {
        let now = self.now;
        if let Some(trace) = &mut self.trace {
            trace.push(now, line);
        }
    }

    pub fn schedule(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at: self.now + delay,
            seq: self.seq,
            event,
        });
    }

    pub fn fail(&self, what: String) -> Failure {
        Failure {
            at: self.now,
            step: self.stats.steps,
            what,
        }
    }

    pub fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Node `i`'s monotonic clock now.
    pub fn mono(&self, i: usize) -> u64 {
        self.nodes[i].clock.mono(self.now)
    }

    /// Node `i`'s wall clock now.
    pub fn wall(&self, i: usize) -> u64 {
        self.nodes[i].clock.wall(self.now)
    }

    /// Whether node `i` acts as master now: its election holds the lease on its own clock,
    /// and it is not frozen.
    pub fn acting_master(&self, i: usize) -> bool {
        let node = &self.nodes[i];
        let Some(election) = node.election.as_ref() else {
            return false;
        };
        !node.frozen(self.now) && election.is_master(node.clock.mono(self.now))
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        id.strip_prefix('n')
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&i| i < self.nodes.len() && self.nodes[i].id == id)
    }

    pub fn reachable(&self, a: usize, b: usize) -> bool {
        a == b
            || (self.split.as_ref().is_none_or(|side| side[a] == side[b])
                && !self.cuts.contains(&(a.min(b), a.max(b))))
    }

    pub fn job(&self, i: usize, id: &str) -> Option<JobRecord> {
        self.nodes[i].state.job(id).cloned()
    }

    pub fn run(mut self) -> Outcome {
        let result = self.drive();
        Outcome {
            result,
            stats: self.stats,
            trace: self.trace.map(|t| t.lines.into()).unwrap_or_default(),
        }
    }

    fn drive(&mut self) -> Result<(), Failure> {
        let end = self.params.chaos_ms + self.params.heal_ms;
        while let Some(next) = self.queue.pop() {
            if next.at > end {
                break;
            }
            self.now = next.at;
            self.stats.steps += 1;
            self.handle(next.event)?;
            self.schedule_woken()?;
            self.check_masters()?;
        }
        self.now = end;
        self.final_check()
    }

    fn handle(&mut self, event: Event) -> Result<(), Failure> {
        match event {
            Event::Deliver {
                from,
                to,
                from_incarnation,
                to_incarnation,
                payload,
            } => self.deliver(from, to, from_incarnation, to_incarnation, payload),
            Event::Tick(i) => self.tick(i),
            Event::Fault => {
                self.fault();
                Ok(())
            }
            Event::Restart { node, incarnation } => {
                if self.nodes[node].election.is_none()
                    && self.nodes[node].incarnation == incarnation
                {
                    self.restart(node)?;
                }
                Ok(())
            }
            Event::HealSplit(generation) => {
                if self.split_generation == generation && self.split.take().is_some() {
                    trace!(self, "-- partition healed");
                }
                Ok(())
            }
            Event::Bounce(i) => {
                if self.chaos && self.nodes[i].election.is_some() {
                    let down = self.rng.range((1, 300));
                    self.crash(i, down);
                }
                Ok(())
            }
            Event::Forged { to, payload } => self.deliver_forged(to, payload),
            Event::HealLink(a, b) => {
                if self.cuts.remove(&(a, b)) {
                    trace!(self, "-- link n{a}-n{b} restored");
                }
                Ok(())
            }
            Event::Thaw { node, incarnation } => {
                if self.nodes[node].incarnation == incarnation {
                    self.thaw(node);
                }
                Ok(())
            }
            Event::Timeout {
                node,
                incarnation,
                id,
            } => {
                if self.nodes[node].incarnation == incarnation {
                    self.timed_out(node, id)?;
                }
                Ok(())
            }
            Event::Submit(i) => self.submit(i),
            Event::Cancel(i) => self.cancel(i),
            Event::RunStep { node, job, run } => self.run_step(node, &job, run),
            Event::Heal => {
                trace!(self, "== final phase: no faults, every node up");
                self.chaos = false;
                self.split = None;
                self.cuts.clear();
                for i in 0..self.nodes.len() {
                    self.nodes[i].paused_until = 0;
                    if self.nodes[i].frozen(self.now) {
                        self.thaw(i);
                    }
                    if self.nodes[i].election.is_none() {
                        self.restart(i)?;
                    }
                }
                Ok(())
            }
        }
    }
}
