//! Git repositories served on loopback by `git daemon`, for tests that clone.
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
        let dir = self.dir(name);
        std::fs::create_dir_all(&dir).expect("repo dir");
        git(&dir, &["init", "-q", "-b", "main"]);
        for (path, content) in files {
            std::fs::write(dir.join(path), content).expect("write file");
        }
        git(&dir, &["add", "."]);
        git(&dir, &["commit", "-qm", "initial"]);
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

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
