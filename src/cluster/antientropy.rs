//! Anti-entropy and data movement, on the control plane.
//!
//! Every core keeps, per ring bucket (4096 of them, see [`crate::routing::buckets`]), a digest of
//! what its shards hold: the XOR of one hash per entry over key, version and tombstone bit, updated
//! by every write, eviction, expiry and removal (never rebuilt by scanning). Two replicas compare
//! the buckets they share top-down: 64 group digests first, then the bucket digests of the groups
//! that differ, then key -> version lists of the buckets that differ, and exchange only the entries
//! that differ, newest version winning (tombstones included). Expired entries are never listed nor
//! sent, so a repair cannot bring one back.
//!
//! The same comparison moves data when the ring changes:
//! - a node that became a replica of a bucket finds it differs from the other replicas and
//!   pulls the entries, in bounded batches, with their versions and remaining TTLs (a join);
//! - a node that holds buckets it no longer replicates pushes them to their replicas and drops
//!   them once every replica holds the same digest and the transition window has passed;
//! - a node that leaves gracefully pushes everything it holds to the nodes that take over
//!   before it exits.
//!
//! A round runs every ANTI_ENTROPY_INTERVAL and at once after a ring change. The control plane
//! asks the cores for digests, lists and entries by message; nothing here touches a shard.

use super::ring::Ring;
use crate::{
    engine::{
        command::ReplicaEntry,
        core::{KeyVersion, Leaves},
        hlc::Version,
    },
    pb,
    routing::buckets::{BucketSet, BUCKETS},
    wire,
};
use executors::Unanswered;
use std::future::Future;
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tokio::sync::watch;

/// Entries whose keys are listed in one call (a batch holds at least one bucket): each list
/// scans the cores' entries once, so batches are as large as a bounded message allows.
const KEYS_PER_LIST: u64 = 50_000;
/// Entries per Fetch or Apply call, and bytes at most (a single bigger entry goes alone).
const ENTRIES_PER_BATCH: usize = 512;
const BYTES_PER_BATCH: usize = 1 << 20;
/// Deadline of one anti-entropy call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest message an anti-entropy call may carry either way.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// What anti-entropy and data movement did; read by metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub rounds: AtomicU64,
    pub buckets_compared: AtomicU64,
    pub pulled: AtomicU64,
    pub pushed: AtomicU64,
    pub handed_off: AtomicU64,
    pub dropped: AtomicU64,
    pub bytes: AtomicU64,
    /// Buckets this node replicates and has not compared with a peer yet (a gauge).
    pub syncing: AtomicU64,
}

/// A copy of the counters for a scrape.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub rounds: u64,
    pub buckets_compared: u64,
    pub pulled: u64,
    pub pushed: u64,
    pub handed_off: u64,
    pub dropped: u64,
    pub bytes: u64,
    pub syncing: u64,
}

impl Counters {
    pub fn snapshot(&self) -> Counts {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            rounds: l(&self.rounds),
            buckets_compared: l(&self.buckets_compared),
            pulled: l(&self.pulled),
            pushed: l(&self.pushed),
            handed_off: l(&self.handed_off),
            dropped: l(&self.dropped),
            bytes: l(&self.bytes),
            syncing: l(&self.syncing),
        }
    }

    fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// This node's side of a comparison: what its cores hold. The control plane answers from the
/// cores; a core that does not answer fails the comparison rather than count as empty.
pub trait LocalReplica: Send + Sync + 'static {
    /// Per bucket, the XOR of every core's digest, and the node's entry count.
    fn digests(&self) -> impl Future<Output = Result<Leaves, Unanswered>> + Send;
    /// Key, version and flags of every live entry in `buckets`.
    fn list(
        &self,
        buckets: &BucketSet,
    ) -> impl Future<Output = Result<Vec<KeyVersion>, Unanswered>> + Send;
    /// The entries for `keys` that are held here.
    fn fetch(
        &self,
        keys: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Vec<ReplicaEntry>, Unanswered>> + Send;
    /// Applies entries from another replica; how many changed something.
    fn apply(
        &self,
        entries: Vec<ReplicaEntry>,
    ) -> impl Future<Output = Result<usize, Unanswered>> + Send;
    /// Drops every entry in `buckets`; how many.
    fn drop_buckets(
        &self,
        buckets: &BucketSet,
    ) -> impl Future<Output = Result<usize, Unanswered>> + Send;
}

fn unavailable(e: Unanswered) -> tonic::Status {
    tonic::Status::unavailable(e.to_string())
}

