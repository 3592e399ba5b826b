//! Benchmark of job execution on real `codex-mesh` node processes on loopback
//! (ports picked by the OS, temporary data and work directories).
//!
//! This example does not build the node binary. Build it first, then run:
//!
//! ```text
//! cargo build --release --bin codex-mesh
//! cargo run --release --example jobs_bench -- [--dispatch-samples 100] [--jobs 1000] [--repo-mb 60]
//! ```
//!
//! The binary is looked up as `target/<profile>/codex-mesh` next to this
//! example's executable, or taken from the `CODEX_MESH_BIN` environment
//! variable. `git` (with `git daemon`) and `sh` must be on `PATH`. A value of
//! 0 for any of the three options skips that part.
//!
//! 1. Dispatch latency: 3 nodes, each with the operator-defined agent
//!    `stamp=sh -c "date +%s%N > {workdir}/started"` and its own
//!    `--workdir-root`. Per sample (after a random pause of up to
//!    [`DISPATCH_GAP_MAX_MS`], so that submissions do not lock onto any
//!    periodic timer of the node): t0 = Unix ns right before
//!    `POST /api/v1/jobs` (round-robin over the nodes, no target), wait until
//!    the job is `succeeded`, read `<workdir-root of its node>/<id>/started`;
//!    latency = started - t0. Next to it the same `sh -c "date ..."` is spawned
//!    directly by the benchmark and measured the same way.
//! 2. Throughput: 3 nodes with `--slots 4` and agent `ok=true`; `--jobs`
//!    submissions spread over the three APIs by [`SUBMIT_THREADS`] threads; wait
//!    until every job is terminal. Jobs/s from the first submission to the last
//!    terminal `updated_at_ms`, plus the submission rate alone, the drain time
//!    after the last submission, completions per second, status counts and
//!    the nodes' CPU use (user + system, % of one core) over the run.
//! 3. Repository preparation: a git repository of `--repo-mb` MB of random
//!    (incompressible) files in [`REPO_COMMITS`] commits, repacked, served by
//!    `git daemon` on 127.0.0.1; one node. Per repetition the node is stopped,
//!    its caches (mirrors `<data-dir>/mirrors`, spare checkouts
//!    `<workdir-root>/.spares`) removed and the node restarted; then three jobs
//!    name the repository, each after one small commit is added to the origin:
//!    fresh (full fetch into the mirror, full checkout); warm (submitted once
//!    the node has made its spare checkout: fetch of the new commit, then the
//!    spare is moved in and brought up to date); back-to-back (submitted at
//!    once after warm, while the spare is being made again, so it waits for
//!    that checkout). Reported per job: the node's `result.prepare_ms` (getting
//!    the repositories), `result.duration_ms` (preparation + trivial agent +
//!    diff summary), submission -> agent start, and submission -> final
//!    `updated_at_ms`.
//!    For reference, the git CLI's `git clone` of the same repository from
//!    the daemon and from a local bare mirror are timed too.
//!
//! Progress goes to stderr; stdout gets a table and a final JSON line.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/git_server.rs"]
mod git_server;
#[path = "support/stats.rs"]
mod stats;

use git_server::git;

use stats::{cpu_ticks, millis, percentiles, Percentiles};
use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Expect, Mesh, Node, NodeOptions};
use rand::{Rng, RngCore};
use serde_json::{json, Value};

/// The dispatch agent: records (Unix ns) when it started, in its work dir.
const STAMP_AGENT: &str = r#"stamp=sh -c "date +%s%N > {workdir}/started""#;
/// The throughput agent.
const OK_AGENT: &str = "ok=true";
/// Nodes of the dispatch and throughput meshes.
const MESH_NODES: usize = 3;
/// Slots per node in the throughput mesh.
const THROUGHPUT_SLOTS: u32 = 4;
/// Jobs run (and not counted) before the dispatch samples.
const WARMUP_JOBS: usize = 3;
/// Upper bound of the random pause before each dispatch sample.
const DISPATCH_GAP_MAX_MS: u64 = 500;
/// Poll period while waiting for one job.
const JOB_POLL: Duration = Duration::from_millis(10);
/// Give up on one dispatch sample after this long.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// Threads submitting jobs in the throughput part.
const SUBMIT_THREADS: usize = 6;
/// Poll period while waiting for the throughput jobs to finish.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// Time allowed for the throughput jobs to finish: this plus
/// [`DRAIN_PER_JOB`] per job.
const DRAIN_BASE: Duration = Duration::from_secs(60);
const DRAIN_PER_JOB: Duration = Duration::from_millis(100);
/// Kernel clock ticks per second (`getconf CLK_TCK`).
const CLK_TCK: f64 = 100.0;
/// Page size of `GET /api/v1/jobs` (the API's maximum).
const PAGE: usize = 500;
/// Fresh / warm repetitions of the repository part.
const REPO_REPS: usize = 3;
/// Commits the benchmark repository is built from.
const REPO_COMMITS: usize = 5;
/// Size of each random file of the benchmark repository.
const REPO_FILE_BYTES: usize = 256 * 1024;
/// Give up on one repository job after this long.
const REPO_JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// Poll period while waiting for a repository job.
const REPO_POLL: Duration = Duration::from_millis(20);
/// Where a node keeps its spare checkouts, under its work directory root.
const SPARES_DIR: &str = ".spares";
/// Name of the benchmark repository (and of its checkout directory).
const REPO_NAME: &str = "bench";

