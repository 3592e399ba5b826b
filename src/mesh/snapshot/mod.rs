//! Immutable read snapshots of the mesh and the change feed, so that API reads never wait
//! on the mesh task.
//!
//! The mesh task owns a [`SnapshotWriter`]: every applied change goes into its persistent
//! maps (O(log n), records shared by `Arc`, not copied), and after each input the task
//! publishes a new [`Snapshot`] (a handful of pointer copies) on a `watch` channel, then
//! wakes feed readers on a `broadcast` channel. Readers hold a [`Reader`].

pub mod feed;
pub mod index;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use imbl::OrdMap;
use tokio::sync::{broadcast, watch};

use super::liveness::Liveness;
use crate::proto::crdt::NodeId;
use crate::proto::lookup::RecordLookup;
use crate::proto::records::Record;
use feed::Change;
use index::JobIndex;

/// How many changes the broadcast channel holds for a slow reader before it lags (a lagged
/// reader re-reads the snapshot, so this bounds memory, not correctness).
pub const FEED_CAPACITY: usize = 1024;

/// What this node knows beyond the replicated records, as of the snapshot.
#[derive(Clone, Debug)]
pub struct LocalFacts {
    /// This node's id.
    pub id: NodeId,
    /// This node's name.
    pub name: String,
    /// Public mesh id.
    pub mesh_id: String,
    /// The lease clock (ms) when the facts were taken; liveness is judged at this time.
    pub at: u64,
    /// Unix ms when the facts were taken.
    pub at_unix: u64,
    /// Until when (Unix ms) this node holds the lease without further acknowledgements;
    /// `None` when it did not hold it. Judged at read time, so that a snapshot taken before
    /// the process was paused does not claim the lease afterwards.
    pub master_until_unix: Option<u64>,
    /// The leader this node's election knows of.
    pub leader: Option<NodeId>,
    /// This node's election term.
    pub term: u64,
    /// The voters of this node's configuration.
    pub voters: BTreeSet<NodeId>,
    /// When each node was last heard from.
    pub liveness: Liveness,
    /// Peers with an open connection.
    pub connected: usize,
    /// Dialable addresses, with `/p2p/<id>`.
    pub listen_addrs: Vec<String>,
    /// Where this node keeps job logs.
    pub log_dir: PathBuf,
    /// Start of this process (Unix ms): names the change stream in event ids.
    pub stream: u64,
}

impl LocalFacts {
    /// The facts of a node that has not started yet: not master, no peers, no addresses.
    pub fn before_start(id: &str, name: &str, mesh_id: &str, log_dir: PathBuf) -> LocalFacts {
        let now = super::unix_ms();
        LocalFacts {
            id: id.to_string(),
            name: name.to_string(),
            mesh_id: mesh_id.to_string(),
            at: 0,
            at_unix: now,
            master_until_unix: None,
            leader: None,
            term: 0,
            voters: BTreeSet::new(),
            liveness: Liveness::default(),
            connected: 0,
            listen_addrs: Vec::new(),
            log_dir,
            stream: now,
        }
    }
}

impl LocalFacts {
    /// Whether this node holds the lease now, by the wall clock.
    pub fn is_master_now(&self) -> bool {
        self.master_until_unix
            .is_some_and(|until| super::unix_ms() < until)
    }
}

/// An immutable view of the mesh as one node knows it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    records: OrdMap<String, Arc<Record>>,
    jobs: JobIndex,
    changes: OrdMap<u64, Arc<str>>,
    seq: u64,
    local: Arc<LocalFacts>,
}

impl RecordLookup for Snapshot {
    fn record(&self, key: &str) -> Option<&Record> {
        self.get(key)
    }

    fn records_from<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Record)> + 'a {
        self.records
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, r)| (k, &**r))
    }
}

impl Snapshot {
    /// The record under `key`.
    pub fn get(&self, key: &str) -> Option<&Record> {
        self.records.get(key).map(|r| &**r)
    }

    /// The job indexes.
    pub fn jobs(&self) -> &JobIndex {
        &self.jobs
    }

    /// What this node knows beyond the records.
    pub fn local(&self) -> &LocalFacts {
        &self.local
    }

    /// The sequence number of the newest change in this snapshot.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Feed keys changed after `seq`, each once, with the number of its newest change, in
    /// the order of those changes.
    pub fn changes_after(&self, seq: u64) -> impl Iterator<Item = (u64, &Arc<str>)> + '_ {
        self.changes
            .range(seq.saturating_add(1)..)
            .map(|(seq, key)| (*seq, key))
    }
}

/// The mesh task's side: keeps the maps up to date and publishes snapshots.
pub struct SnapshotWriter {
    records: OrdMap<String, Arc<Record>>,
    jobs: JobIndex,
    changes: OrdMap<u64, Arc<str>>,
    latest: std::collections::HashMap<Arc<str>, u64>,
    seq: u64,
    pending: Vec<Change>,
    dirty: bool,
    published: watch::Sender<Arc<Snapshot>>,
    feed: broadcast::Sender<Change>,
}

/// A reader's handle: the latest snapshot and the change feed.
#[derive(Clone)]
pub struct Reader {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    feed: broadcast::Sender<Change>,
}

impl Reader {
    /// The latest published snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// Subscribe to the change feed. Subscribe first, then read [`Reader::current`], so that
    /// no change falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.feed.subscribe()
    }
}

