//! Where one shard's entries live: segments of [`SEGMENT`] bytes carved from one address range
//! reserved per shard, entries written back to back in them (Segcache's layout, Yang et al.,
//! NSDI 2021). Two queues of segments, S3-FIFO's small and main: an entry is appended to the
//! tail segment of its queue and leaves from the head, so the queues cost nothing per entry
//! and no allocator sits between entries (no cell rounding, no malloc header).
//!
//! An entry is found by its location: a `u32` offset into the range in units of the shard's
//! alignment (1 byte up to a 4 GiB range, 2 up to 8 GiB, and so on), which the index stores.
//! Deleting or overwriting an entry elsewhere leaves a dead copy; a segment's space comes back
//! when its last live entry goes, when the head of its queue passes it, or when it is more
//! than half dead and the shard compacts it (its live entries move to the tail).
//!
//! A freed segment goes back to the system (`MADV_DONTNEED`) except one kept resident as a
//! spare, so a shard churning through segments does not fault pages in for each.
//!
//! Single-threaded: the owning core's shard is the only user.

use super::entry::{self, Base};
use std::{collections::VecDeque, ptr::NonNull};

/// Bytes per segment. Small enough that a shard's two open tails cost little and a scan of
/// cold keys moves S3-FIFO's small queue in fine steps, large enough that the per-segment
/// metadata is noise (32 bytes per 64 KiB).
pub const SEGMENT: usize = 64 * 1024;

/// Address space the logs of all of a node's shards reserve together, at most: a quarter of
/// x86-64's 47-bit user space. Each shard reserves room for the whole node budget (budget
/// follows the keys), which 256 shards of a 1 TiB budget could not get; past this a shard's
/// room is its part of this space, still many times its even share.
pub const NODE_ADDRESS_SPACE: usize = 1 << 45;

/// The room each of a node's `shards` logs gets for a budget of `budget` bytes: the whole
/// budget, up to its part of [`NODE_ADDRESS_SPACE`] (and 1 TiB).
pub fn shard_room(budget: usize, shards: usize) -> usize {
    budget.min(NODE_ADDRESS_SPACE / shards.max(1)).min(1 << 40)
}

/// Reserves, then gives back, the address space the logs of `shards` shards will take for a
/// budget of `budget` bytes: at start, so a process limit that refuses it (`ulimit -v`) is one
/// line naming MAX_MEMORY rather than a panic on every core. `Err` has the bytes asked for.
pub fn check_address_space(budget: usize, shards: usize) -> Result<(), (usize, std::io::Error)> {
    let len = Log::layout(shard_room(budget, shards)).1 * SEGMENT * shards.max(1);
    // SAFETY: an anonymous private mapping with no address hint has no preconditions; it is
    // unmapped at once and never touched.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err((len, std::io::Error::last_os_error()));
        }
        libc::munmap(p, len);
    }
    Ok(())
}

/// Entries from this size up get their own mapping from malloc, given back to the system when
/// they go. glibc's default threshold starts at 128 KiB and rises to the largest block freed,
/// after which large entries come from the heap and their holes stay resident: under Sets of
/// 10 B to 100 KB values the node's RSS measured 7.5% over MAX_MEMORY with the default and
/// 3.5% with this fixed threshold (bench/budget.sh).
pub const MALLOC_MMAP_THRESHOLD: usize = 32 * 1024;

/// Fixes malloc's mmap threshold at [`MALLOC_MMAP_THRESHOLD`] (which also stops it rising).
/// Called once at start, before the cores allocate.
pub fn fix_malloc_mmap_threshold() {
    // SAFETY: mallopt only sets a parameter of the allocator; it is called before other threads
    // start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD as libc::c_int);
    }
}

const NIL: u32 = u32::MAX;

/// S3-FIFO's two queues (CLOCK uses `Main` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    Small = 0,
    Main = 1,
}

#[derive(Clone, Copy, Default)]
struct Segment {
    /// Order of opening within the shard; 0 for a free segment. A reused segment gets a new
    /// one, so a stale reference (a queue's, a scan's) can tell.
    seq: u64,
    /// HLC and node the segment's first entry carried: entries store theirs against it.
    base: Base,
    used: u32,
    /// Bytes (aligned) of the live entries in it.
    live: u32,
    queue: u8,
    /// Listed in `Log::sparse`.
    sparse: bool,
}

