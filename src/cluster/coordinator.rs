//! Coordinating a client request over the key's replicas, on the core that owns the key's
//! shard on this node: the local replica is served in place, remote ones through this core's
//! peer clients, all in parallel; [`super::replication`] decides when enough have answered.
//! Calls still running when the decision is made finish in the background, so a write reaches
//! every replica that is up, and a read repairs the stale replicas it saw.

use super::{
    hints::Hints,
    peer::PeerClients,
    replication::{required, resolve, Level, Outcome, Tally, Versioned},
    ring::Ring,
};
use crate::{
    engine::{
        command::{Command, ReplicaEntry, Reply, Request, Response},
        core::CoreEngine,
        entry::{FLAG_BINARY, FLAG_TOMBSTONE},
        hlc::Version,
    },
    error::Error,
    routing::ShardId,
};
use futures_lite::future;
use glommio::channels::local_channel;
use std::{cell::RefCell, rc::Rc, time::Instant};

/// How long a read waits for a replica before asking one more (Cassandra's speculative retry).
const SPECULATIVE_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// How long a read keeps listening for late replicas and repairing them.
const REPAIR_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

impl Versioned for ReplicaEntry {
    fn version(&self) -> Version {
        self.version
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
    pub syncing: RefCell<Rc<crate::cluster::ring::BucketSet>>,
}

impl Coordinator {
    pub fn ring(&self) -> Rc<Ring> {
        Rc::clone(&self.ring.borrow())
    }

