//! A peer that holds the mesh key but sends garbage or lies: malformed, oversized and invalid
//! messages, forged election messages and leases, assignments from a non-master and log
//! requests naming other files must be refused and counted, never stored, and never take the
//! node down or keep it from running jobs.

mod common;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use codex_mesh::metrics::Metrics;
use codex_mesh::net;
use codex_mesh::proto::crdt::{Lww, MaxReg, Stamp};
use codex_mesh::proto::election::{Membership, Message};
use codex_mesh::proto::hlc::Hlc;
use codex_mesh::proto::jobs::{
    Assignment, JobRecord, JobSpec, JobStatus, Origin, Progress, Sandbox, Target,
};
use codex_mesh::proto::records::{MasterInfo, NodeAdmin, Record};
use codex_mesh::store::Store;
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

/// A keyed peer built from the same network stack the nodes use, dialling `node`.
struct Attacker {
    id: String,
    client: net::Client,
    target: PeerId,
}

impl Attacker {
    fn connect(node: &Node, data: &Path) -> Attacker {
        // A node answers its API before its listen address is known.
        let status = common::poll(Duration::from_secs(30), "a listen address", || {
            let status = node.status()?;
            if status.listen_addrs.is_empty() {
                Err("no listen address yet".to_string())
            } else {
                Ok(status)
            }
        });
        let addr: Multiaddr = status.listen_addrs[0].parse().expect("multiaddr");
        let target = PeerId::from_str(&status.node_id).expect("peer id");
        let keypair = identity::Keypair::generate_ed25519();
        let id = keypair.public().to_peer_id().to_string();
        let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr");
        let (client, mut events, event_loop) = net::build(
            keypair,
            mesh_key(data),
            &listen,
            Arc::new(Metrics::default()),
        )
        .expect("network");
        tokio::spawn(event_loop.run());
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        client.dial(Some(target), vec![addr]);
        Attacker { id, client, target }
    }

