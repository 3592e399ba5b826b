//! Jobs run by the real Codex CLI (npm `@openai/codex`, installed by `scripts/install-codex.sh`,
//! path in `CODEX_BIN`) against a scripted Responses-API model server on loopback, with
//! repositories served by `git daemon`: the whole path from submission to result.

mod common;

#[path = "support/git_server.rs"]
mod git_server;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{job_finished, json_of, poll, submit_job, wait_job, Mesh, Node, NodeOptions};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
const WAIT: Duration = Duration::from_secs(90);

/// The pinned Codex CLI; the test script installs it and exports `CODEX_BIN`.
fn codex_bin() -> String {
    std::env::var("CODEX_BIN").unwrap_or_else(|_| {
        panic!("CODEX_BIN is not set: run `export CODEX_BIN=$(scripts/install-codex.sh)` first")
    })
}

/// `tests/support/fake_model.py` running a script; killed on drop.
struct FakeModel {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl FakeModel {
    fn start(dir: &Path, turns: Value) -> FakeModel {
        let script = dir.join("turns.json");
        let log = dir.join("requests.jsonl");
        std::fs::write(&script, turns.to_string()).expect("write script");
        let mut child = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fake_model.py"))
            .args(["--port", "0", "--per-thread", "--script"])
            .arg(&script)
            .arg("--log")
            .arg(&log)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs the fake model");
        let stdout = child.stdout.take().expect("stdout");
        let mut first = String::new();
        BufReader::new(stdout)
            .read_line(&mut first)
            .expect("PORT line");
        let port = first
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("fake model printed {first:?}"));
        FakeModel { child, port, log }
    }

    /// A `CODEX_HOME` whose config points Codex at this server, outside the temporary
    /// directory: Codex refuses to make its helper links there (`codex-linux-sandbox`, which
    /// its sandbox runs by name when the system bubblewrap is older than 0.9). Removed on drop.
    fn codex_home(&self, dir: &Path) -> PathBuf {
        let name = dir.file_name().expect("a named temp dir");
        let home = codex_homes().join(name);
        std::fs::create_dir_all(&home).expect("codex home");
        let config = format!(
            r#"model_provider = "mock"
model = "mock-model"
[model_providers.mock]
name = "mock"
base_url = "http://127.0.0.1:{}/v1"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 60000
[features]
plugins = false
[analytics]
enabled = false
"#,
            self.port
        );
        std::fs::write(home.join("config.toml"), config).expect("codex config");
        home
    }

