//! Cells for one shard's entries, as memcached's slabs: entries up to [`MAX_CELL`] bytes live in
//! cells of 16-byte size classes carved from 64 KiB pages, side by side. With malloc, the
//! request buffers a core allocates and frees between two Sets land between entries and leave
//! holes: 8 bytes per entry at 1M entries. Here those buffers stay out of the pages.
//!
//! Why 16 and not 8: 8-byte classes would put a 135-byte entry in 136 bytes instead of 144,
//! but made the shard's gets and overwrites slower, where 16-byte classes cost no more than
//! malloc (see bench/RESULTS.md).
//!
//! The pages come from one address range reserved per shard at creation (`MAP_NORESERVE`: it
//! costs address space, not memory). A page whose last cell is freed goes back to the system
//! (`MADV_DONTNEED`) and to a pool any size class can reuse, so a shift in value sizes does not
//! strand memory in the old classes (memcached's "calcification") once their entries are gone.
//! When the range is used up, or for a larger entry, the caller falls back to malloc;
//! [`Slab::owns`] tells the two apart when the entry is freed.
//!
//! Single-threaded: the owning core's shard is the only user.

use std::ptr::NonNull;

/// Largest cell; bigger entries are malloc'd.
pub const MAX_CELL: usize = 1024;

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
const GRANULE: usize = 16;
const CLASSES: usize = MAX_CELL / GRANULE;
const PAGE: usize = 64 * 1024;
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Page {
    /// Cell size in bytes; 0 for a page in the free pool.
    cell: u32,
    live: u32,
    /// Cells handed out from the start of the page so far (cells past it were never used).
    carved: u32,
    /// Offset + 1 of the first free cell (0 = none); each free cell holds the next as a u32.
    free: u32,
    prev: u32,
    next: u32,
    in_partial: bool,
}

pub struct Slab {
    base: NonNull<u8>,
    reserved_pages: u32,
    /// Pages ever touched; beyond it the range is fresh.
    used_pages: u32,
    pages: Vec<Page>,
    /// Empty pages, given back to the system, ready for any class.
    pool: Vec<u32>,
    /// One empty page kept resident, so that one entry set and deleted over and over does not
    /// give back and fault in a page each time.
    spare: u32,
    /// Per class, the first page with a free or uncarved cell (a doubly linked list).
    partial: [u32; CLASSES],
}

// SAFETY: the slab exclusively owns its mapping; it moves to the core that owns the shard before
// any cell is handed out and is used there only.
unsafe impl Send for Slab {}

impl Slab {
    /// A slab for `capacity` entries. Reserves address space for every entry at the largest cell
    /// size, so exhaustion only happens when half-empty pages of many classes add up; then
    /// [`Slab::alloc`] returns `None`.
    pub fn new(capacity: usize) -> Self {
        let want = capacity
            .saturating_mul(MAX_CELL)
            .saturating_add(CLASSES * PAGE)
            .min(1 << 36);
        let reserved_pages = (want / PAGE).min(NIL as usize - 1) as u32;
        let len = reserved_pages as usize * PAGE;
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
        // Without the range every entry is malloc'd: slower to free, never wrong.
        let (base, reserved_pages) = if p == libc::MAP_FAILED {
            (NonNull::dangling(), 0)
        } else {
            (
                NonNull::new(p.cast()).expect("mmap returns non-null"),
                reserved_pages,
            )
        };
        Self {
            base,
            reserved_pages,
            used_pages: 0,
            pages: Vec::new(),
            pool: Vec::new(),
            spare: NIL,
            partial: [NIL; CLASSES],
        }
    }

    fn class_of(len: usize) -> usize {
        len.max(1).div_ceil(GRANULE) - 1
    }

    /// Bytes a cell for an entry of `len` bytes takes, or `None` when it is malloc'd.
    pub fn cell_size(len: usize) -> Option<usize> {
        (len <= MAX_CELL).then(|| (Self::class_of(len) + 1) * GRANULE)
    }

