//! One cache entry in one allocation: header, key and value together, as memcached's items
//! are, in a cell of its shard's [`Slab`] (malloc'd when larger than a cell). Runs on the owning
//! core only.
//!
//! Layout (byte-packed, read unaligned):
//!
//! ```text
//! hlc u64 | node u32 | expires_at u32 | flags u8 | key_len varint | value_len varint | key | value
//! ```
//!
//! Why so tight: a 16-byte key and 100-byte value make 135 bytes, a 144-byte cell; ten more
//! header bytes would push it to 160. Separately allocated key and value (two `Vec`s) would cost
//! two allocations and 48 bytes of pointers per entry.

use super::{hlc::Version, slab::Slab};
use std::{alloc::Layout, ptr::NonNull};

const FIXED: usize = 8 + 4 + 4 + 1;
/// Value holds bytes that were set as `value_bytes` (not a UTF-8 string).
pub const FLAG_BINARY: u8 = 1;
/// A replicated delete: no value, kept until its TTL so a stale replica cannot resurrect the
/// key, invisible to client reads.
pub const FLAG_TOMBSTONE: u8 = 2;

/// An owned entry. Thin (8 bytes) so the slot array stays compact. It has no `Drop`: its memory
/// belongs to the shard's slab, so the shard frees it with [`Entry::free`].
pub struct Entry(NonNull<u8>);

// SAFETY: an Entry exclusively owns its allocation, like a Box<[u8]>.
unsafe impl Send for Entry {}

fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

fn put_varint(buf: &mut [u8], mut n: usize) -> usize {
    let mut i = 0;
    while n >= 0x80 {
        buf[i] = (n as u8) | 0x80;
        n >>= 7;
        i += 1;
    }
    buf[i] = n as u8;
    i + 1
}

