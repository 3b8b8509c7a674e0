//! Unit tests of `shard`: plain, no executor, each on the test harness's thread.

use super::*;
use crate::engine::entry::FLAG_BINARY;
use proptest::prelude::*;
use std::collections::{HashMap, VecDeque};

impl Shard {
    /// Keys of the live entries queued in `q`, oldest first.
    fn queue_keys(&self, q: Queue) -> Vec<u8> {
        self.log
            .queued(q)
            .into_iter()
            .map(|loc| self.entry(loc))
            .filter(|e| !e.is_dead())
            .map(|e| e.key()[0])
            .collect()
    }

    /// Every live entry, expired ones too.
    fn live_entries(&self) -> Vec<EntryRef<'_>> {
        self.log
            .all()
            .map(|loc| self.entry(loc))
            .filter(|e| !e.is_dead())
            .collect()
    }
}

fn v(n: u64) -> Version {
    Version { hlc: n, node: 1 }
}

fn get(s: &mut Shard, k: &str, now: Tick) -> Option<Vec<u8>> {
    s.get(k.as_bytes(), now).map(|f| f.value.to_vec())
}

#[test]
fn set_get_delete() {
    let mut s = Shard::new(10);
    s.set(b"a", b"1", v(1), 0, 0);
    assert_eq!(get(&mut s, "a", 0).as_deref(), Some(&b"1"[..]));
    assert_eq!(s.get(b"a", 0).unwrap().version, v(1));
    s.set(b"a", b"22", v(2), 0, 0);
    assert_eq!(get(&mut s, "a", 0).as_deref(), Some(&b"22"[..]));
    assert_eq!(s.len(), 1);
    assert!(s.delete(b"a", 0));
    assert!(!s.delete(b"a", 0));
    assert_eq!(get(&mut s, "a", 0), None);
    assert_eq!(s.stats().bytes, 0);
}

#[test]
fn clock_gives_used_entries_a_second_chance() {
    let mut s = Shard::with(
        Policy::Clock,
        Limits {
            bytes: usize::MAX,
            entries: 3,
        },
    );
    s.set(b"a", b"1", v(1), 0, 0);
    s.set(b"b", b"2", v(2), 0, 0);
    s.set(b"c", b"3", v(3), 0, 0);
    // Reading "a" spares it: "b" is the oldest entry not used since.
    assert!(s.get(b"a", 0).is_some());
    s.set(b"d", b"4", v(4), 0, 0);
    assert_eq!(s.len(), 3);
    assert_eq!(get(&mut s, "b", 0), None, "b was not used");
    assert_eq!(s.stats().evictions, 1);
    // The hand cleared "a"'s bit on its way; a new read and an overwrite mark "a" and "c"
    // used again, so the next eviction takes "d", set once and never read.
    assert!(get(&mut s, "a", 0).is_some());
    s.set(b"c", b"33", v(5), 0, 0);
    s.set(b"e", b"5", v(6), 0, 0);
    assert_eq!(get(&mut s, "d", 0), None);
    for k in ["a", "c", "e"] {
        assert!(get(&mut s, k, 0).is_some(), "{k} kept");
    }
}

#[test]
fn hot_keys_survive_a_stream_of_keys_set_once() {
    let mut s = Shard::new(100);
    for i in 0..100u64 {
        s.set(format!("k{i}").as_bytes(), b"v", v(i), 0, 0);
    }
    for i in 0..5_000u64 {
        for h in 0..10 {
            assert!(
                get(&mut s, &format!("k{h}"), 0).is_some(),
                "hot k{h} at {i}"
            );
        }
        s.set(format!("cold{i}").as_bytes(), b"v", v(i), 0, 0);
    }
    assert_eq!(s.len(), 100);
    assert_eq!(s.stats().evictions, 5_000);
}