    /// A cell of at least `len` bytes, or `None` (too large, or the range is used up).
    pub fn alloc(&mut self, len: usize) -> Option<NonNull<u8>> {
        let cell = Self::cell_size(len)?;
        let class = Self::class_of(len);
        let mut p = self.partial[class];
        if p == NIL {
            p = self.new_page(cell as u32)?;
            self.push_partial(class, p);
        }
        let page = &mut self.pages[p as usize];
        let offset = if page.free != 0 {
            let offset = page.free - 1;
            // SAFETY: a free cell of this page holds the next free offset + 1 in its first bytes.
            page.free = unsafe {
                let cell = self.base.as_ptr().add(p as usize * PAGE + offset as usize);
                cell.cast::<u32>().read_unaligned()
            };
            offset
        } else {
            let offset = page.carved * page.cell;
            page.carved += 1;
            offset
        };
        page.live += 1;
        let full = page.free == 0 && (page.carved + 1) * page.cell > PAGE as u32;
        if full {
            self.remove_partial(class, p);
        }
        // SAFETY: the offset is inside page `p` of the reserved range.
        Some(unsafe {
            NonNull::new_unchecked(self.base.as_ptr().add(p as usize * PAGE + offset as usize))
        })
    }

    /// Whether `ptr` is a cell of this slab (else it was malloc'd).
    pub fn owns(&self, ptr: NonNull<u8>) -> bool {
        let at = (ptr.as_ptr() as usize).wrapping_sub(self.base.as_ptr() as usize);
        at < self.used_pages as usize * PAGE
    }

    /// Returns a cell from [`Slab::alloc`].
    ///
    /// # Safety
    /// `ptr` must be a live cell of this slab (`owns` is true), not used after this call.
    pub unsafe fn free(&mut self, ptr: NonNull<u8>) {
        let at = ptr.as_ptr() as usize - self.base.as_ptr() as usize;
        let p = (at / PAGE) as u32;
        let offset = (at % PAGE) as u32;
        let page = &mut self.pages[p as usize];
        ptr.as_ptr().cast::<u32>().write_unaligned(page.free);
        page.free = offset + 1;
        page.live -= 1;
        let class = Self::class_of(page.cell as usize);
        let (live, in_partial) = (page.live, page.in_partial);
        if live == 0 {
            if in_partial {
                self.remove_partial(class, p);
            }
            self.pages[p as usize].cell = 0;
            if self.spare == NIL {
                self.spare = p;
            } else {
                self.release(p);
            }
        } else if !in_partial {
            self.push_partial(class, p);
        }
    }

    fn new_page(&mut self, cell: u32) -> Option<u32> {
        let spare = std::mem::replace(&mut self.spare, NIL);
        let p = match (spare != NIL).then_some(spare).or_else(|| self.pool.pop()) {
            Some(p) => p,
            None if self.used_pages < self.reserved_pages => {
                self.used_pages += 1;
                self.pages.push(Page {
                    cell: 0,
                    live: 0,
                    carved: 0,
                    free: 0,
                    prev: NIL,
                    next: NIL,
                    in_partial: false,
                });
                self.used_pages - 1
            }
            None => return None,
        };
        let page = &mut self.pages[p as usize];
        page.cell = cell;
        page.live = 0;
        page.carved = 0;
        page.free = 0;
        Some(p)
    }

    fn release(&mut self, p: u32) {
        // SAFETY: the page lies inside the mapping and holds no live cell.
        unsafe {
            libc::madvise(
                self.base.as_ptr().add(p as usize * PAGE).cast(),
                PAGE,
                libc::MADV_DONTNEED,
            );
        }
        self.pool.push(p);
    }

    fn push_partial(&mut self, class: usize, p: u32) {
        let head = self.partial[class];
        {
            let page = &mut self.pages[p as usize];
            page.prev = NIL;
            page.next = head;
            page.in_partial = true;
        }
        if head != NIL {
            self.pages[head as usize].prev = p;
        }
        self.partial[class] = p;
    }

