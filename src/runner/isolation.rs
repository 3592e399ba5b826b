//! Keeping agents away from the node's secrets. Three modes, chosen once at start:
//!
//! - **Agent user** (`--agent-user NAME`): agents run under that user's uid and primary gid,
//!   with its `HOME` and `USER`; each job's work directory is handed to it (an `lchown` walk
//!   that never follows a symbolic link). The node's data directory (0700) is out of its reach.
//! - **Masked**: agents run as the node's own user inside bubblewrap, in a mount namespace
//!   where the data directory is an empty tmpfs and in a pid namespace with its own `/proc`
//!   (so `/proc/<node pid>/root/...` does not lead back to the real files).
//! - **Unprotected**: agents run as the node's user and can read its files; said once at start.
//!
//! A node that runs as root with neither an agent user nor `--allow-root-agents` refuses every
//! job, with a reason that says what to do. Files the node reads or writes in a work directory
//! after the agent had it are opened without following symbolic links.

use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::agent::find_program;
use super::spares::SPARES_DIR;

/// Why each job is refused on a root node without an agent user.
pub const ROOT_REFUSAL: &str = "this node runs as root and will not run agents as root: \
start it with --agent-user NAME or --allow-root-agents";

/// Value of `--bwrap` that turns the masking off.
pub const NO_BWRAP: &str = "none";

/// Largest file the node reads back from a work directory (the agent's last message).
const MAX_AGENT_FILE: u64 = 1 << 20;

/// Capabilities a non-root node needs to run agents as another user: chown, dac_override,
/// fowner, kill, setgid, setuid.
const SWITCH_CAPS: u64 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 5) | (1 << 6) | (1 << 7);

