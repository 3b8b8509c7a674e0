//! The control plane's questions to the cores, asked through `executors`' sharded API: one
//! core (entries go to the core that owns their shard) or every core (figures, digests, key
//! lists), each with a deadline. The answers are computed on the cores, as background tasks;
//! this side only waits for them.

use crate::{
    cluster::antientropy::LocalReplica,
    engine::{
        command::ReplicaEntry,
        core::{CoreDemand, KeyVersion, Leaves},
    },
    ingress::{grpc::server::Event, CoreCtx},
    observability::metrics::CoreSnapshot,
    routing::{buckets::BucketSet, owner_core, shard_of, ShardId},
    security::{tls::HandshakeFailure, Refusal},
};
use executors::{Sharded, Unanswered};
use std::{
    future::Future,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

/// How long a scrape waits for a core's figures: a core that does not answer in time is left
/// out of that scrape rather than stall it.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long anti-entropy and data movement wait for a core (a list or a drop scans all of a
/// core's entries, yielding to requests as it goes).
const SCAN_TIMEOUT: Duration = Duration::from_secs(30);

/// The node's cores, as the control plane asks them. `Send`, cheap to clone.
#[derive(Clone)]
pub struct Cores {
    pub sharded: Sharded<CoreCtx>,
    pub num_shards: u32,
}

impl Cores {
    /// The figures of every core that answered within SNAPSHOT_TIMEOUT, in core order.
    pub async fn snapshots(&self) -> Vec<CoreSnapshot> {
        self.sharded
            .invoke_on_all(SNAPSHOT_TIMEOUT, |ctx| async move { snapshot(&ctx) })
            .await
            .into_iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// What every core holds and wanted since the last call, or None when a core did not
    /// answer in time (the memory rebalancer then skips the round).
    pub async fn demands(&self) -> Option<Vec<CoreDemand>> {
        self.sharded
            .invoke_on_all(
                SNAPSHOT_TIMEOUT,
                |ctx| async move { ctx.engine.take_demand() },
            )
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .ok()
    }

    /// Gives `core` its share of the node's memory budget; it evicts down to it before it
    /// answers.
    pub async fn set_share(
        &self,
        core: usize,
        bytes: u64,
        entries: Option<u64>,
    ) -> Result<(), Unanswered> {
        let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
        self.sharded
            .send(core, deadline, move |ctx| async move {
                ctx.engine.set_share(bytes, entries)
            })
            .await
            .answer()
            .await
    }

    /// Installs reloaded TLS material and tokens on every core; how many took them.
    pub async fn install_security(&self, material: Arc<crate::security::Material>) -> usize {
        self.sharded
            .invoke_on_all(SNAPSHOT_TIMEOUT, move |ctx| {
                let material = Arc::clone(&material);
                async move {
                    ctx.security.install(&material);
                    ctx.coordinator
                        .peers
                        .set_tls(material.tls.as_ref().map(|t| t.client.clone()));
                }
            })
            .await
            .into_iter()
            .filter(Result::is_ok)
            .count()
    }

    /// `items` grouped by the core that owns their key's shard, with the shard.
    fn by_core<T>(&self, items: Vec<T>, key: impl Fn(&T) -> &[u8]) -> Vec<Vec<(ShardId, T)>> {
        let nr_cores = self.sharded.nr_cores();
        let mut per_core: Vec<Vec<_>> = (0..nr_cores).map(|_| Vec::new()).collect();
        for item in items {
            let shard = shard_of(key(&item), self.num_shards);
            per_core[owner_core(shard, nr_cores)].push((shard, item));
        }
        per_core
    }

    /// Runs `scan` over `buckets` on every core and folds the answers with `reduce`.
    async fn scan_all<R, A, F, Fut>(
        &self,
        buckets: &BucketSet,
        scan: F,
        init: A,
        reduce: impl FnMut(A, R) -> A,
    ) -> Result<A, Unanswered>
    where
        R: Send + 'static,
        F: Fn(Rc<CoreCtx>, Arc<BucketSet>) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = R> + 'static,
    {
        let buckets = Arc::new(buckets.clone());
        let per_core = move |ctx| scan(ctx, Arc::clone(&buckets));
        self.sharded
            .map_reduce(SCAN_TIMEOUT, per_core, init, reduce)
            .await
    }

    /// Sends each core its share of `items` at once and gathers the answers; fails when a
    /// core with a share does not answer.
    async fn each_core<T, R, F, Fut>(
        &self,
        items: Vec<T>,
        key: impl Fn(&T) -> &[u8],
        f: F,
    ) -> Result<Vec<R>, Unanswered>
    where
        T: Send + 'static,
        R: Send + 'static,
        F: Fn(Rc<CoreCtx>, Vec<(ShardId, T)>) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = R> + 'static,
    {
        let deadline = Instant::now() + SCAN_TIMEOUT;
        let mut pending = Vec::new();
        for (core, share) in self.by_core(items, key).into_iter().enumerate() {
            if share.is_empty() {
                continue;
            }
            let f = f.clone();
            pending.push(
                self.sharded
                    .send(core, deadline, move |ctx| f(ctx, share))
                    .await,
            );
        }
        let mut answers = Vec::with_capacity(pending.len());
        for p in pending {
            answers.push(p.answer().await?);
        }
        Ok(answers)
    }
}

impl LocalReplica for Cores {
    async fn digests(&self) -> Result<Leaves, Unanswered> {
        self.sharded
            .map_reduce(
                SCAN_TIMEOUT,
                |ctx| async move { ctx.engine.digests() },
                Leaves::default(),
                |mut all, core| {
                    all.add(&core.digests, &core.counts);
                    all
                },
            )
            .await
    }

    async fn list(&self, buckets: &BucketSet) -> Result<Vec<KeyVersion>, Unanswered> {
        let scan = |ctx: Rc<CoreCtx>, buckets: Arc<BucketSet>| async move {
            ctx.engine.list(&buckets).await
        };
        self.scan_all(buckets, scan, Vec::new(), |mut all, core| {
            all.extend(core);
            all
        })
        .await
    }

    async fn fetch(&self, keys: Vec<Vec<u8>>) -> Result<Vec<ReplicaEntry>, Unanswered> {
        let per_core = self
            .each_core(
                keys,
                |k| k,
                |ctx, keys| async move { ctx.engine.fetch(&keys) },
            )
            .await?;
        Ok(per_core.into_iter().flatten().collect())
    }

    async fn apply(&self, entries: Vec<ReplicaEntry>) -> Result<usize, Unanswered> {
        let per_core = self
            .each_core(
                entries,
                |e| &e.key,
                |ctx, entries| async move { ctx.engine.apply_all(entries) },
            )
            .await?;
        Ok(per_core.into_iter().sum())
    }

    async fn drop_buckets(&self, buckets: &BucketSet) -> Result<usize, Unanswered> {
        let scan = |ctx: Rc<CoreCtx>, buckets: Arc<BucketSet>| async move {
            ctx.engine.drop_buckets(&buckets).await
        };
        self.scan_all(buckets, scan, 0, |all, core| all + core)
            .await
    }
}

/// A core's figures, taken on the core.
fn snapshot(ctx: &CoreCtx) -> CoreSnapshot {
    let router = &ctx.router;
    let in_flight = (0..router.nr_cores())
        .filter(|&c| c != router.core())
        .map(|c| router.in_flight(c) as u64)
        .sum();
    let coordinator = &ctx.coordinator;
    let mut snapshot = ctx.metrics.snapshot(
        router.core(),
        in_flight,
        ctx.engine.stats(),
        ctx.engine.panics(),
    );
    snapshot.replica_calls = coordinator.peers.outcome_counts();
    snapshot.peer_bytes = coordinator.peers.bytes();
    snapshot.replica_batches = coordinator.peers.batches();
    snapshot.read_repairs = coordinator.read_repairs.get();
    snapshot.speculative_retries = coordinator.speculative_retries.get();
    snapshot.write_backs = coordinator.write_backs.get();
    snapshot.skipped_down = coordinator.skipped_down.get();
    snapshot.peer_scores = coordinator.peers.latency_scores(coordinator.speculative);
    snapshot.hints = coordinator.hints.counts();
    snapshot.http2_events = named_counts(&Event::ALL, Event::name, &ctx.http2_events);
    snapshot.connections_shed = ctx.connections_shed.get();
    let security = &ctx.security;
    snapshot.tls_handshakes = security.handshakes.get();
    snapshot.tls_handshake_failures = named_counts(
        &HandshakeFailure::ALL,
        HandshakeFailure::name,
        &security.handshake_failures,
    );
    snapshot.refused = named_counts(&Refusal::ALL, Refusal::name, &security.refused);
    snapshot.reply_bytes = ctx.reply_bytes.get() as u64;
    snapshot
}

/// (name, count) of counters kept in the order of `all`.
fn named_counts<T: Copy>(
    all: &[T],
    name: fn(T) -> &'static str,
    counts: &[std::cell::Cell<u64>],
) -> Vec<(&'static str, u64)> {
    all.iter()
        .zip(counts)
        .map(|(&what, n)| (name(what), n.get()))
        .collect()
}
