use std::path::{Path, PathBuf};

use super::*;
use crate::runner::leftovers::{run_path, write_json, RepoRecord, RUN_ENV};
use crate::runner::testing::{entry_names, git};

struct Dirs {
    _root: tempfile::TempDir,
    runs: PathBuf,
    logs: PathBuf,
    work: PathBuf,
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().unwrap();
    let (runs, logs, work) = (
        root.path().join("runs"),
        root.path().join("logs"),
        root.path().join("work"),
    );
    for dir in [&runs, &logs, &work] {
        std::fs::create_dir_all(dir).unwrap();
    }
    Dirs {
        _root: root,
        runs,
        logs,
        work,
    }
}

fn record(job: &str, work: &Path) -> RunRecord {
    RunRecord {
        job: job.into(),
        attempt: 2,
        assignment: (3, 4),
        token: leftovers::new_token(),
        boot_id: leftovers::boot_id(),
        started_unix_ms: 1_000,
        workdir: work.to_path_buf(),
        repos: Vec::new(),
        codex: false,
        last_message_file: None,
        pgid: None,
        prepare_ms: 7,
        log_offset: 0,
    }
}

fn exited(code: Option<i32>) -> ExitRecord {
    ExitRecord {
        code,
        signal: code.is_none().then_some(libc::SIGKILL),
        ended_unix_ms: 4_500,
        stopped: None,
    }
}

fn save(dirs: &Dirs, run: &RunRecord, exit: Option<&ExitRecord>) {
    write_json(&run_path(&dirs.runs, &run.job), run).unwrap();
    if let Some(exit) = exit {
        write_json(&exit_path(&dirs.runs, &run.job), exit).unwrap();
    }
}

fn recover_all(dirs: &Dirs) -> Vec<Recovered> {
    recover_in(&dirs.runs, &dirs.logs, 1 << 20)
}

fn only(mut recovered: Vec<Recovered>) -> Recovered {
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    recovered.remove(0)
}

#[test]
fn an_exited_agent_gets_its_result_from_the_log_of_its_own_run() {
    let dirs = dirs();
    let mut run = record("j1", &dirs.work);
    let earlier = b"from the first attempt\n".to_vec();
    run.log_offset = earlier.len() as u64;
    let mut log = earlier;
    log.extend_from_slice(b"working\n[stderr] a warning\nall done\r\n\n[stderr] bye\n");
    std::fs::write(dirs.logs.join("j1.log"), log).unwrap();
    save(&dirs, &run, Some(&exited(Some(0))));

    let recovered = only(recover_all(&dirs));
    assert_eq!(
        (
            recovered.id.as_str(),
            recovered.attempt,
            recovered.assignment
        ),
        ("j1", 2, (3, 4))
    );
    let (status, reason, result) = recovered.outcome.expect("an outcome");
    assert_eq!(status, JobStatus::Succeeded);
    assert_eq!(reason.as_deref(), Some(RECOVERED));
    assert_eq!(result.final_message.as_deref(), Some("all done"));
    assert_eq!(result.exit_code, Some(0));
    assert_eq!(result.duration_ms, 3_500);
    assert_eq!(result.prepare_ms, 7);
}

#[test]
fn a_failed_or_killed_agent_keeps_its_reason_and_the_log_note() {
    let dirs = dirs();
    let failed = record("j1", &dirs.work);
    save(&dirs, &failed, Some(&exited(Some(3))));
    let killed = record("j2", &dirs.work);
    std::fs::write(
        dirs.logs.join("j2.log"),
        "out\n\n[codex-mesh] output beyond 1 MiB was dropped (the node's --max-log-mb)\n",
    )
    .unwrap();
    save(&dirs, &killed, Some(&exited(None)));
    let mut cancelled = record("j3", &dirs.work);
    cancelled.last_message_file = Some(dirs.work.join("none"));
    let mut stop = exited(None);
    stop.stopped = Some((JobStatus::Cancelled, "cancelled".into()));
    save(&dirs, &cancelled, Some(&stop));

    let outcomes: Vec<_> = recover_all(&dirs)
        .into_iter()
        .map(|r| r.outcome.expect("an outcome"))
        .collect();
    assert_eq!(outcomes.len(), 3);
    assert_eq!(outcomes[0].0, JobStatus::Failed);
    assert_eq!(
        outcomes[0].1.as_deref(),
        Some("the agent exited with code 3; recovered after the node restarted")
    );
    assert_eq!(outcomes[0].2.exit_code, Some(3));
    assert_eq!(outcomes[1].0, JobStatus::Failed);
    let reason = outcomes[1].1.clone().unwrap_or_default();
    assert!(
        reason.starts_with(
            "the agent was killed by a signal; the log is incomplete: output beyond 1 MiB"
        ) && reason.ends_with(RECOVERED),
        "{reason}"
    );
    assert_eq!(outcomes[1].2.final_message.as_deref(), Some("out"));
    assert_eq!(outcomes[2].0, JobStatus::Cancelled);
    assert_eq!(
        outcomes[2].1.as_deref(),
        Some("cancelled; recovered after the node restarted")
    );
}