/// Start-up failures, each a one-line explanation with what to do.
#[derive(Debug, Error)]
pub enum IsolationError {
    /// No such user.
    #[error("--agent-user {0}: no such user on this system")]
    UnknownUser(String),
    /// The user database could not be read.
    #[error("--agent-user {name}: cannot look the user up: {source}")]
    Lookup {
        /// The user name.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// The node may not switch to another user.
    #[error("--agent-user {0} needs the node to run as root (or with CAP_SETUID, CAP_SETGID, CAP_CHOWN, CAP_FOWNER, CAP_DAC_OVERRIDE and CAP_KILL)")]
    NotPrivileged(String),
    /// The agent user is the node's own user, or root.
    #[error("--agent-user {0} is {1}: name an unprivileged user other than the node's")]
    BadUser(String, &'static str),
    /// The work-directory root belongs to someone else.
    #[error("the work directory root {path} belongs to another user (uid {uid}): remove it or choose another --workdir-root")]
    ForeignRoot {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// The agent user cannot reach its work directories.
    #[error("--agent-user {user} cannot enter {path}, a parent of the work directory root: let it (chmod o+x) or choose another --workdir-root")]
    Unreachable {
        /// The user name.
        user: String,
        /// The directory it cannot search.
        path: PathBuf,
    },
    /// A directory could not be prepared.
    #[error("cannot prepare {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The user agents run as, from the user database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentUser {
    /// User name (the agent's `USER`).
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory (the agent's `HOME`).
    pub home: PathBuf,
}

/// How this node runs agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// As another user.
    AgentUser(AgentUser),
    /// As the node's user, inside bubblewrap.
    Masked(Bwrap),
    /// As the node's user, able to read its files.
    Unprotected,
    /// Not at all (why).
    Refused(String),
}

/// How agents are wrapped in bubblewrap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bwrap {
    /// The bubblewrap program.
    pub program: PathBuf,
    /// Directory shown empty to agents (the data directory).
    pub hidden: PathBuf,
    /// The work-directory root, when it lies inside `hidden` (bound back in).
    pub rebind: Option<PathBuf>,
    /// Leave the agent its capabilities (a node running as root: Codex's own sandbox needs
    /// them there, and a root agent can then undo the mask).
    pub keep_caps: bool,
}

impl Bwrap {
    /// `bwrap` and its options, up to and including the `--` before the agent's command.
    pub fn args(&self) -> Vec<String> {
        let text = |p: &Path| p.display().to_string();
        // A minimal /dev: no disks to read the data directory from.
        let mut args = vec![text(&self.program), "--bind".into(), "/".into(), "/".into()];
        args.extend(["--dev", "/dev", "--tmpfs"].map(String::from));
        args.push(text(&self.hidden));
        if let Some(root) = &self.rebind {
            args.extend(["--bind".into(), text(root), text(root)]);
        }
        args.extend(["--unshare-pid", "--proc", "/proc", "--die-with-parent"].map(String::from));
        if !self.keep_caps {
            args.extend(["--cap-drop", "ALL"].map(String::from));
        }
        args.push("--".into());
        args
    }
}

/// The isolation of this node's agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Isolation {
    /// The mode chosen at start.
    pub mode: Mode,
}

/// What the operator asked for.
#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    /// `--agent-user`.
    pub agent_user: Option<&'a str>,
    /// `--allow-root-agents`.
    pub allow_root_agents: bool,
    /// `--bwrap` (a program, or [`NO_BWRAP`]).
    pub bwrap: &'a str,
    /// The node's data directory.
    pub data_dir: &'a Path,
    /// `--workdir-root`.
    pub workdir_root: &'a Path,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

impl Isolation {
    /// Choose the mode, prepare the work-directory root and say once what agents can reach.
    pub fn setup(options: Options<'_>) -> Result<Isolation, IsolationError> {
        let mode = match options.agent_user.filter(|name| !name.trim().is_empty()) {
            Some(name) => {
                let user = lookup_user(name.trim())?;
                if user.uid == euid() {
                    return Err(IsolationError::BadUser(user.name, "the node's own user"));
                }
                if user.uid == 0 {
                    return Err(IsolationError::BadUser(user.name, "root"));
                }
                if !can_switch_users() {
                    return Err(IsolationError::NotPrivileged(user.name));
                }
                Mode::AgentUser(user)
            }
            None if euid() == 0 && !options.allow_root_agents => {
                tracing::warn!("{ROOT_REFUSAL}; until then every job assigned here is refused");
                Mode::Refused(ROOT_REFUSAL.to_string())
            }
            None => masked_or_unprotected(options),
        };
        let group = match &mode {
            Mode::AgentUser(user) => Some(user.gid),
            _ => None,
        };
        if let Mode::AgentUser(user) = &mode {
            reachable_by(options.workdir_root, user)?;
        }
        prepare_root(options.workdir_root, group)?;
        if let Mode::AgentUser(user) = &mode {
            // The node reads the agent's repositories afterwards (the diff summary), which
            // libgit2 refuses for a directory owned by another user unless told otherwise.
            // SAFETY: called during start-up, before any thread of the node uses libgit2.
            let _ = unsafe { git2::opts::set_verify_owner_validation(false) };
            tracing::info!(
                "agents run as user {} (uid {}, gid {})",
                user.name,
                user.uid,
                user.gid
            );
        }
        Ok(Isolation { mode })
    }

    /// Whether this node runs agents at all, or why not.
    pub fn check(&self) -> Result<(), String> {
        match &self.mode {
            Mode::Refused(why) => Err(why.clone()),
            _ => Ok(()),
        }
    }

    /// The command line that runs `argv` in this mode.
    pub fn wrap(&self, argv: &[String]) -> Vec<String> {
        let Mode::Masked(bwrap) = &self.mode else {
            return argv.to_vec();
        };
        let mut wrapped = bwrap.args();
        wrapped.extend(argv.iter().cloned());
        wrapped
    }

    /// Set the user, group, `HOME` and `USER` of an agent command (after its environment).
    pub fn apply(&self, command: &mut tokio::process::Command) {
        if let Mode::AgentUser(user) = &self.mode {
            command
                .uid(user.uid)
                .gid(user.gid)
                .env("HOME", &user.home)
                .env("USER", &user.name);
        }
    }

    /// Create a job's work directory, private to the node until [`Isolation::hand_over`].
    pub async fn create_job_dir(&self, dir: &Path) -> io::Result<()> {
        let dir = dir.to_path_buf();
        blocking(move || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        })
        .await
    }

