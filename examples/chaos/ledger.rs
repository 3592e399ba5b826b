//! The `chaos` agent and its ledger: a shell script that appends
//! `start <job id> <attempt> <node> <unix ms>` to a shared file, sleeps for the number of
//! seconds its prompt begins with, appends `end ...` and exits 0. The ledger shows every
//! execution of an agent, whichever node ran it and whatever happened to that node later.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Prefix of the job field when the agent had no `CODEX_MESH_JOB_ID` and took the name of its
/// work directory (the job id) instead.
const FROM_WORKDIR: &str = "wd:";

/// The agent script and the ledger it writes, in one temporary directory outside every
/// node's data directory and work directory root.
pub struct Ledger {
    dir: tempfile::TempDir,
    path: PathBuf,
    script: PathBuf,
}

/// One line of the ledger.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `start` or `end`.
    pub start: bool,
    /// The job id.
    pub job: String,
    /// Whether the job id came from `CODEX_MESH_JOB_ID` (else from the work directory).
    pub job_from_env: bool,
    /// `CODEX_MESH_ATTEMPT`, if the node passed it.
    pub attempt: Option<u32>,
    /// Name of the node that ran the agent.
    pub node: String,
}

/// What the ledger says about the run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Lines read (unparsable ones included).
    pub lines: usize,
    /// Lines that could not be parsed.
    pub unparsable: usize,
    /// `start` lines.
    pub starts: usize,
    /// Executions that started but never wrote `end` (their node was killed under them).
    pub interrupted: usize,
    /// Lines without `CODEX_MESH_JOB_ID`.
    pub without_job_env: usize,
    /// Lines without `CODEX_MESH_ATTEMPT`.
    pub without_attempt: usize,
    /// `(job, attempt)` pairs with more than one `start`, and how many.
    pub doubles: Vec<(String, Option<u32>, usize)>,
    /// `start` lines per job.
    pub starts_by_job: BTreeMap<String, usize>,
}

impl Ledger {
    /// Creates the directory, an empty ledger and the agent script.
    pub fn create() -> io::Result<Ledger> {
        let dir = tempfile::Builder::new()
            .prefix("codex-mesh-chaos-")
            .tempdir()?;
        let path = dir.path().join("ledger");
        let script = dir.path().join("chaos-agent.sh");
        fs::write(&path, "")?;
        // The agent may run as another user than this process in some set-ups.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666))?;
        fs::write(&script, script_text(&path))?;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
        Ok(Ledger { dir, path, script })
    }

    /// The directory holding the ledger.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `--agent` value for node `node`: `chaos=sh SCRIPT NODE {prompt}`.
    pub fn agent_flag(&self, node: &str) -> String {
        format!("chaos=sh {} {node} {{prompt}}", quote(&self.script))
    }

    /// Keeps the directory after the run (for inspection); returns its path.
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }

    /// Every line of the ledger.
    pub fn read(&self) -> Result<(Vec<Entry>, usize), String> {
        let text = fs::read_to_string(&self.path)
            .map_err(|e| format!("read {}: {e}", self.path.display()))?;
        let mut entries = Vec::new();
        let mut unparsable = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match parse_line(line) {
                Some(entry) => entries.push(entry),
                None => unparsable += 1,
            }
        }
        Ok((entries, unparsable))
    }
}

/// The agent script. `$1` is the node name, `$2` the prompt `<seconds> <label>`.
fn script_text(ledger: &Path) -> String {
    format!(
        r#"#!/bin/sh
# The chaos agent: records each execution in a shared ledger.
ledger={ledger}
job="$CODEX_MESH_JOB_ID"
[ -n "$job" ] || job="{FROM_WORKDIR}$(basename "$PWD")"
attempt="$CODEX_MESH_ATTEMPT"
printf 'start %s %s %s %s\n' "$job" "$attempt" "$1" "$(date +%s%3N)" >> "$ledger" || exit 3
sleep "${{2%% *}}"
printf 'end %s %s %s %s\n' "$job" "$attempt" "$1" "$(date +%s%3N)" >> "$ledger" || exit 3
echo "chaos agent: job $job attempt $attempt done on $1"
"#,
        ledger = quote(ledger)
    )
}

/// Single-quotes a path for `sh` (and for the node's shell-like split of `--agent`).
fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// Parses `start|end JOB ATTEMPT NODE MS`; fields may be empty (single spaces kept).
fn parse_line(line: &str) -> Option<Entry> {
    let fields: Vec<&str> = line.split(' ').collect();
    let [kind, job, attempt, node, _ms] = fields.as_slice() else {
        return None;
    };
    let start = match *kind {
        "start" => true,
        "end" => false,
        _ => return None,
    };
    let (job, job_from_env) = match job.strip_prefix(FROM_WORKDIR) {
        Some(id) => (id.to_owned(), false),
        None => ((*job).to_owned(), true),
    };
    if job.is_empty() {
        return None;
    }
    Some(Entry {
        start,
        job,
        job_from_env,
        attempt: attempt.parse().ok(),
        node: (*node).to_owned(),
    })
}

/// Counts executions per `(job, attempt)` and per job.
pub fn summarize(entries: &[Entry], unparsable: usize) -> Summary {
    let mut summary = Summary {
        lines: entries.len() + unparsable,
        unparsable,
        ..Summary::default()
    };
    let mut starts: BTreeMap<(String, Option<u32>, String), usize> = BTreeMap::new();
    let mut per_attempt: BTreeMap<(String, Option<u32>), usize> = BTreeMap::new();
    let mut ends: BTreeMap<(String, Option<u32>, String), usize> = BTreeMap::new();
    for e in entries {
        if !e.job_from_env {
            summary.without_job_env += 1;
        }
        if e.attempt.is_none() {
            summary.without_attempt += 1;
        }
        let key = (e.job.clone(), e.attempt, e.node.clone());
        if e.start {
            summary.starts += 1;
            *starts.entry(key).or_default() += 1;
            *per_attempt.entry((e.job.clone(), e.attempt)).or_default() += 1;
            *summary.starts_by_job.entry(e.job.clone()).or_default() += 1;
        } else {
            *ends.entry(key).or_default() += 1;
        }
    }
    summary.interrupted = starts
        .iter()
        .map(|(key, n)| n.saturating_sub(ends.get(key).copied().unwrap_or(0)))
        .sum();
    // Without attempt numbers every start of a job lands in one pair; that check is left to
    // the caller, which compares starts with the job's final attempt number.
    summary.doubles = per_attempt
        .into_iter()
        .filter(|((_, attempt), n)| *n > 1 && attempt.is_some())
        .map(|((job, attempt), n)| (job, attempt, n))
        .collect();
    summary
}
