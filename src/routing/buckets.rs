//! Ring buckets: the ring cut into BUCKETS equal arcs, the unit of data movement and of
//! anti-entropy's digest tree, and the bitmap that names a set of them. Pure; used by the
//! ring, by every core's shards (which keep a digest per bucket) and by the control plane.

pub use placement::key_position;

/// The ring is cut into `BUCKETS` equal buckets, the leaves of the anti-entropy digest tree
/// and the unit of data movement. Ring points sit on bucket boundaries, so every key of a
/// bucket has the same replicas: a bucket is the smallest range two replicas can compare.
pub const BUCKET_BITS: u32 = 12;
pub const BUCKETS: usize = 1 << BUCKET_BITS;
pub(crate) const BUCKET_SHIFT: u32 = 64 - BUCKET_BITS;

/// The bucket of a ring position. A key belongs to the first point at or after it, and points
/// are multiples of 2^BUCKET_SHIFT, so bucket b holds the positions (b, b + 1] in those units.
#[inline]
pub fn bucket_of_position(position: u64) -> usize {
    (position.wrapping_sub(1) >> BUCKET_SHIFT) as usize
}

#[inline]
pub fn bucket_of(key: &[u8]) -> usize {
    bucket_of_position(key_position(key))
}

/// A set of buckets, as a bitmap: 512 bytes on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct BucketSet(Box<[u64; BUCKETS / 64]>);

impl Default for BucketSet {
    fn default() -> Self {
        BucketSet(Box::new([0; BUCKETS / 64]))
    }
}

impl std::fmt::Debug for BucketSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BucketSet({} buckets)", self.len())
    }
}

impl BucketSet {
    pub fn all() -> Self {
        BucketSet(Box::new([u64::MAX; BUCKETS / 64]))
    }

    pub fn insert(&mut self, bucket: usize) {
        self.0[bucket / 64] |= 1 << (bucket % 64);
    }

    #[inline]
    pub fn contains(&self, bucket: usize) -> bool {
        self.0[bucket / 64] & (1 << (bucket % 64)) != 0
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn union_with(&mut self, other: &BucketSet) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a |= b;
        }
    }

    pub fn subtract(&mut self, other: &BucketSet) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a &= !b;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..BUCKETS).filter(|&b| self.contains(b))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// None unless `bytes` is exactly a bitmap of BUCKETS bits.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != BUCKETS / 8 {
            return None;
        }
        let mut set = BucketSet::default();
        for (w, chunk) in set.0.iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_le_bytes(chunk.try_into().ok()?);
        }
        Some(set)
    }
}