/// The other replicas' side of a comparison: PeerService's anti-entropy calls to `peer`.
pub trait RemoteReplicas: Send + Sync + 'static {
    fn digests(
        &self,
        peer: &str,
        req: pb::DigestRequest,
    ) -> impl Future<Output = Result<pb::DigestReply, tonic::Status>> + Send;
    fn keys(
        &self,
        peer: &str,
        req: pb::KeysRequest,
    ) -> impl Future<Output = Result<pb::KeysReply, tonic::Status>> + Send;
    fn fetch(
        &self,
        peer: &str,
        req: pb::FetchRequest,
    ) -> impl Future<Output = Result<pb::EntryBatch, tonic::Status>> + Send;
    fn apply(
        &self,
        peer: &str,
        req: pb::EntryBatch,
    ) -> impl Future<Output = Result<pb::ApplyAck, tonic::Status>> + Send;
}

/// How a replica answers anti-entropy's calls from what it holds: served by the control plane
/// (PeerService), and by the in-memory peers of the tests.
pub mod answer {
    use super::*;

    fn buckets_of(bytes: &[u8]) -> Result<BucketSet, tonic::Status> {
        BucketSet::from_bytes(bytes)
            .ok_or_else(|| tonic::Status::invalid_argument("buckets: expected a 512-byte bitmap"))
    }

    pub async fn digests(
        local: &impl LocalReplica,
        req: pb::DigestRequest,
    ) -> Result<pb::DigestReply, tonic::Status> {
        let buckets = buckets_of(&req.buckets)?;
        let leaves = local.digests().await.map_err(unavailable)?;
        Ok(if req.groups {
            pb::DigestReply {
                digests: group_digests(&leaves.digests, &buckets),
                counts: Vec::new(),
            }
        } else {
            pb::DigestReply {
                digests: buckets.iter().map(|b| leaves.digests[b]).collect(),
                counts: buckets.iter().map(|b| leaves.counts[b]).collect(),
            }
        })
    }

    pub async fn keys(
        local: &impl LocalReplica,
        req: pb::KeysRequest,
    ) -> Result<pb::KeysReply, tonic::Status> {
        let buckets = buckets_of(&req.buckets)?;
        let keys = local.list(&buckets).await.map_err(unavailable)?;
        Ok(pb::KeysReply {
            keys: keys.into_iter().map(wire::key_version_to_pb).collect(),
        })
    }

    pub async fn fetch(
        local: &impl LocalReplica,
        req: pb::FetchRequest,
    ) -> Result<pb::EntryBatch, tonic::Status> {
        let entries = local.fetch(req.keys).await.map_err(unavailable)?;
        Ok(pb::EntryBatch {
            entries: entries.iter().map(wire::entry_to_pb).collect(),
        })
    }

    pub async fn apply(
        local: &impl LocalReplica,
        req: pb::EntryBatch,
    ) -> Result<pb::ApplyAck, tonic::Status> {
        let entries = req.entries.into_iter().map(wire::entry_from_pb).collect();
        let applied = local.apply(entries).await.map_err(unavailable)?;
        Ok(pb::ApplyAck {
            applied: applied as u32,
        })
    }
}

/// XOR of the digests of `buckets` in each group of 64 buckets.
pub fn group_digests(digests: &[u64], buckets: &BucketSet) -> Vec<u64> {
    let mut groups = vec![0u64; BUCKETS / 64];
    for b in buckets.iter() {
        groups[b / 64] ^= digests[b];
    }
    groups
}

/// Anti-entropy settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub me: String,
    pub interval: Duration,
    /// How long after a ring change reads also ask the previous owners and former owners keep
    /// their data.
    pub transition: Duration,
}

/// Which way a comparison may move entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Both,
    /// Only towards the peer (handing off buckets this node no longer replicates).
    PushOnly,
}

/// What one comparison with one peer found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SyncOutcome {
    pulled: usize,
    pushed: usize,
}

pub struct AntiEntropy<L, R> {
    settings: Settings,
    local: L,
    remote: R,
    counters: Arc<Counters>,
    /// Buckets this node replicates but has not yet compared with a peer since it started or
    /// became their replica; the cores learn them so that reads discount this node's "not
    /// found" there. Only the control plane's tasks touch it, one at a time.
    syncing: std::sync::Mutex<BucketSet>,
    /// Where the cores learn the syncing set.
    syncing_tx: watch::Sender<Arc<BucketSet>>,
}

fn bytes_of<M: prost::Message>(m: &M) -> usize {
    m.encoded_len()
}

