//! One shard: a hash index, eviction (S3-FIFO or CLOCK) under limits in bytes and entries,
//! TTLs and versions. Plain single-threaded code with no runtime: the owning core calls it
//! synchronously and passes `now` in, so tests drive time by hand.
//!
//! Memory per entry, which the bench measures against Redis and memcached: the entry itself
//! (one cell of the shard's [`Slab`], see [`super::entry`]), one 8-byte slot (its thin
//! pointer), one byte of eviction state, a 4-byte place in a queue, 2 bytes of ghost per
//! entry, and the index's 4-byte slot number plus 1 control byte per bucket. An entry with a
//! TTL also has a 4-byte place in the expiry wheel.
//!
//! Eviction keeps FIFO queues of slot numbers rather than links in the slots: a deleted
//! entry's slot stays in its queue, empty, until the queue reaches it (or a compaction when
//! such slots outnumber the live ones), so a slot is never in a queue twice.

use super::{
    entry::{entry_len, Entry, FLAG_TOMBSTONE},
    ghost::Ghost,
    hlc::Version,
    slab::Slab,
};
use crate::routing::buckets::{bucket_of, bucket_of_position, key_position, BucketSet, BUCKETS};
use hashbrown::HashTable;
use std::collections::{BTreeMap, VecDeque};

/// What a slot costs beside its entry: its pointer, its eviction byte, its place in a queue.
const SLOT_BYTES: usize = 8 + 1 + 4;

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

/// Largest entry count a shard reserves for at creation (64 MiB of slots); beyond it the
/// arrays grow on demand.
pub const PRESIZE_MAX: usize = 1 << 22;

/// Most entries one eviction moves (promotes or reinserts) before it evicts the one in hand
/// anyway: when nearly every entry was read since it was queued, an exact search for one that
/// was not could walk the whole shard (half a millisecond at 500k entries) inside one Set.
const MAX_MOVES: usize = 1024;

/// S3-FIFO's small queue holds this share of the shard's entry bytes (the paper's 10%).
const SMALL_PERCENT: usize = 10;

/// Highest access count an entry keeps (S3-FIFO's two bits); CLOCK keeps one bit.
const S3FIFO_MAX_FREQ: u8 = 3;

/// Per-slot bits beside the entry: its access count (0..=3) and the queue it is in.
const FREQ_MASK: u8 = 0b011;
const IN_MAIN: u8 = 0b100;
/// The slot has an entry in the expiry wheel (`expiring`), valid or stale.
const SCHEDULED: u8 = 0b1000;

/// Bytes a shard holds whatever it stores: the digest and count per ring bucket, and the
/// slab's one resident spare page.
pub const SHARD_FIXED_BYTES: usize = BUCKETS * 12 + 64 * 1024;

/// How a full shard chooses what to evict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// S3-FIFO (Yang et al., SOSP 2023): new keys enter a small FIFO queue; the ones read
    /// there move to the main queue, the others leave and are remembered in a ghost queue, so
    /// that a key evicted and set again soon after goes straight to main. One scan of cold keys
    /// flushes the small queue only, never the hot set in main.
    S3Fifo,
    /// CLOCK (second chance, FIFO with reinsertion): one queue; an entry read since it was
    /// queued goes round again. An approximation of LRU, with its weakness to scans.
    Clock,
}

/// What a shard may hold: bytes (entries, index and queues, see [`Shard::used_bytes`]) and
/// entries. `usize::MAX` is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub bytes: usize,
    pub entries: usize,
}

impl Limits {
    pub const NONE: Limits = Limits {
        bytes: usize::MAX,
        entries: usize::MAX,
    };
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
    /// What the shard holds in memory, as its limit counts it.
    pub used_bytes: u64,
    /// Bytes of entries evicted to make room for new ones (how much more room it wanted).
    pub evicted_bytes: u64,
    /// The limits it holds to now (`u64::MAX`: none).
    pub limit_bytes: u64,
    pub limit_entries: u64,
}