impl SnapshotWriter {
    /// An empty writer, with the first (empty) snapshot published.
    pub fn new(local: LocalFacts) -> (SnapshotWriter, Reader) {
        let first = Arc::new(Snapshot {
            records: OrdMap::new(),
            jobs: JobIndex::default(),
            changes: OrdMap::new(),
            seq: 0,
            local: Arc::new(local),
        });
        let (published, snapshots) = watch::channel(first);
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let writer = SnapshotWriter {
            records: OrdMap::new(),
            jobs: JobIndex::default(),
            changes: OrdMap::new(),
            latest: Default::default(),
            seq: 0,
            pending: Vec::new(),
            dirty: false,
            published,
            feed: feed.clone(),
        };
        (writer, Reader { snapshots, feed })
    }

    /// Note that `record` is now the record under `key`.
    pub fn record_changed(&mut self, key: &str, record: Arc<Record>) {
        if let Record::Job(job) = &*record {
            self.jobs.update(job);
        }
        self.records.insert(key.to_string(), record);
        if let Some((_, feed_key)) = feed::feed_key(key) {
            self.touch(&feed_key);
        }
        self.dirty = true;
    }

    /// Report `feed_key` as changed without a record change (say, a node went offline).
    pub fn touch(&mut self, feed_key: &str) {
        self.seq += 1;
        let key: Arc<str> = match self.latest.get_key_value(feed_key) {
            Some((key, _)) => key.clone(),
            None => Arc::from(feed_key),
        };
        if let Some(old) = self.latest.insert(key.clone(), self.seq) {
            self.changes.remove(&old);
        }
        self.changes.insert(self.seq, key.clone());
        self.pending.push(Change { seq: self.seq, key });
        self.dirty = true;
    }

    /// Whether anything changed since the last publication.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The snapshot as of now, with `local`, without publishing it.
    pub fn build(&self, local: LocalFacts) -> Snapshot {
        Snapshot {
            records: self.records.clone(),
            jobs: self.jobs.clone(),
            changes: self.changes.clone(),
            seq: self.seq,
            local: Arc::new(local),
        }
    }

    /// Publish `snapshot` (built by [`SnapshotWriter::build`] from the current state), then
    /// wake the feed's readers.
    pub fn publish(&mut self, snapshot: Snapshot) -> Arc<Snapshot> {
        let snapshot = Arc::new(snapshot);
        self.published.send_replace(snapshot.clone());
        for change in self.pending.drain(..) {
            // No reader is no error.
            let _ = self.feed.send(change);
        }
        self.dirty = false;
        snapshot
    }

    /// The latest published snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.published.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::crdt::MaxReg;
    use crate::proto::records::MasterInfo;

    fn local() -> LocalFacts {
        LocalFacts::before_start("me", "me", "m", PathBuf::from("/nonexistent"))
    }

    fn master(epoch: u64) -> Arc<Record> {
        Arc::new(Record::Master(MaxReg(MasterInfo {
            epoch,
            config_index: 1,
            master: "me".into(),
            since_ms: 0,
            voters: BTreeSet::new(),
        })))
    }

    #[test]
    fn a_published_snapshot_does_not_change_afterwards() {
        let (mut writer, reader) = SnapshotWriter::new(local());
        writer.record_changed("master", master(1));
        let first = writer.publish(writer.build(local()));
        writer.record_changed("master", master(2));
        let _ = writer.publish(writer.build(local()));
        assert_eq!(first.master().map(|m| m.epoch), Some(1));
        assert_eq!(reader.current().master().map(|m| m.epoch), Some(2));
    }

    #[test]
    fn changes_after_a_cursor_name_each_key_once_at_its_newest_change() {
        let (mut writer, reader) = SnapshotWriter::new(local());
        let mut feed = reader.subscribe();
        writer.record_changed("master", master(1)); // 1
        writer.touch("node/a"); // 2
        writer.record_changed("master", master(2)); // 3
        writer.touch("node/b"); // 4
        writer.record_changed("admin/a", Arc::new(Record::Admin(Default::default()))); // 5
        writer.record_changed("bogus", master(3)); // not a feed key
        let snap = writer.publish(writer.build(local()));
        let all: Vec<(u64, String)> = snap
            .changes_after(0)
            .map(|(seq, key)| (seq, key.to_string()))
            .collect();
        assert_eq!(
            all,
            vec![
                (3, "master".into()),
                (4, "node/b".into()),
                (5, "node/a".into())
            ]
        );
        let later: Vec<u64> = snap.changes_after(3).map(|(seq, _)| seq).collect();
        assert_eq!(later, vec![4, 5]);
        assert_eq!(snap.seq(), 5);
        // Readers are woken once per change, after the snapshot that holds it is out.
        let woken: Vec<u64> = std::iter::from_fn(|| feed.try_recv().ok())
            .map(|c| c.seq)
            .collect();
        assert_eq!(woken, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_reader_that_lags_loses_nothing_it_can_read_from_the_snapshot() {
        let (mut writer, reader) = SnapshotWriter::new(local());
        let mut feed = reader.subscribe();
        for i in 0..(FEED_CAPACITY as u64 + 10) {
            writer.touch(&format!("node/n{i}"));
        }
        let snap = writer.publish(writer.build(local()));
        assert!(matches!(
            feed.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
        assert_eq!(snap.changes_after(0).count(), FEED_CAPACITY + 10);
    }
}