impl<L: LocalReplica, R: RemoteReplicas> AntiEntropy<L, R> {
    pub fn new(
        settings: Settings,
        local: L,
        remote: R,
        counters: Arc<Counters>,
        syncing_tx: watch::Sender<Arc<BucketSet>>,
    ) -> Self {
        Self {
            settings,
            local,
            remote,
            counters,
            syncing_tx,
            syncing: std::sync::Mutex::new(BucketSet::default()),
        }
    }

    /// Changes the syncing set with `f` and tells the cores if it changed.
    fn update_syncing(&self, f: impl FnOnce(&mut BucketSet)) {
        let Ok(mut syncing) = self.syncing.lock() else {
            return;
        };
        let before = syncing.clone();
        f(&mut syncing);
        if *syncing != before {
            tracing::debug!(buckets = syncing.len(), "buckets still syncing");
            self.counters
                .syncing
                .store(syncing.len() as u64, Ordering::Relaxed);
            let _ = self.syncing_tx.send(Arc::new(syncing.clone()));
        }
    }

    fn count_bytes(&self, n: usize) {
        Counters::add(&self.counters.bytes, n);
    }

    /// Compares `buckets` with `peer` and exchanges what differs, adding what moved to `done`
    /// as it goes (so that a comparison cut short still counts what it moved).
    async fn sync(
        &self,
        peer: &str,
        buckets: &BucketSet,
        direction: Direction,
        done: &mut SyncOutcome,
    ) -> Result<(), tonic::Status> {
        Counters::add(&self.counters.buckets_compared, buckets.len());
        let local = self.local.digests().await.map_err(unavailable)?;
        let (local, local_counts) = (local.digests, local.counts);
        // Top level: groups of 64 buckets.
        let req = pb::DigestRequest {
            buckets: buckets.to_bytes(),
            groups: true,
        };
        self.count_bytes(bytes_of(&req));
        let remote_groups = self.remote.digests(peer, req).await?;
        self.count_bytes(bytes_of(&remote_groups));
        let local_groups = group_digests(&local, buckets);
        if remote_groups.digests.len() != local_groups.len() {
            return Err(tonic::Status::internal(
                "peer answered a different tree shape",
            ));
        }
        let mut narrowed = BucketSet::default();
        for b in buckets.iter() {
            if local_groups[b / 64] != remote_groups.digests[b / 64] {
                narrowed.insert(b);
            }
        }
        if narrowed.is_empty() {
            return Ok(());
        }
        // Leaves of the groups that differ.
        let req = pb::DigestRequest {
            buckets: narrowed.to_bytes(),
            groups: false,
        };
        self.count_bytes(bytes_of(&req));
        let remote_leaves = self.remote.digests(peer, req).await?;
        self.count_bytes(bytes_of(&remote_leaves));
        // (bucket, entries on the larger side) for the buckets that differ.
        let differing: Vec<(usize, u64)> = narrowed
            .iter()
            .enumerate()
            .filter(|&(i, b)| remote_leaves.digests.get(i) != Some(&local[b]))
            .map(|(i, b)| {
                let theirs = remote_leaves.counts.get(i).copied().unwrap_or(0);
                (b, theirs.max(local_counts[b]) as u64)
            })
            .collect();
        for set in list_batches(&differing, KEYS_PER_LIST) {
            self.sync_keys(peer, &set, direction, done).await?;
        }
        Ok(())
    }

    /// Exchanges the entries of `buckets` that differ between this node and `peer`.
    async fn sync_keys(
        &self,
        peer: &str,
        buckets: &BucketSet,
        direction: Direction,
        done: &mut SyncOutcome,
    ) -> Result<(), tonic::Status> {
        let req = pb::KeysRequest {
            buckets: buckets.to_bytes(),
        };
        self.count_bytes(bytes_of(&req));
        let remote = self.remote.keys(peer, req).await?;
        self.count_bytes(bytes_of(&remote));
        let mut theirs: HashMap<Vec<u8>, Version> = remote
            .keys
            .into_iter()
            .map(wire::key_version_from_pb)
            .collect();
        let mut pull = Vec::new();
        let mut push = Vec::new();
        for mine in self.local.list(buckets).await.map_err(unavailable)? {
            match theirs.remove(&mine.key) {
                Some(v) if v > mine.version => pull.push(mine.key),
                Some(v) if v == mine.version => {}
                _ => push.push(mine.key),
            }
        }
        pull.extend(theirs.into_keys());
        let mut outcome = SyncOutcome::default();
        let result = self
            .exchange(peer, pull, push, direction, &mut outcome)
            .await;
        done.pulled += outcome.pulled;
        done.pushed += outcome.pushed;
        tracing::debug!(
            peer,
            buckets = buckets.len(),
            pulled = outcome.pulled,
            pushed = outcome.pushed,
            "anti-entropy exchanged entries"
        );
        result
    }

