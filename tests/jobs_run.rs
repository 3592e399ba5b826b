//! Jobs run by real nodes with operator-defined agents (plain commands): success with the
//! final message, failure with the exit code, wall-clock and idle limits, cancellation that
//! kills the whole process group, and a re-run elsewhere after the worker is killed.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{job_finished, poll, submit_job, wait_job, Mesh, Node, NodeOptions};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
const WAIT: Duration = Duration::from_secs(45);

/// One node with the given agents, its work directories under the mesh's temp root.
fn single(agents: &[&str]) -> (Mesh, std::path::PathBuf) {
    let mut extra: Vec<String> = Vec::new();
    for agent in agents {
        extra.extend(["--agent".to_string(), agent.to_string()]);
    }
    let workdirs = tempfile::tempdir().expect("temp dir").keep();
    extra.extend(["--workdir-root".to_string(), workdirs.display().to_string()]);
    let mesh = Mesh::start_with(
        BIN,
        vec![("n1".to_string(), NodeOptions::with_extra(&extra))],
    );
    (mesh, workdirs)
}

#[test]
fn a_command_agent_runs_in_a_fresh_work_dir_and_reports_its_result() {
    let (mesh, workdirs) = single(&[
        "write=sh -c 'echo working; printf %s \"$0\" > note.txt; echo all done' '{prompt}'",
        "fail=sh -c 'echo oops >&2; exit 3'",
    ]);
    let node = &mesh.nodes[0];
    let id = submit_job(
        node,
        json!({"prompt": "hello; $(rm -rf /)", "agent": "write"}),
    );
    let job = wait_job(node, &id, "job to finish", job_finished);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["exit_code"], 0);
    assert_eq!(job["result"]["final_message"], "all done");
    assert_eq!(job["node_name"], "n1");
    let note = std::fs::read_to_string(workdirs.join(&id).join("note.txt")).expect("note.txt");
    assert_eq!(
        note, "hello; $(rm -rf /)",
        "the prompt reaches the agent verbatim, no shell"
    );
    let log = std::fs::read_to_string(node.data_dir().join("job-logs").join(format!("{id}.log")))
        .expect("job log");
    assert!(log.contains("working") && log.contains("all done"), "{log}");

    let id = submit_job(node, json!({"prompt": "x", "agent": "fail"}));
    let job = wait_job(node, &id, "failing job to finish", job_finished);
    common::assert_ended(&job, "failed", "code 3");
    assert_eq!(job["result"]["exit_code"], 3);

    // `submit --wait` follows the job and its exit status says how it ended.
    let out = node.cli(&["submit", "--wait", "--agent", "write", "from the cli"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let shown = |text: &str| {
        stderr
            .find(text)
            .unwrap_or_else(|| panic!("{text}: {stderr}"))
    };
    assert!(shown("  | working") < shown("  | all done"));
    assert!(shown("  | all done") < shown("succeeded (node n1)"));
    assert!(
        stdout.contains("status    succeeded") && stdout.contains("all done"),
        "{stdout}"
    );
    let out = node.cli(&["submit", "--wait", "--agent", "fail", "x"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("status    failed"), "{stdout}");
    assert!(stdout.contains("exit code 3"), "{stdout}");
}

#[test]
fn wall_clock_and_idle_limits_stop_the_agent() {
    let (mesh, _) = single(&[
        "sleepy=sh -c 'sleep 60'",
        "quiet=sh -c 'echo started; sleep 60'",
    ]);
    let node = &mesh.nodes[0];
    let id = submit_job(
        node,
        json!({"prompt": "x", "agent": "sleepy", "timeout_secs": 2, "idle_timeout_secs": 100}),
    );
    let job = wait_job(node, &id, "wall-clock limit", job_finished);
    common::assert_ended(&job, "timed_out", "time limit");

    let id = submit_job(
        node,
        json!({"prompt": "x", "agent": "quiet", "timeout_secs": 100, "idle_timeout_secs": 2}),
    );
    let job = wait_job(node, &id, "idle limit", job_finished);
    common::assert_ended(&job, "timed_out", "no output");
}

/// Processes whose working directory is `dir`: an agent and its children. (Pids that the
/// agent itself sees may be those of its own pid namespace, when it runs in bubblewrap.)
fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir))
        .collect()
}

