//! Records with large results replicate: 200 finished jobs carrying a 1 MiB final message
//! each (200 MiB, far more than one request-response message may carry) reach a node that
//! joins afterwards, every result intact.
//!
//! The runner keeps at most 64 KiB of an agent's final message, so a real run cannot produce
//! a result that large; the records are pushed into the first node by a keyed peer built from
//! the library's network stack, as any peer of a newer or differently configured version
//! could send them. The joining node then fetches them by anti-entropy, page after page.

mod common;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use codex_mesh::metrics::Metrics;
use codex_mesh::net;
use codex_mesh::proto::ids::ulid;
use codex_mesh::proto::records::Record;
use codex_mesh::wire::{Request, Response};
use common::{join_args, poll_every, records, up_args, Node, NodeOptions};
use libp2p::{identity, Multiaddr, PeerId};

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
const JOBS: usize = 200;
const RESULT_BYTES: usize = 1 << 20;

fn mesh_key(data_dir: &Path) -> [u8; 32] {
    let text = std::fs::read_to_string(data_dir.join("mesh.key")).expect("mesh.key exists");
    hex::decode(text.trim())
        .expect("mesh.key is hex")
        .try_into()
        .expect("mesh.key is 32 bytes")
}

/// A finished job whose final message is `RESULT_BYTES` long (the largest result accepted).
fn big_job(n: usize) -> (String, Record) {
    let id = ulid(1_700_000_000_000 + n as u64, n as u128 + 1);
    let message = ((b'a' + (n % 26) as u8) as char)
        .to_string()
        .repeat(RESULT_BYTES);
    let spec = records::job_spec(&id, &format!("job {n}"), "none", "injector");
    let record = records::finished_job(spec, message);
    (format!("job/{id}"), Record::Job(Box::new(record)))
}

/// Push `records` into `node` through a keyed peer, a few records per request.
async fn inject(node: &Node, records: Vec<(String, Record)>) {
    let status = node.status().expect("status");
    let addr: Multiaddr = status.listen_addrs[0].parse().expect("multiaddr");
    let target = PeerId::from_str(&status.node_id).expect("peer id");
    let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr");
    let (client, mut events, event_loop) = net::build(
        identity::Keypair::generate_ed25519(),
        mesh_key(node.data_dir()),
        &listen,
        Arc::new(Metrics::default()),
    )
    .expect("network");
    tokio::spawn(event_loop.run());
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    client.dial(Some(target), vec![addr]);
    for page in records.chunks(4) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client
                .request(target, Request::SyncPush(page.to_vec()))
                .await
            {
                Ok(Ok(Response::Ack)) => break,
                other if Instant::now() > deadline => panic!("push not accepted: {other:?}"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Ids whose job on `node` does not show the full result yet.
fn missing(node: &Node, ids: &[String]) -> Vec<String> {
    ids.iter()
        .filter(|id| {
            let Ok(response) = node.api("GET", &format!("/api/v1/jobs/{id}"), None) else {
                return true;
            };
            let Ok(job) = response.json::<serde_json::Value>() else {
                return true;
            };
            job["result"]["final_message"].as_str().map_or(0, str::len) != RESULT_BYTES
        })
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_jobs_with_one_mib_results_reach_a_joining_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    let d1 = dir.path().join("n1");
    let mut n1 = Node::spawn(
        Path::new(BIN),
        "n1",
        &d1,
        up_args(&d1, "n1", &NodeOptions::default()),
    );
    n1.wait_ready(common::READY_TIMEOUT);

    let records: Vec<_> = (0..JOBS).map(big_job).collect();
    let ids: Vec<String> = records
        .iter()
        .map(|(k, _)| k.trim_start_matches("job/").to_string())
        .collect();
    inject(&n1, records).await;
    let injected = started.elapsed();
    assert!(
        missing(&n1, &ids[..3]).is_empty(),
        "n1 stored the injected jobs"
    );

    let d2 = dir.path().join("n2");
    let mut n2 = Node::spawn(
        Path::new(BIN),
        "n2",
        &d2,
        join_args(&n1.ticket(), &d2, "n2", &NodeOptions::default()),
    );
    n2.wait_ready(common::READY_TIMEOUT);
    let joined = started.elapsed();
    let mut left = ids.clone();
    poll_every(
        Duration::from_secs(1),
        Duration::from_secs(300),
        "n2 holds all 200 jobs with their full results",
        || {
            left = missing(&n2, &left);
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{} jobs missing or incomplete", left.len()))
            }
        },
    );
    eprintln!(
        "injected in {injected:?}, n2 ready at {joined:?}, converged at {:?}",
        started.elapsed()
    );
}
