//! The peer calls coordination and hinted handoff make, as a trait: the real transport is a
//! core's [`super::peer::PeerClients`] (HTTP/2 to the other nodes' cores); unit tests use an
//! in-memory one. Runs on a core's executor: the futures need not be `Send`.

use super::snitch::SpeculativeRetry;
use crate::engine::command::ReplicaEntry;
use std::{
    future::Future,
    time::{Duration, Instant},
};
use tonic::Status;

pub trait PeerTransport: 'static {
    /// Applies `entry` on the replica `addr`: (a live value existed there, the replica is
    /// still syncing the key's bucket).
    fn write(
        &self,
        addr: &str,
        entry: &ReplicaEntry,
        deadline: Instant,
    ) -> impl Future<Output = Result<(bool, bool), Status>>;

    /// The replica `addr`'s entry for `key`, tombstones included, and whether it is still
    /// syncing the key's bucket.
    fn read(
        &self,
        addr: &str,
        key: &[u8],
        deadline: Instant,
    ) -> impl Future<Output = Result<(Option<ReplicaEntry>, bool), Status>>;

    /// How fast `addr` has been answering lately, lower is faster (see `snitch`).
    fn score_us(&self, addr: &str, now: Instant) -> f64;

    /// How long a read waits for `addr` before asking one more replica, if at all.
    fn speculate_after(&self, addr: &str, policy: SpeculativeRetry) -> Option<Duration>;
}

/// An in-memory transport for unit tests: each peer is a map of entries that answers after
/// a set delay, or fails while it is down. Runs on a glommio executor (its delays are
/// glommio timers).
#[cfg(test)]
pub mod memory {
    use super::*;
    use crate::engine::entry::FLAG_TOMBSTONE;
    use std::{
        cell::{Cell, RefCell},
        collections::HashMap,
        rc::Rc,
    };

    #[derive(Default)]
    pub struct Replica {
        pub entries: RefCell<HashMap<Vec<u8>, ReplicaEntry>>,
        pub down: Cell<bool>,
        pub delay: Cell<Duration>,
        pub syncing: Cell<bool>,
        pub score_us: Cell<f64>,
        pub speculate_after: Cell<Option<Duration>>,
        pub writes: Cell<u32>,
        pub reads: Cell<u32>,
    }

    impl Replica {
        pub fn entry(&self, key: &[u8]) -> Option<ReplicaEntry> {
            self.entries.borrow().get(key).cloned()
        }

        /// Stores `entry` unless it holds a newer version; whether a live value was there.
        pub fn apply(&self, entry: &ReplicaEntry) -> bool {
            let mut entries = self.entries.borrow_mut();
            let old = entries.get(&entry.key);
            let existed = old.is_some_and(|e| e.flags & FLAG_TOMBSTONE == 0);
            if old.is_none_or(|e| e.version < entry.version) {
                entries.insert(entry.key.clone(), entry.clone());
            }
            existed
        }
    }

    #[derive(Default)]
    pub struct InMemory {
        replicas: RefCell<HashMap<String, Rc<Replica>>>,
    }

    impl InMemory {
        pub fn replica(&self, addr: &str) -> Rc<Replica> {
            Rc::clone(
                self.replicas
                    .borrow_mut()
                    .entry(addr.to_string())
                    .or_default(),
            )
        }

        /// Waits out `addr`'s delay (at most until `deadline`); the replica if it answers.
        async fn reach(&self, addr: &str, deadline: Instant) -> Result<Rc<Replica>, Status> {
            let replica = self.replica(addr);
            let left = deadline.saturating_duration_since(Instant::now());
            glommio::timer::sleep(replica.delay.get().min(left)).await;
            if replica.delay.get() > left {
                return Err(Status::deadline_exceeded("in-memory peer too slow"));
            }
            if replica.down.get() {
                return Err(Status::unavailable("in-memory peer down"));
            }
            Ok(replica)
        }
    }

    impl PeerTransport for InMemory {
        async fn write(
            &self,
            addr: &str,
            entry: &ReplicaEntry,
            deadline: Instant,
        ) -> Result<(bool, bool), Status> {
            let replica = self.reach(addr, deadline).await?;
            replica.writes.set(replica.writes.get() + 1);
            Ok((replica.apply(entry), replica.syncing.get()))
        }

        async fn read(
            &self,
            addr: &str,
            key: &[u8],
            deadline: Instant,
        ) -> Result<(Option<ReplicaEntry>, bool), Status> {
            let replica = self.reach(addr, deadline).await?;
            replica.reads.set(replica.reads.get() + 1);
            Ok((replica.entry(key), replica.syncing.get()))
        }

        fn score_us(&self, addr: &str, _now: Instant) -> f64 {
            self.replica(addr).score_us.get()
        }

        fn speculate_after(&self, addr: &str, _policy: SpeculativeRetry) -> Option<Duration> {
            self.replica(addr).speculate_after.get()
        }
    }
}
