//! The replicated records and their keys. A key names exactly one record kind; the record's
//! merge rule is the rule of that kind.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::crdt::{Crdt, Lww, MaxReg, NodeId, Stamp};
use super::history::Horizon;
use super::jobs::JobRecord;

mod unknown;
pub(crate) use unknown::keep_unknown_fields;
pub use unknown::{Extra, KNOWN_KINDS};

/// Longest accepted key, node name, tag, address or free-text field, in bytes.
pub const MAX_TEXT_LEN: usize = 256;
/// Most tags, addresses or GPUs one node record may carry.
pub const MAX_LIST_LEN: usize = 64;
/// Most job slots a node may advertise.
pub const MAX_SLOTS: u32 = 1024;
/// Largest encoded size of one record. A job's result is capped at 1 MiB and its prompt at
/// 64 KiB, so real records stay well below; anti-entropy pages (`wire::MAX_PAGE_BYTES`)
/// are larger, so one record always fits a page.
pub const MAX_RECORD_BYTES: usize = 2 << 20;

/// A GPU found on a node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Gpu {
    /// Model name as the driver reports it.
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u64,
}

/// Everything a node says about itself. Written only by that node, replaced as a whole.
/// Fields it does not know (from newer versions) are kept in `extra` and written back.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct NodeInfo {
    /// The node's id (libp2p peer id).
    pub id: NodeId,
    /// Human-friendly name.
    pub name: String,
    /// Tags given on the node's command line.
    pub tags: Vec<String>,
    /// Concurrent job slots given on the node's command line.
    pub slots: u32,
    /// When the owner last changed `tags`/`slots` (an operator's edit made later wins).
    pub settings_stamp: Stamp,
    /// Whether the node may hold the master lease (`--no-master` clears it).
    pub master_eligible: bool,
    /// Operating system description.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// GPUs reported by `nvidia-smi`.
    pub gpus: Vec<Gpu>,
    /// codex-mesh version of the node.
    pub version: String,
    /// Multiaddresses other peers can dial.
    pub addrs: Vec<String>,
    /// Base URL of the node's HTTP API, if known.
    pub api_url: Option<String>,
    /// When the node process started (Unix ms).
    pub started_at_ms: u64,
    /// Last persisted heartbeat (Unix ms); live liveness comes from gossip heartbeats.
    pub heartbeat_ms: u64,
    /// Agents the node can run (`codex` only when its CLI was found).
    #[serde(default)]
    pub agents: Vec<String>,
    /// Whether jobs may name repositories by local path on this node.
    #[serde(default)]
    pub local_repos: bool,
    /// Fields this version does not know, kept as they came.
    #[serde(skip)]
    pub extra: Extra,
}

keep_unknown_fields!(
    NodeInfo,
    &[
        "id",
        "name",
        "tags",
        "slots",
        "settings_stamp",
        "master_eligible",
        "os",
        "arch",
        "cpus",
        "memory_bytes",
        "gpus",
        "version",
        "addrs",
        "api_url",
        "started_at_ms",
        "heartbeat_ms",
        "agents",
        "local_repos",
    ]
);

/// Operator decisions about a node, writable from any peer; each field is last-writer-wins.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeAdmin {
    /// Draining nodes take no new jobs.
    pub draining: Option<Lww<bool>>,
    /// Removed nodes are refused by every peer until re-admitted.
    pub removed: Option<Lww<bool>>,
    /// Tags set by an operator, overriding the node's own when newer.
    pub tags: Option<Lww<Vec<String>>>,
    /// Slots set by an operator, overriding the node's own when newer.
    pub slots: Option<Lww<u32>>,
}

impl Crdt for NodeAdmin {
    fn merge(&mut self, other: &Self) -> bool {
        let a = self.draining.merge(&other.draining);
        let b = self.removed.merge(&other.removed);
        let c = self.tags.merge(&other.tags);
        let d = self.slots.merge(&other.slots);
        a | b | c | d
    }
}

/// Who holds the master lease. Ordered so that the record of a later epoch (and within an
/// epoch, a later voter configuration) wins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MasterInfo {
    /// Lease epoch (the election term).
    pub epoch: u64,
    /// Index of the voter configuration below.
    pub config_index: u64,
    /// The master's node id.
    pub master: NodeId,
    /// When the master took the lease (Unix ms).
    pub since_ms: u64,
    /// Current voters.
    pub voters: BTreeSet<NodeId>,
}

