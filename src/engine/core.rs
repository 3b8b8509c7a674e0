//! What one core runs for its shards: the shards themselves, the core's clock, and the
//! execution of commands that arrive either from this core's ingress or over the mesh. Lives
//! on one glommio executor; shared by its tasks through `Rc`, never across threads.

use super::{
    budget::{divide, Demand, Memory},
    command::{Command, ReplicaEntry, Reply, Request, Response},
    entry::FLAG_BINARY,
    hlc::{wall_us, Hlc, Version},
    log::{shard_room, Cursor},
    shard::{
        expiry_tick, expiry_tick_ms, footprint, remaining_ms, Limits, Shard, ShardStats, Tick,
        SHARD_FIXED_BYTES, TICKS_PER_SEC,
    },
};
use crate::{
    error::Error,
    routing,
    routing::buckets::{BucketSet, BUCKETS},
};
use std::{
    cell::{Cell, RefCell},
    panic::AssertUnwindSafe,
    rc::Rc,
    time::{Duration, Instant},
};

/// The leaves of a node's (or a core's) digest tree: per ring bucket, the XOR of its entries'
/// digests and how many entries it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaves {
    pub digests: Vec<u64>,
    pub counts: Vec<u32>,
}

impl Default for Leaves {
    fn default() -> Self {
        Leaves {
            digests: vec![0; BUCKETS],
            counts: vec![0; BUCKETS],
        }
    }
}

impl Leaves {
    /// Folds another part of the same tree in (another shard, another core).
    pub fn add(&mut self, digests: &[u64], counts: &[u32]) {
        for (o, d) in self.digests.iter_mut().zip(digests) {
            *o ^= d;
        }
        for (o, c) in self.counts.iter_mut().zip(counts) {
            *o += c;
        }
    }
}

/// What replicas compare for one key in anti-entropy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersion {
    pub key: Vec<u8>,
    pub version: Version,
    pub flags: u8,
}

pub struct CoreEngine {
    core: usize,
    nr_cores: usize,
    /// Indexed by `routing::local_index`.
    shards: RefCell<Vec<Shard>>,
    clock: RefCell<Hlc>,
    /// The instant ticks count from; the same for every core of the node.
    epoch: Instant,
    panics: Cell<u64>,
    memory: Memory,
    /// The largest entry the node's budget can hold beside every shard's fixed part.
    largest_entry: u64,
    /// Per local shard, (evicted bytes, evictions) when the shares were last set: what each
    /// wanted since is the difference.
    seen: RefCell<Vec<(u64, u64)>>,
    /// The same for the core as a whole, as the node's rebalancer last asked.
    seen_core: Cell<(u64, u64)>,
    /// (bytes, entries) the core held when the rebalancer last asked.
    reported: Cell<(u64, u64)>,
}

/// Splits `capacity` over `num_shards` shards as evenly as possible (the first
/// `capacity % num_shards` shards hold one more).
pub fn shard_capacity(capacity: u64, num_shards: u32, shard: routing::ShardId) -> usize {
    let base = capacity / num_shards as u64;
    let extra = (shard.0 as u64) < capacity % num_shards as u64;
    (base + extra as u64) as usize
}

/// What a core holds and wanted, for the node's rebalancer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreDemand {
    pub bytes: Demand,
    pub entries: Demand,
}

impl CoreEngine {
    pub fn new(
        core: usize,
        nr_cores: usize,
        num_shards: u32,
        memory: Memory,
        node_id: u32,
        epoch: Instant,
    ) -> Self {
        // Until the first rebalance every shard has an even share of the node's budget.
        let shards: Vec<Shard> = routing::shards_of_core(core, nr_cores, num_shards)
            .into_iter()
            .map(|s| {
                let limits = Limits {
                    bytes: shard_capacity(memory.max_bytes, num_shards, s),
                    entries: memory
                        .max_entries
                        .map_or(usize::MAX, |n| shard_capacity(n, num_shards, s).max(1)),
                };
                let room = shard_room(memory.max_bytes as usize, num_shards as usize);
                Shard::with_room(memory.policy, limits, room)
            })
            .collect();
        let seen = vec![(0, 0); shards.len()];
        Self {
            core,
            nr_cores,
            shards: RefCell::new(shards),
            clock: RefCell::new(Hlc::new(node_id)),
            epoch,
            panics: Cell::new(0),
            memory,
            largest_entry: memory
                .max_bytes
                .saturating_sub(num_shards as u64 * SHARD_FIXED_BYTES as u64),
            seen: RefCell::new(seen),
            seen_core: Cell::new((0, 0)),
            reported: Cell::new((0, 0)),
        }
    }

