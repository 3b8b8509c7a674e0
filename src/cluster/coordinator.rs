//! Coordinating a client request over the key's replicas, on the core that owns the key's
//! shard on this node: the driver of [`super::plan`]'s plans. The local replica is served in
//! place, remote ones through the core's [`PeerTransport`], all in parallel; the plan decides
//! whom to ask, when enough have answered, and who needs repair. Calls still running when the
//! decision is made finish in the background, so a write reaches every replica that is up
//! (and a replica that misses it gets a hint), and a read repairs the stale replicas it saw.

pub use super::replication::Level;

use super::{
    hints::Hints,
    membership::{state_of, Health, MemberState},
    peer::PeerClients,
    plan::{late_answer_is_stale, Learned, ReadAnswer, ReadPlan, ReadStep, WriteAnswer, WritePlan},
    ring::Ring,
    snitch::SpeculativeRetry,
    transport::PeerTransport,
    views::{follow_one, ClusterViews},
};
use crate::{
    engine::{
        command::{Command, ReplicaEntry, Reply, Request, Response},
        core::CoreEngine,
        entry::{FLAG_BINARY, FLAG_TOMBSTONE},
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
    time::{Duration, Instant},
};

/// How long a read keeps listening for late replicas and repairing them.
const REPAIR_WINDOW: Duration = Duration::from_secs(2);

/// A request on its way to the core that owns its key: the engine's request, and the
/// consistency level the client asked for (the coordinator's business, not the engine's;
/// replica commands carry ONE, they act on this node alone).
#[derive(Debug)]
pub struct Routed {
    pub request: Request,
    pub level: Level,
}

/// What a core needs to coordinate.
/// Generic over the transport so that tests can drive it with an in-memory one.
pub struct Coordinator<P = PeerClients> {
    pub engine: Rc<CoreEngine>,
    pub peers: Rc<P>,
    /// This node's address, as the ring names it.
    pub me: String,
    /// This core's copy of the ring, replaced when the control plane publishes a new one.
    pub ring: RefCell<Rc<Ring>>,
    pub write_quorum: usize,
    pub read_quorum: usize,
    pub tombstone_ttl_secs: u64,
    /// Replicas brought up to date by reads (a plain counter: this core only).
    pub read_repairs: std::cell::Cell<u64>,
    /// Writes that replicas missed, kept for when they answer again.
    pub hints: Rc<Hints>,
    /// Buckets this node is still receiving (from the control plane's anti-entropy).
    pub syncing: RefCell<Rc<BucketSet>>,
    /// The failure detector's verdicts, replaced on every change.
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

impl<P: PeerTransport> Coordinator<P> {
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

    fn is_down(&self, addr: &str) -> bool {
        state_of(&self.health.borrow(), addr) == MemberState::Down
    }

    /// The key's replicas, this node first when it is one, then the others by health and
    /// recent latency (the fastest first; SUSPECT ones last), with the DOWN ones left out:
    /// (the live ones in asking order, the DOWN ones).
    fn rank(&self, key: &[u8]) -> (Vec<String>, Vec<String>) {
        let ring = self.ring();
        let health = Rc::clone(&self.health.borrow());
        let now = Instant::now();
        let mut live: Vec<(bool, f64, String)> = Vec::with_capacity(ring.replication_factor());
        let mut down = Vec::new();
        for addr in ring.replicas(key) {
            match state_of(&health, addr) {
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
        self.skipped_down
            .set(self.skipped_down.get() + down.len() as u64);
        (live.into_iter().map(|(_, _, a)| a).collect(), down)
    }

    /// Writes `entry` to every live replica; Ok(any replica had a live value) once the level's
    /// quorum stored it. Replicas the failure detector holds DOWN are not called: they get
    /// the write as a hint, as does every replica whose call fails.
    async fn replicate(
        self: &Rc<Self>,
        shard: ShardId,
        entry: ReplicaEntry,
        level: Level,
        deadline: Instant,
    ) -> Result<bool, Error> {
        let (live, down) = self.rank(&entry.key);
        let mut plan = WritePlan::new(level, live.len(), down.len(), self.write_quorum)?;
        let now = Instant::now();
        for addr in &down {
            self.hints.store(addr, entry.clone(), now);
        }
        let (tx, rx) = local_channel::new_unbounded::<(usize, WriteAnswer)>();
        let tx = Rc::new(tx);
        let entry = Rc::new(entry);
        for (i, addr) in live.iter().enumerate() {
            if *addr == self.me {
                let answer = match self.local(shard, Command::Apply((*entry).clone()), deadline) {
                    Ok(Reply::Applied { existed, .. }) => {
                        Ok((existed, self.bucket_syncing(&entry.key)))
                    }
                    _ => Err(()),
                };
                plan.answer(i, answer);
                continue;
            }
            let (peers, entry, tx) = (Rc::clone(&self.peers), Rc::clone(&entry), Rc::clone(&tx));
            let (hints, addr) = (Rc::clone(&self.hints), addr.clone());
            glommio::spawn_local(async move {
                let answer = peers.write(&addr, &entry, deadline).await.map_err(|_| ());
                if answer.is_err() {
                    // Down, cut off or slow: it gets the write when it answers again, whether
                    // or not the quorum was reached without it.
                    hints.store(&addr, (*entry).clone(), Instant::now());
                }
                let _ = tx.try_send((i, answer));
            })
            .detach();
        }
        drop(tx);
        loop {
            if let Some(outcome) = plan.outcome() {
                return outcome;
            }
            match recv_until(&rx, plan.wake_at(Instant::now(), deadline)).await {
                Some((i, answer)) => plan.answer(i, answer),
                None => {
                    let timed_out =
                        plan.on_timer(Instant::now(), deadline, |i| self.is_down(&live[i]));
                    if let Some(outcome) = timed_out {
                        return outcome;
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
                let Learned {
                    newest, settled, ..
                } = self.query(shard, Rc::clone(&key), level, deadline).await?;
                let Some(newest) = newest else {
                    return Err(Error::not_found(&key));
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

    /// Reads `key` from the replicas `level` needs and repairs the stale ones it hears from:
    /// at once those that answered in time, in the background those that answer later.
    async fn query(
        self: &Rc<Self>,
        shard: ShardId,
        key: Rc<Vec<u8>>,
        level: Level,
        deadline: Instant,
    ) -> Result<Learned, Error> {
        let (replicas, down) = self.rank(&key);
        let mut plan = ReadPlan::new(level, replicas.len(), down.len(), self.read_quorum)?;
        let (tx, rx) = local_channel::new_unbounded::<(usize, ReadAnswer)>();
        let tx = Rc::new(tx);
        loop {
            match plan.next(Instant::now(), deadline) {
                ReadStep::Ask(i) if replicas[i] == self.me => {
                    plan.asked(i, None);
                    let read = Command::Read {
                        key: (*key).clone(),
                    };
                    let answer = match self.local(shard, read, deadline) {
                        Ok(Reply::Entry(e)) => Ok((e, self.bucket_syncing(&key))),
                        _ => Err(()),
                    };
                    plan.answer(i, answer);
                }
                ReadStep::Ask(i) => {
                    let addr = replicas[i].clone();
                    let speculate_at = self
                        .peers
                        .speculate_after(&addr, self.speculative)
                        .map(|after| Instant::now() + after);
                    plan.asked(i, speculate_at);
                    let (peers, key, tx) =
                        (Rc::clone(&self.peers), Rc::clone(&key), Rc::clone(&tx));
                    glommio::spawn_local(async move {
                        let answer = peers.read(&addr, &key, deadline).await.map_err(|_| ());
                        let _ = tx.try_send((i, answer));
                    })
                    .detach();
                }
                ReadStep::Wait(until) => match recv_until(&rx, until).await {
                    Some((i, answer)) => {
                        plan.answer(i, answer);
                    }
                    None => {
                        let now = Instant::now();
                        let retries =
                            plan.on_timer(now, deadline, |i| self.is_down(&replicas[i]))?;
                        self.speculative_retries
                            .set(self.speculative_retries.get() + retries);
                    }
                },
                ReadStep::Done(outcome) => {
                    outcome?;
                    break;
                }
            }
        }
        drop(tx);
        let learned = plan.learned(self.write_quorum);
        let Some(newest) = &learned.newest else {
            return Ok(learned);
        };
        // Repairs get their own window: the client's deadline is about its answer, not theirs.
        let deadline = deadline.max(Instant::now() + REPAIR_WINDOW);
        for &i in &learned.stale {
            self.repair(shard, replicas[i].clone(), newest.clone(), deadline);
        }
        let (this, newest) = (Rc::clone(self), newest.clone());
        glommio::spawn_local(async move {
            while let Some((i, answer)) = recv_until(&rx, deadline).await {
                if late_answer_is_stale(&answer, &newest) {
                    this.repair(shard, replicas[i].clone(), newest.clone(), deadline);
                }
            }
        })
        .detach();
        Ok(learned)
    }

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

#[cfg(test)]
mod tests;
