//! One shard: a hash index, exact LRU order, TTLs and versions. Plain single-threaded code with
//! no runtime: the owning core calls it synchronously and passes `now` in, so tests drive time
//! by hand.
//!
//! Memory per entry, which the bench measures against Redis and memcached: the entry itself
//! (one allocation, see [`super::entry`]), one 16-byte slot (thin pointer + LRU links as u32
//! slot numbers) and the index's 4-byte slot number plus 1 control byte per bucket.

use super::{
    entry::{Entry, FLAG_TOMBSTONE},
    hlc::Version,
};
use crate::cluster::ring::{bucket_of, bucket_of_position, key_position, BucketSet, BUCKETS};
use hashbrown::HashTable;

/// Time as the shard sees it: tenths of a second since the node started. 32 bits last 13
/// years of uptime; 0 in an entry means "never expires".
pub type Tick = u32;

pub const TICKS_PER_SEC: u64 = 10;

/// The tick at which an entry set at `now` with `ttl_secs` expires (0 = never).
///
/// One tick is added because `now` is truncated: the entry lives at least `ttl_secs`, and at
/// most one tick longer.
pub fn expiry_tick(now: Tick, ttl_secs: Option<u64>) -> Tick {
    match ttl_secs {
        None | Some(0) => 0,
        Some(secs) => {
            let t = (now as u64)
                .saturating_add(secs.saturating_mul(TICKS_PER_SEC))
                .saturating_add(1);
            t.min(u32::MAX as u64) as u32
        }
    }
}

/// The tick at which an entry arriving with `ttl_ms` left to live expires (0 = never). Rounded
/// up, so a replica never drops an entry before its origin would.
pub fn expiry_tick_ms(now: Tick, ttl_ms: u64) -> Tick {
    if ttl_ms == 0 {
        return 0;
    }
    let ticks = ttl_ms.div_ceil(1000 / TICKS_PER_SEC);
    ((now as u64).saturating_add(ticks).saturating_add(1)).min(u32::MAX as u64) as u32
}

/// Milliseconds left before `expires_at` (0 = never expires; an expired entry is never asked).
pub fn remaining_ms(expires_at: Tick, now: Tick) -> u64 {
    if expires_at == 0 {
        0
    } else {
        (expires_at.saturating_sub(now) as u64 * (1000 / TICKS_PER_SEC)).max(1)
    }
}

/// An entry's contribution to its bucket's digest: a hash of key, version and tombstone bit.
/// A bucket's digest is the XOR of its entries' contributions, so a write updates it in O(1)
/// (XOR the old entry out, the new one in) and equal digests mean equal contents, whatever
/// order the writes landed in.
#[inline]
pub fn entry_digest(key: &[u8], version: Version, flags: u8) -> u64 {
    entry_digest_at(key_position(key), version, flags)
}

/// [`entry_digest`] from the key's ring position, which the caller has at hand: a write
/// hashes its key once for both the bucket and the digest, and mixes the version in with two
/// multiply-folds (wyhash's mixer) instead of hashing the key again.
#[inline]
pub fn entry_digest_at(position: u64, version: Version, flags: u8) -> u64 {
    #[inline]
    fn fold(a: u64, b: u64) -> u64 {
        let r = (a as u128).wrapping_mul(b as u128);
        (r as u64) ^ ((r >> 64) as u64)
    }
    let tail = (version.node as u64) << 1 | (flags & FLAG_TOMBSTONE != 0) as u64;
    let h = fold(
        position ^ 0xa076_1d64_78bd_642f,
        version.hlc ^ 0xe703_7ed1_a0b4_28db,
    );
    fold(
        h ^ 0x8ebc_6af0_9c88_c6e3,
        tail ^ position.rotate_left(29) ^ 0x5899_65cc_7537_4cc3,
    )
}

#[inline]
fn is_expired(expires_at: Tick, now: Tick) -> bool {
    expires_at != 0 && now >= expires_at
}

const NIL: u32 = u32::MAX;

/// Largest capacity a shard reserves for at creation (64 MiB of slots); beyond it the arrays
/// grow on demand.
pub const PRESIZE_MAX: usize = 1 << 22;