    /// What this core holds and wanted since the last call (the node's rebalancer is the only
    /// caller).
    pub fn take_demand(&self) -> CoreDemand {
        let stats = self.stats();
        let (bytes_then, evictions_then) = self
            .seen_core
            .replace((stats.evicted_bytes, stats.evictions));
        self.reported.set((stats.used_bytes, stats.entries));
        CoreDemand {
            bytes: Demand {
                used: stats.used_bytes,
                wanted: stats.evicted_bytes - bytes_then,
            },
            entries: Demand {
                used: stats.entries,
                wanted: stats.evictions - evictions_then,
            },
        }
    }

    /// Takes this core's new share of the node's budget and divides it among its shards by
    /// the same rule; shards over their new limit evict down to it at once.
    ///
    /// The share was computed from what the core held when asked; what it took since (one
    /// large entry, say) is added to it rather than evicted on a stale count: the next round
    /// sees it and takes the room from the others.
    pub fn set_share(&self, bytes: u64, entries: Option<u64>) {
        let tick = self.tick(Instant::now());
        let now = self.stats();
        let (bytes_then, entries_then) = self.reported.get();
        let bytes = bytes.saturating_add(now.used_bytes.saturating_sub(bytes_then));
        let entries = entries.map(|n| n.saturating_add(now.entries.saturating_sub(entries_then)));
        let mut shards = self.shards.borrow_mut();
        let mut seen = self.seen.borrow_mut();
        let mut byte_parts = Vec::with_capacity(shards.len());
        let mut entry_parts = Vec::with_capacity(shards.len());
        for (shard, (bytes_then, evictions_then)) in shards.iter().zip(seen.iter_mut()) {
            let st = shard.stats();
            byte_parts.push(Demand {
                used: st.used_bytes,
                wanted: st.evicted_bytes - *bytes_then,
            });
            entry_parts.push(Demand {
                used: st.entries,
                wanted: st.evictions - *evictions_then,
            });
            *bytes_then = st.evicted_bytes;
            *evictions_then = st.evictions;
        }
        let byte_shares = divide(bytes, &byte_parts);
        let entry_shares = entries.map(|n| divide(n, &entry_parts));
        for (i, shard) in shards.iter_mut().enumerate() {
            let limits = Limits {
                bytes: byte_shares[i] as usize,
                entries: entry_shares
                    .as_ref()
                    .map_or(usize::MAX, |e| (e[i] as usize).max(1)),
            };
            shard.set_limits(limits, tick);
        }
    }

    /// The node's configured memory.
    pub fn memory(&self) -> Memory {
        self.memory
    }

    pub fn core(&self) -> usize {
        self.core
    }

    fn tick(&self, now: Instant) -> Tick {
        let tenths =
            now.saturating_duration_since(self.epoch).as_millis() as u64 / (1000 / TICKS_PER_SEC);
        tenths.min(u32::MAX as u64 - 1) as Tick
    }