pub struct Shard {
    index: HashTable<u32>,
    /// The entry in each slot; `None` for a free one, or one whose entry went but which is
    /// still in a queue (freed when the queue reaches it).
    slots: Vec<Option<Entry>>,
    /// Per slot: FREQ_MASK | IN_MAIN | SCHEDULED.
    meta: Vec<u8>,
    /// Free slot numbers, the last freed reused first.
    free: Vec<u32>,
    /// Slots emptied while still in a queue.
    dead_queued: usize,
    small: VecDeque<u32>,
    main: VecDeque<u32>,
    /// Charged bytes of the entries in `small`.
    small_bytes: usize,
    ghost: Ghost,
    /// Expiry tick -> slots whose entry expires then (or did, before an overwrite: checked when
    /// taken). Lets expired entries go before any live one is evicted, and the sweep visit only
    /// entries that expired.
    expiring: BTreeMap<Tick, Vec<u32>>,
    expiring_len: usize,
    policy: Policy,
    limits: Limits,
    len: usize,
    /// Bytes of the entries (their own lengths) and what the allocator charges for them.
    bytes: usize,
    charged: usize,
    hasher: ahash::RandomState,
    evictions: u64,
    evicted_bytes: u64,
    expirations: u64,
    /// Per ring bucket, the XOR of `entry_digest` over the entries held: the leaves of the
    /// anti-entropy tree, kept up to date by every insert, overwrite and removal.
    digest: Box<[u64]>,
    /// Per ring bucket, the number of entries held: sizes anti-entropy's key-list batches.
    counts: Box<[u32]>,
    /// Where the entries live. Every entry is freed into it before it goes (`Drop`).
    slab: Slab,
}

/// What the allocator takes for an entry of `len` bytes: its slab cell, a malloc chunk
/// (glibc: 8 bytes of header, 16-byte granularity), or from
/// [`super::slab::MALLOC_MMAP_THRESHOLD`] up a mapping of whole pages.
#[inline]
pub fn charge(len: usize) -> usize {
    match Slab::cell_size(len) {
        Some(cell) => cell,
        None if len + 8 >= super::slab::MALLOC_MMAP_THRESHOLD => (len + 16).next_multiple_of(4096),
        None => (len + 8).next_multiple_of(16),
    }
}

impl Shard {
    /// A shard that holds at most `capacity` entries (at least 1), with S3-FIFO and no byte
    /// limit.
    pub fn new(capacity: usize) -> Self {
        Self::with(
            Policy::S3Fifo,
            Limits {
                bytes: usize::MAX,
                entries: capacity.max(1),
            },
        )
    }

