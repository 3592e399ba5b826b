//! Git repositories served on loopback for tests that clone: by `git daemon` (no
//! authentication) or by `git http-backend` behind HTTP Basic authentication
//! (`git_http.py`, like a private GitHub repository).
#![allow(dead_code)] // shared by test binaries and examples that each use a part

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `git daemon` serving every repository under a temporary directory.
pub struct GitServer {
    root: tempfile::TempDir,
    port: u16,
    child: Child,
}

/// Run git in `dir` with a fixed identity; panics if it fails.
pub fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(["-c", "gc.auto=0"])
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .stdout(Stdio::null())
        .status()
        .expect("git runs");
    assert!(status.success(), "git {args:?} in {}", dir.display());
}

impl GitServer {
    /// Start the daemon on a free loopback port.
    pub fn start() -> GitServer {
        let root = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let child = Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
                &format!("--port={port}"),
                &format!("--base-path={}", root.path().display()),
                &root.path().display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        GitServer { root, port, child }
    }

    /// Create a repository `name` with `files` committed on `main`; returns its URL.
    pub fn repo(&self, name: &str, files: &[(&str, &str)]) -> String {
        create_repo(&self.dir(name), files);
        self.url(name)
    }

    /// Working directory of repository `name` (served as `<name>.git`).
    pub fn dir(&self, name: &str) -> std::path::PathBuf {
        self.root.path().join(format!("{name}.git"))
    }

    /// URL of repository `name`.
    pub fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}.git", self.port)
    }
}

/// Create a (non-bare) repository at `dir` with `files` committed on `main`.
pub fn create_repo(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).expect("repo dir");
    git(dir, &["init", "-q", "-b", "main"]);
    for (path, content) in files {
        std::fs::write(dir.join(path), content).expect("write file");
    }
    git(dir, &["add", "."]);
    git(dir, &["commit", "-qm", "initial"]);
}

/// `git http-backend` behind HTTP Basic authentication (`tests/support/git_http.py`):
/// `http://127.0.0.1:<port>/<owner>/<name>.git`, readable with the password `token` only.
pub struct HttpGitServer {
    root: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl HttpGitServer {
    /// Start the server on a free loopback port, accepting `token` as the password.
    pub fn start(token: &str) -> HttpGitServer {
        use std::io::BufRead;
        let root = tempfile::tempdir().expect("temp dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/git_http.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--root", &root.path().join("repos").display().to_string()])
            .args(["--token", token])
            .args([
                "--log",
                &root.path().join("requests.jsonl").display().to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs git_http.py");
        let mut first = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .expect("read the port line");
        let port = first
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("git_http.py printed {first:?}"));
        HttpGitServer { root, port, child }
    }

    /// Create repository `owner/name` with `files` committed on `main`.
    pub fn repo(&self, owner_name: &str, files: &[(&str, &str)]) {
        create_repo(&self.dir(owner_name), files);
    }

    /// Working directory of repository `owner/name`.
    pub fn dir(&self, owner_name: &str) -> std::path::PathBuf {
        self.root
            .path()
            .join("repos")
            .join(format!("{owner_name}.git"))
    }

    /// Base URL, in the role of `https://github.com`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every password presented in a refused request (the fake logs them so tests can check
    /// where a credential went).
    pub fn refused_passwords(&self) -> Vec<String> {
        let text =
            std::fs::read_to_string(self.root.path().join("requests.jsonl")).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|v| v["password"].as_str().map(str::to_string))
            .collect()
    }

    /// The requests served so far: (Basic user name, HTTP status) each.
    pub fn requests(&self) -> Vec<(Option<String>, u16)> {
        let text =
            std::fs::read_to_string(self.root.path().join("requests.jsonl")).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .map(|v| {
                (
                    v["user"].as_str().map(str::to_string),
                    v["status"].as_u64().unwrap_or(0) as u16,
                )
            })
            .collect()
    }
}

impl Drop for HttpGitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
