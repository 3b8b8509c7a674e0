//! One shard: a hash index, CLOCK eviction, TTLs and versions. Plain single-threaded code with
//! no runtime: the owning core calls it synchronously and passes `now` in, so tests drive time
//! by hand.
//!
//! Memory per entry, which the bench measures against Redis and memcached: the entry itself
//! (one cell of the shard's [`Slab`], see [`super::entry`]), one 8-byte slot (its thin
//! pointer), one reference bit, and the index's 4-byte slot number plus 1 control byte per
//! bucket.
//!
//! Eviction is CLOCK (second chance), the LRU approximation of operating systems' page caches,
//! as Redis and memcached also approximate LRU rather than keep it exactly: a read or an
//! overwrite sets the entry's reference bit, and the hand walks the slots clearing set bits
//! until it reaches an entry that was not used since the hand last passed it. Against an
//! exact LRU list (two u32 links per slot) it saves 8 bytes per entry, and a read writes one
//! bit instead of relinking three slots scattered over the array.

use super::{
    entry::{Entry, FLAG_TOMBSTONE},
    hlc::Version,
    slab::Slab,
};
use crate::routing::buckets::{bucket_of, bucket_of_position, key_position, BucketSet, BUCKETS};
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

/// Largest capacity a shard reserves for at creation (64 MiB of slots); beyond it the arrays
/// grow on demand.
pub const PRESIZE_MAX: usize = 1 << 22;

