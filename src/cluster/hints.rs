//! Hinted handoff: a replica write that failed (the replica is down, cut off or too slow) is
//! kept by the coordinating core as a hint and delivered when that replica answers again, so a
//! node that was away for a while gets the writes it missed without waiting for anti-entropy.
//!
//! Each core keeps its own hints (plain data, no lock), in arrival order, bounded in count and
//! bytes (the node's limits split evenly among cores; when full the oldest hint is dropped and
//! counted) and expiring after HINT_TTL. A hint carries the entry's version, so delivering it
//! twice, late or after a newer write is harmless: the replica keeps the newest.

use super::transport::PeerTransport;
use crate::engine::command::ReplicaEntry;
use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    rc::Rc,
    time::{Duration, Instant},
};

/// How often a core tries to deliver what it holds.
const REPLAY_INTERVAL: Duration = Duration::from_millis(250);

/// Per-hint bookkeeping counted against the byte limit, beside key and value.
const HINT_OVERHEAD_BYTES: usize = 96;

/// The node's hint settings (from HINTED_HANDOFF, MAX_HINTS, MAX_HINT_BYTES, HINT_TTL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HintLimits {
    pub enabled: bool,
    pub max_count: usize,
    pub max_bytes: usize,
    pub ttl: Duration,
}

impl HintLimits {
    /// One core's share of the node's limits.
    pub fn per_core(self, nr_cores: usize) -> HintLimits {
        let n = nr_cores.max(1);
        HintLimits {
            max_count: self.max_count.div_ceil(n),
            max_bytes: self.max_bytes.div_ceil(n),
            ..self
        }
    }
}

struct Hint {
    peer: Rc<str>,
    entry: ReplicaEntry,
    stored: Instant,
}

impl Hint {
    fn bytes(&self) -> usize {
        self.entry.key.len() + self.entry.value.len() + HINT_OVERHEAD_BYTES
    }

    /// The entry as it is to be delivered now: its time to live shortened by the time it
    /// waited, or None when it expired meanwhile (a hint never brings back an expired entry).
    fn entry_now(&self, now: Instant) -> Option<ReplicaEntry> {
        if self.entry.ttl_ms == 0 {
            return Some(self.entry.clone());
        }
        let waited = now.saturating_duration_since(self.stored).as_millis() as u64;
        (waited < self.entry.ttl_ms).then(|| ReplicaEntry {
            ttl_ms: self.entry.ttl_ms - waited,
            ..self.entry.clone()
        })
    }
}

/// What hinted handoff did on one core; plain counters, read by metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintCounts {
    pub stored: u64,
    pub delivered: u64,
    /// Dropped to stay within the limits, or because their replica left the ring.
    pub dropped: u64,
    /// Expired before their replica came back (HINT_TTL or the entry's own TTL).
    pub expired: u64,
    /// Held now.
    pub queued: u64,
}

pub struct Hints {
    limits: HintLimits,
    queue: RefCell<VecDeque<Hint>>,
    bytes: Cell<usize>,
    counts: Cell<HintCounts>,
}