    /// Pulls the entries of `pull` from `peer` and pushes those of `push` to it, in bounded
    /// batches, counting in `outcome` what each batch changed.
    async fn exchange(
        &self,
        peer: &str,
        pull: Vec<Vec<u8>>,
        push: Vec<Vec<u8>>,
        direction: Direction,
        outcome: &mut SyncOutcome,
    ) -> Result<(), tonic::Status> {
        if direction == Direction::Both {
            for keys in pull.chunks(ENTRIES_PER_BATCH) {
                let req = pb::FetchRequest {
                    keys: keys.to_vec(),
                };
                self.count_bytes(bytes_of(&req));
                let batch = self.remote.fetch(peer, req).await?;
                self.count_bytes(bytes_of(&batch));
                let entries: Vec<ReplicaEntry> =
                    batch.entries.into_iter().map(wire::entry_from_pb).collect();
                outcome.pulled += self.local.apply(entries).await.map_err(unavailable)?;
            }
        }
        for keys in push.chunks(ENTRIES_PER_BATCH) {
            let entries = self.local.fetch(keys.to_vec()).await.map_err(unavailable)?;
            for batch in batches(&entries) {
                let req = pb::EntryBatch {
                    entries: batch.iter().map(wire::entry_to_pb).collect(),
                };
                self.count_bytes(bytes_of(&req));
                let ack = self.remote.apply(peer, req).await?;
                self.count_bytes(bytes_of(&ack));
                outcome.pushed += ack.applied as usize;
            }
        }
        Ok(())
    }

    /// One round: compare every bucket shared with every other node of `ring`, then hand off
    /// the buckets this node holds but no longer replicates (dropping them when `may_drop`).
    pub async fn round(&self, ring: &Ring, may_drop: bool) {
        Counters::add(&self.counters.rounds, 1);
        let me = self.settings.me.as_str();
        let mut synced = BucketSet::default();
        let alone = ring.nodes().iter().all(|n| n == me);
        for peer in ring.nodes().iter().filter(|n| n.as_str() != me) {
            let shared = ring.shared_buckets(me, peer);
            if shared.is_empty() {
                continue;
            }
            let mut moved = SyncOutcome::default();
            let result = self.sync(peer, &shared, Direction::Both, &mut moved).await;
            Counters::add(&self.counters.pulled, moved.pulled);
            Counters::add(&self.counters.pushed, moved.pushed);
            match result {
                Ok(()) => synced.union_with(&shared),
                Err(status) => {
                    tracing::debug!(peer = %peer, error = %status.message(), "anti-entropy with peer failed");
                }
            }
        }
        // A bucket compared with at least one other replica now holds what that replica
        // held: this node's answers count again.
        self.update_syncing(|s| {
            if alone {
                *s = BucketSet::default();
            } else {
                s.subtract(&synced);
            }
        });
        self.hand_off(ring, may_drop).await;
    }

    /// Pushes the buckets this node holds but does not replicate in `ring` to their replicas,
    /// and drops them (when `may_drop`) once every replica holds the same. Returns true when
    /// every replica acknowledged.
    pub async fn hand_off(&self, ring: &Ring, may_drop: bool) -> bool {
        let me = self.settings.me.as_str();
        let leaves = match self.local.digests().await {
            Ok(leaves) => leaves,
            Err(e) => {
                tracing::debug!(error = %e, "hand-off: a core did not answer");
                return false;
            }
        };
        let plan = plan_hand_off(&leaves.counts, ring, me);
        if plan.orphans.is_empty() {
            return true;
        }
        let mut all_acked = true;
        for (node, theirs) in &plan.targets {
            // Push, then compare again: the second pass finds nothing to send once the replica
            // holds everything.
            let (mut first, mut again) = (SyncOutcome::default(), SyncOutcome::default());
            let pushed = self
                .sync(node, theirs, Direction::PushOnly, &mut first)
                .await;
            let settled = match pushed {
                Ok(()) => {
                    self.sync(node, theirs, Direction::PushOnly, &mut again)
                        .await
                }
                Err(status) => Err(status),
            };
            Counters::add(&self.counters.handed_off, first.pushed + again.pushed);
            match settled {
                Ok(()) if again.pushed == 0 => {}
                Ok(()) => all_acked = false,
                Err(status) => {
                    tracing::debug!(peer = %node, error = %status.message(), "hand-off failed");
                    all_acked = false;
                }
            }
        }
        if all_acked && may_drop && ring.nodes().iter().any(|n| n != me) {
            let orphans = &plan.orphans;
            match self.local.drop_buckets(orphans).await {
                Ok(dropped) => {
                    Counters::add(&self.counters.dropped, dropped);
                    tracing::info!(
                        buckets = orphans.len(),
                        entries = dropped,
                        "dropped buckets this node no longer replicates, now held by their replicas"
                    );
                }
                // Kept for the next round, which finds them orphaned again.
                Err(e) => tracing::debug!(error = %e, "dropping handed-off buckets failed"),
            }
        }
        all_acked
    }