/// Most reference bits one eviction clears before it takes the entry under the hand anyway:
/// when nearly every entry was read since the hand's last pass, an exact scan for the one that
/// was not could walk the whole shard (half a millisecond at 500k entries) inside one Set.
const MAX_CLEARS: usize = 1024;

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
    /// The entry in each slot; `None` for a free one.
    slots: Vec<Option<Entry>>,
    /// Free slot numbers, the last freed reused first.
    free: Vec<u32>,
    /// One bit per slot: used since the clock hand last passed it.
    referenced: Vec<u64>,
    /// The next slot the clock hand examines.
    hand: usize,
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
    /// Where the entries live. Every entry is freed into it before it goes (`Drop`).
    slab: Slab,
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
            free: Vec::new(),
            referenced: Vec::with_capacity(presize.div_ceil(64)),
            hand: 0,
            len: 0,
            capacity,
            bytes: 0,
            hasher: ahash::RandomState::new(),
            sweep_cursor: 0,
            evictions: 0,
            expirations: 0,
            digest: vec![0; BUCKETS].into_boxed_slice(),
            counts: vec![0; BUCKETS].into_boxed_slice(),
            slab: Slab::new(capacity),
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
            .as_ref()
            .expect("indexed slots hold an entry")
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(hash, |&s| {
                slots[s as usize].as_ref().map(Entry::key) == Some(key)
            })
            .copied()
    }

    #[inline]
    fn touch(&mut self, s: u32) {
        self.referenced[s as usize / 64] |= 1 << (s % 64);
    }

    #[inline]
    fn untouch(&mut self, s: u32) {
        self.referenced[s as usize / 64] &= !(1 << (s % 64));
    }

    #[inline]
    fn is_referenced(&self, s: u32) -> bool {
        self.referenced[s as usize / 64] & (1 << (s % 64)) != 0
    }

    /// Removes the entry in slot `s` from the index and the slot array.
    fn remove_slot(&mut self, s: u32, hash: u64) {
        if let Ok(found) = self.index.find_entry(hash, |&x| x == s) {
            found.remove();
        }
        if let Some(entry) = self.slots[s as usize].take() {
            self.bytes -= entry.alloc_len();
            self.digest_account(entry.key(), entry.version(), entry.flags(), -1);
            entry.free(&mut self.slab);
        }
        self.untouch(s);
        self.free.push(s);
        self.len -= 1;
    }

    /// A slot for a new entry, not yet referenced: it has to be used before the hand comes
    /// round to keep its place, so keys set once and never read go first.
    fn alloc_slot(&mut self, entry: Entry) -> u32 {
        if let Some(s) = self.free.pop() {
            self.slots[s as usize] = Some(entry);
            s
        } else {
            let s = u32::try_from(self.slots.len()).expect("fewer than 2^32 entries per shard");
            if self.slots.len() % 64 == 0 {
                self.referenced.push(0);
            }
            self.slots.push(Some(entry));
            s
        }
    }

    /// The live value for `key`, marked used. Expired entries and tombstones are
    /// never returned.
    pub fn get(&mut self, key: &[u8], now: Tick) -> Option<Found<'_>> {
        self.get_entry(key, now)
            .filter(|f| f.flags & FLAG_TOMBSTONE == 0)
    }

    /// The live entry for `key`, tombstones included (what a replica answers a coordinator),
    /// marked used. An expired entry is removed and never returned.
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

    /// Stores `key` -> `value`, evicting an entry (CLOCK) when the shard is full.
    pub fn set(&mut self, key: &[u8], value: &[u8], version: Version, expires_at: Tick, flags: u8) {
        let hash = self.hash(key);
        if let Some(s) = self.find(hash, key) {
            let entry = self.slots[s as usize]
                .as_mut()
                .expect("indexed slots hold an entry");
            let pos = key_position(key);
            self.digest[bucket_of_position(pos)] ^=
                entry_digest_at(pos, entry.version(), entry.flags())
                    ^ entry_digest_at(pos, version, flags);
            if !entry.try_overwrite(key, value, version, expires_at, flags) {
                let new = Entry::new(&mut self.slab, key, value, version, expires_at, flags);
                self.bytes = self.bytes - entry.alloc_len() + new.alloc_len();
                std::mem::replace(entry, new).free(&mut self.slab);
            }
            self.touch(s);
            return;
        }
        if self.len >= self.capacity {
            self.evict();
        }
        let entry = Entry::new(&mut self.slab, key, value, version, expires_at, flags);
        self.bytes += entry.alloc_len();
        self.digest_account(key, version, flags, 1);
        let s = self.alloc_slot(entry);
        let (index, slots, hasher) = (&mut self.index, &self.slots, &self.hasher);
        index.insert_unique(hash, s, |&x| {
            hasher.hash_one(
                slots[x as usize]
                    .as_ref()
                    .map(Entry::key)
                    .unwrap_or_default(),
            )
        });
        self.len += 1;
    }

    /// Evicts one entry: the first the hand reaches that was not used since its last pass, or
    /// the one under the hand after [`MAX_CLEARS`] second chances.
    fn evict(&mut self) {
        if self.len == 0 {
            return;
        }
        let mut cleared = 0;
        loop {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let s = self.hand as u32;
            self.hand += 1;
            if self.slots[s as usize].is_none() {
                continue;
            }
            if cleared < MAX_CLEARS && self.is_referenced(s) {
                self.untouch(s);
                cleared += 1;
                continue;
            }
            let hash = self.hash(self.entry(s).key());
            self.remove_slot(s, hash);
            self.evictions += 1;
            return;
        }
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
            let Some(entry) = self.slots[s as usize].as_ref() else {
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

    /// Slots to scan; scans that must not hold the core for long go `slots` at a time
    /// (`for_each_in_slots`, `drop_buckets_in_slots`).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Calls `f` with every live entry (tombstones included, expired ones not) in the slots of
    /// `range` whose bucket is in `buckets`, in slot order.
    pub fn for_each_in_slots(
        &self,
        range: std::ops::Range<usize>,
        buckets: &BucketSet,
        now: Tick,
        mut f: impl FnMut(&Entry),
    ) {
        let end = range.end.min(self.slots.len());
        for e in self.slots[range.start.min(end)..end].iter().flatten() {
            if !is_expired(e.expires_at(), now) && buckets.contains(bucket_of(e.key())) {
                f(e);
            }
        }
    }

    /// The entry for `key` as it is, without marking it used (anti-entropy reads must not
    /// change what eviction keeps). Expired entries are not returned.
    pub fn peek(&self, key: &[u8], now: Tick) -> Option<&Entry> {
        let s = self.find(self.hash(key), key)?;
        let e = self.entry(s);
        (!is_expired(e.expires_at(), now)).then_some(e)
    }

    /// Removes every entry in the slots of `range` whose bucket is in `buckets` (ranges this
    /// node no longer replicates). Returns how many were removed.
    pub fn drop_buckets_in_slots(
        &mut self,
        range: std::ops::Range<usize>,
        buckets: &BucketSet,
    ) -> usize {
        let mut dropped = 0;
        let end = range.end.min(self.slots.len());
        for s in range.start.min(end) as u32..end as u32 {
            let Some(e) = self.slots[s as usize].as_ref() else {
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
}

#[cfg(test)]
impl Shard {
    /// `for_each_in_slots` over every slot.
    fn for_each_in(&self, buckets: &BucketSet, now: Tick, f: impl FnMut(&Entry)) {
        self.for_each_in_slots(0..self.slots.len(), buckets, now, f);
    }

    /// `drop_buckets_in_slots` over every slot.
    fn drop_buckets(&mut self, buckets: &BucketSet) -> usize {
        self.drop_buckets_in_slots(0..self.slots.len(), buckets)
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        for entry in self.slots.drain(..).flatten() {
            entry.free(&mut self.slab);
        }
    }
}

#[cfg(test)]
mod tests;
