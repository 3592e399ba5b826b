//! Shared harness for the multi-process mesh tests (`tests/mesh_cluster.rs`)
//! and the `mesh_bench` example.
//!
//! Everything here is plain synchronous std code: every node is a real
//! `codex-mesh` process started with [`std::process::Command`] on loopback,
//! and its HTTP API is spoken through a tiny blocking HTTP/1.1 client over
//! [`std::net::TcpStream`].
//!
//! Conventions:
//! * a node named `NAME` keeps its data in `ROOT/NAME` and its combined
//!   stdout/stderr in `ROOT/NAME.log` (appended across restarts);
//! * every child process is killed when its [`Node`] is dropped, and if the
//!   current thread is panicking (a failing test) the tail of each node's log
//!   is printed and the temporary directory is kept for inspection.

// Each test binary / example uses a different subset of the harness.
#![allow(dead_code)]

pub mod records;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Default pause between two probes of a polling loop.
pub const POLL_INTERVAL: Duration = Duration::from_millis(75);
/// How long a freshly spawned node may take to serve its authenticated API.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a mesh may take to converge (membership, master, voters).
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a one-shot CLI command may run before it is considered hung.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Number of log lines printed per node when a test fails.
const LOG_TAIL_LINES: usize = 60;
/// Timeout for establishing a TCP connection to a node's HTTP API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout for every individual read/write on an HTTP connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Tiny blocking HTTP/1.1 client
// ---------------------------------------------------------------------------

/// A complete HTTP response: status code and body decoded as UTF-8 (lossy).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
}

impl HttpResponse {
    /// Deserializes the body as JSON, describing the response on failure.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.body).map_err(|e| {
            format!(
                "HTTP {} body is not the expected JSON ({e}): {}",
                self.status,
                truncate(&self.body, 300)
            )
        })
    }

    /// The `error` string of a JSON error body (`{"error": "..."}`), if any.
    pub fn error_message(&self) -> Option<String> {
        let value: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        value.get("error")?.as_str().map(str::to_owned)
    }

    /// Fails with a description unless the status is exactly `expected`.
    pub fn expect_status(self, expected: u16) -> Result<HttpResponse, String> {
        if self.status == expected {
            Ok(self)
        } else {
            Err(format!(
                "expected HTTP {expected}, got {}: {}",
                self.status,
                truncate(&self.body, 300)
            ))
        }
    }
}

/// Performs one HTTP/1.1 request with `Connection: close`.
///
/// `url` is a full `http://host:port/path` URL. A bearer token and a JSON
/// body are added when given.
pub fn http_request(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> io::Result<HttpResponse> {
    http_request_with(method, url, token, body, &[])
}

/// Like [`http_request`], with extra request headers.
pub fn http_request_with(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> io::Result<HttpResponse> {
    let (host, path) = split_url(url)?;
    let addr = host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| invalid_data(format!("{host} resolves to no address")))?;
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    stream.write_all(&build_request(method, host, path, token, body, headers))?;
    read_response(&mut stream)
}

/// Splits `http://host:port/path` into `("host:port", "/path")`.
fn split_url(url: &str) -> io::Result<(&str, &str)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| invalid_data(format!("not an http:// URL: {url}")))?;
    Ok(match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    })
}

