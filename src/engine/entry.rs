//! How one cache entry is laid out in its shard's log (see [`super::log`]): header, key and
//! value back to back, with no per-entry pointer, cell rounding or allocator header.
//!
//! ```text
//! flags u8 [| node u8 [| node u32]] | hlc i32 delta or u64 | [expires_at u32] | key_len varint
//!          | value_len varint | key | value (or, for a large entry, the address of its block)
//! ```
//!
//! Why so short: with a 16-byte key and 100-byte value the header is 7 bytes, where the
//! payload is 116 and the issue's budget for everything per entry is 145. The flags byte says
//! which optional fields are there:
//! - the version's node is the one its segment's first entry named (no byte), or an index into
//!   the shard's table of node ids (a shard sees a handful of coordinators), or
//!   [`NODE_INLINE`] and the id itself;
//! - the version's HLC is a 32-bit signed offset from the hlc its segment started with (the
//!   entries of a segment are written within milliseconds of each other, a ±0.5 s window at 12
//!   logical bits), or all 8 bytes when it does not fit ([`WIDE`]);
//! - the expiry tick is there only for an entry with a TTL;
//! - key and value over [`MAX_INLINE_PAYLOAD`] bytes keep the value in a block of its own (a
//!   large entry, told by its lengths alone, so it stays large when moved), and its stub in
//!   the log holds the block's address: one large value never leaves a segment mostly empty.
//!
//! The flags byte also holds what the shard keeps per entry for eviction (a 2-bit access
//! count) and a dead mark for a copy that was deleted, overwritten elsewhere or moved, which
//! stays in its segment until the segment is reclaimed.

use super::hlc::Version;
use std::marker::PhantomData;

/// Value holds bytes that were set as `value_bytes` (not a UTF-8 string).
pub const FLAG_BINARY: u8 = 1;
/// A replicated delete: no value, kept until its TTL so a stale replica cannot resurrect the
/// key, invisible to client reads.
pub const FLAG_TOMBSTONE: u8 = 2;
/// The flags callers set and read; the other bits are the store's own.
pub const USER_FLAGS: u8 = FLAG_BINARY | FLAG_TOMBSTONE;

/// Access count (S3-FIFO's 0..=3, CLOCK's 0..=1).
pub const FREQ_SHIFT: u32 = 2;
pub const FREQ_MASK: u8 = 0b11 << FREQ_SHIFT;
/// This copy is no longer the key's entry.
pub const DEAD: u8 = 0x10;
const EXPIRES: u8 = 0x20;
/// The node byte is there (else the version's node is the segment's).
const NODE: u8 = 0x40;
const WIDE: u8 = 0x80;

/// Node byte meaning "the node id follows in 4 bytes": the shard's table is full.
pub const NODE_INLINE: u8 = u8::MAX;
/// Node ids a shard's table holds.
pub const MAX_NODES: usize = NODE_INLINE as usize;

/// Most bytes of key and value kept whole in the log; a longer entry keeps its value in its
/// own block.
pub const MAX_INLINE_PAYLOAD: usize = 4000;

/// What a segment's entries are written against: its first entry's HLC and node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Base {
    pub hlc: u64,
    pub node: u32,
}

#[inline]
fn is_large(key_len: usize, value_len: usize) -> bool {
    key_len + value_len > MAX_INLINE_PAYLOAD
}

fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// # Safety
/// `p` must have room for `varint_len(n)` bytes.
unsafe fn put_varint(p: *mut u8, mut n: usize) -> usize {
    let mut i = 0;
    while n >= 0x80 {
        *p.add(i) = (n as u8) | 0x80;
        n >>= 7;
        i += 1;
    }
    *p.add(i) = n as u8;
    i + 1
}

/// # Safety
/// `p` must point at a varint written by `put_varint`.
#[inline]
unsafe fn get_varint(p: *const u8) -> (usize, usize) {
    let b = *p;
    if b < 0x80 {
        return (b as usize, 1);
    }
    let mut n = (b & 0x7f) as usize;
    let mut shift = 7;
    let mut i = 1;
    loop {
        let b = *p.add(i);
        n |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            return (n, i);
        }
        shift += 7;
    }
}

