//! `GET /api/v1/events` on real nodes: one stream of node, job and master changes, each with
//! the changed object, resumable with `Last-Event-ID`; and the job-events stream fed by the
//! same change feed.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{poll, submit_job, ApiEndpoint, Mesh, NodeOptions};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
const WAIT: Duration = Duration::from_secs(30);

/// One server-sent event.
#[derive(Debug, Clone)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: Value,
}

/// A raw HTTP/1.0 reader of an event stream (the body then ends with the connection).
struct SseStream {
    reader: BufReader<TcpStream>,
}

impl SseStream {
    fn open(api: &ApiEndpoint, path: &str, last_event_id: Option<&str>) -> SseStream {
        let address = api.url.trim_start_matches("http://").trim_end_matches('/');
        let mut stream = TcpStream::connect(address).expect("connect to the node");
        let resume = last_event_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: node\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n{resume}\r\n",
            api.token
        );
        stream.write_all(request.as_bytes()).expect("send request");
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).expect("status line");
        assert!(status.contains(" 200 "), "{status}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header");
            if line.trim().is_empty() {
                break;
            }
        }
        SseStream { reader }
    }

    /// The next event (keep-alive comments skipped), or `None` when `deadline` passed or the
    /// stream ended.
    fn next(&mut self, deadline: Instant) -> Option<SseEvent> {
        let (mut event, mut id, mut data) = (String::new(), None, String::new());
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let socket = self.reader.get_ref();
            socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok()?;
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if event.is_empty() && data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                return Some(SseEvent { event, id, data });
            }
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
    }

    /// Events until `want` accepts one (returned last), within `timeout`.
    fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut want: impl FnMut(&SseEvent) -> bool,
    ) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(event) = self.next(deadline) {
            let done = want(&event);
            seen.push(event);
            if done {
                return seen;
            }
        }
        let kinds: Vec<String> = seen
            .iter()
            .map(|e| format!("{} {}", e.event, e.data))
            .collect();
        panic!("no event for {what} within {timeout:?}; saw {kinds:#?}");
    }
}

fn seq_of(id: &Option<String>) -> u64 {
    id.as_deref()
        .and_then(|id| id.split_once('-'))
        .and_then(|(_, seq)| seq.parse().ok())
        .expect("an event id <stream>-<seq>")
}

/// Wait until `node` knows a node with the tag `busy`.
fn wait_for_busy_tag(node: &common::Node) {
    poll(WAIT, "the node with the busy tag to be known", || {
        let nodes = node.nodes()?;
        nodes
            .iter()
            .any(|n| n.tags == vec!["busy".to_string()])
            .then_some(())
            .ok_or_else(|| format!("{nodes:?}"))
    });
}

/// A mesh of `n1` and `n2`, where `n2` carries the tag `busy` and has no free slot, so jobs
/// for the tag wait in the queue.
fn mesh_with_a_full_node() -> Mesh {
    let specs = vec![
        ("n1".to_string(), NodeOptions::default()),
        (
            "n2".to_string(),
            NodeOptions::with_extra(&["--tags", "busy", "--slots", "0"]),
        ),
    ];
    Mesh::start_with(BIN, specs)
}

fn is_job(event: &SseEvent, id: &str, status: &str) -> bool {
    event.event == "job" && event.data["id"] == id && event.data["status"] == status
}

