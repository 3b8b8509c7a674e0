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

    /// Starts a delivery round at `now`: drops the hints past HINT_TTL and those whose peer
    /// `in_ring` rejects (it left the ring), and takes the rest, per peer, oldest first.
    pub fn round(&self, now: Instant, in_ring: &dyn Fn(&str) -> bool) -> Replay<'_> {
        self.prune(now, in_ring);
        let peers = self
            .peers()
            .into_iter()
            .map(|peer| {
                let hints = self.take(&peer).into();
                (peer, hints)
            })
            .collect();
        Replay {
            hints: self,
            peers,
            in_flight: None,
        }
    }

    /// One delivery round through `peers`: the driver of [`Replay`].
    pub async fn deliver<P: PeerTransport>(
        &self,
        peers: &P,
        in_ring: &dyn Fn(&str) -> bool,
        rpc_timeout: Duration,
    ) {
        let mut round = self.round(Instant::now(), in_ring);
        while let Some((peer, entry)) = round.next(Instant::now()) {
            let delivered = peers
                .write(&peer, &entry, Instant::now() + rpc_timeout)
                .await
                .is_ok();
            round.answered(delivered);
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

/// One delivery round as a plan: for each peer with hints, oldest first, until one fails (the
/// peer is still away; its others wait for the next round). Events in (`now`, an answer),
/// actions out (send this entry to this peer). Hints not delivered when the round ends, or is
/// dropped half-way, go back to the queue ahead of newer ones.
pub struct Replay<'a> {
    hints: &'a Hints,
    /// Peers still to serve, each with its hints oldest first.
    peers: VecDeque<(Rc<str>, VecDeque<Hint>)>,
    /// The hint sent and not answered yet.
    in_flight: Option<(Rc<str>, Hint)>,
}

impl Replay<'_> {
    /// The next hint to send at `now`, with its time to live shortened by its wait; None when
    /// the round is over. A hint that expired while it waited is counted and skipped (a hint
    /// never brings back an expired entry).
    pub fn next(&mut self, now: Instant) -> Option<(Rc<str>, ReplicaEntry)> {
        if let Some((_, hint)) = self.in_flight.take() {
            // Sent and never answered: it goes back with the rest.
            self.hints.put_back(vec![hint]);
        }
        while let Some((peer, queue)) = self.peers.front_mut() {
            let Some(hint) = queue.pop_front() else {
                self.peers.pop_front();
                continue;
            };
            match hint.entry_now(now) {
                None => self.hints.count(|c| c.expired += 1),
                Some(entry) => {
                    let peer = Rc::clone(peer);
                    self.in_flight = Some((Rc::clone(&peer), hint));
                    return Some((peer, entry));
                }
            }
        }
        None
    }

    /// The answer to the hint [`Replay::next`] gave. A failure puts it and the peer's other
    /// hints back, and the round moves on to the next peer.
    pub fn answered(&mut self, delivered: bool) {
        let Some((peer, hint)) = self.in_flight.take() else {
            return;
        };
        if delivered {
            self.hints.count(|c| c.delivered += 1);
            return;
        }
        let mut back = vec![hint];
        if self.peers.front().is_some_and(|(p, _)| *p == peer) {
            if let Some((_, rest)) = self.peers.pop_front() {
                back.extend(rest);
            }
        }
        self.hints.put_back(back);
    }
}

impl Drop for Replay<'_> {
    fn drop(&mut self) {
        let mut back: Vec<Hint> = self.in_flight.take().into_iter().map(|(_, h)| h).collect();
        for (_, rest) in self.peers.drain(..) {
            back.extend(rest);
        }
        if !back.is_empty() {
            self.hints.put_back(back);
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

    fn key_of(next: Option<(Rc<str>, ReplicaEntry)>) -> (String, String) {
        let (peer, e) = next.expect("a hint to send");
        (peer.to_string(), String::from_utf8(e.key).unwrap())
    }

    #[test]
    fn a_round_delivers_oldest_first_and_stops_at_a_peers_first_failure() {
        let hints = Hints::new(limits(100, 1 << 20));
        let t = Instant::now();
        for k in ["a", "b", "c"] {
            hints.store("p1", entry(k, 10, 0), t);
        }
        hints.store("p2", entry("d", 10, 0), t);
        let mut round = hints.round(t, &|_| true);
        assert_eq!(key_of(round.next(t)), ("p1".into(), "a".into()));
        round.answered(true);
        assert_eq!(key_of(round.next(t)), ("p1".into(), "b".into()));
        round.answered(false);
        // p1 is still away: c is not tried this round.
        assert_eq!(key_of(round.next(t)), ("p2".into(), "d".into()));
        round.answered(true);
        assert!(round.next(t).is_none());
        drop(round);
        let c = hints.counts();
        assert_eq!((c.delivered, c.queued), (2, 2));
        // b and c wait, in their order, for the next round.
        let mut again = hints.round(t, &|_| true);
        assert_eq!(key_of(again.next(t)), ("p1".into(), "b".into()));
        again.answered(true);
        assert_eq!(key_of(again.next(t)), ("p1".into(), "c".into()));
    }

    #[test]
    fn an_expired_entry_is_skipped_and_a_round_dropped_half_way_keeps_the_rest() {
        let hints = Hints::new(limits(100, 1 << 20));
        let t = Instant::now();
        hints.store("p1", entry("short", 10, 100), t);
        hints.store("p1", entry("long", 10, 10_000), t);
        hints.store("p2", entry("other", 10, 0), t);
        let later = t + Duration::from_millis(200);
        let mut round = hints.round(later, &|_| true);
        let (_, e) = round.next(later).expect("a hint to send");
        assert_eq!(e.key, b"long");
        assert_eq!(e.ttl_ms, 9_800, "its time to live is shortened by its wait");
        assert_eq!(hints.counts().expired, 1);
        // The core stops mid-round with "long" unanswered.
        drop(round);
        assert_eq!(hints.counts().queued, 2);
        let mut again = hints.round(later, &|_| true);
        assert_eq!(key_of(again.next(later)), ("p1".into(), "long".into()));
    }
}