/// How an entry will be written: which optional fields it has and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    flags: u8,
    node: u8,
    large: bool,
    len: usize,
}

impl Shape {
    /// The shape of an entry in a segment written against `base`, with `node` the index of
    /// the version's node in the shard's table (`NODE_INLINE`: not in it).
    pub fn new(
        key_len: usize,
        value_len: usize,
        version: Version,
        base: Base,
        node: u8,
        expires_at: u32,
    ) -> Shape {
        let mut flags = 0;
        let mut len = 1 + key_len + varint_len(key_len) + varint_len(value_len);
        if version.node != base.node {
            flags |= NODE;
            len += if node == NODE_INLINE { 5 } else { 1 };
        }
        if delta(version.hlc, base.hlc).is_some() {
            len += 4;
        } else {
            flags |= WIDE;
            len += 8;
        }
        if expires_at != 0 {
            flags |= EXPIRES;
            len += 4;
        }
        if is_large(key_len, value_len) {
            len += 8;
        } else {
            len += value_len;
        }
        Shape {
            flags,
            node,
            large: is_large(key_len, value_len),
            len,
        }
    }

    /// Bytes in the log.
    pub fn log_len(&self) -> usize {
        self.len
    }

    pub fn is_large(&self) -> bool {
        self.large
    }
}

#[inline]
fn delta(hlc: u64, base: u64) -> Option<i32> {
    i32::try_from(hlc.wrapping_sub(base) as i64).ok()
}

/// What to write.
pub struct Fields<'a> {
    pub key: &'a [u8],
    /// The value, or for a large entry (`Shape::is_large`) the 8 bytes of its block's address.
    pub value: &'a [u8],
    pub value_len: usize,
    pub version: Version,
    pub expires_at: u32,
    /// `USER_FLAGS` bits, and the access count.
    pub flags: u8,
}

/// Writes an entry of `shape` at `p`.
///
/// # Safety
/// `p` must have room for `shape.log_len()` bytes; `shape` was made for these fields and `base`.
pub unsafe fn write(p: *mut u8, shape: &Shape, f: &Fields, base: Base) {
    *p = shape.flags | (f.flags & (USER_FLAGS | FREQ_MASK));
    let mut at = 1;
    if shape.flags & NODE != 0 {
        *p.add(1) = shape.node;
        at += 1;
        if shape.node == NODE_INLINE {
            p.add(at)
                .cast::<u32>()
                .write_unaligned(f.version.node.to_le());
            at += 4;
        }
    }
    if shape.flags & WIDE != 0 {
        p.add(at)
            .cast::<u64>()
            .write_unaligned(f.version.hlc.to_le());
        at += 8;
    } else {
        let d = delta(f.version.hlc, base.hlc).expect("shape checked the delta");
        p.add(at).cast::<i32>().write_unaligned(d.to_le());
        at += 4;
    }
    if shape.flags & EXPIRES != 0 {
        p.add(at)
            .cast::<u32>()
            .write_unaligned(f.expires_at.to_le());
        at += 4;
    }
    at += put_varint(p.add(at), f.key.len());
    at += put_varint(p.add(at), f.value_len);
    std::ptr::copy_nonoverlapping(f.key.as_ptr(), p.add(at), f.key.len());
    at += f.key.len();
    std::ptr::copy_nonoverlapping(f.value.as_ptr(), p.add(at), f.value.len());
    debug_assert_eq!(at + f.value.len(), shape.len);
}

/// Where the parts of an entry are, read off its header.
#[derive(Clone, Copy)]
struct Parts {
    /// Offset of the HLC field.
    hlc_at: u8,
    expires_at: u32,
    key_at: u8,
    key_len: u32,
    value_len: usize,
}