    /// Whether this node is still receiving the key's bucket (just started, or a new replica
    /// of it after a ring change): its "not found" is then no answer.
    pub fn syncing(&self, key: &[u8]) -> bool {
        self.syncing
            .borrow()
            .contains(crate::cluster::ring::bucket_of(key))
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
            level: Level::One,
        })
    }

    /// Writes `entry` to every replica; Ok((version, any replica had a live value)) once
    /// `needed` have stored it.
    async fn replicate(
        self: &Rc<Self>,
        shard: ShardId,
        entry: ReplicaEntry,
        level: Level,
        deadline: Instant,
    ) -> Result<bool, Error> {
        let ring = self.ring();
        let replicas: Vec<String> = ring
            .replicas(&entry.key)
            .into_iter()
            .map(str::to_string)
            .collect();
        let needed = required(level, replicas.len(), self.write_quorum);
        let mut tally = Tally::new(needed, replicas.len());
        let mut existed = false;
        let (tx, rx) = local_channel::new_unbounded::<Result<(bool, bool), ()>>();
        let tx = Rc::new(tx);
        let entry = Rc::new(entry);
        for addr in replicas {
            if addr == self.me {
                match self.local(shard, Command::Apply((*entry).clone()), deadline) {
                    Ok(Reply::Applied { existed: e, .. }) => {
                        existed |= e;
                        tally.ok();
                    }
                    _ => {
                        tally.fail();
                    }
                }
                continue;
            }
            let (peers, entry, tx) = (Rc::clone(&self.peers), Rc::clone(&entry), Rc::clone(&tx));
            let hints = Rc::clone(&self.hints);
            glommio::spawn_local(async move {
                let r = peers.write(&addr, &entry, deadline).await.map_err(|_| ());
                if r.is_err() {
                    // Down, cut off or slow: it gets the write when it answers again, whether
                    // or not the quorum was reached without it.
                    hints.store(&addr, (*entry).clone(), Instant::now());
                }
                let _ = tx.try_send(r);
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
                        total: tally.total,
                    })
                }
                Outcome::Pending => {}
            }
            match recv_until(&rx, deadline).await {
                Some(Ok((_, e))) => {
                    existed |= e;
                    tally.ok();
                }
                Some(Err(())) => {
                    tally.fail();
                }
                None => return Err(Error::DeadlineExceeded),
            }
        }
    }

    /// Serves a client Get, Set or Delete.
    pub async fn coordinate(self: Rc<Self>, req: Request) -> Response {
        let Request {
            shard,
            command,
            deadline,
            level,
        } = req;
        match command {
            Command::Set {
                key,
                value,
                ttl_secs,
                binary,
            } => {
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
            Command::Get { key } => self.read(shard, key, level, deadline).await,
            // Replica commands never reach the coordinator (ingress sends them to the shard).
            other => self.local(shard, other, deadline),
        }
    }

    async fn read(
        self: &Rc<Self>,
        shard: ShardId,
        key: Vec<u8>,
        level: Level,
        deadline: Instant,
    ) -> Response {
        let ring = self.ring();
        // This node first: its answer costs no round trip.
        let mut replicas: Vec<String> = ring
            .replicas(&key)
            .into_iter()
            .map(str::to_string)
            .collect();
        if let Some(i) = replicas.iter().position(|a| *a == self.me) {
            replicas.swap(0, i);
        }
        let needed = required(level, replicas.len(), self.read_quorum);
        let mut tally = Tally::new(needed, replicas.len());
        // A replica still receiving the key's bucket (it just started, or just became a
        // replica) answers "not found" for keys it has not received yet: that answer goes on
        // the repair list but does not count, so the read asks another replica.
        let counts = |answer: &Option<ReplicaEntry>, syncing: bool| answer.is_some() || !syncing;
        // (replica, its answer) for every replica that answered.
        let mut answers: Vec<(String, Option<ReplicaEntry>)> = Vec::with_capacity(replicas.len());
        #[allow(clippy::type_complexity)]
        let (tx, rx) =
            local_channel::new_unbounded::<(String, Result<(Option<ReplicaEntry>, bool), ()>)>();
        let tx = Rc::new(tx);
        let key = Rc::new(key);
        // Only as many replicas as the level needs are asked (quorum intersection needs no
        // more), and one more for each that fails: a QUORUM read of RF=3 costs one remote call,
        // not two.
        let mut asked = 0;
        let mut in_flight = 0;
        loop {
            while asked < replicas.len() && tally.ok + in_flight < needed {
                let addr = replicas[asked].clone();
                asked += 1;
                if addr == self.me {
                    match self.local(
                        shard,
                        Command::Read {
                            key: (*key).clone(),
                        },
                        deadline,
                    ) {
                        Ok(Reply::Entry(e)) => {
                            if counts(&e, self.syncing(&key)) {
                                tally.ok();
                            } else {
                                tally.fail();
                            }
                            answers.push((addr, e));
                        }
                        _ => {
                            tally.fail();
                        }
                    }
                    continue;
                }
                in_flight += 1;
                let (peers, key, tx) = (Rc::clone(&self.peers), Rc::clone(&key), Rc::clone(&tx));
                glommio::spawn_local(async move {
                    let r = peers.read(&addr, &key, deadline).await.map_err(|_| ());
                    let _ = tx.try_send((addr, r));
                })
                .detach();
            }
            match tally.outcome() {
                Outcome::Reached => break,
                Outcome::Impossible => {
                    return Err(Error::Unavailable {
                        answered: tally.ok,
                        needed,
                        total: tally.total,
                    })
                }
                Outcome::Pending => {}
            }
            if in_flight == 0 {
                // Everyone was asked and nobody is left to answer.
                return Err(Error::Unavailable {
                    answered: tally.ok,
                    needed,
                    total: tally.total,
                });
            }
            // Speculative retry: a replica that is slow (paused, partitioned) must not hold the
            // read until the client's deadline while another replica could answer.
            let spare = asked < replicas.len();
            let wait_until = if spare {
                deadline.min(Instant::now() + SPECULATIVE_AFTER)
            } else {
                deadline
            };
            match recv_until(&rx, wait_until).await {
                Some((addr, Ok((e, syncing)))) => {
                    in_flight -= 1;
                    if counts(&e, syncing) {
                        tally.ok();
                    } else {
                        tally.fail();
                    }
                    answers.push((addr, e));
                }
                Some((_, Err(()))) => {
                    in_flight -= 1;
                    tally.fail();
                }
                None if spare && Instant::now() < deadline => {
                    // Ask one more replica; the slow one may still answer and count.
                    let addr = replicas[asked].clone();
                    asked += 1;
                    if addr == self.me {
                        continue;
                    }
                    in_flight += 1;
                    let (peers, key, tx) =
                        (Rc::clone(&self.peers), Rc::clone(&key), Rc::clone(&tx));
                    glommio::spawn_local(async move {
                        let r = peers.read(&addr, &key, deadline).await.map_err(|_| ());
                        let _ = tx.try_send((addr, r));
                    })
                    .detach();
                }
                None => return Err(Error::DeadlineExceeded),
            }
        }
        drop(tx);
        let entries: Vec<Option<ReplicaEntry>> = answers.iter().map(|(_, e)| e.clone()).collect();
        let Some((winner, stale)) = resolve(&entries) else {
            // Nobody had it; replicas that answer later cannot hold anything newer than what a
            // quorum lacked, so there is nothing to repair.
            return Err(Error::not_found(&key));
        };
        let newest = entries[winner].clone().expect("the winner has an entry");
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
                while let Some((addr, answer)) = recv_until(&rx, deadline).await {
                    let behind = match answer {
                        Ok((Some(e), _)) => e.version < newest.version,
                        Ok((None, _)) => true,
                        Err(()) => false,
                    };
                    if behind {
                        this.repair(shard, addr, newest.clone(), deadline);
                    }
                }
            })
            .detach();
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