    /// Send `request` until the connection is up (20 s at most) and the node answers.
    async fn ask_once_connected(&self, request: Request) -> Response {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.client.request(self.target, request.clone()).await {
                Ok(Ok(answer)) => return answer,
                other if Instant::now() > deadline => panic!("no answer: {other:?}"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Send `request`, answered by the node.
    async fn ask(&self, request: Request) -> Response {
        self.client
            .request(self.target, request)
            .await
            .expect("network alive")
            .expect("node answers")
    }
}

/// Every record the node stored, read from its redb file after it stopped.
fn stored_records(node: &mut Node) -> Vec<(String, Record)> {
    let status = node.terminate(common::SHUTDOWN_TIMEOUT);
    assert!(status.success(), "node exits cleanly: {status:?}");
    Store::open(&node.data_dir().join("state.redb"))
        .expect("store opens")
        .load_records()
        .expect("records load")
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
    let nodes_before = node.nodes().expect("nodes").len();
    let peer = Attacker::connect(&node, &data);
    let (client, attacker) = (&peer.client, peer.id.clone());

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
    let answer = peer.ask(Request::SyncPush(page)).await;
    assert!(
        matches!(answer, Response::Refused(ref why) if why.contains("too many")),
        "{answer:?}"
    );

    // The node is still healthy and stored nothing of it: its store holds the node's own
    // record and its lease, nothing under the keys the attacker used.
    let nodes_after = node.nodes().expect("nodes after abuse");
    assert_eq!(nodes_after.len(), nodes_before);
    let status = node.status().expect("status after abuse");
    assert!(status.is_master, "the node still acts as master");
    assert!(node.is_running());
    let stored = stored_records(&mut node);
    let keys: Vec<&str> = stored.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        stored
            .iter()
            .all(|(k, r)| !matches!(r, Record::Admin(_)) && !k.starts_with("bogus")),
        "an attacker's record was stored: {keys:?}"
    );
    assert!(
        matches!(
            stored.iter().find(|(k, _)| k == "master"),
            Some((_, Record::Master(_)))
        ),
        "the lease record is the node's own: {keys:?}"
    );
}

fn stamp(by: &str) -> Stamp {
    Stamp {
        at: Hlc {
            wall_ms: 1,
            logical: 0,
        },
        by: by.to_string(),
    }
}

/// A job record assigned to `node` by a master of `epoch`.
fn assigned_job(id: &str, node: &str, epoch: u64, by: &str) -> JobRecord {
    JobRecord {
        compacted: false,
        spec: JobSpec {
            id: id.to_string(),
            target: Target::Any,
            repos: Vec::new(),
            prompt: "rm -rf /".into(),
            agent: "ok".into(),
            model: None,
            sandbox: Sandbox::WorkspaceWrite,
            timeout_secs: 60,
            idle_timeout_secs: 60,
            origin: Origin {
                kind: "api".into(),
                reply_to: None,
                user: None,
            },
            submitted_via: by.to_string(),
            submitted_at_ms: 1,
            idempotency_key: None,
            extra: Default::default(),
        },
        assignment: Some(MaxReg(Assignment {
            epoch,
            seq: 1,
            attempt: 1,
            node: node.to_string(),
        })),
        progress: MaxReg(Progress {
            attempt: 1,
            assignment: (epoch, 1),
            status: JobStatus::Assigned,
            reason: None,
            result: None,
            stamp: stamp(by),
        }),
        attempts: Default::default(),
        extra: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_terms_leases_assignments_and_log_paths_change_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("n1");
    let opts = NodeOptions::with_extra(&["--agent", "ok=sh -c 'echo done'"]);
    let mut node = Node::spawn(Path::new(BIN), "n1", &data, up_args(&data, "n1", &opts));
    node.wait_ready(READY);
    let before = node.status().expect("status");
    assert!(before.is_master);
    let peer = Attacker::connect(&node, &data);
    let me = before.node_id.clone();
    let refused = |answer: &Response, why: &str| {
        assert!(
            matches!(answer, Response::Refused(text) if text.contains(why)),
            "expected a refusal mentioning {why:?}, got {answer:?}"
        );
    };
    let one = |id: &str| [id.to_string()].into_iter().collect();
    let config = |voters| Membership {
        term: 0,
        index: 2,
        voters,
        joining: None,
    };
    let heartbeat = |term, membership| {
        Request::Election(Message::Heartbeat {
            term,
            membership,
            sent_at: 0,
        })
    };

    // Election messages: a term at the end of the range, a non-voter's plausible heartbeat
    // naming itself the only voter, an empty and an oversized voter set, a vote request.
    let answer = peer
        .ask_once_connected(heartbeat(u64::MAX, config(one(&peer.id))))
        .await;
    refused(&answer, "out of range");
    let next = before.epoch + 1;
    refused(
        &peer.ask(heartbeat(next, config(one(&peer.id)))).await,
        "not a voter",
    );
    refused(
        &peer.ask(heartbeat(next, config(Default::default()))).await,
        "no voters",
    );
    let crowd = (0..50).map(|i| format!("v{i}")).collect();
    refused(
        &peer.ask(heartbeat(next, config(crowd))).await,
        "too many voters",
    );
    let vote = Request::Election(Message::Vote {
        term: u64::MAX - 1,
        position: (u64::MAX, u64::MAX),
    });
    refused(&peer.ask(vote).await, "out of range");

    // An assignment from a node that is not the master, at the largest epoch.
    let job = "01J0000000000000000000000A";
    let assign = Request::Assign(Box::new(assigned_job(job, &me, u64::MAX, &peer.id)));
    refused(&peer.ask(assign).await, "not the current term");
    let assign = Request::Assign(Box::new(assigned_job(job, &me, before.epoch, &peer.id)));
    refused(&peer.ask(assign).await, "is not the master");
    // The same job offered to the node as a voter, and a read of what it accepted: only the
    // leader of its term may ask either.
    let commit = Request::Commit(Box::new(assigned_job(job, &me, before.epoch, &peer.id)));
    refused(&peer.ask(commit).await, "is not one of the leader of term");
    let read = Request::ReadAccepted { term: before.epoch };
    refused(&peer.ask(read).await, "is not the leader of term");

    // Log requests naming another file, or a job nobody submitted.
    let log = |job: &str| Request::Log {
        job: job.to_string(),
        offset: 0,
    };
    refused(&peer.ask(log("../../mesh")).await, "malformed job id");
    refused(&peer.ask(log("../api-token")).await, "malformed job id");
    refused(&peer.ask(log(job)).await, "unknown job");

    // A lease for the attacker at the largest epoch, and a job assigned at it, by gossip.
    let lease = Record::Master(MaxReg(MasterInfo {
        epoch: u64::MAX,
        config_index: 1,
        master: peer.id.clone(),
        since_ms: 0,
        voters: one(&peer.id),
    }));
    let poisoned = Record::Job(Box::new(assigned_job(job, &me, u64::MAX, &peer.id)));
    let dropped = |n: &Node| {
        n.metric("codex_mesh_wire_messages_dropped_total")
            .unwrap_or(0.0)
    };
    let base = dropped(&node);
    eventually(
        "the forged lease and job are refused",
        || {
            let delta = vec![
                ("master".to_string(), lease.clone()),
                (format!("job/{job}"), poisoned.clone()),
            ];
            peer.client.publish(Gossip::Delta(delta).encode());
        },
        || dropped(&node) >= base + 2.0,
    )
    .await;

    // The node is still the master of its own term and still runs jobs.
    let after = node.status().expect("status");
    assert!(after.is_master, "still the master");
    assert_eq!(after.epoch, before.epoch, "the term did not move");
    let id = common::submit_job(&node, serde_json::json!({"prompt": "hello", "agent": "ok"}));
    let done = common::wait_job(&node, &id, "the job ends", common::job_finished);
    assert_eq!(done["status"], "succeeded", "{done}");
    refused(&peer.ask(log(job)).await, "unknown job");

    let stored = stored_records(&mut node);
    match stored.iter().find(|(k, _)| k == "master") {
        Some((_, Record::Master(MaxReg(info)))) => {
            assert_eq!(info.master, me);
            assert_eq!(info.epoch, before.epoch);
        }
        other => panic!("lease record: {other:?}"),
    }
    assert!(
        stored.iter().all(|(k, _)| k != &format!("job/{job}")),
        "the forged job was stored"
    );
}
