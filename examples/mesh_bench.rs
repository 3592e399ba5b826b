//! Benchmark of a real `codex-mesh` cluster: N separate node processes on
//! loopback (ports picked by the OS, temporary data dirs).
//!
//! This example does not build the node binary. Build it first, then run:
//!
//! ```text
//! cargo build --release --bin codex-mesh
//! cargo run --release --example mesh_bench -- [--nodes 3,10,20] [--samples 50]
//! ```
//!
//! The binary is looked up as `target/<profile>/codex-mesh` next to this
//! example's executable, or taken from the `CODEX_MESH_BIN` environment
//! variable.
//!
//! For every cluster size N the benchmark:
//! 1. starts `n1` with `up` and N-1 nodes with `join`, and waits until every
//!    node lists N online nodes and all agree on a master (startup time);
//! 2. convergence: `--samples` times, PATCHes the tags of a random node
//!    through a random node's API and measures the time until every node's
//!    `GET /api/v1/nodes` shows the new tag (all nodes polled concurrently
//!    every 5 ms); prints p50 / p99 / max;
//! 3. idle footprint: after 10 s without requests, RSS (`VmRSS`) and CPU
//!    (utime+stime over a 10 s window) of every node; mean and max;
//! 4. failover (N >= 3; three repetitions at the largest size, one
//!    otherwise): kill -9 the master and time until a majority of the
//!    remaining nodes agree on a new master with a larger epoch, that node
//!    reporting `is_master`; the killed node is restarted between runs.
//!
//! Progress goes to stderr; stdout gets a table and a final JSON line.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/stats.rs"]
mod stats;

use stats::{cpu_ticks, millis, percentiles, Percentiles};
use std::env;
use std::fs;
use std::path::Path;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use common::{Expect, Mesh, MeshView, Node, Status};
use rand::Rng;
use serde_json::json;

/// Poll period of the measuring loops.
const FAST_POLL: Duration = Duration::from_millis(5);
/// Give up on one measurement after this long.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(60);
/// Quiet period before the idle footprint is measured.
const IDLE_SETTLE: Duration = Duration::from_secs(10);
/// Window over which idle CPU is measured.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// Kernel clock ticks per second (`getconf CLK_TCK`).
const CLK_TCK: f64 = 100.0;
/// Failover repetitions at the largest cluster size.
const FAILOVER_REPS_LARGEST: usize = 3;

/// Command-line options.
struct Options {
    sizes: Vec<usize>,
    samples: usize,
}

/// Mean and max of a per-node figure.
struct MeanMax {
    mean: f64,
    max: f64,
}

/// Idle resource usage over all nodes.
struct Idle {
    rss_kib: MeanMax,
    cpu_percent: MeanMax,
}

/// Everything measured for one cluster size.
struct SizeReport {
    nodes: usize,
    startup_ms: f64,
    convergence: Percentiles,
    convergence_samples: usize,
    idle: Idle,
    failover_ms: Vec<f64>,
}

