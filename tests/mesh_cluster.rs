//! Multi-process integration tests: every node is a real `codex-mesh`
//! process talking to the others over loopback.
//!
//! Run with `cargo test --test mesh_cluster -- --test-threads 2`.
//! The harness lives in `tests/common/mod.rs`; on failure it prints the tail
//! of every node's log and keeps the temporary directory.
//!
//! Tests only poll with deadlines; they never assert on elapsed time.

mod common;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde::de::DeserializeOwned;

/// The binary under test (cargo builds it before running integration tests).
const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");

/// Expected state of a fully converged 3-node mesh.
const TRIO: Expect = Expect {
    online: 3,
    voters: Some(3),
};

/// Starts n1 (`up`) plus n2, n3 (`join`) and waits for full convergence,
/// including three voters.
fn converged_trio() -> (Mesh, MeshView) {
    let mesh = Mesh::start(BIN, 3);
    let view = mesh.wait_converged(&mesh.all(), TRIO);
    (mesh, view)
}

/// Runs `check` repeatedly (every 50 ms) for the whole `window`.
fn during(window: Duration, mut check: impl FnMut()) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        check();
        thread::sleep(Duration::from_millis(50));
    }
}

/// Sorted copy of a tag list, for order-insensitive comparison.
fn sorted(tags: &[String]) -> Vec<String> {
    let mut tags = tags.to_vec();
    tags.sort();
    tags
}

/// `sorted()` for string literals.
fn tags(list: &[&str]) -> Vec<String> {
    sorted(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
}

/// Waits until every node in `indices` lists `key` in a state accepted by `want`.
fn wait_record(
    mesh: &Mesh,
    indices: &[usize],
    key: &str,
    what: &str,
    want: impl Fn(&NodeRecord) -> bool,
) {
    for &i in indices {
        let node = &mesh.nodes[i];
        poll(
            CONVERGE_TIMEOUT,
            &format!("{} to see {key} {what}", node.name),
            || {
                let records = node.nodes()?;
                let rec = record(&records, key)?;
                if want(rec) {
                    Ok(())
                } else {
                    Err(format!(
                        "{} sees {}",
                        node.name,
                        summarize_records(&records)
                    ))
                }
            },
        );
    }
}

/// Parses the stdout of a successful CLI command as JSON.
fn cli_json<T: DeserializeOwned>(node: &Node, args: &[&str]) -> T {
    let out = node.cli(args);
    assert!(
        out.status.success(),
        "`codex-mesh {args:?}` failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("`codex-mesh {args:?}` printed invalid JSON ({e}): {stdout}"))
}

/// Asserts the contract for user errors: non-zero exit, no panic, and exactly
/// one line on stderr that mentions `needle` (case-insensitive).
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !out.status.success(),
        "expected failure mentioning {needle:?}, but exit status was {}; stderr: {stderr}",
        out.status
    );
    assert!(
        out.status.code().is_some(),
        "process died from a signal ({}); stderr: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "panic on stderr: {stderr}");
    assert_eq!(lines.len(), 1, "expected one stderr line, got: {stderr}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "stderr should mention {needle:?}: {stderr}"
    );
}

/// Asserts an HTTP error status with a JSON `{"error": "..."}` body.
fn assert_json_error(response: std::io::Result<HttpResponse>, status: u16, what: &str) {
    let response = response.unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    assert_eq!(
        response.status, status,
        "{what}: wrong status, body: {}",
        response.body
    );
    let message = response
        .error_message()
        .unwrap_or_else(|| panic!("{what}: body is not {{\"error\": ...}}: {}", response.body));
    assert!(!message.is_empty(), "{what}: empty error message");
}

/// Replaces the value following `flag` in an argument list.
fn set_flag(args: &mut [String], flag: &str, value: &str) {
    let pos = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} missing from {args:?}"));
    args[pos + 1] = value.to_owned();
}

