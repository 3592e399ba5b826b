//! Client commands find their node through a `.env` in the working directory, and the node's
//! own settings come from environment variables as well as flags.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Mesh, Node};

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");

#[test]
fn dotenv_in_the_working_directory_points_client_commands_at_the_node() {
    let mesh = Mesh::start(BIN, 1);
    let node = &mesh.nodes[0];
    let cwd = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        cwd.path().join(".env"),
        format!("CODEX_MESH_DATA_DIR={}\n", node.data_dir().display()),
    )
    .expect("write .env");
    let out = Command::new(BIN)
        .args(["status", "--json"])
        .current_dir(cwd.path())
        .env_remove("CODEX_MESH_DATA_DIR")
        .env("HOME", cwd.path())
        .stdin(Stdio::null())
        .output()
        .expect("run status");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["node_id"].as_str(), Some(node.id()));

    // Without the .env the same command finds no node and says how to fix it.
    let empty = tempfile::tempdir().expect("temp dir");
    let out = Command::new(BIN)
        .args(["status"])
        .current_dir(empty.path())
        .env_remove("CODEX_MESH_DATA_DIR")
        .env("HOME", empty.path())
        .env_remove("XDG_DATA_HOME")
        .stdin(Stdio::null())
        .output()
        .expect("run status");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no running node found"), "{stderr}");
}

#[test]
fn node_settings_come_from_environment_variables() {
    let root = tempfile::tempdir().expect("temp dir");
    let data = root.path().join("envnode");
    let mut command_line = vec!["up".to_string()];
    command_line
        .extend(["--listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0"].map(String::from));
    let envs = [
        ("CODEX_MESH_DATA_DIR", data.display().to_string()),
        ("CODEX_MESH_TAGS", "gpu,linux".to_string()),
        ("CODEX_MESH_SLOTS", "7".to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v));
    let mut node = Node::spawn_with_env(
        Path::new(BIN),
        "envnode",
        &data,
        command_line,
        envs.to_vec(),
    );
    node.wait_ready(Duration::from_secs(30));
    let nodes = node.nodes().expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].tags, vec!["gpu".to_string(), "linux".to_string()]);
    assert_eq!(nodes[0].slots, 7);
}

#[test]
fn a_first_start_that_fails_leaves_the_directory_retryable() {
    let root = tempfile::tempdir().expect("temp dir");
    let data = root.path().join("first");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = taken.local_addr().expect("local addr").port();
    let taken_http = format!("127.0.0.1:{port}");
    let taken_p2p = format!("/ip4/127.0.0.1/tcp/{port}");
    for (flag, listen, http) in [
        ("--http", "/ip4/127.0.0.1/tcp/0", taken_http.as_str()),
        ("--listen", taken_p2p.as_str(), "127.0.0.1:0"),
    ] {
        let data_dir = data.display().to_string();
        let args = [
            "up",
            "--data-dir",
            &data_dir,
            "--listen",
            listen,
            "--http",
            http,
        ];
        let out = common::run_cli(Path::new(BIN), &args, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} on a taken port must fail");
        assert!(stderr.contains("in use"), "{flag}: {stderr}");
        assert!(
            !data.join("mesh.key").exists(),
            "a failed start must not claim a mesh"
        );
    }
    drop(taken);

    // The retry founds the mesh properly: it is the only voter and master at once.
    let args = common::up_args(&data, "first", &common::NodeOptions::default());
    let mut node = Node::spawn(Path::new(BIN), "first", &data, args);
    node.wait_ready(Duration::from_secs(30));
    let status = common::poll(Duration::from_secs(30), "the node to become master", || {
        let status = node.status()?;
        if status.is_master {
            Ok(status)
        } else {
            Err(format!("{status:?}"))
        }
    });
    assert_eq!(status.voters, vec![status.node_id.clone()]);
}

#[test]
fn api_errors_are_json_for_unknown_paths_and_methods() {
    let mesh = Mesh::start(BIN, 1);
    let node = &mesh.nodes[0];
    for (method, path, status) in [
        ("GET", "/api/v1/nope", 404),
        ("PUT", "/api/v1/status", 405),
        ("POST", "/api/v1/nodes/nobody/drain", 404),
    ] {
        let response = node.api(method, path, None).expect("request");
        assert_eq!(
            response.status, status,
            "{method} {path}: {}",
            response.body
        );
        let body: serde_json::Value =
            serde_json::from_str(&response.body).expect("JSON error body");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
}

#[test]
fn a_browser_at_the_node_address_gets_a_page_and_api_paths_stay_json() {
    let mesh = Mesh::start(BIN, 1);
    let node = &mesh.nodes[0];
    let base = &node.endpoint().url;
    for path in ["/", "/jobs/01JXT21RHD7453WZP6FT16E003"] {
        let page = common::http_request("GET", &format!("{base}{path}"), None, None)
            .expect("request the page");
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        assert!(
            page.headers["content-type"].starts_with("text/html"),
            "{path}: {:?}",
            page.headers
        );
        assert!(
            page.body.contains("<title>Codex Mesh</title>"),
            "{}",
            page.body
        );
        assert_eq!(page.headers["cache-control"], "no-cache");
        assert!(page.headers["content-security-policy"].contains("default-src 'none'"));
    }
    // Without a token, API paths are still refused as JSON, and unknown ones are JSON 404s.
    let refused = common::http_request("GET", &format!("{base}/api/v1/status"), None, None)
        .expect("request status");
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert!(refused.error_message().is_some(), "{}", refused.body);
    let missing = common::http_request("GET", &format!("{base}/api/nope"), None, None)
        .expect("request an unknown API path");
    assert_eq!(missing.status, 404);
    assert!(missing.error_message().is_some(), "{}", missing.body);
    let posted =
        common::http_request("POST", &format!("{base}/"), None, Some("{}")).expect("post to /");
    assert_eq!(posted.status, 404, "only GET and HEAD get the page");
}
