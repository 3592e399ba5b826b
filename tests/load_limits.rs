//! Bounded connections and event streams: idle connections and many event streams on a
//! follower neither stop its API from answering nor delay the election (the master keeps its
//! lease), streams beyond `--max-event-streams` get a JSON 503, and connections that never
//! send a request are closed by the header timeout.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use codex_mesh::proto::election::Timing;
use common::{
    poll, submit_job, wait_job, Expect, Mesh, Node, NodeOptions, CONVERGE_TIMEOUT, READY_TIMEOUT,
};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
/// Client timeout of one health probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Default of `--max-event-streams`.
const DEFAULT_STREAMS: usize = 256;

/// Raise this process's limit on open files to the hard limit (the nodes inherit it).
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only access the struct they are given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur >= 4096,
        "the tests need at least 4096 open files, the hard limit is {}",
        limit.rlim_cur
    );
}

fn addr_of(node: &Node) -> SocketAddr {
    node.endpoint()
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("the API URL is http://ip:port")
}

/// One health probe on a fresh connection, with a client timeout of [`PROBE_TIMEOUT`].
fn health(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(PROBE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("health: {e}"))?;
    if answer.starts_with("HTTP/1.1 200") && answer.contains("\"ok\":true") {
        Ok(())
    } else {
        Err(format!("health answered {answer:?}"))
    }
}

fn assert_healthy(addr: SocketAddr, when: &str) {
    let started = Instant::now();
    if let Err(e) = health(addr) {
        panic!("/api/v1/health did not answer {when}: {e}");
    }
    println!("health {when}: {:?}", started.elapsed());
}

/// Open an event stream and read its response head; returns the status and the stream (kept
/// open by the caller for as long as the stream should last).
fn open_stream(addr: SocketAddr, path: &str, token: &str) -> (u16, String, TcpStream) {
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("send the request");
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).expect("read the response head");
        assert!(n > 0, "the connection closed before the response head");
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, text, stream)
}

#[test]
fn idle_connections_and_a_thousand_streams_on_a_follower_leave_the_master_its_lease() {
    raise_file_limit();
    let started = Instant::now();
    let options = NodeOptions::with_extra(&[
        "--agent",
        "chatty=sh -c 'while true; do echo tick; sleep 0.2; done'",
        // Room for 500 idle connections and 1,000 streams at once; streams keep their
        // default cap.
        "--http-max-connections",
        "2048",
    ]);
    let specs = (1..=3)
        .map(|i| (format!("n{i}"), options.clone()))
        .collect();
    let mesh = Mesh::start_with(BIN, specs);
    let view = mesh.wait_converged(
        &mesh.all(),
        Expect {
            online: 3,
            voters: Some(3),
        },
    );
    let master = &mesh.nodes[view.master_index];
    let follower = mesh
        .nodes
        .iter()
        .find(|n| n.id() != view.master)
        .expect("a follower");
    // The job runs on the master, so the follower's streams read its log from the master.
    let id = submit_job(
        follower,
        json!({"prompt": "x", "agent": "chatty", "node": master.name}),
    );
    wait_job(follower, &id, "the job to run on the master", |job| {
        job["status"] == "running"
    });
    let addr = addr_of(follower);
    let token = follower.endpoint().token.clone();
    let epoch = master.status().expect("master status").epoch;
    println!(
        "mesh up after {:?}; master {} epoch {epoch}; follower {}",
        started.elapsed(),
        master.name,
        follower.name
    );

    let idle: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).expect("idle connection"))
        .collect();
    assert_healthy(addr, "with 500 idle connections");

    let path = format!("/api/v1/jobs/{id}/events");
    let mut streams = Vec::new();
    let mut refused = 0;
    for i in 0..1000 {
        let (status, head, stream) = open_stream(addr, &path, &token);
        match status {
            200 => streams.push(stream),
            503 => refused += 1,
            other => panic!("stream {i} answered {other}: {head}"),
        }
        if i % 100 == 99 {
            assert_healthy(addr, &format!("with {} streams open", streams.len()));
        }
    }
    println!(
        "{} streams open, {refused} refused, after {:?}",
        streams.len(),
        started.elapsed()
    );
    assert_eq!(streams.len(), DEFAULT_STREAMS, "streams served");
    assert_eq!(refused, 1000 - DEFAULT_STREAMS, "streams refused");

    // The streams read the log from the master while the health probe keeps answering.
    for round in 0..5 {
        assert_healthy(addr, &format!("with every stream open (round {round})"));
    }
    // Connections that never sent a request are closed by the header timeout.
    for mut connection in idle {
        connection
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let mut buf = [0u8; 16];
        match connection.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection was not closed by the node: {other:?}"),
        }
    }
    assert_healthy(addr, "after the idle connections were closed");

    let after = master.status().expect("master status");
    let lease_age = master
        .metric("codex_mesh_lease_age_max_ms")
        .expect("lease age metric");
    println!(
        "master epoch {} (was {epoch}); largest lease age {lease_age} ms of a {} ms lease; {:?} in all",
        after.epoch,
        Timing::default().lease_ms,
        started.elapsed()
    );
    assert!(after.is_master, "{} lost the lease", master.name);
    assert_eq!(after.epoch, epoch, "the epoch changed under load");
    let now = mesh.check_converged(
        &mesh.all(),
        Expect {
            online: 3,
            voters: Some(3),
        },
    );
    let now = now.expect("the mesh still agrees on its master");
    assert_eq!((now.master, now.epoch), (view.master, view.epoch));
    drop(streams);
}

