//! A peer that holds the mesh key but sends garbage: malformed, oversized and invalid messages
//! must be dropped and counted, never stored, and never take the node down.

mod common;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use codex_mesh::metrics::Metrics;
use codex_mesh::net;
use codex_mesh::proto::crdt::Lww;
use codex_mesh::proto::records::{NodeAdmin, Record};
use codex_mesh::wire::{Gossip, Request, Response};
use common::{up_args, Node, NodeOptions};
use libp2p::{identity, Multiaddr, PeerId};

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
const READY: Duration = Duration::from_secs(30);

fn mesh_key(data_dir: &Path) -> [u8; 32] {
    let text = std::fs::read_to_string(data_dir.join("mesh.key")).expect("mesh.key exists");
    hex::decode(text.trim())
        .expect("mesh.key is hex")
        .try_into()
        .expect("mesh.key is 32 bytes")
}

/// Poll `check` until it holds or 20 s pass, running `poke` before every attempt.
async fn eventually(what: &str, mut poke: impl FnMut(), mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        poke();
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_invalid_peer_messages_are_dropped_and_counted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("n1");
    let mut node = Node::spawn(
        Path::new(BIN),
        "n1",
        &data,
        up_args(&data, "n1", &NodeOptions::default()),
    );
    node.wait_ready(READY);
    let status = node.status().expect("status");
    let target: Multiaddr = status.listen_addrs[0].parse().expect("multiaddr");
    let target_peer = PeerId::from_str(&status.node_id).expect("peer id");
    let nodes_before = node.nodes().expect("nodes").len();

    // A keyed peer built from the same network stack the nodes use.
    let keypair = identity::Keypair::generate_ed25519();
    let attacker = keypair.public().to_peer_id().to_string();
    let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr");
    let (client, mut events, event_loop) = net::build(
        keypair,
        mesh_key(&data),
        &listen,
        Arc::new(Metrics::default()),
    )
    .expect("network");
    tokio::spawn(event_loop.run());
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    client.dial(Some(target_peer), vec![target]);

    // 1. Bytes that are not a gossip message at all.
    let dropped = |n: &Node| {
        n.metric("codex_mesh_gossip_messages_dropped_total")
            .unwrap_or(0.0)
    };
    let mut salt = 0u8;
    eventually(
        "garbage gossip counted as dropped",
        || {
            salt = salt.wrapping_add(1);
            client.publish(vec![0xff, 0x00, salt, 0x13, 0x37]);
        },
        || dropped(&node) >= 1.0,
    )
    .await;

    // 2. A well-formed gossip message over our size limit (still under gossipsub's).
    let before = dropped(&node);
    eventually(
        "oversized gossip counted as dropped",
        || {
            salt = salt.wrapping_add(1);
            let mut big = vec![salt; 62 * 1024];
            big[0] = 0x82;
            client.publish(big);
        },
        || dropped(&node) > before,
    )
    .await;

    // 3. A decodable delta whose record does not belong under its key: refused, not stored.
    let wire_dropped = |n: &Node| {
        n.metric("codex_mesh_wire_messages_dropped_total")
            .unwrap_or(0.0)
    };
    let stamp = codex_mesh::proto::crdt::Stamp {
        at: codex_mesh::proto::hlc::Hlc {
            wall_ms: 1,
            logical: 0,
        },
        by: attacker.clone(),
    };
    let admin = Record::Admin(NodeAdmin {
        draining: Some(Lww::new(stamp, true)),
        ..NodeAdmin::default()
    });
    let before = wire_dropped(&node);
    eventually(
        "record under a foreign key counted as dropped",
        || {
            salt = salt.wrapping_add(1);
            let records = vec![
                ("master".to_string(), admin.clone()),
                (format!("bogus/{salt}"), admin.clone()),
            ];
            client.publish(Gossip::Delta(records).encode());
        },
        || wire_dropped(&node) >= before + 2.0,
    )
    .await;

    // 4. A request over the page limit is refused with a reason.
    let page = vec![("admin/x".to_string(), admin.clone()); 300];
    let answer = client
        .request(target_peer, Request::SyncPush(page))
        .await
        .expect("network alive")
        .expect("node answers");
    assert!(
        matches!(answer, Response::Refused(ref why) if why.contains("too many")),
        "{answer:?}"
    );

    // The node is still healthy and stored nothing of it.
    let nodes_after = node.nodes().expect("nodes after abuse");
    assert_eq!(nodes_after.len(), nodes_before);
    assert!(
        nodes_after.iter().all(|n| !n.draining),
        "no record of the attacker was stored"
    );
    let status = node.status().expect("status after abuse");
    assert!(status.is_master, "the node still acts as master");
    assert!(node.is_running());
}