#[derive(Default)]
struct QueueState {
    /// Its segments, oldest first, as (segment, seq); a pair whose segment's seq changed is
    /// stale (the segment was freed) and skipped.
    order: VecDeque<(u32, u64)>,
    stale: usize,
    /// Offset of the next entry to leave in the first segment.
    head: u32,
    /// The segment appended to (`NIL`: none yet).
    tail: u32,
    /// Bytes (aligned) of live entries in the queue.
    live: usize,
}

/// Where a scan of a shard's entries stands. Queues are visited small then main, each oldest
/// segment first, and entries only ever move from small to main or to the tail of their own
/// queue, so a scan that goes on to the tail sees every entry that stays live through it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    queue: u8,
    seq: u64,
    offset: u32,
}

impl Cursor {
    pub fn is_done(&self) -> bool {
        self.queue >= 2
    }
}

pub struct Log {
    base: NonNull<u8>,
    shift: u32,
    reserved: u32,
    segs: Vec<Segment>,
    /// Freed segments, given back to the system.
    pool: Vec<u32>,
    spare: u32,
    queues: [QueueState; 2],
    next_seq: u64,
    /// Segments that were more than half dead when last looked at (checked again when taken).
    sparse: Vec<u32>,
}

// SAFETY: the log exclusively owns its mapping; it moves to the core that owns the shard before
// any entry is written and is used there only.
unsafe impl Send for Log {}

impl Log {
    /// The alignment shift and the segments reserved for a log of `bytes`.
    fn layout(bytes: usize) -> (u32, usize) {
        let bytes = bytes.clamp(8 * SEGMENT, 1 << 40);
        let mut shift = 0;
        while (1u64 << (32 + shift)) < bytes as u64 {
            shift += 1;
        }
        let addressable = (1usize << (32 + shift)) / SEGMENT;
        (shift, (bytes.div_ceil(SEGMENT) + 8).min(addressable))
    }