#[test]
fn a_stream_over_the_cap_gets_a_json_503_and_idle_connections_are_closed() {
    raise_file_limit();
    let mut mesh = Mesh::new(BIN);
    let n1 = mesh.spawn_up(
        "n1",
        &NodeOptions::with_extra(&[
            "--max-event-streams",
            "2",
            "--http-max-connections",
            "8",
            "--http-header-timeout-secs",
            "2",
        ]),
    );
    mesh.nodes[n1].wait_ready(READY_TIMEOUT);
    let node = &mesh.nodes[n1];
    let addr = addr_of(node);
    let token = node.endpoint().token.clone();

    let (a, _, first) = open_stream(addr, "/api/v1/events", &token);
    let (b, _, _second) = open_stream(addr, "/api/v1/events", &token);
    assert_eq!((a, b), (200, 200));
    let refused = node.api("GET", "/api/v1/events", None).expect("request");
    assert_eq!(refused.status, 503, "{}", refused.body);
    let body: serde_json::Value = serde_json::from_str(&refused.body).expect("a JSON body");
    let reason = body["error"].as_str().expect("an error field");
    assert!(reason.contains("--max-event-streams"), "{reason}");
    // Other requests are not limited by the stream cap.
    assert_eq!(
        node.api("GET", "/api/v1/status", None)
            .expect("status")
            .status,
        200
    );

    // A closed stream gives its slot back.
    drop(first);
    poll(
        CONVERGE_TIMEOUT,
        "a stream slot to free",
        || match open_stream(addr, "/api/v1/events", &token) {
            (200, _, stream) => Ok(stream),
            (status, head, _) => Err(format!("{status}: {head}")),
        },
    );

    // Every free connection slot taken by a client that sends nothing: the node closes
    // them, and the health probe, which waits for a slot, is answered.
    let idle: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).expect("idle connection"))
        .collect();
    poll(
        CONVERGE_TIMEOUT,
        "the health probe past idle connections",
        || health(addr),
    );
    for mut connection in idle {
        connection
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let mut buf = [0u8; 16];
        assert!(
            matches!(connection.read(&mut buf), Ok(0) | Err(_)),
            "an idle connection stayed open"
        );
    }
}
