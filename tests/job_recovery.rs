//! A node killed with `kill -9` takes its agents with it, a restarted node kills what is left
//! of their runs, and a result the agent produced just before the node died is reported after
//! the restart.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{job_finished, poll, submit_job, wait_job, Mesh, NodeOptions};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
const WAIT: Duration = Duration::from_secs(45);

/// One node with the given agents, run without bubblewrap (so that the pids the agents print
/// are this system's), its work directories under a temp dir.
fn single(agents: &[String], flags: &[&str]) -> Mesh {
    single_with(agents, flags, true)
}

/// Like [`single`]; `no_bwrap` false leaves the node its default isolation.
fn single_with(agents: &[String], flags: &[&str], no_bwrap: bool) -> Mesh {
    let mut extra: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    for agent in agents {
        extra.extend(["--agent".to_string(), agent.clone()]);
    }
    let workdirs = tempfile::tempdir().expect("temp dir").keep();
    extra.extend(["--workdir-root".to_string(), workdirs.display().to_string()]);
    if no_bwrap {
        extra.extend(["--bwrap".to_string(), "none".to_string()]);
    }
    Mesh::start_with(
        BIN,
        vec![("n1".to_string(), NodeOptions::with_extra(&extra))],
    )
}

/// Whether process `pid` still runs (a zombie waiting to be reaped does not).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

/// The processes whose environment says they run job `id`.
fn processes_of_job(id: &str) -> Vec<u32> {
    let wanted = format!("CODEX_MESH_JOB_ID={id}").into_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            environ
                .split(|&b| b == 0)
                .any(|var| var == wanted)
                .then_some(pid)
        })
        .filter(|&pid| alive(pid))
        .collect()
}

/// Kills the processes that are still alive when a test ends, failed or not.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            match i32::try_from(pid) {
                // SAFETY: kill only sends a signal.
                Ok(raw) if alive(pid) => unsafe {
                    libc::kill(raw, libc::SIGKILL);
                },
                _ => {}
            }
        }
    }
}

/// The pid printed after `label` on a line of its own in `log`.
fn pid_after(log: &str, label: &str) -> Option<u32> {
    log.lines()
        .find_map(|line| line.strip_prefix(label)?.trim().parse().ok())
}

fn job_log(data_dir: &Path, id: &str) -> String {
    std::fs::read_to_string(data_dir.join("job-logs").join(format!("{id}.log"))).unwrap_or_default()
}

/// Write the script of an agent that prints its pid, starts a process in a session of its
/// own that prints its pid too, and waits.
fn leaving_agent(dir: &Path) -> std::path::PathBuf {
    let script = dir.join("leave.sh");
    std::fs::write(
        &script,
        "echo \"agent $$\"\n\
         setsid sh -c 'echo \"escaped $$\"; exec sleep 300' &\n\
         exec sleep 300\n",
    )
    .expect("write the agent script");
    script
}

/// The pids of the agent and of its escaped process, once both are in the job log.
fn agent_pids(data_dir: &Path, id: &str) -> (u32, u32) {
    poll(WAIT, "both pids in the job log", || {
        let log = job_log(data_dir, id);
        match (pid_after(&log, "agent "), pid_after(&log, "escaped ")) {
            (Some(agent), Some(escaped)) => Ok((agent, escaped)),
            _ => Err(log),
        }
    })
}

fn wait_gone(pid: u32, what: &str) {
    poll(WAIT, what, || {
        if alive(pid) {
            Err(format!("process {pid} still runs"))
        } else {
            Ok(())
        }
    });
}

#[test]
fn a_cancelled_run_leaves_no_process_behind() {
    let scripts = tempfile::tempdir().expect("temp dir");
    let script = leaving_agent(scripts.path());
    let mesh = single(&[format!("leave=sh {}", script.display())], &[]);
    let node = &mesh.nodes[0];
    let id = submit_job(node, json!({"prompt": "x", "agent": "leave"}));
    let (agent, escaped) = agent_pids(node.data_dir(), &id);
    let _cleanup = KillOnDrop(vec![agent, escaped]);
    node.api_ok("POST", &format!("/api/v1/jobs/{id}/cancel"), None);
    let job = wait_job(node, &id, "the job to be cancelled", job_finished);
    assert_eq!(job["status"], "cancelled", "{job}");
    wait_gone(agent, "the agent to be killed");
    wait_gone(escaped, "the escaped process to be killed by its token");
}

#[test]
fn agents_die_with_a_killed_node() {
    let scripts = tempfile::tempdir().expect("temp dir");
    let script = leaving_agent(scripts.path());
    // Not queued again after the restart: no second run to clean up.
    let mut mesh = single(
        &[format!("leave=sh {}", script.display())],
        &["--lost-requeues", "0"],
    );
    let node = &mut mesh.nodes[0];
    let id = submit_job(node, json!({"prompt": "x", "agent": "leave"}));
    let (agent, escaped) = agent_pids(node.data_dir(), &id);
    let _cleanup = KillOnDrop(vec![agent, escaped]);
    assert!(alive(agent) && alive(escaped));

    node.kill9();
    wait_gone(agent, "the agent to die with its node");
    assert!(
        alive(escaped),
        "a process in a session of its own is out of the agent's reach until the restart"
    );

    node.restart();
    wait_gone(escaped, "the restarted node to kill the escaped process");
}

#[test]
fn a_result_recorded_just_before_the_node_died_is_reported_after_restart() {
    let mut mesh = single(
        &["last=sh -c 'echo working; echo the final word'".to_string()],
        &[],
    );
    let node = &mut mesh.nodes[0];
    node.kill9();
    node.set_envs(vec![(
        "CODEX_MESH_FAULTS".to_string(),
        "agent-exited".to_string(),
    )]);
    node.restart();
    let id = submit_job(node, json!({"prompt": "x", "agent": "last"}));
    poll(
        WAIT,
        "the node to crash at the fault point",
        || match node.try_wait() {
            Some(_) => Ok(()),
            None => Err("still running".to_string()),
        },
    );
    let runs = node.data_dir().join("runs");
    assert!(
        runs.join(format!("{id}.exit")).is_file(),
        "the exit was recorded before the crash"
    );

    node.set_envs(Vec::new());
    node.restart();
    let job = wait_job(node, &id, "the recovered result", job_finished);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["final_message"], "the final word", "{job}");
    assert_eq!(job["result"]["exit_code"], 0, "{job}");
    poll(WAIT, "the run records to be forgotten", || {
        let left: Vec<_> = std::fs::read_dir(&runs)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
}

#[test]
fn agents_in_the_default_isolation_die_with_a_killed_node() {
    // Bubblewrap when this system has it; its pid namespace hides the agent's own pid, so the
    // agent's processes are found by their job id.
    let mut mesh = single_with(
        &["wait=sh -c 'echo started; exec sleep 300'".to_string()],
        &[],
        false,
    );
    let node = &mut mesh.nodes[0];
    let id = submit_job(node, json!({"prompt": "x", "agent": "wait"}));
    let data_dir = node.data_dir().to_path_buf();
    poll(WAIT, "the agent to start", || {
        let log = job_log(&data_dir, &id);
        if log.contains("started") {
            Ok(())
        } else {
            Err(log)
        }
    });
    let pids = processes_of_job(&id);
    assert!(!pids.is_empty(), "the agent carries its job id");
    let _cleanup = KillOnDrop(pids.clone());

    node.kill9();
    poll(WAIT, "the agent's processes to die with their node", || {
        let left: Vec<_> = pids.iter().filter(|&&pid| alive(pid)).collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?} still run"))
        }
    });
}
