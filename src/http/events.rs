//! `GET /api/v1/events`: one stream of node, job and master changes for the whole mesh,
//! fed by the change feed and resumable with `Last-Event-ID`.
//!
//! Each event is `event: node|job|master`, `id: <stream>-<seq>` and `data:` the changed
//! object's API view. A reader that resumes within the same node process gets every object
//! changed since its last id, each once at its newest version; one that comes back after a
//! restart of the node (another stream number) gets every object once.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast;

use super::ApiState;
use crate::mesh::read;
use crate::mesh::snapshot::feed::{kind_of, Change, EventId};
use crate::mesh::snapshot::Snapshot;
use crate::proto::records::Key;

/// Most events taken from one snapshot before they are sent (bounds a reader's queue).
const BATCH: usize = 64;

struct FeedState {
    feed: broadcast::Receiver<Change>,
    reader: crate::mesh::snapshot::Reader,
    /// The sequence number of the last change sent.
    cursor: u64,
    /// The stream the cursor belongs to.
    stream: u64,
    pending: VecDeque<Event>,
}

/// The change feed as server-sent events.
pub(super) async fn events(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    // Subscribe before the first read, so that no change falls in between.
    let feed = s.mesh.reader().subscribe();
    let reader = s.mesh.reader().clone();
    let stream = reader.current().local().stream;
    let last = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let state = FeedState {
        feed,
        reader,
        cursor: EventId::resume_after(last, stream),
        stream,
        pending: VecDeque::new(),
    };
    let events = futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.pending.pop_front() {
                return Some((Ok::<Event, std::convert::Infallible>(event), state));
            }
            let snapshot = state.reader.current();
            if snapshot.local().stream != state.stream {
                return None;
            }
            if state.fill(&snapshot) {
                continue;
            }
            match state.feed.recv().await {
                // Whatever arrived, or how much was missed, the snapshot has it.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

impl FeedState {
    /// Queue up to [`BATCH`] events for the changes after the cursor; whether any were.
    fn fill(&mut self, snapshot: &Arc<Snapshot>) -> bool {
        for (seq, key) in snapshot.changes_after(self.cursor).take(BATCH) {
            self.cursor = seq;
            let id = EventId {
                stream: self.stream,
                seq,
            };
            if let Some(event) = event_for(snapshot, key) {
                self.pending.push_back(event.id(id.to_string()));
            }
        }
        !self.pending.is_empty()
    }
}

/// The event for feed key `key`: its kind and the object's view (`None` when the object is
/// not there, say a node operator record without the node's own record yet).
fn event_for(snapshot: &Snapshot, key: &str) -> Option<Event> {
    let kind = kind_of(key)?;
    let data = match Key::parse(key).ok()? {
        Key::Node(id) => serde_json::to_string(&read::nodes::node_by_id(snapshot, &id)?),
        Key::Job(id) => serde_json::to_string(&read::jobs::get(snapshot, &id).ok()?),
        Key::Master => serde_json::to_string(&read::nodes::master_view(snapshot)),
        Key::Admin(_) | Key::History | Key::Other(_) => return None,
    }
    .ok()?;
    Some(Event::default().event(kind.event_name()).data(data))
}
