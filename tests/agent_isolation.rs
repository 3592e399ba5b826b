//! Agents must not read the node's secrets. An operator-defined agent tries to read the data
//! directory's `mesh.key` (directly and through `/proc/<node pid>/root`) and the node's
//! `/proc/<pid>/environ`; it must fail when agents run as another user (`--agent-user`, tested
//! only when the tests run as root, as in CI) and when they run as the node's user inside
//! bubblewrap (installed by `.ci/run`). A root node with neither `--agent-user` nor
//! `--allow-root-agents` refuses jobs and says what to do; the work-directory root and the data
//! directory are private.

mod common;

#[path = "support/git_server.rs"]
mod git_server;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{job_finished, submit_job, wait_job, Node, NodeOptions};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
const READY: Duration = Duration::from_secs(45);
const NOBODY: u32 = 65534;
const NODE_SECRET: &str = "node-only-secret-81";

/// An agent that prints who it is and tries every way to the node's secrets. Its prompt is
/// `<data dir> <node pid>`.
const PEEK: &str = "peek=sh -c 'set -- $0; echo \"uid=$(id -u) home=$HOME user=$USER\"; \
cat \"$1/mesh.key\" && echo KEY-LEAKED; \
cat \"/proc/$2/root$1/mesh.key\" && echo ROOT-LEAKED; \
cat \"/proc/$2/environ\" && echo ENV-LEAKED; \
touch made-by-agent; echo peeked' '{prompt}'";
/// Like [`PEEK`], first trying to remove the mask over the data directory.
const UNMASK: &str = "unmask=sh -c 'set -- $0; umount \"$1\"; \
cat \"$1/mesh.key\" && echo KEY-LEAKED; echo peeked' '{prompt}'";

struct Peek {
    node: Node,
    _dir: tempfile::TempDir,
    workdirs: PathBuf,
}

/// Start one node with the peek agents, a secret in its environment and `extra` flags.
fn start(extra: &[&str]) -> Peek {
    start_as(None, extra)
}

/// Like [`start`], the node running as `user` (through `setpriv`; the tests run as root).
fn start_as(user: Option<u32>, extra: &[&str]) -> Peek {
    let dir = tempfile::tempdir().expect("temp dir");
    // Parents of the work directories must be searchable by an agent user.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data = dir.path().join("n1");
    let workdirs = dir.path().join("jobs");
    let mut flags = vec![
        "--agent".to_string(),
        PEEK.to_string(),
        "--agent".to_string(),
        UNMASK.to_string(),
        "--workdir-root".to_string(),
        workdirs.display().to_string(),
    ];
    flags.extend(extra.iter().map(|s| s.to_string()));
    let mut args = common::up_args(&data, "n1", &NodeOptions::with_extra(&flags));
    let mut bin = PathBuf::from(BIN);
    if let Some(uid) = user {
        for dir in [&data, &workdirs] {
            std::fs::create_dir(dir).expect("mkdir");
            std::os::unix::fs::chown(dir, Some(uid), Some(uid)).expect("chown");
        }
        let mut setpriv = vec![
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_string(),
            BIN.to_string(),
        ];
        setpriv.append(&mut args);
        (bin, args) = (PathBuf::from("setpriv"), setpriv);
    }
    let envs = vec![("NODE_SECRET".to_string(), NODE_SECRET.to_string())];
    let mut node = Node::spawn_with_env(&bin, "n1", &data, args, envs);
    node.wait_ready(READY);
    Peek {
        node,
        _dir: dir,
        workdirs,
    }
}

/// Run the peek agent; returns the finished job and its log.
fn peek(peek: &Peek) -> (serde_json::Value, String) {
    run_agent(peek, "peek")
}

/// Run `agent` with the prompt `<data dir> <node pid>`; returns the finished job and its log.
fn run_agent(peek: &Peek, agent: &str) -> (serde_json::Value, String) {
    let node = &peek.node;
    let prompt = format!("{} {}", node.data_dir().display(), node.pid());
    let id = submit_job(node, json!({"prompt": prompt, "agent": agent}));
    let job = wait_job(node, &id, "the peek job to finish", job_finished);
    let log = node
        .api_ok("GET", &format!("/api/v1/jobs/{id}/log"), None)
        .body;
    (job, log)
}