    fn remove_partial(&mut self, class: usize, p: u32) {
        let (prev, next) = {
            let page = &mut self.pages[p as usize];
            page.in_partial = false;
            (page.prev, page.next)
        };
        if prev == NIL {
            self.partial[class] = next;
        } else {
            self.pages[prev as usize].next = next;
        }
        if next != NIL {
            self.pages[next as usize].prev = prev;
        }
    }

    /// Pages holding cells now (what the slab costs in memory, in pages of 64 KiB).
    #[cfg(test)]
    pub fn pages_in_use(&self) -> usize {
        self.used_pages as usize - self.pool.len() - (self.spare != NIL) as usize
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        if self.reserved_pages > 0 {
            // SAFETY: the whole mapping from `new`; no cell outlives the slab (the shard frees
            // or forgets its entries first).
            unsafe {
                libc::munmap(
                    self.base.as_ptr().cast(),
                    self.reserved_pages as usize * PAGE,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn cells_are_packed_at_16_byte_granularity() {
        assert_eq!(Slab::cell_size(1), Some(16));
        assert_eq!(Slab::cell_size(129), Some(144));
        assert_eq!(Slab::cell_size(135), Some(144));
        assert_eq!(Slab::cell_size(144), Some(144));
        assert_eq!(Slab::cell_size(MAX_CELL), Some(MAX_CELL));
        assert_eq!(Slab::cell_size(MAX_CELL + 1), None);
        let mut s = Slab::new(1000);
        let a = s.alloc(135).unwrap();
        let b = s.alloc(135).unwrap();
        let c = s.alloc(40).unwrap();
        assert_eq!(b.as_ptr() as usize - a.as_ptr() as usize, 144);
        assert_ne!(
            c.as_ptr() as usize >> 16,
            a.as_ptr() as usize >> 16,
            "another class, another page"
        );
    }

    #[test]
    fn an_emptied_page_serves_another_class() {
        let mut s = Slab::new(10_000);
        let small: Vec<_> = (0..2000).map(|_| s.alloc(100).unwrap()).collect();
        let pages = s.pages_in_use();
        assert!(pages >= 2000 * 104 / PAGE);
        for c in small {
            unsafe { s.free(c) };
        }
        // Every page went back (one kept resident as the spare).
        assert_eq!(s.pages_in_use(), 0);
        assert_eq!(s.pool.len(), pages - 1);
        let _large: Vec<_> = (0..400).map(|_| s.alloc(400).unwrap()).collect();
        assert_eq!(
            s.used_pages as usize, pages,
            "the pool was reused, no new pages"
        );
    }

    #[test]
    fn exhaustion_returns_none_and_owns_tells_malloc_apart() {
        let mut s = Slab::new(0);
        let mut n = 0;
        while s.alloc(MAX_CELL).is_some() {
            n += 1;
            assert!(n <= CLASSES * PAGE / MAX_CELL + 64);
        }
        let boxed = Box::new(0u8);
        assert!(!s.owns(NonNull::from(&*boxed)));
    }

    proptest! {
        /// Cells never overlap and keep their contents, through frees and reuse.
        #[test]
        fn cells_keep_their_bytes(ops in proptest::collection::vec((any::<bool>(), 1usize..1100, any::<u8>()), 1..600)) {
            let mut s = Slab::new(1000);
            let mut live: HashMap<usize, (NonNull<u8>, usize, u8)> = HashMap::new();
            let mut next = 0usize;
            for (alloc, len, byte) in ops {
                if alloc || live.is_empty() {
                    if let Some(p) = s.alloc(len) {
                        prop_assert!(s.owns(p));
                        unsafe { std::ptr::write_bytes(p.as_ptr(), byte, len) };
                        live.insert(next, (p, len, byte));
                        next += 1;
                    } else {
                        prop_assert!(len > MAX_CELL);
                    }
                } else {
                    let k = *live.keys().next().unwrap();
                    let (p, _, _) = live.remove(&k).unwrap();
                    unsafe { s.free(p) };
                }
                for &(p, len, byte) in live.values() {
                    let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), len) };
                    prop_assert!(bytes.iter().all(|&b| b == byte));
                }
            }
        }
    }
}