    /// A shard with `policy` and `limits`.
    ///
    /// With an entry limit, the slot array and the index are sized for it up front (up to
    /// [`PRESIZE_MAX`] entries): growing them by doubling leaves the freed old arrays as holes
    /// in the allocator's heap, which measured as ~12 bytes of RSS per entry at 1M entries.
    /// Untouched reserved pages cost no RSS; the index's control bytes (1 per bucket) do.
    pub fn with(policy: Policy, limits: Limits) -> Self {
        let presize = if limits.entries == usize::MAX {
            0
        } else {
            limits.entries.min(PRESIZE_MAX)
        };
        let slab_entries = if limits.entries != usize::MAX {
            limits.entries
        } else {
            (limits.bytes / 64).min(1 << 30)
        };
        Self {
            index: HashTable::with_capacity(presize),
            slots: Vec::with_capacity(presize),
            meta: Vec::with_capacity(presize),
            free: Vec::new(),
            dead_queued: 0,
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_bytes: 0,
            ghost: Ghost::new(64),
            expiring: BTreeMap::new(),
            expiring_len: 0,
            policy,
            limits,
            len: 0,
            bytes: 0,
            charged: 0,
            hasher: ahash::RandomState::new(),
            evictions: 0,
            evicted_bytes: 0,
            expirations: 0,
            digest: vec![0; BUCKETS].into_boxed_slice(),
            counts: vec![0; BUCKETS].into_boxed_slice(),
            slab: Slab::new(slab_entries),
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

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// What the shard holds in memory: the allocator's charge for every entry, the index, the
    /// slot array, the queues, the ghost, the expiry wheel and the fixed per-shard part. What
    /// the byte limit counts.
    pub fn used_bytes(&self) -> usize {
        self.charged + self.structure_bytes()
    }

    fn structure_bytes(&self) -> usize {
        SHARD_FIXED_BYTES
            + self.index.allocation_size()
            + self.slots.len() * std::mem::size_of::<Option<Entry>>()
            + self.meta.len()
            + self.free.len() * 4
            + (self.small.len() + self.main.len()) * 4
            + self.ghost.bytes()
            + self.expiring_len * 4
            + self.expiring.len() * 48
    }

    pub fn stats(&self) -> ShardStats {
        ShardStats {
            entries: self.len as u64,
            bytes: self.bytes as u64,
            evictions: self.evictions,
            expirations: self.expirations,
            used_bytes: self.used_bytes() as u64,
            evicted_bytes: self.evicted_bytes,
            limit_bytes: self.limits.bytes as u64,
            limit_entries: self.limits.entries as u64,
        }
    }

    /// Sets new limits and evicts at once down to them. Returns how many entries went.
    pub fn set_limits(&mut self, limits: Limits, now: Tick) -> usize {
        self.limits = limits;
        let before = self.evictions + self.expirations;
        while self.len > 0
            && (self.len > limits.entries || self.used_bytes() > limits.bytes)
            && self.evict_one(now, false)
        {}
        (self.evictions + self.expirations - before) as usize
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
    fn max_freq(&self) -> u8 {
        match self.policy {
            Policy::S3Fifo => S3FIFO_MAX_FREQ,
            Policy::Clock => 1,
        }
    }

    #[inline]
    fn touch(&mut self, s: u32) {
        let max = self.max_freq();
        let m = &mut self.meta[s as usize];
        if *m & FREQ_MASK < max {
            *m += 1;
        }
    }

    #[inline]
    fn in_small(&self, s: u32) -> bool {
        self.policy == Policy::S3Fifo && self.meta[s as usize] & IN_MAIN == 0
    }

    /// Takes the entry out of slot `s` and the index. `queued`: the slot is still in a queue
    /// (it is freed when the queue reaches it), else it was just taken from one.
    fn remove_slot(&mut self, s: u32, hash: u64, queued: bool) {
        if let Ok(found) = self.index.find_entry(hash, |&x| x == s) {
            found.remove();
        }
        if let Some(entry) = self.slots[s as usize].take() {
            let len = entry.alloc_len();
            self.bytes -= len;
            self.charged -= charge(len);
            if queued && self.in_small(s) {
                self.small_bytes -= charge(len);
            }
            self.digest_account(entry.key(), entry.version(), entry.flags(), -1);
            entry.free(&mut self.slab);
        }
        self.meta[s as usize] &= SCHEDULED;
        self.len -= 1;
        if queued {
            self.dead_queued += 1;
            if self.dead_queued > self.len + 1024 {
                self.compact_queues();
            }
        } else {
            self.free.push(s);
        }
    }

    /// Drops the emptied slots from the queues and frees them: deletes without evictions would
    /// otherwise grow the queues without bound.
    fn compact_queues(&mut self) {
        let slots = &self.slots;
        let free = &mut self.free;
        for q in [&mut self.small, &mut self.main] {
            q.retain(|&s| {
                let live = slots[s as usize].is_some();
                if !live {
                    free.push(s);
                }
                live
            });
        }
        self.dead_queued = 0;
    }

    /// A slot for a new entry.
    fn alloc_slot(&mut self, entry: Entry) -> u32 {
        if let Some(s) = self.free.pop() {
            self.slots[s as usize] = Some(entry);
            self.meta[s as usize] &= SCHEDULED;
            s
        } else {
            let s = u32::try_from(self.slots.len()).expect("fewer than 2^32 entries per shard");
            self.slots.push(Some(entry));
            self.meta.push(0);
            s
        }
    }

    /// Puts slot `s` in the expiry wheel at `expires_at` unless it already has a place there.
    /// A place later than the entry's expiry (the slot was reused) only delays its reclaim to
    /// that place: reads never return an expired entry whatever the wheel says.
    fn schedule(&mut self, s: u32, expires_at: Tick) {
        if expires_at == 0 || self.meta[s as usize] & SCHEDULED != 0 {
            return;
        }
        self.meta[s as usize] |= SCHEDULED;
        self.expiring.entry(expires_at).or_default().push(s);
        self.expiring_len += 1;
    }

    /// Reclaims one entry whose time has come, if any is due; true if one went.
    fn expire_one(&mut self, now: Tick) -> bool {
        loop {
            let Some(mut first) = self.expiring.first_entry() else {
                return false;
            };
            if *first.key() > now {
                return false;
            }
            let Some(s) = first.get_mut().pop() else {
                first.remove();
                continue;
            };
            self.expiring_len -= 1;
            self.meta[s as usize] &= !SCHEDULED;
            let Some(e) = self.slots[s as usize].as_ref() else {
                continue;
            };
            let expires_at = e.expires_at();
            if is_expired(expires_at, now) {
                let hash = self.hash(e.key());
                self.remove_slot(s, hash, true);
                self.expirations += 1;
                return true;
            }
            // Overwritten with a later expiry (or none) since it was placed.
            self.schedule(s, expires_at);
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
            self.remove_slot(s, hash, true);
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
        self.set_at(key, value, version, expires_at, flags, now);
        (true, existed)
    }

    /// Stores `key` -> `value` at tick 0 (tests and callers without a clock).
    pub fn set(&mut self, key: &[u8], value: &[u8], version: Version, expires_at: Tick, flags: u8) {
        self.set_at(key, value, version, expires_at, flags, 0)
    }

    /// Stores `key` -> `value`, first reclaiming expired entries, then evicting, until it fits
    /// the shard's limits. An entry larger than the byte limit is stored once everything else
    /// went: whether it may be at all is the caller's decision (against the node's budget).
    pub fn set_at(
        &mut self,
        key: &[u8],
        value: &[u8],
        version: Version,
        expires_at: Tick,
        flags: u8,
        now: Tick,
    ) {
        let hash = self.hash(key);
        if let Some(s) = self.find(hash, key) {
            let in_small = self.in_small(s);
            let entry = self.slots[s as usize]
                .as_mut()
                .expect("indexed slots hold an entry");
            let pos = key_position(key);
            self.digest[bucket_of_position(pos)] ^=
                entry_digest_at(pos, entry.version(), entry.flags())
                    ^ entry_digest_at(pos, version, flags);
            let mut grew = false;
            if !entry.try_overwrite(key, value, version, expires_at, flags) {
                let new = Entry::new(&mut self.slab, key, value, version, expires_at, flags);
                let (old_len, new_len) = (entry.alloc_len(), new.alloc_len());
                self.bytes = self.bytes - old_len + new_len;
                self.charged = self.charged - charge(old_len) + charge(new_len);
                if in_small {
                    self.small_bytes = self.small_bytes - charge(old_len) + charge(new_len);
                }
                grew = charge(new_len) > charge(old_len);
                std::mem::replace(entry, new).free(&mut self.slab);
            }
            self.touch(s);
            self.schedule(s, expires_at);
            if grew {
                self.make_room(0, now);
            }
            return;
        }
        let len = entry_len(key.len(), value.len());
        self.make_room(charge(len) + SLOT_BYTES, now);
        let entry = Entry::new(&mut self.slab, key, value, version, expires_at, flags);
        self.bytes += len;
        self.charged += charge(len);
        self.digest_account(key, version, flags, 1);
        let s = self.alloc_slot(entry);
        let to_main = match self.policy {
            Policy::Clock => true,
            Policy::S3Fifo => self.ghost.take(hash),
        };
        if to_main {
            self.meta[s as usize] |= IN_MAIN;
            self.main.push_back(s);
        } else {
            self.small_bytes += charge(len);
            self.small.push_back(s);
        }
        self.schedule(s, expires_at);
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

    /// Evicts until `incoming` more bytes and one more entry (if `incoming` > 0) fit the
    /// limits. An index that would have to double to take the entry counts its growth.
    fn make_room(&mut self, incoming: usize, now: Tick) {
        let entries = self.limits.entries.saturating_sub((incoming > 0) as usize);
        loop {
            let growth = if incoming > 0 && self.index.len() == self.index.capacity() {
                self.index.allocation_size().max(4096)
            } else {
                0
            };
            let over_bytes = self.used_bytes() + incoming + growth > self.limits.bytes;
            if self.len == 0 || (self.len <= entries && !over_bytes) {
                break;
            }
            if !self.evict_one(now, true) {
                break;
            }
        }
        if self.policy == Policy::S3Fifo && self.ghost.slots() < self.len / 2 {
            self.ghost = Ghost::new(self.len);
        }
    }

    /// Makes room for one entry: an expired entry if any is due, else one chosen by the policy.
    /// `for_insert`: counted as wanted room (`evicted_bytes`), not as a shrink. False when the
    /// shard is empty.
    fn evict_one(&mut self, now: Tick, for_insert: bool) -> bool {
        if self.expire_one(now) {
            return true;
        }
        let mut moves = 0;
        loop {
            let from_small = !self.small.is_empty()
                && (self.main.is_empty() || self.small_bytes * 100 > self.charged * SMALL_PERCENT);
            let popped = if from_small {
                self.small.pop_front()
            } else {
                self.main.pop_front()
            };
            let Some(s) = popped else {
                return false;
            };
            let Some(e) = self.slots[s as usize].as_ref() else {
                self.dead_queued -= 1;
                self.free.push(s);
                continue;
            };
            let c = charge(e.alloc_len());
            let expired = is_expired(e.expires_at(), now);
            let freq = self.meta[s as usize] & FREQ_MASK;
            if from_small {
                self.small_bytes -= c;
            }
            if !expired && freq > 0 && moves < MAX_MOVES {
                // Promoted from small with its count reset, or reinserted in main with one
                // count spent.
                let m = &mut self.meta[s as usize];
                *m = (*m & SCHEDULED) | IN_MAIN | if from_small { 0 } else { freq - 1 };
                self.main.push_back(s);
                moves += 1;
                continue;
            }
            let hash = self.hash(e.key());
            if from_small && !expired {
                self.ghost.insert(hash);
            }
            self.remove_slot(s, hash, false);
            if expired {
                self.expirations += 1;
            } else {
                self.evictions += 1;
                if for_insert {
                    self.evicted_bytes += c as u64;
                }
            }
            return true;
        }
    }

    /// Removes `key`; true if a live entry was removed.
    pub fn delete(&mut self, key: &[u8], now: Tick) -> bool {
        let hash = self.hash(key);
        let Some(s) = self.find(hash, key) else {
            return false;
        };
        let live = !is_expired(self.entry(s).expires_at(), now);
        self.remove_slot(s, hash, true);
        if !live {
            self.expirations += 1;
        }
        live
    }

    /// Active expiry: reclaims at most `budget` entries whose time has come, oldest expiry
    /// first, so memory held by keys nobody reads again is reclaimed with a bounded pause.
    /// Returns (entries examined, entries expired).
    pub fn sweep(&mut self, now: Tick, budget: usize) -> (usize, usize) {
        let mut expired = 0;
        while expired < budget && self.expire_one(now) {
            expired += 1;
        }
        (expired, expired)
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
                self.remove_slot(s, hash, true);
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
