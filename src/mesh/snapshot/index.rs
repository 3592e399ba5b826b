//! Indexes of the jobs in a snapshot: by status and by node, newest first (job ids are
//! ULIDs, so id order is submission order). Persistent sets: a snapshot shares them with the
//! next one, and an update costs O(log n).

use imbl::{OrdMap, OrdSet};

use crate::proto::crdt::NodeId;
use crate::proto::jobs::{JobRecord, JobStatus};

/// What the indexes file a job under.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Filed {
    status: JobStatus,
    node: Option<NodeId>,
}

/// The job indexes.
#[derive(Clone, Debug, Default)]
pub struct JobIndex {
    all: OrdSet<String>,
    by_status: OrdMap<JobStatus, OrdSet<String>>,
    by_node: OrdMap<NodeId, OrdSet<String>>,
    filed: OrdMap<String, Filed>,
}

/// The node a job's current attempt is assigned to (what the API shows as `node`).
pub fn current_node(job: &JobRecord) -> Option<&NodeId> {
    job.assignment
        .as_ref()
        .map(|a| &a.0)
        .filter(|a| a.attempt == job.progress.0.attempt)
        .map(|a| &a.node)
}

fn remove_from<K: Ord + Clone>(map: &mut OrdMap<K, OrdSet<String>>, key: &K, id: &str) {
    if let Some(set) = map.get_mut(key) {
        set.remove(id);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

impl JobIndex {
    /// File (or re-file) `job` under its current status and node.
    pub fn update(&mut self, job: &JobRecord) {
        let id = job.spec.id.clone();
        let filed = Filed {
            status: job.progress.0.status,
            node: current_node(job).cloned(),
        };
        match self.filed.get(&id) {
            Some(old) if *old == filed => return,
            Some(old) => {
                let old = old.clone();
                remove_from(&mut self.by_status, &old.status, &id);
                if let Some(node) = &old.node {
                    remove_from(&mut self.by_node, node, &id);
                }
            }
            None => {
                self.all.insert(id.clone());
            }
        }
        self.by_status
            .entry(filed.status)
            .or_default()
            .insert(id.clone());
        if let Some(node) = &filed.node {
            self.by_node
                .entry(node.clone())
                .or_default()
                .insert(id.clone());
        }
        self.filed.insert(id, filed);
    }

    /// Ids of the jobs with `status` and/or on `node` (all jobs when both are `None`), in
    /// id order (oldest first; iterate in reverse for newest first). With both filters the
    /// smaller set is walked and checked against the other.
    pub fn matching<'a>(
        &'a self,
        status: Option<JobStatus>,
        node: Option<&'a NodeId>,
    ) -> Box<dyn DoubleEndedIterator<Item = &'a String> + 'a> {
        let empty: &'static OrdSet<String> = empty_set();
        let by_status = status.map(|s| self.by_status.get(&s).unwrap_or(empty));
        let by_node = node.map(|n| self.by_node.get(n).unwrap_or(empty));
        match (by_status, by_node) {
            (None, None) => Box::new(self.all.iter()),
            (Some(set), None) | (None, Some(set)) => Box::new(set.iter()),
            (Some(s), Some(n)) => {
                let (walk, check) = if s.len() <= n.len() { (s, n) } else { (n, s) };
                Box::new(walk.iter().filter(move |id| check.contains(*id)))
            }
        }
    }

    /// How many jobs [`JobIndex::matching`] yields, in O(1) for at most one filter.
    pub fn count(&self, status: Option<JobStatus>, node: Option<&NodeId>) -> usize {
        let len = |set: Option<&OrdSet<String>>| set.map_or(0, |s| s.len());
        match (status, node) {
            (None, None) => self.all.len(),
            (Some(s), None) => len(self.by_status.get(&s)),
            (None, Some(n)) => len(self.by_node.get(n)),
            (Some(_), Some(_)) => self.matching(status, node).count(),
        }
    }

    /// Number of jobs.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Whether there are no jobs.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

fn empty_set() -> &'static OrdSet<String> {
    static EMPTY: std::sync::OnceLock<OrdSet<String>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(OrdSet::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::crdt::{MaxReg, Stamp};
    use crate::proto::jobs::{Assignment, JobSpec, Progress};

    /// A job `id` in `status`, assigned to `node` for its current attempt.
    pub(crate) fn job_record(id: &str, status: JobStatus, node: Option<&str>) -> JobRecord {
        JobRecord {
            compacted: false,
            spec: JobSpec {
                id: id.into(),
                ..JobSpec::for_tests("p")
            },
            attempts: Default::default(),
            extra: Default::default(),
            assignment: node.map(|n| {
                MaxReg(Assignment {
                    epoch: 1,
                    seq: 1,
                    attempt: 1,
                    node: n.into(),
                })
            }),
            progress: MaxReg(Progress {
                attempt: 1,
                assignment: (1, 1),
                status,
                reason: None,
                result: None,
                stamp: Stamp {
                    at: Default::default(),
                    by: "n1".into(),
                },
            }),
        }
    }

    fn ids<'a>(it: impl Iterator<Item = &'a String>) -> Vec<String> {
        it.cloned().collect()
    }

    #[test]
    fn jobs_are_refiled_when_status_or_node_change() {
        let mut index = JobIndex::default();
        let mut a = job_record("01J0000000000000000000000A", JobStatus::Queued, None);
        let b = job_record("01J0000000000000000000000B", JobStatus::Running, Some("n1"));
        index.update(&a);
        index.update(&b);
        assert_eq!(index.len(), 2);
        assert_eq!(index.count(Some(JobStatus::Queued), None), 1);
        assert_eq!(
            ids(index.matching(None, None).rev()),
            vec![b.spec.id.clone(), a.spec.id.clone()]
        );
        a = job_record(&a.spec.id, JobStatus::Running, Some("n1"));
        index.update(&a);
        assert_eq!(index.count(Some(JobStatus::Queued), None), 0);
        assert_eq!(index.count(Some(JobStatus::Running), None), 2);
        let n1 = "n1".to_string();
        assert_eq!(index.count(None, Some(&n1)), 2);
        assert_eq!(index.count(Some(JobStatus::Running), Some(&n1)), 2);
        assert_eq!(index.count(Some(JobStatus::Failed), Some(&n1)), 0);
        assert_eq!(index.count(None, Some(&"n2".to_string())), 0);
        assert_eq!(index.len(), 2, "re-filing does not add a job");
    }

    #[test]
    fn a_snapshot_of_the_index_does_not_see_later_updates() {
        let mut index = JobIndex::default();
        index.update(&job_record(
            "01J0000000000000000000000A",
            JobStatus::Queued,
            None,
        ));
        let before = index.clone();
        index.update(&job_record(
            "01J0000000000000000000000B",
            JobStatus::Queued,
            None,
        ));
        assert_eq!(before.len(), 1);
        assert_eq!(index.len(), 2);
    }
}
