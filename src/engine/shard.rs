//! One shard: a hash index, eviction (S3-FIFO or CLOCK) under limits in bytes and entries,
//! TTLs and versions. Plain single-threaded code with no runtime: the owning core calls it
//! synchronously and passes `now` in, so tests drive time by hand.
//!
//! Memory per entry, which the bench measures against Redis and memcached: the entry itself,
//! packed in a segment of the shard's [`Log`] (an 8-byte header for a typical entry, see
//! [`super::entry`]), and the index's 4-byte location plus 1 control byte per bucket. The
//! queues are the log's segments, and the access count lives in the entry's flags byte, so
//! eviction costs nothing per entry; the ghost is allocated once evictions start (about 2
//! bytes per entry). An entry with a TTL also has an 8-byte hash in the expiry wheel.
//!
//! A delete, an expiry or an overwrite that changes an entry's size leaves a dead copy in its
//! segment; the space comes back when the segment empties, when its queue's head passes it, or
//! when it is more than half dead and a write compacts it.

use super::{
    entry::{
        self, Base, EntryRef, Shape, DEAD, FLAG_TOMBSTONE, FREQ_MASK, FREQ_SHIFT, MAX_NODES,
        NODE_INLINE, USER_FLAGS,
    },
    ghost::Ghost,
    hlc::Version,
    index::Index,
    log::{Cursor, Log, Queue, SEGMENT},
};
use crate::routing::buckets::{bucket_of, bucket_of_position, key_position, BucketSet, BUCKETS};
use std::{alloc::Layout, collections::BTreeMap};

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

/// Largest entry count a shard presizes its index for at creation; beyond it the index grows
/// on demand.
pub const PRESIZE_MAX: usize = 1 << 22;

/// Most entries one eviction moves (promotes or reinserts) before it evicts the one in hand
/// anyway: when nearly every entry was read since it was queued, an exact search for one that
/// was not could walk the whole shard (half a millisecond at 500k entries) inside one Set.
const MAX_MOVES: usize = 1024;

/// S3-FIFO's small queue holds this share of the shard's entry bytes (the paper's 10%).
const SMALL_PERCENT: usize = 10;

/// Highest access count an entry keeps (S3-FIFO's two bits); CLOCK keeps one bit.
const S3FIFO_MAX_FREQ: u8 = 3;

/// Bytes a shard holds whatever it stores: the digest and count per ring bucket, its two open
/// tail segments and the spare one.
pub const SHARD_FIXED_BYTES: usize = BUCKETS * 12 + 3 * SEGMENT;

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

/// A value to store: its bytes, or a large entry's block moving with it.
#[derive(Clone, Copy)]
enum Value<'a> {
    Bytes(&'a [u8]),
    Block(*mut u8, usize),
}

pub struct Shard {
    /// Key hash -> location of the key's entry in `log`.
    index: Index,
    log: Log,
    /// Node ids the entries' versions name by index (see [`super::entry`]).
    nodes: Vec<u32>,
    ghost: Ghost,
    /// Expiry tick -> hashes of keys whose entry expires then (or did, before an overwrite or
    /// a delete: checked when taken). Lets expired entries go before any live one is evicted,
    /// and the sweep visit only entries that expired. Rebuilt from the entries when stale
    /// hashes outnumber them.
    expiring: BTreeMap<Tick, Vec<u64>>,
    expiring_len: usize,
    policy: Policy,
    limits: Limits,
    len: usize,
    /// Bytes of the entries (log bytes and large values' blocks).
    bytes: usize,
    /// What malloc takes for large entries' blocks.
    blocks_charged: usize,
    hasher: ahash::RandomState,
    evictions: u64,
    evicted_bytes: u64,
    expirations: u64,
    /// Per ring bucket, the XOR of `entry_digest` over the entries held: the leaves of the
    /// anti-entropy tree, kept up to date by every insert, overwrite and removal.
    digest: Box<[u64]>,
    /// Per ring bucket, the number of entries held: sizes anti-entropy's key-list batches.
    counts: Box<[u32]>,
}

/// What malloc takes for a block of `len` bytes (glibc: 8 bytes of header, 16-byte
/// granularity), or from [`super::log::MALLOC_MMAP_THRESHOLD`] up a mapping of whole pages.
#[inline]
fn block_charge(len: usize) -> usize {
    if len + 8 >= super::log::MALLOC_MMAP_THRESHOLD {
        (len + 16).next_multiple_of(4096)
    } else {
        (len + 8).next_multiple_of(16)
    }
}

