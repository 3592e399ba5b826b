//! Benchmark of reads under load on real `codex-mesh` node processes on loopback: a 3-node
//! mesh whose store holds many finished jobs, list requests at a follower with and without
//! SSE clients connected to it, and the master's largest heartbeat gap meanwhile.
//!
//! This example does not build the node binary. Build it first, then run:
//!
//! ```text
//! cargo build --release --bin codex-mesh --example read_bench
//! target/release/examples/read_bench [--jobs 20000] [--sse 200] [--requests 2000]
//!     [--bin PATH] [--baseline-bin PATH]
//! ```
//!
//! The binary under test is `--bin`, else `CODEX_MESH_BIN`, else `target/<profile>/codex-mesh`
//! next to this example's executable. With `--baseline-bin` the same scenario runs against
//! that binary too (say, one built from an older commit) and both are printed side by side;
//! a figure the baseline cannot give (an endpoint it does not have) is `n/a`.
//!
//! Per binary:
//! 1. `--jobs` finished job records (statuses mostly succeeded, some failed, cancelled,
//!    timed out, lost; results of 2 to 5 KiB; 8 node ids; submitted over 6 weeks) are
//!    written into `n1`'s store (`<data-dir>/state.redb`) before `n1` first starts with `up`;
//! 2. `n2` and `n3` join with `n1`'s ticket; catch-up = from their start until every node's
//!    `GET /api/v1/jobs?limit=1` says `total` >= `--jobs` (anti-entropy);
//! 3. [`HOLD_JOBS`] jobs of the agent `hold` (`sleep`) are submitted, so that some jobs run;
//! 4. at a follower (a node other than the master of `GET /api/v1/status`), over one
//!    keep-alive connection, `--requests` sequential requests each of
//!    `GET /api/v1/jobs?limit=50`, `?status=failed&limit=50` and `?limit=50&offset=<jobs/2>`
//!    (at most 30 s per figure: a slow binary gets fewer samples);
//! 5. `--sse` SSE clients connect to the follower: `GET /api/v1/events` if it answers 200
//!    (each new client is sent every object once, then changes), else
//!    `GET /api/v1/jobs/{id}/events` of the running `hold` jobs; they are read in background
//!    tasks while step 4 is repeated;
//! 6. `codex_mesh_lease_age_max_ms` of `GET /metrics` (largest time since the newest
//!    quorum-acknowledged heartbeat while leading, since the node started) of every node,
//!    after steps 2, 4 and 5; the store file size and record count of every node.
//!
//! Progress goes to stderr; stdout gets a table and a final JSON line.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "read_bench/load.rs"]
mod load;
#[path = "read_bench/seed.rs"]
mod seed;
#[path = "support/stats.rs"]
mod stats;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use codex_mesh::proto::election::Timing;
use common::{Expect, Mesh, Node, NodeOptions};
use load::{Sampled, StreamFigures, Streams};
use serde_json::{json, Value};
use stats::{millis, Percentiles};

/// Nodes of the mesh.
const NODES: usize = 3;
/// Running jobs during the measurement (their events are the fallback SSE streams).
const HOLD_JOBS: usize = 4;
/// The agent of those jobs.
const HOLD_AGENT: &str = "hold=sleep 300";
/// Give up waiting for the catch-up after this long.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);
/// Poll period of the catch-up.
const CATCH_UP_POLL: Duration = Duration::from_millis(100);
/// Targets printed next to the figures.
const TARGET_LIST_P99_MS: f64 = 20.0;

/// Command-line options.
struct Options {
    jobs: usize,
    sse: usize,
    requests: usize,
    bin: Option<PathBuf>,
    baseline: Option<PathBuf>,
}

/// List latencies at the follower: plain, filtered, deep page.
#[derive(Clone, Copy)]
struct Reads {
    list: Option<Sampled>,
    failed: Option<Sampled>,
    deep: Option<Sampled>,
}

/// Everything measured for one binary.
struct Report {
    bin: PathBuf,
    seed_secs: f64,
    seeded_failed: usize,
    first_ready_ms: f64,
    catch_up_ms: Option<f64>,
    follower: String,
    idle: Reads,
    loaded: Reads,
    streams: StreamFigures,
    /// Largest lease age over the nodes after the catch-up, the idle reads, the loaded reads.
    lease_age_ms: [Option<f64>; 3],
    master_changed: bool,
    store_mib: Vec<(String, f64)>,
    records: Vec<(String, Option<f64>)>,
}

