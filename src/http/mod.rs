//! The HTTP API every peer serves: `/api/v1/...` behind a bearer token, the open health
//! probe, and Prometheus metrics.

mod auth;
mod events;
mod home;
mod job_events;
mod jobs;
pub mod limits;
mod logs;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::mesh::views::{ActionError, NodeAction};
use crate::mesh::MeshHandle;
use crate::metrics::Metrics;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct ApiState {
    /// The mesh task.
    pub mesh: MeshHandle,
    /// The bearer token.
    pub token: Arc<crate::secret::Secret<String>>,
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// The network, to fetch job logs from other peers.
    pub net: crate::net::Client,
    /// Slots for event streams (`--max-event-streams`), taken by [`limits::event_stream`].
    pub streams: limits::EventStreams,
}

/// An API error: a status and a message, sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> Self {
        let status = match e {
            ActionError::NotFound(_) => StatusCode::NOT_FOUND,
            ActionError::Invalid(_) => StatusCode::BAD_REQUEST,
            ActionError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ActionError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string())
    }
}

/// Largest request body accepted, in bytes; a larger one gets 413.
pub const MAX_BODY_BYTES: usize = 2 << 20;
/// Longest request URI (path and query) accepted, in bytes; a longer one gets 414. (URIs over
/// hyper's own limit of about 64 KiB are refused by hyper, with no body.)
pub const MAX_URI_BYTES: usize = 8 << 10;

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over the limit of {MAX_BODY_BYTES} bytes"),
            );
        }
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {}", e.body_text()),
        )
    }
}

/// Refuse a request whose URI is over [`MAX_URI_BYTES`] with a JSON 414.
async fn limit_uri(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let length = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if length > MAX_URI_BYTES {
        return ApiError(
            StatusCode::URI_TOO_LONG,
            format!("the request URI is {length} bytes; the limit is {MAX_URI_BYTES}"),
        )
        .into_response();
    }
    next.run(request).await
}

fn unavailable() -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "the node is shutting down".into(),
    )
}

/// The full router.
pub fn router(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/nodes", get(nodes))
        .route(
            "/api/v1/nodes/{id}",
            get(node).patch(edit_node).delete(remove_node),
        )
        .route("/api/v1/nodes/{id}/drain", post(drain))
        .route("/api/v1/nodes/{id}/undrain", post(undrain))
        .route("/api/v1/nodes/{id}/admit", post(admit))
        .route("/api/v1/ticket", get(ticket))
        .route("/api/v1/jobs", get(jobs::list).post(jobs::submit))
        .route("/api/v1/jobs/{id}", get(jobs::show))
        .route("/api/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/v1/jobs/{id}/retry", post(jobs::retry))
        .route("/api/v1/jobs/{id}/log", get(logs::log))
        .route(
            "/api/v1/jobs/{id}/events",
            get(job_events::events).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                limits::event_stream,
            )),
        )
        .route(
            "/api/v1/events",
            get(events::events).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                limits::event_stream,
            )),
        )
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/api/v1/health", get(health))
        .merge(protected)
        .fallback(home::fallback)
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint".into(),
            )
        })
        .with_state(state)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(limit_uri))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "ok": true, "version": env!("CARGO_PKG_VERSION") }))
}

async fn status(State(s): State<ApiState>) -> Response {
    Json(s.mesh.status()).into_response()
}

async fn nodes(State(s): State<ApiState>) -> Response {
    Json(s.mesh.nodes()).into_response()
}

async fn node(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let views = s.mesh.nodes();
    let matching: Vec<_> = views
        .into_iter()
        .filter(|n| n.id == id || n.name == id)
        .collect();
    match matching.len() {
        1 => Ok(Json(&matching[0]).into_response()),
        0 => Err(ActionError::NotFound(id).into()),
        _ => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("several nodes are named {id:?}; use the node id"),
        )),
    }
}

async fn ticket(State(s): State<ApiState>) -> Result<Response, ApiError> {
    // A ticket without addresses would let no one join.
    if s.mesh.status().listen_addrs.is_empty() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the node is not listening on the mesh yet; ask again in a moment".into(),
        ));
    }
    let ticket = s.mesh.ticket().await.ok_or_else(unavailable)?;
    Ok(Json(json!({ "ticket": ticket })).into_response())
}

async fn metrics(State(s): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn act(s: &ApiState, id: String, action: NodeAction) -> Result<Response, ApiError> {
    let view = s.mesh.node_action(id, action).await?;
    Ok(Json(view).into_response())
}

async fn drain(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    act(&s, id, NodeAction::Drain).await
}

async fn undrain(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    act(&s, id, NodeAction::Undrain).await
}

async fn admit(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    act(&s, id, NodeAction::Admit).await
}

async fn remove_node(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    act(&s, id, NodeAction::Remove).await
}

/// Body of `PATCH /api/v1/nodes/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEdit {
    tags: Option<Vec<String>>,
    slots: Option<u32>,
}

async fn edit_node(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Json<NodeEdit>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(edit) = body?;
    act(
        &s,
        id,
        NodeAction::Edit {
            tags: edit.tags,
            slots: edit.slots,
        },
    )
    .await
}
