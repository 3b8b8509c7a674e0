//! What the load generator sends: keys (uniform or Zipf over a key space), the Get/Set/Delete
//! mix, fixed-size keys and values. Pure and seeded, so it is unit-tested without a server.

use rand::{rngs::SmallRng, Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyDist {
    Uniform,
    Zipf(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Set,
    Delete,
}

#[derive(Debug, Clone)]
pub struct Workload {
    pub keys: u64,
    pub first_key: u64,
    pub key_bytes: usize,
    pub value_bytes: usize,
    /// When set, each Set's value is between `value_bytes` and this, log-uniformly (as many
    /// values of 10-100 B as of 10-100 KB): sizes that vary by orders of magnitude.
    pub value_bytes_max: Option<usize>,
    /// Share of Gets; the rest are Sets, except `delete_ratio` of all requests.
    pub read_ratio: f64,
    pub delete_ratio: f64,
    pub dist: KeyDist,
    /// The consistency level of every request (pb.Consistency as i32).
    pub consistency: i32,
}

/// One worker's stream of operations.
pub struct Generator {
    rng: SmallRng,
    zipf: Option<Zipf<f64>>,
    w: Workload,
}

impl Generator {
    pub fn new(w: &Workload, seed: u64) -> Generator {
        let zipf = match w.dist {
            KeyDist::Uniform => None,
            KeyDist::Zipf(s) => {
                Some(Zipf::new(w.keys as f64, s).expect("validated exponent and key count"))
            }
        };
        Generator {
            rng: SmallRng::seed_from_u64(seed),
            zipf,
            w: w.clone(),
        }
    }

    /// A key index in `first_key..first_key + keys`. With Zipf, `first_key` is the most
    /// popular.
    pub fn key_index(&mut self) -> u64 {
        let offset = match &self.zipf {
            None => self.rng.random_range(0..self.w.keys),
            Some(z) => (z.sample(&mut self.rng) as u64).clamp(1, self.w.keys) - 1,
        };
        self.w.first_key + offset
    }

    /// The length of the next Set's value.
    pub fn value_len(&mut self) -> usize {
        match self.w.value_bytes_max {
            Some(max) if max > self.w.value_bytes => {
                let lo = (self.w.value_bytes.max(1) as f64).ln();
                let hi = (max as f64).ln();
                let x: f64 = self.rng.random_range(lo..=hi);
                (x.exp() as usize).clamp(self.w.value_bytes, max)
            }
            _ => self.w.value_bytes,
        }
    }

    pub fn op(&mut self) -> Op {
        let x: f64 = self.rng.random();
        if x < self.w.delete_ratio {
            Op::Delete
        } else if x < self.w.delete_ratio + (1.0 - self.w.delete_ratio) * self.w.read_ratio {
            Op::Get
        } else {
            Op::Set
        }
    }
}

/// The key for an index, padded to `key_bytes` (at least as long as the number needs).
pub fn key_for(index: u64, key_bytes: usize) -> String {
    format!("k{index:0>width$}", width = key_bytes.saturating_sub(1))
}

pub fn value_of(value_bytes: usize) -> String {
    "v".repeat(value_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(dist: KeyDist, read_ratio: f64, delete_ratio: f64) -> Workload {
        Workload {
            keys: 1000,
            first_key: 0,
            key_bytes: 16,
            value_bytes: 100,
            value_bytes_max: None,
            read_ratio,
            delete_ratio,
            dist,
            consistency: 0,
        }
    }

    #[test]
    fn random_value_sizes_span_the_range_log_uniformly() {
        let mut wl = w(KeyDist::Uniform, 0.0, 0.0);
        wl.value_bytes = 10;
        wl.value_bytes_max = Some(100_000);
        let mut g = Generator::new(&wl, 3);
        let lens: Vec<usize> = (0..10_000).map(|_| g.value_len()).collect();
        assert!(lens.iter().all(|&l| (10..=100_000).contains(&l)));
        let small = lens.iter().filter(|&&l| l < 100).count();
        let large = lens.iter().filter(|&&l| l >= 10_000).count();
        // Each decade holds about a quarter.
        assert!((2000..3000).contains(&small), "{small}");
        assert!((2000..3000).contains(&large), "{large}");
    }

    #[test]
    fn keys_have_the_asked_size() {
        assert_eq!(key_for(42, 16).len(), 16);
        assert_eq!(key_for(99_999, 16).len(), 16);
        assert_ne!(key_for(1, 16), key_for(10, 16));
    }

    #[test]
    fn ratio_mix_matches() {
        let mut g = Generator::new(&w(KeyDist::Uniform, 0.9, 0.0), 1);
        let n = 100_000;
        let gets = (0..n).filter(|_| g.op() == Op::Get).count();
        assert!((gets as f64 / n as f64 - 0.9).abs() < 0.01, "{gets}");
        let mut g = Generator::new(&w(KeyDist::Uniform, 0.5, 0.1), 2);
        let ops: Vec<Op> = (0..n).map(|_| g.op()).collect();
        let dels = ops.iter().filter(|&&o| o == Op::Delete).count() as f64 / n as f64;
        let gets = ops.iter().filter(|&&o| o == Op::Get).count() as f64 / n as f64;
        assert!((dels - 0.1).abs() < 0.01, "{dels}");
        assert!((gets - 0.45).abs() < 0.01, "{gets}");
    }

    #[test]
    fn uniform_covers_the_space() {
        let mut g = Generator::new(&w(KeyDist::Uniform, 1.0, 0.0), 3);
        let mut seen = vec![0u32; 1000];
        for _ in 0..100_000 {
            seen[g.key_index() as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (50..150).contains(&c)));
    }

    #[test]
    fn zipf_follows_its_law() {
        // P(rank 1) = 1 / H(n, s); for n = 1000, s = 1: H = 7.485.
        let mut g = Generator::new(&w(KeyDist::Zipf(1.0), 1.0, 0.0), 4);
        let n = 200_000;
        let mut counts = vec![0u32; 1000];
        for _ in 0..n {
            counts[g.key_index() as usize] += 1;
        }
        let p1 = counts[0] as f64 / n as f64;
        assert!((p1 - 1.0 / 7.485).abs() < 0.01, "{p1}");
        // Rank 2 is half as popular as rank 1.
        let ratio = counts[1] as f64 / counts[0] as f64;
        assert!((ratio - 0.5).abs() < 0.05, "{ratio}");
    }
}