    /// Runs rounds every interval and right after each ring change, forever.
    pub async fn run(self: Arc<Self>, mut rings: watch::Receiver<Arc<Ring>>) {
        let mut changed_at = Instant::now();
        // A node that starts holds nothing: every bucket syncs before its answers count.
        self.update_syncing(|s| *s = BucketSet::all());
        let mut previous: Option<Ring> = None;
        loop {
            let ring_changed = tokio::select! {
                _ = tokio::time::sleep(self.settings.interval) => false,
                r = rings.changed() => {
                    if r.is_err() {
                        return;
                    }
                    true
                }
            };
            if ring_changed {
                changed_at = Instant::now();
            }
            let ring = Ring::clone(&rings.borrow_and_update());
            if previous.as_ref() != Some(&ring) {
                // Buckets this node has just become a replica of.
                let me = self.settings.me.as_str();
                let mut fresh = BucketSet::default();
                for b in 0..BUCKETS {
                    let now_replica = ring.bucket_replicas(b).contains(&me);
                    let was = previous
                        .as_ref()
                        .map(|p| p.bucket_replicas(b).contains(&me))
                        .unwrap_or(false);
                    if now_replica && !was {
                        fresh.insert(b);
                    }
                }
                self.update_syncing(|s| s.union_with(&fresh));
                previous = Some(ring.clone());
            }
            let settled = changed_at.elapsed() >= self.settings.transition;
            self.round(&ring, settled).await;
        }
    }
}

/// What a hand-off moves, decided from what this node holds (`counts`, entries per bucket)
/// and the ring it hands off to: the buckets it holds but does not replicate there, and for
/// each other node the part of them that node replicates. Pure.
pub struct HandOff {
    pub orphans: BucketSet,
    pub targets: Vec<(String, BucketSet)>,
}

pub fn plan_hand_off(counts: &[u32], ring: &Ring, me: &str) -> HandOff {
    let mut orphans = BucketSet::default();
    for (b, &n) in counts.iter().enumerate() {
        if n > 0 && !ring.bucket_replicas(b).contains(&me) {
            orphans.insert(b);
        }
    }
    let mut targets = Vec::new();
    if !orphans.is_empty() {
        for node in ring.nodes().iter().filter(|n| n.as_str() != me) {
            let mut theirs = BucketSet::default();
            for b in orphans.iter() {
                if ring.bucket_replicas(b).contains(&node.as_str()) {
                    theirs.insert(b);
                }
            }
            if !theirs.is_empty() {
                targets.push((node.clone(), theirs));
            }
        }
    }
    HandOff { orphans, targets }
}

/// Groups (bucket, entries) into bucket sets of about `max_keys` entries each (a bucket bigger
/// than that goes alone).
fn list_batches(buckets: &[(usize, u64)], max_keys: u64) -> Vec<BucketSet> {
    let mut out = Vec::new();
    let mut set = BucketSet::default();
    let mut keys = 0;
    for &(b, n) in buckets {
        if !set.is_empty() && keys + n > max_keys {
            out.push(std::mem::take(&mut set));
            keys = 0;
        }
        set.insert(b);
        keys += n;
    }
    if !set.is_empty() {
        out.push(set);
    }
    out
}

/// Splits entries into batches of at most ENTRIES_PER_BATCH entries and about
/// BYTES_PER_BATCH bytes.
fn batches(entries: &[ReplicaEntry]) -> Vec<&[ReplicaEntry]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, e) in entries.iter().enumerate() {
        let size = e.key.len() + e.value.len() + 32;
        if i > start && (i - start >= ENTRIES_PER_BATCH || bytes + size > BYTES_PER_BATCH) {
            out.push(&entries[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

#[cfg(test)]
mod tests;
