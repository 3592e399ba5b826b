//! Hostile agent output on a real node: invalid UTF-8 does not stop the reader (the rest of
//! the output is logged and the last line is the final message), and a single huge line
//! neither grows the node's memory with the line nor the log past `--max-log-mb`.

mod common;

use std::time::Instant;

use common::{job_finished, submit_job, wait_job, Mesh, Node, NodeOptions};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
/// The one huge line's size.
const HUGE_LINE_BYTES: u64 = 200_000_000;
/// The log limit the node is given.
const MAX_LOG_MB: u64 = 8;
/// A generous bound on the node's peak memory while it reads the huge line.
const MAX_NODE_RSS_KB: u64 = 150 * 1024;

fn single(agents: &[&str], extra: &[&str]) -> Mesh {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for agent in agents {
        args.extend(["--agent".to_string(), agent.to_string()]);
    }
    Mesh::start_with(
        BIN,
        vec![("n1".to_string(), NodeOptions::with_extra(&args))],
    )
}

fn job_log(node: &Node, id: &str) -> Vec<u8> {
    std::fs::read(node.data_dir().join("job-logs").join(format!("{id}.log"))).expect("job log")
}

fn position(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`).
fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

#[test]
fn output_after_invalid_utf8_is_kept_in_the_log_and_the_result() {
    let mesh = single(
        &["bad=sh -c \"echo before; printf '\\377\\376 broken\\n'; printf '\\377 on stderr\\n' >&2; echo after; echo the end\""],
        &[],
    );
    let node = &mesh.nodes[0];
    let id = submit_job(node, json!({"prompt": "x", "agent": "bad"}));
    let job = wait_job(node, &id, "job to finish", job_finished);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["final_message"], "the end", "{job}");
    assert!(job["reason"].is_null(), "{job}");
    let log = job_log(node, &id);
    let shown = |line: &[u8]| {
        position(&log, line).unwrap_or_else(|| {
            panic!(
                "{:?} in {:?}",
                String::from_utf8_lossy(line),
                String::from_utf8_lossy(&log)
            )
        })
    };
    // Raw bytes, stdout in order (stderr may come between its lines).
    assert!(shown(b"before\n") < shown(b"\n\xff\xfe broken\n"));
    assert!(shown(b"\n\xff\xfe broken\n") < shown(b"\nafter\n"));
    assert!(shown(b"\nafter\n") < shown(b"\nthe end\n"));
    shown(b"[stderr] \xff on stderr\n");
}

#[test]
fn a_huge_line_is_capped_in_the_log_and_does_not_grow_the_node() {
    let max_log = MAX_LOG_MB.to_string();
    let mut mesh = single(
        &[&format!(
            "huge=sh -c \"echo start; head -c {HUGE_LINE_BYTES} /dev/zero | tr '\\\\000' x; echo; echo done\""
        )],
        &["--max-log-mb", &max_log],
    );
    let pid = mesh.nodes[0].pid();
    let before_kb = proc_status_kb(pid, "VmHWM");
    let started = Instant::now();
    let node = &mesh.nodes[0];
    let id = submit_job(node, json!({"prompt": "x", "agent": "huge"}));
    let job = wait_job(node, &id, "job to finish", job_finished);
    let elapsed = started.elapsed();
    let peak_kb = proc_status_kb(pid, "VmHWM");
    let rss_kb = proc_status_kb(pid, "VmRSS");
    eprintln!(
        "huge line of {HUGE_LINE_BYTES} bytes: node VmHWM {before_kb} kB before, {peak_kb} kB after, VmRSS {rss_kb} kB, job took {elapsed:?}"
    );
    assert!(mesh.nodes[0].is_running(), "the node is still up");
    let node = &mesh.nodes[0];
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["final_message"], "done", "{job}");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("output beyond {MAX_LOG_MB} MiB was dropped")),
        "{job}"
    );
    assert!(
        peak_kb < MAX_NODE_RSS_KB,
        "the node's peak RSS was {peak_kb} kB for a line of {HUGE_LINE_BYTES} bytes"
    );

    let log = job_log(node, &id);
    assert!(
        log.len() as u64 <= MAX_LOG_MB << 20,
        "log of {} bytes",
        log.len()
    );
    assert!(
        log.len() as u64 > (MAX_LOG_MB << 20) - 1024,
        "log of {} bytes",
        log.len()
    );
    assert!(
        log.starts_with(b"start\nxxxx"),
        "the huge line is logged raw"
    );
    let text = String::from_utf8_lossy(&log[log.len() - 200..]).into_owned();
    assert!(
        text.ends_with(&format!(
            "\n[codex-mesh] output beyond {MAX_LOG_MB} MiB was dropped (the node's --max-log-mb)\n"
        )),
        "{text}"
    );
    assert!(
        position(&log, b"done").is_none(),
        "output after the limit is not logged"
    );
    // The node still answers.
    let health = node.api_ok("GET", "/api/v1/health", None);
    assert!(health.body.contains("\"ok\":true"), "{}", health.body);
}

#[test]
fn the_log_limit_must_be_at_least_one_mib() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("n1").display().to_string();
    let out = common::run_cli(
        std::path::Path::new(BIN),
        &["up", "--data-dir", &data, "--max-log-mb", "0"],
        common::CLI_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--max-log-mb"), "{stderr}");
}