/// Targets printed next to the figures.
const TARGET_DISPATCH_P50_MS: f64 = 50.0;
const TARGET_DISPATCH_P99_MS: f64 = 250.0;
const TARGET_JOBS_PER_SEC: f64 = 50.0;
const TARGET_WARM_RATIO: f64 = 0.25;

const TERMINAL: [&str; 5] = ["succeeded", "failed", "cancelled", "timed_out", "lost"];
const ACTIVE: [&str; 4] = ["queued", "assigned", "preparing", "running"];

/// Command-line options.
struct Options {
    dispatch_samples: usize,
    jobs: usize,
    repo_mb: usize,
}

/// Part 1.
struct DispatchReport {
    samples: usize,
    dispatch: Percentiles,
    direct: Percentiles,
    post: Percentiles,
    ran_on: BTreeMap<String, usize>,
}

/// Part 2.
struct ThroughputReport {
    jobs: usize,
    submit_errors: usize,
    submit_secs: f64,
    first_to_last_terminal_secs: f64,
    wall_secs: f64,
    drain_after_submit_secs: f64,
    statuses: BTreeMap<String, usize>,
    missing: usize,
    finished_in_time: bool,
    per_second: Vec<usize>,
    ran_on: BTreeMap<String, usize>,
    /// Per node: CPU time (user + system) from the first submission until
    /// all jobs were seen terminal, as a percentage of one core.
    cpu_percent: BTreeMap<String, f64>,
}

/// One repository job.
#[derive(Clone, Copy)]
struct RepoRun {
    prepare_ms: f64,
    duration_ms: f64,
    to_agent_ms: f64,
    end_to_end_ms: f64,
}

/// Part 3.
struct RepoReport {
    repo_bytes: u64,
    files: usize,
    initial_clone_ms: f64,
    local_clone_ms: f64,
    fresh: Vec<RepoRun>,
    warm: Vec<RepoRun>,
    back_to_back: Vec<RepoRun>,
}