/// One replicated record. Encoded as serde's externally tagged enum (a one-entry map from
/// the kind's name to its body); see [`unknown`] for kinds this version does not know.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Record {
    /// A node's self-description, key `node/<id>`.
    Node(Lww<NodeInfo>),
    /// Operator decisions about a node, key `admin/<id>`.
    Admin(NodeAdmin),
    /// The master lease holder, key `master`.
    Master(MaxReg<MasterInfo>),
    /// A job, key `job/<id>`.
    Job(Box<JobRecord>),
    /// The history horizon, key `history`, written by the master.
    History(MaxReg<Horizon>),
    /// A record of a kind this version does not know (or whose body it cannot decode),
    /// under a key of an unknown kind ([`Key::Other`]): stored and relayed unchanged. Two
    /// versions merge as a max register on `(kind, raw)` (byte-wise), so replicas agree.
    Unknown {
        /// The kind's name (the encoding's tag).
        kind: String,
        /// The body, as canonical CBOR.
        raw: Vec<u8>,
    },
}

/// The key under which a record lives.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// `node/<id>`
    Node(NodeId),
    /// `admin/<id>`
    Admin(NodeId),
    /// `master`
    Master,
    /// `job/<id>`
    Job(String),
    /// `history`
    History,
    /// A well-formed key of a kind this version does not know (see [`Key::parse`]).
    Other(String),
}

impl Key {
    /// Start of every job key.
    pub const JOB_PREFIX: &'static str = "job/";
    /// Start of every node key.
    pub const NODE_PREFIX: &'static str = "node/";
    /// Start of every admin key.
    pub const ADMIN_PREFIX: &'static str = "admin/";

    /// The textual form used on the wire and in the store.
    pub fn encode(&self) -> String {
        match self {
            Key::Node(id) => format!("{}{id}", Key::NODE_PREFIX),
            Key::Admin(id) => format!("{}{id}", Key::ADMIN_PREFIX),
            Key::Master => "master".to_string(),
            Key::Job(id) => format!("{}{id}", Key::JOB_PREFIX),
            Key::History => "history".to_string(),
            Key::Other(text) => text.clone(),
        }
    }

    /// Parse the textual form.
    pub fn parse(text: &str) -> Result<Key, RecordError> {
        if text.len() > MAX_TEXT_LEN {
            return Err(RecordError::BadKey(truncate(text)));
        }
        let key = match text.split_once('/') {
            Some(("node", id)) if valid_id(id) => Key::Node(id.to_string()),
            Some(("admin", id)) if valid_id(id) => Key::Admin(id.to_string()),
            Some(("job", id)) if super::ids::is_ulid(id) => Key::Job(id.to_string()),
            None if text == "master" => Key::Master,
            None if text == "history" => Key::History,
            _ if other_key(text) => Key::Other(text.to_string()),
            _ => return Err(RecordError::BadKey(truncate(text))),
        };
        Ok(key)
    }
}

/// Whether `text` is a well-formed key of a kind this version does not know: a kind name of
/// 1-32 lower-case letters, digits, `_` or `-` (starting with a letter, not one of ours),
/// then optionally `/` and non-empty segments of letters, digits, `-`, `_`, `.`, `:`
/// separated by `/`. The length is bounded by [`Key::parse`].
fn other_key(text: &str) -> bool {
    let (kind, rest) = match text.split_once('/') {
        Some((kind, rest)) => (kind, Some(rest)),
        None => (text, None),
    };
    let kind_ok = !kind.is_empty()
        && kind.len() <= 32
        && kind.starts_with(|c: char| c.is_ascii_lowercase())
        && kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && !["node", "admin", "master", "job", "history"].contains(&kind);
    let rest_ok = rest.is_none_or(|rest| {
        rest.split('/').all(|segment| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        })
    });
    kind_ok && rest_ok
}

/// Why a record was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    /// The key is not one we know.
    #[error("unknown or malformed key {0:?}")]
    BadKey(String),
    /// The record kind does not belong under the key.
    #[error("record kind does not match key {0:?}")]
    KindMismatch(String),
    /// A field is out of bounds.
    #[error("invalid record under {key:?}: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// What was wrong.
        reason: String,
    },
}

