//! The change feed: which record changed, in the order this node applied the changes.
//!
//! Every applied change gets the next sequence number of this process. The snapshot keeps,
//! for every key, the number of its latest change, so a reader that remembers the last number
//! it saw can ask the snapshot for everything changed since, each key once at its newest
//! version. The broadcast channel only wakes readers: a reader that lagged behind it loses
//! nothing, it reads the snapshot from its cursor again.

use std::fmt;
use std::sync::Arc;

use crate::proto::records::Key;

/// What kind of object a change is about, as `GET /api/v1/events` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// A node (its own record, or an operator's decision about it).
    Node,
    /// A job.
    Job,
    /// Who is master.
    Master,
}

impl ChangeKind {
    /// The SSE event name.
    pub fn event_name(self) -> &'static str {
        match self {
            ChangeKind::Node => "node",
            ChangeKind::Job => "job",
            ChangeKind::Master => "master",
        }
    }
}

/// The feed key a record key is reported under, with its kind: operator decisions about a
/// node are changes of that node. `None` for keys the feed does not report.
pub fn feed_key(record_key: &str) -> Option<(ChangeKind, String)> {
    match Key::parse(record_key).ok()? {
        Key::Master => Some((ChangeKind::Master, Key::Master.encode())),
        Key::Node(id) | Key::Admin(id) => Some((ChangeKind::Node, Key::Node(id).encode())),
        Key::Job(_) => Some((ChangeKind::Job, record_key.to_string())),
        Key::History | Key::Other(_) => None,
    }
}

/// The kind of a feed key (see [`feed_key`]).
pub fn kind_of(key: &str) -> Option<ChangeKind> {
    feed_key(key).map(|(kind, _)| kind)
}

/// One applied change, as broadcast to readers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Sequence number within this process.
    pub seq: u64,
    /// The feed key (`node/<id>`, `job/<id>` or `master`).
    pub key: Arc<str>,
}

/// The `id:` of an event: the process it came from (its start time) and the sequence number,
/// so that a `Last-Event-ID` from before a restart is recognised as such.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventId {
    /// Start time of the process (Unix ms).
    pub stream: u64,
    /// Sequence number.
    pub seq: u64,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.stream, self.seq)
    }
}

impl EventId {
    /// Parse `<stream>-<seq>`; `None` for anything else.
    pub fn parse(text: &str) -> Option<EventId> {
        let (stream, seq) = text.trim().split_once('-')?;
        Some(EventId {
            stream: stream.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// Where a reader resumes in stream `stream`: after this id when it is of that stream,
    /// else from the start (everything is sent again, each object once).
    pub fn resume_after(last: Option<&str>, stream: u64) -> u64 {
        match last.and_then(EventId::parse) {
            Some(id) if id.stream == stream => id.seq,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_map_to_feed_keys() {
        assert_eq!(
            feed_key("master"),
            Some((ChangeKind::Master, "master".into()))
        );
        assert_eq!(
            feed_key("node/a"),
            Some((ChangeKind::Node, "node/a".into()))
        );
        assert_eq!(
            feed_key("admin/a"),
            Some((ChangeKind::Node, "node/a".into()))
        );
        let job = "job/01J0000000000000000000000A";
        assert_eq!(feed_key(job), Some((ChangeKind::Job, job.into())));
        assert_eq!(feed_key("setting/x"), None);
        assert_eq!(feed_key("weird"), None);
        assert_eq!(kind_of("node/a"), Some(ChangeKind::Node));
    }

    #[test]
    fn event_ids_resume_only_within_their_stream() {
        let id = EventId {
            stream: 17,
            seq: 42,
        };
        assert_eq!(id.to_string(), "17-42");
        assert_eq!(EventId::parse("17-42"), Some(id));
        assert_eq!(EventId::parse("17"), None);
        assert_eq!(EventId::parse("x-1"), None);
        assert_eq!(EventId::resume_after(Some("17-42"), 17), 42);
        assert_eq!(
            EventId::resume_after(Some("16-42"), 17),
            0,
            "another process"
        );
        assert_eq!(EventId::resume_after(Some("garbage"), 17), 0);
        assert_eq!(EventId::resume_after(None, 17), 0);
    }
}
