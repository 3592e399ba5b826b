//! `GET /api/v1/jobs/{id}/log`: a job's log from any peer, read from this node's copy or
//! asked of the worker and then the master, within a budget of about a second.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::{ApiError, ApiState};
use crate::mesh::read;
use crate::runner::logs;
use crate::wire::{Request, Response as PeerResponse};

/// Query of `GET /api/v1/jobs/{id}/log`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    offset: Option<u64>,
}

/// How long one peer may take to answer a log read.
const LOG_PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(400);
/// How long a log read may take in all before it answers with what it has.
const LOG_READ_BUDGET: std::time::Duration = std::time::Duration::from_millis(900);

/// Most log reads from other peers this node runs at once.
pub const MAX_REMOTE_LOG_READS: usize = 32;
static REMOTE_LOG_READS: Semaphore = Semaphore::const_new(MAX_REMOTE_LOG_READS);

/// A piece of a job's log.
pub(super) struct LogChunk {
    pub(super) data: Vec<u8>,
    /// The log's size where it was read.
    pub(super) size: u64,
    /// Said when the reader could not reach the peer that has the freshest log.
    pub(super) note: Option<String>,
    /// Read from this node's own file.
    pub(super) local: bool,
}

/// Up to 256 KiB of job `id`'s log from `offset`, and the log's size. Reads this peer's copy,
/// or asks the worker, then the master, each for a short time (so an unreachable worker
/// delays the answer by well under a second); no log anywhere yet reads as empty.
pub(super) async fn fetch_log(s: &ApiState, id: &str, offset: u64) -> Result<LogChunk, ApiError> {
    let internal = |e: String| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e);
    let (path, peers) = read::jobs::log_places(&s.mesh.reader().current(), id)?;
    let local = tokio::task::spawn_blocking(move || {
        path.exists()
            .then(|| logs::read_chunk(&path, offset, logs::CHUNK_BYTES))
    })
    .await
    .map_err(|e| internal(e.to_string()))?;
    if let Some(read) = local {
        let (data, size) = read.map_err(|e| internal(format!("cannot read the log: {e}")))?;
        return Ok(LogChunk {
            data,
            size,
            note: None,
            local: true,
        });
    }
    // Reads from other peers share one budget per node, so that many readers cannot flood
    // the worker's inbound streams.
    let Ok(_permit) = REMOTE_LOG_READS.acquire().await else {
        return Err(internal("the node is shutting down".into()));
    };
    let started = tokio::time::Instant::now();
    let mut unreachable: Vec<String> = Vec::new();
    for peer in peers {
        let left = LOG_READ_BUDGET.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        let request = Request::Log {
            job: id.to_string(),
            offset,
        };
        let answer =
            tokio::time::timeout(LOG_PEER_TIMEOUT.min(left), s.net.request(peer, request)).await;
        match answer {
            Ok(Ok(Ok(PeerResponse::Log { data, size }))) => {
                let note = (!unreachable.is_empty()).then(|| {
                    format!(
                        "node {} is unreachable; showing the copy of node {}",
                        unreachable.join(", "),
                        short_peer(&peer)
                    )
                });
                return Ok(LogChunk {
                    data,
                    size,
                    note,
                    local: false,
                });
            }
            // It answered but has no log (say, the master before the copy): try the next.
            Ok(Ok(Ok(_))) => {}
            _ => unreachable.push(short_peer(&peer)),
        }
    }
    let note = (!unreachable.is_empty()).then(|| {
        format!(
            "the log is not available right now: node {} is unreachable",
            unreachable.join(", ")
        )
    });
    Ok(LogChunk {
        data: Vec::new(),
        size: 0,
        note,
        local: false,
    })
}

fn short_peer(peer: &libp2p::PeerId) -> String {
    let text = peer.to_string();
    text[text.len().saturating_sub(8)..].to_string()
}

/// Up to 256 KiB of a job's log from `offset`, as text, with the log's size in `x-log-size`.
/// Any peer answers.
pub(super) async fn log(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let chunk = fetch_log(&s, &id, query.offset.unwrap_or(0)).await?;
    let mut response = (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                axum::http::HeaderName::from_static("x-log-size"),
                chunk.size.to_string(),
            ),
        ],
        chunk.data,
    )
        .into_response();
    if let Some(value) = chunk
        .note
        .and_then(|n| axum::http::HeaderValue::from_str(&n).ok())
    {
        response
            .headers_mut()
            .insert(axum::http::HeaderName::from_static("x-log-note"), value);
    }
    Ok(response)
}