impl Record {
    /// Merge another replica's record of the same key; returns whether `self` changed.
    /// Records of different kinds never merge (validation keeps them apart).
    pub fn merge(&mut self, other: &Record) -> bool {
        match (self, other) {
            (Record::Node(a), Record::Node(b)) => a.merge(b),
            (Record::Admin(a), Record::Admin(b)) => a.merge(b),
            (Record::Master(a), Record::Master(b)) => a.merge(b),
            (Record::Job(a), Record::Job(b)) => a.merge(b),
            (Record::History(a), Record::History(b)) => a.merge(b),
            (
                Record::Unknown { kind, raw },
                Record::Unknown {
                    kind: other_kind,
                    raw: other_raw,
                },
            ) if (other_kind.as_str(), other_raw.as_slice()) > (kind.as_str(), raw.as_slice()) => {
                kind.clone_from(other_kind);
                raw.clone_from(other_raw);
                true
            }
            _ => false,
        }
    }

    /// Size of the record's CBOR encoding, in bytes (counted, not buffered).
    pub fn encoded_len(&self) -> usize {
        let mut counter = ByteCounter(0);
        // Writing into a counter cannot fail.
        let _ = ciborium::into_writer(self, &mut counter);
        counter.0
    }

    /// Check that the record may live under `key`, that its fields are within bounds and
    /// that its encoding is at most [`MAX_RECORD_BYTES`].
    pub fn validate(&self, key: &Key) -> Result<(), RecordError> {
        self.validate_fields(key)?;
        if self.encoded_len() > MAX_RECORD_BYTES {
            return Err(RecordError::Invalid {
                key: key.encode(),
                reason: format!("encoded record over {MAX_RECORD_BYTES} bytes"),
            });
        }
        Ok(())
    }

    fn validate_fields(&self, key: &Key) -> Result<(), RecordError> {
        let invalid = |reason: &str| RecordError::Invalid {
            key: key.encode(),
            reason: reason.to_string(),
        };
        match (key, self) {
            (Key::Node(id), Record::Node(info)) => {
                let info = &info.value;
                if &info.id != id {
                    return Err(invalid("node id differs from key"));
                }
                let texts = [&info.name, &info.os, &info.arch, &info.version];
                if texts.iter().any(|t| t.len() > MAX_TEXT_LEN) {
                    return Err(invalid("text field too long"));
                }
                check_list(&info.tags).map_err(|r| invalid(&r))?;
                check_list(&info.addrs).map_err(|r| invalid(&r))?;
                check_list(&info.agents).map_err(|r| invalid(&r))?;
                if info.gpus.len() > MAX_LIST_LEN {
                    return Err(invalid("too many GPUs"));
                }
                if info.slots > MAX_SLOTS {
                    return Err(invalid("too many slots"));
                }
                Ok(())
            }
            (Key::Admin(_), Record::Admin(admin)) => {
                if let Some(tags) = &admin.tags {
                    check_list(&tags.value).map_err(|r| invalid(&r))?;
                }
                if admin.slots.as_ref().is_some_and(|s| s.value > MAX_SLOTS) {
                    return Err(invalid("too many slots"));
                }
                Ok(())
            }
            (Key::Master, Record::Master(master)) => {
                if master.0.voters.len() > MAX_LIST_LEN {
                    return Err(invalid("too many voters"));
                }
                Ok(())
            }
            (Key::Job(id), Record::Job(job)) => job.validate(id).map_err(|r| invalid(&r)),
            (Key::History, Record::History(horizon)) => {
                if !valid_id(&horizon.0.set_by) {
                    return Err(invalid("bad node id"));
                }
                Ok(())
            }
            // A kind of ours that did not decode, under any key, is refused on its own.
            (Key::Other(_), Record::Unknown { kind, .. })
                if !KNOWN_KINDS.contains(&kind.as_str()) =>
            {
                Ok(())
            }
            _ => Err(RecordError::KindMismatch(key.encode())),
        }
    }
}

/// Whether `id` looks like a node id (printable, no separators, bounded).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Check a list of short strings (tags, addresses).
pub fn check_list(items: &[String]) -> Result<(), String> {
    if items.len() > MAX_LIST_LEN {
        return Err(format!("more than {MAX_LIST_LEN} entries"));
    }
    if let Some(bad) = items
        .iter()
        .find(|t| t.is_empty() || t.len() > MAX_TEXT_LEN)
    {
        return Err(format!("entry {:?} is empty or too long", truncate(bad)));
    }
    Ok(())
}