#[test]
fn an_eviction_moves_a_bounded_number_of_entries() {
    let n = MAX_MOVES * 3;
    let mut s = Shard::new(n);
    for i in 0..n {
        s.set(format!("k{i}").as_bytes(), b"v", v(1), 0, 0);
    }
    for i in 0..n {
        assert!(get(&mut s, &format!("k{i}"), 0).is_some());
    }
    s.set(b"new", b"v", v(2), 0, 0);
    assert_eq!(s.len(), n);
    // MAX_MOVES promotions from the small queue, then the entry in hand went.
    assert_eq!(s.queue_keys(Queue::Main).len(), MAX_MOVES);
    assert_eq!(s.stats().evictions, 1);
}

#[test]
fn capacity_is_never_exceeded() {
    let mut s = Shard::new(100);
    for i in 0..1000u64 {
        s.set(format!("k{i}").as_bytes(), b"v", v(i), 0, 0);
        assert!(s.len() <= 100);
    }
    assert_eq!(s.len(), 100);
    assert_eq!(s.stats().evictions, 900);
    // Nothing was read: S3-FIFO evicts in insertion order, so the survivors are the most
    // recent, but for the rare new key the ghost mistakes for one it remembers (a fingerprint
    // match, about 1 in 500 lookups), which goes to main and outlives a few newer ones.
    let recent = (900..1000)
        .filter(|i| get(&mut s, &format!("k{i}"), 0).is_some())
        .count();
    assert!(recent >= 90, "{recent} of the 100 most recent kept");
}

#[test]
fn memory_follows_a_change_of_value_sizes() {
    let mut s = Shard::new(10_000);
    for i in 0..10_000u64 {
        s.set(format!("k{i}").as_bytes(), &[1; 100], v(1), 0, 0);
    }
    let small = s.log.segments_in_use();
    for i in 0..10_000u64 {
        s.set(format!("k{i}").as_bytes(), &[2; 300], v(2), 0, 0);
    }
    // Every segment of 100-byte values emptied and went back: what is held is what 10,000
    // entries of the new size need (and the open tail), not both sizes.
    let large = s.log.segments_in_use();
    let needed: usize = s
        .live_entries()
        .iter()
        .map(|e| e.log_len())
        .sum::<usize>()
        .div_ceil(SEGMENT);
    assert!(
        large <= needed + 1,
        "{large} segments for {needed} needed ({small} before)"
    );
    assert!(get(&mut s, "k42", 0).is_some_and(|v| v == [2; 300]));
}

#[test]
fn ttl_expires_without_sleeping() {
    let mut s = Shard::new(10);
    let now = 100;
    s.set(b"t", b"x", v(1), expiry_tick(now, Some(2)), 0);
    assert!(
        get(&mut s, "t", now + 20).is_some(),
        "alive for the full 2 s"
    );
    assert!(get(&mut s, "t", now + 21).is_none(), "gone just after");
    assert_eq!(s.stats().expirations, 1);
    assert_eq!(s.len(), 0);
}

#[test]
fn no_ttl_never_expires() {
    let mut s = Shard::new(10);
    s.set(b"t", b"x", v(1), expiry_tick(0, None), 0);
    s.set(b"z", b"x", v(1), expiry_tick(0, Some(0)), 0);
    assert!(get(&mut s, "t", u32::MAX).is_some());
    assert!(get(&mut s, "z", u32::MAX).is_some());
}

#[test]
fn sweep_reclaims_unread_expired_entries_in_bounded_steps() {
    let mut s = Shard::new(1000);
    for i in 0..500u64 {
        s.set(
            format!("e{i}").as_bytes(),
            b"v",
            v(i),
            expiry_tick(0, Some(1)),
            0,
        );
    }
    for i in 0..100u64 {
        s.set(format!("p{i}").as_bytes(), b"v", v(i), 0, 0);
    }
    let (examined, expired) = s.sweep(11, 64);
    assert_eq!(
        (examined, expired),
        (64, 64),
        "only expired entries are visited"
    );
    let mut rounds = 1;
    while s.len() > 100 {
        s.sweep(11, 64);
        rounds += 1;
        assert!(rounds < 100);
    }
    assert_eq!(s.len(), 100);
    assert_eq!(s.stats().expirations, 500);
    // What the expired entries took is no longer counted.
    let live: usize = s.live_entries().iter().map(|e| e.log_len()).sum();
    assert_eq!(s.stats().bytes as usize, live);
}