/// Serializes the request head and body.
fn build_request(
    method: &str,
    host: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nAccept: */*\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        head.push_str("Content-Type: application/json\r\n");
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body.as_bytes());
    request
}

/// Reads until a complete response has arrived (or the peer closes).
fn read_response(stream: &mut TcpStream) -> io::Result<HttpResponse> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        let eof = n == 0;
        raw.extend_from_slice(&buf[..n]);
        if let Some(response) = parse_response(&raw, eof)? {
            return Ok(response);
        }
        if eof {
            return Err(invalid_data("connection closed before a complete response"));
        }
    }
}

/// Parses `raw` as an HTTP response; `Ok(None)` means "need more bytes".
fn parse_response(raw: &[u8], eof: bool) -> io::Result<Option<HttpResponse>> {
    let Some(head_end) = find(raw, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status = parse_status_line(lines.next().unwrap_or_default())?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[head_end + 4..];
    let body = if status == 204 || status == 304 || (100..200).contains(&status) {
        Some(Vec::new())
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        decode_chunked(rest)?
    } else if let Some(len) = headers.get("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| invalid_data(format!("bad Content-Length {len:?}")))?;
        (rest.len() >= len).then(|| rest[..len].to_vec())
    } else {
        eof.then(|| rest.to_vec())
    };
    Ok(body.map(|body| HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        headers,
    }))
}

/// Extracts the status code from `HTTP/1.1 200 OK`.
fn parse_status_line(line: &str) -> io::Result<u16> {
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid_data(format!("bad HTTP status line {line:?}")))
}

/// Decodes a chunked body; `Ok(None)` if the final chunk has not arrived yet.
fn decode_chunked(mut data: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = find(data, b"\r\n") else {
            return Ok(None);
        };
        let size_line = String::from_utf8_lossy(&data[..line_end]);
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| invalid_data(format!("bad chunk size {size_hex:?}")))?;
        if size == 0 {
            return Ok(Some(out));
        }
        let chunk_start = line_end + 2;
        if data.len() < chunk_start + size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&data[chunk_start..chunk_start + size]);
        data = &data[chunk_start + size + 2..];
    }
}

/// Position of the first occurrence of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid_data(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Shortens `text` to at most `max` characters for error messages.
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

// ---------------------------------------------------------------------------
// API data model (only the fields the tests rely on)
// ---------------------------------------------------------------------------

/// `GET /api/v1/status` / `codex-mesh status --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub node_id: String,
    pub name: String,
    pub master: Option<String>,
    pub epoch: u64,
    pub is_master: bool,
    pub voters: Vec<String>,
    pub members: Members,
    #[serde(default)]
    pub listen_addrs: Vec<String>,
}

/// Membership counters inside [`Status`].
#[derive(Debug, Clone, Deserialize)]
pub struct Members {
    pub online: u64,
    pub total: u64,
}

/// One entry of `GET /api/v1/nodes` / `codex-mesh nodes --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub name: String,
    pub tags: Vec<String>,
    pub slots: u32,
    pub online: bool,
    pub draining: bool,
    pub removed: bool,
}

/// Finds a record by node id or by name.
pub fn find_record<'a>(records: &'a [NodeRecord], key: &str) -> Option<&'a NodeRecord> {
    records.iter().find(|r| r.id == key || r.name == key)
}

/// Like [`find_record`] but describes the list when the node is missing.
pub fn record<'a>(records: &'a [NodeRecord], key: &str) -> Result<&'a NodeRecord, String> {
    find_record(records, key).ok_or_else(|| format!("node {key} missing from {records:?}"))
}

/// Value of the first sample of metric `name` in Prometheus text format.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labels) => &labels[labels.find('}')? + 1..],
                None if rest.starts_with(char::is_whitespace) => rest,
                None => return None,
            };
            rest.split_whitespace().next()?.parse().ok()
        })
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// Options for starting a node beyond its name and data directory.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Fixed libp2p TCP port on 127.0.0.1; `0` lets the OS pick one.
    pub p2p_port: u16,
    /// Extra flags such as `--tags a,b`, `--no-master`, `--peer ADDR`.
    pub extra: Vec<String>,
}

impl NodeOptions {
    /// Options with only extra flags.
    pub fn with_extra<S: AsRef<str>>(extra: &[S]) -> NodeOptions {
        NodeOptions {
            p2p_port: 0,
            extra: extra.iter().map(|s| s.as_ref().to_owned()).collect(),
        }
    }
}

/// Arguments of `codex-mesh up` for a node.
pub fn up_args(data_dir: &Path, name: &str, opts: &NodeOptions) -> Vec<String> {
    let mut args = vec!["up".to_owned()];
    args.extend(common_args(data_dir, name, opts));
    args
}

/// Arguments of `codex-mesh join <ticket>` for a node.
pub fn join_args(ticket: &str, data_dir: &Path, name: &str, opts: &NodeOptions) -> Vec<String> {
    let mut args = vec!["join".to_owned(), ticket.to_owned()];
    args.extend(common_args(data_dir, name, opts));
    args
}

/// Flags shared by `up` and `join`.
fn common_args(data_dir: &Path, name: &str, opts: &NodeOptions) -> Vec<String> {
    let mut args = vec![
        "--data-dir".to_owned(),
        data_dir.display().to_string(),
        "--name".to_owned(),
        name.to_owned(),
        "--listen".to_owned(),
        format!("/ip4/127.0.0.1/tcp/{}", opts.p2p_port),
        "--http".to_owned(),
        "127.0.0.1:0".to_owned(),
    ];
    args.extend(opts.extra.iter().cloned());
    // A node that runs as root refuses to run agents as root unless it is told it may; CI
    // runs the tests as root. Tests of that refusal remove the flag again.
    if running_as_root() && !opts.extra.iter().any(|a| a == "--agent-user") {
        args.push(ALLOW_ROOT_AGENTS.to_owned());
    }
    args
}

/// The flag the harness adds for nodes started by root (see [`up_args`]).
pub const ALLOW_ROOT_AGENTS: &str = "--allow-root-agents";

/// Whether the tests run as root (effective uid 0).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port on 127.0.0.1 to pick a free port")
        .port()
}

/// Runs a one-shot command of the binary and returns its output.
///
/// `RUST_LOG` is removed so that stderr only carries what the binary prints
/// by default. Panics if the command does not exit within `timeout`.
pub fn run_cli<S: AsRef<str>>(bin: &Path, args: &[S], timeout: Duration) -> Output {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let child = Command::new(bin)
        .args(&args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} {args:?}: {e}", bin.display()));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.unwrap_or_else(|e| panic!("waiting for {args:?} failed: {e}")),
        Err(_) => {
            send_signal(pid, "KILL");
            panic!(
                "`codex-mesh {}` did not exit within {timeout:?}",
                args.join(" ")
            );
        }
    }
}

/// Sends a signal (`"STOP"`, `"CONT"`, `"TERM"`, `"KILL"`) with `kill(1)`.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill(1) to signal a node");
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

/// Base URL and bearer token of a running node's HTTP API.
#[derive(Debug, Clone)]
pub struct ApiEndpoint {
    pub url: String,
    pub token: String,
}

/// One `codex-mesh` node process (possibly restarted several times).
pub struct Node {
    /// The `--name` of the node.
    pub name: String,
    bin: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
    api: Option<ApiEndpoint>,
    node_id: Option<String>,
}

impl Node {
    /// Spawns `bin args...` without waiting for readiness.
    ///
    /// Output goes to `<data_dir>/../<name>.log`.
    pub fn spawn(bin: &Path, name: &str, data_dir: &Path, args: Vec<String>) -> Node {
        Node::spawn_with_env(bin, name, data_dir, args, Vec::new())
    }

    /// Like [`Node::spawn`], with extra environment variables for the process.
    pub fn spawn_with_env(
        bin: &Path,
        name: &str,
        data_dir: &Path,
        args: Vec<String>,
        envs: Vec<(String, String)>,
    ) -> Node {
        let log_path = data_dir
            .parent()
            .expect("a node's data dir has a parent directory")
            .join(format!("{name}.log"));
        let mut node = Node {
            name: name.to_owned(),
            bin: bin.to_owned(),
            data_dir: data_dir.to_owned(),
            log_path,
            args,
            envs,
            child: None,
            api: None,
            node_id: None,
        };
        node.launch();
        node
    }

    /// Starts the process with the current arguments.
    fn launch(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        // A stale api-url from a previous run would make readiness detection
        // talk to a dead port, so drop it; the node rewrites it on start.
        let _ = fs::remove_file(self.data_dir.join("api-url"));
        self.api = None;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("open log {}: {e}", self.log_path.display()));
        writeln!(log, "===== harness: starting {:?}", self.args).expect("write node log header");
        let stderr = log.try_clone().expect("duplicate node log file handle");
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
        let child = Command::new(&self.bin)
            .args(&self.args)
            .env("RUST_LOG", rust_log)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} for {}: {e}", self.bin.display(), self.name));
        self.child = Some(child);
    }

    /// Waits until the node serves its authenticated API, then caches its id.
    pub fn wait_ready(&mut self, timeout: Duration) -> &mut Node {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("api-url not written yet");
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "{} exited with {status} before becoming ready ({last})\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            match self.probe_ready() {
                Ok(status) => {
                    self.node_id = Some(status.node_id);
                    return self;
                }
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} not ready after {timeout:?}: {last}\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// One readiness probe: api-url + api-token exist, health is 200 and the
    /// token is accepted by `/api/v1/status`.
    fn probe_ready(&mut self) -> Result<Status, String> {
        let endpoint = ApiEndpoint {
            url: read_trimmed(&self.data_dir.join("api-url"))?,
            token: read_trimmed(&self.data_dir.join("api-token"))?,
        };
        let health = http_request(
            "GET",
            &format!("{}/api/v1/health", endpoint.url),
            Some(&endpoint.token),
            None,
        )
        .map_err(|e| format!("health: {e}"))?;
        health
            .expect_status(200)
            .map_err(|e| format!("health: {e}"))?;
        self.api = Some(endpoint);
        self.status()
    }

    /// The node id, as reported by the node when it last became ready.
    pub fn id(&self) -> &str {
        self.node_id
            .as_deref()
            .unwrap_or_else(|| panic!("{} has never been ready", self.name))
    }

    /// The data directory of the node.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The arguments the node was (last) started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// API endpoint of the running node.
    pub fn endpoint(&self) -> &ApiEndpoint {
        self.api
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running/ready", self.name))
    }

    /// Authenticated request against the node's API.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> io::Result<HttpResponse> {
        let endpoint = self
            .api
            .as_ref()
            .ok_or_else(|| io::Error::other(format!("{} is not ready", self.name)))?;
        http_request(
            method,
            &format!("{}{path}", endpoint.url),
            Some(&endpoint.token),
            body,
        )
    }

    /// Authenticated request with extra headers.
    pub fn api_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> io::Result<HttpResponse> {
        let endpoint = self
            .api
            .as_ref()
            .ok_or_else(|| io::Error::other(format!("{} is not ready", self.name)))?;
        http_request_with(
            method,
            &format!("{}{path}", endpoint.url),
            Some(&endpoint.token),
            body,
            headers,
        )
    }

    /// Authenticated request that must succeed with a 2xx status.
    pub fn api_ok(&self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        let response = self
            .api(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", self.name));
        assert!(
            (200..300).contains(&response.status),
            "{method} {path} on {} returned {}: {}",
            self.name,
            response.status,
            response.body
        );
        response
    }

    /// Authenticated GET that must return 200 with a JSON body of type `T`.
    fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        self.api("GET", path, None)
            .map_err(|e| format!("{}: GET {path}: {e}", self.name))?
            .expect_status(200)
            .and_then(|r| r.json())
            .map_err(|e| format!("{}: GET {path}: {e}", self.name))
    }

    /// `GET /api/v1/status`.
    pub fn status(&self) -> Result<Status, String> {
        self.get_json("/api/v1/status")
    }

    /// `GET /api/v1/nodes`.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, String> {
        self.get_json("/api/v1/nodes")
    }

    /// `GET /api/v1/ticket`.
    pub fn ticket(&self) -> String {
        #[derive(Deserialize)]
        struct Ticket {
            ticket: String,
        }
        // 503 until the node listens on the mesh.
        let ticket: Ticket = poll(Duration::from_secs(30), "a join ticket", || {
            self.get_json("/api/v1/ticket")
        });
        ticket.ticket
    }

    /// `GET /metrics` (Prometheus text).
    pub fn metrics(&self) -> Result<String, String> {
        self.api("GET", "/metrics", None)
            .map_err(|e| format!("{}: GET /metrics: {e}", self.name))?
            .expect_status(200)
            .map(|r| r.body)
            .map_err(|e| format!("{}: GET /metrics: {e}", self.name))
    }

    /// Value of one metric, or a description of why it is unavailable.
    pub fn metric(&self, name: &str) -> Result<f64, String> {
        let text = self.metrics()?;
        metric_value(&text, name)
            .ok_or_else(|| format!("{}: metric {name} missing from /metrics", self.name))
    }

    /// How many jobs the node lists (`total` of `GET /api/v1/jobs?limit=1`).
    pub fn jobs_total(&self) -> Result<u64, String> {
        let list: serde_json::Value = self
            .api("GET", "/api/v1/jobs?limit=1", None)
            .map_err(|e| e.to_string())?
            .expect_status(200)?
            .json()?;
        list["total"]
            .as_u64()
            .ok_or_else(|| format!("{}: no total in {list}", self.name))
    }

    /// Runs a CLI subcommand against this node's data directory:
    /// `codex-mesh <args...> --data-dir D`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut full: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        full.push("--data-dir".to_owned());
        full.push(self.data_dir.display().to_string());
        run_cli(&self.bin, &full, CLI_TIMEOUT)
    }

    /// Process id of the running child.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
            .id()
    }

    /// Exit status if the process has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child
            .try_wait()
            .unwrap_or_else(|e| panic!("try_wait on {}: {e}", self.name))?;
        self.child = None;
        self.api = None;
        Some(status)
    }

    /// Whether the process is currently alive.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child
                .wait()
                .unwrap_or_else(|e| panic!("reap {} after SIGKILL: {e}", self.name));
        }
        self.api = None;
    }

    /// SIGSTOP (freeze) the process.
    pub fn stop(&self) {
        send_signal(self.pid(), "STOP");
    }

    /// SIGCONT (resume) the process.
    pub fn cont(&self) {
        send_signal(self.pid(), "CONT");
    }

    /// SIGTERM and wait for exit; panics if it does not exit within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        send_signal(self.pid(), "TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "{} did not exit within {timeout:?} after SIGTERM\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the (stopped) node again with the same arguments and waits
    /// until it is ready.
    pub fn restart(&mut self) -> &mut Node {
        self.launch();
        self.wait_ready(READY_TIMEOUT)
    }

    /// Environment variables for the next start (replacing the current ones).
    pub fn set_envs(&mut self, envs: Vec<(String, String)>) {
        self.envs = envs;
    }

    /// Starts the (stopped) node again with new arguments and waits until it
    /// is ready; later restarts reuse these arguments.
    pub fn restart_with_args(&mut self, args: Vec<String>) -> &mut Node {
        self.args = args;
        self.restart()
    }

    /// The last `lines` lines of the node's log, with a header.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "----- last {} lines of {} -----\n{}\n-----",
            all.len() - start,
            self.log_path.display(),
            all[start..].join("\n")
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if thread::panicking() {
            eprintln!("{}", self.log_tail(LOG_TAIL_LINES));
        }
    }
}

/// Reads a small text file and trims it; errors describe the missing file.
fn read_trimmed(path: &Path) -> Result<String, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = text.trim();
    if text.is_empty() {
        Err(format!("{} is empty", path.display()))
    } else {
        Ok(text.to_owned())
    }
}

// ---------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------

/// Calls `probe` every [`POLL_INTERVAL`] until it returns `Ok`, panicking
/// with the last observation when `timeout` expires.
pub fn poll<T>(timeout: Duration, what: &str, probe: impl FnMut() -> Result<T, String>) -> T {
    poll_every(POLL_INTERVAL, timeout, what, probe)
}

/// Like [`poll`] with an explicit interval.
pub fn poll_every<T>(
    interval: Duration,
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe() {
            Ok(value) => return value,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last observation: {last}");
        }
        thread::sleep(interval);
    }
}

// ---------------------------------------------------------------------------
// Mesh = several nodes in one temporary directory
// ---------------------------------------------------------------------------

/// What a converged mesh must look like.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Number of non-removed online nodes every node must list.
    pub online: usize,
    /// Exact number of voters every node must report, if checked.
    pub voters: Option<usize>,
}

/// The agreed view of a converged mesh.
#[derive(Debug, Clone)]
pub struct MeshView {
    /// Node id of the master.
    pub master: String,
    /// Election epoch everybody agrees on.
    pub epoch: u64,
    /// Index (in [`Mesh::nodes`]) of the master node.
    pub master_index: usize,
}

/// A set of nodes sharing one temporary root directory.
pub struct Mesh {
    /// The nodes, in start order (field order matters: they are killed
    /// before the directory is removed).
    pub nodes: Vec<Node>,
    bin: PathBuf,
    root: tempfile::TempDir,
}

impl Mesh {
    /// An empty mesh whose nodes run `bin`.
    pub fn new(bin: impl Into<PathBuf>) -> Mesh {
        let root = tempfile::Builder::new()
            .prefix("codex-mesh-test-")
            .tempdir()
            .expect("create a temporary directory for the mesh");
        Mesh {
            nodes: Vec::new(),
            bin: bin.into(),
            root,
        }
    }

    /// Starts `n1` with `up` and `n2..=nN` with `join`, all with default
    /// options, and waits until every process is ready (not converged).
    pub fn start(bin: impl Into<PathBuf>, n: usize) -> Mesh {
        let specs = (1..=n)
            .map(|i| (format!("n{i}"), NodeOptions::default()))
            .collect();
        Mesh::start_with(bin, specs)
    }

    /// Starts the first spec with `up`, then all others with `join` (spawned
    /// concurrently), and waits until every process is ready.
    pub fn start_with(bin: impl Into<PathBuf>, specs: Vec<(String, NodeOptions)>) -> Mesh {
        let mut mesh = Mesh::new(bin);
        let mut specs = specs.into_iter();
        let (first, first_opts) = specs.next().expect("at least one node");
        let first = mesh.spawn_up(&first, &first_opts);
        mesh.nodes[first].wait_ready(READY_TIMEOUT);
        let ticket = mesh.nodes[first].ticket();
        let joiners: Vec<usize> = specs
            .map(|(name, opts)| mesh.spawn_join(&name, &ticket, &opts))
            .collect();
        for i in joiners {
            mesh.nodes[i].wait_ready(READY_TIMEOUT);
        }
        mesh
    }

    /// The binary every node runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The temporary root directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Data directory for a node name: `ROOT/<name>`.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    /// Spawns `up` for a new node (not waiting for readiness); returns its index.
    pub fn spawn_up(&mut self, name: &str, opts: &NodeOptions) -> usize {
        let args = up_args(&self.data_dir(name), name, opts);
        self.spawn(name, args)
    }

    /// Spawns `join <ticket>` for a new node (not waiting); returns its index.
    pub fn spawn_join(&mut self, name: &str, ticket: &str, opts: &NodeOptions) -> usize {
        let args = join_args(ticket, &self.data_dir(name), name, opts);
        self.spawn(name, args)
    }

    /// Spawns a node with explicit arguments; returns its index.
    pub fn spawn(&mut self, name: &str, args: Vec<String>) -> usize {
        let node = Node::spawn(&self.bin, name, &self.data_dir(name), args);
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The node with the given name.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// Index of the node with the given id.
    pub fn index_of_id(&self, id: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.node_id.as_deref() == Some(id))
    }

    /// Indices of all nodes.
    pub fn all(&self) -> Vec<usize> {
        (0..self.nodes.len()).collect()
    }

    /// Indices of all nodes except `excluded`.
    pub fn all_except(&self, excluded: &[usize]) -> Vec<usize> {
        self.all()
            .into_iter()
            .filter(|i| !excluded.contains(i))
            .collect()
    }

    /// Statuses of the given nodes, or the first error.
    pub fn statuses(&self, live: &[usize]) -> Result<Vec<(usize, Status)>, String> {
        live.iter()
            .map(|&i| self.nodes[i].status().map(|s| (i, s)))
            .collect()
    }

    /// One convergence probe over the `live` nodes.
    pub fn check_converged(&self, live: &[usize], expect: Expect) -> Result<MeshView, String> {
        for &i in live {
            let records = self.nodes[i].nodes()?;
            let online = records.iter().filter(|r| r.online && !r.removed).count();
            if online != expect.online {
                return Err(format!(
                    "{} sees {online} online nodes, want {}: {}",
                    self.nodes[i].name,
                    expect.online,
                    summarize_records(&records)
                ));
            }
        }
        let statuses = self.statuses(live)?;
        if let Some(want) = expect.voters {
            for (i, s) in &statuses {
                if s.voters.len() != want {
                    return Err(format!(
                        "{} reports {} voters, want {want}: {:?}",
                        self.nodes[*i].name,
                        s.voters.len(),
                        s.voters
                    ));
                }
            }
        }
        self.agreement(&statuses, statuses.len(), |_| true)
    }

    /// Finds a (master, epoch) pair accepted by at least `quorum` of the
    /// `statuses`, among masters satisfying `acceptable`, whose own node is
    /// among the statuses and reports `is_master: true`.
    pub fn agreement(
        &self,
        statuses: &[(usize, Status)],
        quorum: usize,
        acceptable: impl Fn(&Status) -> bool,
    ) -> Result<MeshView, String> {
        let mut votes: BTreeMap<(&str, u64), usize> = BTreeMap::new();
        for (_, s) in statuses {
            if let Some(master) = s.master.as_deref().filter(|_| acceptable(s)) {
                *votes.entry((master, s.epoch)).or_default() += 1;
            }
        }
        let describe = || describe_statuses(self, statuses);
        let ((master, epoch), _) = votes
            .into_iter()
            .filter(|(_, count)| *count >= quorum)
            .max_by_key(|((_, epoch), _)| *epoch)
            .ok_or_else(|| format!("no {quorum} nodes agree on a master: {}", describe()))?;
        let (master_index, master_status) = statuses
            .iter()
            .find(|(_, s)| s.node_id == master)
            .ok_or_else(|| format!("agreed master {master} is not reachable: {}", describe()))?;
        if !master_status.is_master {
            return Err(format!(
                "agreed master {master} does not report is_master: {}",
                describe()
            ));
        }
        Ok(MeshView {
            master: master.to_owned(),
            epoch,
            master_index: *master_index,
        })
    }

    /// Waits until the `live` nodes are converged as described by `expect`.
    pub fn wait_converged(&self, live: &[usize], expect: Expect) -> MeshView {
        poll(
            CONVERGE_TIMEOUT,
            &format!("convergence of {} nodes ({expect:?})", live.len()),
            || self.check_converged(live, expect),
        )
    }

    /// Waits until all `live` nodes agree on a master other than `old.master`
    /// with an epoch larger than `old.epoch`, the master itself reporting
    /// `is_master: true`.
    pub fn wait_new_master(&self, live: &[usize], old: &MeshView) -> MeshView {
        poll(CONVERGE_TIMEOUT, "a new master", || {
            let statuses = self.statuses(live)?;
            self.agreement(&statuses, live.len(), |s| {
                s.master.as_deref() != Some(old.master.as_str()) && s.epoch > old.epoch
            })
        })
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if thread::panicking() {
            self.root.disable_cleanup(true);
            eprintln!("mesh directory kept at {}", self.root.path().display());
        }
    }
}

/// One line per record: `name(id-prefix) online/offline [draining] [removed] tags`.
pub fn summarize_records(records: &[NodeRecord]) -> String {
    records
        .iter()
        .map(|r| {
            format!(
                "{}({}) {}{}{} tags={:?} slots={}",
                r.name,
                short_id(&r.id),
                if r.online { "online" } else { "offline" },
                if r.draining { " draining" } else { "" },
                if r.removed { " removed" } else { "" },
                r.tags,
                r.slots
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The last 8 characters of a node id (peer ids share a long common prefix).
pub fn short_id(id: &str) -> &str {
    let start = id.char_indices().rev().nth(7).map_or(0, |(i, _)| i);
    &id[start..]
}

/// One line per status: `name: master=… epoch=… is_master=… voters=n`.
fn describe_statuses(mesh: &Mesh, statuses: &[(usize, Status)]) -> String {
    statuses
        .iter()
        .map(|(i, s)| {
            format!(
                "{}: master={:?} epoch={} is_master={} voters={}",
                mesh.nodes[*i].name,
                s.master.as_deref().map(short_id),
                s.epoch,
                s.is_master,
                s.voters.len()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Writes garbage over a file (used to corrupt a store).
pub fn overwrite_with_garbage(path: &Path) {
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    File::create(path)
        .and_then(|mut f| f.write_all(&garbage))
        .unwrap_or_else(|e| panic!("overwrite {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------

/// The JSON body of a response.
pub fn json_of(response: HttpResponse) -> serde_json::Value {
    serde_json::from_str(&response.body).expect("JSON body")
}

/// Submit a job through `node`'s API; returns its id.
pub fn submit_job(node: &Node, body: serde_json::Value) -> String {
    let created = node.api_ok("POST", "/api/v1/jobs", Some(&body.to_string()));
    json_of(created)["id"].as_str().expect("job id").to_string()
}

/// Poll job `id` on `node` (for up to 90 s) until `check` accepts it.
pub fn wait_job(
    node: &Node,
    id: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let path = format!("/api/v1/jobs/{id}");
    poll(Duration::from_secs(90), what, || {
        let job = json_of(node.api_ok("GET", &path, None));
        if check(&job) {
            Ok(job)
        } else {
            Err(job.to_string())
        }
    })
}

/// Whether a job reached a final status.
pub fn job_finished(job: &serde_json::Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled" | "timed_out" | "lost")
    )
}

/// Panic unless `job` ended with `status` and a reason that contains `reason`.
pub fn assert_ended(job: &serde_json::Value, status: &str, reason: &str) {
    assert_eq!(job["status"], status, "{job}");
    assert!(
        job["reason"].as_str().is_some_and(|r| r.contains(reason)),
        "reason should contain {reason:?}: {job}"
    );
}

// ---------------------------------------------------------------------------
// Benchmarks
// ---------------------------------------------------------------------------

/// The node binary for a benchmark example: `CODEX_MESH_BIN`, or `target/<profile>/codex-mesh`
/// next to the running example (`target/<profile>/examples/<name>`).
pub fn locate_node_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("CODEX_MESH_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("CODEX_MESH_BIN={} is not a file", path.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected executable location {}", exe.display()))?;
    let bin = profile_dir.join("codex-mesh");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found; run `cargo build --release --bin codex-mesh` first \
             (or set CODEX_MESH_BIN)",
            bin.display()
        ))
    }
}