    fn requests(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Where the tests' `CODEX_HOME`s live (under the target directory, not the temp dir).
fn codex_homes() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("codex-homes")
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        if let Some(name) = self.log.parent().and_then(Path::file_name) {
            let _ = std::fs::remove_dir_all(codex_homes().join(name));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mesh of `n` nodes that run Codex with `home` as `CODEX_HOME`.
fn codex_mesh(n: usize, home: &Path) -> Mesh {
    let codex = codex_bin();
    let mut mesh = Mesh::new(BIN);
    for i in 1..=n {
        let name = format!("n{i}");
        let mut args = vec!["--codex-bin".to_string(), codex.clone()];
        if i == 2 {
            args.extend(["--tags".to_string(), "builder".to_string()]);
        }
        let opts = NodeOptions::with_extra(&args);
        let data = mesh.data_dir(&name);
        let command = if i == 1 {
            common::up_args(&data, &name, &opts)
        } else {
            let ticket = mesh.nodes[0].ticket();
            common::join_args(&ticket, &data, &name, &opts)
        };
        let envs = vec![("CODEX_HOME".to_string(), home.display().to_string())];
        let mut node = Node::spawn_with_env(Path::new(BIN), &name, &data, command, envs);
        node.wait_ready(WAIT);
        mesh.nodes.push(node);
    }
    let first = &mesh.nodes[0];
    poll(WAIT, "every node to list codex", || {
        let nodes = json_of(first.api_ok("GET", "/api/v1/nodes", None));
        let ready = nodes.as_array().is_some_and(|all| {
            all.len() == n
                && all.iter().all(|node| {
                    node["online"] == true
                        && node["agents"]
                            .as_array()
                            .is_some_and(|a| a.contains(&json!("codex")))
                })
        });
        ready.then_some(()).ok_or_else(|| nodes.to_string())
    });
    mesh
}

#[test]
fn codex_edits_two_repositories_on_a_two_node_mesh() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = git_server::GitServer::start();
    let app = server.repo("app", &[("README.md", "# app\n")]);
    let lib = server.repo("lib", &[("README.md", "# lib\n")]);
    let model = FakeModel::start(
        dir.path(),
        json!([
            {"exec": "echo 'edited by codex' >> app/README.md && echo 'edited by codex' >> lib/README.md", "login": false},
            {"message": "Both READMEs now say they were edited."}
        ]),
    );
    let home = model.codex_home(dir.path());
    let mesh = codex_mesh(2, &home);
    let n1 = &mesh.nodes[0];
    let id = submit_job(
        n1,
        json!({"prompt": "Note the edit in both READMEs", "tag": "builder", "repos": [app, lib]}),
    );
    let job = wait_job(n1, &id, "the codex job to finish", job_finished);
    assert_eq!(job["status"], "succeeded", "{job}\n{}", model.requests());
    assert_eq!(job["node_name"], "n2");
    let result = &job["result"];
    assert_eq!(result["exit_code"], 0);
    assert_eq!(
        result["final_message"],
        "Both READMEs now say they were edited."
    );
    let diffs = result["diffs"].as_array().expect("diffs");
    assert_eq!(diffs.len(), 2, "{result}");
    for diff in diffs {
        assert_eq!(
            diff["files"],
            json!([{"path": "README.md", "added": 1, "removed": 0}]),
            "{result}"
        );
    }
    let commands = result["commands"].as_array().expect("commands");
    assert!(
        commands.iter().any(|c| c["command"]
            .as_str()
            .is_some_and(|t| t.contains("edited by codex"))
            && c["exit_code"] == 0),
        "{result}"
    );
    assert!(
        result["usage"]["output_tokens"].as_u64().is_some(),
        "{result}"
    );
    // Codex really talked to the scripted model, and got the command's output back.
    let requests = model.requests();
    assert!(requests.contains("function_call_output"), "{requests}");
    // The events and the log are there too, from any peer.
    let log = n1
        .api_ok("GET", &format!("/api/v1/jobs/{id}/log"), None)
        .body;
    assert!(log.contains("\"type\":\"turn.completed\""), "{log}");
    // The live stream (replayed from the start for a finished job) carries Codex's events,
    // parsed: the command with its exit code, the final message and the usage.
    let stream = n1
        .api_ok("GET", &format!("/api/v1/jobs/{id}/events"), None)
        .body;
    let agent_events: Vec<Value> = stream
        .split("\n\n")
        .filter_map(|record| {
            let mut lines = record.lines();
            (lines.next() == Some("event: agent"))
                .then(|| lines.next()?.strip_prefix("data: "))
                .flatten()
                .and_then(|data| serde_json::from_str(data).ok())
        })
        .collect();
    let kinds: Vec<&str> = agent_events
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    let started = kinds.iter().position(|k| *k == "command_started");
    let finished = agent_events.iter().position(|e| {
        e["kind"] == "command"
            && e["exit_code"] == 0
            && e["command"]
                .as_str()
                .is_some_and(|c| c.contains("edited by codex"))
    });
    assert!(
        started.is_some() && finished.is_some() && started < finished,
        "{agent_events:?}"
    );
    assert!(
        agent_events.iter().any(
            |e| e["kind"] == "message" && e["text"] == "Both READMEs now say they were edited."
        ),
        "{agent_events:?}"
    );
    assert_eq!(kinds.last(), Some(&"usage"), "{agent_events:?}");
    assert!(stream.trim_end().ends_with("event: end"), "{stream}");

    // `submit --wait` follows the same events live (this run gets the script from the start;
    // without the repositories its command fails).
    let out = n1.cli(&["submit", "--wait", "--node", "n1", "anything else?"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let expected = [
        "running (node n1)",
        "  $ /bin/bash -c",
        "  agent: Both READMEs now say they were edited.",
        "  tokens: ",
        "succeeded (node n1)",
    ];
    let positions: Vec<Option<usize>> = expected.iter().map(|e| stderr.find(e)).collect();
    assert!(
        positions.iter().all(Option::is_some) && positions.windows(2).all(|w| w[0] < w[1]),
        "{stderr}"
    );
    assert!(stdout.contains("status    succeeded"), "{stdout}");
}

#[test]
fn a_stalled_model_trips_the_idle_watchdog_and_cancel_stops_codex() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = FakeModel::start(
        dir.path(),
        json!({"turns": [], "by_prompt": [
            {"match": "stall-one", "turns": [{"stall": 120}]},
            {"match": "stall-two", "turns": [{"stall": 120}]}
        ]}),
    );
    let home = model.codex_home(dir.path());
    let mesh = codex_mesh(1, &home);
    let node = &mesh.nodes[0];

    let id = submit_job(
        node,
        json!({"prompt": "stall-one", "idle_timeout_secs": 3, "timeout_secs": 300}),
    );
    let job = wait_job(node, &id, "the idle watchdog", job_finished);
    common::assert_ended(&job, "timed_out", "no output");

    let id = submit_job(
        node,
        json!({"prompt": "stall-two", "idle_timeout_secs": 300, "timeout_secs": 300}),
    );
    wait_job(node, &id, "codex running", |j| j["status"] == "running");
    // This job's codex: its command line names the job's work directory.
    let pattern = format!("codex exec .*{id}");
    let running = || {
        Command::new("pgrep")
            .args(["-f", &pattern])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false)
    };
    poll(WAIT, "codex to be running", || {
        running().then_some(()).ok_or("not yet".to_string())
    });
    node.api_ok("POST", &format!("/api/v1/jobs/{id}/cancel"), None);
    let job = wait_job(node, &id, "the cancelled job", job_finished);
    assert_eq!(job["status"], "cancelled", "{job}");
    poll(WAIT, "codex to be gone", || {
        (!running())
            .then_some(())
            .ok_or("codex still runs".to_string())
    });
}

#[test]
fn a_prompt_that_looks_like_an_option_or_a_subcommand_reaches_codex_as_the_prompt() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = FakeModel::start(
        dir.path(),
        json!({"turns": [], "by_prompt": [
            {"match": "-m evil", "turns": [{"message": "took the dash prompt"}]},
            {"match": "review", "turns": [{"message": "took the review prompt"}]}
        ]}),
    );
    let home = model.codex_home(dir.path());
    let mesh = codex_mesh(1, &home);
    let node = &mesh.nodes[0];
    // Without `--` before it, codex takes the first as options (and then waits for a prompt
    // on stdin) and the second as its `review` subcommand.
    for (prompt, answer) in [
        ("-m evil", "took the dash prompt"),
        ("review", "took the review prompt"),
    ] {
        let id = submit_job(node, json!({"prompt": prompt}));
        let job = wait_job(node, &id, "the codex job to finish", job_finished);
        assert_eq!(job["status"], "succeeded", "{job}\n{}", model.requests());
        assert_eq!(job["result"]["final_message"], answer, "{job}");
        assert_eq!(job["prompt"], prompt);
    }
}
