//! `/api/v1/jobs`: submit, list, show, cancel, retry.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{ApiError, ApiState};
use crate::mesh::jobs::{
    JobAction, JobError, JobQuery, JobView, SubmitRequest, MAX_IDEMPOTENCY_KEY_LEN,
};
use crate::mesh::LogSource;
use crate::proto::jobs::{JobStatus, Origin, Sandbox};
use crate::runner::{events, logs};
use crate::wire::{Request, Response as PeerResponse};

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        let status = match e {
            JobError::NotFound(_) => StatusCode::NOT_FOUND,
            JobError::Invalid(_) => StatusCode::BAD_REQUEST,
            JobError::Conflict(_) => StatusCode::CONFLICT,
            JobError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            JobError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            JobError::KeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError(status, e.to_string())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid query: {}", e.body_text()),
        )
    }
}

/// Body of `POST /api/v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    prompt: String,
    node: Option<String>,
    tag: Option<String>,
    #[serde(default)]
    repos: Vec<String>,
    agent: Option<String>,
    model: Option<String>,
    sandbox: Option<Sandbox>,
    timeout_secs: Option<u32>,
    idle_timeout_secs: Option<u32>,
    /// `cli`, `api` or `dashboard` (chat origins are set by the bridges).
    origin: Option<String>,
}

/// Query of `GET /api/v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    node: Option<String>,
    q: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

/// The request header that makes a submission safe to retry.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The response header that marks a submission answered with an existing job.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The `Idempotency-Key` header, checked: 1 to 255 printable ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let invalid = |why: &str| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid Idempotency-Key header: {why}"),
        )
    };
    let text = value
        .to_str()
        .map_err(|_| invalid("use printable ASCII characters"))?;
    if text.is_empty() || text.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(invalid(&format!(
            "it must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"
        )));
    }
    if !text.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return Err(invalid("use printable ASCII characters"));
    }
    Ok(Some(text.to_string()))
}

pub(super) async fn submit(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<SubmitBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let Json(body) = body?;
    let origin = match body.origin.as_deref().unwrap_or("api") {
        kind @ ("cli" | "api" | "dashboard") => Origin {
            kind: kind.to_string(),
            reply_to: None,
            user: None,
        },
        other => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("unknown origin {other:?}: use cli, api or dashboard"),
            ))
        }
    };
    let request = SubmitRequest {
        node: body.node,
        tag: body.tag,
        repos: body.repos,
        prompt: body.prompt,
        agent: body.agent,
        model: body.model,
        sandbox: body.sandbox,
        timeout_secs: body.timeout_secs,
        idle_timeout_secs: body.idle_timeout_secs,
        origin: Some(origin),
        idempotency_key: key,
    };
    let submitted = s.mesh.submit_job(request).await?;
    if submitted.replayed {
        let headers = [(IDEMPOTENT_REPLAYED, "true")];
        return Ok((StatusCode::OK, headers, Json(submitted.view)).into_response());
    }
    Ok((StatusCode::CREATED, Json(submitted.view)).into_response())
}

pub(super) async fn list(
    State(s): State<ApiState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let status = match query.status.as_deref() {
        Some(name) => Some(JobStatus::parse(name).ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("unknown status {name:?}: use queued, assigned, preparing, running, succeeded, failed, cancelled, timed_out or lost"),
            )
        })?),
        None => None,
    };
    let list = s
        .mesh
        .jobs(JobQuery {
            status,
            node: query.node,
            text: query.q,
            limit: query.limit.unwrap_or(50),
            offset: query.offset.unwrap_or(0),
        })
        .await?;
    Ok(Json(list).into_response())
}

pub(super) async fn show(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(s.mesh.job(id).await?).into_response())
}

pub(super) async fn cancel(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(s.mesh.job_action(id, JobAction::Cancel).await?).into_response())
}

pub(super) async fn retry(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(s.mesh.job_action(id, JobAction::Retry).await?).into_response())
}

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

/// A piece of a job's log.
struct LogChunk {
    data: Vec<u8>,
    /// The log's size where it was read.
    size: u64,
    /// Said when the reader could not reach the peer that has the freshest log.
    note: Option<String>,
}