    /// Executes a request for one of this core's shards. A panic inside is caught here, so one
    /// bad request costs an INTERNAL answer, not the core.
    pub fn execute(&self, req: Request) -> Response {
        let now = Instant::now();
        if now >= req.deadline {
            return Err(Error::DeadlineExceeded);
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.execute_inner(req, now))) {
            Ok(resp) => resp,
            Err(panic) => {
                self.panics.set(self.panics.get() + 1);
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(core = self.core, panic = %msg, "request panicked; answered INTERNAL");
                Err(Error::Internal("request failed on its core".into()))
            }
        }
    }

    fn execute_inner(&self, req: Request, now: Instant) -> Response {
        debug_assert_eq!(routing::owner_core(req.shard, self.nr_cores), self.core);
        let tick = self.tick(now);
        let mut shards = self.shards.borrow_mut();
        let shard = &mut shards[routing::local_index(req.shard, self.nr_cores)];
        match req.command {
            Command::Get { key } => match shard.get(&key, tick) {
                Some(found) => Ok(Reply::Value {
                    value: found.value.to_vec(),
                    binary: found.flags & FLAG_BINARY != 0,
                    version: found.version,
                }),
                None => Err(Error::not_found(&key)),
            },
            Command::Set {
                key,
                value,
                ttl_secs,
                binary,
            } => {
                self.fits(&key, &value)?;
                let version = self.clock.borrow_mut().tick(wall_us());
                let flags = if binary { FLAG_BINARY } else { 0 };
                shard.set_at(
                    &key,
                    &value,
                    version,
                    expiry_tick(tick, ttl_secs),
                    flags,
                    tick,
                );
                Ok(Reply::Stored { version })
            }
            Command::Delete { key } => Ok(Reply::Deleted {
                existed: shard.delete(&key, tick),
            }),
            Command::Apply(entry) => {
                self.fits(&entry.key, &entry.value)?;
                self.clock.borrow_mut().observe(entry.version);
                let expires_at = expiry_tick_ms(tick, entry.ttl_ms);
                let (applied, existed) = shard.apply(
                    &entry.key,
                    &entry.value,
                    entry.version,
                    expires_at,
                    entry.flags,
                    tick,
                );
                Ok(Reply::Applied { applied, existed })
            }
            Command::Read { key } => Ok(Reply::Entry(shard.get_entry(&key, tick).map(|f| {
                ReplicaEntry {
                    value: f.value.to_vec(),
                    version: f.version,
                    ttl_ms: remaining_ms(f.expires_at, tick),
                    flags: f.flags,
                    key,
                }
            }))),
        }
    }

    /// An entry larger than the node's whole budget is refused; one larger than this shard's
    /// share is stored (everything else in the shard goes first) and the next rebalance takes
    /// the difference from the other shards and cores.
    fn fits(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        let need = footprint(key.len(), value.len()) as u64;
        if need > self.largest_entry {
            return Err(Error::TooLarge {
                bytes: need,
                budget: self.memory.max_bytes,
            });
        }
        Ok(())
    }

    /// A fresh version from this core's clock, for a write this core coordinates.
    pub fn next_version(&self) -> Version {
        self.clock.borrow_mut().tick(wall_us())
    }

    /// Orders this core's later versions after `seen`: a LINEARIZABLE write versions itself
    /// above the newest version a quorum holds, whatever this node's wall clock says.
    pub fn observe(&self, seen: Version) {
        self.clock.borrow_mut().observe(seen);
    }

    /// Milliseconds to live for an entry written now with `ttl_secs` (0 = never), as replicas
    /// exchange it.
    pub fn ttl_ms(ttl_secs: Option<u64>) -> u64 {
        ttl_secs.map(|s| s.saturating_mul(1000)).unwrap_or(0)
    }

    /// One round of active expiry over every local shard, each bounded by `budget_per_shard`
    /// slots. Returns the number of entries expired.
    pub fn sweep(&self, budget_per_shard: usize) -> usize {
        let tick = self.tick(Instant::now());
        self.shards
            .borrow_mut()
            .iter_mut()
            .map(|s| s.sweep(tick, budget_per_shard).1)
            .sum()
    }

    /// Active expiry, every SWEEP_INTERVAL, forever. Runs as one of the core's background
    /// tasks.
    pub async fn sweep_forever(self: Rc<Self>) {
        loop {
            glommio::timer::sleep(SWEEP_INTERVAL).await;
            // Keep going while rounds find much to reclaim, yielding between rounds so
            // requests are not held up.
            for _ in 0..16 {
                let shards = self.nr_local_shards().max(1);
                let expired = self.sweep(SWEEP_BUDGET);
                if expired * 4 < SWEEP_BUDGET * shards {
                    break;
                }
                glommio::yield_if_needed().await;
            }
        }
    }

    /// Totals over this core's shards.
    pub fn stats(&self) -> ShardStats {
        self.shards
            .borrow()
            .iter()
            .map(Shard::stats)
            .fold(ShardStats::default(), |a, b| ShardStats {
                entries: a.entries + b.entries,
                bytes: a.bytes + b.bytes,
                evictions: a.evictions + b.evictions,
                expirations: a.expirations + b.expirations,
                used_bytes: a.used_bytes + b.used_bytes,
                evicted_bytes: a.evicted_bytes + b.evicted_bytes,
                limit_bytes: a.limit_bytes.saturating_add(b.limit_bytes),
                limit_entries: a.limit_entries.saturating_add(b.limit_entries),
            })
    }

    /// Per ring bucket, the XOR of the digests of this core's shards and its entry count.
    pub fn digests(&self) -> Leaves {
        let mut out = Leaves::default();
        for shard in self.shards.borrow().iter() {
            out.add(shard.digest(), shard.counts());
        }
        out
    }

    /// Key, version and flags of every live entry (tombstones included) in `buckets`.
    pub async fn list(&self, buckets: &BucketSet) -> Vec<KeyVersion> {
        let tick = self.tick(Instant::now());
        let mut out = Vec::new();
        self.scan_yielding(|shard, cursor| {
            self.shards.borrow()[shard].scan(cursor, SCAN_CHUNK, buckets, tick, |e| {
                out.push(KeyVersion {
                    key: e.key().to_vec(),
                    version: e.version(),
                    flags: e.flags(),
                })
            })
        })
        .await;
        out
    }

    /// Runs `f` over every local shard's entries, SCAN_CHUNK at a time, yielding to the core's
    /// other tasks between chunks: a scan of a large shard takes tens of milliseconds (a
    /// random memory access per entry), and requests must not wait for all of it. The shards
    /// are not borrowed across a yield, so writes land meanwhile; the cursor sees every entry
    /// that stays live through the scan, and anti-entropy's next round what a scan missed.
    async fn scan_yielding(&self, mut f: impl FnMut(usize, &mut Cursor)) {
        for shard in 0..self.nr_local_shards() {
            let mut cursor = Cursor::default();
            while !cursor.is_done() {
                f(shard, &mut cursor);
                futures_lite::future::yield_now().await;
            }
        }
    }

    /// The live entries (tombstones included) for `keys` of this core's shards, with their
    /// remaining time to live; keys not held are left out.
    pub fn fetch(&self, keys: &[(routing::ShardId, Vec<u8>)]) -> Vec<ReplicaEntry> {
        let tick = self.tick(Instant::now());
        let shards = self.shards.borrow();
        keys.iter()
            .filter_map(|(shard, key)| {
                let e = shards[routing::local_index(*shard, self.nr_cores)].peek(key, tick)?;
                Some(ReplicaEntry {
                    key: key.clone(),
                    value: e.value().to_vec(),
                    version: e.version(),
                    ttl_ms: remaining_ms(e.expires_at(), tick),
                    flags: e.flags(),
                })
            })
            .collect()
    }

    /// Applies entries from another replica (newest version wins). Returns how many changed
    /// something.
    pub fn apply_all(&self, entries: Vec<(routing::ShardId, ReplicaEntry)>) -> usize {
        let far = Instant::now() + Duration::from_secs(3600);
        entries
            .into_iter()
            .map(|(shard, entry)| {
                matches!(
                    self.execute(Request {
                        shard,
                        command: Command::Apply(entry),
                        deadline: far,
                    }),
                    Ok(Reply::Applied { applied: true, .. })
                )
            })
            .filter(|&applied| applied)
            .count()
    }

    /// Removes every entry in `buckets`. Returns how many.
    pub async fn drop_buckets(&self, buckets: &BucketSet) -> usize {
        let mut dropped = 0;
        self.scan_yielding(|shard, cursor| {
            dropped +=
                self.shards.borrow_mut()[shard].drop_buckets_from(cursor, SCAN_CHUNK, buckets);
        })
        .await;
        dropped
    }

    pub fn panics(&self) -> u64 {
        self.panics.get()
    }

    pub fn nr_local_shards(&self) -> usize {
        self.shards.borrow().len()
    }
}

