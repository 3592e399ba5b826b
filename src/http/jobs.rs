//! `/api/v1/jobs`: submit, list, show, cancel, retry. Reads come from the latest snapshot.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{ApiError, ApiState};
use crate::mesh::jobs::{JobAction, JobError, JobQuery, SubmitRequest, MAX_IDEMPOTENCY_KEY_LEN};
use crate::proto::jobs::{JobStatus, Origin, Sandbox};

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        let status = match e {
            JobError::NotFound(_) => StatusCode::NOT_FOUND,
            JobError::Invalid(_) => StatusCode::BAD_REQUEST,
            JobError::Conflict(_) => StatusCode::CONFLICT,
            JobError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            JobError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            JobError::KeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            JobError::Gone(_) => StatusCode::GONE,
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
    let list = s.mesh.jobs(JobQuery {
        status,
        node: query.node,
        text: query.q,
        limit: query.limit.unwrap_or(50),
        offset: query.offset.unwrap_or(0),
    })?;
    Ok(Json(list).into_response())
}

pub(super) async fn show(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(s.mesh.job(&id)?).into_response())
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