fn main() -> ExitCode {
    let options = match parse_options(env::args().skip(1)) {
        Ok(options) => options,
        Err(msg) => {
            eprintln!("mesh_bench: {msg}\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    let bin = match common::locate_node_binary() {
        Ok(bin) => bin,
        Err(msg) => {
            eprintln!("mesh_bench: {msg}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("mesh_bench: using {}", bin.display());
    let largest = options.sizes.iter().copied().max().unwrap_or(0);
    let reports: Vec<SizeReport> = options
        .sizes
        .iter()
        .map(|&n| bench_size(&bin, n, options.samples, n == largest))
        .collect();
    print_table(&reports);
    println!("{}", to_json(&reports, options.samples));
    ExitCode::SUCCESS
}

const USAGE: &str = "usage: cargo run --release --example mesh_bench -- \
                     [--nodes 3,10,20] [--samples 50]";

/// Parses `--nodes a,b,c` and `--samples n`.
fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        sizes: vec![3, 10, 20],
        samples: 50,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--nodes" => {
                options.sizes = value()?
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|e| format!("--nodes {s}: {e}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--samples" => {
                let v = value()?;
                options.samples = v.parse().map_err(|e| format!("--samples {v}: {e}"))?;
            }
            "-h" | "--help" => return Err("help requested".to_owned()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if options.sizes.is_empty() || options.sizes.contains(&0) || options.samples == 0 {
        return Err("cluster sizes and sample count must be positive".to_owned());
    }
    Ok(options)
}

/// Number of voters the mesh keeps for `n` master-eligible nodes.
fn expected_voters(n: usize) -> usize {
    match n {
        0..=2 => 1,
        3..=4 => 3,
        _ => 5,
    }
}

/// Runs all measurements for one cluster size.
fn bench_size(bin: &Path, n: usize, samples: usize, largest: bool) -> SizeReport {
    eprintln!("== {n} nodes: starting");
    let started = Instant::now();
    let mut mesh = Mesh::start(bin, n);
    let all = mesh.all();
    mesh.wait_converged(
        &all,
        Expect {
            online: n,
            voters: None,
        },
    );
    let startup_ms = millis(started.elapsed());
    eprintln!("== {n} nodes: converged after {startup_ms:.0} ms; measuring convergence");

    let latencies = measure_convergence(&mesh, samples);
    let convergence = percentiles(&latencies);
    eprintln!("== {n} nodes: measuring idle footprint");
    let idle = measure_idle(&mesh);
    let failover_ms = if n >= 3 {
        let reps = if largest { FAILOVER_REPS_LARGEST } else { 1 };
        eprintln!("== {n} nodes: measuring failover ({reps}x)");
        measure_failover(&mut mesh, reps)
    } else {
        Vec::new()
    };
    SizeReport {
        nodes: n,
        startup_ms,
        convergence,
        convergence_samples: latencies.len(),
        idle,
        failover_ms,
    }
}

/// Tag-change propagation latencies in milliseconds.
fn measure_convergence(mesh: &Mesh, samples: usize) -> Vec<f64> {
    let mut rng = rand::thread_rng();
    let nonce: u32 = rng.gen();
    let n = mesh.nodes.len();
    (0..samples)
        .map(|i| {
            let target = &mesh.nodes[rng.gen_range(0..n)];
            let via = &mesh.nodes[rng.gen_range(0..n)];
            let tag = format!("bench-{nonce:08x}-{n}-{i}");
            let body = json!({ "tags": [tag] }).to_string();
            let t0 = Instant::now();
            via.api_ok(
                "PATCH",
                &format!("/api/v1/nodes/{}", target.id()),
                Some(&body),
            );
            millis(time_until_all_see_tag(mesh, target.id(), &tag, t0))
        })
        .collect()
}

/// Polls every node concurrently until all show `tag` on node `id`; returns
/// the time (since `t0`) at which the last node showed it.
fn time_until_all_see_tag(mesh: &Mesh, id: &str, tag: &str, t0: Instant) -> Duration {
    thread::scope(|scope| {
        let pollers: Vec<_> = mesh
            .nodes
            .iter()
            .map(|node| scope.spawn(move || time_until_node_sees_tag(node, id, tag, t0)))
            .collect();
        pollers
            .into_iter()
            .map(|p| p.join().expect("poller thread panicked"))
            .max()
            .unwrap_or_default()
    })
}

/// Polls one node every [`FAST_POLL`] until it shows `tag` on node `id`.
fn time_until_node_sees_tag(node: &Node, id: &str, tag: &str, t0: Instant) -> Duration {
    loop {
        let seen = node.nodes().is_ok_and(|records| {
            common::find_record(&records, id).is_some_and(|r| r.tags.iter().any(|t| t == tag))
        });
        let elapsed = t0.elapsed();
        if seen {
            return elapsed;
        }
        assert!(
            elapsed < MEASURE_TIMEOUT,
            "{} did not see tag {tag} within {MEASURE_TIMEOUT:?}",
            node.name
        );
        thread::sleep(FAST_POLL);
    }
}

/// RSS and CPU of every node after an idle period.
fn measure_idle(mesh: &Mesh) -> Idle {
    thread::sleep(IDLE_SETTLE);
    let pids: Vec<u32> = mesh.nodes.iter().map(Node::pid).collect();
    let before: Vec<u64> = pids.iter().map(|&pid| cpu_ticks(pid)).collect();
    let window = Instant::now();
    thread::sleep(IDLE_WINDOW);
    let secs = window.elapsed().as_secs_f64();
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&before)
        .map(|(&pid, &start)| (cpu_ticks(pid) - start) as f64 / CLK_TCK / secs * 100.0)
        .collect();
    let rss: Vec<f64> = pids.iter().map(|&pid| rss_kib(pid) as f64).collect();
    Idle {
        rss_kib: mean_max(&rss),
        cpu_percent: mean_max(&cpu),
    }
}

/// Resident set size of a process in KiB (`VmRSS` in `/proc/PID/status`).
fn rss_kib(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {path}"))
}

/// Failover times in milliseconds; restarts the killed master between runs.
fn measure_failover(mesh: &mut Mesh, reps: usize) -> Vec<f64> {
    let n = mesh.nodes.len();
    let full = Expect {
        online: n,
        voters: Some(expected_voters(n)),
    };
    let mut times = Vec::with_capacity(reps);
    for rep in 0..reps {
        let view = mesh.wait_converged(&mesh.all(), full);
        let old = view.master_index;
        let t0 = Instant::now();
        mesh.nodes[old].kill9();
        let survivors = mesh.all_except(&[old]);
        wait_majority_new_master(mesh, &survivors, &view);
        let elapsed = millis(t0.elapsed());
        eprintln!("   failover {}/{reps}: {elapsed:.0} ms", rep + 1);
        times.push(elapsed);
        mesh.nodes[old].restart();
    }
    mesh.wait_converged(&mesh.all(), full);
    times
}

/// Polls (every [`FAST_POLL`]) until a majority of `survivors` agree on a
/// new master with a larger epoch that reports `is_master`.
fn wait_majority_new_master(mesh: &Mesh, survivors: &[usize], old: &MeshView) -> MeshView {
    let quorum = survivors.len() / 2 + 1;
    common::poll_every(FAST_POLL, MEASURE_TIMEOUT, "a new master", || {
        let statuses = statuses_concurrently(mesh, survivors);
        mesh.agreement(&statuses, quorum, |s| {
            s.master.as_deref() != Some(old.master.as_str()) && s.epoch > old.epoch
        })
    })
}

/// Statuses of the given nodes fetched in parallel; unreachable nodes are
/// left out.
fn statuses_concurrently(mesh: &Mesh, indices: &[usize]) -> Vec<(usize, Status)> {
    thread::scope(|scope| {
        let handles: Vec<_> = indices
            .iter()
            .map(|&i| {
                let node = &mesh.nodes[i];
                scope.spawn(move || node.status().ok().map(|s| (i, s)))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("status thread panicked"))
            .collect()
    })
}

fn mean_max(values: &[f64]) -> MeanMax {
    MeanMax {
        mean: values.iter().sum::<f64>() / values.len().max(1) as f64,
        max: values.iter().copied().fold(0.0, f64::max),
    }
}

/// Human-readable results.
fn print_table(reports: &[SizeReport]) {
    println!();
    println!(
        "{:>5} {:>10} | {:>9} {:>9} {:>9} | {:>22} | {:>9} {:>9} | {:>7} {:>7}",
        "nodes",
        "startup",
        "conv p50",
        "conv p99",
        "conv max",
        "failover (ms)",
        "RSS mean",
        "RSS max",
        "CPU avg",
        "CPU max"
    );
    println!("{}", "-".repeat(118));
    for r in reports {
        let failover = if r.failover_ms.is_empty() {
            "-".to_owned()
        } else {
            r.failover_ms
                .iter()
                .map(|ms| format!("{ms:.0}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "{:>5} {:>8.0}ms | {:>7.1}ms {:>7.1}ms {:>7.1}ms | {:>22} | {:>6.1}MiB {:>6.1}MiB | {:>6.2}% {:>6.2}%",
            r.nodes,
            r.startup_ms,
            r.convergence.p50,
            r.convergence.p99,
            r.convergence.max,
            failover,
            r.idle.rss_kib.mean / 1024.0,
            r.idle.rss_kib.max / 1024.0,
            r.idle.cpu_percent.mean,
            r.idle.cpu_percent.max
        );
    }
    println!();
}

/// All figures as one JSON value.
fn to_json(reports: &[SizeReport], samples: usize) -> serde_json::Value {
    let results: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            json!({
                "nodes": r.nodes,
                "startup_ms": r.startup_ms,
                "convergence_ms": {
                    "samples": r.convergence_samples,
                    "p50": r.convergence.p50,
                    "p99": r.convergence.p99,
                    "max": r.convergence.max,
                },
                "failover_ms": r.failover_ms,
                "idle": {
                    "rss_kib": { "mean": r.idle.rss_kib.mean, "max": r.idle.rss_kib.max },
                    "cpu_percent": { "mean": r.idle.cpu_percent.mean, "max": r.idle.cpu_percent.max },
                },
            })
        })
        .collect();
    json!({ "bench": "mesh_bench", "samples": samples, "results": results })
}