#[test]
fn versions_are_kept() {
    let mut s = Shard::new(4);
    let ver = Version {
        hlc: 42 << crate::engine::hlc::LOGICAL_BITS,
        node: 7,
    };
    s.set(b"k", b"v", ver, 0, 1);
    let f = s.get(b"k", 0).unwrap();
    assert_eq!(f.version, ver);
    assert_eq!(f.flags, 1);
}

#[derive(Debug, Clone)]
enum Op {
    Set(u8, u8),
    Get(u8),
    Del(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..20, any::<u8>()).prop_map(|(k, v)| Op::Set(k, v)),
        (0u8..20).prop_map(Op::Get),
        (0u8..20).prop_map(Op::Del),
    ]
}

proptest! {
    /// Against a reference model, a map: every read answers what was last set unless the
    /// key was evicted, and an eviction takes exactly one other key, only when the shard is
    /// full.
    #[test]
    fn behaves_like_a_map_that_evicts_one_key_when_full(
        ops in proptest::collection::vec(op(), 1..400),
        cap in 1usize..8,
    ) {
        let mut s = Shard::new(cap);
        let mut model: HashMap<u8, u8> = HashMap::new();
        for o in ops {
            match o {
                Op::Set(k, val) => {
                    s.set(&[k], &[val], v(1), 0, 0);
                    if !model.contains_key(&k) && model.len() == cap {
                        let gone: Vec<u8> =
                            model.keys().copied().filter(|&x| s.peek(&[x], 0).is_none()).collect();
                        prop_assert_eq!(gone.len(), 1);
                        model.remove(&gone[0]);
                    }
                    model.insert(k, val);
                }
                Op::Get(k) => {
                    let got = s.get(&[k], 0).map(|f| f.value[0]);
                    prop_assert_eq!(got, model.get(&k).copied());
                }
                Op::Del(k) => {
                    prop_assert_eq!(s.delete(&[k], 0), model.remove(&k).is_some());
                }
            }
            prop_assert_eq!(s.len(), model.len());
            for (&k, &val) in &model {
                prop_assert_eq!(s.peek(&[k], 0).map(|e| e.value()[0]), Some(val));
            }
        }
    }

    /// The incremental digests always equal digests computed from scratch over what the
    /// shard holds, through overwrites, tombstones, evictions, expiry and drops.
    #[test]
    fn digests_match_a_recount(
        ops in proptest::collection::vec((0u8..4, 0u8..16, 1u64..50, 0u32..3), 1..300),
        cap in 1usize..10,
    ) {
        let mut s = Shard::new(cap);
        for (i, (kind, k, hlc, ttl)) in ops.into_iter().enumerate() {
            let key = [k, k ^ 0x5a];
            let now = i as Tick;
            match kind {
                0 => s.set(&key, b"v", v(hlc), if ttl == 0 { 0 } else { now + ttl }, 0),
                1 => {
                    s.apply(&key, b"", v(hlc), now + 5, FLAG_TOMBSTONE, now);
                }
                2 => {
                    s.delete(&key, now);
                }
                _ => {
                    s.sweep(now, 4);
                    if k == 0 {
                        let mut b = BucketSet::default();
                        b.insert(bucket_of(&key));
                        s.drop_buckets(&b);
                    }
                }
            }
            let mut recount = vec![0u64; BUCKETS];
            let mut counted = vec![0u32; BUCKETS];
            for e in s.live_entries() {
                let b = bucket_of(e.key());
                recount[b] ^= entry_digest(e.key(), e.version(), e.flags());
                counted[b] += 1;
            }
            prop_assert!(recount.as_slice() == s.digest());
            prop_assert!(counted.as_slice() == s.counts());
        }
    }

    /// Overwrites of every form (the same size or another, the segment's node or another or
    /// one written in full, a near or far clock, an expiry or none, either flag) read back
    /// exactly what was last written, and leave the other keys alone: the in-place rewrite
    /// must keep to the entry's header.
    #[test]
    fn overwrites_read_back_exactly(
        ops in proptest::collection::vec(
            (0u8..6, 0usize..3, 0usize..3, 0usize..3, 0usize..3, any::<bool>()),
            1..300,
        ),
    ) {
        let mut s = Shard::new(100);
        // One place left in the node table: the third node is written in full.
        s.nodes.extend(1000..999 + MAX_NODES as u32);
        let mut model: HashMap<u8, (Vec<u8>, Version, Tick, u8)> = HashMap::new();
        for (i, (k, size, node, clock, ttl, binary)) in ops.into_iter().enumerate() {
            let value = vec![i as u8; [3, 3, 40][size]];
            let version = Version {
                hlc: (1 << 50) + i as u64 + [0, 0, 1 << 40][clock],
                node: [1, 2, 9000][node],
            };
            let expires_at = [0, 0, 1000 + i as Tick][ttl];
            let flags = if binary { FLAG_BINARY } else { 0 };
            s.set(&[k], &value, version, expires_at, flags);
            model.insert(k, (value, version, expires_at, flags));
            for (k, (value, version, expires_at, flags)) in &model {
                let e = s.peek(&[*k], 0).expect("kept");
                prop_assert_eq!(e.value(), &value[..]);
                prop_assert_eq!(e.version(), *version);
                prop_assert_eq!(e.expires_at(), *expires_at);
                prop_assert_eq!(e.flags(), *flags);
            }
        }
    }
}

