//! Anti-entropy as the initiator: buckets → digests → records (+ push what the peer wants),
//! repeated while the peer has more pages and the rounds make progress.

use libp2p::PeerId;

use super::{Mesh, Purpose};
use crate::metrics::Metrics;
use crate::wire::{Request, Response, MAX_RECORDS_PER_MESSAGE};

/// Most rounds in a row that change nothing here before a session stops (each round moves
/// one page of records; a session goes on as long as pages keep changing records, so a new
/// node fetches a large state in one session, page after page).
const MAX_IDLE_ROUNDS: u32 = 8;

impl Mesh {
    /// Start an anti-entropy session with `peer` unless one is running.
    pub(super) fn start_sync(&mut self, peer: PeerId) {
        if !self.peers.begin_sync(peer) {
            return;
        }
        self.send(
            peer,
            Request::SyncBuckets(self.replica.state().bucket_summary()),
            Purpose::SyncBuckets,
        );
    }

    fn finish_sync(&mut self, peer: PeerId) {
        self.peers.end_sync(&peer);
        Metrics::inc(&self.metrics.anti_entropy_rounds);
    }

    pub(super) fn on_sync_response(&mut self, peer: PeerId, response: Response) {
        if !self.peers.is_syncing(&peer) {
            return;
        }
        match response {
            Response::SyncDiffering(buckets) => {
                if buckets.is_empty() {
                    self.finish_sync(peer);
                    return;
                }
                if buckets.len() > crate::proto::state::BUCKETS {
                    Metrics::inc(&self.metrics.wire_dropped);
                    self.peers.end_sync(&peer);
                    return;
                }
                let entries = self.replica.state().digests_in(&buckets);
                self.send(
                    peer,
                    Request::SyncDigests { buckets, entries },
                    Purpose::SyncDigests,
                );
            }
            Response::SyncRecords {
                records,
                want,
                more,
            } => {
                if records.len() > MAX_RECORDS_PER_MESSAGE
                    || want.len() > crate::wire::MAX_DIGESTS_PER_MESSAGE
                {
                    Metrics::inc(&self.metrics.wire_dropped);
                    self.peers.end_sync(&peer);
                    return;
                }
                let changed = self.apply_remote(records);
                self.metrics
                    .anti_entropy_records_received
                    .fetch_add(changed as u64, std::sync::atomic::Ordering::Relaxed);
                let wanted: Vec<_> = want
                    .iter()
                    .filter_map(|k| self.replica.state().get(k).map(|r| (k.clone(), r.clone())))
                    .collect();
                for page in crate::wire::pages(wanted) {
                    self.send(peer, Request::SyncPush(page), Purpose::SyncPush);
                }
                // The session's count is of rounds in a row that changed nothing here.
                let idle = self.peers.sync_round(peer, changed);
                if more && idle < MAX_IDLE_ROUNDS {
                    self.send(
                        peer,
                        Request::SyncBuckets(self.replica.state().bucket_summary()),
                        Purpose::SyncBuckets,
                    );
                } else {
                    self.finish_sync(peer);
                }
            }
            Response::Refused(reason) => {
                tracing::info!("{peer} refused anti-entropy: {reason}");
                self.peers.end_sync(&peer);
            }
            Response::Ack
            | Response::Election(_)
            | Response::Log { .. }
            | Response::Conflict(_)
            | Response::Accepted(_) => {
                self.peers.end_sync(&peer);
            }
        }
    }
}