    /// A log able to hold `bytes` of entries (at least a few segments).
    pub fn new(bytes: usize) -> Self {
        let (shift, reserved) = Self::layout(bytes);
        let len = reserved * SEGMENT;
        // SAFETY: an anonymous private mapping with no address hint has no preconditions.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert!(
            p != libc::MAP_FAILED,
            "reserving {len} bytes of address space for a shard: {}",
            std::io::Error::last_os_error()
        );
        let mut queues: [QueueState; 2] = Default::default();
        for q in &mut queues {
            q.tail = NIL;
        }
        Self {
            base: NonNull::new(p.cast()).expect("mmap returns non-null"),
            shift,
            reserved: reserved as u32,
            segs: Vec::new(),
            pool: Vec::new(),
            spare: NIL,
            queues,
            next_seq: 1,
            sparse: Vec::new(),
        }
    }

    /// `len` rounded up to the alignment of entries.
    #[inline]
    pub fn align(&self, len: usize) -> usize {
        let mask = (1usize << self.shift) - 1;
        (len + mask) & !mask
    }

    #[inline]
    fn loc(&self, seg: u32, offset: u32) -> u32 {
        ((seg as usize * SEGMENT + offset as usize) >> self.shift) as u32
    }

    #[inline]
    fn seg_of(&self, loc: u32) -> u32 {
        (((loc as usize) << self.shift) / SEGMENT) as u32
    }

    /// Where the entry at `loc` starts.
    #[inline]
    pub fn ptr(&self, loc: u32) -> *mut u8 {
        // SAFETY: locations are made by `push` inside the reserved range.
        unsafe { self.base.as_ptr().add((loc as usize) << self.shift) }
    }

    /// What the entries of the segment holding `loc` are written against.
    #[inline]
    pub fn base_of(&self, loc: u32) -> Base {
        self.segs[self.seg_of(loc) as usize].base
    }

    pub fn queue_of(&self, loc: u32) -> Queue {
        if self.segs[self.seg_of(loc) as usize].queue == 0 {
            Queue::Small
        } else {
            Queue::Main
        }
    }

    /// Room left in `q`'s tail segment and its base (`None`: nothing written there yet).
    pub fn tail(&self, q: Queue) -> (usize, Option<Base>) {
        let t = self.queues[q as usize].tail;
        if t == NIL {
            return (0, None);
        }
        let s = &self.segs[t as usize];
        (SEGMENT - s.used as usize, (s.used > 0).then_some(s.base))
    }

    /// Starts a new tail segment for `q`; false when the range is used up.
    pub fn open(&mut self, q: Queue) -> bool {
        let id = if self.spare != NIL {
            std::mem::replace(&mut self.spare, NIL)
        } else if let Some(id) = self.pool.pop() {
            id
        } else if (self.segs.len() as u32) < self.reserved {
            self.segs.push(Segment::default());
            self.segs.len() as u32 - 1
        } else {
            return false;
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.segs[id as usize] = Segment {
            seq,
            queue: q as u8,
            ..Segment::default()
        };
        let old = std::mem::replace(&mut self.queues[q as usize].tail, id);
        self.queues[q as usize].order.push_back((id, seq));
        if old != NIL {
            self.settle(old);
        }
        true
    }

    /// Appends `len` bytes (aligned) to `q`'s tail, which has the room (see [`Log::tail`]);
    /// `base` becomes the segment's if it is the first entry there. Returns the location.
    pub fn push(&mut self, q: Queue, len: usize, base: Base) -> u32 {
        let t = self.queues[q as usize].tail;
        let s = &mut self.segs[t as usize];
        debug_assert!(s.used as usize + len <= SEGMENT);
        if s.used == 0 {
            s.base = base;
        }
        let offset = s.used;
        s.used += len as u32;
        s.live += len as u32;
        self.queues[q as usize].live += len;
        self.loc(t, offset)
    }

    /// The entry at `loc`, `len` bytes (aligned), is no longer live.
    pub fn kill(&mut self, loc: u32, len: usize) {
        let id = self.seg_of(loc);
        let s = &mut self.segs[id as usize];
        s.live -= len as u32;
        let q = s.queue as usize;
        self.queues[q].live -= len;
        self.settle(id);
    }

    /// Frees a segment with nothing live in it (a tail is emptied for reuse) or lists one more
    /// than half dead for compaction.
    fn settle(&mut self, id: u32) {
        let s = self.segs[id as usize];
        let q = s.queue as usize;
        if s.live == 0 {
            if self.queues[q].tail == id {
                let seq = self.next_seq;
                self.next_seq += 1;
                let s = &mut self.segs[id as usize];
                s.used = 0;
                s.seq = seq;
                let qs = &mut self.queues[q];
                if qs.order.len() == 1 {
                    qs.head = 0;
                }
                qs.order.back_mut().expect("the tail is queued").1 = seq;
            } else {
                self.release(id);
            }
        } else if !s.sparse && s.live * 2 < s.used && self.compactable(id) {
            self.segs[id as usize].sparse = true;
            self.sparse.push(id);
        }
    }

    /// Whether compacting segment `id` would help: not its queue's tail (still being written)
    /// nor its head (being emptied by eviction, whose entries would only move to the tail and
    /// outlive newer ones).
    fn compactable(&self, id: u32) -> bool {
        let q = &self.queues[self.segs[id as usize].queue as usize];
        q.tail != id && q.order.front().is_none_or(|&(front, _)| front != id)
    }

    fn release(&mut self, id: u32) {
        let q = self.segs[id as usize].queue as usize;
        self.segs[id as usize] = Segment::default();
        let qs = &mut self.queues[q];
        qs.stale += 1;
        if qs.stale > qs.order.len() / 2 + 64 {
            let segs = &self.segs;
            let front = qs.order.front().copied();
            qs.order.retain(|&(s, seq)| segs[s as usize].seq == seq);
            if qs.order.front().copied() != front {
                qs.head = 0;
            }
            qs.stale = 0;
        }
        if self.spare == NIL {
            self.spare = id;
        } else {
            self.give_back(id);
        }
    }

    fn give_back(&mut self, id: u32) {
        // SAFETY: the segment lies inside the mapping and holds no live entry.
        unsafe {
            libc::madvise(
                self.base.as_ptr().add(id as usize * SEGMENT).cast(),
                SEGMENT,
                libc::MADV_DONTNEED,
            );
        }
        self.pool.push(id);
    }

    /// Gives the spare segment back to the system (the shard is over its byte limit).
    pub fn trim_spare(&mut self) -> bool {
        if self.spare == NIL {
            return false;
        }
        let id = std::mem::replace(&mut self.spare, NIL);
        self.give_back(id);
        true
    }

    /// The location of the next entry to leave `q` (maybe a dead one), or `None` when every
    /// entry written to `q` has left.
    pub fn head(&mut self, q: Queue) -> Option<u32> {
        loop {
            let qs = &mut self.queues[q as usize];
            let &(id, seq) = qs.order.front()?;
            let s = self.segs[id as usize];
            if s.seq != seq {
                qs.order.pop_front();
                qs.stale -= 1;
                qs.head = 0;
                continue;
            }
            if qs.head < s.used {
                let head = qs.head;
                return Some(self.loc(id, head));
            }
            if qs.tail == id {
                return None;
            }
            // Every entry left, so the last one's kill freed it; a dead copy's may not have.
            qs.order.pop_front();
            qs.head = 0;
            self.segs[id as usize] = Segment::default();
            if self.spare == NIL {
                self.spare = id;
            } else {
                self.give_back(id);
            }
        }
    }

    /// Moves `q`'s head past the entry [`Log::head`] returned, `len` bytes (aligned).
    pub fn advance(&mut self, q: Queue, len: usize) {
        self.queues[q as usize].head += len as u32;
    }

    /// Bytes (aligned) of live entries in `q`.
    pub fn live(&self, q: Queue) -> usize {
        self.queues[q as usize].live
    }

    /// A segment more than half dead, not a tail, with the locations of its entries (dead ones
    /// too); `None` when there is none.
    pub fn take_sparse(&mut self) -> Option<Vec<u32>> {
        while let Some(id) = self.sparse.pop() {
            let s = self.segs[id as usize];
            if !s.sparse {
                continue;
            }
            self.segs[id as usize].sparse = false;
            if s.seq == 0 || !self.compactable(id) || s.live * 2 >= s.used {
                continue;
            }
            let mut out = Vec::new();
            let mut offset = 0;
            while offset < s.used {
                let loc = self.loc(id, offset);
                out.push(loc);
                // SAFETY: offsets below `used` at entry boundaries hold written entries.
                offset += self.align(unsafe { entry::len_at(self.ptr(loc)) }) as u32;
            }
            return Some(out);
        }
        None
    }

    pub fn has_sparse(&self) -> bool {
        !self.sparse.is_empty()
    }

    /// The next entry (maybe a dead one) after `cursor`, which moves past it.
    pub fn scan_step(&self, cursor: &mut Cursor) -> Option<u32> {
        while cursor.queue < 2 {
            let qs = &self.queues[cursor.queue as usize];
            let from = qs.order.partition_point(|&(_, seq)| seq < cursor.seq);
            let next = qs
                .order
                .range(from..)
                .find(|&&(id, seq)| self.segs[id as usize].seq == seq);
            let Some(&(id, seq)) = next else {
                *cursor = Cursor {
                    queue: cursor.queue + 1,
                    seq: 0,
                    offset: 0,
                };
                continue;
            };
            if seq != cursor.seq {
                cursor.seq = seq;
                cursor.offset = 0;
            }
            let s = &self.segs[id as usize];
            if cursor.offset >= s.used {
                cursor.seq = seq + 1;
                cursor.offset = 0;
                continue;
            }
            let loc = self.loc(id, cursor.offset);
            // SAFETY: the cursor stops at entry boundaries below `used`.
            cursor.offset += self.align(unsafe { entry::len_at(self.ptr(loc)) }) as u32;
            return Some(loc);
        }
        None
    }

    /// Every entry (dead ones too) of both queues, oldest first per queue.
    pub fn all(&self) -> impl Iterator<Item = u32> + '_ {
        let mut cursor = Cursor::default();
        std::iter::from_fn(move || self.scan_step(&mut cursor))
    }

    /// Segments held in memory (in use or the spare), in bytes.
    pub fn resident_bytes(&self) -> usize {
        (self.segs.len() - self.pool.len()) * SEGMENT
    }

    /// What the log's own bookkeeping takes.
    pub fn meta_bytes(&self) -> usize {
        self.segs.capacity() * std::mem::size_of::<Segment>()
            + self.pool.capacity() * 4
            + self.sparse.capacity() * 4
            + self
                .queues
                .iter()
                .map(|q| q.order.capacity() * 12)
                .sum::<usize>()
    }

    /// Locations of the entries queued in `q` from its head on, oldest first (dead ones too).
    #[cfg(test)]
    pub fn queued(&self, q: Queue) -> Vec<u32> {
        let qs = &self.queues[q as usize];
        let mut out = Vec::new();
        for (i, &(id, seq)) in qs.order.iter().enumerate() {
            let s = &self.segs[id as usize];
            if s.seq != seq {
                continue;
            }
            let mut offset = if i == 0 { qs.head } else { 0 };
            while offset < s.used {
                let loc = self.loc(id, offset);
                out.push(loc);
                offset += self.align(unsafe { entry::len_at(self.ptr(loc)) }) as u32;
            }
        }
        out
    }

    #[cfg(test)]
    pub fn segments_in_use(&self) -> usize {
        self.segs.len() - self.pool.len() - (self.spare != NIL) as usize
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        // SAFETY: the whole mapping from `new`; the shard frees large entries' blocks first.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.reserved as usize * SEGMENT) };
    }
}
