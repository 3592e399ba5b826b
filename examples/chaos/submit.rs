//! Submissions: a steady rate, random nodes, and a retry on another node with the same
//! `Idempotency-Key` when a submission fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::common::{self, ApiEndpoint};
use crate::http;
use crate::report::Submission;

/// Timeout of one submission request.
pub const SUBMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// A submission is given up after this long.
const SUBMIT_GIVE_UP: Duration = Duration::from_secs(60);
/// Pause between two tries of one submission.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Submits the planned jobs at a steady rate, each to a random live node, retrying a failed
/// submission on another node with the same `Idempotency-Key`.
pub fn submit_all(
    plan: &[(String, String)],
    interval: Duration,
    t0: Instant,
    endpoints: &Mutex<Vec<Option<ApiEndpoint>>>,
    stop: &AtomicBool,
    seed: u64,
) -> Vec<Submission> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(plan.len());
    for (j, (key, body)) in plan.iter().enumerate() {
        if let Some(wait) = (t0 + interval * j as u32).checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        out.push(submit_one(key, body, t0, endpoints, stop, &mut rng));
    }
    out
}

/// One submission, tried until accepted, refused for good, or [`SUBMIT_GIVE_UP`].
fn submit_one(
    key: &str,
    body: &str,
    t0: Instant,
    endpoints: &Mutex<Vec<Option<ApiEndpoint>>>,
    stop: &AtomicBool,
    rng: &mut StdRng,
) -> Submission {
    let mut submission = Submission {
        key: key.to_owned(),
        id: None,
        tries: 0,
        first_error: None,
        done_secs: 0.0,
    };
    let started = Instant::now();
    let mut last_failed: Option<usize> = None;
    while started.elapsed() < SUBMIT_GIVE_UP && !stop.load(Ordering::Relaxed) {
        let live: Vec<(usize, ApiEndpoint)> = endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .enumerate()
            .filter_map(|(i, ep)| ep.clone().map(|ep| (i, ep)))
            .collect();
        let others: Vec<&(usize, ApiEndpoint)> = live
            .iter()
            .filter(|(i, _)| Some(*i) != last_failed)
            .collect();
        let Some((index, ep)) = others.choose(rng).copied().or_else(|| live.choose(rng)) else {
            thread::sleep(RETRY_PAUSE);
            continue;
        };
        submission.tries += 1;
        let headers = [("Idempotency-Key", key)];
        let error = match http::request(
            ep,
            "POST",
            "/api/v1/jobs",
            Some(body),
            &headers,
            SUBMIT_TIMEOUT,
        ) {
            Ok(reply) if reply.status == 201 || reply.status == 200 => {
                match reply
                    .json()
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_owned))
                {
                    Some(id) => {
                        submission.id = Some(id);
                        submission.done_secs = t0.elapsed().as_secs_f64();
                        return submission;
                    }
                    None => format!("no job id in {}", common::truncate(&reply.body, 200)),
                }
            }
            Ok(reply) => {
                let error = format!(
                    "HTTP {}: {}",
                    reply.status,
                    common::truncate(&reply.body, 200)
                );
                if (400..500).contains(&reply.status) && ![408, 409, 429].contains(&reply.status) {
                    submission.first_error.get_or_insert(error);
                    submission.done_secs = t0.elapsed().as_secs_f64();
                    return submission;
                }
                error
            }
            Err(e) => format!("{e}"),
        };
        submission.first_error.get_or_insert(error);
        last_failed = Some(*index);
        thread::sleep(RETRY_PAUSE);
    }
    submission.done_secs = t0.elapsed().as_secs_f64();
    submission
}