#[test]
fn for_each_in_skips_expired_and_other_buckets_and_peek_does_not_touch() {
    let mut s = Shard::new(10);
    s.set(b"a", b"1", v(1), 0, 0);
    s.set(b"b", b"2", v(1), 5, 0);
    s.set(b"c", b"3", v(1), 0, FLAG_TOMBSTONE);
    let mut seen = Vec::new();
    s.for_each_in(&BucketSet::all(), 10, |e| seen.push(e.key().to_vec()));
    seen.sort();
    assert_eq!(
        seen,
        vec![b"a".to_vec(), b"c".to_vec()],
        "b expired at tick 5"
    );
    let mut only_a = BucketSet::default();
    only_a.insert(bucket_of(b"a"));
    let mut seen = Vec::new();
    s.for_each_in(&only_a, 0, |e| seen.push(e.key().to_vec()));
    assert!(seen.contains(&b"a".to_vec()));
    let a = s.find(s.hash(b"a"), b"a").unwrap();
    assert_eq!(s.entry(a).freq(), 0);
    assert_eq!(s.peek(b"a", 0).unwrap().value(), b"1");
    assert_eq!(s.entry(a).freq(), 0, "peek leaves eviction order alone");
    assert!(s.peek(b"b", 5).is_none());
}

/// S3-FIFO (or CLOCK) written the plain way, over keys: what the shard's queues of slots must
/// match. Every entry has the same size here, so byte shares are entry shares. Whether a new
/// key comes back from the ghost is read off the shard (the ghost is approximate by design
/// and tested on its own); everything else the model decides.
#[derive(Default)]
struct Model {
    cap: usize,
    clock: bool,
    small: VecDeque<u8>,
    main: VecDeque<u8>,
    freq: HashMap<u8, u8>,
    values: HashMap<u8, u8>,
}