struct Slot {
    entry: Option<Entry>,
    /// Towards the most recently used end; in a free slot, unused.
    prev: u32,
    /// Towards the least recently used end; in a free slot, the next free slot.
    next: u32,
}

/// What a Get found.
pub struct Found<'a> {
    pub value: &'a [u8],
    pub version: Version,
    pub flags: u8,
    pub expires_at: Tick,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShardStats {
    pub entries: u64,
    pub bytes: u64,
    pub evictions: u64,
    pub expirations: u64,
}

pub struct Shard {
    index: HashTable<u32>,
    slots: Vec<Slot>,
    free_head: u32,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next to evict.
    tail: u32,
    len: usize,
    capacity: usize,
    bytes: usize,
    hasher: ahash::RandomState,
    sweep_cursor: usize,
    evictions: u64,
    expirations: u64,
    /// Per ring bucket, the XOR of `entry_digest` over the entries held: the leaves of the
    /// anti-entropy tree, kept up to date by every insert, overwrite and removal.
    digest: Box<[u64]>,
    /// Per ring bucket, the number of entries held: sizes anti-entropy's key-list batches.
    counts: Box<[u32]>,
}

impl Shard {
    /// A shard that holds at most `capacity` entries (at least 1).
    ///
    /// The slot array and the index are sized for the capacity up front (up to
    /// [`PRESIZE_MAX`] entries): growing them by doubling leaves the freed old arrays as holes
    /// in the allocator's heap, which measured as ~12 bytes of RSS per entry at 1M entries.
    /// Untouched reserved pages cost no RSS; the index's control bytes (1 per bucket) do.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let presize = capacity.min(PRESIZE_MAX);
        Self {
            index: HashTable::with_capacity(presize),
            slots: Vec::with_capacity(presize),
            free_head: NIL,
            head: NIL,
            tail: NIL,
            len: 0,
            capacity,
            bytes: 0,
            hasher: ahash::RandomState::new(),
            sweep_cursor: 0,
            evictions: 0,
            expirations: 0,
            digest: vec![0; BUCKETS].into_boxed_slice(),
            counts: vec![0; BUCKETS].into_boxed_slice(),
        }
    }

    /// Accounts an entry coming in to (`sign` 1) or going out of (`sign` -1) the shard in its
    /// bucket's digest and count. An overwrite changes only the digest (`set`).
    #[inline]
    fn digest_account(&mut self, key: &[u8], version: Version, flags: u8, sign: i32) {
        let pos = key_position(key);
        let b = bucket_of_position(pos);
        self.digest[b] ^= entry_digest_at(pos, version, flags);
        self.counts[b] = self.counts[b].wrapping_add_signed(sign);
    }

    /// The number of entries held in each ring bucket.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    /// The digest of each ring bucket over this shard's entries.
    pub fn digest(&self) -> &[u64] {
        &self.digest
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn stats(&self) -> ShardStats {
        ShardStats {
            entries: self.len as u64,
            bytes: self.bytes as u64,
            evictions: self.evictions,
            expirations: self.expirations,
        }
    }

    #[inline]
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn entry(&self, slot: u32) -> &Entry {
        self.slots[slot as usize]
            .entry
            .as_ref()
            .expect("indexed slots hold an entry")
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(hash, |&s| {
                slots[s as usize].entry.as_ref().map(Entry::key) == Some(key)
            })
            .copied()
    }

    fn unlink(&mut self, s: u32) {
        let (prev, next) = {
            let slot = &self.slots[s as usize];
            (slot.prev, slot.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, s: u32) {
        let old_head = self.head;
        {
            let slot = &mut self.slots[s as usize];
            slot.prev = NIL;
            slot.next = old_head;
        }
        if old_head != NIL {
            self.slots[old_head as usize].prev = s;
        } else {
            self.tail = s;
        }
        self.head = s;
    }

    fn touch(&mut self, s: u32) {
        if self.head != s {
            self.unlink(s);
            self.push_front(s);
        }
    }

    /// Removes the entry in slot `s` from the index, the LRU list and the slot array.
    fn remove_slot(&mut self, s: u32, hash: u64) {
        self.unlink(s);
        if let Ok(found) = self.index.find_entry(hash, |&x| x == s) {
            found.remove();
        }
        if let Some(entry) = self.slots[s as usize].entry.take() {
            self.bytes -= entry.alloc_len();
            self.digest_account(entry.key(), entry.version(), entry.flags(), -1);
        }
        let slot = &mut self.slots[s as usize];
        slot.next = self.free_head;
        self.free_head = s;
        self.len -= 1;
    }

    fn alloc_slot(&mut self, entry: Entry) -> u32 {
        if self.free_head != NIL {
            let s = self.free_head;
            let slot = &mut self.slots[s as usize];
            self.free_head = slot.next;
            slot.entry = Some(entry);
            s
        } else {
            let s = u32::try_from(self.slots.len()).expect("fewer than 2^32 - 1 entries per shard");
            self.slots.push(Slot {
                entry: Some(entry),
                prev: NIL,
                next: NIL,
            });
            s
        }
    }

    /// The live value for `key`, marked most recently used. Expired entries and tombstones are
    /// never returned.
    pub fn get(&mut self, key: &[u8], now: Tick) -> Option<Found<'_>> {
        self.get_entry(key, now)
            .filter(|f| f.flags & FLAG_TOMBSTONE == 0)
    }

    /// The live entry for `key`, tombstones included (what a replica answers a coordinator),
    /// marked most recently used. An expired entry is removed and never returned.
    pub fn get_entry(&mut self, key: &[u8], now: Tick) -> Option<Found<'_>> {
        let hash = self.hash(key);
        let s = self.find(hash, key)?;
        if is_expired(self.entry(s).expires_at(), now) {
            self.remove_slot(s, hash);
            self.expirations += 1;
            return None;
        }
        self.touch(s);
        let e = self.entry(s);
        Some(Found {
            value: e.value(),
            version: e.version(),
            flags: e.flags(),
            expires_at: e.expires_at(),
        })
    }

    /// Stores the entry if it is newer than what the shard holds (last writer wins by version,
    /// tombstones included). Returns (stored, a live value existed before).
    pub fn apply(
        &mut self,
        key: &[u8],
        value: &[u8],
        version: Version,
        expires_at: Tick,
        flags: u8,
        now: Tick,
    ) -> (bool, bool) {
        let existing = self
            .get_entry(key, now)
            .map(|f| (f.version, f.flags & FLAG_TOMBSTONE == 0));
        let existed = existing.map(|(_, live)| live).unwrap_or(false);
        if let Some((held, _)) = existing {
            if held >= version {
                return (false, existed);
            }
        }
        self.set(key, value, version, expires_at, flags);
        (true, existed)
    }

    /// Stores `key` -> `value`, evicting the least recently used entry when the shard is full.
    pub fn set(&mut self, key: &[u8], value: &[u8], version: Version, expires_at: Tick, flags: u8) {
        let hash = self.hash(key);
        if let Some(s) = self.find(hash, key) {
            let slot = &mut self.slots[s as usize];
            let entry = slot.entry.as_mut().expect("indexed slots hold an entry");
            let pos = key_position(key);
            self.digest[bucket_of_position(pos)] ^=
                entry_digest_at(pos, entry.version(), entry.flags())
                    ^ entry_digest_at(pos, version, flags);
            if !entry.try_overwrite(key, value, version, expires_at, flags) {
                let new = Entry::new(key, value, version, expires_at, flags);
                self.bytes = self.bytes - entry.alloc_len() + new.alloc_len();
                *entry = new;
            }
            self.touch(s);
            return;
        }
        if self.len >= self.capacity {
            self.evict_lru();
        }
        let entry = Entry::new(key, value, version, expires_at, flags);
        self.bytes += entry.alloc_len();
        self.digest_account(key, version, flags, 1);
        let s = self.alloc_slot(entry);
        let (index, slots, hasher) = (&mut self.index, &self.slots, &self.hasher);
        index.insert_unique(hash, s, |&x| {
            hasher.hash_one(
                slots[x as usize]
                    .entry
                    .as_ref()
                    .map(Entry::key)
                    .unwrap_or_default(),
            )
        });
        self.push_front(s);
        self.len += 1;
    }

    fn evict_lru(&mut self) {
        let s = self.tail;
        if s == NIL {
            return;
        }
        let hash = self.hash(self.entry(s).key());
        self.remove_slot(s, hash);
        self.evictions += 1;
    }

    /// Removes `key`; true if a live entry was removed.
    pub fn delete(&mut self, key: &[u8], now: Tick) -> bool {
        let hash = self.hash(key);
        let Some(s) = self.find(hash, key) else {
            return false;
        };
        let live = !is_expired(self.entry(s).expires_at(), now);
        self.remove_slot(s, hash);
        if !live {
            self.expirations += 1;
        }
        live
    }

    /// Active expiry: examines at most `budget` slots from where the last sweep stopped and
    /// frees the expired ones, so memory held by keys nobody reads again is reclaimed with a
    /// bounded pause. Returns (slots examined, entries expired).
    pub fn sweep(&mut self, now: Tick, budget: usize) -> (usize, usize) {
        let total = self.slots.len();
        if total == 0 {
            return (0, 0);
        }
        let mut expired = 0;
        let n = budget.min(total);
        for _ in 0..n {
            if self.sweep_cursor >= total {
                self.sweep_cursor = 0;
            }
            let s = self.sweep_cursor as u32;
            self.sweep_cursor += 1;
            let Some(entry) = self.slots[s as usize].entry.as_ref() else {
                continue;
            };
            if is_expired(entry.expires_at(), now) {
                let hash = self.hash(entry.key());
                self.remove_slot(s, hash);
                self.expirations += 1;
                expired += 1;
            }
        }
        (n, expired)
    }

    /// Calls `f` with every live entry (tombstones included, expired ones not) whose bucket is
    /// in `buckets`, in slot order.
    pub fn for_each_in(&self, buckets: &BucketSet, now: Tick, f: impl FnMut(&Entry)) {
        self.for_each_in_slots(0..self.slots.len(), buckets, now, f);
    }

    /// Slots to scan; scans that must not hold the core for long go `slots` at a time
    /// (`for_each_in_slots`, `drop_buckets_in_slots`).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// As `for_each_in`, over the slots of `range` only.
    pub fn for_each_in_slots(
        &self,
        range: std::ops::Range<usize>,
        buckets: &BucketSet,
        now: Tick,
        mut f: impl FnMut(&Entry),
    ) {
        let end = range.end.min(self.slots.len());
        for slot in &self.slots[range.start.min(end)..end] {
            if let Some(e) = &slot.entry {
                if !is_expired(e.expires_at(), now) && buckets.contains(bucket_of(e.key())) {
                    f(e);
                }
            }
        }
    }

    /// The entry for `key` as it is, without marking it used (anti-entropy reads must not
    /// change what LRU keeps). Expired entries are not returned.
    pub fn peek(&self, key: &[u8], now: Tick) -> Option<&Entry> {
        let s = self.find(self.hash(key), key)?;
        let e = self.entry(s);
        (!is_expired(e.expires_at(), now)).then_some(e)
    }

    /// Removes every entry whose bucket is in `buckets` (ranges this node no longer
    /// replicates). Returns how many were removed.
    pub fn drop_buckets(&mut self, buckets: &BucketSet) -> usize {
        self.drop_buckets_in_slots(0..self.slots.len(), buckets)
    }

    /// As `drop_buckets`, over the slots of `range` only.
    pub fn drop_buckets_in_slots(
        &mut self,
        range: std::ops::Range<usize>,
        buckets: &BucketSet,
    ) -> usize {
        let mut dropped = 0;
        let end = range.end.min(self.slots.len());
        for s in range.start.min(end) as u32..end as u32 {
            let Some(e) = self.slots[s as usize].entry.as_ref() else {
                continue;
            };
            if buckets.contains(bucket_of(e.key())) {
                let hash = self.hash(e.key());
                self.remove_slot(s, hash);
                dropped += 1;
            }
        }
        dropped
    }

    /// Keys from most to least recently used (tests and diagnostics).
    pub fn keys_by_recency(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len);
        let mut s = self.head;
        while s != NIL {
            out.push(self.entry(s).key().to_vec());
            s = self.slots[s as usize].next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

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
    fn lru_order_and_eviction() {
        let mut s = Shard::new(3);
        s.set(b"a", b"1", v(1), 0, 0);
        s.set(b"b", b"2", v(2), 0, 0);
        s.set(b"c", b"3", v(3), 0, 0);
        assert_eq!(
            s.keys_by_recency(),
            vec![b"c".to_vec(), b"b".to_vec(), b"a".to_vec()]
        );
        // Reading "a" makes "b" the least recently used.
        assert!(s.get(b"a", 0).is_some());
        s.set(b"d", b"4", v(4), 0, 0);
        assert_eq!(s.len(), 3);
        assert_eq!(get(&mut s, "b", 0), None, "b was least recently used");
        assert!(get(&mut s, "a", 0).is_some());
        assert_eq!(s.stats().evictions, 1);
        // Overwriting refreshes recency too.
        s.set(b"c", b"33", v(5), 0, 0);
        assert_eq!(s.keys_by_recency()[0], b"c".to_vec());
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
        // The survivors are the 100 most recent.
        for i in 900..1000 {
            assert!(get(&mut s, &format!("k{i}"), 0).is_some());
        }
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
        assert_eq!(examined, 64);
        assert!(expired <= 64);
        let mut rounds = 1;
        while s.len() > 100 {
            s.sweep(11, 64);
            rounds += 1;
            assert!(rounds < 100);
        }
        assert_eq!(s.len(), 100);
        assert_eq!(s.stats().expirations, 500);
        // Freed slots are reused.
        s.set(b"new", b"v", v(1), 0, 0);
        assert_eq!(s.slots.len(), 600);
    }

    #[test]
    fn versions_are_kept() {
        let mut s = Shard::new(4);
        let ver = Version {
            hlc: 42 << 16,
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
        /// Against a reference model: a map plus a recency list.
        #[test]
        fn behaves_like_an_lru_model(ops in proptest::collection::vec(op(), 1..400), cap in 1usize..8) {
            let mut s = Shard::new(cap);
            let mut model: HashMap<u8, u8> = HashMap::new();
            let mut order: Vec<u8> = Vec::new(); // most recent first
            for o in ops {
                match o {
                    Op::Set(k, val) => {
                        s.set(&[k], &[val], v(1), 0, 0);
                        if !model.contains_key(&k) && model.len() == cap {
                            let lru = order.pop().unwrap();
                            model.remove(&lru);
                        }
                        model.insert(k, val);
                        order.retain(|&x| x != k);
                        order.insert(0, k);
                    }
                    Op::Get(k) => {
                        let got = s.get(&[k], 0).map(|f| f.value[0]);
                        prop_assert_eq!(got, model.get(&k).copied());
                        if got.is_some() {
                            order.retain(|&x| x != k);
                            order.insert(0, k);
                        }
                    }
                    Op::Del(k) => {
                        prop_assert_eq!(s.delete(&[k], 0), model.remove(&k).is_some());
                        order.retain(|&x| x != k);
                    }
                }
                prop_assert_eq!(s.len(), model.len());
                let keys: Vec<u8> = s.keys_by_recency().into_iter().map(|k| k[0]).collect();
                prop_assert_eq!(&keys, &order);
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
                for slot in &s.slots {
                    if let Some(e) = &slot.entry {
                        let b = bucket_of(e.key());
                        recount[b] ^= entry_digest(e.key(), e.version(), e.flags());
                        counted[b] += 1;
                    }
                }
                prop_assert!(recount.as_slice() == s.digest());
                prop_assert!(counted.as_slice() == s.counts());
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
        assert_eq!(s.peek(b"a", 0).unwrap().value(), b"1");
        assert_eq!(
            s.keys_by_recency()[0],
            b"c",
            "peek leaves the LRU order alone"
        );
        assert!(s.peek(b"b", 5).is_none());
    }
}