/// Check one tag given by a user: short, and made of letters, digits, `-`, `_`, `.`, `:`.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && tag
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid tag {:?}: use 1-64 letters, digits, '-', '_', '.' or ':'",
            truncate(tag)
        ))
    }
}

impl Record {
    /// The newest hybrid timestamp inside the record (to keep the local clock ahead of it).
    pub fn latest_hlc(&self) -> super::hlc::Hlc {
        let stamps = |a: &NodeAdmin| {
            [
                a.draining.as_ref().map(|l| l.stamp.at),
                a.removed.as_ref().map(|l| l.stamp.at),
                a.tags.as_ref().map(|l| l.stamp.at),
                a.slots.as_ref().map(|l| l.stamp.at),
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or_default()
        };
        match self {
            Record::Node(info) => info.stamp.at,
            Record::Admin(admin) => stamps(admin),
            Record::Master(_) | Record::History(_) => super::hlc::Hlc::default(),
            Record::Job(job) => job.progress.0.stamp.at,
            Record::Unknown { .. } => super::hlc::Hlc::default(),
        }
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

/// A writer that only counts bytes.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::crdt::laws;
    use super::super::hlc::Hlc;
    use super::*;
    use proptest::prelude::*;

    fn stamp() -> impl Strategy<Value = Stamp> {
        (0u64..4, "[ab]").prop_map(|(wall_ms, by)| Stamp {
            at: Hlc {
                wall_ms,
                logical: 0,
            },
            by,
        })
    }

    fn admin() -> impl Strategy<Value = NodeAdmin> {
        let flag =
            || proptest::option::of((stamp(), any::<bool>()).prop_map(|(s, v)| Lww::new(s, v)));
        let tags = proptest::option::of(
            (stamp(), proptest::collection::vec("[xy]", 0..2)).prop_map(|(s, v)| Lww::new(s, v)),
        );
        let slots = proptest::option::of((stamp(), 0u32..3).prop_map(|(s, v)| Lww::new(s, v)));
        (flag(), flag(), tags, slots).prop_map(|(draining, removed, tags, slots)| NodeAdmin {
            draining,
            removed,
            tags,
            slots,
        })
    }

    fn master() -> impl Strategy<Value = MaxReg<MasterInfo>> {
        (0u64..3, 0u64..3, "[ab]").prop_map(|(epoch, config_index, master)| {
            MaxReg(MasterInfo {
                epoch,
                config_index,
                master: master.clone(),
                since_ms: epoch * 10,
                voters: [master].into_iter().collect(),
            })
        })
    }

    proptest! {
        #[test]
        fn node_admin_obeys_the_merge_laws(a in admin(), b in admin(), c in admin()) {
            laws::commutative(&a, &b);
            laws::associative(&a, &b, &c);
            laws::idempotent(&a);
        }

        #[test]
        fn master_record_obeys_the_merge_laws(a in master(), b in master(), c in master()) {
            laws::commutative(&a, &b);
            laws::associative(&a, &b, &c);
            laws::idempotent(&a);
        }

        #[test]
        fn key_parse_never_panics(text in ".{0,300}") {
            let _ = Key::parse(&text);
        }
    }

    #[test]
    fn keys_round_trip() {
        for key in [
            Key::Node("abc".into()),
            Key::Admin("x_1".into()),
            Key::Master,
            Key::History,
        ] {
            assert_eq!(Key::parse(&key.encode()), Ok(key));
        }
        assert!(Key::parse("node/").is_err());
        assert!(Key::parse("node/a/b").is_err());
        // A kind this version does not know: kept, not refused.
        assert_eq!(Key::parse("jobs/x"), Ok(Key::Other("jobs/x".into())));
        assert!(Key::parse("jobs/a b").is_err());
    }

    #[test]
    fn a_record_under_the_wrong_key_is_refused() {
        let record = Record::Admin(NodeAdmin::default());
        assert_eq!(
            record.validate(&Key::Master),
            Err(RecordError::KindMismatch("master".into()))
        );
        assert!(record.validate(&Key::Admin("n1".into())).is_ok());
    }
}
