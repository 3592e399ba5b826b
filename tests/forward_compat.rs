//! Records written by a newer version survive older nodes: a record of a kind this version
//! does not know and a job spec field it does not know round-trip through a node and reach a
//! third node intact.
//!
//! Topology: an injector (a keyed peer built from the library's network stack, speaking for a
//! newer version) pushes the records to node B only, then goes away; node C joins B after
//! that, so C can only have them from B. An observer peer then asks C for its records by
//! anti-entropy (digests of an empty replica) and compares them byte for byte with what the
//! injector sent.

mod common;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ciborium::Value;
use codex_mesh::metrics::Metrics;
use codex_mesh::net;
use codex_mesh::proto::ids::ulid;
use codex_mesh::proto::records::{Extra, Record};
use codex_mesh::proto::state::BUCKETS;
use codex_mesh::wire::{Request, Response};
use common::{join_args, poll, records, up_args, Node, NodeOptions};
use libp2p::{identity, Multiaddr, PeerId};

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
const NOTICE_KEY: &str = "notice/maintenance-1";

fn mesh_key(data_dir: &Path) -> [u8; 32] {
    let text = std::fs::read_to_string(data_dir.join("mesh.key")).expect("mesh.key exists");
    hex::decode(text.trim())
        .expect("mesh.key is hex")
        .try_into()
        .expect("mesh.key is 32 bytes")
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes).expect("encodes");
    bytes
}

/// A keyed peer dialling `node`, and the tasks that run it.
struct Peer {
    client: net::Client,
    target: PeerId,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Peer {
    fn connect(node: &Node, mesh_key: [u8; 32]) -> Peer {
        let status = node.status().expect("status");
        let addr: Multiaddr = status.listen_addrs[0].parse().expect("multiaddr");
        let target = PeerId::from_str(&status.node_id).expect("peer id");
        let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr");
        let (client, mut events, event_loop) = net::build(
            identity::Keypair::generate_ed25519(),
            mesh_key,
            &listen,
            Arc::new(Metrics::default()),
        )
        .expect("network");
        let tasks = vec![
            tokio::spawn(event_loop.run()),
            tokio::spawn(async move { while events.recv().await.is_some() {} }),
        ];
        client.dial(Some(target), vec![addr]);
        Peer {
            client,
            target,
            tasks,
        }
    }

    /// Send `request` until the connection is up and the node answers (30 s at most).
    async fn ask(&self, request: Request) -> Response {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.client.request(self.target, request.clone()).await {
                Ok(Ok(answer)) => return answer,
                other if Instant::now() > deadline => panic!("no answer: {other:?}"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Every record the node holds, as anti-entropy sends them to an empty replica.
    async fn records(&self) -> Vec<(String, Record)> {
        let request = Request::SyncDigests {
            buckets: (0..BUCKETS as u16).collect(),
            entries: Vec::new(),
        };
        match self.ask(request).await {
            Response::SyncRecords { records, .. } => records,
            other => panic!("unexpected answer {other:?}"),
        }
    }

    fn close(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

/// A record of a kind this version does not know, as a newer version would encode it.
fn notice() -> Record {
    let body = Value::Map(vec![
        (
            Value::Text("text".into()),
            Value::Text("maintenance".into()),
        ),
        (Value::Text("level".into()), Value::Integer(2.into())),
        (Value::Text("ratio".into()), Value::Float(0.25)),
    ]);
    let bytes = encode(&Value::Map(vec![(Value::Text("Notice".into()), body)]));
    let record: Record = ciborium::from_reader(bytes.as_slice()).expect("decodes");
    assert!(matches!(record, Record::Unknown { .. }), "{record:?}");
    record
}

/// A finished job whose spec carries a field this version does not know.
fn job_with_unknown_field() -> (String, Record) {
    let id = ulid(1_700_000_000_000, 7);
    let mut extra = Extra::default();
    extra.insert("priority", &Value::Integer(7.into()));
    let mut spec = records::job_spec(&id, "from a newer version", "none", "injector");
    spec.extra = extra;
    let record = records::finished_job(spec, "done".into());
    (format!("job/{id}"), Record::Job(Box::new(record)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_kind_and_a_spec_field_unknown_to_the_decoder_reach_a_third_node_intact() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("b");
    let mut b = Node::spawn(
        Path::new(BIN),
        "b",
        &db,
        up_args(&db, "b", &NodeOptions::default()),
    );
    b.wait_ready(common::READY_TIMEOUT);
    let key = mesh_key(&db);

    let (job_key, job) = job_with_unknown_field();
    let sent = vec![(NOTICE_KEY.to_string(), notice()), (job_key.clone(), job)];
    let injector = Peer::connect(&b, key);
    assert_eq!(
        injector.ask(Request::SyncPush(sent.clone())).await,
        Response::Ack
    );
    let on_b = injector.records().await;
    let keys: Vec<&String> = on_b.iter().map(|(k, _)| k).collect();
    for (key, _) in &sent {
        assert!(keys.contains(&key), "b holds {key}: {keys:?}");
    }
    injector.close();

    let dc = dir.path().join("c");
    let mut c = Node::spawn(
        Path::new(BIN),
        "c",
        &dc,
        join_args(&b.ticket(), &dc, "c", &NodeOptions::default()),
    );
    c.wait_ready(common::READY_TIMEOUT);
    let job_id = job_key.trim_start_matches("job/").to_string();
    poll(Duration::from_secs(60), "c has the job", || {
        c.api("GET", &format!("/api/v1/jobs/{job_id}"), None)
            .map_err(|e| e.to_string())?
            .expect_status(200)
            .map(|_| ())
    });

    let observer = Peer::connect(&c, key);
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = loop {
        let held = observer.records().await;
        let has = |k: &str| held.iter().any(|(key, _)| key == k);
        if has(NOTICE_KEY) && has(&job_key) {
            break held;
        }
        assert!(Instant::now() < deadline, "c never held both records");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (key, record) in &sent {
        let (_, theirs) = held.iter().find(|(k, _)| k == key).expect("record present");
        assert_eq!(encode(theirs), encode(record), "{key} arrived changed");
    }
    let Some((_, Record::Job(job))) = held.iter().find(|(k, _)| *k == job_key) else {
        panic!("the job is a job");
    };
    assert_eq!(job.spec.extra.get("priority"), Some(&[0x07][..]));
    observer.close();
}
