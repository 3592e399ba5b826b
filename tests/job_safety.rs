//! Jobs reach an end under node failures, and an attempt runs once: real nodes as separate
//! processes, killed with `kill -9` (some at exact points, through `CODEX_MESH_FAULTS`),
//! restarted within the offline window, or paused past it.

mod common;

use std::time::Duration;

use common::{
    job_finished, join_args, poll, submit_job, up_args, wait_job, Expect, Mesh, Node, NodeOptions,
};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");

/// An agent that takes long in its first attempt and finishes at once in later ones.
const SLOW_FIRST: &str =
    "slowfirst=sh -c 'if [ \"$CODEX_MESH_ATTEMPT\" = 1 ]; then sleep 120; fi; echo finished attempt $CODEX_MESH_ATTEMPT'";

fn attempt(job: &Value, n: usize) -> &Value {
    &job["attempts"][n]
}

#[test]
fn a_worker_restarted_within_the_offline_window_reconciles_its_jobs() {
    let specs = vec![
        (
            "n1".to_string(),
            NodeOptions::with_extra(&["--agent", SLOW_FIRST]),
        ),
        (
            "n2".to_string(),
            NodeOptions::with_extra(&["--agent", SLOW_FIRST]),
        ),
    ];
    let mut mesh = Mesh::start_with(BIN, specs);
    mesh.wait_converged(
        &mesh.all(),
        Expect {
            online: 2,
            voters: None,
        },
    );
    let id = submit_job(
        &mesh.nodes[0],
        json!({"prompt": "x", "agent": "slowfirst", "node": "n2"}),
    );
    wait_job(&mesh.nodes[0], &id, "the job running on n2", |j| {
        j["status"] == "running"
    });
    // Killed and back long before its heartbeats could time out.
    mesh.nodes[1].kill9();
    mesh.nodes[1].restart();
    let job = wait_job(&mesh.nodes[0], &id, "the second attempt to finish", |j| {
        j["attempt"] == 2 && job_finished(j)
    });
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["result"]["final_message"], "finished attempt 2",
        "{job}"
    );
    let first = attempt(&job, 0);
    assert_eq!(first["attempt"], 1, "{job}");
    assert_eq!(first["status"], "lost", "{job}");
    assert_eq!(first["node"], mesh.nodes[1].id(), "{job}");
    assert!(
        first["reason"]
            .as_str()
            .is_some_and(|r| r.contains("restarted")),
        "{job}"
    );
    assert!(
        first["started_at"].as_u64().is_some() && first["ended_at"].as_u64().is_some(),
        "{job}"
    );
    assert_eq!(attempt(&job, 1)["status"], "succeeded", "{job}");
    // The CLI shows both attempts.
    let out = mesh.nodes[0].cli(&["job", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("lost on n2") && text.contains("node restarted"),
        "{text}"
    );
    assert!(text.contains("succeeded on n2"), "{text}");
}

#[test]
fn a_master_killed_right_after_it_committed_an_assignment_hands_the_job_on() {
    let mut mesh = Mesh::new(BIN);
    let agent = ["--agent", "ok=sh -c 'echo done'"];
    let opts = NodeOptions::with_extra(&agent);
    let first = Node::spawn_with_env(
        mesh.bin(),
        "n1",
        &mesh.data_dir("n1"),
        up_args(&mesh.data_dir("n1"), "n1", &opts),
        vec![("CODEX_MESH_FAULTS".into(), "assignment-committed".into())],
    );
    mesh.nodes.push(first);
    mesh.nodes[0].wait_ready(Duration::from_secs(30));
    let ticket = mesh.nodes[0].ticket();
    for name in ["n2", "n3"] {
        let args = join_args(&ticket, &mesh.data_dir(name), name, &opts);
        let i = mesh.spawn(name, args);
        mesh.nodes[i].wait_ready(Duration::from_secs(30));
    }
    let view = mesh.wait_converged(
        &mesh.all(),
        Expect {
            online: 3,
            voters: Some(3),
        },
    );
    assert_eq!(view.master_index, 0, "n1 founded the mesh and leads");
    // The master's own slots are off, so the job must travel to another node.
    mesh.nodes[0].api_ok("POST", "/api/v1/nodes/n1/drain", None);
    let id = submit_job(&mesh.nodes[1], json!({"prompt": "x", "agent": "ok"}));
    // n1 dies at the point: the assignment is committed, no worker has it yet.
    poll(
        Duration::from_secs(30),
        "n1 to crash at the fault point",
        || {
            if mesh.nodes[0].is_running() {
                Err("still running".into())
            } else {
                Ok(())
            }
        },
    );
    let job = wait_job(
        &mesh.nodes[1],
        &id,
        "the job to finish under the next master",
        job_finished,
    );
    assert_eq!(job["status"], "succeeded", "{job}");
    // The crashed master comes back without the fault and agrees.
    mesh.nodes[0].set_envs(Vec::new());
    mesh.nodes[0].restart();
    wait_job(&mesh.nodes[0], &id, "n1 to learn the outcome", |j| {
        j["status"] == "succeeded"
    });
}

#[test]
fn a_retried_attempt_waits_for_the_old_run_on_the_same_node_to_stop() {
    let specs = vec![
        (
            "n1".to_string(),
            NodeOptions::with_extra(&["--agent", SLOW_FIRST]),
        ),
        (
            "n2".to_string(),
            NodeOptions::with_extra(&["--agent", SLOW_FIRST]),
        ),
    ];
    let mesh = Mesh::start_with(BIN, specs);
    mesh.wait_converged(
        &mesh.all(),
        Expect {
            online: 2,
            voters: None,
        },
    );
    let id = submit_job(
        &mesh.nodes[0],
        json!({"prompt": "x", "agent": "slowfirst", "node": "n2"}),
    );
    wait_job(&mesh.nodes[0], &id, "the job running on n2", |j| {
        j["status"] == "running"
    });
    // Paused past the offline window: the master gives up on attempt 1 and queues attempt 2
    // for n2, which still runs attempt 1 when it wakes.
    mesh.nodes[1].stop();
    let requeued = wait_job(&mesh.nodes[0], &id, "attempt 2 to be queued", |j| {
        j["attempt"] == 2
    });
    mesh.nodes[1].cont();
    assert!(
        attempt(&requeued, 0)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("offline")),
        "{requeued}"
    );
    let job = wait_job(
        &mesh.nodes[0],
        &id,
        "attempt 2 to finish on n2",
        job_finished,
    );
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    assert_eq!(
        job["result"]["final_message"], "finished attempt 2",
        "{job}"
    );
    assert_eq!(job["node"], mesh.nodes[1].id(), "{job}");
}