/// # Safety
/// `p` must point at an entry written by [`write`].
#[inline]
unsafe fn parts(p: *const u8) -> Parts {
    let flags = *p;
    let mut at = 1;
    if flags & NODE != 0 {
        at += if *p.add(1) == NODE_INLINE { 5 } else { 1 };
    }
    let hlc_at = at;
    at += if flags & WIDE != 0 { 8 } else { 4 };
    let mut expires_at = 0;
    if flags & EXPIRES != 0 {
        expires_at = u32::from_le(p.add(at).cast::<u32>().read_unaligned());
        at += 4;
    }
    let (key_len, a) = get_varint(p.add(at));
    let (value_len, b) = get_varint(p.add(at + a));
    Parts {
        hlc_at: hlc_at as u8,
        expires_at,
        key_at: (at + a + b) as u8,
        key_len: key_len as u32,
        value_len,
    }
}

/// The key of the entry at `p`.
///
/// # Safety
/// `p` must point at a live entry that outlives `'a`.
#[inline]
pub unsafe fn key_at<'a>(p: *const u8) -> &'a [u8] {
    let parts = parts(p);
    std::slice::from_raw_parts(p.add(parts.key_at as usize), parts.key_len as usize)
}

/// The expiry tick of the entry at `p` (0: none), without reading the rest of its header
/// when it has none.
///
/// # Safety
/// `p` must point at an entry written by [`write`].
#[inline]
pub unsafe fn expires_at(p: *const u8) -> u32 {
    if *p & EXPIRES == 0 {
        0
    } else {
        parts(p).expires_at
    }
}

/// Bytes the entry at `p` takes in the log.
///
/// # Safety
/// `p` must point at an entry written by [`write`].
#[inline]
pub unsafe fn len_at(p: *const u8) -> usize {
    let parts = parts(p);
    let value = if is_large(parts.key_len as usize, parts.value_len) {
        8
    } else {
        parts.value_len
    };
    parts.key_at as usize + parts.key_len as usize + value
}

/// The flags byte of the entry at `p`.
///
/// # Safety
/// `p` must point at an entry written by [`write`].
#[inline]
pub unsafe fn flags_at<'a>(p: *mut u8) -> &'a mut u8 {
    &mut *p
}

/// A view of one entry in its shard's log, valid while the shard is not changed.
#[derive(Clone, Copy)]
pub struct EntryRef<'a> {
    p: *const u8,
    parts: Parts,
    base: Base,
    nodes: &'a [u32],
    _log: PhantomData<&'a [u8]>,
}

impl<'a> EntryRef<'a> {
    /// # Safety
    /// `p` must point at an entry written by [`write`] with `base`, alive for `'a`; `nodes`
    /// is the table its node byte indexes.
    #[inline]
    pub unsafe fn new(p: *const u8, base: Base, nodes: &'a [u32]) -> Self {
        Self {
            p,
            parts: parts(p),
            base,
            nodes,
            _log: PhantomData,
        }
    }

    #[inline]
    fn flags_byte(&self) -> u8 {
        // SAFETY: every entry starts with its flags byte.
        unsafe { *self.p }
    }