#[test]
fn three_nodes_join_and_converge() {
    let mut mesh = Mesh::new(BIN);
    let n1 = mesh.spawn_up("n1", &NodeOptions::default());
    mesh.nodes[n1].wait_ready(READY_TIMEOUT);

    // Both ticket sources must produce a usable ticket.
    let http_ticket = mesh.nodes[n1].ticket();
    let json: serde_json::Value = cli_json(&mesh.nodes[n1], &["ticket", "--json"]);
    let cli_ticket = json["ticket"]
        .as_str()
        .unwrap_or_else(|| panic!("`ticket --json` has no ticket string: {json}"))
        .to_owned();
    let plain = mesh.nodes[n1].cli(&["ticket"]);
    assert!(plain.status.success(), "`ticket` failed: {plain:?}");
    let plain = String::from_utf8_lossy(&plain.stdout).trim().to_owned();
    assert!(
        !plain.is_empty() && !plain.contains(char::is_whitespace),
        "plain `ticket` output is not a single token: {plain:?}"
    );

    let n2 = mesh.spawn_join("n2", &http_ticket, &NodeOptions::default());
    let n3 = mesh.spawn_join("n3", &cli_ticket, &NodeOptions::default());
    mesh.nodes[n2].wait_ready(READY_TIMEOUT);
    mesh.nodes[n3].wait_ready(READY_TIMEOUT);

    let view = mesh.wait_converged(&mesh.all(), TRIO);
    let names = BTreeSet::from(["n1", "n2", "n3"].map(String::from));
    for node in &mesh.nodes {
        let records = node.nodes().expect("node list after convergence");
        assert_eq!(records.len(), 3, "{}: {records:?}", node.name);
        assert!(
            records.iter().all(|r| r.online && !r.removed),
            "{records:?}"
        );
        let seen: BTreeSet<String> = records.iter().map(|r| r.name.clone()).collect();
        assert_eq!(seen, names, "{} lists other names", node.name);
    }

    // The CLI reports the same as the API.
    let status: Status = cli_json(&mesh.nodes[n2], &["status", "--json"]);
    assert_eq!(status.node_id, mesh.nodes[n2].id());
    assert_eq!(status.name, "n2");
    assert!(
        status.master.is_some(),
        "CLI status has no master: {status:?}"
    );
    assert!(status.epoch >= view.epoch, "{status:?} vs {view:?}");
    let records: Vec<NodeRecord> = cli_json(&mesh.nodes[n3], &["nodes", "--json"]);
    assert_eq!(records.len(), 3, "`nodes --json`: {records:?}");

    // A change of n2 made through n3 reaches everybody.
    let n2_id = mesh.nodes[n2].id().to_owned();
    mesh.nodes[n3].api_ok(
        "PATCH",
        &format!("/api/v1/nodes/{n2_id}"),
        Some(r#"{"tags":["gpu","blue"]}"#),
    );
    wait_record(&mesh, &mesh.all(), &n2_id, "tagged blue,gpu", |r| {
        sorted(&r.tags) == tags(&["blue", "gpu"])
    });
}

#[test]
fn master_failover_after_kill9() {
    let (mut mesh, view) = converged_trio();
    mesh.nodes[view.master_index].kill9();

    let survivors = mesh.all_except(&[view.master_index]);
    let new = mesh.wait_new_master(&survivors, &view);
    assert_ne!(new.master, view.master);
    assert!(new.epoch > view.epoch, "{new:?} after {view:?}");
}

#[test]
fn restarted_node_catches_up_by_anti_entropy() {
    let (mut mesh, view) = converged_trio();
    let followers = mesh.all_except(&[view.master_index]);
    let (victim, drained) = (followers[0], followers[1]);
    let drained_name = mesh.nodes[drained].name.clone();
    let master_name = mesh.nodes[view.master_index].name.clone();

    mesh.nodes[victim].kill9();
    let live = mesh.all_except(&[victim]);
    mesh.nodes[view.master_index].api_ok(
        "POST",
        &format!("/api/v1/nodes/{drained_name}/drain"),
        None,
    );
    mesh.nodes[drained].api_ok(
        "PATCH",
        &format!("/api/v1/nodes/{master_name}"),
        Some(r#"{"tags":["after-restart"]}"#),
    );
    wait_record(&mesh, &live, &drained_name, "draining", |r| r.draining);
    wait_record(&mesh, &live, &master_name, "re-tagged", |r| {
        r.tags == tags(&["after-restart"])
    });

    mesh.nodes[victim].restart();
    wait_record(&mesh, &[victim], &drained_name, "draining", |r| r.draining);
    wait_record(&mesh, &[victim], &master_name, "re-tagged", |r| {
        r.tags == tags(&["after-restart"])
    });
    let node = &mesh.nodes[victim];
    poll(
        CONVERGE_TIMEOUT,
        "anti-entropy records on the restarted node",
        || {
            let received = node.metric("codex_mesh_anti_entropy_records_received_total")?;
            if received > 0.0 {
                Ok(())
            } else {
                Err(format!("{} received {received} records", node.name))
            }
        },
    );
}

/// Specs for n1..n3 on fixed p2p ports, so that after a full restart the nodes can find each
/// other again through the addresses they stored.
fn fixed_port_trio() -> Vec<(String, NodeOptions)> {
    (1..=3)
        .map(|i| {
            let opts = NodeOptions {
                p2p_port: free_port(),
                extra: Vec::new(),
            };
            (format!("n{i}"), opts)
        })
        .collect()
}

#[test]
fn full_restart_keeps_state() {
    let specs = fixed_port_trio();
    let mut mesh = Mesh::start_with(BIN, specs.clone());
    mesh.wait_converged(&mesh.all(), TRIO);
    let ids_before: Vec<String> = mesh.nodes.iter().map(|n| n.id().to_owned()).collect();

    mesh.nodes[0].api_ok("POST", "/api/v1/nodes/n3/drain", None);
    mesh.nodes[1].api_ok(
        "PATCH",
        "/api/v1/nodes/n2",
        Some(r#"{"tags":["kept"],"slots":5}"#),
    );
    let all = mesh.all();
    wait_record(&mesh, &all, "n3", "draining", |r| r.draining);
    wait_record(&mesh, &all, "n2", "tagged kept with 5 slots", |r| {
        r.tags == tags(&["kept"]) && r.slots == 5
    });

    for node in &mut mesh.nodes {
        let status = node.terminate(SHUTDOWN_TIMEOUT);
        assert!(
            status.success(),
            "{} exited with {status} on SIGTERM",
            node.name
        );
    }

    // Everybody resumes with plain `up` on its existing data dir.
    for (node, (name, opts)) in mesh.nodes.iter_mut().zip(&specs) {
        let args = up_args(node.data_dir(), name, opts);
        node.restart_with_args(args);
    }
    let ids_after: Vec<String> = mesh.nodes.iter().map(|n| n.id().to_owned()).collect();
    assert_eq!(ids_after, ids_before, "node ids changed across restart");

    // A master is elected again (wait_converged checks is_master on it).
    mesh.wait_converged(&all, TRIO);
    wait_record(&mesh, &all, "n3", "still draining", |r| r.draining);
    wait_record(&mesh, &all, "n2", "still tagged kept with 5 slots", |r| {
        r.tags == tags(&["kept"]) && r.slots == 5
    });
}

#[test]
fn paused_master_does_not_act_after_resume() {
    let (mesh, view) = converged_trio();
    let old = view.master_index;
    mesh.nodes[old].stop();

    let live = mesh.all_except(&[old]);
    let new = mesh.wait_new_master(&live, &view);
    mesh.nodes[old].cont();

    let node = &mesh.nodes[old];
    let mut answers = 0;
    during(Duration::from_secs(3), || {
        if let Ok(status) = node.status() {
            answers += 1;
            assert!(
                !status.is_master,
                "resumed old master claims is_master after a new master was elected \
                 (new master {}, epoch {}): {status:?}",
                new.master, new.epoch
            );
        }
    });
    assert!(
        answers > 0,
        "old master never answered during 3 s after SIGCONT"
    );

    poll(
        CONVERGE_TIMEOUT,
        "old master to follow the new master",
        || {
            let status = node.status()?;
            assert!(!status.is_master, "old master claims is_master: {status:?}");
            if status.master.as_deref() == Some(new.master.as_str()) {
                Ok(())
            } else {
                Err(format!("old master reports {status:?}, new is {new:?}"))
            }
        },
    );
}

#[test]
fn foreign_mesh_key_is_refused() {
    let mesh_a = Mesh::start(BIN, 1);
    let n1 = &mesh_a.nodes[0];
    let addr = poll(READY_TIMEOUT, "a loopback listen address of n1", || {
        let status = n1.status()?;
        status
            .listen_addrs
            .iter()
            .find(|a| a.starts_with("/ip4/127.0.0.1/"))
            .cloned()
            .ok_or_else(|| format!("listen_addrs: {:?}", status.listen_addrs))
    });

    let mut mesh_b = Mesh::new(BIN);
    let m1 = mesh_b.spawn_up("m1", &NodeOptions::with_extra(&["--peer", &addr]));
    mesh_b.nodes[m1].wait_ready(READY_TIMEOUT);
    let m1 = &mesh_b.nodes[m1];

    let assert_alone = |node: &Node| {
        let records = node.nodes().expect("node list");
        assert_eq!(
            records.len(),
            1,
            "{} learned about a foreign node: {}",
            node.name,
            summarize_records(&records)
        );
    };
    during(Duration::from_secs(5), || {
        assert_alone(n1);
        assert_alone(m1);
    });
    for node in [n1, m1] {
        assert_alone(node);
        let peers = node
            .metric("codex_mesh_peers_connected")
            .expect("peers metric");
        assert_eq!(peers, 0.0, "{} is connected to a foreign peer", node.name);
    }
}

#[test]
fn bad_input_errors() {
    let mut mesh = Mesh::start(BIN, 1);
    let ticket = mesh.nodes[0].ticket();
    let defaults = NodeOptions::default();

    // A ticket that is not a ticket.
    let args = join_args("garbage", &mesh.data_dir("x1"), "x1", &defaults);
    assert_one_line_error(&run_cli(mesh.bin(), &args, CLI_TIMEOUT), "ticket");

    // A data dir that already belongs to another mesh.
    let other = mesh.spawn_up("other", &defaults);
    mesh.nodes[other].wait_ready(READY_TIMEOUT);
    let status = mesh.nodes[other].terminate(SHUTDOWN_TIMEOUT);
    assert!(status.success(), "other mesh exited with {status}");
    let other_dir = mesh.nodes[other].data_dir().to_owned();
    let args = join_args(&ticket, &other_dir, "other", &defaults);
    assert_one_line_error(&run_cli(mesh.bin(), &args, CLI_TIMEOUT), "another mesh");

    // An HTTP port that is already taken.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
    let port = taken.local_addr().expect("local addr").port();
    let mut args = up_args(&mesh.data_dir("x2"), "x2", &defaults);
    set_flag(&mut args, "--http", &format!("127.0.0.1:{port}"));
    assert_one_line_error(&run_cli(mesh.bin(), &args, CLI_TIMEOUT), "in use");
    drop(taken);

    // A corrupt store.
    let store = other_dir.join("state.redb");
    assert!(store.exists(), "{} was not created", store.display());
    overwrite_with_garbage(&store);
    let args = up_args(&other_dir, "other", &defaults);
    assert_one_line_error(&run_cli(mesh.bin(), &args, CLI_TIMEOUT), "store");

    // HTTP API errors.
    let n1 = &mesh.nodes[0];
    let url = format!("{}/api/v1/status", n1.endpoint().url);
    let anonymous = http_request("GET", &url, None, None).expect("GET status without token");
    assert_eq!(anonymous.status, 401, "no token: {}", anonymous.body);
    assert_json_error(
        n1.api(
            "PATCH",
            "/api/v1/nodes/no-such-node",
            Some(r#"{"tags":["x"]}"#),
        ),
        404,
        "PATCH of an unknown node",
    );
    assert_json_error(
        n1.api("PATCH", "/api/v1/nodes/n1", Some(r#"{"slots": -1}"#)),
        400,
        "PATCH with negative slots",
    );
    assert_json_error(
        n1.api("PATCH", "/api/v1/nodes/n1", Some(r#"{"tags": [oops"#)),
        400,
        "PATCH with invalid JSON",
    );
}

#[test]
fn removed_node_is_refused_until_admitted() {
    let (mesh, _view) = converged_trio();
    let n3_id = mesh.nodes[2].id().to_owned();
    mesh.nodes[0].api_ok("DELETE", &format!("/api/v1/nodes/{n3_id}"), None);

    let observers = [0, 1];
    let is_out = |r: &NodeRecord| r.removed && !r.online;
    wait_record(&mesh, &observers, &n3_id, "removed and offline", is_out);
    // It must stay out: n3 keeps trying, but is refused.
    during(Duration::from_secs(2), || {
        for &i in &observers {
            let records = mesh.nodes[i].nodes().expect("node list");
            let rec = record(&records, &n3_id).expect("removed node stays listed");
            assert!(is_out(rec), "{} sees n3 back: {rec:?}", mesh.nodes[i].name);
        }
    });

    mesh.nodes[0].api_ok("POST", &format!("/api/v1/nodes/{n3_id}/admit"), None);
    wait_record(&mesh, &[0], &n3_id, "admitted and online", |r| {
        r.online && !r.removed
    });
}

#[test]
fn worker_only_node_never_becomes_master() {
    let mut mesh = Mesh::new(BIN);
    let n1 = mesh.spawn_up("n1", &NodeOptions::default());
    mesh.nodes[n1].wait_ready(READY_TIMEOUT);
    let ticket = mesh.nodes[n1].ticket();
    let n2 = mesh.spawn_join("n2", &ticket, &NodeOptions::with_extra(&["--no-master"]));
    mesh.nodes[n2].wait_ready(READY_TIMEOUT);

    let pair = Expect {
        online: 2,
        voters: Some(1),
    };
    let view = mesh.wait_converged(&mesh.all(), pair);
    assert_eq!(view.master_index, n1, "the worker-only node became master");
    let worker_id = mesh.nodes[n2].id().to_owned();
    during(Duration::from_secs(3), || {
        for node in &mesh.nodes {
            let status = node.status().expect("status");
            assert!(
                !status.voters.contains(&worker_id),
                "{} lists the worker-only node as voter: {status:?}",
                node.name
            );
        }
    });

    mesh.nodes[n1].kill9();
    let worker = &mesh.nodes[n2];
    let mut answers = 0;
    during(Duration::from_secs(5), || {
        if let Ok(status) = worker.status() {
            answers += 1;
            assert!(!status.is_master, "worker-only node is master: {status:?}");
            assert_ne!(status.master.as_deref(), Some(worker_id.as_str()));
        }
    });
    assert!(answers > 0, "worker-only node stopped answering");
}

#[test]
fn known_peers_bootstrap_a_restart_without_the_ticket_peer() {
    // n2 and n3 joined through n1's ticket. After everyone stops, they come back while n1
    // stays down: they must find each other through the peers they stored, and as two of
    // three voters they elect a master among themselves.
    let specs = fixed_port_trio();
    let mut mesh = Mesh::start_with(BIN, specs);
    let before = mesh.wait_converged(&mesh.all(), TRIO);
    for node in &mut mesh.nodes {
        let status = node.terminate(SHUTDOWN_TIMEOUT);
        assert!(status.success(), "{} exited with {status}", node.name);
    }
    // The joiners restart with their original `join <ticket>` command line; the ticket
    // only names n1, which is down.
    for i in [1, 2] {
        mesh.nodes[i].restart();
    }
    let live = [1, 2];
    let after = poll(CONVERGE_TIMEOUT, "a master among n2 and n3", || {
        let statuses = mesh.statuses(&live)?;
        mesh.agreement(&statuses, live.len(), |s| {
            s.epoch > before.epoch && s.master.as_deref() != Some(mesh.nodes[0].id())
        })
    });
    assert_ne!(after.master, mesh.nodes[0].id());
    let peers = mesh.nodes[1]
        .metric("codex_mesh_peers_connected")
        .expect("metrics");
    assert!(peers >= 1.0, "n2 reconnected to n3 (peers {peers})");
}
