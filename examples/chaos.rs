//! Chaos run: jobs on real `codex-mesh` node processes on loopback while nodes are killed
//! with `kill -9` and restarted.
//!
//! This example does not build the node binary. Build it first, then run:
//!
//! ```text
//! cargo build --release --bin codex-mesh
//! cargo run --release --example chaos -- [--nodes 4] [--jobs 300] [--faults 12] [--seed N]
//!     [--duration SECS] [--drain-secs 180] [--no-bwrap]
//! ```
//!
//! The binary is found like `jobs_bench` finds it (`CODEX_MESH_BIN`, or `target/<profile>/`).
//!
//! 1. `--nodes` nodes (all master-eligible, 2 slots each) with the operator agent `chaos`: a
//!    shell script ([`ledger`]) that appends `start <job> <attempt> <node> <ms>` to a shared
//!    ledger (outside every node's data and work directories), sleeps 0.2 to 2.0 s (the
//!    time is in the prompt, drawn from the seed), appends `end ...` and exits 0. One probe
//!    job per node checks that the agent can write the ledger.
//! 2. `--jobs` submissions at a steady rate over `--duration` seconds to random live nodes,
//!    each with its own `Idempotency-Key`; a submission that fails is retried on another
//!    node with the same key.
//! 3. Meanwhile `--faults` times, at random moments: `kill -9` of one node (a third of the
//!    faults on the current master, per `GET /api/v1/status`), restart after 0.5 to 5 s, then
//!    wait until the mesh has converged again before the next fault: never two nodes down.
//! 4. Then, until `--drain-secs` pass: every node's `GET /api/v1/jobs` until every job is
//!    final on every node and all nodes agree on its status and attempt.
//! 5. A report (text, then one JSON line); the exit code is non-zero if a check failed.
//!    Then the ledger directory is kept, with copies of the node logs.

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "chaos/http.rs"]
mod http;
#[path = "chaos/ledger.rs"]
mod ledger;
#[path = "chaos/report.rs"]
mod report;
#[path = "chaos/submit.rs"]
mod submit;
#[path = "chaos/views.rs"]
mod views;

use std::collections::{BTreeMap, BTreeSet};
use std::env;
use std::fs;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{ApiEndpoint, Expect, Mesh, NodeOptions};
use ledger::Ledger;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use report::{Fault, Outcome};
use serde_json::json;
use submit::{submit_all, SUBMIT_TIMEOUT};
use views::NodeView;

/// Job slots per node.
const SLOTS: &str = "2";
/// Range of the agent's sleep, in ms.
const AGENT_SLEEP_MS: (u64, u64) = (200, 2000);
/// Range of the time a killed node stays down, in ms.
const DOWN_MS: (u64, u64) = (500, 5000);
/// How long submissions may still pick a node after it was killed (they fail to connect
/// and are retried elsewhere with the same key).
const KILL_NOTICE_LAG: Duration = Duration::from_secs(1);
/// Timeout of a status request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the mesh may take to converge after a restart before the run goes on anyway.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a probe job may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two looks at the nodes during the drain.
const DRAIN_POLL: Duration = Duration::from_secs(1);

/// Command-line options.
#[derive(Debug, Clone)]
struct Options {
    nodes: usize,
    jobs: usize,
    faults: usize,
    seed: u64,
    duration_secs: u64,
    drain_secs: u64,
    no_bwrap: bool,
}

const USAGE: &str = "usage: cargo run --release --example chaos -- [--nodes 4] [--jobs 300] \
                     [--faults 12] [--seed N] [--duration SECS] [--drain-secs 180] [--no-bwrap]";

fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut options = Options {
        nodes: 4,
        jobs: 300,
        faults: 12,
        seed,
        duration_secs: 0,
        drain_secs: 180,
        no_bwrap: false,
    };
    while let Some(arg) = args.next() {
        let mut value = || -> Result<u64, String> {
            let v = args.next().ok_or(format!("{arg} needs a value"))?;
            v.parse().map_err(|e| format!("{arg} {v}: {e}"))
        };
        match arg.as_str() {
            "--nodes" => options.nodes = value()? as usize,
            "--jobs" => options.jobs = value()? as usize,
            "--faults" => options.faults = value()? as usize,
            "--seed" => options.seed = value()?,
            "--duration" => options.duration_secs = value()?,
            "--drain-secs" => options.drain_secs = value()?,
            "--no-bwrap" => options.no_bwrap = true,
            "-h" | "--help" => return Err("help requested".to_owned()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(3..=20).contains(&options.nodes) {
        return Err("--nodes must be 3 to 20 (one node down must leave a quorum)".to_owned());
    }
    if options.jobs == 0 || options.jobs > 100_000 || options.faults > 1000 {
        return Err("--jobs must be 1 to 100000, --faults at most 1000".to_owned());
    }
    if options.duration_secs == 0 {
        options.duration_secs = (6 * options.faults as u64).max(30);
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse_options(env::args().skip(1)) {
        Ok(options) => options,
        Err(msg) => {
            eprintln!("chaos: {msg}\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    let bin = match common::locate_node_binary() {
        Ok(bin) => bin,
        Err(msg) => {
            eprintln!("chaos: {msg}");
            return ExitCode::FAILURE;
        }
    };
    let ledger = match Ledger::create() {
        Ok(ledger) => ledger,
        Err(e) => {
            eprintln!("chaos: cannot create the ledger directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "chaos: using {}, seed {}, ledger {}",
        bin.display(),
        options.seed,
        ledger.path().display()
    );
    let outcome = match run(&bin, &options, &ledger) {
        Ok(outcome) => outcome,
        Err(msg) => {
            eprintln!("chaos: {msg}");
            eprintln!(
                "chaos: ledger and node logs kept in {}",
                ledger.keep().display()
            );
            return ExitCode::FAILURE;
        }
    };
    outcome.print_text();
    println!("{}", outcome.to_json());
    if outcome.failed_checks().is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "chaos: ledger and node logs kept in {}",
            ledger.keep().display()
        );
        ExitCode::FAILURE
    }
}

/// Sets the flag when dropped (also while unwinding), so that the submitting thread stops.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The whole run; `Err` if the mesh could not be set up for it.
fn run(bin: &Path, options: &Options, ledger: &Ledger) -> Result<Outcome, String> {
    let n = options.nodes;
    let names: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
    let specs = names
        .iter()
        .map(|name| {
            let mut flags = vec![
                "--slots".to_owned(),
                SLOTS.to_owned(),
                "--agent".to_owned(),
                ledger.agent_flag(name),
            ];
            if options.no_bwrap {
                flags.extend(["--bwrap".to_owned(), "none".to_owned()]);
            }
            (name.clone(), NodeOptions::with_extra(&flags))
        })
        .collect();
    eprintln!("== starting {n} nodes");
    let mut mesh = Mesh::start_with(bin, specs);
    mesh.wait_converged(
        &mesh.all(),
        Expect {
            online: n,
            voters: None,
        },
    );
    let outcome = drive(&mut mesh, &names, options, ledger);
    let keep_logs = outcome
        .as_ref()
        .map_or(true, |o| !o.failed_checks().is_empty());
    if keep_logs {
        for name in &names {
            let from = mesh.root().join(format!("{name}.log"));
            let _ = fs::copy(&from, ledger.dir().join(format!("{name}.log")));
        }
    }
    outcome
}

/// Probes, submissions and faults, drain, evaluation.
fn drive(
    mesh: &mut Mesh,
    names: &[String],
    options: &Options,
    ledger: &Ledger,
) -> Result<Outcome, String> {
    probe_agents(mesh, names, ledger)?;
    let mut rng = StdRng::seed_from_u64(options.seed);
    let plan: Vec<(String, String)> = (0..options.jobs)
        .map(|j| {
            let key = format!("chaos-{}-{j}", options.seed);
            let secs = rng.gen_range(AGENT_SLEEP_MS.0..=AGENT_SLEEP_MS.1) as f64 / 1000.0;
            let body = json!({ "prompt": format!("{secs:.3} {key}"), "agent": "chaos" });
            (key, body.to_string())
        })
        .collect();
    let faults = fault_plan(&mut rng, options);
    let endpoints: Mutex<Vec<Option<ApiEndpoint>>> = Mutex::new(
        mesh.nodes
            .iter()
            .map(|node| Some(node.endpoint().clone()))
            .collect(),
    );
    let stop = AtomicBool::new(false);
    let interval = Duration::from_secs(options.duration_secs) / options.jobs as u32;
    eprintln!(
        "== {} jobs over {} s, {} faults",
        options.jobs,
        options.duration_secs,
        faults.len()
    );
    let t0 = Instant::now();
    let submit_seed = options.seed.wrapping_add(1);
    let (submissions, done_faults) = thread::scope(|scope| {
        let submitter =
            scope.spawn(|| submit_all(&plan, interval, t0, &endpoints, &stop, submit_seed));
        let _stop = StopOnDrop(&stop);
        let done = inject_faults(mesh, &faults, t0, &endpoints, &mut rng);
        let submissions = submitter
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (submissions, done)
    });
    // Both the last submission and the last fault (with its restart) are behind us now.
    let drain_start = Instant::now();
    let run_end_secs = (drain_start - t0).as_secs_f64();
    eprintln!("== waiting until every node agrees that every job is final");
    let submitted: BTreeSet<String> = submissions.iter().filter_map(|s| s.id.clone()).collect();
    let deadline = drain_start + Duration::from_secs(options.drain_secs);
    let mut last_progress = Instant::now();
    let (views, observation, settled_at_secs) = loop {
        let views: Vec<Result<NodeView, String>> = endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|ep| match ep {
                Some(ep) => views::list_jobs(ep),
                None => Err("down".to_owned()),
            })
            .collect();
        let mut ids = submitted.clone();
        for view in views.iter().flatten() {
            ids.extend(run_jobs(view).map(|(id, _)| id.clone()));
        }
        let observation = views::observe(names, &views, &ids);
        if observation.settled() {
            break (views, observation, Some(t0.elapsed().as_secs_f64()));
        }
        if Instant::now() >= deadline {
            break (views, observation, None);
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            eprintln!("   {}", observation.line());
        }
        thread::sleep(DRAIN_POLL);
    };
    let mut finals = BTreeMap::new();
    let mut by_key: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for view in views.iter().flatten() {
        for (id, state) in run_jobs(view) {
            finals.entry(id.clone()).or_insert_with(|| state.clone());
            let key = state.prompt.split(' ').nth(1).unwrap_or_default();
            by_key.entry(key.to_owned()).or_default().insert(id.clone());
        }
    }
    let duplicates = by_key
        .into_iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(key, ids)| (key, ids.into_iter().collect()))
        .collect();
    let (entries, unparsable) = ledger.read()?;
    Ok(Outcome {
        options: json!({
            "nodes": options.nodes,
            "jobs": options.jobs,
            "faults": options.faults,
            "seed": options.seed,
            "duration_secs": options.duration_secs,
            "drain_secs": options.drain_secs,
            "no_bwrap": options.no_bwrap,
        }),
        nodes: options.nodes,
        submissions,
        faults: done_faults,
        observation,
        run_end_secs,
        settled_at_secs,
        drain_deadline_secs: options.drain_secs,
        finals,
        duplicates,
        ledger: ledger::summarize(&entries, unparsable),
    })
}

/// The jobs of this run in a node's view (the probes excluded).
fn run_jobs(view: &NodeView) -> impl Iterator<Item = (&String, &views::JobState)> {
    view.iter().filter(|(_, s)| {
        s.prompt
            .split(' ')
            .nth(1)
            .is_some_and(|k| k.starts_with("chaos-"))
    })
}

/// One probe job on each node: it must succeed and leave a `start` line of that node.
fn probe_agents(mesh: &Mesh, names: &[String], ledger: &Ledger) -> Result<(), String> {
    for (node, name) in mesh.nodes.iter().zip(names) {
        let body = json!({ "prompt": format!("0.2 probe-{name}"), "agent": "chaos", "node": name });
        let ep = node.endpoint();
        let reply = http::request(
            ep,
            "POST",
            "/api/v1/jobs",
            Some(&body.to_string()),
            &[],
            SUBMIT_TIMEOUT,
        )
        .map_err(|e| format!("probe on {name}: POST /api/v1/jobs: {e}"))?;
        let id = reply.json()?["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("probe on {name}: no job id: {}", reply.body))?;
        let started = Instant::now();
        let job = loop {
            let job = http::get_json(ep, &format!("/api/v1/jobs/{id}"), STATUS_TIMEOUT)?;
            if common::job_finished(&job) {
                break job;
            }
            if started.elapsed() > PROBE_TIMEOUT {
                return Err(format!("probe job {id} on {name} not finished: {job}"));
            }
            thread::sleep(Duration::from_millis(100));
        };
        if job["status"] != "succeeded" {
            return Err(format!(
                "probe job {id} on {name} did not succeed (can the agent write {}? if bubblewrap hides it, use --no-bwrap): {job}",
                ledger.path().display()
            ));
        }
        let (entries, _) = ledger.read()?;
        let line = entries.iter().find(|e| e.start && e.node == *name).ok_or_else(|| {
            format!("probe job {id} on {name} succeeded but left no line in the ledger {}; try --no-bwrap", ledger.path().display())
        })?;
        if !line.job_from_env || line.attempt.is_none() {
            eprintln!(
                "chaos: note: {name} gives its agents no CODEX_MESH_JOB_ID/CODEX_MESH_ATTEMPT \
                 (job id from the work directory: {}, attempt: {:?})",
                line.job, line.attempt
            );
        }
    }
    eprintln!("   every node ran the agent, and it can write the ledger");
    Ok(())
}

/// One planned fault: when (after the start), on the master or not, how long down.
struct PlannedFault {
    at: Duration,
    on_master: bool,
    down: Duration,
}

/// Random moments within the submission period; a third of the faults on the master.
fn fault_plan(rng: &mut StdRng, options: &Options) -> Vec<PlannedFault> {
    let span_ms = options.duration_secs * 1000;
    let mut times: Vec<u64> = (0..options.faults)
        .map(|_| rng.gen_range(span_ms / 20..=span_ms * 9 / 10))
        .collect();
    times.sort_unstable();
    let on_master = (options.faults + 1) / 3;
    let mut kinds: Vec<bool> = (0..options.faults).map(|i| i < on_master).collect();
    kinds.shuffle(rng);
    times
        .into_iter()
        .zip(kinds)
        .map(|(at, on_master)| PlannedFault {
            at: Duration::from_millis(at),
            on_master,
            down: Duration::from_millis(rng.gen_range(DOWN_MS.0..=DOWN_MS.1)),
        })
        .collect()
}

/// The current master's index, asking the live nodes in turn.
fn find_master(mesh: &Mesh, endpoints: &Mutex<Vec<Option<ApiEndpoint>>>) -> Option<usize> {
    let live: Vec<ApiEndpoint> = endpoints
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .flatten()
        .cloned()
        .collect();
    live.iter().find_map(|ep| {
        let status = http::get_json(ep, "/api/v1/status", STATUS_TIMEOUT).ok()?;
        mesh.index_of_id(status["master"].as_str()?)
    })
}

/// Runs the faults one after another (each restart waits for the mesh to converge).
fn inject_faults(
    mesh: &mut Mesh,
    plan: &[PlannedFault],
    t0: Instant,
    endpoints: &Mutex<Vec<Option<ApiEndpoint>>>,
    rng: &mut StdRng,
) -> Vec<Fault> {
    let n = mesh.nodes.len();
    let mut done = Vec::with_capacity(plan.len());
    for planned in plan {
        if let Some(wait) = (t0 + planned.at).checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let master = find_master(mesh, endpoints);
        let target = match master {
            Some(m) if planned.on_master => m,
            _ => {
                let others: Vec<usize> = (0..n).filter(|i| Some(*i) != master).collect();
                others.choose(rng).copied().unwrap_or(0)
            }
        };
        let name = mesh.nodes[target].name.clone();
        let at_secs = t0.elapsed().as_secs_f64();
        let on_master = master == Some(target);
        eprintln!(
            "   {at_secs:6.1} s: kill -9 {name}{} for {} ms",
            if on_master { " (master)" } else { "" },
            planned.down.as_millis()
        );
        mesh.nodes[target].kill9();
        let killed = Instant::now();
        // Until the harness "notices", submissions still go there and fail to connect.
        thread::sleep(KILL_NOTICE_LAG.min(planned.down));
        endpoints.lock().unwrap_or_else(PoisonError::into_inner)[target] = None;
        thread::sleep(planned.down.saturating_sub(KILL_NOTICE_LAG));
        let endpoint = mesh.nodes[target].restart().endpoint().clone();
        endpoints.lock().unwrap_or_else(PoisonError::into_inner)[target] = Some(endpoint);
        let back_ms = killed.elapsed().as_millis() as u64;
        let settled = wait_settled(mesh, n);
        if !settled {
            eprintln!(
                "   the mesh did not converge within {SETTLE_TIMEOUT:?} after restarting {name}"
            );
        }
        done.push(Fault {
            at_secs,
            node: name,
            on_master,
            down_ms: planned.down.as_millis() as u64,
            back_ms,
            settled,
        });
    }
    done
}

/// Waits (up to [`SETTLE_TIMEOUT`]) until all nodes see all online and agree on a master.
fn wait_settled(mesh: &Mesh, n: usize) -> bool {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let expect = Expect {
        online: n,
        voters: None,
    };
    while Instant::now() < deadline {
        if mesh.check_converged(&mesh.all(), expect).is_ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    false
}