fn mesh_key(node: &Node) -> String {
    std::fs::read_to_string(node.data_dir().join("mesh.key"))
        .expect("mesh.key")
        .trim()
        .to_string()
}

fn assert_nothing_leaked(node: &Node, job: &serde_json::Value, log: &str) {
    assert_eq!(job["status"], "succeeded", "{job}\n{log}");
    assert!(log.contains("peeked"), "the agent ran to its end: {log}");
    let key = mesh_key(node);
    for leak in [key.as_str(), NODE_SECRET, "LEAKED"] {
        assert!(!log.contains(leak), "{leak} reached the agent: {log}");
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").mode() & 0o777
}

#[test]
fn an_agent_user_cannot_read_the_nodes_secrets() {
    if !common::running_as_root() {
        eprintln!("skipped: --agent-user needs the tests to run as root (CI does)");
        return;
    }
    let peek_node = start(&["--agent-user", "nobody"]);
    let (job, log) = peek(&peek_node);
    assert_nothing_leaked(&peek_node.node, &job, &log);
    assert!(
        log.contains(&format!("uid={NOBODY} home=/nonexistent user=nobody")),
        "{log}"
    );
    let id = job["id"].as_str().expect("id");
    let workdir = peek_node.workdirs.join(id);
    for path in [workdir.clone(), workdir.join("made-by-agent")] {
        let meta = std::fs::metadata(&path).expect("metadata");
        assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY), "{path:?}");
    }
    // The root is the node's, searchable by the agent's group only.
    let root = std::fs::metadata(&peek_node.workdirs).expect("metadata");
    assert_eq!((root.uid(), root.gid()), (0, NOBODY));
    assert_eq!(root.mode() & 0o777, 0o750);
    assert_eq!(mode_of(peek_node.node.data_dir()), 0o700);
}

#[test]
fn an_agent_user_gets_its_repositories_and_its_changes_are_summarised() {
    if !common::running_as_root() {
        eprintln!("skipped: --agent-user needs the tests to run as root (CI does)");
        return;
    }
    let server = git_server::GitServer::start();
    let app = server.repo("app", &[("README.md", "# app\n")]);
    let edit = "edit=sh -c 'echo more >> app/README.md && git -C app status --porcelain'";
    let node_run = start(&["--agent-user", "nobody", "--agent", edit]);
    let node = &node_run.node;
    let id = submit_job(
        node,
        json!({"prompt": "x", "agent": "edit", "repos": [app]}),
    );
    let job = wait_job(node, &id, "the edit job to finish", job_finished);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["result"]["diffs"][0]["files"],
        json!([{"path": "README.md", "added": 1, "removed": 0}]),
        "{job}"
    );
    let checkout = node_run.workdirs.join(&id).join("app");
    for path in [checkout.join(".git/config"), checkout.join("README.md")] {
        let meta = std::fs::metadata(&path).expect("metadata");
        assert_eq!(meta.uid(), NOBODY, "{path:?}");
    }
}

#[test]
fn bubblewrap_hides_the_data_dir_from_agents_of_the_nodes_user() {
    assert!(
        on_path("bwrap"),
        "bubblewrap (bwrap) is needed for this test: apt-get install bubblewrap (.ci/run does)"
    );
    let masked = start(&[]);
    let (job, log) = peek(&masked);
    assert_nothing_leaked(&masked.node, &job, &log);
    let me = std::fs::metadata("/proc/self").expect("metadata").uid();
    assert!(log.contains(&format!("uid={me} ")), "{log}");
    let start_log = masked.node.log_tail(200);
    assert!(
        !start_log.contains("can read the node's secrets"),
        "no warning when bubblewrap works: {start_log}"
    );
    if common::running_as_root() {
        // Root agents keep the capabilities Codex's own sandbox needs: the node says so.
        assert_eq!(
            start_log.matches("a root agent can undo that").count(),
            1,
            "{start_log}"
        );
    } else {
        let (job, log) = run_agent(&masked, "unmask");
        assert_nothing_leaked(&masked.node, &job, &log);
    }

    // Without bubblewrap the agent reads the key, and the node said so at start.
    let open = start(&["--bwrap", "none"]);
    let (job, log) = peek(&open);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(log.contains(&mesh_key(&open.node)), "{log}");
    let start_log = open.node.log_tail(200);
    assert_eq!(
        start_log.matches("can read the node's secrets").count(),
        1,
        "{start_log}"
    );
}

