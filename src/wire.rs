//! Messages between peers: gossip (ciborium-encoded, best effort) and request-response (the
//! libp2p CBOR codec). Every inbound message is bounded and validated before use.

use serde::{Deserialize, Serialize};

use crate::proto::crdt::NodeId;
use crate::proto::election;
use crate::proto::ids::is_ulid;
use crate::proto::jobs::{Assignment, JobRecord};
use crate::proto::records::{Record, MAX_RECORD_BYTES};

/// Gossipsub topic carrying state deltas and heartbeats.
pub const STATE_TOPIC: &str = "codex-mesh/state/1";
/// Request-response protocol name.
pub const RPC_PROTOCOL: &str = "/codex-mesh/rpc/1";
/// Request-response protocol that carries only `Request::Election`, with its own stream budget.
pub const ELECTION_PROTOCOL: &str = "/codex-mesh/election/1";
/// Largest gossip message we publish or accept (gossipsub's own limit is 64 KiB).
pub const MAX_GOSSIP_BYTES: usize = 60 * 1024;
/// Most records in one gossip delta or anti-entropy page.
pub const MAX_RECORDS_PER_MESSAGE: usize = 256;
/// Most keys listed in one digest exchange.
pub const MAX_DIGESTS_PER_MESSAGE: usize = 100_000;
/// Most encoded record bytes in one anti-entropy page (`Response::SyncRecords`,
/// `Request::SyncPush`). A page holds at least one record, and one record is at most
/// [`MAX_RECORD_BYTES`], so no page is larger than this. Well below the request-response
/// codec's limits (8 MiB per request, 16 MiB per response, set in `net`), which also have
/// to carry a page's `want` list.
pub const MAX_PAGE_BYTES: usize = 4 << 20;

const _: () = assert!(MAX_RECORD_BYTES < MAX_PAGE_BYTES);

/// Split records into pages of at most [`MAX_RECORDS_PER_MESSAGE`] records and
/// [`MAX_PAGE_BYTES`] encoded bytes (a record alone is never split off: every page holds at
/// least one).
pub fn pages(records: Vec<(String, Record)>) -> Vec<Vec<(String, Record)>> {
    let mut out: Vec<Vec<(String, Record)>> = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for (key, record) in records {
        let size = key.len() + record.encoded_len();
        if !current.is_empty()
            && (current.len() >= MAX_RECORDS_PER_MESSAGE || bytes + size > MAX_PAGE_BYTES)
        {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push((key, record));
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// A gossip message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gossip {
    /// Records changed at the sender.
    Delta(Vec<(String, Record)>),
    /// "I am alive", sent every two seconds.
    Heartbeat {
        /// The sender.
        node: NodeId,
        /// Sender's wall clock (Unix ms).
        at_ms: u64,
    },
}

impl Gossip {
    /// Encode for publishing.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        let _ = ciborium::into_writer(self, &mut bytes);
        bytes
    }

    /// Decode and bound-check a received message.
    pub fn decode(bytes: &[u8]) -> Result<Gossip, String> {
        if bytes.len() > MAX_GOSSIP_BYTES {
            return Err(format!("{} bytes is over the limit", bytes.len()));
        }
        let gossip: Gossip = ciborium::from_reader(bytes).map_err(|e| e.to_string())?;
        if let Gossip::Delta(records) = &gossip {
            if records.len() > MAX_RECORDS_PER_MESSAGE {
                return Err("too many records".into());
            }
        }
        Ok(gossip)
    }
}

/// A request to a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A master-election message (answered with `Response::Election` carrying any replies).
    Election(election::Message),
    /// Anti-entropy step 1: the requester's bucket summary.
    SyncBuckets(Vec<u64>),
    /// Anti-entropy step 2: the requester's digests for the buckets that differ.
    SyncDigests {
        /// The differing buckets.
        buckets: Vec<u16>,
        /// Requester's `(key, digest)` in those buckets.
        entries: Vec<(String, u64)>,
    },
    /// Anti-entropy step 3: records the responder asked for.
    SyncPush(Vec<(String, Record)>),
    /// The master gives a job to the receiver (the record carries the assignment and its
    /// epoch). Answered with `Ack` or `Refused(reason)`.
    Assign(Box<JobRecord>),
    /// The master of `term` asks a voter for the assignments it accepted
    /// (`proto::dispatch::commit`). Answered with `Accepted` or `Refused`.
    ReadAccepted {
        /// The master's term.
        term: u64,
    },
    /// The master asks a voter to accept an assignment (the record carries it) before any
    /// worker may start it. Answered with `Ack`, `Conflict(record)` or `Refused`.
    Commit(Box<JobRecord>),
    /// Read a job's log from `offset` (answered with `Response::Log`).
    Log {
        /// Job id.
        job: String,
        /// Byte offset.
        offset: u64,
    },
    /// A copy of a finished job's log, in order, for the master to keep.
    StoreLog {
        /// Job id.
        job: String,
        /// Byte offset of `data`.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
}

impl Request {
    /// Bound-check a received request: sizes, the shape of every job id (so no id can name a
    /// file outside the log directory). Election messages are checked by the election itself
    /// (`Election::admits`: sender, term range, voter sets), which the simulation runs too.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Request::SyncBuckets(b) if b.len() > 1024 => Err("too many buckets".into()),
            Request::SyncDigests { buckets, entries }
                if buckets.len() > 1024 || entries.len() > MAX_DIGESTS_PER_MESSAGE =>
            {
                Err("too many digests".into())
            }
            Request::SyncPush(r) if r.len() > MAX_RECORDS_PER_MESSAGE => {
                Err("too many records".into())
            }
            Request::StoreLog { data, .. }
                if data.len() as u64 > crate::runner::logs::CHUNK_BYTES =>
            {
                Err("log chunk too large".into())
            }
            Request::Log { job, .. } | Request::StoreLog { job, .. } if !is_ulid(job) => {
                Err("malformed job id".into())
            }
            Request::Assign(record) | Request::Commit(record) if !is_ulid(&record.spec.id) => {
                Err("malformed job id".into())
            }
            _ => Ok(()),
        }
    }
}

/// A response from a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Received.
    Ack,
    /// Election messages answering an election request (replies ride on the response
    /// instead of opening a stream of their own).
    Election(Vec<election::Message>),
    /// Buckets whose summary differs.
    SyncDiffering(Vec<u16>),
    /// Records the requester lacks, and keys the responder wants.
    SyncRecords {
        /// Records for the requester to merge.
        records: Vec<(String, Record)>,
        /// Keys the responder wants pushed.
        want: Vec<String>,
        /// More records are waiting: run another round.
        more: bool,
    },
    /// A chunk of a job log and the log's total size.
    Log {
        /// The bytes from the requested offset.
        data: Vec<u8>,
        /// The size of the whole log.
        size: u64,
    },
    /// The request was refused (e.g. the sender was removed from the mesh).
    Refused(String),
    /// A voter's replica shows the assignment's attempt ended or replaced: its record.
    Conflict(Box<JobRecord>),
    /// The assignments a voter accepted, per job.
    Accepted(Vec<(String, Assignment)>),
}
