//! Private repositories: the node's GitHub token reaches the server through git's credentials
//! callback only (never in a URL that is stored), and a missing or refused token fails the job
//! at once with the reason instead of hanging; and the token goes only to the `--github-url`
//! host, never to another server a job names. The servers are the real `git http-backend`
//! behind HTTP Basic authentication, one in the role of github.com.

mod common;
#[path = "support/git_server.rs"]
mod git_server;

use std::path::{Path, PathBuf};

use common::{job_finished, submit_job, wait_job, Mesh, NodeOptions};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
const TOKEN: &str = "ghp-test-token-4f9a1c";
/// Prints the checkout's README and its origin URL.
const SHOW: &str = "show=sh -c 'echo $(cat tool/README) $(git -C tool remote get-url origin)'";

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => found.extend(files_containing(&path, needle)),
            Ok(t) if t.is_file() => {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path);
                }
            }
            _ => {}
        }
    }
    found
}

#[test]
fn private_repositories_use_the_token_and_bad_credentials_fail_fast() {
    let server = git_server::HttpGitServer::start(TOKEN);
    server.repo("acme/tool", &[("README", "private-tool\n")]);
    let base = server.base_url();
    let workdirs = tempfile::tempdir().expect("temp dir");
    let node = |name: &str, token: Option<&str>| {
        let root = workdirs.path().join(name).display().to_string();
        let mut extra = vec![
            "--agent".to_string(),
            SHOW.to_string(),
            "--github-url".to_string(),
            base.clone(),
            // Loopback test servers speak plain http.
            "--allow-http-credentials".to_string(),
            "--workdir-root".to_string(),
            root,
        ];
        if let Some(token) = token {
            extra.extend(["--github-token".to_string(), token.to_string()]);
        }
        (name.to_string(), NodeOptions::with_extra(&extra))
    };
    let mesh = Mesh::start_with(
        BIN,
        vec![
            node("n1", Some(TOKEN)),
            node("n2", Some("not-the-token")),
            node("n3", None),
        ],
    );
    let n1 = &mesh.nodes[0];
    let run_on = |target: &str| {
        let id = submit_job(
            n1,
            json!({"prompt": "show", "agent": "show", "node": target, "repos": ["acme/tool"]}),
        );
        let job = wait_job(
            n1,
            &id,
            &format!("the job on {target} to end"),
            job_finished,
        );
        assert_eq!(job["node_name"], target, "{job}");
        (id, job)
    };

    // The right token: the clone works, and the agent sees the plain URL.
    let (id, job) = run_on("n1");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["result"]["final_message"],
        format!("private-tool {base}/acme/tool.git"),
        "{job}"
    );
    let authorized: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|(_, status)| *status == 200)
        .collect();
    assert!(
        !authorized.is_empty()
            && authorized
                .iter()
                .all(|(user, _)| user.as_deref() == Some("x-access-token")),
        "{authorized:?}"
    );
    // The token is in no file the node wrote: not in the work directory, not in the
    // mirror cache, not in the store.
    for dir in [
        workdirs.path().join("n1").join(&id),
        n1.data_dir().to_path_buf(),
    ] {
        let leaks = files_containing(&dir, TOKEN.as_bytes());
        assert!(leaks.is_empty(), "token written to {leaks:?}");
    }

    // A refused token: failed at once with the reason, after a single try.
    let before = server.requests().len();
    let (_, job) = run_on("n2");
    assert_eq!(job["status"], "failed", "{job}");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("acme/tool") && reason.contains("refused the credentials"),
        "{job}"
    );
    let refused = server.requests()[before..]
        .iter()
        .filter(|(user, status)| user.is_some() && *status == 401)
        .count();
    assert_eq!(refused, 1, "the wrong token is sent once, not retried");

    // No token at all: failed with a reason that says what to configure.
    let (_, job) = run_on("n3");
    common::assert_ended(&job, "failed", "needs credentials and none are configured");

    // Another server that asks for credentials: it never sees the token.
    let other = git_server::HttpGitServer::start("the-other-servers-secret");
    other.repo("acme/tool", &[("README", "elsewhere\n")]);
    let url = format!("{}/acme/tool.git", other.base_url());
    let id = submit_job(
        n1,
        json!({"prompt": "show", "agent": "show", "node": "n1", "repos": [url]}),
    );
    let job = wait_job(
        n1,
        &id,
        "the job naming another server to end",
        job_finished,
    );
    common::assert_ended(
        &job,
        "failed",
        "sends its token only to the --github-url host",
    );
    assert!(
        other.requests().iter().any(|(_, status)| *status == 401),
        "the other server asked for credentials"
    );
    assert!(
        other.refused_passwords().iter().all(|p| !p.contains(TOKEN)),
        "the token went to another host: {:?}",
        other.refused_passwords()
    );
}
