//! A shard's index: key hash -> location of the key's entry in the shard's log, as 16
//! hashbrown tables of `u32` (4 bytes and 1 control byte per bucket) that share the keys
//! unevenly.
//!
//! Why not one table: a table's buckets are a power of two filled to at most 7/8, so its load
//! swings between 44% and 87% as it grows, and with it the bytes per entry between 11.4 and
//! 5.7 (1M entries over two shards sat at the worst: 10.5). Here table `i` takes a share of
//! the keys proportional to 2^(i/16): the tables double at 16 different points of each
//! octave, so the index as a whole holds about 8.2 bytes per entry at any size.

use hashbrown::HashTable;

const TABLES: usize = 16;
/// Hash bits that choose the table: not the low ones (a table's bucket) nor the top 7 (its
/// control byte's tag).
const ROUTE_SHIFT: u32 = 40;
const ROUTE_BITS: u32 = 12;

pub struct Index {
    tables: [HashTable<u32>; TABLES],
    route: Box<[u8; 1 << ROUTE_BITS]>,
    /// `allocation_size`, kept as tables grow: the byte limit reads it on every write.
    bytes: usize,
}

fn shares() -> [f64; TABLES] {
    let mut w = [0.0; TABLES];
    for (i, w) in w.iter_mut().enumerate() {
        *w = 2f64.powf(i as f64 / TABLES as f64);
    }
    let sum: f64 = w.iter().sum();
    w.map(|x| x / sum)
}

impl Index {
    /// An index presized for `entries`.
    pub fn with_capacity(entries: usize) -> Self {
        let shares = shares();
        let mut route = Box::new([0u8; 1 << ROUTE_BITS]);
        let mut table = 0;
        let mut upto = shares[0];
        for (j, r) in route.iter_mut().enumerate() {
            while (j as f64 + 0.5) / (1 << ROUTE_BITS) as f64 > upto && table + 1 < TABLES {
                table += 1;
                upto += shares[table];
            }
            *r = table as u8;
        }
        let mut index = Self {
            tables: shares.map(|s| HashTable::with_capacity((entries as f64 * s).ceil() as usize)),
            route,
            bytes: 0,
        };
        index.bytes = index.measure();
        index
    }

    #[inline]
    fn table(&self, hash: u64) -> usize {
        self.route[((hash >> ROUTE_SHIFT) as usize) & ((1 << ROUTE_BITS) - 1)] as usize
    }

    #[inline]
    pub fn find(&self, hash: u64, eq: impl FnMut(&u32) -> bool) -> Option<u32> {
        self.tables[self.table(hash)].find(hash, eq).copied()
    }

    #[inline]
    pub fn find_mut(&mut self, hash: u64, eq: impl FnMut(&u32) -> bool) -> Option<&mut u32> {
        let t = self.table(hash);
        self.tables[t].find_mut(hash, eq)
    }

    /// Removes the location `eq` picks; true if there was one.
    #[inline]
    pub fn remove(&mut self, hash: u64, eq: impl FnMut(&u32) -> bool) -> bool {
        let t = self.table(hash);
        match self.tables[t].find_entry(hash, eq) {
            Ok(found) => {
                found.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Adds a location for a key not in the index; `rehash` gives a location's key hash when
    /// the table grows.
    #[inline]
    pub fn insert(&mut self, hash: u64, loc: u32, rehash: impl Fn(&u32) -> u64) {
        let t = self.table(hash);
        let before = self.tables[t].capacity();
        self.tables[t].insert_unique(hash, loc, rehash);
        if self.tables[t].capacity() != before {
            self.bytes = self.measure();
        }
    }

    /// Bytes the table taking `hash` would add if one more key made it grow.
    pub fn growth(&self, hash: u64) -> usize {
        let t = &self.tables[self.table(hash)];
        if t.len() == t.capacity() {
            t.allocation_size().max(4096)
        } else {
            0
        }
    }

    pub fn allocation_size(&self) -> usize {
        self.bytes
    }

    fn measure(&self) -> usize {
        self.tables
            .iter()
            .map(HashTable::allocation_size)
            .sum::<usize>()
            + self.route.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_take_shares_growing_by_2_to_the_16th() {
        let index = Index::with_capacity(0);
        let mut counts = [0usize; TABLES];
        for &t in index.route.iter() {
            counts[t as usize] += 1;
        }
        let shares = shares();
        for (i, &c) in counts.iter().enumerate() {
            let want = shares[i] * (1 << ROUTE_BITS) as f64;
            assert!(
                (c as f64 - want).abs() <= 1.0,
                "table {i}: {c} routes, {want} wanted"
            );
        }
    }

    #[test]
    fn holds_about_8_bytes_per_key_at_any_size() {
        let hasher = ahash::RandomState::new();
        let mut index = Index::with_capacity(0);
        let mut worst: f64 = 0.0;
        for k in 0..600_000u32 {
            let h = hasher.hash_one(k);
            index.insert(h, k, |&x| hasher.hash_one(x));
            if k >= 20_000 && k % 1000 == 0 {
                worst = worst.max(index.allocation_size() as f64 / k as f64);
            }
        }
        // One table would reach 11.4 bytes per key just after each doubling.
        assert!(worst < 9.5, "{worst} bytes per key at worst");
        for k in (0..600_000u32).step_by(997) {
            assert_eq!(index.find(hasher.hash_one(k), |&x| x == k), Some(k));
        }
        assert!(index.remove(hasher.hash_one(5u32), |&x| x == 5));
        assert_eq!(index.find(hasher.hash_one(5u32), |&x| x == 5), None);
    }
}
