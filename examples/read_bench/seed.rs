//! Finished job records written straight into a node's store before it starts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use codex_mesh::proto::attempts::{AttemptRecord, Attempts};
use codex_mesh::proto::crdt::{MaxReg, Stamp};
use codex_mesh::proto::hlc::Hlc;
use codex_mesh::proto::ids::ulid;
use codex_mesh::proto::jobs::{
    Assignment, CommandRun, FileDiff, JobRecord, JobResult, JobSpec, JobStatus, Origin, Progress,
    RepoDiff, RepoSpec, Sandbox, Target, Usage,
};
use codex_mesh::proto::records::{Key, Record};
use codex_mesh::store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Records written per store transaction.
const BATCH: usize = 1000;
/// How far back the submission times reach.
const SPREAD_MS: u64 = 6 * 7 * 24 * 3600 * 1000;
/// Nodes the seeded jobs ran on (ids that look like peer ids).
const FAKE_NODES: usize = 8;

const REPOS: [&str; 6] = [
    "acme/web",
    "acme/api",
    "acme/billing",
    "acme/mobile",
    "tools/infra",
    "tools/docs",
];
const FILES: [&str; 8] = [
    "src/main.rs",
    "src/lib.rs",
    "src/http/routes.rs",
    "README.md",
    "tests/api.rs",
    "web/app.tsx",
    "Cargo.toml",
    "docs/guide.md",
];
const COMMANDS: [&str; 6] = [
    "cargo test --workspace",
    "rg -n TODO src",
    "git diff --stat",
    "npm run lint",
    "sed -n 1,120p src/lib.rs",
    "cargo clippy --all-targets",
];
const WORDS: [&str; 12] = [
    "updated", "the", "handler", "so", "that", "requests", "with", "an", "empty", "body", "are",
    "refused",
];

/// What was written.
pub struct Seeded {
    pub jobs: usize,
    pub failed: usize,
    pub store_bytes: u64,
    pub secs: f64,
}

/// Seeds the store of a node that has not started yet (`data_dir` is created if missing)
/// with [`seed_store`], prints what was written, and panics if it cannot.
pub fn seed_data_dir(data_dir: &Path, jobs: usize, seed: u64, min_age_ms: u64) -> Seeded {
    std::fs::create_dir_all(data_dir).expect("create the node's data dir");
    let seeded = seed_store(&data_dir.join("state.redb"), jobs, seed, min_age_ms)
        .unwrap_or_else(|e| panic!("seed the store: {e}"));
    eprintln!(
        "   {} jobs ({} failed) in {:.1} s, {:.1} MiB",
        seeded.jobs,
        seeded.failed,
        seeded.secs,
        seeded.store_bytes as f64 / (1 << 20) as f64
    );
    seeded
}

/// Writes `jobs` finished job records into the store at `path` (created if missing), each
/// submitted at least `min_age_ms` ago and at most six weeks before that.
pub fn seed_store(path: &Path, jobs: usize, seed: u64, min_age_ms: u64) -> Result<Seeded, String> {
    let started = std::time::Instant::now();
    let store = Store::open(path).map_err(|e| e.to_string())?;
    let mut rng = StdRng::seed_from_u64(seed);
    let nodes: Vec<String> = (0..FAKE_NODES).map(|_| fake_node_id(&mut rng)).collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut failed = 0;
    let mut written = 0;
    while written < jobs {
        let n = BATCH.min(jobs - written);
        let batch: Vec<(String, Record)> = (0..n)
            .map(|i| {
                let record = job_record(&mut rng, &nodes, now - min_age_ms, (written + i) as u64);
                if record.progress.0.status == JobStatus::Failed {
                    failed += 1;
                }
                let key = Key::Job(record.spec.id.clone());
                let record = Record::Job(Box::new(record));
                record.validate(&key).map_err(|e| e.to_string())?;
                Ok((key.encode(), record))
            })
            .collect::<Result<_, String>>()?;
        let refs: Vec<(&str, &Record)> = batch.iter().map(|(k, r)| (k.as_str(), r)).collect();
        store.put_records(&refs).map_err(|e| e.to_string())?;
        written += n;
    }
    let store_bytes = store.size_bytes();
    Ok(Seeded {
        jobs,
        failed,
        store_bytes,
        secs: started.elapsed().as_secs_f64(),
    })
}

fn fake_node_id(rng: &mut StdRng) -> String {
    const B58: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let tail: String = (0..44)
        .map(|_| B58[rng.gen_range(0..B58.len())] as char)
        .collect();
    format!("12D3KooW{tail}")
}

/// Status mix: mostly succeeded, some failed, few of the rest.
fn pick_status(rng: &mut StdRng) -> JobStatus {
    match rng.gen_range(0..100) {
        0..=77 => JobStatus::Succeeded,
        78..=89 => JobStatus::Failed,
        90..=94 => JobStatus::Cancelled,
        95..=97 => JobStatus::TimedOut,
        _ => JobStatus::Lost,
    }
}