fn main() -> ExitCode {
    let options = match parse_options(env::args().skip(1)) {
        Ok(options) => options,
        Err(msg) => {
            eprintln!("jobs_bench: {msg}\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    let bin = match common::locate_node_binary() {
        Ok(bin) => bin,
        Err(msg) => {
            eprintln!("jobs_bench: {msg}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("jobs_bench: using {}", bin.display());
    let dispatch =
        (options.dispatch_samples > 0).then(|| bench_dispatch(&bin, options.dispatch_samples));
    let throughput = (options.jobs > 0).then(|| bench_throughput(&bin, options.jobs));
    let repo = (options.repo_mb > 0).then(|| bench_repo(&bin, options.repo_mb));
    print_table(dispatch.as_ref(), throughput.as_ref(), repo.as_ref());
    println!(
        "{}",
        to_json(
            &options,
            dispatch.as_ref(),
            throughput.as_ref(),
            repo.as_ref()
        )
    );
    ExitCode::SUCCESS
}

const USAGE: &str = "usage: cargo run --release --example jobs_bench -- \
                     [--dispatch-samples 100] [--jobs 1000] [--repo-mb 60]  (0 skips a part)";

/// Parses `--dispatch-samples n`, `--jobs n` and `--repo-mb n`.
fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        dispatch_samples: 100,
        jobs: 1000,
        repo_mb: 60,
    };
    while let Some(arg) = args.next() {
        let mut value = || -> Result<usize, String> {
            let v = args.next().ok_or(format!("{arg} needs a value"))?;
            v.parse().map_err(|e| format!("{arg} {v}: {e}"))
        };
        match arg.as_str() {
            "--dispatch-samples" => options.dispatch_samples = value()?,
            "--jobs" => options.jobs = value()?,
            "--repo-mb" => options.repo_mb = value()?,
            "-h" | "--help" => return Err("help requested".to_owned()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if options.dispatch_samples > 100_000 || options.jobs > 100_000 || options.repo_mb > 4096 {
        return Err("values too large (samples, jobs <= 100000; repo-mb <= 4096)".to_owned());
    }
    Ok(options)
}

// ---------------------------------------------------------------------------
// Cluster with per-node work directories
// ---------------------------------------------------------------------------

/// A mesh whose node `i` keeps its job work directories in `workdirs[i]`.
struct Cluster {
    /// Dropped first: the nodes are killed before their directories go.
    mesh: Mesh,
    workdirs: Vec<PathBuf>,
    _work_root: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes (`n1` with `up`, the others with `join`), each with
    /// `extra` flags and its own `--workdir-root`, and waits until they are
    /// converged with a stable voter set.
    fn start(bin: &Path, n: usize, extra: &[&str]) -> Cluster {
        let work_root = tempfile::Builder::new()
            .prefix("codex-mesh-bench-work-")
            .tempdir()
            .expect("create a temporary directory for work directories");
        let workdirs: Vec<PathBuf> = (1..=n)
            .map(|i| work_root.path().join(format!("n{i}")))
            .collect();
        let specs = workdirs
            .iter()
            .enumerate()
            .map(|(i, dir)| {
                let mut flags: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
                flags.extend(["--workdir-root".to_owned(), dir.display().to_string()]);
                (format!("n{}", i + 1), NodeOptions::with_extra(&flags))
            })
            .collect();
        let mesh = Mesh::start_with(bin, specs);
        let voters = if n >= 3 { 3 } else { 1 };
        mesh.wait_converged(
            &mesh.all(),
            Expect {
                online: n,
                voters: Some(voters),
            },
        );
        Cluster {
            mesh,
            workdirs,
            _work_root: work_root,
        }
    }

    /// Index of the node with id `id`.
    fn index_of(&self, id: &str) -> usize {
        self.mesh
            .index_of_id(id)
            .unwrap_or_else(|| panic!("job ran on unknown node {id}"))
    }
}

// ---------------------------------------------------------------------------
// Job helpers
// ---------------------------------------------------------------------------

/// `POST /api/v1/jobs`; the new job's id, or why it was not created.
fn submit(node: &Node, body: &Value) -> Result<String, String> {
    let response = node
        .api("POST", "/api/v1/jobs", Some(&body.to_string()))
        .map_err(|e| format!("{}: POST /api/v1/jobs: {e}", node.name))?
        .expect_status(201)
        .map_err(|e| format!("{}: POST /api/v1/jobs: {e}", node.name))?;
    let job: Value = response.json()?;
    job["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no id in {}", response.body))
}

/// `GET /api/v1/jobs/{id}`.
fn get_job(node: &Node, id: &str) -> Result<Value, String> {
    let path = format!("/api/v1/jobs/{id}");
    node.api("GET", &path, None)
        .map_err(|e| format!("{}: GET {path}: {e}", node.name))?
        .expect_status(200)
        .and_then(|r| r.json())
        .map_err(|e| format!("{}: GET {path}: {e}", node.name))
}

/// Polls job `id` on `node` until it is terminal; panics after `timeout`.
fn wait_terminal(node: &Node, id: &str, interval: Duration, timeout: Duration) -> Value {
    common::poll_every(interval, timeout, &format!("job {id} to finish"), || {
        let job = get_job(node, id)?;
        if common::job_finished(&job) {
            Ok(job)
        } else {
            Err(common::truncate(&job.to_string(), 400))
        }
    })
}

/// Panics with the job unless it succeeded.
fn expect_succeeded(job: &Value) {
    assert_eq!(
        job["status"].as_str(),
        Some("succeeded"),
        "job did not succeed: {job}"
    );
}

/// Unix time in nanoseconds.
fn unix_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i128
}

/// Reads the Unix-ns stamp written by `date +%s%N`.
fn read_stamp(path: &Path) -> i128 {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{} holds {text:?}, not Unix ns: {e}", path.display()))
}

fn ns_to_ms(ns: i128) -> f64 {
    ns as f64 / 1e6
}

// ---------------------------------------------------------------------------
// 1. Dispatch latency
// ---------------------------------------------------------------------------

fn bench_dispatch(bin: &Path, samples: usize) -> DispatchReport {
    eprintln!("== dispatch: starting {MESH_NODES} nodes");
    let cluster = Cluster::start(bin, MESH_NODES, &["--agent", STAMP_AGENT]);
    let nodes = &cluster.mesh.nodes;
    let body = json!({ "prompt": "stamp", "agent": "stamp" });
    eprintln!("== dispatch: {WARMUP_JOBS} warm-up jobs");
    for i in 0..WARMUP_JOBS {
        let via = &nodes[i % nodes.len()];
        let id = submit(via, &body).unwrap_or_else(|e| panic!("{e}"));
        expect_succeeded(&wait_terminal(via, &id, JOB_POLL, JOB_TIMEOUT));
    }
    eprintln!("== dispatch: {samples} samples");
    let mut rng = rand::thread_rng();
    let mut dispatch = Vec::with_capacity(samples);
    let mut post = Vec::with_capacity(samples);
    let mut ran_on: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..samples {
        thread::sleep(Duration::from_millis(
            rng.gen_range(0..=DISPATCH_GAP_MAX_MS),
        ));
        let via = &nodes[i % nodes.len()];
        let t0 = unix_ns();
        let id = submit(via, &body).unwrap_or_else(|e| panic!("{e}"));
        post.push(ns_to_ms(unix_ns() - t0));
        let job = wait_terminal(via, &id, JOB_POLL, JOB_TIMEOUT);
        expect_succeeded(&job);
        let node_id = job["node"]
            .as_str()
            .unwrap_or_else(|| panic!("succeeded job without node: {job}"));
        let index = cluster.index_of(node_id);
        let started = read_stamp(&cluster.workdirs[index].join(&id).join("started"));
        let latency = ns_to_ms(started - t0);
        *ran_on.entry(nodes[index].name.clone()).or_default() += 1;
        dispatch.push(latency);
        if (i + 1) % 10 == 0 || i + 1 == samples {
            eprintln!(
                "   {}/{samples}: last {latency:.1} ms (via {}, ran on {})",
                i + 1,
                via.name,
                nodes[index].name
            );
        }
    }
    drop(cluster);
    eprintln!("== dispatch: {samples} direct spawns of the same command");
    let direct = measure_direct(samples);
    DispatchReport {
        samples,
        dispatch: percentiles(&dispatch),
        direct: percentiles(&direct),
        post: percentiles(&post),
        ran_on,
    }
}

/// t0 -> started for `sh -c "date +%s%N > FILE"` spawned by this process.
fn measure_direct(samples: usize) -> Vec<f64> {
    let dir = tempfile::Builder::new()
        .prefix("codex-mesh-bench-direct-")
        .tempdir()
        .expect("create a temporary directory");
    (0..samples)
        .map(|i| {
            let file = dir.path().join(format!("started-{i}"));
            let t0 = unix_ns();
            let status = Command::new("sh")
                .arg("-c")
                .arg(format!("date +%s%N > {}", file.display()))
                .stdin(Stdio::null())
                .status()
                .expect("run sh");
            assert!(status.success(), "sh -c date failed: {status}");
            ns_to_ms(read_stamp(&file) - t0)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// 2. Throughput
// ---------------------------------------------------------------------------

/// One submission: the job id (or the error), and when it was made (Unix ms).
struct Submitted {
    id: Result<String, String>,
    started_ms: f64,
    done_ms: f64,
}

fn bench_throughput(bin: &Path, jobs: usize) -> ThroughputReport {
    eprintln!("== throughput: starting {MESH_NODES} nodes with {THROUGHPUT_SLOTS} slots each");
    let slots = THROUGHPUT_SLOTS.to_string();
    let cluster = Cluster::start(bin, MESH_NODES, &["--agent", OK_AGENT, "--slots", &slots]);
    let nodes = &cluster.mesh.nodes;
    let body = json!({ "prompt": "ok", "agent": "ok" });
    eprintln!("== throughput: {WARMUP_JOBS} warm-up jobs");
    let mut warmup = Vec::new();
    for i in 0..WARMUP_JOBS {
        let via = &nodes[i % nodes.len()];
        let id = submit(via, &body).unwrap_or_else(|e| panic!("{e}"));
        expect_succeeded(&wait_terminal(via, &id, JOB_POLL, JOB_TIMEOUT));
        warmup.push(id);
    }

    eprintln!("== throughput: submitting {jobs} jobs from {SUBMIT_THREADS} threads");
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(jobs));
    let cpu_before: Vec<u64> = nodes.iter().map(|n| cpu_ticks(n.pid())).collect();
    let wall = Instant::now();
    thread::scope(|scope| {
        for _ in 0..SUBMIT_THREADS {
            scope.spawn(|| {
                let mut mine = Vec::new();
                loop {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    if j >= jobs {
                        break;
                    }
                    let started_ms = ns_to_ms(unix_ns());
                    let id = submit(&nodes[j % nodes.len()], &body);
                    mine.push(Submitted {
                        id,
                        started_ms,
                        done_ms: ns_to_ms(unix_ns()),
                    });
                }
                results.lock().expect("results lock").extend(mine);
            });
        }
    });
    let submitted = results.into_inner().expect("results lock");
    let first_submit_ms = submitted
        .iter()
        .map(|s| s.started_ms)
        .fold(f64::INFINITY, f64::min);
    let last_submit_ms = submitted.iter().map(|s| s.done_ms).fold(0.0, f64::max);
    let submit_secs = (last_submit_ms - first_submit_ms) / 1000.0;
    let ids: Vec<&str> = submitted
        .iter()
        .filter_map(|s| s.id.as_deref().ok())
        .collect();
    let errors: Vec<&str> = submitted
        .iter()
        .filter_map(|s| s.id.as_ref().err().map(String::as_str))
        .collect();
    if let Some(first) = errors.first() {
        eprintln!("   {} submissions failed; first: {first}", errors.len());
    }
    eprintln!(
        "   {} accepted in {submit_secs:.2} s ({:.1}/s)",
        ids.len(),
        ids.len() as f64 / submit_secs.max(1e-9)
    );

    eprintln!("== throughput: waiting until all jobs are terminal");
    let expected_total = ids.len() + warmup.len();
    let timeout = DRAIN_BASE + DRAIN_PER_JOB * jobs as u32;
    let finished_in_time = wait_drained(&nodes[0], expected_total, timeout);
    let wall_secs = wall.elapsed().as_secs_f64();
    let cpu_percent = nodes
        .iter()
        .zip(&cpu_before)
        .map(|(n, &before)| {
            let secs = (cpu_ticks(n.pid()) - before) as f64 / CLK_TCK;
            (n.name.clone(), secs / wall_secs * 100.0)
        })
        .collect();

    let listed = list_all_jobs(&nodes[0]);
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut ran_on: BTreeMap<String, usize> = BTreeMap::new();
    let mut missing = 0;
    let mut last_terminal_ms: f64 = 0.0;
    let mut ends = Vec::with_capacity(ids.len());
    for id in &ids {
        let Some(job) = listed.get(*id) else {
            missing += 1;
            continue;
        };
        let status = job["status"].as_str().unwrap_or("?").to_owned();
        if common::job_finished(job) {
            let at = job["updated_at_ms"].as_f64().unwrap_or(0.0);
            last_terminal_ms = last_terminal_ms.max(at);
            ends.push(at);
        }
        if let Some(name) = job["node_name"].as_str() {
            *ran_on.entry(name.to_owned()).or_default() += 1;
        }
        *statuses.entry(status).or_default() += 1;
    }
    let per_second = histogram_per_second(&ends, first_submit_ms);
    ThroughputReport {
        jobs: ids.len(),
        submit_errors: errors.len(),
        submit_secs,
        first_to_last_terminal_secs: (last_terminal_ms - first_submit_ms) / 1000.0,
        wall_secs,
        drain_after_submit_secs: (last_terminal_ms - last_submit_ms) / 1000.0,
        statuses,
        missing,
        finished_in_time,
        per_second,
        ran_on,
        cpu_percent,
    }
}

/// `total` of `GET /api/v1/jobs?<query>&limit=1`.
fn count_jobs(node: &Node, query: &str) -> Result<usize, String> {
    let path = format!("/api/v1/jobs?limit=1{query}");
    let list: Value = node
        .api("GET", &path, None)
        .map_err(|e| format!("GET {path}: {e}"))?
        .expect_status(200)
        .and_then(|r| r.json())?;
    list["total"]
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| format!("no total in {list}"))
}

/// Waits until `node` lists `expected` jobs and none of them active; false
/// on timeout.
fn wait_drained(node: &Node, expected: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut last_report = Instant::now();
    loop {
        let probe = || -> Result<(usize, usize), String> {
            let total = count_jobs(node, "")?;
            let mut active = 0;
            for status in ACTIVE {
                active += count_jobs(node, &format!("&status={status}"))?;
            }
            Ok((total, active))
        };
        let observation = probe();
        if let Ok((total, 0)) = observation {
            if total >= expected {
                return true;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            match &observation {
                Ok((total, active)) => eprintln!("   listed {total}, still active {active}"),
                Err(e) => eprintln!("   probe failed: {e}"),
            }
        }
        if Instant::now() >= deadline {
            eprintln!("   gave up after {timeout:?}; last observation {observation:?}");
            return false;
        }
        thread::sleep(DRAIN_POLL);
    }
}

/// Every job `node` lists, by id (paged with the API's maximum page size).
fn list_all_jobs(node: &Node) -> BTreeMap<String, Value> {
    let mut jobs = BTreeMap::new();
    let mut offset = 0;
    // Bounded: the first page tells the total; a few extra pages of slack.
    let mut pages_left = 3;
    loop {
        let path = format!("/api/v1/jobs?limit={PAGE}&offset={offset}");
        let list: Value = node
            .api("GET", &path, None)
            .map_err(|e| e.to_string())
            .and_then(|r| r.expect_status(200))
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("{}: GET {path}: {e}", node.name));
        let page = list["jobs"].as_array().cloned().unwrap_or_default();
        let total = list["total"].as_u64().unwrap_or(0) as usize;
        if offset == 0 {
            pages_left += total.div_ceil(PAGE);
        }
        offset += page.len();
        for job in page {
            if let Some(id) = job["id"].as_str() {
                jobs.insert(id.to_owned(), job.clone());
            }
        }
        pages_left -= 1;
        if offset >= total || pages_left == 0 {
            return jobs;
        }
    }
}

/// Jobs finished in each second after `start_ms`.
fn histogram_per_second(ends_ms: &[f64], start_ms: f64) -> Vec<usize> {
    let mut buckets: Vec<usize> = Vec::new();
    for &end in ends_ms {
        let second = ((end - start_ms).max(0.0) / 1000.0) as usize;
        if buckets.len() <= second {
            buckets.resize(second + 1, 0);
        }
        buckets[second] += 1;
    }
    buckets
}

// ---------------------------------------------------------------------------
// 3. Repository preparation
// ---------------------------------------------------------------------------

/// A non-bare repository served by `git daemon` on 127.0.0.1.
struct Origin {
    server: git_server::GitServer,
}

impl Origin {
    /// Creates `REPO_NAME.git` with `files` random files in
    /// [`REPO_COMMITS`] commits, repacks it, and serves it.
    fn create(files: usize) -> Origin {
        let server = git_server::GitServer::start();
        let dir = server.dir(REPO_NAME);
        fs::create_dir_all(dir.join("data")).expect("create the origin");
        git(&dir, &["init", "-q", "-b", "main"]);
        let mut rng = rand::thread_rng();
        let mut buf = vec![0u8; REPO_FILE_BYTES];
        let per_commit = files.div_ceil(REPO_COMMITS);
        for (commit, chunk) in (0..files)
            .collect::<Vec<_>>()
            .chunks(per_commit)
            .enumerate()
        {
            for i in chunk {
                rng.fill_bytes(&mut buf);
                fs::write(dir.join("data").join(format!("blob-{i:04}.bin")), &buf)
                    .expect("write a random file");
            }
            git(&dir, &["add", "data"]);
            git(
                &dir,
                &["commit", "-qm", &format!("random data {}", commit + 1)],
            );
        }
        git(&dir, &["repack", "-adq"]);
        Origin { server }
    }

    fn dir(&self) -> PathBuf {
        self.server.dir(REPO_NAME)
    }

    fn url(&self) -> String {
        self.server.url(REPO_NAME)
    }

    /// Size of the object store (the packed history).
    fn objects_bytes(&self) -> u64 {
        dir_bytes(&self.dir().join(".git").join("objects"))
    }

    /// Adds one small commit with the file `name`.
    fn add_small_commit(&self, name: &str) {
        let dir = self.dir();
        fs::write(dir.join(name), format!("{name}\n")).expect("write a small file");
        git(&dir, &["add", name]);
        git(&dir, &["commit", "-qm", &format!("add {name}")]);
    }
}

/// Total size of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

fn bench_repo(bin: &Path, repo_mb: usize) -> RepoReport {
    let files = (repo_mb * 1024 * 1024).div_ceil(REPO_FILE_BYTES);
    eprintln!("== repo: creating a {repo_mb} MB repository ({files} random files)");
    let origin = Origin::create(files);
    let repo_bytes = origin.objects_bytes();
    let (initial_clone_ms, local_clone_ms) = git_clone_baselines(&origin);
    eprintln!(
        "   {:.1} MB packed; `git clone` from the daemon {initial_clone_ms:.0} ms, \
         from a local mirror {local_clone_ms:.0} ms",
        repo_bytes as f64 / 1e6
    );

    eprintln!("== repo: starting one node");
    let mut cluster = Cluster::start(bin, 1, &["--agent", STAMP_AGENT, "--agent", OK_AGENT]);
    let mirrors = cluster.mesh.nodes[0].data_dir().join("mirrors");
    let spares = cluster.workdirs[0].join(SPARES_DIR);
    let mut fresh = Vec::new();
    let mut warm = Vec::new();
    let mut back_to_back = Vec::new();
    for rep in 1..=REPO_REPS {
        // Empty the mirror cache while the node is stopped.
        let node = &mut cluster.mesh.nodes[0];
        node.terminate(common::SHUTDOWN_TIMEOUT);
        for cache in [&mirrors, &spares] {
            if cache.exists() {
                fs::remove_dir_all(cache)
                    .unwrap_or_else(|e| panic!("remove {}: {e}", cache.display()));
            }
        }
        node.restart();
        cluster.mesh.wait_converged(
            &[0],
            Expect {
                online: 1,
                voters: Some(1),
            },
        );

        let run = run_repo_job(&cluster, &origin.url(), None);
        log_repo_run(rep, "fresh", &run);
        fresh.push(run);

        // Warm: the next job comes once the node has made its spare checkout.
        let waited = wait_for_spare(&spares);
        eprintln!("   spare checkout ready {waited:.0} ms after the fresh job ended");
        let marker = format!("small-{rep}.txt");
        origin.add_small_commit(&marker);
        let run = run_repo_job(&cluster, &origin.url(), Some(&marker));
        log_repo_run(rep, "warm", &run);
        warm.push(run);

        // Back to back: the next job comes at once, while the spare is being made again.
        let marker = format!("small-{rep}-b.txt");
        origin.add_small_commit(&marker);
        let run = run_repo_job(&cluster, &origin.url(), Some(&marker));
        log_repo_run(rep, "back-to-back", &run);
        back_to_back.push(run);
    }
    RepoReport {
        repo_bytes,
        files,
        initial_clone_ms,
        local_clone_ms,
        fresh,
        warm,
        back_to_back,
    }
}

fn log_repo_run(rep: usize, kind: &str, run: &RepoRun) {
    eprintln!(
        "   rep {rep}/{REPO_REPS} {kind:<12}: preparation {:.0} ms, duration {:.0} ms, to agent {:.0} ms, end-to-end {:.0} ms",
        run.prepare_ms, run.duration_ms, run.to_agent_ms, run.end_to_end_ms
    );
}

/// Waits until the node's spare checkout directory holds a finished spare;
/// returns the time waited in ms.
fn wait_for_spare(spares: &Path) -> f64 {
    let t0 = Instant::now();
    loop {
        let ready = fs::read_dir(spares)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| !e.file_name().to_string_lossy().starts_with('.'))
            })
            .unwrap_or(false);
        if ready {
            return millis(t0.elapsed());
        }
        assert!(
            t0.elapsed() < REPO_JOB_TIMEOUT,
            "no spare checkout appeared in {}",
            spares.display()
        );
        thread::sleep(REPO_POLL);
    }
}

/// Reference points measured with the git CLI: a plain `git clone` of the
/// origin through the daemon (compare with fresh), and a `git clone` from a
/// local bare mirror of it (hard links + checkout; compare with warm).
fn git_clone_baselines(origin: &Origin) -> (f64, f64) {
    let target = tempfile::Builder::new()
        .prefix("codex-mesh-bench-clone-")
        .tempdir()
        .expect("create a temporary directory");
    let path = |name: &str| target.path().join(name).display().to_string();
    let t0 = Instant::now();
    git(
        target.path(),
        &["clone", "-q", &origin.url(), &path("remote")],
    );
    let remote_ms = millis(t0.elapsed());
    git(
        target.path(),
        &[
            "clone",
            "-q",
            "--mirror",
            &origin.url(),
            &path("mirror.git"),
        ],
    );
    let t0 = Instant::now();
    git(
        target.path(),
        &["clone", "-q", &path("mirror.git"), &path("local")],
    );
    (remote_ms, millis(t0.elapsed()))
}

/// Runs one `stamp` job naming the origin; checks the checkout (and that it
/// contains `expect_file`, the newest commit's file).
fn run_repo_job(cluster: &Cluster, url: &str, expect_file: Option<&str>) -> RepoRun {
    let node = &cluster.mesh.nodes[0];
    let body = json!({ "prompt": "prepare", "agent": "stamp", "repos": [url] });
    let t0 = unix_ns();
    let id = submit(node, &body).unwrap_or_else(|e| panic!("{e}"));
    let job = wait_terminal(node, &id, REPO_POLL, REPO_JOB_TIMEOUT);
    expect_succeeded(&job);
    let workdir = cluster.workdirs[0].join(&id);
    let checkout = workdir.join(REPO_NAME);
    assert!(
        checkout.join("data").is_dir(),
        "no checkout at {}",
        checkout.display()
    );
    if let Some(file) = expect_file {
        assert!(
            checkout.join(file).is_file(),
            "the checkout {} lacks the newest commit ({file})",
            checkout.display()
        );
    }
    let started = read_stamp(&workdir.join("started"));
    let duration_ms = job["result"]["duration_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("no result.duration_ms in {job}"));
    let prepare_ms = job["result"]["prepare_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("no result.prepare_ms in {job}"));
    let updated_ms = job["updated_at_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("no updated_at_ms in {job}"));
    RepoRun {
        prepare_ms,
        duration_ms,
        to_agent_ms: ns_to_ms(started - t0),
        end_to_end_ms: updated_ms - ns_to_ms(t0),
    }
}

// ---------------------------------------------------------------------------
// Statistics and output
// ---------------------------------------------------------------------------

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let values: Vec<f64> = values.collect();
    if values.is_empty() {
        0.0
    } else {
        percentiles(&values).p50
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

impl ThroughputReport {
    fn succeeded(&self) -> usize {
        self.statuses.get("succeeded").copied().unwrap_or(0)
    }

    fn terminal(&self) -> usize {
        TERMINAL
            .iter()
            .map(|s| self.statuses.get(*s).copied().unwrap_or(0))
            .sum()
    }

    /// Terminal jobs per second, first submission to last terminal update.
    fn jobs_per_sec(&self) -> f64 {
        self.terminal() as f64 / self.first_to_last_terminal_secs.max(1e-9)
    }

    fn submit_rate(&self) -> f64 {
        self.jobs as f64 / self.submit_secs.max(1e-9)
    }

    fn statuses_text(&self) -> String {
        let mut parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect();
        parts.push(format!("missing={}", self.missing));
        parts.push(format!("submit_errors={}", self.submit_errors));
        parts.join(" ")
    }
}

/// Median of one figure over repository runs.
fn median_of(runs: &[RepoRun], f: fn(&RepoRun) -> f64) -> f64 {
    median(runs.iter().map(f))
}

/// Ratio of the medians of one figure: `runs` over the fresh runs.
fn ratio_to_fresh(r: &RepoReport, runs: &[RepoRun], f: fn(&RepoRun) -> f64) -> f64 {
    median_of(runs, f) / median_of(&r.fresh, f).max(1e-9)
}

fn join_ms(runs: &[RepoRun], f: fn(&RepoRun) -> f64) -> String {
    runs.iter()
        .map(|r| format!("{:.0}", f(r)))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn format_counts(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Human-readable results.
fn print_table(
    dispatch: Option<&DispatchReport>,
    throughput: Option<&ThroughputReport>,
    repo: Option<&RepoReport>,
) {
    println!();
    if let Some(d) = dispatch {
        println!(
            "1. dispatch latency, {MESH_NODES} nodes, POST -> agent start ({} samples; ran on {})",
            d.samples,
            format_counts(&d.ran_on)
        );
        println!(
            "{:<34} {:>10} {:>10} {:>10} {:>10}",
            "", "min", "p50", "p99", "max"
        );
        println!("{}", "-".repeat(78));
        let row = |name: &str, p: Percentiles| {
            println!(
                "{name:<34} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8.1}ms",
                p.min, p.p50, p.p99, p.max
            );
        };
        row("via the mesh (t0 -> started)", d.dispatch);
        row("direct sh -c spawn (t0 -> started)", d.direct);
        row("  of which: POST /api/v1/jobs", d.post);
        println!(
            "{:<34} {:>9.1}x {:>9.1}x {:>9.1}x {:>9.1}x",
            "ratio mesh / direct",
            d.dispatch.min / d.direct.min.max(1e-9),
            d.dispatch.p50 / d.direct.p50.max(1e-9),
            d.dispatch.p99 / d.direct.p99.max(1e-9),
            d.dispatch.max / d.direct.max.max(1e-9)
        );
        println!(
            "target p50 <= {TARGET_DISPATCH_P50_MS:.0} ms: {}; p99 <= {TARGET_DISPATCH_P99_MS:.0} ms: {}",
            verdict(d.dispatch.p50 <= TARGET_DISPATCH_P50_MS),
            verdict(d.dispatch.p99 <= TARGET_DISPATCH_P99_MS)
        );
        println!();
    }
    if let Some(t) = throughput {
        println!(
            "2. throughput, {MESH_NODES} nodes x {THROUGHPUT_SLOTS} slots, agent `true`, {} jobs",
            t.jobs
        );
        println!("{}", "-".repeat(67));
        println!(
            "{:<44} {:>9.1} jobs/s",
            "first submit -> last terminal (updated_at)",
            t.jobs_per_sec()
        );
        println!(
            "{:<44} {:>9.2} s",
            "  first submit -> last terminal", t.first_to_last_terminal_secs
        );
        println!(
            "{:<44} {:>9.2} s  ({:.1} submits/s)",
            "  submission phase alone",
            t.submit_secs,
            t.submit_rate()
        );
        println!(
            "{:<44} {:>9.2} s",
            "  drain after the last submit", t.drain_after_submit_secs
        );
        println!(
            "{:<44} {:>9.2} s",
            "  wall clock incl. observation", t.wall_secs
        );
        println!(
            "{:<44} {:>9} (max {})",
            "completions per second",
            "",
            t.per_second.iter().max().copied().unwrap_or(0)
        );
        println!("  {:?}", t.per_second);
        println!("statuses: {}", t.statuses_text());
        println!("ran on: {}", format_counts(&t.ran_on));
        println!(
            "node CPU during the run (% of one core): {}",
            t.cpu_percent
                .iter()
                .map(|(n, p)| format!("{n}={p:.0}%"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!(
            "target >= {TARGET_JOBS_PER_SEC:.0} jobs/s: {}; all {} succeeded, 0 lost: {}{}",
            verdict(t.jobs_per_sec() >= TARGET_JOBS_PER_SEC),
            t.jobs,
            verdict(t.succeeded() == t.jobs && t.missing == 0 && t.submit_errors == 0),
            if t.finished_in_time {
                ""
            } else {
                " (gave up waiting: some jobs never finished)"
            }
        );
        println!();
    }
    if let Some(r) = repo {
        println!(
            "3. repository preparation, {:.1} MB packed ({} random files), {} reps (medians; runs in brackets)",
            r.repo_bytes as f64 / 1e6,
            r.files,
            r.fresh.len()
        );
        println!(
            "{:<13} {:>26} {:>26} {:>26} {:>26}",
            "",
            "result.prepare_ms",
            "result.duration_ms",
            "submit -> agent start",
            "submit -> terminal"
        );
        println!("{}", "-".repeat(121));
        let fields: [fn(&RepoRun) -> f64; 4] = [
            |r| r.prepare_ms,
            |r| r.duration_ms,
            |r| r.to_agent_ms,
            |r| r.end_to_end_ms,
        ];
        let kinds = [
            ("fresh", &r.fresh),
            ("warm", &r.warm),
            ("back-to-back", &r.back_to_back),
        ];
        for (name, runs) in kinds {
            let cells: Vec<String> = fields
                .iter()
                .map(|f| format!("{:.0}ms [{}]", median_of(runs, *f), join_ms(runs, *f)))
                .collect();
            println!(
                "{name:<13} {:>26} {:>26} {:>26} {:>26}",
                cells[0], cells[1], cells[2], cells[3]
            );
        }
        for (name, runs) in &kinds[1..] {
            let ratios: Vec<String> = fields
                .iter()
                .map(|f| format!("{:.2}x", ratio_to_fresh(r, runs, *f)))
                .collect();
            println!(
                "{:<13} {:>26} {:>26} {:>26} {:>26}",
                format!("{name}/fresh"),
                ratios[0],
                ratios[1],
                ratios[2],
                ratios[3]
            );
        }
        println!(
            "reference (git CLI): clone from the daemon {:.0} ms; clone from a local mirror {:.0} ms",
            r.initial_clone_ms, r.local_clone_ms
        );
        let ratio = ratio_to_fresh(r, &r.warm, |x| x.prepare_ms);
        println!(
            "target warm <= {TARGET_WARM_RATIO:.2}x fresh (result.prepare_ms): {}",
            verdict(ratio <= TARGET_WARM_RATIO)
        );
        println!();
    }
}

fn percentiles_json(p: Percentiles) -> Value {
    json!({ "min": p.min, "p50": p.p50, "p99": p.p99, "max": p.max })
}

fn runs_json(runs: &[RepoRun]) -> Value {
    runs.iter()
        .map(|r| {
            json!({
                "prepare_ms": r.prepare_ms,
                "duration_ms": r.duration_ms,
                "to_agent_ms": r.to_agent_ms,
                "end_to_end_ms": r.end_to_end_ms,
            })
        })
        .collect()
}

/// All figures as one JSON value.
fn to_json(
    options: &Options,
    dispatch: Option<&DispatchReport>,
    throughput: Option<&ThroughputReport>,
    repo: Option<&RepoReport>,
) -> Value {
    let dispatch = dispatch.map(|d| {
        json!({
            "nodes": MESH_NODES,
            "samples": d.samples,
            "latency_ms": percentiles_json(d.dispatch),
            "direct_spawn_ms": percentiles_json(d.direct),
            "post_ms": percentiles_json(d.post),
            "ratio_p50": d.dispatch.p50 / d.direct.p50.max(1e-9),
            "ratio_p99": d.dispatch.p99 / d.direct.p99.max(1e-9),
            "ran_on": d.ran_on,
        })
    });
    let throughput = throughput.map(|t| {
        json!({
            "nodes": MESH_NODES,
            "slots": THROUGHPUT_SLOTS,
            "jobs": t.jobs,
            "jobs_per_sec": t.jobs_per_sec(),
            "first_submit_to_last_terminal_secs": t.first_to_last_terminal_secs,
            "submit_secs": t.submit_secs,
            "submits_per_sec": t.submit_rate(),
            "drain_after_submit_secs": t.drain_after_submit_secs,
            "wall_secs": t.wall_secs,
            "statuses": t.statuses,
            "missing": t.missing,
            "submit_errors": t.submit_errors,
            "finished_in_time": t.finished_in_time,
            "completions_per_second": t.per_second,
            "ran_on": t.ran_on,
            "node_cpu_percent": t.cpu_percent,
        })
    });
    let repo = repo.map(|r| {
        json!({
            "repo_bytes": r.repo_bytes,
            "files": r.files,
            "git_clone_ms": r.initial_clone_ms,
            "git_local_clone_ms": r.local_clone_ms,
            "fresh": runs_json(&r.fresh),
            "warm": runs_json(&r.warm),
            "back_to_back": runs_json(&r.back_to_back),
            "median_prepare_ms": {
                "fresh": median_of(&r.fresh, |x| x.prepare_ms),
                "warm": median_of(&r.warm, |x| x.prepare_ms),
                "back_to_back": median_of(&r.back_to_back, |x| x.prepare_ms),
            },
            "ratio_warm_fresh": ratio_to_fresh(r, &r.warm, |x| x.prepare_ms),
            "ratio_back_to_back_fresh": ratio_to_fresh(r, &r.back_to_back, |x| x.prepare_ms),
        })
    });
    json!({
        "bench": "jobs_bench",
        "options": {
            "dispatch_samples": options.dispatch_samples,
            "jobs": options.jobs,
            "repo_mb": options.repo_mb,
        },
        "dispatch": dispatch,
        "throughput": throughput,
        "repo": repo,
    })
}
