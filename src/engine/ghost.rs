//! S3-FIFO's ghost queue: the keys recently evicted from the small queue, remembered by a
//! 12-bit fingerprint of their hash so that a key coming back soon after its eviction goes
//! straight to the main queue. Single-threaded: part of one shard.
//!
//! Why not an exact FIFO of hashes: that costs 8 bytes of hash plus an index per ghost entry,
//! and the ghost holds about as many keys as the cache. Here a ghost entry is 2 bytes in a set
//! of 8 (one 16-byte line): 12 bits of fingerprint and a 4-bit generation. The generation
//! advances every `slots / 8` insertions and an entry counts only while it is less than 8
//! generations old, so the ghost answers "evicted within the last `slots` evictions", as a FIFO
//! of that length would. A false positive (same set, same fingerprint: about 8 in 4096) only
//! admits a new key to main, which costs a little hit ratio, never correctness.

const WAYS: usize = 8;
const GENERATIONS: u16 = 8;

pub struct Ghost {
    sets: Vec<[u16; WAYS]>,
    generation: u16,
    inserted: usize,
}

impl Ghost {
    /// A ghost remembering about `keys` evictions (rounded up to a power of two, at least 64).
    pub fn new(keys: usize) -> Self {
        let sets = keys.max(64).next_power_of_two() / WAYS;
        Self {
            sets: vec![[0; WAYS]; sets],
            generation: 0,
            inserted: 0,
        }
    }

    /// How many evictions it remembers.
    pub fn slots(&self) -> usize {
        self.sets.len() * WAYS
    }

    pub fn bytes(&self) -> usize {
        self.sets.len() * std::mem::size_of::<[u16; WAYS]>()
    }

    #[inline]
    fn place(&self, hash: u64) -> (usize, u16) {
        let set = (hash as usize) & (self.sets.len() - 1);
        // Fingerprint from the high bits (the set used the low ones); never 0, the empty mark.
        let fingerprint = ((hash >> 52) as u16).max(1);
        (set, fingerprint)
    }

    #[inline]
    fn age(&self, e: u16) -> u16 {
        self.generation.wrapping_sub(e & 0xf) & 0xf
    }

    /// Remembers an evicted key's hash.
    pub fn insert(&mut self, hash: u64) {
        let (set, fingerprint) = self.place(hash);
        let mut victim = 0;
        let mut oldest = 0;
        for (i, &e) in self.sets[set].iter().enumerate() {
            if e == 0 || e >> 4 == fingerprint {
                victim = i;
                break;
            }
            let age = self.age(e);
            if age >= oldest {
                oldest = age;
                victim = i;
            }
        }
        self.sets[set][victim] = fingerprint << 4 | self.generation;
        self.inserted += 1;
        if self.inserted >= (self.slots() / GENERATIONS as usize).max(1) {
            self.inserted = 0;
            self.generation = (self.generation + 1) & 0xf;
        }
    }

    /// Whether `hash` was evicted recently; forgets it if so (it is coming back).
    pub fn take(&mut self, hash: u64) -> bool {
        let (set, fingerprint) = self.place(hash);
        for i in 0..WAYS {
            let e = self.sets[set][i];
            if e != 0 && e >> 4 == fingerprint && self.age(e) < GENERATIONS {
                self.sets[set][i] = 0;
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> u64 {
        // Spread like a real hash: set bits low, fingerprint bits high.
        i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    #[test]
    fn remembers_recent_evictions_and_forgets_old_ones() {
        let mut g = Ghost::new(1024);
        assert_eq!(g.slots(), 1024);
        for i in 0..512 {
            g.insert(h(i));
        }
        let recalled = (0..512).filter(|&i| g.take(h(i))).count();
        assert!(recalled >= 500, "{recalled} of 512 recent keys recalled");
        assert!(!g.take(h(3)), "taken keys are forgotten");
        for i in 1000..1000 + 10 * 1024 {
            g.insert(h(i));
        }
        let stale = (1000..1100).filter(|&i| g.take(h(i))).count();
        assert!(
            stale <= 2,
            "{stale} of 100 keys ten ghost-lengths old recalled"
        );
        let never = (50_000..60_000).filter(|&i| g.take(h(i))).count();
        assert!(never < 100, "{never} false positives in 10,000");
    }
}
