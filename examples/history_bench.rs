//! Benchmark of history compaction on real `codex-mesh` node processes on loopback: the
//! store size, memory and a new node's catch-up time with `--jobs` finished jobs, before
//! and after the master's horizon compacts them.
//!
//! This example does not build the node binary. Build it first, then run:
//!
//! ```text
//! cargo build --release --bin codex-mesh --example history_bench
//! target/release/examples/history_bench [--jobs 20000] [--bin PATH]
//! ```
//!
//! The binary is `--bin`, else `CODEX_MESH_BIN`, else `target/<profile>/codex-mesh` next to
//! this example's executable.
//!
//! 1. `--jobs` finished job records (as `read_bench` seeds them: results of 2 to 5 KiB,
//!    diff summaries, command lists), all submitted 31 to 73 days ago, are written into
//!    `n1`'s store before `n1` first starts;
//! 2. before: `n1` starts with `--job-history-days 0` (keeps all history); a new node `n2`
//!    joins; catch-up = from its start until it lists `--jobs` jobs; then `n2` stops;
//! 3. `n1` restarts with the default `--job-history-days 30`: it takes the lease, moves the
//!    horizon and compacts every job; compaction time = from its start until
//!    `codex_mesh_jobs_compacted_total` reaches `--jobs`, with the slowest
//!    `GET /api/v1/health` meanwhile (the control task keeps answering);
//! 4. `n1` restarts once more (the store file is compacted at open); a new node `n3` joins;
//!    its catch-up is timed as in step 2.
//!
//! Per phase: `n1`'s and the joining node's store file size (taken after a clean stop: redb
//! grows its file ahead of use while open and trims it at close) and resident memory.
//! Progress goes to stderr; stdout gets a table and a final JSON line.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "read_bench/seed.rs"]
mod seed;
#[path = "support/stats.rs"]
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::{Mesh, Node, NodeOptions};
use serde_json::json;
use stats::millis;

const DAY_MS: u64 = 24 * 3600 * 1000;
/// Give up waiting for a catch-up or a compaction after this long.
const TIMEOUT: Duration = Duration::from_secs(900);
const USAGE: &str = "usage: history_bench [--jobs 20000] [--bin PATH]";

/// Figures of one phase (full history, or compacted).
#[derive(Default)]
struct Phase {
    n1_store_mib: f64,
    n1_rss_mib: f64,
    n1_ready_ms: f64,
    catch_up_ms: Option<f64>,
    joiner_store_mib: f64,
    joiner_rss_mib: f64,
}