fn sentence(rng: &mut StdRng, bytes: std::ops::Range<usize>) -> String {
    let bytes = rng.gen_range(bytes);
    let mut text = String::with_capacity(bytes + 16);
    while text.len() < bytes {
        text.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
        text.push(if rng.gen_ratio(1, 12) { '\n' } else { ' ' });
    }
    text
}

fn job_record(rng: &mut StdRng, nodes: &[String], now: u64, seq: u64) -> JobRecord {
    let submitted = now - rng.gen_range(60_000..SPREAD_MS);
    let id = ulid(submitted, rng.gen());
    let node = nodes[rng.gen_range(0..nodes.len())].clone();
    let via = nodes[rng.gen_range(0..nodes.len())].clone();
    let status = pick_status(rng);
    let repo_count = rng.gen_range(1..=2);
    let repos: Vec<RepoSpec> = (0..repo_count)
        .map(|_| RepoSpec {
            source: REPOS[rng.gen_range(0..REPOS.len())].to_string(),
            branch: rng.gen_ratio(1, 3).then(|| "main".to_string()),
        })
        .collect();
    let prepare_ms = rng.gen_range(20..900);
    let duration_ms = prepare_ms + rng.gen_range(5_000..1_200_000);
    let started = submitted + rng.gen_range(5..2_000);
    let ended = started + duration_ms;
    let reason = match status {
        JobStatus::Failed => Some("the agent exited with code 1".to_string()),
        JobStatus::Cancelled => Some("cancelled by a user".to_string()),
        JobStatus::TimedOut => Some("no output for 600 s".to_string()),
        JobStatus::Lost => Some("its node went offline".to_string()),
        _ => None,
    };
    let result = (status != JobStatus::Lost).then(|| JobResult {
        exit_code: Some(if status == JobStatus::Succeeded { 0 } else { 1 }),
        final_message: Some(sentence(rng, 1_500..4_000)),
        diffs: repos
            .iter()
            .map(|r| RepoDiff {
                source: r.source.clone(),
                files: (0..rng.gen_range(1..8))
                    .map(|_| FileDiff {
                        path: FILES[rng.gen_range(0..FILES.len())].to_string(),
                        added: rng.gen_range(0..200),
                        removed: rng.gen_range(0..80),
                    })
                    .collect(),
            })
            .collect(),
        usage: Some(Usage {
            input_tokens: rng.gen_range(5_000..400_000),
            cached_input_tokens: rng.gen_range(0..200_000),
            output_tokens: rng.gen_range(500..40_000),
        }),
        duration_ms,
        commands: (0..rng.gen_range(3..15))
            .map(|_| CommandRun {
                command: COMMANDS[rng.gen_range(0..COMMANDS.len())].to_string(),
                exit_code: Some(rng.gen_range(0..2)),
            })
            .collect(),
        prepare_ms,
    });
    // Peers refuse assignments from epochs their election has not reached: a fresh mesh is
    // in epoch 1.
    let epoch = 1;
    let stamp = Stamp {
        at: Hlc {
            wall_ms: ended,
            logical: 0,
        },
        by: node.clone(),
    };
    let attempt = AttemptRecord {
        node: Some(node.clone()),
        status,
        reason: reason.clone(),
        started_at_ms: Some(started),
        ended_at_ms: Some(ended),
        stamp: stamp.clone(),
    };
    // A job stays lost only once its requeue (one by default) was lost too: a lost job is on
    // its second attempt, so that the master does not queue it again.
    let number = if status == JobStatus::Lost { 2 } else { 1 };
    let mut attempts = BTreeMap::new();
    if number == 2 {
        let mut first = attempt.clone();
        first.started_at_ms = Some(submitted);
        first.ended_at_ms = Some(started);
        first.stamp.at.wall_ms = started;
        attempts.insert(1, MaxReg(first));
    }
    attempts.insert(number, MaxReg(attempt));
    JobRecord {
        compacted: false,
        spec: JobSpec {
            id: id.clone(),
            target: if rng.gen_ratio(1, 4) {
                Target::Tag("gpu".to_string())
            } else {
                Target::Any
            },
            repos,
            prompt: format!("Task {seq}: {}", sentence(rng, 80..600)),
            agent: "codex".to_string(),
            model: rng.gen_ratio(1, 2).then(|| "gpt-5-codex".to_string()),
            sandbox: Sandbox::WorkspaceWrite,
            timeout_secs: 3600,
            idle_timeout_secs: 600,
            origin: Origin {
                kind: "api".to_string(),
                reply_to: None,
                user: None,
            },
            submitted_via: via,
            submitted_at_ms: submitted,
            idempotency_key: None,
            extra: Default::default(),
        },
        assignment: Some(MaxReg(Assignment {
            epoch,
            seq,
            attempt: number,
            node,
        })),
        progress: MaxReg(Progress {
            attempt: number,
            assignment: (epoch, seq),
            status,
            reason,
            result,
            stamp,
        }),
        attempts: Attempts(attempts),
        extra: Default::default(),
    }
}