#[test]
fn cancel_kills_the_whole_process_group() {
    let (mesh, workdirs) =
        single(&["tree=sh -c 'sleep 60 & echo $! > child.pid; echo $$ > sh.pid; wait'"]);
    let node = &mesh.nodes[0];
    let id = submit_job(node, json!({"prompt": "x", "agent": "tree"}));
    wait_job(node, &id, "job running", |j| j["status"] == "running");
    let dir = workdirs.join(&id);
    poll(WAIT, "the agent to write its child's pid", || {
        std::fs::read_to_string(dir.join("child.pid")).map_err(|e| e.to_string())
    });
    let before = processes_in(&dir);
    assert!(before.len() >= 2, "the agent and its child: {before:?}");
    node.api_ok("POST", &format!("/api/v1/jobs/{id}/cancel"), None);
    poll(WAIT, "the agent and its child to be killed", || {
        let left = processes_in(&dir);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("still alive: {left:?}"))
        }
    });
    let job = wait_job(node, &id, "job cancelled", job_finished);
    assert_eq!(job["status"], "cancelled");
}

/// Three converged nodes with `agent`, the master draining so that jobs run on the others.
/// Returns the mesh, its view and the master's index.
fn trio_with_draining_master(agent: &str) -> (Mesh, common::MeshView, usize) {
    let specs = (1..=3)
        .map(|i| {
            (
                format!("n{i}"),
                NodeOptions::with_extra(&["--agent", agent]),
            )
        })
        .collect();
    let mesh = Mesh::start_with(BIN, specs);
    let view = mesh.wait_converged(
        &mesh.all(),
        common::Expect {
            online: 3,
            voters: Some(3),
        },
    );
    let master = mesh
        .nodes
        .iter()
        .position(|n| n.id() == view.master)
        .expect("master");
    let master_name = mesh.nodes[master].name.clone();
    mesh.nodes[master].api_ok("POST", &format!("/api/v1/nodes/{master_name}/drain"), None);
    (mesh, view, master)
}

#[test]
fn a_job_on_a_killed_worker_is_lost_and_runs_again_elsewhere() {
    let (mut mesh, _, master) = trio_with_draining_master("slow=sh -c 'sleep 4; echo finished'");
    let watcher = &mesh.nodes[master];
    let id = submit_job(watcher, json!({"prompt": "y", "agent": "slow"}));
    let running = wait_job(watcher, &id, "job running", |j| j["status"] == "running");
    let worker = running["node"].as_str().expect("node").to_string();
    let worker_index = mesh
        .nodes
        .iter()
        .position(|n| n.id() == worker)
        .expect("worker");
    assert_ne!(worker_index, master, "a draining node got the job");

    mesh.nodes[worker_index].kill9();
    let watcher = &mesh.nodes[master];
    let job = wait_job(watcher, &id, "the re-run to finish", |j| {
        j["attempt"] == 2 && job_finished(j)
    });
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_ne!(job["node"].as_str(), Some(worker.as_str()));
    assert_eq!(job["result"]["final_message"], "finished");
}

#[path = "support/git_server.rs"]
mod git_server;

