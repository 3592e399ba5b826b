//! Bounds on what clients can hold open: the HTTP server's connections (a cap, and a time
//! limit for a request's headers that also closes idle connections), and the event streams
//! (server-sent events) of a node.
//!
//! Connections over the cap are not refused: they wait, unaccepted, in the listen queue until
//! a connection closes. Idle connections close within the header timeout, and event streams,
//! the only responses that last, are capped well below the connection cap, so a client that
//! waits is let in within the header timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::{ApiError, ApiState};

/// Default of `--http-max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 512;
/// Default of `--http-header-timeout-secs`.
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
/// Default of `--max-event-streams`.
pub const DEFAULT_MAX_EVENT_STREAMS: u32 = 256;
/// Largest value of the connection and stream caps.
pub const MAX_CAP: u32 = 1 << 16;
/// Files the node keeps for itself beyond its HTTP connections: the mesh's connections, the
/// store, logs, and the pipes of running agents.
pub const RESERVED_FILES: u64 = 256;

/// How the HTTP server bounds its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Most connections open at once.
    pub max_connections: u32,
    /// Time a client has to send a request's headers, from the moment the connection opens
    /// or its previous response ended (so it is also how long an idle connection stays).
    pub header_timeout: Duration,
}

/// Invalid limits.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LimitsError {
    /// Streams could take every connection.
    #[error(
        "--max-event-streams ({streams}) must be below --http-max-connections ({connections}), \
         so that event streams cannot take every connection"
    )]
    StreamsOverConnections {
        /// `--max-event-streams`.
        streams: u32,
        /// `--http-max-connections`.
        connections: u32,
    },
}

/// Check the stream cap against the connection cap.
pub fn check(max_connections: u32, max_event_streams: u32) -> Result<(), LimitsError> {
    if max_event_streams >= max_connections {
        return Err(LimitsError::StreamsOverConnections {
            streams: max_event_streams,
            connections: max_connections,
        });
    }
    Ok(())
}

/// Raise the soft limit on open files to `wanted` if it is lower (within the hard limit);
/// returns the soft limit in force.
pub fn raise_file_limit(wanted: u64) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    let wanted = libc::rlim_t::try_from(wanted).unwrap_or(libc::rlim_t::MAX);
    if limit.rlim_cur < wanted && limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: wanted.min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    // `rlim_t` is not `u64` on every platform.
    #[allow(clippy::useless_conversion)]
    u64::try_from(limit.rlim_cur).ok()
}

/// The connection cap that fits in `file_limit` open files with [`RESERVED_FILES`] to spare
/// (at least 16 connections).
pub fn fit_connections(wanted: u32, file_limit: u64) -> u32 {
    let room = file_limit.saturating_sub(RESERVED_FILES).max(16);
    u32::try_from(room).map_or(wanted, |room| wanted.min(room))
}

/// Serve `router` on `listener` within `limits` until `shutdown` completes; then stop
/// accepting, let every open connection finish its current request, and return once all
/// have closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    'accepting: loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => break stream,
                    Err(e) => accept_failed(&e).await,
                },
                () = &mut shutdown => break 'accepting,
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        tokio::spawn(drive(connection, permit, stop_rx.clone()));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a slot until it closes.
    let _ = slots.acquire_many(limits.max_connections).await;
}

/// Serve one connection until it closes, gracefully once the server stops.
async fn drive(
    connection: hyper::server::conn::http1::Connection<
        TokioIo<tokio::net::TcpStream>,
        TowerToHyperService<Router>,
    >,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let _permit = permit;
    let mut connection = std::pin::pin!(connection);
    let stopping = tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::trace!("HTTP connection ended: {e}");
            }
            false
        }
        _ = stop.wait_for(|stop| *stop) => true,
    };
    if stopping {
        connection.as_mut().graceful_shutdown();
        let _ = connection.await;
    }
}

/// After a failed accept: errors of one connection are passed over; anything else (such as
/// running out of files) is logged and retried after a pause.
async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::warn!("cannot accept an HTTP connection: {e}");
    tokio::time::sleep(Duration::from_millis(250)).await;
}

/// The event streams a node serves at once.
#[derive(Clone, Debug)]
pub struct EventStreams {
    slots: Arc<Semaphore>,
    max: u32,
    /// Set when the node stops: every stream ends, so that shutdown does not wait for them.
    closed: Arc<watch::Sender<bool>>,
}

impl EventStreams {
    /// Room for `max` streams at once.
    pub fn new(max: u32) -> EventStreams {
        EventStreams {
            slots: Arc::new(Semaphore::new(max as usize)),
            max,
            closed: Arc::new(watch::channel(false).0),
        }
    }

    /// End every open stream (at shutdown).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        (self.max as usize).saturating_sub(self.slots.available_permits())
    }
}

/// Middleware for an event-stream route (apply with `route_layer`): answers 503 when
/// `--max-event-streams` streams are open, and otherwise holds a slot for as long as the
/// response body lives. The body ends when the node stops.
pub async fn event_stream(State(s): State<ApiState>, request: Request, next: Next) -> Response {
    let Ok(permit) = s.streams.slots.clone().try_acquire_owned() else {
        return ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "this node already serves {} event streams, its limit (--max-event-streams); \
                 try again later or use another node",
                s.streams.max
            ),
        )
        .into_response();
    };
    let mut closed = s.streams.closed.subscribe();
    let (parts, body) = next.run(request).await.into_parts();
    let body = body
        .into_data_stream()
        .map(move |chunk| {
            let _held = &permit;
            chunk
        })
        .take_until(async move {
            let _ = closed.wait_for(|closed| *closed).await;
        });
    Response::from_parts(parts, Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_must_leave_connections_free() {
        assert_eq!(check(512, 256), Ok(()));
        assert!(check(512, 512).is_err());
        assert!(check(10, 20).is_err());
    }

    #[test]
    fn the_connection_cap_fits_the_file_limit() {
        assert_eq!(fit_connections(512, 20_000), 512);
        assert_eq!(fit_connections(512, 1024), 512);
        assert_eq!(fit_connections(512, 512), 256);
        assert_eq!(fit_connections(512, 100), 16);
        assert_eq!(fit_connections(8, 100), 8);
    }

    #[tokio::test]
    async fn a_stream_slot_is_held_while_its_body_lives() {
        let streams = EventStreams::new(2);
        let permit = streams.slots.clone().try_acquire_owned().expect("a slot");
        assert_eq!(streams.open(), 1);
        let body =
            futures::stream::iter([Ok::<_, std::convert::Infallible>("x")]).map(move |chunk| {
                let _held = &permit;
                chunk
            });
        let body = Body::from_stream(body);
        assert_eq!(streams.open(), 1);
        drop(body);
        assert_eq!(streams.open(), 0);
    }
}