/// Slots an anti-entropy scan visits before it yields (about a millisecond of work).
const SCAN_CHUNK: usize = 16_384;

/// How often each core runs an active-expiry round.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Slots examined per shard per round. A round that finds more than a quarter expired runs
/// again at once (as Redis's active expiry does), so a mass expiry is reclaimed quickly while
/// a single round stays in the tens of microseconds.
const SWEEP_BUDGET: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{shard_of, ShardId};
    use futures_lite::future::block_on;

    #[test]
    fn capacity_split_sums_to_total() {
        for (cap, n) in [(1000u64, 1u32), (1000, 3), (10, 64), (1_000_000, 64)] {
            let sum: usize = (0..n).map(|s| shard_capacity(cap, n, ShardId(s))).sum();
            assert_eq!(sum as u64, cap);
        }
    }

    #[test]
    fn fetch_list_apply_and_drop_for_anti_entropy() {
        let engine = CoreEngine::new(1, 2, 4, cap(100), 7, Instant::now());
        let mine: Vec<String> = (0..50)
            .map(|i| format!("key-{i}"))
            .filter(|k| routing::owner_core(shard_of(k.as_bytes(), 4), 2) == 1)
            .collect();
        let entries: Vec<_> = mine
            .iter()
            .map(|k| {
                (
                    shard_of(k.as_bytes(), 4),
                    ReplicaEntry {
                        key: k.as_bytes().to_vec(),
                        value: b"v".to_vec(),
                        version: Version { hlc: 9, node: 1 },
                        ttl_ms: 60_000,
                        flags: 0,
                    },
                )
            })
            .collect();
        assert_eq!(engine.apply_all(entries.clone()), mine.len());
        assert_eq!(engine.apply_all(entries), 0, "same versions change nothing");
        assert_eq!(block_on(engine.list(&BucketSet::all())).len(), mine.len());
        let keys: Vec<_> = mine
            .iter()
            .map(|k| (shard_of(k.as_bytes(), 4), k.as_bytes().to_vec()))
            .collect();
        let fetched = engine.fetch(&keys);
        assert_eq!(fetched.len(), mine.len());
        assert!(fetched.iter().all(|e| e.ttl_ms > 59_000 && e.value == b"v"));
        let leaves = engine.digests();
        assert_ne!(leaves.digests, vec![0; BUCKETS]);
        assert_eq!(leaves.counts.iter().sum::<u32>() as usize, mine.len());
        assert_eq!(block_on(engine.drop_buckets(&BucketSet::all())), mine.len());
        assert_eq!(engine.digests(), Leaves::default());
    }

    #[test]
    fn scans_yield_between_chunks_and_miss_nothing() {
        let engine = CoreEngine::new(0, 1, 1, cap(100_000), 7, Instant::now());
        let n = SCAN_CHUNK * 2 + 100;
        let entries = (0..n)
            .map(|i| {
                let key = format!("key-{i}").into_bytes();
                let entry = ReplicaEntry {
                    key,
                    value: b"v".to_vec(),
                    version: Version { hlc: 9, node: 1 },
                    ttl_ms: 0,
                    flags: 0,
                };
                (ShardId(0), entry)
            })
            .collect();
        assert_eq!(engine.apply_all(entries), n);
        let all = BucketSet::all();
        let mut list = std::pin::pin!(engine.list(&all));
        assert!(
            block_on(futures_lite::future::poll_once(list.as_mut())).is_none(),
            "a scan of {n} slots gives the core back before it ends"
        );
        assert_eq!(block_on(list).len(), n);
        assert_eq!(block_on(engine.drop_buckets(&all)), n);
        assert!(block_on(engine.list(&all)).is_empty());
    }

    fn cap(entries: u64) -> Memory {
        Memory {
            max_bytes: 1 << 30,
            max_entries: Some(entries),
            policy: crate::engine::shard::Policy::S3Fifo,
        }
    }

    fn req(key: &str, command: Command) -> Request {
        Request {
            shard: shard_of(key.as_bytes(), 1),
            command,
            deadline: Instant::now() + Duration::from_secs(5),
        }
    }

    #[test]
    fn replica_apply_keeps_the_newest_and_reads_tombstones() {
        use crate::engine::entry::FLAG_TOMBSTONE;
        let engine = CoreEngine::new(0, 1, 1, cap(10), 7, Instant::now());
        let entry = |hlc: u64, value: &str, flags: u8| {
            Command::Apply(ReplicaEntry {
                key: b"k".to_vec(),
                value: value.into(),
                version: Version { hlc, node: 1 },
                ttl_ms: 0,
                flags,
            })
        };
        assert_eq!(
            engine.execute(req("k", entry(10, "new", 0))),
            Ok(Reply::Applied {
                applied: true,
                existed: false
            })
        );
        assert_eq!(
            engine.execute(req("k", entry(5, "old", 0))),
            Ok(Reply::Applied {
                applied: false,
                existed: true
            })
        );
        assert_eq!(
            engine.execute(req("k", entry(20, "", FLAG_TOMBSTONE))),
            Ok(Reply::Applied {
                applied: true,
                existed: true
            })
        );
        // Clients see nothing; replicas see the tombstone and its version.
        assert!(matches!(
            engine.execute(req("k", Command::Get { key: b"k".to_vec() })),
            Err(Error::NotFound { .. })
        ));
        let Ok(Reply::Entry(Some(e))) =
            engine.execute(req("k", Command::Read { key: b"k".to_vec() }))
        else {
            panic!()
        };
        assert_eq!((e.version.hlc, e.flags), (20, FLAG_TOMBSTONE));
        // A stale write cannot resurrect it.
        assert_eq!(
            engine.execute(req("k", entry(15, "zombie", 0))),
            Ok(Reply::Applied {
                applied: false,
                existed: false
            })
        );
        // The clock moved past what it observed.
        assert!(engine.next_version().hlc > 20);
    }

    #[test]
    fn executes_and_versions_increase() {
        let engine = CoreEngine::new(0, 1, 1, cap(10), 7, Instant::now());
        let set = |v: &str| {
            engine.execute(req(
                "k",
                Command::Set {
                    key: b"k".to_vec(),
                    value: v.into(),
                    ttl_secs: None,
                    binary: false,
                },
            ))
        };
        let Ok(Reply::Stored { version: v1 }) = set("a") else {
            panic!()
        };
        let Ok(Reply::Stored { version: v2 }) = set("b") else {
            panic!()
        };
        assert!(v2 > v1);
        assert_eq!(v2.node, 7);
        let got = engine.execute(req("k", Command::Get { key: b"k".to_vec() }));
        assert_eq!(
            got,
            Ok(Reply::Value {
                value: b"b".to_vec(),
                binary: false,
                version: v2
            })
        );
        let missing = engine.execute(req("x", Command::Get { key: b"x".to_vec() }));
        assert_eq!(missing, Err(Error::not_found(b"x")));
    }

    #[test]
    fn expired_deadline_is_not_executed() {
        let engine = CoreEngine::new(0, 1, 1, cap(10), 7, Instant::now());
        let mut r = req(
            "k",
            Command::Set {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ttl_secs: None,
                binary: false,
            },
        );
        r.deadline = Instant::now() - Duration::from_millis(1);
        assert_eq!(engine.execute(r), Err(Error::DeadlineExceeded));
        let got = engine.execute(req("k", Command::Get { key: b"k".to_vec() }));
        assert!(matches!(got, Err(Error::NotFound { .. })));
    }
}
