//! `GET /api/v1/jobs/{id}/events`: one job's live events. The job's changes come from the
//! change feed; only its log is read as it grows (this node's file, or the worker's, at a
//! slower pace and within a node-wide budget of remote reads).

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use std::time::Duration;

use tokio::sync::broadcast;

use super::logs::{fetch_log, LogChunk};
use super::{ApiError, ApiState};
use crate::mesh::jobs::JobView;
use crate::mesh::snapshot::feed::Change;
use crate::proto::jobs::JobStatus;
use crate::proto::records::Key;
use crate::runner::events;

/// How often a running job's log is read while it is on this node.
const LOCAL_LOG_POLL: Duration = Duration::from_millis(250);
/// How often a running job's log is asked of the peer that has it.
const REMOTE_LOG_POLL: Duration = Duration::from_secs(1);

struct EventState {
    s: ApiState,
    id: String,
    /// The feed key of the job.
    key: String,
    feed: broadcast::Receiver<Change>,
    offset: u64,
    /// Status, attempt and reason of the last `job` event.
    last: Option<(JobStatus, u32, Option<String>)>,
    /// The log's last line, until its newline arrives.
    partial_line: Vec<u8>,
    finished: bool,
    pending: std::collections::VecDeque<Event>,
    /// The last `note` event sent.
    note: Option<String>,
    /// How long to wait for news before reading the log again (`None`: only on a change).
    poll: Option<Duration>,
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
    // Subscribe before the first read, so that no change falls in between.
    let feed = s.mesh.reader().subscribe();
    s.mesh.job(&id)?;
    let state = EventState {
        s,
        key: Key::Job(id.clone()).encode(),
        id,
        feed,
        offset: 0,
        last: None,
        partial_line: Vec::new(),
        finished: false,
        pending: Default::default(),
        note: None,
        poll: None,
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
                wait_for_news(&mut state).await;
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Wait until the job changes (the feed names it, or the reader lagged and must look), or
/// until it is time to read the log again.
async fn wait_for_news(state: &mut EventState) {
    let deadline = state.poll.map(|p| tokio::time::Instant::now() + p);
    loop {
        let received = match deadline {
            Some(at) => match tokio::time::timeout_at(at, state.feed.recv()).await {
                Ok(received) => received,
                Err(_) => return,
            },
            None => state.feed.recv().await,
        };
        match received {
            Ok(change) if *change.key == *state.key => return,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => {
                state.finished = true;
                return;
            }
        }
    }
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
    let Ok(job) = state.s.mesh.job(&state.id) else {
        state.finished = true;
        return;
    };
    let terminal = job.status.is_terminal();
    // Before a node prepares the job there is no log to read: wait for the job to change.
    if matches!(job.status, JobStatus::Queued | JobStatus::Assigned) {
        push_job_if_changed(state, &job);
        state.poll = None;
        return;
    }
    if state.last.is_none() {
        // The stream opens with the job as it is.
        push_job_if_changed(state, &job);
    }
    // The log before any change of status: what the agent did comes before what it led to.
    let drained = match fetch_log(&state.s, &state.id, state.offset).await {
        Ok(LogChunk {
            data,
            size,
            note,
            local,
        }) => {
            state.poll = Some(if local {
                LOCAL_LOG_POLL
            } else {
                REMOTE_LOG_POLL
            });
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
        // No log to be had (its worker is gone, or it was dropped with the job's history):
        // end with the status alone, saying why when the log is gone for good.
        Err(ApiError(status, message)) => {
            if status == axum::http::StatusCode::GONE && state.note.as_deref() != Some(&message) {
                state
                    .pending
                    .push_back(Event::default().event("note").data(message.clone()));
                state.note = Some(message);
            }
            true
        }
    };
    push_job_if_changed(state, &job);
    if terminal && drained {
        state
            .pending
            .push_back(Event::default().event("end").data(""));
        state.finished = true;
    }
}
