//! Coordinating a client request over the key's replicas, on the core that owns the key's
//! shard on this node: the local replica is served in place, remote ones through this core's
//! peer clients, all in parallel; [`super::replication`] decides when enough have answered.
//! Calls still running when the decision is made finish in the background, so a write reaches
//! every replica that is up, and a read repairs the stale replicas it saw.

pub use super::replication::Level;

use super::{
    hints::Hints,
    membership::{state_of, Health, MemberState},
    peer::PeerClients,
    replication::{required, resolve, Outcome, Tally, Versioned},
    ring::Ring,
    snitch::SpeculativeRetry,
};
use crate::{
    engine::{
        command::{Command, ReplicaEntry, Reply, Request, Response},
        core::CoreEngine,
        entry::{FLAG_BINARY, FLAG_TOMBSTONE},
        hlc::Version,
    },
    error::Error,
    routing::{
        buckets::{bucket_of, BucketSet},
        ShardId,
    },
};
use futures_lite::future;
use glommio::channels::local_channel;
use std::{
    cell::{Cell, RefCell},
    future::Future,
    pin::Pin,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::watch;

/// How often a request waiting on replicas, with none left to ask, looks again at the failure
/// detector's verdicts: a replica declared DOWN meanwhile fails the wait well before the
/// client's deadline.
const HEALTH_RECHECK: Duration = Duration::from_millis(100);

/// How long a read keeps listening for late replicas and repairing them.
const REPAIR_WINDOW: Duration = Duration::from_secs(2);

impl Versioned for ReplicaEntry {
    fn version(&self) -> Version {
        self.version
    }
}

/// A request on its way to the core that owns its key: the engine's request, and the
/// consistency level the client asked for (the coordinator's business, not the engine's;
/// replica commands carry ONE, they act on this node alone).
#[derive(Debug)]
pub struct Routed {
    pub request: Request,
    pub level: Level,
}

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
async fn follow_one<T>(mut rx: watch::Receiver<Arc<T>>, apply: impl Fn(&T)) {
    while rx.changed().await.is_ok() {
        let latest = Arc::clone(&rx.borrow_and_update());
        apply(&latest);
    }
}

/// What a core needs to coordinate.
pub struct Coordinator {
    pub engine: Rc<CoreEngine>,
    pub peers: Rc<PeerClients>,
    /// This node's address, as the ring names it.
    pub me: String,
    /// This core's copy of the ring, replaced by message on membership change.
    pub ring: RefCell<Rc<Ring>>,
    pub write_quorum: usize,
    pub read_quorum: usize,
    pub tombstone_ttl_secs: u64,
    /// Replicas brought up to date by reads (a plain counter: this core only).
    pub read_repairs: std::cell::Cell<u64>,
    /// Writes that replicas missed, kept for when they answer again.
    pub hints: Rc<Hints>,
    /// Buckets this node is still receiving (from the side thread's anti-entropy).
    pub syncing: RefCell<Rc<BucketSet>>,
    /// The failure detector's verdicts, replaced by message on every change.
    pub health: RefCell<Rc<Health>>,
    /// SPECULATIVE_RETRY.
    pub speculative: SpeculativeRetry,
    /// Reads that asked one more replica because one was slower than its delay.
    pub speculative_retries: Cell<u64>,
    /// LINEARIZABLE reads that had to write their answer back.
    pub write_backs: Cell<u64>,
    /// Replicas left out of a request because the failure detector held them DOWN.
    pub skipped_down: Cell<u64>,
}

impl Coordinator {
    /// The tasks that keep this core's copies of the cluster views current; the core spawns
    /// them.
    pub fn follow(self: Rc<Self>, views: ClusterViews) -> [Pin<Box<dyn Future<Output = ()>>>; 3] {
        let (a, b, c) = (Rc::clone(&self), Rc::clone(&self), self);
        [
            Box::pin(follow_one(views.ring, move |ring: &Ring| {
                *a.ring.borrow_mut() = Rc::new(ring.clone())
            })),
            Box::pin(follow_one(views.health, move |health: &Health| {
                *b.health.borrow_mut() = Rc::new(health.clone())
            })),
            Box::pin(follow_one(views.syncing, move |syncing: &BucketSet| {
                *c.syncing.borrow_mut() = Rc::new(syncing.clone())
            })),
        ]
    }

    pub fn ring(&self) -> Rc<Ring> {
        Rc::clone(&self.ring.borrow())
    }

    /// Whether this node's answers about `key` must not count toward a quorum: it is still
    /// receiving the key's bucket (just started, or a new replica of it after a ring change),
    /// or its ring does not make it a replica of the key at all (a coordinator heard of a ring
    /// change before this node did). Such a replica may hold nothing, or an old version, while
    /// a coordinator with the other view counted the replicas that hold the newest: only
    /// answers from settled replicas keep every QUORUM read meeting every QUORUM write.
    pub fn syncing(&self, key: &[u8]) -> bool {
        self.bucket_syncing(key) || !self.ring.borrow().is_replica(key, &self.me)
    }

    /// `syncing` for this node's own answer in a request it coordinates: the ring it planned
    /// with put it among the key's replicas, so only the bucket is left to check.
    fn bucket_syncing(&self, key: &[u8]) -> bool {
        self.syncing.borrow().contains(bucket_of(key))
    }

    /// True when this node is the key's only replica: the request needs no coordination and is
    /// served by the shard directly (the single-node fast path).
    pub fn is_local_only(&self, ring: &Ring, key: &[u8]) -> bool {
        ring.replication_factor() == 1 && {
            let r = ring.replicas(key);
            r.len() == 1 && r[0] == self.me
        } || ring.is_empty()
    }

    fn local(&self, shard: ShardId, command: Command, deadline: Instant) -> Response {
        self.engine.execute(Request {
            shard,
            command,
            deadline,
        })
    }

    /// The key's replicas, this node first when it is one, then the others by health and
    /// recent latency (the fastest first; SUSPECT ones last), with the DOWN ones left out:
    /// (the live ones in asking order, the DOWN ones).
    fn rank(&self, ring: &Ring, key: &[u8], health: &Health) -> (Vec<String>, Vec<String>) {
        let now = Instant::now();
        let mut live: Vec<(bool, f64, String)> = Vec::with_capacity(ring.replication_factor());
        let mut down = Vec::new();
        for addr in ring.replicas(key) {
            match state_of(health, addr) {
                _ if addr == self.me => live.push((false, f64::MIN, addr.to_string())),
                MemberState::Down => down.push(addr.to_string()),
                state => live.push((
                    state == MemberState::Suspect,
                    self.peers.score_us(addr, now),
                    addr.to_string(),
                )),
            }
        }
        live.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        (live.into_iter().map(|(_, _, a)| a).collect(), down)
    }

    fn health(&self) -> Rc<Health> {
        Rc::clone(&self.health.borrow())
    }

    /// The replicas of `key` to ask, live ones in asking order (see `rank`), the DOWN ones,
    /// and how many must answer for `level`; TooFewLive at once when the live ones cannot.
    #[allow(clippy::type_complexity)]
    fn plan(
        &self,
        key: &[u8],
        level: Level,
        quorum: usize,
    ) -> Result<(Vec<String>, Vec<String>, usize), Error> {
        let ring = self.ring();
        let (live, down) = self.rank(&ring, key, &self.health());
        let total = live.len() + down.len();
        let needed = required(level, total, quorum);
        self.skipped_down
            .set(self.skipped_down.get() + down.len() as u64);
        if live.len() < needed {
            return Err(Error::TooFewLive {
                live: live.len(),
                needed,
                total,
            });
        }
        Ok((live, down, needed))
    }

    /// Stops waiting for the replicas (bits of `waiting`, by index in `replicas`) that the
    /// failure detector declared DOWN meanwhile: they will not answer. Returns how many.
    fn stop_waiting_for_down(&self, replicas: &[String], waiting: &mut u64) -> usize {
        let health = self.health.borrow();
        let mut n = 0;
        for (i, addr) in replicas.iter().enumerate() {
            if *waiting & (1 << i) != 0 && state_of(&health, addr) == MemberState::Down {
                *waiting &= !(1 << i);
                n += 1;
            }
        }
        n
    }

    /// Writes `entry` to every replica; Ok(any replica had a live value) once `needed` have
    /// stored it. Replicas the failure detector holds DOWN are not called: they get the write
    /// as a hint. When too few replicas are up for the level the write is refused at once and
    /// made nowhere, as Cassandra's UnavailableException: a definite failure the client may
    /// retry, not a write that surfaces later through hints.
    async fn replicate(
        self: &Rc<Self>,
        shard: ShardId,
        entry: ReplicaEntry,
        level: Level,
        deadline: Instant,
    ) -> Result<bool, Error> {
        let (live, down, needed) = self.plan(&entry.key, level, self.write_quorum)?;
        let total = live.len() + down.len();
        let now = Instant::now();
        for addr in &down {
            self.hints.store(addr, entry.clone(), now);
        }
        let mut tally = Tally::new(needed, live.len());
        let mut existed = false;
        // (index in `live`, Ok((existed, syncing)) or a failure).
        let (tx, rx) = local_channel::new_unbounded::<(usize, Result<(bool, bool), ()>)>();
        let tx = Rc::new(tx);
        let entry = Rc::new(entry);
        // Which of `live` are still being waited for (a bit each: REPLICATION_FACTOR is at most
        // 64, config.rs).
        let mut waiting: u64 = 0;
        for (i, addr) in live.iter().enumerate() {
            if *addr == self.me {
                match self.local(shard, Command::Apply((*entry).clone()), deadline) {
                    Ok(Reply::Applied { existed: e, .. }) => {
                        existed |= e;
                        if counts(level, true, self.bucket_syncing(&entry.key)) {
                            tally.ok();
                        } else {
                            tally.fail();
                        }
                    }
                    _ => {
                        tally.fail();
                    }
                }
                continue;
            }
            waiting |= 1 << i;
            let (peers, entry, tx) = (Rc::clone(&self.peers), Rc::clone(&entry), Rc::clone(&tx));
            let (hints, addr) = (Rc::clone(&self.hints), addr.clone());
            glommio::spawn_local(async move {
                let r = peers.write(&addr, &entry, deadline).await.map_err(|_| ());
                if r.is_err() {
                    // Down, cut off or slow: it gets the write when it answers again, whether
                    // or not the quorum was reached without it.
                    hints.store(&addr, (*entry).clone(), Instant::now());
                }
                let _ = tx.try_send((i, r));
            })
            .detach();
        }
        drop(tx);
        loop {
            match tally.outcome() {
                Outcome::Reached => return Ok(existed),
                Outcome::Impossible => {
                    return Err(Error::Unavailable {
                        answered: tally.ok,
                        needed,
                        total,
                    })
                }
                Outcome::Pending => {}
            }
            match recv_until(&rx, deadline.min(Instant::now() + HEALTH_RECHECK)).await {
                Some((i, r)) => {
                    if waiting & (1 << i) == 0 {
                        continue;
                    }
                    waiting &= !(1 << i);
                    match r {
                        Ok((e, syncing)) => {
                            existed |= e;
                            if counts(level, true, syncing) {
                                tally.ok();
                            } else {
                                tally.fail();
                            }
                        }
                        Err(()) => {
                            tally.fail();
                        }
                    }
                }
                None if Instant::now() >= deadline => return Err(Error::DeadlineExceeded),
                None => {
                    // Their calls go on, and store a hint when they fail.
                    for _ in 0..self.stop_waiting_for_down(&live, &mut waiting) {
                        tally.fail();
                    }
                }
            }
        }
    }

    /// Serves a client Get, Set or Delete.
    pub async fn coordinate(self: Rc<Self>, routed: Routed) -> Response {
        let Routed {
            request:
                Request {
                    shard,
                    command,
                    deadline,
                },
            level,
        } = routed;
        match command {
            Command::Set {
                key,
                value,
                ttl_secs,
                binary,
            } => {
                let key = match level {
                    Level::Linearizable => self.version_above_quorum(shard, key, deadline).await?,
                    _ => key,
                };
                let version = self.engine.next_version();
                let entry = ReplicaEntry {
                    key,
                    value,
                    version,
                    ttl_ms: CoreEngine::ttl_ms(ttl_secs),
                    flags: if binary { FLAG_BINARY } else { 0 },
                };
                self.replicate(shard, entry, level, deadline).await?;
                Ok(Reply::Stored { version })
            }
            Command::Delete { key } => {
                let key = match level {
                    Level::Linearizable => self.version_above_quorum(shard, key, deadline).await?,
                    _ => key,
                };
                let entry = ReplicaEntry {
                    key,
                    value: Vec::new(),
                    version: self.engine.next_version(),
                    ttl_ms: self.tombstone_ttl_secs.saturating_mul(1000).max(1),
                    flags: FLAG_TOMBSTONE,
                };
                let existed = self.replicate(shard, entry, level, deadline).await?;
                Ok(Reply::Deleted { existed })
            }
            Command::Get { key } => {
                let key = Rc::new(key);
                let Learned { newest, settled } =
                    self.query(shard, Rc::clone(&key), level, deadline).await?;
                let newest = match newest {
                    // Nobody had it; replicas that answer later cannot hold anything newer
                    // than what a quorum lacked.
                    None => return Err(Error::not_found(&key)),
                    Some(newest) => newest,
                };
                if level == Level::Linearizable && !settled {
                    // What this read returns must be on a quorum before the answer leaves, or
                    // a later read could miss it and go back in time.
                    self.write_backs.set(self.write_backs.get() + 1);
                    self.replicate(shard, newest.clone(), Level::Linearizable, deadline)
                        .await?;
                }
                if newest.flags & FLAG_TOMBSTONE != 0 {
                    return Err(Error::not_found(&key));
                }
                Ok(Reply::Value {
                    binary: newest.flags & FLAG_BINARY != 0,
                    value: newest.value,
                    version: newest.version,
                })
            }
            // Replica commands never reach the coordinator (ingress sends them to the shard).
            other => self.local(shard, other, deadline),
        }
    }

    /// The first round of a LINEARIZABLE write: the newest version a quorum holds, observed by
    /// this core's clock so that the write's version is above it even when this node's wall
    /// clock is behind the writer of that version. Gives the key back.
    async fn version_above_quorum(
        self: &Rc<Self>,
        shard: ShardId,
        key: Vec<u8>,
        deadline: Instant,
    ) -> Result<Vec<u8>, Error> {
        let key = Rc::new(key);
        let learned = self
            .query(shard, Rc::clone(&key), Level::Linearizable, deadline)
            .await?;
        if let Some(newest) = learned.newest {
            self.engine.observe(newest.version);
        }
        // The read's late answers may still hold the key; then it is copied (keys are short).
        Ok(Rc::try_unwrap(key).unwrap_or_else(|key| (*key).clone()))
    }

    /// Reads `key` from the replicas `level` needs and repairs the stale ones it hears from.
    async fn query(
        self: &Rc<Self>,
        shard: ShardId,
        key: Rc<Vec<u8>>,
        level: Level,
        deadline: Instant,
    ) -> Result<Learned, Error> {
        // This node first (its answer costs no round trip), then the fastest live replicas.
        let (replicas, down, needed) = self.plan(&key, level, self.read_quorum)?;
        let total = replicas.len() + down.len();
        let mut tally = Tally::new(needed, replicas.len());
        let counts =
            |answer: &Option<ReplicaEntry>, syncing: bool| counts(level, answer.is_some(), syncing);
        // (replica, its answer) for every replica that answered.
        let mut answers: Vec<(String, Option<ReplicaEntry>)> = Vec::with_capacity(replicas.len());
        #[allow(clippy::type_complexity)]
        let (tx, rx) =
            local_channel::new_unbounded::<(usize, Result<(Option<ReplicaEntry>, bool), ()>)>();
        let tx = Rc::new(tx);
        // Only as many replicas as the level needs are asked (quorum intersection needs no
        // more), and one more for each that fails or is slower than its speculative delay: a
        // QUORUM read of RF=3 costs one remote call, not two.
        let mut asked = 0;
        // Replicas asked and not answered yet (a bit each, by index in `replicas`), and the
        // instant after which the read stops waiting for the slowest of them alone.
        let mut waiting: u64 = 0;
        // Of those, the ones slower than their speculative delay: still heard if they answer,
        // but no longer counted on.
        let mut written_off: u64 = 0;
        let mut speculate_at: Vec<Option<Instant>> = vec![None; replicas.len()];
        loop {
            while asked < replicas.len()
                && tally.ok + ((waiting & !written_off).count_ones() as usize) < needed
            {
                let i = asked;
                asked += 1;
                let addr = &replicas[i];
                if *addr == self.me {
                    match self.local(
                        shard,
                        Command::Read {
                            key: (*key).clone(),
                        },
                        deadline,
                    ) {
                        Ok(Reply::Entry(e)) => {
                            if counts(&e, self.bucket_syncing(&key)) {
                                tally.ok();
                            } else {
                                tally.fail();
                            }
                            answers.push((addr.clone(), e));
                        }
                        _ => {
                            tally.fail();
                        }
                    }
                    continue;
                }
                waiting |= 1 << i;
                speculate_at[i] = self
                    .peers
                    .speculate_after(addr, self.speculative)
                    .map(|after| Instant::now() + after);
                let (peers, key, tx) = (Rc::clone(&self.peers), Rc::clone(&key), Rc::clone(&tx));
                let addr = addr.clone();
                glommio::spawn_local(async move {
                    let r = peers.read(&addr, &key, deadline).await.map_err(|_| ());
                    let _ = tx.try_send((i, r));
                })
                .detach();
            }
            match tally.outcome() {
                Outcome::Reached => break,
                Outcome::Impossible => {
                    return Err(Error::Unavailable {
                        answered: tally.ok,
                        needed,
                        total,
                    })
                }
                Outcome::Pending => {}
            }
            if waiting == 0 {
                // Everyone was asked and nobody is left to answer.
                return Err(Error::Unavailable {
                    answered: tally.ok,
                    needed,
                    total,
                });
            }
            // Speculative retry: a replica that is slow (paused, partitioned) must not hold the
            // read while another replica could answer. With nobody left to ask, the wait is
            // cut in slices so that a replica declared DOWN meanwhile stops holding it.
            let spare = asked < replicas.len();
            let hopeful = waiting & !written_off;
            let next_speculation = (0..replicas.len())
                .filter(|i| hopeful & (1 << i) != 0)
                .filter_map(|i| speculate_at[i])
                .min()
                .filter(|_| spare);
            let wake_at = next_speculation
                .unwrap_or_else(|| Instant::now() + HEALTH_RECHECK)
                .min(deadline);
            match recv_until(&rx, wake_at).await {
                Some((i, answer)) => {
                    if waiting & (1 << i) == 0 {
                        continue;
                    }
                    waiting &= !(1 << i);
                    written_off &= !(1 << i);
                    match answer {
                        Ok((e, syncing)) => {
                            if counts(&e, syncing) {
                                tally.ok();
                            } else {
                                tally.fail();
                            }
                            answers.push((replicas[i].clone(), e));
                        }
                        Err(()) => {
                            tally.fail();
                        }
                    }
                }
                None if Instant::now() >= deadline => return Err(Error::DeadlineExceeded),
                None => {
                    // Replicas past their speculative delay are written off, so the loop's
                    // next turn asks one more for each; they may still answer and count.
                    let now = Instant::now();
                    for (i, at) in speculate_at.iter().enumerate() {
                        if spare && hopeful & (1 << i) != 0 && at.is_some_and(|at| now >= at) {
                            written_off |= 1 << i;
                            self.speculative_retries
                                .set(self.speculative_retries.get() + 1);
                        }
                    }
                    for _ in 0..self.stop_waiting_for_down(&replicas, &mut waiting) {
                        tally.fail();
                    }
                    written_off &= waiting;
                }
            }
        }
        drop(tx);
        let entries: Vec<Option<ReplicaEntry>> = answers.iter().map(|(_, e)| e.clone()).collect();
        let Some((winner, stale)) = resolve(&entries) else {
            // Nobody had it: nothing to repair.
            return Ok(Learned {
                newest: None,
                settled: true,
            });
        };
        let newest = entries[winner].clone().expect("the winner has an entry");
        let holders = answers.len() - stale.len();
        let settled = holders >= required(Level::Linearizable, total, self.write_quorum);
        // Read repair: bring every replica that answered stale or empty up to the winner, now
        // for those that answered in time and in the background for those that answer later.
        // Repairs get their own window: the client's deadline is about its answer, not theirs.
        let deadline = deadline.max(Instant::now() + REPAIR_WINDOW);
        for i in stale {
            self.repair(shard, answers[i].0.clone(), newest.clone(), deadline);
        }
        {
            let this = Rc::clone(self);
            let newest = newest.clone();
            glommio::spawn_local(async move {
                while let Some((i, answer)) = recv_until(&rx, deadline).await {
                    let behind = match answer {
                        Ok((Some(e), _)) => e.version < newest.version,
                        Ok((None, _)) => true,
                        Err(()) => false,
                    };
                    if behind {
                        this.repair(shard, replicas[i].clone(), newest.clone(), deadline);
                    }
                }
            })
            .detach();
        }
        Ok(Learned {
            newest: Some(newest),
            settled,
        })
    }
}

/// What a quorum read learned.
struct Learned {
    /// The newest entry among the answers, tombstones included.
    newest: Option<ReplicaEntry>,
    /// Whether a write quorum of the answers already held it: a LINEARIZABLE read then needs
    /// no write-back (the common case when no write is under way).
    settled: bool,
}

impl Coordinator {
    /// Writes `entry` to the replica `addr` (this node's shard in place), best effort.
    fn repair(
        self: &Rc<Self>,
        shard: ShardId,
        addr: String,
        entry: ReplicaEntry,
        deadline: Instant,
    ) {
        self.read_repairs.set(self.read_repairs.get() + 1);
        if addr == self.me {
            let _ = self.local(shard, Command::Apply(entry), deadline);
            return;
        }
        let peers = Rc::clone(&self.peers);
        glommio::spawn_local(async move {
            let _ = peers.write(&addr, &entry, deadline).await;
        })
        .detach();
    }
}

/// Whether a replica's answer counts toward `level`'s quorum. `found`: it held the key (a
/// write's acknowledgement always counts as found); `syncing`: see [`Coordinator::syncing`].
/// At QUORUM and LINEARIZABLE a syncing replica never counts (what it holds, a value or
/// nothing, may be older than what a settled quorum acknowledged); it is still heard, and read
/// repaired. At ONE and ALL, which promise no intersection, only its "not found" is no answer,
/// so a read asks another replica rather than miss a key still on its way.
fn counts(level: Level, found: bool, syncing: bool) -> bool {
    match level {
        Level::Quorum | Level::Linearizable => !syncing,
        Level::One | Level::All => found || !syncing,
    }
}

/// The next message, or None when the deadline passes (or every sender is gone).
async fn recv_until<T>(rx: &local_channel::LocalReceiver<T>, deadline: Instant) -> Option<T> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return None;
    }
    future::or(rx.recv(), async move {
        glommio::timer::sleep(left).await;
        None
    })
    .await
}