impl Hints {
    /// `limits` are this core's share.
    pub fn new(limits: HintLimits) -> Hints {
        Hints {
            limits,
            queue: RefCell::new(VecDeque::new()),
            bytes: Cell::new(0),
            counts: Cell::new(HintCounts::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.limits.enabled && self.limits.max_count > 0
    }

    fn count(&self, f: impl FnOnce(&mut HintCounts)) {
        let mut c = self.counts.get();
        f(&mut c);
        self.counts.set(c);
    }

    pub fn counts(&self) -> HintCounts {
        HintCounts {
            queued: self.queue.borrow().len() as u64,
            ..self.counts.get()
        }
    }

    /// Keeps `entry` for `peer`, which did not store it.
    pub fn store(&self, peer: &str, entry: ReplicaEntry, now: Instant) {
        if !self.enabled() {
            return;
        }
        let hint = Hint {
            peer: Rc::from(peer),
            entry,
            stored: now,
        };
        let size = hint.bytes();
        if size > self.limits.max_bytes {
            self.count(|c| c.dropped += 1);
            return;
        }
        let mut queue = self.queue.borrow_mut();
        while queue.len() >= self.limits.max_count
            || self.bytes.get() + size > self.limits.max_bytes
        {
            let Some(oldest) = queue.pop_front() else {
                break;
            };
            self.bytes.set(self.bytes.get() - oldest.bytes());
            self.count(|c| c.dropped += 1);
        }
        self.bytes.set(self.bytes.get() + size);
        queue.push_back(hint);
        self.count(|c| c.stored += 1);
    }

    /// Drops hints past HINT_TTL and hints whose peer `keep` rejects (it left the ring).
    fn prune(&self, now: Instant, keep: &dyn Fn(&str) -> bool) {
        let ttl = self.limits.ttl;
        let mut expired = 0;
        let mut dropped = 0;
        let mut freed = 0;
        self.queue.borrow_mut().retain(|h| {
            let too_old = now.saturating_duration_since(h.stored) >= ttl;
            let gone = !keep(&h.peer);
            if too_old || gone {
                freed += h.bytes();
                if too_old {
                    expired += 1;
                } else {
                    dropped += 1;
                }
            }
            !(too_old || gone)
        });
        self.bytes.set(self.bytes.get() - freed);
        self.count(|c| {
            c.expired += expired;
            c.dropped += dropped;
        });
    }

    /// Takes every hint for `peer` out of the queue, oldest first.
    fn take(&self, peer: &str) -> Vec<Hint> {
        let mut taken = Vec::new();
        let mut rest = VecDeque::new();
        for h in self.queue.borrow_mut().drain(..) {
            if &*h.peer == peer {
                self.bytes.set(self.bytes.get() - h.bytes());
                taken.push(h);
            } else {
                rest.push_back(h);
            }
        }
        *self.queue.borrow_mut() = rest;
        taken
    }

    /// Puts back hints that could not be delivered, ahead of newer ones.
    fn put_back(&self, hints: Vec<Hint>) {
        let mut queue = self.queue.borrow_mut();
        for h in hints.into_iter().rev() {
            self.bytes.set(self.bytes.get() + h.bytes());
            queue.push_front(h);
        }
    }

    fn peers(&self) -> Vec<Rc<str>> {
        let mut peers: Vec<Rc<str>> = Vec::new();
        for h in self.queue.borrow().iter() {
            if !peers.contains(&h.peer) {
                peers.push(Rc::clone(&h.peer));
            }
        }
        peers
    }

    /// One delivery round: for each peer with hints, deliver them oldest first, stopping at
    /// the first failure (the peer is still away; the rest wait for the next round).
    /// `in_ring` says whether a peer still owns part of the ring.
    pub async fn deliver<P: PeerTransport>(
        &self,
        peers: &P,
        in_ring: &dyn Fn(&str) -> bool,
        rpc_timeout: Duration,
    ) {
        self.prune(Instant::now(), in_ring);
        for peer in self.peers() {
            let mut pending = self.take(&peer).into_iter();
            let mut failed = Vec::new();
            for hint in pending.by_ref() {
                let now = Instant::now();
                let Some(entry) = hint.entry_now(now) else {
                    self.count(|c| c.expired += 1);
                    continue;
                };
                match peers.write(&peer, &entry, now + rpc_timeout).await {
                    Ok(_) => self.count(|c| c.delivered += 1),
                    Err(_) => {
                        failed.push(hint);
                        break;
                    }
                }
            }
            failed.extend(pending);
            self.put_back(failed);
        }
    }

    /// Delivers hints every REPLAY_INTERVAL, for as long as the core runs.
    pub async fn deliver_forever<P: PeerTransport>(
        self: Rc<Self>,
        peers: Rc<P>,
        in_ring: impl Fn(&str) -> bool,
        rpc_timeout: Duration,
    ) {
        loop {
            glommio::timer::sleep(REPLAY_INTERVAL).await;
            if !self.queue.borrow().is_empty() {
                self.deliver(&*peers, &in_ring, rpc_timeout).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::hlc::Version;

    fn entry(key: &str, value_len: usize, ttl_ms: u64) -> ReplicaEntry {
        ReplicaEntry {
            key: key.as_bytes().to_vec(),
            value: vec![b'v'; value_len],
            version: Version { hlc: 1, node: 1 },
            ttl_ms,
            flags: 0,
        }
    }

    fn limits(max_count: usize, max_bytes: usize) -> HintLimits {
        HintLimits {
            enabled: true,
            max_count,
            max_bytes,
            ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn full_drops_the_oldest_and_counts_it() {
        let hints = Hints::new(limits(2, 1 << 20));
        let now = Instant::now();
        for k in ["a", "b", "c"] {
            hints.store("p:1", entry(k, 10, 0), now);
        }
        let kept: Vec<_> = hints.take("p:1").into_iter().map(|h| h.entry.key).collect();
        assert_eq!(kept, vec![b"b".to_vec(), b"c".to_vec()]);
        let c = hints.counts();
        assert_eq!((c.stored, c.dropped), (3, 1));
    }

    #[test]
    fn byte_limit_holds() {
        let hints = Hints::new(limits(1000, 3 * (100 + 1 + HINT_OVERHEAD_BYTES)));
        let now = Instant::now();
        for k in ["a", "b", "c", "d", "e"] {
            hints.store("p:1", entry(k, 100, 0), now);
        }
        assert_eq!(hints.counts().queued, 3);
        assert_eq!(hints.counts().dropped, 2);
        assert_eq!(hints.bytes.get(), 3 * (101 + HINT_OVERHEAD_BYTES));
        // Bigger than the whole budget: never stored.
        hints.store("p:1", entry("f", 10_000, 0), now);
        assert_eq!(hints.counts().queued, 3);
    }

    #[test]
    fn hints_expire_and_leave_with_their_peer() {
        let hints = Hints::new(limits(100, 1 << 20));
        let t0 = Instant::now();
        hints.store("p:1", entry("old", 1, 0), t0);
        hints.store("p:2", entry("gone", 1, 0), t0 + Duration::from_secs(59));
        hints.store("p:1", entry("new", 1, 0), t0 + Duration::from_secs(59));
        hints.prune(t0 + Duration::from_secs(60), &|p| p != "p:2");
        let c = hints.counts();
        assert_eq!((c.queued, c.expired, c.dropped), (1, 1, 1));
        assert_eq!(hints.take("p:1")[0].entry.key, b"new");
        assert_eq!(hints.bytes.get(), 0);
    }

    #[test]
    fn delivery_shortens_the_ttl_and_never_revives_an_expired_entry() {
        let t0 = Instant::now();
        let h = Hint {
            peer: Rc::from("p:1"),
            entry: entry("k", 1, 1000),
            stored: t0,
        };
        assert_eq!(
            h.entry_now(t0 + Duration::from_millis(400)).unwrap().ttl_ms,
            600
        );
        assert!(h.entry_now(t0 + Duration::from_millis(1000)).is_none());
        let forever = Hint {
            entry: entry("k", 1, 0),
            ..h
        };
        assert_eq!(
            forever
                .entry_now(t0 + Duration::from_secs(9))
                .unwrap()
                .ttl_ms,
            0
        );
    }

    #[test]
    fn disabled_stores_nothing() {
        let hints = Hints::new(HintLimits {
            enabled: false,
            ..limits(100, 1 << 20)
        });
        hints.store("p:1", entry("a", 1, 0), Instant::now());
        assert_eq!(hints.counts(), HintCounts::default());
    }

    #[test]
    fn limits_split_among_cores() {
        let l = limits(100_001, 1 << 20).per_core(2);
        assert_eq!((l.max_count, l.max_bytes), (50_001, 1 << 19));
    }
}