impl Model {
    fn max_freq(&self) -> u8 {
        if self.clock {
            1
        } else {
            3
        }
    }

    fn touch(&mut self, k: u8) {
        let max = self.max_freq();
        let f = self.freq.get_mut(&k).unwrap();
        *f = (*f + 1).min(max);
    }

    fn remove(&mut self, k: u8) {
        self.small.retain(|&x| x != k);
        self.main.retain(|&x| x != k);
        self.freq.remove(&k);
        self.values.remove(&k);
    }

    fn evict(&mut self) {
        loop {
            let from_small = !self.small.is_empty()
                && (self.main.is_empty() || self.small.len() * 100 > self.values.len() * 10);
            let k = if from_small {
                self.small.pop_front()
            } else {
                self.main.pop_front()
            }
            .expect("evicting from a non-empty cache");
            let f = self.freq[&k];
            if f > 0 {
                self.freq.insert(k, if from_small { 0 } else { f - 1 });
                self.main.push_back(k);
                continue;
            }
            self.freq.remove(&k);
            self.values.remove(&k);
            return;
        }
    }
}

proptest! {
    /// Through any sequence of Sets, Gets and Deletes, the shard keeps exactly the keys the
    /// model keeps, in the same queue order, with the same access counts.
    #[test]
    fn eviction_matches_the_model(
        ops in proptest::collection::vec(op(), 1..400),
        cap in 1usize..10,
        clock: bool,
    ) {
        let policy = if clock { Policy::Clock } else { Policy::S3Fifo };
        let mut s = Shard::with(policy, Limits { bytes: usize::MAX, entries: cap });
        let mut m = Model { cap, clock, ..Default::default() };
        for o in ops {
            match o {
                Op::Set(k, val) => {
                    if m.values.contains_key(&k) {
                        m.touch(k);
                    } else {
                        if m.values.len() >= m.cap {
                            m.evict();
                        }
                        m.freq.insert(k, 0);
                    }
                    let new = !m.values.contains_key(&k);
                    m.values.insert(k, val);
                    s.set(&[k], &[val], v(1), 0, 0);
                    if new {
                        let loc = s.find(s.hash(&[k]), &[k]).expect("just stored");
                        if s.log.queue_of(loc) == Queue::Main || clock {
                            m.main.push_back(k);
                        } else {
                            m.small.push_back(k);
                        }
                    }
                }
                Op::Get(k) => {
                    let got = s.get(&[k], 0).map(|f| f.value[0]);
                    prop_assert_eq!(got, m.values.get(&k).copied());
                    if got.is_some() {
                        m.touch(k);
                    }
                }
                Op::Del(k) => {
                    prop_assert_eq!(s.delete(&[k], 0), m.values.contains_key(&k));
                    m.remove(k);
                }
            }
            prop_assert_eq!(s.queue_keys(Queue::Small), m.small.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(s.queue_keys(Queue::Main), m.main.iter().copied().collect::<Vec<_>>());
            for (&k, &f) in &m.freq {
                let loc = s.find(s.hash(&[k]), &[k]).expect("kept");
                prop_assert_eq!(s.entry(loc).freq(), f, "count of {}", k);
            }
            prop_assert_eq!(s.len(), m.values.len());
        }
    }
}

#[test]
fn expired_entries_go_before_any_live_one_is_evicted() {
    let mut s = Shard::with(
        Policy::S3Fifo,
        Limits {
            bytes: usize::MAX,
            entries: 4,
        },
    );
    s.set_at(b"live-1", b"v", v(1), 0, 0, 0);
    s.set_at(b"live-2", b"v", v(1), 0, 0, 0);
    s.set_at(b"ttl-1", b"v", v(1), 5, 0, 0);
    s.set_at(b"ttl-2", b"v", v(1), 5, 0, 0);
    // At tick 10 both TTL entries have expired: two new keys take their room, in FIFO order
    // the live ones would have gone first.
    s.set_at(b"new-1", b"v", v(1), 0, 0, 10);
    s.set_at(b"new-2", b"v", v(1), 0, 0, 10);
    for k in ["live-1", "live-2", "new-1", "new-2"] {
        assert!(get(&mut s, k, 10).is_some(), "{k} kept");
    }
    let st = s.stats();
    assert_eq!((st.expirations, st.evictions), (2, 0));
}

#[test]
fn the_byte_limit_counts_entries_and_structures() {
    let limit = 2 << 20;
    let mut s = Shard::with(
        Policy::S3Fifo,
        Limits {
            bytes: limit,
            entries: usize::MAX,
        },
    );
    for i in 0..100_000u64 {
        s.set(format!("key-{i:08}").as_bytes(), &[5; 100], v(i), 0, 0);
        assert!(s.used_bytes() <= limit, "{} over {limit}", s.used_bytes());
    }
    // Filled to within a few entries' worth (plus one index doubling it could not afford).
    assert!(s.stats().evictions > 0);
    assert!(s.len() > 8_000, "{} entries in 2 MiB", s.len());
    // A smaller limit evicts at once.
    s.set_limits(
        Limits {
            bytes: limit / 2,
            entries: usize::MAX,
        },
        0,
    );
    assert!(s.used_bytes() <= limit / 2);
}

/// A shard whose log has less room than its share (the node's address space split over
/// many shards) uses its range up before its byte limit: it evicts to write, as at the limit,
/// and every Set is stored.
#[test]
fn a_shard_whose_range_runs_out_before_its_limit_evicts_and_stores() {
    let limits = Limits {
        bytes: 64 << 20,
        entries: usize::MAX,
    };
    let mut s = Shard::with_room(Policy::S3Fifo, limits, 1 << 20);
    for i in 0..50_000u64 {
        let key = format!("key-{i:08}");
        s.set(key.as_bytes(), &[5; 100], v(i), 0, 0);
        assert!(s.get(key.as_bytes(), 0).is_some(), "{key} stored");
    }
    assert!(s.stats().evictions > 0);
    assert!(s.log.resident_bytes() < 2 << 20);
}

#[test]
fn a_chunked_scan_sees_every_entry_that_stays_live_while_entries_move() {
    let n = 2_000u64;
    let mut s = Shard::new(n as usize);
    for i in 0..n {
        s.set(format!("k{i}").as_bytes(), &[1; 100], v(i), 0, 0);
    }
    // Every other key read once: an eviction promotes those from small to main.
    for i in (0..n).step_by(2) {
        assert!(get(&mut s, &format!("k{i}"), 0).is_some());
    }
    let mut cursor = Cursor::default();
    let mut seen = std::collections::HashSet::new();
    let mut fresh = n;
    while !cursor.is_done() {
        s.scan(&mut cursor, 50, &BucketSet::all(), 0, |e| {
            seen.insert(e.key().to_vec());
        });
        // Between chunks, new keys evict and promote (entries move to main's tail).
        for _ in 0..20 {
            s.set(format!("k{fresh}").as_bytes(), &[2; 100], v(fresh), 0, 0);
            fresh += 1;
        }
    }
    let survivors: Vec<u64> = (0..n)
        .filter(|i| s.peek(format!("k{i}").as_bytes(), 0).is_some())
        .collect();
    assert!(
        survivors.len() > 500,
        "{} of the first keys kept",
        survivors.len()
    );
    for i in survivors {
        assert!(
            seen.contains(format!("k{i}").as_bytes()),
            "k{i} live throughout, not seen"
        );
    }
}

#[test]
fn large_values_keep_their_own_block_and_move_with_their_entry() {
    let big = |i: u64| vec![(i % 251) as u8; 10_000 + i as usize];
    let mut s = Shard::new(40);
    for i in 0..40u64 {
        s.set(format!("k{i}").as_bytes(), &big(i), v(i), 0, 0);
    }
    let stub = s.live_entries()[0].log_len();
    assert!(stub < 40, "a stub of {stub} bytes in the log");
    // Read all, then push 20 new keys through: the read ones move to main with their blocks.
    for i in 0..40u64 {
        assert!(get(&mut s, &format!("k{i}"), 0).is_some());
    }
    for i in 40..60u64 {
        s.set(format!("k{i}").as_bytes(), &big(i), v(i), 0, 0);
    }
    for i in 0..60u64 {
        if let Some(got) = get(&mut s, &format!("k{i}"), 0) {
            assert_eq!(got, big(i), "k{i}");
        }
    }
    assert_eq!(s.len(), 40);
    let payload: usize = (0..60u64)
        .filter(|i| s.peek(format!("k{i}").as_bytes(), 0).is_some())
        .map(|i| big(i).len())
        .sum();
    let stubs: usize = s.live_entries().iter().map(|e| e.log_len()).sum();
    assert_eq!(s.stats().bytes as usize, payload + stubs);
    for i in 0..60u64 {
        s.delete(format!("k{i}").as_bytes(), 0);
    }
    assert_eq!((s.len(), s.stats().bytes), (0, 0));
    assert_eq!(s.blocks_charged, 0, "every block freed");
}

#[test]
fn versions_of_many_nodes_and_far_apart_clocks_are_kept_exactly() {
    let mut s = Shard::new(1_000);
    let version = |i: u64| Version {
        // Far apart (beyond a segment's ±0.5 s of offsets) for every third key.
        hlc: (1 << 50) + if i % 3 == 0 { i << 40 } else { i },
        node: (i * 7919) as u32 % 400,
    };
    for i in 0..1_000u64 {
        s.set(format!("k{i}").as_bytes(), b"v", version(i), 0, 0);
    }
    assert_eq!(
        s.nodes.len(),
        MAX_NODES,
        "the table filled, later ids are written in full"
    );
    for i in 0..1_000u64 {
        let f = s.get(format!("k{i}").as_bytes(), 0).expect("kept");
        assert_eq!(f.version, version(i), "k{i}");
    }
    // Overwritten with another size (a new copy) and read back.
    for i in 0..1_000u64 {
        s.set(format!("k{i}").as_bytes(), b"value", version(i + 1), 0, 0);
        assert_eq!(
            s.get(format!("k{i}").as_bytes(), 0).unwrap().version,
            version(i + 1)
        );
    }
}

#[test]
fn dead_space_is_compacted_before_any_live_entry_is_evicted() {
    let limit = 4 << 20;
    let mut s = Shard::with(
        Policy::S3Fifo,
        Limits {
            bytes: limit,
            entries: usize::MAX,
        },
    );
    let mut i = 0u64;
    while s.stats().evictions == 0 {
        s.set(format!("key-{i:08}").as_bytes(), &[5; 100], v(i), 0, 0);
        i += 1;
    }
    let filled = s.len();
    // Three keys in four deleted, spread over every segment.
    for k in 0..i {
        if k % 4 != 0 {
            s.delete(format!("key-{k:08}").as_bytes(), 0);
        }
    }
    let evictions = s.stats().evictions;
    let room = filled - s.len();
    let kept: Vec<u64> = (0..i)
        .filter(|k| s.peek(format!("key-{k:08}").as_bytes(), 0).is_some())
        .collect();
    // Half that many new keys fit in the space the deletes left, once compacted.
    for k in 0..room as u64 / 2 {
        s.set(format!("new-{k:08}").as_bytes(), &[6; 100], v(k), 0, 0);
        assert!(s.used_bytes() <= limit);
    }
    assert_eq!(s.stats().evictions, evictions, "no live entry evicted");
    for k in kept {
        assert!(
            s.peek(format!("key-{k:08}").as_bytes(), 0).is_some(),
            "key-{k:08} kept"
        );
    }
}