#[test]
fn bubblewrap_holds_against_an_agent_that_tries_to_unmask_a_non_root_node() {
    if !common::running_as_root() {
        eprintln!("skipped: the node already runs as non-root in the bubblewrap test");
        return;
    }
    let masked = start_as(Some(NOBODY), &[]);
    for agent in ["peek", "unmask"] {
        let (job, log) = run_agent(&masked, agent);
        assert_nothing_leaked(&masked.node, &job, &log);
        assert!(
            log.contains(&format!("uid={NOBODY} ")) || agent == "unmask",
            "{log}"
        );
        assert!(
            log.contains("umount") || agent == "peek",
            "umount was tried: {log}"
        );
    }
    let start_log = masked.node.log_tail(200);
    assert!(start_log.contains("with the data directory"), "{start_log}");
}

#[test]
fn a_root_node_refuses_to_run_agents_as_root_and_says_what_to_do() {
    if !common::running_as_root() {
        eprintln!("skipped: only a node that runs as root refuses");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("n1");
    let mut args = common::up_args(
        &data,
        "n1",
        &NodeOptions::with_extra(&["--agent", "hello=echo hello"]),
    );
    args.retain(|a| a != common::ALLOW_ROOT_AGENTS);
    let mut node = Node::spawn(Path::new(BIN), "n1", &data, args);
    node.wait_ready(READY);
    let id = submit_job(&node, json!({"prompt": "x", "agent": "hello"}));
    let job = wait_job(&node, &id, "the refusal to show", |job| {
        job["reason"]
            .as_str()
            .is_some_and(|r| r.contains("will not run agents as root"))
    });
    assert_eq!(job["status"], "queued", "{job}");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("--agent-user NAME") && reason.contains("--allow-root-agents"),
        "{reason}"
    );
    let log = node.log_tail(500);
    assert_eq!(
        log.matches("every job assigned here is refused").count(),
        1,
        "{log}"
    );
}

#[test]
fn work_and_data_directories_are_private_and_a_foreign_root_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("n1");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let workdirs = dir.path().join("jobs");
    std::fs::create_dir(&workdirs).expect("mkdir");
    std::fs::set_permissions(&workdirs, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let root_flag = ["--workdir-root".to_string(), workdirs.display().to_string()];
    let args = common::up_args(&data, "n1", &NodeOptions::with_extra(&root_flag));
    let mut node = Node::spawn(Path::new(BIN), "n1", &data, args);
    node.wait_ready(READY);
    assert_eq!(mode_of(&data), 0o700, "a loose data dir is tightened");
    assert_eq!(
        mode_of(&workdirs),
        0o700,
        "a loose work-dir root is tightened"
    );
    drop(node);

    if !common::running_as_root() {
        eprintln!("skipped the foreign root: needs root to give a directory to another user");
        return;
    }
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::os::unix::fs::chown(&foreign, Some(NOBODY), Some(NOBODY)).expect("chown");
    let args = common::up_args(
        &data,
        "n1",
        &NodeOptions::with_extra(&["--workdir-root", &foreign.display().to_string()]),
    );
    let out = common::run_cli(Path::new(BIN), &args, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("belongs to another user (uid 65534)"),
        "{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one line: {stderr}");
    assert!(
        !foreign.join(".spares").exists(),
        "nothing is made in a foreign root"
    );
}

/// Whether `program` is on `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