    #[inline]
    pub fn key(&self) -> &'a [u8] {
        // SAFETY: the key lies after the header, inside the entry.
        unsafe {
            std::slice::from_raw_parts(
                self.p.add(self.parts.key_at as usize),
                self.parts.key_len as usize,
            )
        }
    }

    #[inline]
    pub fn value(&self) -> &'a [u8] {
        // SAFETY: the value follows the key, or the block at the address there is the value
        // (allocated with this length, alive as long as the entry).
        unsafe {
            let at = self
                .p
                .add(self.parts.key_at as usize + self.parts.key_len as usize);
            let data = if self.is_large() {
                at.cast::<usize>().read_unaligned() as *const u8
            } else {
                at
            };
            std::slice::from_raw_parts(data, self.parts.value_len)
        }
    }

    /// The large entry's block and its length.
    pub fn block(&self) -> Option<(*mut u8, usize)> {
        self.is_large().then(|| {
            // SAFETY: a large entry holds its block's address after the key.
            let at = unsafe {
                self.p
                    .add(self.parts.key_at as usize + self.parts.key_len as usize)
                    .cast::<usize>()
                    .read_unaligned()
            };
            (at as *mut u8, self.parts.value_len)
        })
    }

    #[inline]
    pub fn version(&self) -> Version {
        let flags = self.flags_byte();
        // SAFETY: the HLC field is where the header says.
        unsafe {
            let at = self.p.add(self.parts.hlc_at as usize);
            let hlc = if flags & WIDE != 0 {
                u64::from_le(at.cast::<u64>().read_unaligned())
            } else {
                let d = i32::from_le(at.cast::<i32>().read_unaligned());
                self.base.hlc.wrapping_add(d as i64 as u64)
            };
            Version {
                hlc,
                node: self.node(),
            }
        }
    }

    #[inline]
    pub fn expires_at(&self) -> u32 {
        self.parts.expires_at
    }

    /// The `USER_FLAGS` bits.
    #[inline]
    pub fn flags(&self) -> u8 {
        self.flags_byte() & USER_FLAGS
    }

    #[inline]
    pub fn freq(&self) -> u8 {
        (self.flags_byte() & FREQ_MASK) >> FREQ_SHIFT
    }

    #[inline]
    pub fn is_dead(&self) -> bool {
        self.flags_byte() & DEAD != 0
    }

    #[inline]
    pub fn is_large(&self) -> bool {
        is_large(self.parts.key_len as usize, self.parts.value_len)
    }

    /// Bytes in the log.
    #[inline]
    pub fn log_len(&self) -> usize {
        let value = if self.is_large() {
            8
        } else {
            self.parts.value_len
        };
        self.parts.key_at as usize + self.parts.key_len as usize + value
    }

    /// Bytes of key and value (what the entry stores, whatever its layout).
    pub fn payload_len(&self) -> usize {
        self.parts.key_len as usize + self.parts.value_len
    }

    /// Whether a new `version`, `expires_at` and a value of `value_len` bytes can be written
    /// over this entry's own fields ([`rewrite`]): the same value length, an expiry again (or
    /// none again), a node its node field already names and an HLC its HLC field holds. The
    /// common overwrite (same size, same coordinator, a clock moments later) then writes only
    /// what changed instead of the whole entry.
    #[inline]
    pub fn fits(&self, version: Version, expires_at: u32, value_len: usize) -> bool {
        let flags = self.flags_byte();
        value_len == self.parts.value_len
            && !self.is_large()
            && (expires_at != 0) == (flags & EXPIRES != 0)
            && (flags & WIDE != 0 || delta(version.hlc, self.base.hlc).is_some())
            && self.node() == version.node
    }

    #[inline]
    fn node(&self) -> u32 {
        // SAFETY: the node byte (and id) is there when the flags say so.
        unsafe {
            if self.flags_byte() & NODE == 0 {
                self.base.node
            } else if *self.p.add(1) == NODE_INLINE {
                u32::from_le(self.p.add(2).cast::<u32>().read_unaligned())
            } else {
                self.nodes[*self.p.add(1) as usize]
            }
        }
    }
}