#[test]
fn a_job_with_two_repositories_on_a_two_node_mesh_reports_a_diff_per_repository() {
    let server = git_server::GitServer::start();
    let app = server.repo("app", &[("README", "app\n"), ("src.txt", "a\nb\n")]);
    let lib = server.repo("lib", &[("README", "lib\n")]);
    let edit = "edit=sh -c 'for d in app lib; do echo change >> $d/README; done; echo new > app/added.txt; echo edited both'";
    let list =
        "list=sh -c 'echo $(ls app) $(test -z \"$(git -C app status --porcelain)\" && echo clean)'";
    let specs = vec![
        (
            "n1".to_string(),
            NodeOptions::with_extra(&["--agent", edit, "--agent", list]),
        ),
        (
            "n2".to_string(),
            NodeOptions::with_extra(&[
                "--agent",
                edit,
                "--agent",
                list,
                "--tags",
                "builder",
                "--allow-local-repos",
            ]),
        ),
    ];
    let mesh = Mesh::start_with(BIN, specs);
    let n1 = &mesh.nodes[0];
    poll(WAIT, "n1 to see n2's tag", || {
        let nodes = n1.nodes()?;
        nodes
            .iter()
            .any(|n| n.tags == vec!["builder".to_string()])
            .then_some(())
            .ok_or_else(|| format!("{nodes:?}"))
    });
    let id = submit_job(
        n1,
        json!({"prompt": "edit", "agent": "edit", "tag": "builder", "repos": [app, format!("{lib}#main")]}),
    );
    let job = wait_job(n1, &id, "job with repositories to finish", job_finished);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["node_name"], "n2");
    assert_eq!(job["result"]["final_message"], "edited both");
    let diffs = job["result"]["diffs"].as_array().expect("diffs").clone();
    assert_eq!(diffs.len(), 2, "{job}");
    let files = |i: usize| -> Vec<(String, u64, u64)> {
        let mut files: Vec<_> = diffs[i]["files"]
            .as_array()
            .expect("files")
            .iter()
            .map(|f| {
                (
                    f["path"].as_str().unwrap_or("").to_string(),
                    f["added"].as_u64().unwrap_or(0),
                    f["removed"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        files.sort();
        files
    };
    assert_eq!(diffs[0]["source"], app.as_str());
    assert_eq!(
        files(0),
        vec![("README".into(), 1, 0), ("added.txt".into(), 1, 0)]
    );
    assert_eq!(files(1), vec![("README".into(), 1, 0)]);
    let shown = n1.cli(&["job", &id]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains(&format!("changes   {app}: 2 file(s)")),
        "{shown}"
    );
    assert!(shown.contains("added.txt"), "{shown}");

    // The next job on the repository (made from the node's cached mirror and spare checkout)
    // sees what was pushed meanwhile, on a clean tree.
    git_server::git(&server.dir("app"), &["rm", "-q", "src.txt"]);
    std::fs::write(server.dir("app").join("pushed.txt"), "pushed\n").expect("write");
    git_server::git(&server.dir("app"), &["add", "."]);
    git_server::git(&server.dir("app"), &["commit", "-qm", "second"]);
    let id = submit_job(
        n1,
        json!({"prompt": "list", "agent": "list", "tag": "builder", "repos": [app]}),
    );
    let job = wait_job(n1, &id, "second job on the repository", job_finished);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["result"]["final_message"], "README pushed.txt clean",
        "{job}"
    );

    // A job naming a local path runs only where the operator allows that (n2), even when
    // the other node is idle.
    let local = server.dir("app").display().to_string();
    for _ in 0..3 {
        let id = submit_job(
            n1,
            json!({"prompt": "list", "agent": "list", "repos": [local]}),
        );
        let job = wait_job(n1, &id, "job on a local path", job_finished);
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["node_name"], "n2", "{job}");
    }

    // An unreachable repository fails the job quickly, with the reason.
    let closed = format!("git://127.0.0.1:{}/gone.git", common::free_port());
    let id = submit_job(
        n1,
        json!({"prompt": "x", "agent": "edit", "repos": [closed]}),
    );
    let job = wait_job(
        n1,
        &id,
        "job with an unreachable repository to fail",
        job_finished,
    );
    common::assert_ended(&job, "failed", "cannot get");
}

#[test]
fn a_job_survives_the_death_of_the_master() {
    let (mut mesh, view, master) = trio_with_draining_master("slow=sh -c 'sleep 4; echo survived'");
    let id = submit_job(&mesh.nodes[master], json!({"prompt": "x", "agent": "slow"}));
    let running = wait_job(&mesh.nodes[master], &id, "job running", |j| {
        j["status"] == "running"
    });
    let worker = running["node"].as_str().expect("node").to_string();
    mesh.nodes[master].kill9();
    let live = mesh.all_except(&[master]);
    let new = mesh.wait_new_master(&live, &view);
    let observer = live
        .iter()
        .copied()
        .find(|&i| mesh.nodes[i].id() != worker)
        .expect("a node other than the worker");
    let job = wait_job(
        &mesh.nodes[observer],
        &id,
        "job to finish under the new master",
        job_finished,
    );
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 1, "the job was not re-run");
    assert_eq!(job["node"].as_str(), Some(worker.as_str()));
    assert_eq!(job["result"]["final_message"], "survived");
    assert!(new.epoch > view.epoch);
}

