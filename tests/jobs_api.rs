//! Jobs through the API and CLI of real nodes: submission from any peer, replication,
//! filters, cancel and retry, and refusal of bad submissions with a clear message.

mod common;

use std::time::Duration;

use common::{json_of, poll, submit_job, wait_job, Mesh, NodeOptions};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
const WAIT: Duration = Duration::from_secs(30);

#[test]
fn a_job_submitted_on_one_peer_is_replicated_cancelled_and_retried() {
    let specs = vec![
        ("n1".to_string(), NodeOptions::default()),
        (
            "n2".to_string(),
            NodeOptions::with_extra(&["--tags", "gpu"]),
        ),
    ];
    let mesh = Mesh::start_with(BIN, specs);
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    poll(WAIT, "n1 to know n2's tags", || {
        let nodes = n1.nodes()?;
        nodes
            .iter()
            .any(|n| n.tags == vec!["gpu".to_string()])
            .then_some(())
            .ok_or_else(|| format!("{nodes:?}"))
    });

    let body = json!({
        "prompt": "Add a README section about tests",
        "tag": "gpu",
        "repos": ["octo/hello#main", "https://git.example.com/a/b.git"],
        "timeout_secs": 120,
    })
    .to_string();
    let created = n1.api("POST", "/api/v1/jobs", Some(&body)).expect("submit");
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(
        created.body.matches("\"id\":").count(),
        1,
        "one id per job: {}",
        created.body
    );
    let job = json_of(created);
    let id = job["id"].as_str().expect("job id").to_string();
    assert_eq!(job["status"], "queued");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["target"], json!({"kind": "tag", "value": "gpu"}));
    assert_eq!(
        job["repos"][0],
        json!({"source": "octo/hello", "branch": "main"})
    );
    assert_eq!(job["origin"]["kind"], "api");

    // Replicated to the other peer, with the same spec.
    let path = format!("/api/v1/jobs/{id}");
    let seen = poll(WAIT, "n2 to see the job", || {
        let response = n2.api("GET", &path, None).map_err(|e| e.to_string())?;
        if response.status == 200 {
            Ok(json_of(response))
        } else {
            Err(format!("status {}: {}", response.status, response.body))
        }
    });
    assert_eq!(seen["prompt"], job["prompt"]);
    assert_eq!(seen["submitted_at_ms"], job["submitted_at_ms"]);

    // Filters.
    let list = json_of(n2.api_ok("GET", "/api/v1/jobs?status=queued&q=readme", None));
    assert_eq!(list["total"], 1);
    let none = json_of(n2.api_ok("GET", "/api/v1/jobs?status=running", None));
    assert_eq!(none["total"], 0);

    // Cancel on n2, seen on n1; a second cancel is a conflict.
    let cancelled = json_of(n2.api_ok("POST", &format!("{path}/cancel"), None));
    assert_eq!(cancelled["status"], "cancelled");
    poll(WAIT, "n1 to see the cancellation", || {
        let job = json_of(n1.api_ok("GET", &path, None));
        (job["status"] == "cancelled")
            .then_some(())
            .ok_or_else(|| job.to_string())
    });
    let again = n1
        .api("POST", &format!("{path}/cancel"), None)
        .expect("cancel again");
    assert_eq!(again.status, 409, "{}", again.body);

    // Retry starts attempt 2 from queued; retrying an unfinished job is a conflict.
    let retried = json_of(n1.api_ok("POST", &format!("{path}/retry"), None));
    assert_eq!(retried["status"], "queued");
    assert_eq!(retried["attempt"], 2);
    let early = n1
        .api("POST", &format!("{path}/retry"), None)
        .expect("retry again");
    assert_eq!(early.status, 409, "{}", early.body);
}

