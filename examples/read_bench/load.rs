//! The measuring client (one keep-alive connection, sequential requests) and the SSE
//! clients held open in background tasks.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Client;
use tokio::task::JoinHandle;

use crate::stats::{millis, percentiles, Percentiles};

/// Requests before the measured ones (connection set up, caches warm).
const WARMUP: usize = 20;
/// Give up on one measured request after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most time spent on one figure: a slow binary gets fewer samples instead of an hour-long run.
pub const FIGURE_BUDGET: Duration = Duration::from_secs(30);

/// Latencies of one kind of request; `None` when the binary does not serve it.
#[derive(Clone, Copy)]
pub struct Sampled {
    pub latency: Percentiles,
    pub mean_kib: f64,
    pub samples: usize,
}

/// One authenticated GET; the body length, or why it failed.
async fn get(client: &Client, url: &str, token: &str) -> Result<usize, String> {
    let response = client
        .get(url)
        .bearer_auth(token)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    if status != reqwest::StatusCode::OK {
        return Err(format!("HTTP {status}"));
    }
    Ok(body.len())
}

/// `requests` sequential GETs of `url` after a warm-up (fewer if [`FIGURE_BUDGET`] runs
/// out); `None` if the first one fails.
pub async fn sample(client: &Client, url: &str, token: &str, requests: usize) -> Option<Sampled> {
    let warmup = Instant::now();
    for i in 0..WARMUP {
        if warmup.elapsed() >= FIGURE_BUDGET / 10 {
            break;
        }
        if let Err(e) = get(client, url, token).await {
            if i == 0 {
                eprintln!("   {url}: {e}; n/a");
                return None;
            }
        }
    }
    let mut latencies = Vec::with_capacity(requests);
    let mut bytes = 0usize;
    let started = Instant::now();
    for _ in 0..requests {
        if started.elapsed() >= FIGURE_BUDGET {
            eprintln!(
                "   {url}: time budget over after {} requests",
                latencies.len()
            );
            break;
        }
        let t0 = Instant::now();
        match get(client, url, token).await {
            Ok(n) => {
                latencies.push(millis(t0.elapsed()));
                bytes += n;
            }
            Err(e) => eprintln!("   {url}: {e}"),
        }
    }
    if latencies.is_empty() {
        return None;
    }
    Some(Sampled {
        latency: percentiles(&latencies),
        mean_kib: bytes as f64 / latencies.len() as f64 / 1024.0,
        samples: latencies.len(),
    })
}

/// SSE clients reading in the background.
pub struct Streams {
    /// `events` (`/api/v1/events`) or `job-events` (`/api/v1/jobs/{id}/events`).
    pub kind: &'static str,
    pub opened: usize,
    pub failed: usize,
    events: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    ended: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
    pub opened_at: Instant,
}

/// What the SSE clients received.
pub struct StreamFigures {
    pub kind: &'static str,
    pub opened: usize,
    pub failed: usize,
    pub still_open: usize,
    pub events: u64,
    pub mib: f64,
    pub secs: f64,
}

impl Streams {
    /// Opens `n` streams: `/api/v1/events` if it answers 200, else the events of the jobs
    /// in `jobs`, round robin.
    pub async fn open(base: &str, token: &str, n: usize, jobs: &[String]) -> Streams {
        let client = Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("an HTTP client");
        let mesh_url = format!("{base}/api/v1/events");
        let probe = client.get(&mesh_url).bearer_auth(token).send().await;
        let mesh_ok = matches!(&probe, Ok(r) if r.status() == reqwest::StatusCode::OK);
        drop(probe);
        let kind = if mesh_ok { "events" } else { "job-events" };
        let mut streams = Streams {
            kind,
            opened: 0,
            failed: 0,
            events: Arc::default(),
            bytes: Arc::default(),
            ended: Arc::default(),
            tasks: Vec::new(),
            opened_at: Instant::now(),
        };
        for i in 0..n {
            let url = if mesh_ok {
                mesh_url.clone()
            } else if jobs.is_empty() {
                streams.failed += 1;
                continue;
            } else {
                format!("{base}/api/v1/jobs/{}/events", jobs[i % jobs.len()])
            };
            match client.get(&url).bearer_auth(token).send().await {
                Ok(r) if r.status() == reqwest::StatusCode::OK => {
                    streams.opened += 1;
                    let (events, bytes, ended) = (
                        streams.events.clone(),
                        streams.bytes.clone(),
                        streams.ended.clone(),
                    );
                    streams.tasks.push(tokio::spawn(async move {
                        read_stream(r, &events, &bytes).await;
                        ended.fetch_add(1, Ordering::Relaxed);
                    }));
                }
                Ok(r) => {
                    eprintln!("   {url}: HTTP {}", r.status());
                    streams.failed += 1;
                }
                Err(e) => {
                    eprintln!("   {url}: {e}");
                    streams.failed += 1;
                }
            }
        }
        streams
    }

    /// The counts so far.
    pub fn figures(&self) -> StreamFigures {
        StreamFigures {
            kind: self.kind,
            opened: self.opened,
            failed: self.failed,
            still_open: self.opened - self.ended.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            mib: self.bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
            secs: self.opened_at.elapsed().as_secs_f64(),
        }
    }

    /// Closes every stream.
    pub fn close(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Reads one SSE body until it ends, counting `event:` lines and bytes.
async fn read_stream(mut response: reqwest::Response, events: &AtomicU64, bytes: &AtomicU64) {
    let mut carry: Vec<u8> = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        carry.extend_from_slice(&chunk);
        let Some(last_newline) = carry.iter().rposition(|&b| b == b'\n') else {
            continue;
        };
        let count = carry[..last_newline]
            .split(|&b| b == b'\n')
            .filter(|line| line.starts_with(b"event:"))
            .count();
        events.fetch_add(count as u64, Ordering::Relaxed);
        carry.drain(..=last_newline);
    }
}