#[test]
fn codex_events_are_replayed_and_the_last_message_file_wins() {
    let dirs = dirs();
    let events = [
        r#"{"type":"item.completed","item":{"type":"command_execution","command":"ls","exit_code":0}}"#,
        r#"{"type":"item.completed","item":{"type":"agent_message","text":"from the events"}}"#,
        r#"{"type":"turn.completed","usage":{"input_tokens":10,"output_tokens":5}}"#,
        "not json",
    ];
    for job in ["j1", "j2", "j3"] {
        std::fs::write(dirs.logs.join(format!("{job}.log")), events.join("\n")).unwrap();
    }
    let message = dirs.work.join("last.txt");
    std::fs::write(&message, "from the file\n").unwrap();
    let link = dirs.work.join("link.txt");
    std::os::unix::fs::symlink(&message, &link).unwrap();
    for (job, file) in [("j1", Some(&message)), ("j2", Some(&link)), ("j3", None)] {
        let mut run = record(job, &dirs.work);
        run.codex = true;
        run.last_message_file = file.cloned();
        save(&dirs, &run, Some(&exited(Some(0))));
    }

    let results: Vec<_> = recover_all(&dirs)
        .into_iter()
        .map(|r| r.outcome.expect("an outcome").2)
        .collect();
    assert_eq!(results[0].final_message.as_deref(), Some("from the file\n"));
    assert_eq!(
        results[1].final_message.as_deref(),
        Some("from the events"),
        "a symbolic link is not followed"
    );
    assert_eq!(results[2].final_message.as_deref(), Some("from the events"));
    let result = &results[2];
    assert_eq!(result.commands.len(), 1);
    assert_eq!(result.commands[0].command, "ls");
    let usage = result.usage.clone().expect("usage");
    assert_eq!((usage.input_tokens, usage.output_tokens), (10, 5));
}

#[test]
fn diffs_are_computed_again_from_the_recorded_checkouts() {
    let dirs = dirs();
    let repo = dirs.work.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    std::fs::write(repo.join("a.txt"), "one\n").unwrap();
    git(&repo, &["add", "a.txt"]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    std::fs::write(repo.join("a.txt"), "two\n").unwrap();
    let mut run = record("j1", &dirs.work);
    run.repos = vec![RepoRecord {
        source: "o/r".into(),
        dir: repo,
    }];
    save(&dirs, &run, Some(&exited(Some(0))));

    let (_, _, result) = only(recover_all(&dirs)).outcome.expect("an outcome");
    assert_eq!(result.diffs.len(), 1);
    assert_eq!(result.diffs[0].source, "o/r");
    assert_eq!(result.diffs[0].files.len(), 1, "{:?}", result.diffs);
}

#[test]
fn a_run_without_exit_has_no_outcome_and_recovering_twice_changes_nothing() {
    let dirs = dirs();
    save(&dirs, &record("j1", &dirs.work), None);
    save(&dirs, &record("j2", &dirs.work), Some(&exited(Some(0))));
    let first = recover_all(&dirs);
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].outcome, None);
    assert!(first[1].outcome.is_some());
    assert_eq!(recover_all(&dirs), first);
    assert_eq!(
        entry_names(&dirs.runs),
        vec!["j1.run", "j2.exit", "j2.run"],
        "the records stay for the mesh to forget"
    );
}

#[test]
fn bad_records_are_removed_and_never_stop_the_rest() {
    let dirs = dirs();
    std::fs::write(dirs.runs.join("bad.run"), "{not json").unwrap();
    std::fs::write(dirs.runs.join("bad.exit"), "{}").unwrap();
    save(&dirs, &record("other", &dirs.work), None);
    std::fs::copy(run_path(&dirs.runs, "other"), dirs.runs.join("renamed.run")).unwrap();
    std::fs::write(dirs.runs.join("orphan.exit"), "{}").unwrap();
    std::fs::write(dirs.runs.join("half.run.tmp"), "{").unwrap();
    save(&dirs, &record("good", &dirs.work), None);
    std::fs::write(exit_path(&dirs.runs, "good"), "garbage").unwrap();

    let recovered = recover_all(&dirs);
    let ids: Vec<_> = recovered.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, vec!["good", "other"]);
    assert!(recovered.iter().all(|r| r.outcome.is_none()));
    assert_eq!(
        entry_names(&dirs.runs),
        vec!["good.exit", "good.run", "other.run"]
    );
}

#[test]
fn leftover_processes_of_a_run_are_killed_with_their_group() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let dirs = dirs();
    let mut run = record("j1", &dirs.work);
    let mut with_token = std::process::Command::new("sleep")
        .arg("300")
        .env(RUN_ENV, &run.token)
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = i32::try_from(with_token.id()).unwrap();
    // Same group, no token (it cleared its environment): reached through the group.
    let mut in_group = std::process::Command::new("sleep")
        .arg("300")
        .env_clear()
        .process_group(pgid)
        .spawn()
        .unwrap();
    run.pgid = Some(pgid);
    save(&dirs, &run, None);

    let recovered = only(recover_all(&dirs));
    assert_eq!(recovered.outcome, None);
    for child in [&mut with_token, &mut in_group] {
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