/// About what an entry with this key and value takes in a shard (its place in the log, and a
/// large one's block): what the node's budget is checked against before a write.
pub fn footprint(key_len: usize, value_len: usize) -> usize {
    let shape = Shape::new(
        key_len,
        value_len,
        Version::default(),
        Base::default(),
        0,
        0,
    );
    shape.log_len()
        + if shape.is_large() {
            block_charge(value_len)
        } else {
            0
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

    /// A shard with `policy` and `limits`, its log sized for the byte limit (or about 1 KiB
    /// per entry of the entry limit).
    pub fn with(policy: Policy, limits: Limits) -> Self {
        let room = if limits.bytes != usize::MAX {
            limits.bytes
        } else if limits.entries != usize::MAX {
            limits.entries.saturating_mul(1024)
        } else {
            1 << 34
        };
        Self::with_room(policy, limits, room)
    }

    /// A shard with `policy` and `limits` whose log can grow to `room` bytes: the node's whole
    /// budget, as budget moves between shards. The larger the room, the coarser the alignment
    /// of entries (1 byte up to 4 GiB). A shard whose range is used up before its byte limit
    /// is reached evicts to write (`set_at`), as it would at the limit.
    ///
    /// With an entry limit, the index is sized for it up front (up to [`PRESIZE_MAX`]
    /// entries): growing it by doubling leaves the freed old arrays as holes in the
    /// allocator's heap.
    pub fn with_room(policy: Policy, limits: Limits, room: usize) -> Self {
        let presize = if limits.entries == usize::MAX {
            0
        } else {
            limits.entries.min(PRESIZE_MAX)
        };
        Self {
            index: Index::with_capacity(presize),
            log: Log::new(room.min(1 << 40)),
            nodes: Vec::new(),
            ghost: Ghost::new(64),
            expiring: BTreeMap::new(),
            expiring_len: 0,
            policy,
            limits,
            len: 0,
            bytes: 0,
            blocks_charged: 0,
            hasher: ahash::RandomState::new(),
            evictions: 0,
            evicted_bytes: 0,
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

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// What the shard holds in memory: its resident segments, large entries' blocks, the
    /// index, the ghost, the expiry wheel and the fixed per-shard part. What the byte limit
    /// counts.
    pub fn used_bytes(&self) -> usize {
        self.log.resident_bytes() + self.blocks_charged + self.structure_bytes()
    }

    fn structure_bytes(&self) -> usize {
        BUCKETS * 12
            + self.index.allocation_size()
            + self.log.meta_bytes()
            + self.nodes.capacity() * 4
            + self.ghost.bytes()
            + self.expiring_len * 8
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
        self.make_room(0, None, now);
        (self.evictions + self.expirations - before) as usize
    }

    #[inline]
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    #[inline]
    fn entry(&self, loc: u32) -> EntryRef<'_> {
        // SAFETY: indexed and queued locations hold entries written with their segment's
        // base and this shard's node table.
        unsafe { EntryRef::new(self.log.ptr(loc), self.log.base_of(loc), &self.nodes) }
    }

    #[inline]
    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let log = &self.log;
        self.index
            // SAFETY: the index holds locations of live entries.
            .find(hash, |&loc| unsafe { entry::key_at(log.ptr(loc)) } == key)
    }

    #[inline]
    fn max_freq(&self) -> u8 {
        match self.policy {
            Policy::S3Fifo => S3FIFO_MAX_FREQ,
            Policy::Clock => 1,
        }
    }

    /// The index of `node` in the table, added if new (`NODE_INLINE` once the table is full).
    #[inline]
    fn node_index(&mut self, node: u32) -> u8 {
        if let Some(i) = self.nodes.iter().position(|&n| n == node) {
            return i as u8;
        }
        if self.nodes.len() < MAX_NODES {
            self.nodes.push(node);
            (self.nodes.len() - 1) as u8
        } else {
            NODE_INLINE
        }
    }

    /// The shape of an entry appended to `q` now, and whether it needs a new segment.
    fn shape_for(
        &self,
        q: Queue,
        key: &[u8],
        value_len: usize,
        version: Version,
        node: u8,
        expires_at: Tick,
    ) -> (Shape, bool) {
        let fresh = Base {
            hlc: version.hlc,
            node: version.node,
        };
        let (room, base) = self.log.tail(q);
        let shape = Shape::new(
            key.len(),
            value_len,
            version,
            base.unwrap_or(fresh),
            node,
            expires_at,
        );
        if self.log.align(shape.log_len()) <= room {
            return (shape, false);
        }
        (
            Shape::new(key.len(), value_len, version, fresh, node, expires_at),
            true,
        )
    }

    /// Writes an entry at the tail of `q` with access count `freq`. `None` when the log's
    /// range is used up (the caller evicts and tries again).
    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        q: Queue,
        key: &[u8],
        value: Value,
        version: Version,
        expires_at: Tick,
        flags: u8,
        freq: u8,
    ) -> Option<u32> {
        let value_len = match value {
            Value::Bytes(v) => v.len(),
            Value::Block(_, len) => len,
        };
        let node = self.node_index(version.node);
        let (shape, new_segment) = self.shape_for(q, key, value_len, version, node, expires_at);
        if new_segment && !self.log.open(q) {
            return None;
        }
        let aligned = self.log.align(shape.log_len());
        let fresh = Base {
            hlc: version.hlc,
            node: version.node,
        };
        let base = self.log.tail(q).1.unwrap_or(fresh);
        let loc = self.log.push(q, aligned, fresh);
        let addr;
        let stored: &[u8] = match (shape.is_large(), value) {
            (false, Value::Bytes(v)) => v,
            (true, Value::Block(p, _)) => {
                addr = (p as usize).to_ne_bytes();
                &addr
            }
            (true, Value::Bytes(v)) => {
                let layout = Layout::from_size_align(v.len(), 1).expect("value length fits");
                // SAFETY: a large value is longer than MAX_INLINE, so the layout is not empty.
                let p = unsafe { std::alloc::alloc(layout) };
                if p.is_null() {
                    std::alloc::handle_alloc_error(layout);
                }
                // SAFETY: a fresh block of v.len() bytes.
                unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), p, v.len()) };
                self.bytes += v.len();
                self.blocks_charged += block_charge(v.len());
                addr = (p as usize).to_ne_bytes();
                &addr
            }
            (false, Value::Block(..)) => unreachable!("largeness depends on the lengths only"),
        };
        // SAFETY: `push` reserved `aligned` >= shape.log_len() bytes at `loc`.
        unsafe {
            entry::write(
                self.log.ptr(loc),
                &shape,
                &entry::Fields {
                    key,
                    value: stored,
                    value_len,
                    version,
                    expires_at,
                    flags: (flags & USER_FLAGS) | (freq << FREQ_SHIFT),
                },
                base,
            )
        };
        self.bytes += shape.log_len();
        Some(loc)
    }

    /// Marks the entry at `loc` dead in the log and takes it out of the byte counts; frees a
    /// large entry's block unless it moved with a new copy (`keep_block`).
    fn kill(&mut self, loc: u32, keep_block: bool) {
        let e = self.entry(loc);
        let (len, block) = (e.log_len(), e.block());
        self.kill_parsed(loc, len, block, keep_block);
    }

    /// [`Shard::kill`] with the entry's log length and block already read off it.
    fn kill_parsed(&mut self, loc: u32, len: usize, block: Option<(*mut u8, usize)>, keep: bool) {
        // SAFETY: the entry's own flags byte.
        unsafe { *entry::flags_at(self.log.ptr(loc)) |= DEAD };
        self.bytes -= len;
        if let Some((p, block_len)) = block {
            if !keep {
                self.bytes -= block_len;
                self.blocks_charged -= block_charge(block_len);
                let layout = Layout::from_size_align(block_len, 1).expect("value length fits");
                // SAFETY: allocated in `append` with this layout; its entry goes now.
                unsafe { std::alloc::dealloc(p, layout) };
            }
        }
        let aligned = self.log.align(len);
        self.log.kill(loc, aligned);
    }

    /// Removes the entry at `loc` (hash `hash`) from the index and the shard.
    fn remove(&mut self, loc: u32, hash: u64) {
        self.index.remove(hash, |&x| x == loc);
        let e = self.entry(loc);
        let (key, version, flags) = (e.key(), e.version(), e.flags());
        let (len, block) = (e.log_len(), e.block());
        let pos = key_position(key);
        let b = bucket_of_position(pos);
        self.digest[b] ^= entry_digest_at(pos, version, flags);
        self.counts[b] = self.counts[b].wrapping_sub(1);
        self.kill_parsed(loc, len, block, false);
        self.len -= 1;
    }

    /// Copies the entry at `loc` to the tail of `q` with access count `freq` and points the
    /// index at the copy. False (nothing changed) when the log's range is used up.
    fn relocate(&mut self, loc: u32, q: Queue, freq: u8) -> bool {
        let e = self.entry(loc);
        let (key, version, expires_at, flags) = (e.key(), e.version(), e.expires_at(), e.flags());
        let (key, value) = (
            key as *const [u8],
            e.block().ok_or(e.value() as *const [u8]),
        );
        // SAFETY: the old copy stays in place until `kill` below; appending writes past the
        // tail's end, never over it.
        let (key, value) = unsafe {
            (
                &*key,
                match value {
                    Ok((p, len)) => Value::Block(p, len),
                    Err(bytes) => Value::Bytes(&*bytes),
                },
            )
        };
        let Some(new) = self.append(q, key, value, version, expires_at, flags, freq) else {
            return false;
        };
        let hash = self.hash(key);
        if let Some(slot) = self.index.find_mut(hash, |&x| x == loc) {
            *slot = new;
        }
        self.kill(loc, true);
        true
    }

    /// Puts `hash` in the expiry wheel at `expires_at`.
    fn schedule(&mut self, hash: u64, expires_at: Tick) {
        if expires_at == 0 {
            return;
        }
        self.expiring.entry(expires_at).or_default().push(hash);
        self.expiring_len += 1;
        if self.expiring_len > 2 * self.len + 1024 {
            self.rebuild_expiring();
        }
    }

    /// Refills the wheel from the live entries, dropping the hashes of keys deleted or
    /// overwritten since they were placed.
    fn rebuild_expiring(&mut self) {
        let mut wheel: BTreeMap<Tick, Vec<u64>> = BTreeMap::new();
        let mut n = 0;
        for loc in self.log.all() {
            let e = self.entry(loc);
            if !e.is_dead() && e.expires_at() != 0 {
                wheel
                    .entry(e.expires_at())
                    .or_default()
                    .push(self.hash(e.key()));
                n += 1;
            }
        }
        self.expiring = wheel;
        self.expiring_len = n;
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
            let Some(hash) = first.get_mut().pop() else {
                first.remove();
                continue;
            };
            self.expiring_len -= 1;
            let (log, hasher) = (&self.log, &self.hasher);
            let found = self
                .index
                // SAFETY: the index holds locations of live entries.
                .find(hash, |&loc| {
                    hasher.hash_one(unsafe { entry::key_at(log.ptr(loc)) }) == hash
                });
            let Some(loc) = found else {
                continue;
            };
            if is_expired(self.entry(loc).expires_at(), now) {
                self.remove(loc, hash);
                self.expirations += 1;
                return true;
            }
            // Overwritten with a later expiry (placed again then) or none.
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
        let loc = self.find(hash, key)?;
        let p = self.log.ptr(loc);
        // SAFETY: an indexed location holds a live entry.
        if is_expired(unsafe { entry::expires_at(p) }, now) {
            self.remove(loc, hash);
            self.expirations += 1;
            return None;
        }
        let max = self.max_freq();
        // SAFETY: the entry's own flags byte, which no reference holds.
        let flags = unsafe { entry::flags_at(p) };
        if (*flags & FREQ_MASK) >> FREQ_SHIFT < max {
            *flags += 1 << FREQ_SHIFT;
        }
        let e = self.entry(loc);
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
        let flags = flags & USER_FLAGS;
        let hash = self.hash(key);
        if let Some(loc) = self.find(hash, key) {
            self.overwrite(loc, hash, key, value, version, expires_at, flags, now);
            return;
        }
        let q = match self.policy {
            Policy::Clock => Queue::Main,
            Policy::S3Fifo if self.ghost.take(hash) => Queue::Main,
            Policy::S3Fifo => Queue::Small,
        };
        let node = self.node_index(version.node);
        let (mut shape, mut new_segment) =
            self.shape_for(q, key, value.len(), version, node, expires_at);
        if new_segment && self.log.has_sparse() {
            // Before a new segment, one more than half dead is compacted: without evictions
            // nothing else would reclaim the space deletes and resizing overwrites leave.
            self.compact_one();
            (shape, new_segment) = self.shape_for(q, key, value.len(), version, node, expires_at);
        }
        let incoming = if new_segment { SEGMENT } else { 0 }
            + if shape.is_large() {
                block_charge(value.len())
            } else {
                0
            };
        self.make_room(incoming, Some(hash), now);
        let loc = loop {
            if let Some(loc) =
                self.append(q, key, Value::Bytes(value), version, expires_at, flags, 0)
            {
                break loc;
            }
            // The log's range is used up: only eviction makes room.
            if !self.evict_one(now, true) {
                return;
            }
        };
        self.digest_account(key, version, flags, 1);
        self.schedule(hash, expires_at);
        let (index, log, hasher) = (&mut self.index, &self.log, &self.hasher);
        // SAFETY: the index holds locations of live entries.
        index.insert(hash, loc, |&x| {
            hasher.hash_one(unsafe { entry::key_at(log.ptr(x)) })
        });
        self.len += 1;
    }

    /// A new value for the key held at `loc`: written over the old one's fields when they keep
    /// their form (the common same-size overwrite), else appended to the same queue.
    #[allow(clippy::too_many_arguments)]
    fn overwrite(
        &mut self,
        loc: u32,
        hash: u64,
        key: &[u8],
        value: &[u8],
        version: Version,
        expires_at: Tick,
        flags: u8,
        now: Tick,
    ) {
        let max = self.max_freq();
        let old = self.entry(loc);
        let (old_version, old_flags) = (old.version(), old.flags());
        let freq = (old.freq() + 1).min(max);
        let pos = key_position(key);
        let in_place = old.fits(version, expires_at, value.len());
        if in_place {
            // SAFETY: it fits, and the shard is held mutably.
            unsafe {
                entry::rewrite(
                    old,
                    version,
                    expires_at,
                    value,
                    flags | (freq << FREQ_SHIFT),
                )
            };
        }
        self.digest[bucket_of_position(pos)] ^=
            entry_digest_at(pos, old_version, old_flags) ^ entry_digest_at(pos, version, flags);
        if in_place {
            self.schedule(hash, expires_at);
            return;
        }
        let q = self.log.queue_of(loc);
        let new = loop {
            if let Some(new) = self.append(
                q,
                key,
                Value::Bytes(value),
                version,
                expires_at,
                flags,
                freq,
            ) {
                break new;
            }
            if !self.evict_one(now, true) || self.find(hash, key) != Some(loc) {
                // The key itself went to make room: store it as a new one.
                self.set_at(key, value, version, expires_at, flags, now);
                return;
            }
        };
        if let Some(slot) = self.index.find_mut(hash, |&x| x == loc) {
            *slot = new;
        }
        self.kill(loc, false);
        self.schedule(hash, expires_at);
        self.make_room(0, None, now);
    }

    /// Moves the live entries of a segment more than half dead to the tails of their queues,
    /// which frees it. False when there was none (or no room to move to).
    fn compact_one(&mut self) -> bool {
        let Some(locs) = self.log.take_sparse() else {
            return false;
        };
        for loc in locs {
            let e = self.entry(loc);
            if e.is_dead() {
                continue;
            }
            let (q, freq) = (self.log.queue_of(loc), e.freq());
            if !self.relocate(loc, q, freq) {
                return false;
            }
        }
        true
    }

    /// Evicts until `incoming` more bytes and, if `entry` (the new key's hash), one more entry
    /// fit the limits. An index that would have to double to take the entry counts its
    /// growth. Space held by
    /// dead copies is reclaimed (the spare segment, then segments more than half dead) before
    /// any live entry is evicted.
    fn make_room(&mut self, incoming: usize, entry: Option<u64>, now: Tick) {
        let entries = self.limits.entries.saturating_sub(entry.is_some() as usize);
        loop {
            let growth = entry.map_or(0, |hash| self.index.growth(hash));
            let over_bytes = self.used_bytes() + incoming + growth > self.limits.bytes;
            if self.len == 0 || (self.len <= entries && !over_bytes) {
                break;
            }
            if over_bytes && self.len <= entries && (self.log.trim_spare() || self.compact_one()) {
                continue;
            }
            if !self.evict_one(now, entry.is_some()) {
                break;
            }
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
            let (small, main) = (self.log.live(Queue::Small), self.log.live(Queue::Main));
            if small + main == 0 {
                return false;
            }
            let from_small =
                small > 0 && (main == 0 || small * 100 > (small + main) * SMALL_PERCENT);
            let q = if from_small {
                Queue::Small
            } else {
                Queue::Main
            };
            let Some(loc) = self.log.head(q) else {
                return false;
            };
            let e = self.entry(loc);
            let (dead, len, expires_at, freq) =
                (e.is_dead(), e.log_len(), e.expires_at(), e.freq());
            let c = self.log.align(len) + e.block().map_or(0, |(_, n)| block_charge(n));
            let hash = (!dead).then(|| self.hash(e.key()));
            self.log.advance(q, self.log.align(len));
            let Some(hash) = hash else {
                continue;
            };
            let expired = is_expired(expires_at, now);
            if !expired && freq > 0 && moves < MAX_MOVES {
                // Promoted from small with its count reset, or reinserted in main with one
                // count spent.
                let freq = if from_small { 0 } else { freq - 1 };
                if self.relocate(loc, Queue::Main, freq) {
                    moves += 1;
                    continue;
                }
            }
            if from_small && !expired {
                if self.ghost.slots() < self.len / 2 {
                    // Sized when evictions start: a shard that never fills holds no ghost.
                    self.ghost = Ghost::new(self.len);
                }
                self.ghost.insert(hash);
            }
            self.remove(loc, hash);
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
        let Some(loc) = self.find(hash, key) else {
            return false;
        };
        let live = !is_expired(self.entry(loc).expires_at(), now);
        self.remove(loc, hash);
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

    /// Calls `f` with every live entry (tombstones included, expired ones not) whose bucket is
    /// in `buckets`, going on from `cursor` for at most `max` entries (dead copies included),
    /// so that scans that must not hold the core for long go a chunk at a time.
    pub fn scan(
        &self,
        cursor: &mut Cursor,
        max: usize,
        buckets: &BucketSet,
        now: Tick,
        mut f: impl FnMut(EntryRef<'_>),
    ) {
        for _ in 0..max {
            let Some(loc) = self.log.scan_step(cursor) else {
                return;
            };
            let e = self.entry(loc);
            if !e.is_dead()
                && !is_expired(e.expires_at(), now)
                && buckets.contains(bucket_of(e.key()))
            {
                f(e);
            }
        }
    }

    /// The entry for `key` as it is, without marking it used (anti-entropy reads must not
    /// change what eviction keeps). Expired entries are not returned.
    pub fn peek(&self, key: &[u8], now: Tick) -> Option<EntryRef<'_>> {
        let loc = self.find(self.hash(key), key)?;
        let e = self.entry(loc);
        (!is_expired(e.expires_at(), now)).then_some(e)
    }

    /// Removes every entry whose bucket is in `buckets` (ranges this node no longer
    /// replicates), going on from `cursor` for at most `max` entries. Returns how many were
    /// removed.
    pub fn drop_buckets_from(
        &mut self,
        cursor: &mut Cursor,
        max: usize,
        buckets: &BucketSet,
    ) -> usize {
        let mut dropped = 0;
        for _ in 0..max {
            let Some(loc) = self.log.scan_step(cursor) else {
                break;
            };
            let e = self.entry(loc);
            if !e.is_dead() && buckets.contains(bucket_of(e.key())) {
                let hash = self.hash(e.key());
                self.remove(loc, hash);
                dropped += 1;
            }
        }
        dropped
    }
}

#[cfg(test)]
impl Shard {
    /// `scan` over every entry.
    fn for_each_in(&self, buckets: &BucketSet, now: Tick, f: impl FnMut(EntryRef<'_>)) {
        self.scan(&mut Cursor::default(), usize::MAX, buckets, now, f);
    }

    /// `drop_buckets_from` over every entry.
    fn drop_buckets(&mut self, buckets: &BucketSet) -> usize {
        self.drop_buckets_from(&mut Cursor::default(), usize::MAX, buckets)
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        let blocks: Vec<_> = self
            .log
            .all()
            .filter_map(|loc| {
                let e = self.entry(loc);
                if e.is_dead() {
                    None
                } else {
                    e.block()
                }
            })
            .collect();
        for (p, len) in blocks {
            // SAFETY: a live large entry's block, allocated in `append` with this layout.
            unsafe { std::alloc::dealloc(p, Layout::from_size_align(len, 1).expect("fits")) };
        }
    }
}

#[cfg(test)]
mod tests;
