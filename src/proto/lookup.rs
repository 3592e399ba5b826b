//! Typed reads of replicated records by kind, for every map of records (the replicated state
//! the mesh task owns and the snapshots the API reads), so that no caller spells a key.

use super::crdt::Lww;
use super::history::Horizon;
use super::jobs::JobRecord;
use super::records::{Key, MasterInfo, NodeAdmin, NodeInfo, Record};

/// A map of records by key, read by kind.
pub trait RecordLookup {
    /// The record stored under `key` (its textual form).
    fn record(&self, key: &str) -> Option<&Record>;

    /// Records whose key starts with `prefix`, in key order.
    fn records_from<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Record)> + 'a;

    /// The record under `key`.
    fn by_key(&self, key: &Key) -> Option<&Record> {
        self.record(&key.encode())
    }

    /// Job `id`.
    fn job(&self, id: &str) -> Option<&JobRecord> {
        match self.by_key(&Key::Job(id.to_string())) {
            Some(Record::Job(job)) => Some(job),
            _ => None,
        }
    }

    /// Node `id`'s own record.
    fn node(&self, id: &str) -> Option<&Lww<NodeInfo>> {
        match self.by_key(&Key::Node(id.to_string())) {
            Some(Record::Node(info)) => Some(info),
            _ => None,
        }
    }

    /// Operator decisions about node `id`.
    fn admin(&self, id: &str) -> Option<&NodeAdmin> {
        match self.by_key(&Key::Admin(id.to_string())) {
            Some(Record::Admin(admin)) => Some(admin),
            _ => None,
        }
    }

    /// The newest lease record.
    fn master(&self) -> Option<&MasterInfo> {
        match self.by_key(&Key::Master) {
            Some(Record::Master(m)) => Some(&m.0),
            _ => None,
        }
    }

    /// The history horizon, if a master set one.
    fn horizon(&self) -> Option<&Horizon> {
        match self.by_key(&Key::History) {
            Some(Record::History(h)) => Some(&h.0),
            _ => None,
        }
    }

    /// Every job, in id (submission) order.
    fn all_jobs(&self) -> impl Iterator<Item = &JobRecord> {
        self.records_from(Key::JOB_PREFIX)
            .filter_map(|(_, r)| match r {
                Record::Job(job) => Some(&**job),
                _ => None,
            })
    }

    /// Every node's own record, in id order.
    fn all_nodes(&self) -> impl Iterator<Item = &Lww<NodeInfo>> {
        self.records_from(Key::NODE_PREFIX)
            .filter_map(|(_, r)| match r {
                Record::Node(info) => Some(info),
                _ => None,
            })
    }
}
