//! Peers exchange their protocol version when they connect: a node that advertises another
//! major version (set with the test-only fault `protocol_major`) is refused by the mesh, with
//! one warning, and never becomes a member.

mod common;

use std::time::Duration;

use common::{join_args, poll, record, Mesh, Node, NodeOptions, CONVERGE_TIMEOUT, READY_TIMEOUT};

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");

fn log_of(mesh: &Mesh, name: &str) -> String {
    std::fs::read_to_string(mesh.root().join(format!("{name}.log"))).unwrap_or_default()
}

#[test]
fn a_node_of_another_major_version_is_refused() {
    let mut mesh = Mesh::start(BIN, 1);
    let ticket = mesh.nodes[0].ticket();
    let data = mesh.data_dir("odd");
    let args = join_args(&ticket, &data, "odd", &NodeOptions::default());
    let mut odd = Node::spawn_with_env(
        mesh.bin(),
        "odd",
        &data,
        args,
        vec![(
            "CODEX_MESH_FAULTS".to_string(),
            "protocol_major=99".to_string(),
        )],
    );
    odd.wait_ready(READY_TIMEOUT);
    let odd_id = odd.id().to_string();

    // Both sides refuse; whichever reads the other's version first closes the connection,
    // so the other side may never see it. One of the two logs the refusal.
    let refusal = format!("refusing peer {odd_id}");
    let n1_id = mesh.nodes[0].id().to_string();
    let odd_refusal = format!("refusing peer {n1_id}");
    let line = poll(
        CONVERGE_TIMEOUT,
        "a refusal between n1 and the odd node",
        || {
            let n1_log = log_of(&mesh, "n1");
            let odd_log = log_of(&mesh, "odd");
            n1_log
                .lines()
                .find(|line| line.contains(&refusal))
                .or_else(|| odd_log.lines().find(|line| line.contains(&odd_refusal)))
                .map(str::to_string)
                .ok_or_else(|| "no refusal logged yet".to_string())
        },
    );
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("codex-mesh/99.0"), "{line}");
    assert!(line.contains("codex-mesh/1.0"), "{line}");

    // A node of our version joins meanwhile; the odd one never appears.
    let n2 = mesh.spawn_join("n2", &ticket, &NodeOptions::default());
    mesh.nodes[n2].wait_ready(READY_TIMEOUT);
    let n2_id = mesh.nodes[n2].id().to_string();
    poll(CONVERGE_TIMEOUT, "n1 to list n2 online", || {
        let nodes = mesh.nodes[0].nodes()?;
        if nodes.iter().any(|n| n.id == odd_id && n.online) {
            panic!("the odd node is online at n1: {nodes:?}");
        }
        if record(&nodes, &n2_id)?.online {
            Ok(())
        } else {
            Err(format!("n2 not online yet: {nodes:?}"))
        }
    });
    let nodes = mesh.nodes[0].nodes().expect("nodes");
    assert!(
        nodes.iter().all(|n| n.id != odd_id),
        "n1 knows the odd node: {nodes:?}"
    );
    let odd_status = odd.status().expect("odd status");
    assert_eq!(odd_status.members.online, 1, "{odd_status:?}");
    // Refused once, not at every redial.
    let warnings = log_of(&mesh, "n1")
        .lines()
        .filter(|line| line.contains(&refusal) && line.contains("WARN"))
        .count();
    assert!(warnings <= 1, "{}", log_of(&mesh, "n1"));
    odd.terminate(Duration::from_secs(30));
}