/// Up to 256 KiB of job `id`'s log from `offset`, and the log's size. Reads this peer's copy,
/// or asks the worker, then the master, each for a short time (so an unreachable worker
/// delays the answer by well under a second); no log anywhere yet reads as empty.
async fn fetch_log(s: &ApiState, id: &str, offset: u64) -> Result<LogChunk, ApiError> {
    let internal = |e: String| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e);
    let peers = match s.mesh.log_source(id.to_string()).await? {
        LogSource::Local(path) => {
            let (data, size) = tokio::task::spawn_blocking(move || {
                logs::read_chunk(&path, offset, logs::CHUNK_BYTES)
            })
            .await
            .map_err(|e| internal(e.to_string()))?
            .map_err(|e| internal(format!("cannot read the log: {e}")))?;
            return Ok(LogChunk {
                data,
                size,
                note: None,
            });
        }
        LogSource::Remote(peers) => peers,
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
                return Ok(LogChunk { data, size, note });
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

/// How often the event stream looks for news.
const EVENTS_POLL: std::time::Duration = std::time::Duration::from_millis(250);

struct EventState {
    s: ApiState,
    id: String,
    offset: u64,
    /// Status, attempt and reason of the last `job` event.
    last: Option<(JobStatus, u32, Option<String>)>,
    /// The log's last line, until its newline arrives.
    partial_line: Vec<u8>,
    finished: bool,
    pending: std::collections::VecDeque<Event>,
    /// The last `note` event sent.
    note: Option<String>,
}

/// Live events of a job as server-sent events: `job` (the job object, whenever its status,
/// attempt or reason changes), `log` (new log text), `agent` (one per Codex event in the log,
/// parsed: commands started and finished with exit codes, file changes, messages, usage,
/// errors), `note` (the log cannot be read from the node that has it right now), and `end`
/// once the job has finished and its log has been sent. Any peer serves it.
pub(super) async fn events(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    s.mesh.job(id.clone()).await?;
    let state = EventState {
        s,
        id,
        offset: 0,
        last: None,
        partial_line: Vec::new(),
        finished: false,
        pending: Default::default(),
        note: None,
    };
    let stream = futures::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            if let Some(event) = state.pending.pop_front() {
                return Some((Ok::<Event, std::convert::Infallible>(event), Some(state)));
            }
            if state.finished {
                return None;
            }
            poll_job(&mut state).await;
            if state.pending.is_empty() && !state.finished {
                tokio::time::sleep(EVENTS_POLL).await;
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Longest log line parsed for an `agent` event.
const MAX_EVENT_LINE: usize = 4 << 20;

/// Queue an `agent` event for every complete log line that is a Codex event.
fn push_agent_events(state: &mut EventState, data: &[u8]) {
    state.partial_line.extend_from_slice(data);
    let Some(end) = state.partial_line.iter().rposition(|b| *b == b'\n') else {
        if state.partial_line.len() > MAX_EVENT_LINE {
            // Not an event anyone can use; skip to the next line.
            state.partial_line.clear();
        }
        return;
    };
    let rest = state.partial_line.split_off(end + 1);
    let complete = std::mem::replace(&mut state.partial_line, rest);
    for line in complete.split(|b| *b == b'\n') {
        // Lossy, as the runner reads it: invalid bytes do not hide an event.
        let line = String::from_utf8_lossy(line);
        if let Some(json) = events::parse_line(&line).and_then(|e| serde_json::to_string(&e).ok()) {
            state
                .pending
                .push_back(Event::default().event("agent").data(json));
        }
    }
}

/// Queue a `job` event if the status, attempt or reason changed since the last one.
fn push_job_if_changed(state: &mut EventState, job: &JobView) {
    let key = (job.status, job.attempt, job.reason.clone());
    if state.last.as_ref() == Some(&key) {
        return;
    }
    state.last = Some(key);
    if let Ok(json) = serde_json::to_string(job) {
        state
            .pending
            .push_back(Event::default().event("job").data(json));
    }
}

async fn poll_job(state: &mut EventState) {
    let Ok(job) = state.s.mesh.job(state.id.clone()).await else {
        state.finished = true;
        return;
    };
    let terminal = job.status.is_terminal();
    if state.last.is_none() {
        // The stream opens with the job as it is.
        push_job_if_changed(state, &job);
    }
    // The log before any change of status: what the agent did comes before what it led to.
    let drained = match fetch_log(&state.s, &state.id, state.offset).await {
        Ok(LogChunk { data, size, note }) => {
            if note.is_some() && note != state.note {
                let text = note.clone().unwrap_or_default();
                state
                    .pending
                    .push_back(Event::default().event("note").data(text));
            }
            state.note = note;
            if !data.is_empty() {
                state.offset += data.len() as u64;
                // SSE cannot carry carriage returns; progress bars lose nothing that matters.
                let text = String::from_utf8_lossy(&data).replace('\r', "");
                state
                    .pending
                    .push_back(Event::default().event("log").data(text));
                push_agent_events(state, &data);
            }
            state.offset >= size
        }
        // No log to be had (its worker is gone): end with the status alone.
        Err(_) => true,
    };
    push_job_if_changed(state, &job);
    if terminal && drained {
        state
            .pending
            .push_back(Event::default().event("end").data(""));
        state.finished = true;
    }
}