fn main() -> ExitCode {
    let (jobs, bin) = match parse(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(msg) => {
            eprintln!("history_bench: {msg}\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    let bin = match bin.map_or_else(common::locate_node_binary, Ok) {
        Ok(bin) => bin,
        Err(msg) => {
            eprintln!("history_bench: {msg}");
            return ExitCode::FAILURE;
        }
    };
    let mut mesh = Mesh::new(&bin);
    let n1_dir = mesh.data_dir("n1");
    eprintln!("== seeding {jobs} jobs that ended over 30 days ago");
    seed::seed_data_dir(&n1_dir, jobs, 1, 31 * DAY_MS);

    eprintln!("== before: n1 keeps all history");
    let keep_all = NodeOptions::with_extra(&["--job-history-days", "0"]);
    let t0 = Instant::now();
    let n1 = mesh.spawn_up("n1", &keep_all);
    mesh.nodes[n1].wait_ready(common::READY_TIMEOUT);
    let mut before = Phase {
        n1_ready_ms: millis(t0.elapsed()),
        ..Phase::default()
    };
    join_and_measure(&mut mesh, n1, "n2", jobs, &mut before);

    eprintln!("== n1 restarts with --job-history-days 30 and compacts");
    let default_args = strip_history_flag(mesh.nodes[n1].args());
    mesh.nodes[n1].terminate(Duration::from_secs(30));
    before.n1_store_mib = mib(file_size(&n1_dir));
    let t0 = Instant::now();
    mesh.nodes[n1].restart_with_args(default_args.clone());
    mesh.nodes[n1].wait_ready(common::READY_TIMEOUT);
    let (compact_ms, slowest_health_ms) = wait_compacted(&mesh.nodes[n1], jobs, t0);

    eprintln!("== after: n1 restarts (the store file is compacted at open)");
    mesh.nodes[n1].terminate(Duration::from_secs(30));
    let store_right_after = mib(file_size(&n1_dir));
    let t0 = Instant::now();
    mesh.nodes[n1].restart_with_args(default_args);
    mesh.nodes[n1].wait_ready(common::READY_TIMEOUT);
    let mut after = Phase {
        n1_ready_ms: millis(t0.elapsed()),
        ..Phase::default()
    };
    join_and_measure(&mut mesh, n1, "n3", jobs, &mut after);
    mesh.nodes[n1].terminate(Duration::from_secs(30));
    after.n1_store_mib = mib(file_size(&n1_dir));

    print_table(
        jobs,
        &before,
        &after,
        compact_ms,
        slowest_health_ms,
        store_right_after,
    );
    let phase = |p: &Phase| {
        json!({
            "n1_store_mib": p.n1_store_mib,
            "n1_rss_mib": p.n1_rss_mib,
            "n1_ready_ms": p.n1_ready_ms,
            "catch_up_ms": p.catch_up_ms,
            "joiner_store_mib": p.joiner_store_mib,
            "joiner_rss_mib": p.joiner_rss_mib,
        })
    };
    println!(
        "{}",
        json!({
            "jobs": jobs,
            "before": phase(&before),
            "after": phase(&after),
            "compaction_ms": compact_ms,
            "slowest_health_during_compaction_ms": slowest_health_ms,
            "n1_store_mib_after_history_compaction": store_right_after,
        })
    );
    ExitCode::SUCCESS
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<(usize, Option<PathBuf>), String> {
    let (mut jobs, mut bin) = (20_000, None);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--jobs" => jobs = value()?.parse().map_err(|e| format!("--jobs: {e}"))?,
            "--bin" => bin = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err("help requested".to_owned()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if jobs == 0 {
        return Err("--jobs must be positive".to_owned());
    }
    Ok((jobs, bin))
}

/// `args` without `--job-history-days <n>`.
fn strip_history_flag(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for arg in args {
        if skip {
            skip = false;
        } else if arg == "--job-history-days" {
            skip = true;
        } else {
            out.push(arg.clone());
        }
    }
    out
}

/// A new node joins n1; time its catch-up, take the figures, stop it.
fn join_and_measure(mesh: &mut Mesh, n1: usize, name: &str, jobs: usize, phase: &mut Phase) {
    // The ticket endpoint answers once the node listens on the mesh.
    let ticket = mesh.nodes[n1].ticket();
    let t0 = Instant::now();
    let joiner = mesh.spawn_join(name, &ticket, &NodeOptions::default());
    mesh.nodes[joiner].wait_ready(common::READY_TIMEOUT);
    phase.catch_up_ms = wait_listing(&mesh.nodes[joiner], jobs, t0);
    phase.n1_rss_mib = rss_mib(mesh.nodes[n1].pid());
    phase.joiner_rss_mib = rss_mib(mesh.nodes[joiner].pid());
    // redb grows its file ahead of use while open and trims it at a clean close: sizes are
    // taken from stopped nodes.
    mesh.nodes[joiner].terminate(Duration::from_secs(30));
    phase.joiner_store_mib = mib(file_size(mesh.nodes[joiner].data_dir()));
}

/// Time from `t0` until `node` lists `jobs` jobs; `None` on timeout.
fn wait_listing(node: &Node, jobs: usize, t0: Instant) -> Option<f64> {
    while t0.elapsed() < TIMEOUT {
        if node.jobs_total().is_ok_and(|n| n >= jobs as u64) {
            let ms = millis(t0.elapsed());
            eprintln!("   {} caught up after {ms:.0} ms", node.name);
            return Some(ms);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("   {} did not catch up within {TIMEOUT:?}", node.name);
    None
}

/// Time from `t0` until `node` compacted `jobs` jobs, and the slowest health answer while
/// waiting (sequential requests, so they also pace the wait).
fn wait_compacted(node: &Node, jobs: usize, t0: Instant) -> (Option<f64>, f64) {
    let mut slowest: f64 = 0.0;
    while t0.elapsed() < TIMEOUT {
        let asked = Instant::now();
        let health = node.api("GET", "/api/v1/health", None);
        slowest = slowest.max(millis(asked.elapsed()));
        if health.is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let done = node
            .metric("codex_mesh_jobs_compacted_total")
            .is_ok_and(|n| n >= jobs as f64);
        if done {
            let ms = millis(t0.elapsed());
            eprintln!("   compacted after {ms:.0} ms; slowest health answer {slowest:.1} ms");
            return (Some(ms), slowest);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (None, slowest)
}

fn file_size(data_dir: &Path) -> u64 {
    std::fs::metadata(data_dir.join("state.redb")).map_or(0, |m| m.len())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Resident memory of a process, from `/proc/<pid>/status`.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn print_table(
    jobs: usize,
    before: &Phase,
    after: &Phase,
    compact_ms: Option<f64>,
    slowest_health_ms: f64,
    store_right_after: f64,
) {
    let ms = |v: Option<f64>| v.map_or("timeout".to_owned(), |v| format!("{:.1} s", v / 1000.0));
    println!("history compaction, {jobs} finished jobs that ended over 30 days ago");
    println!("{:<38} {:>14} {:>14}", "", "full history", "compacted");
    let mib_row = |label: &str, before: f64, after: f64| {
        println!("{label:<38} {before:>10.1} MiB {after:>10.1} MiB");
    };
    mib_row("n1 store file", before.n1_store_mib, after.n1_store_mib);
    mib_row("n1 resident memory", before.n1_rss_mib, after.n1_rss_mib);
    println!(
        "{:<38} {:>12.0} ms {:>12.0} ms",
        "n1 start until ready", before.n1_ready_ms, after.n1_ready_ms
    );
    println!(
        "{:<38} {:>14} {:>14}",
        "new node catch-up",
        ms(before.catch_up_ms),
        ms(after.catch_up_ms)
    );
    mib_row(
        "new node store file",
        before.joiner_store_mib,
        after.joiner_store_mib,
    );
    mib_row(
        "new node resident memory",
        before.joiner_rss_mib,
        after.joiner_rss_mib,
    );
    println!("compaction on n1: {} (store file {store_right_after:.1} MiB at the stop after it, before the file is compacted at open); slowest /api/v1/health meanwhile {slowest_health_ms:.1} ms", ms(compact_ms));
}
