//! The scheduler's choice of node for one job: pure, so every rule is unit-tested.
//!
//! Rules: an explicit target gets that node or waits (and says why); a tag target and `any`
//! get the least-loaded online, non-draining node with a free slot (that carries the tag);
//! nodes that refused the job recently are skipped. A node must have the job's agent, and allow
//! local repository paths if the job names any.

use super::crdt::NodeId;
use super::jobs::{JobSpec, Target};

/// What the scheduler knows about a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLoad {
    /// Node id.
    pub id: NodeId,
    /// Node name (for messages).
    pub name: String,
    /// Effective tags.
    pub tags: Vec<String>,
    /// Effective slots.
    pub slots: u32,
    /// Jobs assigned to it and not finished.
    pub running: u32,
    /// Heard from recently.
    pub online: bool,
    /// Takes no new jobs.
    pub draining: bool,
    /// Removed from the mesh.
    pub removed: bool,
    /// Agents the node can run.
    pub agents: Vec<String>,
    /// Jobs may name local repository paths on it.
    pub local_repos: bool,
}

impl NodeLoad {
    /// Whether the node has what a job needs: its `agent`, and local paths if it names any.
    fn can_run(&self, agent: &str, needs_local_repos: bool) -> bool {
        self.agents.iter().any(|a| a == agent) && (self.local_repos || !needs_local_repos)
    }

    fn available(&self) -> bool {
        self.online && !self.draining && !self.removed && self.running < self.slots
    }

    /// Load as a fraction of slots, compared without floating point: (running, slots).
    fn load(&self) -> (u64, u64) {
        (u64::from(self.running), u64::from(self.slots.max(1)))
    }
}

/// The scheduler's decision for one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Give the job to this node.
    Assign(NodeId),
    /// Keep it queued, for this reason (shown to the user).
    Wait(String),
}

/// Choose a node for `spec` among `nodes`, skipping those in `skip` (recent refusals).
pub fn choose(spec: &JobSpec, nodes: &[NodeLoad], skip: &[NodeId]) -> Decision {
    let needs_local_repos = spec.names_local_paths();
    match &spec.target {
        Target::Node(id) => {
            let Some(node) = nodes.iter().find(|n| &n.id == id) else {
                return Decision::Wait(format!("waiting for node {id}, which is unknown"));
            };
            let name = &node.name;
            if node.removed {
                Decision::Wait(format!("waiting for node {name}, which was removed"))
            } else if !node.online {
                Decision::Wait(format!("waiting for node {name}, which is offline"))
            } else if node.draining {
                Decision::Wait(format!("waiting for node {name}, which is draining"))
            } else if node.running >= node.slots {
                Decision::Wait(format!("waiting for a free slot on node {name}"))
            } else if !node.agents.contains(&spec.agent) {
                Decision::Wait(format!(
                    "waiting: node {name} has no agent {:?}",
                    spec.agent
                ))
            } else if needs_local_repos && !node.local_repos {
                Decision::Wait(format!(
                    "waiting: node {name} does not allow local repository paths"
                ))
            } else if skip.contains(&node.id) {
                Decision::Wait(format!("waiting for node {name}, which refused the job"))
            } else {
                Decision::Assign(node.id.clone())
            }
        }
        Target::Tag(tag) => least_loaded(
            nodes
                .iter()
                .filter(|n| n.tags.contains(tag) && n.can_run(&spec.agent, needs_local_repos)),
            skip,
            &format!(
                "waiting for a free slot on a node tagged {tag:?} with agent {:?}",
                spec.agent
            ),
        ),
        Target::Any => least_loaded(
            nodes
                .iter()
                .filter(|n| n.can_run(&spec.agent, needs_local_repos)),
            skip,
            &format!(
                "waiting for a free slot on a node with agent {:?}",
                spec.agent
            ),
        ),
    }
}