#[test]
fn bad_submissions_are_refused_with_a_reason() {
    let mesh = Mesh::start(BIN, 1);
    let node = &mesh.nodes[0];
    let cases = [
        (json!({"prompt": "  "}), "empty"),
        (json!({"prompt": "x".repeat(70 * 1024)}), "limit"),
        (
            json!({"prompt": "fix\u{0}it"}),
            "the prompt contains the control character U+0000",
        ),
        (
            json!({"prompt": "fix\u{1b}[2Jit"}),
            "the prompt contains the control character U+001B",
        ),
        (
            json!({"prompt": "p", "repos": ["ssh://git@example.com/o/r.git"]}),
            "ssh repositories are not supported; use an https:// URL",
        ),
        (
            json!({"prompt": "p", "repos": ["git@github.com:o/r.git#main"]}),
            "ssh repositories are not supported; use an https:// URL",
        ),
        (
            json!({"prompt": "p", "repos": ["https://bob:hunter2@example.com/o/r.git"]}),
            "must not contain credentials",
        ),
        (
            json!({"prompt": "p", "repos": ["https://hunter2@example.com/o/r.git"]}),
            "configure a token on the node instead (--github-token)",
        ),
        (
            json!({"prompt": "p", "repos": ["not a repo"]}),
            "malformed repository",
        ),
        (json!({"prompt": "p", "repos": ["o/r#..bad"]}), "branch"),
        (
            json!({"prompt": "p", "repos": ["/srv/code/app"]}),
            "no node in the mesh allows local repository paths",
        ),
        (json!({"prompt": "p", "node": "nobody"}), "no node"),
        (json!({"prompt": "p", "tag": "nowhere"}), "no node carries"),
        (json!({"prompt": "p", "agent": "eliza"}), "unknown agent"),
        (json!({"prompt": "p", "node": "n1", "tag": "x"}), "not both"),
        (json!({"prompt": "p", "timeout_secs": 0}), "timeout"),
        (
            json!({"prompt": "p", "sandbox": "yolo"}),
            "invalid request body",
        ),
        (
            json!({"prompt": "p", "colour": "red"}),
            "invalid request body",
        ),
    ];
    for (body, expected) in cases {
        let response = node
            .api("POST", "/api/v1/jobs", Some(&body.to_string()))
            .expect("request");
        assert_eq!(response.status, 400, "{body}: {}", response.body);
        let error = json_of(response)["error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(error.contains(expected), "{body}: {error}");
        assert!(
            !error.contains("hunter2"),
            "a credential is never echoed: {error}"
        );
    }
    // Prompts keep newlines, tabs and carriage returns.
    let multi_line = json!({"prompt": "line one\r\n\tline two", "agent": "codex"});
    let created = node
        .api("POST", "/api/v1/jobs", Some(&multi_line.to_string()))
        .expect("request");
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(json_of(created)["prompt"], "line one\r\n\tline two");

    // A body over the limit gets 413, with a JSON error that says the limit.
    let huge = json!({"prompt": "x".repeat(3 << 20)}).to_string();
    let response = node
        .api("POST", "/api/v1/jobs", Some(&huge))
        .expect("request");
    assert_eq!(response.status, 413, "{}", response.body);
    assert_eq!(
        response.error_message().as_deref(),
        Some("the request body is over the limit of 2097152 bytes")
    );
    // A URI over the limit gets 414, with a JSON error; one under it is served.
    let long = format!("/api/v1/jobs?q={}", "x".repeat(9000));
    let response = node.api("GET", &long, None).expect("request");
    assert_eq!(response.status, 414, "{}", response.body);
    let error = response.error_message().unwrap_or_default();
    assert!(
        error.contains("the request URI is 9015 bytes; the limit is 8192"),
        "{error}"
    );
    let fits = format!("/api/v1/jobs?q={}", "x".repeat(8000));
    assert_eq!(node.api("GET", &fits, None).expect("request").status, 200);
    let missing = node
        .api("GET", "/api/v1/jobs/01NOSUCHJOB", None)
        .expect("request");
    assert_eq!(missing.status, 404);
    let bad_filter = node
        .api("GET", "/api/v1/jobs?status=sleeping", None)
        .expect("request");
    assert_eq!(bad_filter.status, 400);
    let list = json_of(node.api_ok("GET", "/api/v1/jobs", None));
    assert_eq!(
        list["total"], 1,
        "nothing but the multi-line job was stored"
    );
}

#[test]
fn jobs_can_be_submitted_without_a_reachable_master() {
    let mut mesh = Mesh::start(BIN, 3);
    mesh.wait_converged(
        &mesh.all(),
        common::Expect {
            online: 3,
            voters: Some(3),
        },
    );
    mesh.nodes[0].kill9();
    mesh.nodes[1].kill9();
    let survivor = &mesh.nodes[2];
    let out = survivor.cli(&["submit", "--json", "write a haiku"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: Value = serde_json::from_slice(&out.stdout).expect("submit --json prints the job");
    let id = job["id"].as_str().expect("id");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["origin"]["kind"], "cli");
    let status = survivor.status().expect("status");
    assert!(!status.is_master, "no quorum, no master");

    let out = survivor.cli(&["job", id, "--json"]);
    assert!(out.status.success());
    let shown: Value = serde_json::from_slice(&out.stdout).expect("job --json");
    assert_eq!(shown["status"], "queued");
    assert!(shown.get("result").is_some());

    let out = survivor.cli(&["jobs", "--json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).expect("jobs --json");
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
}

#[test]
fn the_master_assigns_jobs_by_target_tag_and_free_slots() {
    // `hold` keeps a slot busy long enough to observe the queue around it.
    let hold = ["--agent", "hold=sleep 20"];
    let gpu = ["--tags", "gpu", "--slots", "1", "--agent", "hold=sleep 20"];
    let specs = vec![
        ("n1".to_string(), NodeOptions::with_extra(&hold)),
        ("n2".to_string(), NodeOptions::with_extra(&gpu)),
        ("n3".to_string(), NodeOptions::with_extra(&hold)),
    ];
    let mut mesh = Mesh::start_with(BIN, specs);
    mesh.wait_converged(
        &mesh.all(),
        common::Expect {
            online: 3,
            voters: Some(3),
        },
    );
    let n2_id = mesh.nodes[1].id().to_string();
    let n3_id = mesh.nodes[2].id().to_string();
    let n3 = &mesh.nodes[2];

    // A tag target goes to the node with the tag; the next one waits for its only slot.
    let first = submit_job(n3, json!({"prompt": "one", "tag": "gpu", "agent": "hold"}));
    let job = wait_job(n3, &first, "first gpu job running", |j| {
        j["status"] == "running"
    });
    assert_eq!(job["node"], n2_id.as_str());
    assert_eq!(job["node_name"], "n2");
    assert!(job["epoch"].as_u64().is_some_and(|e| e >= 1));
    let second = submit_job(n3, json!({"prompt": "two", "tag": "gpu", "agent": "hold"}));
    let waiting = wait_job(n3, &second, "second gpu job to wait", |j| {
        j["reason"]
            .as_str()
            .is_some_and(|r| r.contains("free slot"))
    });
    assert_eq!(waiting["status"], "queued");

    // An explicit target gets that node, unless it is draining.
    let pinned = submit_job(
        n3,
        json!({"prompt": "three", "node": "n3", "agent": "hold"}),
    );
    let job = wait_job(n3, &pinned, "pinned job running", |j| {
        j["status"] == "running"
    });
    assert_eq!(job["node"], n3_id.as_str());
    n3.api_ok("POST", "/api/v1/nodes/n3/drain", None);
    let blocked = submit_job(n3, json!({"prompt": "four", "node": "n3", "agent": "hold"}));
    wait_job(n3, &blocked, "job for a draining node to wait", |j| {
        j["status"] == "queued" && j["reason"].as_str().is_some_and(|r| r.contains("draining"))
    });

    // No node has the codex CLI here: a codex job waits and says so.
    let codex = submit_job(n3, json!({"prompt": "five"}));
    wait_job(n3, &codex, "codex job to wait for a node with codex", |j| {
        j["status"] == "queued" && j["reason"].as_str().is_some_and(|r| r.contains("codex"))
    });

    // The gpu node dies: its job is lost, then re-queued once as attempt 2.
    mesh.nodes[1].kill9();
    let n3 = &mesh.nodes[2];
    wait_job(n3, &first, "lost job re-queued", |j| {
        j["attempt"] == 2 && j["status"] == "queued"
    });
}

#[test]
fn a_retried_submission_with_the_same_idempotency_key_is_the_same_job() {
    let mesh = Mesh::start_with(BIN, vec![("n1".to_string(), NodeOptions::default())]);
    let node = &mesh.nodes[0];
    let body = json!({"prompt": "Say hello", "agent": "codex"}).to_string();
    let key = [("Idempotency-Key", "retry-7f3a")];
    let post = |body: &str, headers: &[(&str, &str)]| {
        node.api_with("POST", "/api/v1/jobs", Some(body), headers)
            .expect("http")
    };
    let first = post(&body, &key);
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(!first.headers.contains_key("idempotent-replayed"));
    let again = post(&body, &key);
    assert_eq!(again.status, 200, "a replay answers 200: {}", again.body);
    assert_eq!(
        again.headers.get("idempotent-replayed").map(String::as_str),
        Some("true")
    );
    let (first, again) = (json_of(first), json_of(again));
    assert_eq!(first["id"], again["id"]);

    // The same key with another request is refused and says why.
    let other = json!({"prompt": "Say goodbye", "agent": "codex"}).to_string();
    let refused = post(&other, &key);
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(
        refused
            .error_message()
            .is_some_and(|m| m.contains("Idempotency-Key") && m.contains("different job")),
        "{}",
        refused.body
    );
    // A key that is not printable ASCII, or too long, is refused naming the header.
    let long = "k".repeat(256);
    for bad in ["caf\u{e9}", long.as_str()] {
        let r = post(&body, &[("Idempotency-Key", bad)]);
        assert_eq!(r.status, 422, "{}", r.body);
        assert!(r
            .error_message()
            .is_some_and(|m| m.contains("Idempotency-Key")));
    }
    // Without a key, the same body is a new job.
    let fresh = json_of(post(&body, &[]));
    assert_ne!(fresh["id"], first["id"]);
    let list = json_of(node.api_ok("GET", "/api/v1/jobs", None));
    assert_eq!(list["total"], 2, "{list}");
}

#[test]
fn a_log_read_at_a_peer_answers_while_the_worker_is_unreachable() {
    let agent = ["--agent", "chatty=sh -c 'echo started; sleep 120'"];
    let specs = vec![
        ("n1".to_string(), NodeOptions::with_extra(&agent)),
        ("n2".to_string(), NodeOptions::with_extra(&agent)),
    ];
    let mesh = Mesh::start_with(BIN, specs);
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    poll(WAIT, "n1 to see n2 online", || {
        let nodes = n1.nodes()?;
        (nodes.iter().filter(|n| n.online).count() == 2)
            .then_some(())
            .ok_or_else(|| format!("{nodes:?}"))
    });
    let id = submit_job(n1, json!({"prompt": "x", "agent": "chatty", "node": "n2"}));
    let path = format!("/api/v1/jobs/{id}/log");
    poll(WAIT, "the log to show the agent's first line", || {
        let log = n1.api_ok("GET", &path, None);
        log.body.contains("started").then_some(()).ok_or(log.body)
    });
    n2.stop();
    // The worker cannot answer: n1 says so at once instead of waiting for the network's
    // 10 s timeout (the master, n1 itself, has no copy while the job runs).
    let asked = std::time::Instant::now();
    let log = n1.api("GET", &path, None).expect("log read");
    let took = asked.elapsed();
    n2.cont();
    assert_eq!(log.status, 200, "{}", log.body);
    let note = log.headers.get("x-log-note").cloned().unwrap_or_default();
    assert!(note.contains("unreachable"), "{:?}", log.headers);
    assert!(took < Duration::from_secs(5), "the read took {took:?}");
}