    /// Give the prepared work directory to the agent user (nothing in the other modes).
    pub async fn hand_over(&self, dir: &Path) -> io::Result<()> {
        let Mode::AgentUser(user) = &self.mode else {
            return Ok(());
        };
        let (dir, uid, gid) = (dir.to_path_buf(), user.uid, user.gid);
        blocking(move || chown_tree(&dir, uid, gid)).await
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
}

/// Try bubblewrap; say once what agents can read when it cannot be used.
fn masked_or_unprotected(options: Options<'_>) -> Mode {
    let how = "run the node with --agent-user NAME, or install bubblewrap (package bubblewrap)";
    if options.bwrap == NO_BWRAP {
        tracing::warn!(
            "--bwrap none: agents can read the node's secrets in {}; to prevent it, {how}",
            options.data_dir.display()
        );
        return Mode::Unprotected;
    }
    let hidden =
        std::fs::canonicalize(options.data_dir).unwrap_or_else(|_| options.data_dir.to_path_buf());
    let root = std::fs::canonicalize(options.workdir_root)
        .unwrap_or_else(|_| options.workdir_root.to_path_buf());
    let rebind = root.starts_with(&hidden).then_some(root);
    let probe = find_program(options.bwrap)
        .ok_or_else(|| format!("{} not found", options.bwrap))
        .and_then(|program| {
            let bwrap = Bwrap {
                program,
                hidden: hidden.clone(),
                rebind,
                keep_caps: euid() == 0,
            };
            probe_bwrap(&bwrap).map(|()| bwrap)
        });
    match probe {
        Ok(bwrap) if bwrap.keep_caps => {
            tracing::warn!(
                "agents run as root in {}: the data directory {} is hidden from what they read, but a root agent can undo that; to protect the node's secrets, run it with --agent-user NAME",
                bwrap.program.display(),
                hidden.display()
            );
            Mode::Masked(bwrap)
        }
        Ok(bwrap) => {
            tracing::info!(
                "agents run in {} with the data directory {} hidden",
                bwrap.program.display(),
                hidden.display()
            );
            Mode::Masked(bwrap)
        }
        Err(why) => {
            tracing::warn!(
                "agents can read the node's secrets in {} (bubblewrap cannot be used: {why}); to prevent it, {how}",
                hidden.display()
            );
            Mode::Unprotected
        }
    }
}

/// Run `sh` in bubblewrap as agents will run, and check that it sees the hidden directory empty.
fn probe_bwrap(bwrap: &Bwrap) -> Result<(), String> {
    let mut argv = bwrap.args();
    argv.extend(["sh", "-c", "test -z \"$(ls -A \"$1\")\"", "probe"].map(String::from));
    argv.push(bwrap.hidden.display().to_string());
    let out = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(match stderr.lines().next() {
        Some(line) if !line.trim().is_empty() => line.trim().to_string(),
        _ => format!("the probe ended with {}", out.status),
    })
}

/// Look a user up in the user database (`getpwnam_r`).
pub fn lookup_user(name: &str) -> Result<AgentUser, IsolationError> {
    let unknown = || IsolationError::UnknownUser(name.to_string());
    let c_name = CString::new(name).map_err(|_| unknown())?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: passwd is plain old data; an all-zero value is valid and is overwritten.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buf.len()` is the buffer's size;
        // getpwnam_r writes only into `pwd`, `buf` and `found`.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(IsolationError::Lookup {
                name: name.to_string(),
                source: io::Error::from_raw_os_error(rc),
            });
        }
        if found.is_null() {
            return Err(unknown());
        }
        let home = if pwd.pw_dir.is_null() {
            PathBuf::from("/")
        } else {
            // SAFETY: on success pw_dir points to a NUL-terminated string inside `buf`, which
            // is alive here.
            let bytes = unsafe { CStr::from_ptr(pwd.pw_dir) }.to_bytes();
            PathBuf::from(OsStr::from_bytes(bytes))
        };
        return Ok(AgentUser {
            name: name.to_string(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home,
        });
    }
}

/// Whether this process may run agents as another user and hand files to it.
fn can_switch_users() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return euid() == 0;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & SWITCH_CAPS == SWITCH_CAPS)
}

/// Create the work-directory root (0700, or 0750 with `group`), refusing one that belongs to
/// another user; its spare checkouts stay private to the node.
pub fn prepare_root(root: &Path, group: Option<u32>) -> Result<(), IsolationError> {
    let io = |source| IsolationError::Io {
        path: root.to_path_buf(),
        source,
    };
    let me = euid();
    match std::fs::symlink_metadata(root) {
        Ok(meta) if meta.uid() != me => {
            return Err(IsolationError::ForeignRoot {
                path: root.to_path_buf(),
                uid: meta.uid(),
            })
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Parents with the usual permissions (an agent user passes through them).
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(root)
                .map_err(io)?
        }
        Err(e) => return Err(io(e)),
    }
    let meta = std::fs::metadata(root).map_err(io)?;
    if meta.uid() != me {
        return Err(IsolationError::ForeignRoot {
            path: root.to_path_buf(),
            uid: meta.uid(),
        });
    }
    if !meta.is_dir() {
        return Err(io(io::Error::other("not a directory")));
    }
    if let Some(gid) = group {
        std::os::unix::fs::chown(root, None, Some(gid)).map_err(io)?;
    }
    let mode = if group.is_some() { 0o750 } else { 0o700 };
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    // Spares are made private when they are first made (see `spares::refill`).
    let spares = root.join(SPARES_DIR);
    match std::fs::symlink_metadata(&spares) {
        Ok(meta) if meta.is_dir() => {
            std::fs::set_permissions(&spares, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| IsolationError::Io {
                    path: spares,
                    source,
                },
            )
        }
        _ => Ok(()),
    }
}

/// Check that `user` (with its primary group only, as agents run) can search every existing
/// parent of the work-directory root (parents still to be made get the usual 0755).
fn reachable_by(root: &Path, user: &AgentUser) -> Result<(), IsolationError> {
    let Some(parent) = root
        .ancestors()
        .skip(1)
        .find_map(|dir| std::fs::canonicalize(dir).ok())
    else {
        return Ok(());
    };
    for dir in parent.ancestors() {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = meta.mode();
        let searchable = if meta.uid() == user.uid {
            mode & 0o100 != 0
        } else if meta.gid() == user.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            return Err(IsolationError::Unreachable {
                user: user.name.clone(),
                path: dir.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Give `root` and everything under it to `uid:gid` without following symbolic links (a
/// repository may hold a link to `/etc/shadow`) nor descending into linked directories. The
/// root itself is handed over last, so the new owner cannot enter before the walk is done.
pub fn chown_tree(root: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
            if entry.file_type()?.is_dir() {
                dirs.push(path);
            }
        }
    }
    std::os::unix::fs::lchown(root, Some(uid), Some(gid))
}

/// Read a file the agent left in its work directory (at most 1 MiB): only a regular file,
/// never through a symbolic link, never blocking on a FIFO.
pub async fn read_agent_file(path: &Path) -> Option<String> {
    let path = path.to_path_buf();
    blocking(move || read_agent_file_blocking(&path)).await.ok()
}

/// [`read_agent_file`], blocking the calling thread.
pub fn read_agent_file_blocking(path: &Path) -> io::Result<String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    // A regular file with one name: not a hard link to a file elsewhere.
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(io::Error::other("not a plain file"));
    }
    let mut bytes = Vec::new();
    file.take(MAX_AGENT_FILE).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Leave an empty marker file at `path`, replacing whatever the agent put there (a symbolic
/// link is removed, not followed).
pub async fn write_marker(path: &Path) -> io::Result<()> {
    let path = path.to_path_buf();
    blocking(move || {
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path)?,
            Ok(_) => std::fs::remove_file(&path)?,
            Err(_) => {}
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o644)
            .open(&path)
            .map(drop)
    })
    .await
}

/// Make this process non-dumpable, so that processes of the same user (agents) can neither
/// read its `/proc/<pid>/environ` and `mem` nor attach to it.
pub fn make_undumpable() {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(
            "cannot make the node non-dumpable: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
#[path = "isolation_tests.rs"]
mod tests;