#[test]
fn the_mesh_event_stream_carries_changes_and_resumes_after_the_last_event_id() {
    let mesh = mesh_with_a_full_node();
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    let master = poll(WAIT, "a master", || {
        n1.status()?
            .master
            .ok_or_else(|| "no master yet".to_string())
    });
    wait_for_busy_tag(n1);

    // A new reader first gets every object once: both nodes and the master.
    let mut stream = SseStream::open(n1.endpoint(), "/api/v1/events", None);
    let mut missing = vec![
        "master".to_string(),
        n1.id().to_string(),
        n2.id().to_string(),
    ];
    let opening = stream.until(WAIT, "the master and both nodes", |e| {
        let what = match e.event.as_str() {
            "master" => "master".to_string(),
            _ => e.data["id"].as_str().unwrap_or_default().to_string(),
        };
        missing.retain(|m| *m != what);
        missing.is_empty()
    });
    let master_event = opening
        .iter()
        .rev()
        .find(|e| e.event == "master")
        .expect("a master event");
    assert_eq!(
        master_event.data["master"],
        master.as_str(),
        "{master_event:?}"
    );
    assert!(master_event.data["epoch"].as_u64().unwrap_or(0) >= 1);
    let mut ids: Vec<u64> = opening.iter().map(|e| seq_of(&e.id)).collect();
    let sorted = {
        let mut s = ids.clone();
        s.sort_unstable();
        s
    };
    assert_eq!(ids, sorted, "events come in the order of their changes");
    ids.dedup();
    assert_eq!(ids.len(), opening.len(), "each change once");
    for node in [n1, n2] {
        assert!(
            opening.iter().any(|e| e.event == "node"
                && e.data["id"] == node.id()
                && e.data["name"] == node.name),
            "a node event with the view of {}: {opening:#?}",
            node.name
        );
    }

    // A submission at the other peer reaches this stream as a job event with the job.
    let id = submit_job(n2, json!({"prompt": "wait in line", "tag": "busy"}));
    let queued = stream.until(WAIT, "the queued job", |e| is_job(e, &id, "queued"));
    let queued = queued.last().expect("an event").clone();
    assert_eq!(queued.data["prompt"], "wait in line");
    n1.api_ok("POST", &format!("/api/v1/jobs/{id}/cancel"), None);
    let cancelled = stream.until(WAIT, "the cancelled job", |e| is_job(e, &id, "cancelled"));
    let cancelled_seq = seq_of(&cancelled.last().expect("an event").id);

    // Resuming after the queued event: what changed since, not the opening replay again.
    let mut resumed = SseStream::open(n1.endpoint(), "/api/v1/events", queued.id.as_deref());
    let events = resumed.until(WAIT, "the cancellation again", |e| {
        is_job(e, &id, "cancelled")
    });
    let queued_seq = seq_of(&queued.id);
    assert!(
        events.iter().all(|e| seq_of(&e.id) > queued_seq),
        "only changes after the last event id: {events:#?}"
    );
    assert!(
        !events.iter().any(|e| e.event == "master"),
        "the master did not change: {events:#?}"
    );
    assert_eq!(seq_of(&events.last().expect("an event").id), cancelled_seq);

    // An id from another node process (say, before a restart) replays every object once.
    let mut replay = SseStream::open(n1.endpoint(), "/api/v1/events", Some("1-1"));
    let events = replay.until(WAIT, "the job in a full replay", |e| {
        is_job(e, &id, "cancelled")
    });
    assert!(events.iter().any(|e| e.event == "master"), "{events:#?}");
    assert_eq!(
        events.iter().filter(|e| e.event == "job").count(),
        1,
        "the job once, at its newest version: {events:#?}"
    );
}

#[test]
fn the_job_event_stream_follows_a_queued_job_without_polling_the_mesh() {
    let mesh = mesh_with_a_full_node();
    let n1 = &mesh.nodes[0];
    wait_for_busy_tag(n1);
    let id = submit_job(n1, json!({"prompt": "wait", "tag": "busy"}));
    let mut stream = SseStream::open(n1.endpoint(), &format!("/api/v1/jobs/{id}/events"), None);
    stream.until(WAIT, "the job as it is", |e| is_job(e, &id, "queued"));
    n1.api_ok("POST", &format!("/api/v1/jobs/{id}/cancel"), None);
    stream.until(WAIT, "the cancellation", |e| is_job(e, &id, "cancelled"));
    stream.until(WAIT, "the end", |e| e.event == "end");
}
