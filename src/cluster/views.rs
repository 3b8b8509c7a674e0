//! The cluster views every core holds: the ring, the failure detector's verdicts and the
//! buckets this node is still receiving. The control plane publishes them; each core follows
//! them into copies of its own (`Coordinator::follow`).

use super::{membership::Health, ring::Ring};
use crate::routing::buckets::BucketSet;
use std::sync::Arc;
use tokio::sync::watch;

/// What the control plane publishes to every core: the latest ring, the failure detector's
/// verdicts and the buckets this node is still receiving. A watch keeps only the latest of
/// each, which is all a core needs; each core follows them into copies of its own, so the
/// request path reads them without a lock.
#[derive(Clone)]
pub struct ClusterViews {
    pub ring: watch::Receiver<Arc<Ring>>,
    pub health: watch::Receiver<Arc<Health>>,
    pub syncing: watch::Receiver<Arc<BucketSet>>,
}

/// The control plane's side of [`ClusterViews`].
pub struct ViewPublishers {
    pub ring: watch::Sender<Arc<Ring>>,
    pub health: watch::Sender<Arc<Health>>,
    pub syncing: watch::Sender<Arc<BucketSet>>,
}

/// Views for a node that knows only itself: a ring of one, no verdicts, nothing syncing.
pub fn cluster_views(first_ring: Ring) -> (ViewPublishers, ClusterViews) {
    let (ring_tx, ring) = watch::channel(Arc::new(first_ring));
    let (health_tx, health) = watch::channel(Arc::new(Health::default()));
    let (syncing_tx, syncing) = watch::channel(Arc::new(BucketSet::default()));
    (
        ViewPublishers {
            ring: ring_tx,
            health: health_tx,
            syncing: syncing_tx,
        },
        ClusterViews {
            ring,
            health,
            syncing,
        },
    )
}

/// Copies each new value of `rx` into this core with `apply`, until the publisher is gone.
pub async fn follow_one<T>(mut rx: watch::Receiver<Arc<T>>, apply: impl Fn(&T)) {
    while rx.changed().await.is_ok() {
        let latest = Arc::clone(&rx.borrow_and_update());
        apply(&latest);
    }
}