fn least_loaded<'a>(
    candidates: impl Iterator<Item = &'a NodeLoad>,
    skip: &[NodeId],
    wait: &str,
) -> Decision {
    candidates
        .filter(|n| n.available() && !skip.contains(&n.id))
        // running/slots smallest first (cross-multiplied), then fewer running, then id.
        .min_by(|a, b| {
            let ((ra, sa), (rb, sb)) = (a.load(), b.load());
            (ra * sb)
                .cmp(&(rb * sa))
                .then(a.running.cmp(&b.running))
                .then(a.id.cmp(&b.id))
        })
        .map_or_else(
            || Decision::Wait(wait.to_string()),
            |n| Decision::Assign(n.id.clone()),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, tags: &[&str], slots: u32, running: u32) -> NodeLoad {
        NodeLoad {
            id: id.into(),
            name: id.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            slots,
            running,
            online: true,
            draining: false,
            removed: false,
            agents: vec!["codex".into()],
            local_repos: false,
        }
    }

    fn spec(target: Target) -> JobSpec {
        JobSpec {
            target,
            ..JobSpec::for_tests("p")
        }
    }

    #[test]
    fn jobs_naming_local_paths_go_only_to_nodes_that_allow_them() {
        let mut local = spec(Target::Any);
        local.repos = vec![super::super::jobs::RepoSpec {
            source: "/srv/code/app".into(),
            branch: None,
        }];
        let mut allowing = node("b", &["gpu"], 4, 3);
        allowing.local_repos = true;
        let nodes = [node("a", &["gpu"], 4, 0), allowing];
        // The busier node, because the idle one does not allow local paths.
        assert_eq!(choose(&local, &nodes, &[]), Decision::Assign("b".into()));
        local.target = Target::Tag("gpu".into());
        assert_eq!(choose(&local, &nodes, &[]), Decision::Assign("b".into()));
        local.target = Target::Node("a".into());
        assert_eq!(
            choose(&local, &nodes, &[]),
            Decision::Wait("waiting: node a does not allow local repository paths".into())
        );
        local.target = Target::Any;
        assert!(matches!(
            choose(&local, &nodes[..1], &[]),
            Decision::Wait(_)
        ));
        // Remote repositories go anywhere.
        assert_eq!(
            choose(&spec(Target::Any), &nodes, &[]),
            Decision::Assign("a".into())
        );
    }

    #[test]
    fn any_goes_to_the_least_loaded_node_with_a_free_slot() {
        let nodes = [
            node("a", &[], 4, 2),
            node("b", &[], 2, 0),
            node("c", &[], 1, 1),
        ];
        assert_eq!(
            choose(&spec(Target::Any), &nodes, &[]),
            Decision::Assign("b".into())
        );
        let full = [node("a", &[], 1, 1)];
        assert!(matches!(
            choose(&spec(Target::Any), &full, &[]),
            Decision::Wait(_)
        ));
    }

    #[test]
    fn tags_filter_and_unavailable_nodes_are_skipped() {
        let mut draining = node("a", &["gpu"], 4, 0);
        draining.draining = true;
        let mut offline = node("b", &["gpu"], 4, 0);
        offline.online = false;
        let nodes = [
            draining,
            offline,
            node("c", &["gpu"], 4, 3),
            node("d", &[], 4, 0),
        ];
        let gpu = spec(Target::Tag("gpu".into()));
        assert_eq!(choose(&gpu, &nodes, &[]), Decision::Assign("c".into()));
        assert!(
            matches!(choose(&gpu, &nodes, &["c".into()]), Decision::Wait(w) if w.contains("gpu"))
        );
    }

    #[test]
    fn an_explicit_target_waits_and_says_why() {
        let mut offline = node("a", &[], 2, 0);
        offline.online = false;
        let job = spec(Target::Node("a".into()));
        assert!(
            matches!(choose(&job, &[offline], &[]), Decision::Wait(w) if w.contains("offline"))
        );
        assert!(
            matches!(choose(&job, &[node("a", &[], 1, 1)], &[]), Decision::Wait(w) if w.contains("free slot"))
        );
        assert_eq!(
            choose(&job, &[node("a", &[], 1, 0)], &[]),
            Decision::Assign("a".into())
        );
        assert!(matches!(choose(&job, &[], &[]), Decision::Wait(w) if w.contains("unknown")));
    }

    #[test]
    fn nodes_without_the_agent_are_not_chosen() {
        let mut bare = node("a", &[], 4, 0);
        bare.agents.clear();
        let nodes = [bare, node("b", &[], 4, 3)];
        assert_eq!(
            choose(&spec(Target::Any), &nodes, &[]),
            Decision::Assign("b".into())
        );
        let pinned = spec(Target::Node("a".into()));
        assert!(
            matches!(choose(&pinned, &nodes, &[]), Decision::Wait(w) if w.contains("no agent"))
        );
    }
}