/// Reads a varint from raw memory; returns (value, bytes read).
///
/// # Safety
/// `p` must point at a varint written by `put_varint` inside a live entry.
unsafe fn get_varint(p: *const u8) -> (usize, usize) {
    let mut n = 0usize;
    let mut shift = 0;
    let mut i = 0;
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

/// Bytes an entry with this key and value occupies (before malloc rounding).
pub fn entry_len(key_len: usize, value_len: usize) -> usize {
    FIXED + varint_len(key_len) + varint_len(value_len) + key_len + value_len
}

impl Entry {
    pub fn new(
        slab: &mut Slab,
        key: &[u8],
        value: &[u8],
        version: Version,
        expires_at: u32,
        flags: u8,
    ) -> Entry {
        let len = entry_len(key.len(), value.len());
        let ptr = match slab.alloc(len) {
            Some(ptr) => ptr,
            None => {
                let layout = Layout::from_size_align(len, 1).expect("entry length fits in isize");
                // SAFETY: layout has non-zero size (FIXED > 0).
                let ptr = unsafe { std::alloc::alloc(layout) };
                let Some(ptr) = NonNull::new(ptr) else {
                    std::alloc::handle_alloc_error(layout)
                };
                ptr
            }
        };
        // SAFETY: the allocation is `len` bytes and we write exactly `len` bytes into it.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len) };
        buf[0..8].copy_from_slice(&version.hlc.to_le_bytes());
        buf[8..12].copy_from_slice(&version.node.to_le_bytes());
        buf[12..16].copy_from_slice(&expires_at.to_le_bytes());
        buf[16] = flags;
        let mut at = FIXED;
        at += put_varint(&mut buf[at..], key.len());
        at += put_varint(&mut buf[at..], value.len());
        buf[at..at + key.len()].copy_from_slice(key);
        at += key.len();
        buf[at..at + value.len()].copy_from_slice(value);
        Entry(ptr)
    }

    /// (offset of key, key length, value length)
    #[inline]
    fn lens(&self) -> (usize, usize, usize) {
        // SAFETY: the varints follow the fixed header of a live entry.
        unsafe {
            let p = self.0.as_ptr().add(FIXED);
            let (key_len, a) = get_varint(p);
            let (value_len, b) = get_varint(p.add(a));
            (FIXED + a + b, key_len, value_len)
        }
    }

    #[inline]
    fn fixed(&self) -> &[u8; FIXED] {
        // SAFETY: every entry starts with FIXED header bytes.
        unsafe { &*(self.0.as_ptr() as *const [u8; FIXED]) }
    }

    #[inline]
    pub fn key(&self) -> &[u8] {
        let (at, key_len, _) = self.lens();
        // SAFETY: key bytes lie within the allocation, after the header.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().add(at), key_len) }
    }

    #[inline]
    pub fn value(&self) -> &[u8] {
        let (at, key_len, value_len) = self.lens();
        // SAFETY: value bytes follow the key within the allocation.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().add(at + key_len), value_len) }
    }

    #[inline]
    pub fn version(&self) -> Version {
        let h = self.fixed();
        Version {
            hlc: u64::from_le_bytes(h[0..8].try_into().expect("8 bytes")),
            node: u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")),
        }
    }

    #[inline]
    pub fn expires_at(&self) -> u32 {
        u32::from_le_bytes(self.fixed()[12..16].try_into().expect("4 bytes"))
    }

    #[inline]
    pub fn flags(&self) -> u8 {
        self.fixed()[16]
    }

    /// Bytes of the allocation.
    pub fn alloc_len(&self) -> usize {
        let (at, key_len, value_len) = self.lens();
        at + key_len + value_len
    }

    /// Overwrites this entry in place when the new contents have exactly its length, which
    /// saves a free and a malloc on the common "same size value" overwrite.
    pub fn try_overwrite(
        &mut self,
        key: &[u8],
        value: &[u8],
        version: Version,
        expires_at: u32,
        flags: u8,
    ) -> bool {
        if entry_len(key.len(), value.len()) != self.alloc_len() {
            return false;
        }
        let (_, _, old_value_len) = self.lens();
        if old_value_len != value.len() {
            // Same total with different varint widths: keep it simple and reallocate.
            return false;
        }
        let (at, key_len, _) = self.lens();
        // SAFETY: same layout as before (equal key and value lengths), so every write below
        // stays inside the allocation.
        unsafe {
            let p = self.0.as_ptr();
            std::ptr::copy_nonoverlapping(version.hlc.to_le_bytes().as_ptr(), p, 8);
            std::ptr::copy_nonoverlapping(version.node.to_le_bytes().as_ptr(), p.add(8), 4);
            std::ptr::copy_nonoverlapping(expires_at.to_le_bytes().as_ptr(), p.add(12), 4);
            *p.add(16) = flags;
            std::ptr::copy_nonoverlapping(value.as_ptr(), p.add(at + key_len), value.len());
        }
        true
    }
}

impl Entry {
    /// Frees the entry into the slab it was made with (or back to malloc).
    pub fn free(self, slab: &mut Slab) {
        if slab.owns(self.0) {
            // SAFETY: a cell of this slab, consumed here.
            unsafe { slab.free(self.0) };
        } else {
            let layout =
                Layout::from_size_align(self.alloc_len(), 1).expect("entry length fits in isize");
            // SAFETY: malloc'd in `new` with this very layout.
            unsafe { std::alloc::dealloc(self.0.as_ptr(), layout) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn typical_entry_fits_a_144_byte_cell() {
        assert_eq!(Slab::cell_size(entry_len(16, 100)), Some(144));
    }

    #[test]
    fn overwrite_in_place_keeps_contents_right() {
        let v1 = Version { hlc: 1, node: 1 };
        let v2 = Version { hlc: 2, node: 9 };
        let mut slab = Slab::new(1);
        let mut e = Entry::new(&mut slab, b"k", b"abc", v1, 5, 0);
        assert!(e.try_overwrite(b"k", b"xyz", v2, 7, FLAG_BINARY));
        assert_eq!(e.value(), b"xyz");
        assert_eq!(e.version(), v2);
        assert_eq!(e.expires_at(), 7);
        assert_eq!(e.flags(), FLAG_BINARY);
        assert!(!e.try_overwrite(b"k", b"longer", v2, 7, 0));
        e.free(&mut slab);
    }

    proptest! {
        #[test]
        fn round_trips(key in proptest::collection::vec(any::<u8>(), 0..300),
                       value in proptest::collection::vec(any::<u8>(), 0..70_000),
                       hlc: u64, node: u32, exp: u32, flags: u8) {
            let v = Version { hlc, node };
            let mut slab = Slab::new(1);
            let e = Entry::new(&mut slab, &key, &value, v, exp, flags);
            prop_assert_eq!(e.key(), &key[..]);
            prop_assert_eq!(e.value(), &value[..]);
            prop_assert_eq!(e.version(), v);
            prop_assert_eq!(e.expires_at(), exp);
            prop_assert_eq!(e.flags(), flags);
            prop_assert_eq!(e.alloc_len(), entry_len(key.len(), value.len()));
            e.free(&mut slab);
        }
    }
}