#[test]
fn any_peer_serves_the_log_which_outlives_the_worker() {
    let agent = [
        "--agent",
        "talk=sh -c 'for i in 1 2 3; do echo line $i; sleep 1; done; echo bye'",
    ];
    let specs = vec![
        ("n1".to_string(), NodeOptions::with_extra(&agent)),
        ("n2".to_string(), NodeOptions::with_extra(&agent)),
    ];
    let mut mesh = Mesh::start_with(BIN, specs);
    let n1 = &mesh.nodes[0];
    poll(WAIT, "n1 to see n2", || {
        let nodes = n1.nodes()?;
        (nodes.iter().filter(|n| n.online).count() == 2)
            .then_some(())
            .ok_or_else(|| format!("{nodes:?}"))
    });
    let id = submit_job(n1, json!({"prompt": "x", "agent": "talk", "node": "n2"}));
    // While it runs, n1 (not the worker) streams the log from n2.
    let partial = poll(WAIT, "some output through n1", || {
        let body = n1
            .api_ok("GET", &format!("/api/v1/jobs/{id}/log"), None)
            .body;
        body.contains("line 1").then_some(body.clone()).ok_or(body)
    });
    assert!(!partial.contains("bye"), "read while running: {partial}");
    let out = n1.cli(&["logs", &id, "-f"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let followed = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(followed, "line 1\nline 2\nline 3\nbye\n");

    // The master (n1, the only voter) kept a copy: the log survives the worker.
    poll(WAIT, "the copy on the master", || {
        let copy = n1.data_dir().join("job-logs").join(format!("{id}.log"));
        std::fs::read_to_string(&copy)
            .ok()
            .filter(|t| t.contains("bye"))
            .ok_or_else(|| "no copy yet".to_string())
    });
    mesh.nodes[1].kill9();
    let n1 = &mesh.nodes[0];
    let body = n1
        .api_ok("GET", &format!("/api/v1/jobs/{id}/log?offset=7"), None)
        .body;
    assert_eq!(body, "line 2\nline 3\nbye\n");
}

#[test]
fn old_work_directories_are_cleaned_but_failed_ones_can_be_kept() {
    let workdirs = tempfile::tempdir().expect("temp dir").keep();
    let extra = [
        "--agent",
        "ok=true",
        "--agent",
        "bad=false",
        "--workdir-root",
        &workdirs.display().to_string(),
        "--keep-workdirs",
        "1",
        "--keep-failed-workdirs",
    ]
    .map(String::from);
    let mesh = Mesh::start_with(
        BIN,
        vec![("n1".to_string(), NodeOptions::with_extra(&extra))],
    );
    let node = &mesh.nodes[0];
    let mut ids = Vec::new();
    for agent in ["bad", "ok", "ok", "ok"] {
        let id = submit_job(node, json!({"prompt": "x", "agent": agent}));
        wait_job(node, &id, "job to finish", job_finished);
        ids.push(id);
    }
    let mut left: Vec<String> = std::fs::read_dir(&workdirs)
        .expect("work root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    let mut expected = vec![ids[0].clone(), ids[3].clone()];
    expected.sort();
    assert_eq!(
        left, expected,
        "the failed job's and the newest directory remain"
    );
}

#[test]
fn any_peer_streams_a_jobs_events_until_it_ends() {
    let agent = [
        "--agent",
        "talk=sh -c 'echo first; sleep 1; printf \"progress\\r\\n\"; echo last'",
    ];
    let specs = vec![
        ("n1".to_string(), NodeOptions::with_extra(&agent)),
        ("n2".to_string(), NodeOptions::with_extra(&agent)),
    ];
    let mesh = Mesh::start_with(BIN, specs);
    let n1 = &mesh.nodes[0];
    poll(WAIT, "n1 to see n2", || {
        let nodes = n1.nodes()?;
        (nodes.iter().filter(|n| n.online).count() == 2)
            .then_some(())
            .ok_or_else(|| format!("{nodes:?}"))
    });
    let id = submit_job(n1, json!({"prompt": "x", "agent": "talk", "node": "n2"}));
    // The stream ends by itself once the job has job_finished and its log was sent.
    let body = n1
        .api_ok("GET", &format!("/api/v1/jobs/{id}/events"), None)
        .body;
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"job"), "{body}");
    assert_eq!(events.last(), Some(&"end"), "{body}");
    assert!(events.contains(&"log"), "{body}");
    for text in [
        "data: first",
        "data: progress",
        "data: last",
        "\"status\":\"succeeded\"",
    ] {
        assert!(body.contains(text), "missing {text:?} in {body}");
    }
    let missing = n1
        .api("GET", "/api/v1/jobs/01NOPE/events", None)
        .expect("request");
    assert_eq!(missing.status, 404);
}

#[test]
fn the_agent_gets_a_scrubbed_environment() {
    let root = tempfile::tempdir().expect("temp dir");
    let data = root.path().join("n1");
    // A bad variable name is a configuration error, said in one line.
    let bad = common::up_args(
        &data,
        "n1",
        &NodeOptions::with_extra(&["--agent", "env=env", "--pass-env", "NOT-A-NAME"]),
    );
    let out = common::run_cli(Path::new(BIN), &bad, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--pass-env \"NOT-A-NAME\": not an environment variable name"),
        "{stderr}"
    );

    let mut args = common::up_args(
        &data,
        "n1",
        &NodeOptions::with_extra(&["--agent", "env=env", "--pass-env", "OTHER_AGENT_KEY"]),
    );
    args.extend([
        "--github-token".to_string(),
        "tok-should-not-leak-42".to_string(),
    ]);
    let envs = vec![
        ("NODE_ONLY_SECRET".to_string(), "hush-17".to_string()),
        ("CODEX_HOME".to_string(), "/somewhere/codex".to_string()),
        (
            "OTHER_AGENT_KEY".to_string(),
            "passed-on-purpose-5".to_string(),
        ),
    ];
    let mut node = Node::spawn_with_env(Path::new(BIN), "n1", &data, args, envs);
    node.wait_ready(WAIT);
    let id = submit_job(&node, json!({"prompt": "x", "agent": "env"}));
    let job = wait_job(&node, &id, "env job", job_finished);
    assert_eq!(job["status"], "succeeded", "{job}");
    let log = node
        .api_ok("GET", &format!("/api/v1/jobs/{id}/log"), None)
        .body;
    assert!(log.contains("PATH="), "{log}");
    assert!(log.contains("CODEX_HOME=/somewhere/codex"), "{log}");
    assert!(
        log.contains("OTHER_AGENT_KEY=passed-on-purpose-5"),
        "--pass-env: {log}"
    );
    for secret in [
        "hush-17",
        "NODE_ONLY_SECRET",
        "tok-should-not-leak-42",
        "RUST_LOG",
    ] {
        assert!(
            !log.contains(secret),
            "{secret} leaked into the agent: {log}"
        );
    }
}