const USAGE: &str = "usage: read_bench [--jobs 20000] [--sse 200] [--requests 2000] \
                     [--bin PATH] [--baseline-bin PATH]";

fn main() -> ExitCode {
    let options = match parse_options(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(msg) => {
            eprintln!("read_bench: {msg}\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    let bin = match options
        .bin
        .clone()
        .map_or_else(common::locate_node_binary, Ok)
    {
        Ok(bin) => bin,
        Err(msg) => {
            eprintln!("read_bench: {msg}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut reports = vec![run(&runtime, &bin, &options)];
    if let Some(baseline) = &options.baseline {
        // The figures so far, in case the baseline's run does not finish.
        eprintln!("{}", to_json(&reports, &options));
        reports.push(run(&runtime, baseline, &options));
    }
    print_table(&reports, &options);
    println!("{}", to_json(&reports, &options));
    ExitCode::SUCCESS
}

fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        jobs: 20_000,
        sse: 200,
        requests: 2_000,
        bin: None,
        baseline: None,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{v}: {e}"));
        match arg.as_str() {
            "--jobs" => options.jobs = number(value()?)?,
            "--sse" => options.sse = number(value()?)?,
            "--requests" => options.requests = number(value()?)?,
            "--bin" => options.bin = Some(PathBuf::from(value()?)),
            "--baseline-bin" => options.baseline = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err("help requested".to_owned()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    for path in options.bin.iter().chain(&options.baseline) {
        if !path.is_file() {
            return Err(format!("{} is not a file", path.display()));
        }
    }
    if options.jobs == 0 || options.requests == 0 {
        return Err("--jobs and --requests must be positive".to_owned());
    }
    Ok(options)
}

fn node_options() -> NodeOptions {
    NodeOptions::with_extra(&["--agent", HOLD_AGENT, "--bwrap", "none"])
}

/// The whole scenario against one binary.
fn run(runtime: &tokio::runtime::Runtime, bin: &Path, options: &Options) -> Report {
    eprintln!("== {}: seeding {} jobs", bin.display(), options.jobs);
    let mut mesh = Mesh::new(bin);
    let seeded = seed::seed_data_dir(&mesh.data_dir("n1"), options.jobs, 1, 0);
    let t0 = Instant::now();
    let first = mesh.spawn_up("n1", &node_options());
    mesh.nodes[first].wait_ready(common::READY_TIMEOUT);
    let first_ready_ms = millis(t0.elapsed());
    // The ticket endpoint answers once the node listens on the mesh.
    let ticket = mesh.nodes[first].ticket();
    let t1 = Instant::now();
    for name in ["n2", "n3"] {
        let i = mesh.spawn_join(name, &ticket, &node_options());
        mesh.nodes[i].wait_ready(common::READY_TIMEOUT);
    }
    let catch_up_ms = wait_catch_up(&mesh, options.jobs, t1);
    let view = mesh.wait_converged(
        &mesh.all(),
        Expect {
            online: NODES,
            voters: Some(NODES),
        },
    );
    let hold = submit_hold_jobs(&mesh.nodes[view.master_index]);
    let lease_after_catch_up = lease_age(&mesh);
    let follower = &mesh.nodes[(0..NODES)
        .rev()
        .find(|&i| i != view.master_index)
        .expect("a follower")];
    eprintln!(
        "== follower {}, master {}",
        follower.name, mesh.nodes[view.master_index].name
    );
    let base = follower.endpoint().url.clone();
    let token = follower.endpoint().token.clone();
    let client = reqwest::Client::new();
    let urls = read_urls(&base, options.jobs);
    eprintln!("== reads, no SSE clients");
    let idle = runtime.block_on(reads(&client, &urls, &token, options.requests));
    let lease_after_idle = lease_age(&mesh);
    eprintln!("== opening {} SSE clients", options.sse);
    let streams = runtime.block_on(Streams::open(&base, &token, options.sse, &hold));
    eprintln!(
        "   {} open ({}), {} failed",
        streams.opened, streams.kind, streams.failed
    );
    eprintln!("== reads with the SSE clients connected");
    let loaded = runtime.block_on(reads(&client, &urls, &token, options.requests));
    let stream_figures = streams.figures();
    let lease_after_load = lease_age(&mesh);
    runtime.block_on(async { streams.close() });
    let master_changed = mesh.nodes[view.master_index]
        .status()
        .map_or(true, |s| !s.is_master || s.epoch != view.epoch);
    for id in &hold {
        let _ =
            mesh.nodes[view.master_index].api("POST", &format!("/api/v1/jobs/{id}/cancel"), None);
    }
    let store_mib = mesh
        .nodes
        .iter()
        .map(|n| {
            let bytes = fs::metadata(n.data_dir().join("state.redb")).map_or(0, |m| m.len());
            (n.name.clone(), bytes as f64 / (1 << 20) as f64)
        })
        .collect();
    let records = mesh
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.metric("codex_mesh_records").ok()))
        .collect();
    thread::sleep(Duration::from_millis(500));
    Report {
        bin: bin.to_owned(),
        seed_secs: seeded.secs,
        seeded_failed: seeded.failed,
        first_ready_ms,
        catch_up_ms,
        follower: follower.name.clone(),
        idle,
        loaded,
        streams: stream_figures,
        lease_age_ms: [lease_after_catch_up, lease_after_idle, lease_after_load],
        master_changed,
        store_mib,
        records,
    }
}

/// The three list URLs: plain, filtered, deep page.
fn read_urls(base: &str, jobs: usize) -> [String; 3] {
    [
        format!("{base}/api/v1/jobs?limit=50"),
        format!("{base}/api/v1/jobs?status=failed&limit=50"),
        format!("{base}/api/v1/jobs?limit=50&offset={}", jobs / 2),
    ]
}

async fn reads(client: &reqwest::Client, urls: &[String; 3], token: &str, n: usize) -> Reads {
    Reads {
        list: load::sample(client, &urls[0], token, n).await,
        failed: load::sample(client, &urls[1], token, n).await,
        deep: load::sample(client, &urls[2], token, n).await,
    }
}

/// Time from `t0` until every node lists `jobs` jobs; `None` on timeout.
fn wait_catch_up(mesh: &Mesh, jobs: usize, t0: Instant) -> Option<f64> {
    let mut last_report = Instant::now();
    loop {
        let totals: Vec<Result<u64, String>> = mesh.nodes.iter().map(Node::jobs_total).collect();
        if totals
            .iter()
            .all(|t| t.as_ref().is_ok_and(|&n| n >= jobs as u64))
        {
            let ms = millis(t0.elapsed());
            eprintln!("   caught up after {ms:.0} ms");
            return Some(ms);
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            eprintln!("   totals {totals:?}");
        }
        if t0.elapsed() >= CATCH_UP_TIMEOUT {
            eprintln!("   no catch-up within {CATCH_UP_TIMEOUT:?}: {totals:?}");
            return None;
        }
        thread::sleep(CATCH_UP_POLL);
    }
}

/// Submits the running jobs; their ids.
fn submit_hold_jobs(node: &Node) -> Vec<String> {
    (0..HOLD_JOBS)
        .filter_map(|i| {
            let body = json!({ "prompt": format!("hold {i}"), "agent": "hold" }).to_string();
            let response = node.api("POST", "/api/v1/jobs", Some(&body)).ok()?;
            let job = common::json_of(response.expect_status(201).ok()?);
            job["id"].as_str().map(str::to_owned)
        })
        .collect()
}

/// Largest `codex_mesh_lease_age_max_ms` over the nodes; `None` if no node has it.
fn lease_age(mesh: &Mesh) -> Option<f64> {
    mesh.nodes
        .iter()
        .filter_map(|n| n.metric("codex_mesh_lease_age_max_ms").ok())
        .reduce(f64::max)
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or("n/a".to_owned(), |v| format!("{v:.digits$}"))
}

fn latency_text(s: Option<Sampled>) -> String {
    s.map_or("n/a".to_owned(), |s| {
        let p = s.latency;
        format!(
            "{:.1} / {:.1} / {:.1} ms ({:.0} KiB, n={})",
            p.p50, p.p99, p.max, s.mean_kib, s.samples
        )
    })
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "n/a",
    }
}

fn print_table(reports: &[Report], options: &Options) {
    let lease = Timing::default().lease_ms as f64;
    let row = |name: &str, cell: &dyn Fn(&Report) -> String| {
        let cells: Vec<String> = reports.iter().map(cell).collect();
        println!("{name:<34} | {}", cells.join(" | "));
    };
    println!();
    println!(
        "{} jobs, {} requests per figure, {} SSE clients; latency p50 / p99 / max (mean body)",
        options.jobs, options.requests, options.sse
    );
    row("binary", &|r| r.bin.display().to_string());
    row("n1 ready after start", &|r| {
        format!("{:.0} ms", r.first_ready_ms)
    });
    row("catch-up of n2, n3", &|r| {
        opt(r.catch_up_ms.map(|m| m / 1000.0), 1) + " s"
    });
    row("follower measured", &|r| r.follower.clone());
    for (name, idle, pick) in [
        ("list ?limit=50", true, 0),
        ("list ?status=failed&limit=50", true, 1),
        ("list deep page (offset jobs/2)", true, 2),
        ("list ?limit=50 with SSE", false, 0),
        ("list ?status=failed with SSE", false, 1),
        ("list deep page with SSE", false, 2),
    ] {
        row(name, &|r| {
            let reads = if idle { r.idle } else { r.loaded };
            latency_text([reads.list, reads.failed, reads.deep][pick])
        });
    }
    row("SSE clients", &|r| {
        let s = &r.streams;
        let path = match s.kind {
            "events" => "/api/v1/events",
            _ => "/api/v1/jobs/{id}/events",
        };
        format!(
            "{} x {path}: {} open at the end, {} failed",
            s.opened, s.still_open, s.failed
        )
    });
    row("SSE received during the reads", &|r| {
        let s = &r.streams;
        format!("{} events, {:.1} MiB in {:.1} s", s.events, s.mib, s.secs)
    });
    row("lease age max: catch-up/idle/load", &|r| {
        let [a, b, c] = r.lease_age_ms;
        format!("{} / {} / {} ms", opt(a, 0), opt(b, 0), opt(c, 0))
    });
    row("master changed during the run", &|r| {
        r.master_changed.to_string()
    });
    row("store file per node", &|r| {
        r.store_mib
            .iter()
            .map(|(n, m)| format!("{n} {m:.1} MiB"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    row("records per node", &|r| {
        r.records
            .iter()
            .map(|(n, c)| format!("{n} {}", opt(*c, 0)))
            .collect::<Vec<_>>()
            .join(", ")
    });
    println!();
    for r in reports {
        let p99 = [r.idle.list, r.loaded.list]
            .iter()
            .map(|s| s.map(|s| s.latency.p99))
            .collect::<Option<Vec<f64>>>()
            .map(|v| v.into_iter().fold(0.0, f64::max));
        let gap = r.lease_age_ms[2];
        println!(
            "{}: list p99 <= {TARGET_LIST_P99_MS} ms: {}; heartbeat gap {} ms < half the lease ({} ms): {}",
            r.bin.display(),
            verdict(p99.map(|p| p <= TARGET_LIST_P99_MS)),
            opt(gap, 0),
            lease / 2.0,
            verdict(gap.map(|g| g < lease / 2.0)),
        );
    }
    println!();
}

fn percentiles_json(s: Option<Sampled>) -> Value {
    s.map_or(Value::Null, |s| {
        let Percentiles { min, p50, p99, max } = s.latency;
        json!({ "min": min, "p50": p50, "p99": p99, "max": max, "mean_kib": s.mean_kib, "samples": s.samples })
    })
}

fn reads_json(r: Reads) -> Value {
    json!({
        "list": percentiles_json(r.list),
        "failed": percentiles_json(r.failed),
        "deep": percentiles_json(r.deep),
    })
}

fn to_json(reports: &[Report], options: &Options) -> Value {
    let results: Vec<Value> = reports
        .iter()
        .map(|r| {
            let s = &r.streams;
            json!({
                "bin": r.bin.display().to_string(),
                "seed_secs": r.seed_secs,
                "seeded_failed": r.seeded_failed,
                "first_ready_ms": r.first_ready_ms,
                "catch_up_ms": r.catch_up_ms,
                "follower": r.follower,
                "reads_ms": reads_json(r.idle),
                "reads_with_sse_ms": reads_json(r.loaded),
                "sse": {
                    "kind": s.kind, "opened": s.opened, "failed": s.failed,
                    "still_open": s.still_open, "events": s.events, "mib": s.mib, "secs": s.secs,
                },
                "lease_age_max_ms": {
                    "after_catch_up": r.lease_age_ms[0],
                    "after_reads": r.lease_age_ms[1],
                    "after_reads_with_sse": r.lease_age_ms[2],
                },
                "master_changed": r.master_changed,
                "store_mib": r.store_mib.iter().map(|(n, m)| json!({ "node": n, "mib": m })).collect::<Vec<_>>(),
                "records": r.records.iter().map(|(n, c)| json!({ "node": n, "records": c })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "bench": "read_bench",
        "jobs": options.jobs,
        "sse": options.sse,
        "requests": options.requests,
        "lease_ms": Timing::default().lease_ms,
        "target_list_p99_ms": TARGET_LIST_P99_MS,
        "results": results,
    })
}