/// Writes `version`'s HLC, `expires_at`, `value` and `flags` (`USER_FLAGS` and the access
/// count) over the entry `e` views, keeping its header's form.
///
/// # Safety
/// `e.fits(version, expires_at, value.len())`, and nothing else reads or writes the entry
/// meanwhile (the shard holds it mutably).
#[inline]
pub unsafe fn rewrite(e: EntryRef<'_>, version: Version, expires_at: u32, value: &[u8], flags: u8) {
    let p = e.p as *mut u8;
    *p = (*p & !(USER_FLAGS | FREQ_MASK)) | (flags & (USER_FLAGS | FREQ_MASK));
    let mut at = p.add(e.parts.hlc_at as usize);
    if *p & WIDE != 0 {
        at.cast::<u64>().write_unaligned(version.hlc.to_le());
        at = at.add(8);
    } else {
        let d = delta(version.hlc, e.base.hlc).expect("fits checked the delta");
        at.cast::<i32>().write_unaligned(d.to_le());
        at = at.add(4);
    }
    if *p & EXPIRES != 0 {
        at.cast::<u32>().write_unaligned(expires_at.to_le());
    }
    let v = p.add(e.parts.key_at as usize + e.parts.key_len as usize);
    std::ptr::copy_nonoverlapping(value.as_ptr(), v, value.len());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(key: &[u8], value: &[u8], v: Version, base: Base, node: u8, exp: u32, flags: u8) {
        let shape = Shape::new(key.len(), value.len(), v, base, node, exp);
        let block = value.to_vec().into_boxed_slice();
        let addr = (block.as_ptr() as usize).to_ne_bytes();
        let stored: &[u8] = if shape.is_large() { &addr } else { value };
        let mut buf = vec![0u8; shape.log_len()];
        let nodes = [v.node ^ 1, v.node];
        unsafe {
            write(
                buf.as_mut_ptr(),
                &shape,
                &Fields {
                    key,
                    value: stored,
                    value_len: value.len(),
                    version: v,
                    expires_at: exp,
                    flags,
                },
                base,
            );
            assert_eq!(len_at(buf.as_ptr()), shape.log_len());
            assert_eq!(key_at(buf.as_ptr()), key);
            let e = EntryRef::new(buf.as_ptr(), base, &nodes);
            assert_eq!(e.key(), key);
            assert_eq!(e.value(), value);
            assert_eq!(e.version(), v);
            assert_eq!(e.expires_at(), exp);
            assert_eq!(e.flags(), flags & USER_FLAGS);
            assert_eq!(e.freq(), (flags & FREQ_MASK) >> FREQ_SHIFT);
            assert_eq!(e.log_len(), shape.log_len());
            assert_eq!(e.is_large(), shape.is_large());
            assert_eq!(e.payload_len(), key.len() + value.len());
        }
    }

    #[test]
    fn a_typical_entry_has_a_7_byte_header() {
        let v = Version {
            hlc: 1 << 40,
            node: 7,
        };
        let base = |hlc, node| Base { hlc, node };
        let shape = Shape::new(16, 100, v, base(v.hlc - 1000, 7), 0, 0);
        assert_eq!(shape.log_len(), 16 + 100 + 7);
        // A TTL adds its tick, a version far from the segment's base its full width, a node
        // other than the segment's its index or id.
        assert_eq!(Shape::new(16, 100, v, base(v.hlc, 7), 0, 9).log_len(), 127);
        assert_eq!(Shape::new(16, 100, v, base(0, 7), 0, 0).log_len(), 127);
        assert_eq!(Shape::new(16, 100, v, base(v.hlc, 1), 1, 0).log_len(), 124);
        assert_eq!(
            Shape::new(16, 100, v, base(v.hlc, 1), NODE_INLINE, 0).log_len(),
            128
        );
        assert!(!Shape::new(16, MAX_INLINE_PAYLOAD - 16, v, base(v.hlc, 7), 0, 0).is_large());
        assert!(Shape::new(16, MAX_INLINE_PAYLOAD - 15, v, base(v.hlc, 7), 0, 0).is_large());
    }

    proptest! {
        #[test]
        fn round_trips(key in proptest::collection::vec(any::<u8>(), 0..200),
                       value in proptest::collection::vec(any::<u8>(), 0..9000),
                       hlc: u64, base: u64, near: bool, node_kind in 0u8..3, node: u32,
                       exp: u32, flags: u8) {
            let base_hlc = if near { hlc.wrapping_add(base % 1000) } else { base };
            let v = Version { hlc, node };
            // The segment's own node, the table's entry 1, or an id given in full.
            let (base_node, index) = match node_kind {
                0 => (node, 0),
                1 => (node ^ 1, 1),
                _ => (node ^ 1, NODE_INLINE),
            };
            round_trip(&key, &value, v, Base { hlc: base_hlc, node: base_node }, index, exp,
                       flags & (USER_FLAGS | FREQ_MASK));
        }
    }
}
