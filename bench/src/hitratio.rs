//! Hit ratios of the eviction policies on the node's own shard code, side by side, with an
//! exact LRU as the reference: a cache-aside client (Get; on a miss, Set) over a Zipf key
//! space, optionally with a one-pass scan of cold keys every so often, or with TTLs. Runs in
//! process on one thread: a policy's hit ratio depends on the sequence of keys, not on the
//! network, and millions of requests per second let the 10M-key workloads warm up.

use distributed_cache::engine::{
    hlc::Version,
    shard::{expiry_tick, Limits, Policy, Shard, Tick},
};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use std::num::NonZeroUsize;

/// What runs beside the Zipf requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Mix {
    /// Zipf requests only.
    Plain,
    /// Every `scan_every` requests, one pass over 2x the cache size of keys never seen before
    /// (a batch job, a backup): each a Get that misses and a Set.
    Scan,
    /// Every Set carries a TTL: 30% of keys 10 s, the rest 5 minutes, at 100k requests per
    /// simulated second.
    Ttl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Which {
    S3fifo,
    Clock,
    Lru,
}

pub struct Spec {
    pub keys: u64,
    pub exponent: f64,
    /// Cache size in entries.
    pub entries: usize,
    pub requests: u64,
    pub mix: Mix,
    pub scan_every: u64,
    pub seed: u64,
}

/// Hits among the Zipf Gets (scan requests are not counted: they miss by design).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Outcome {
    pub gets: u64,
    pub hits: u64,
}

impl Outcome {
    pub fn ratio(&self) -> f64 {
        self.hits as f64 / self.gets.max(1) as f64
    }
}

/// The cache under test, as the client sees it.
trait Cache {
    fn get(&mut self, key: &[u8], now: Tick) -> bool;
    fn set(&mut self, key: &[u8], expires_at: Tick, now: Tick);
}

struct ShardCache(Shard);

impl Cache for ShardCache {
    fn get(&mut self, key: &[u8], now: Tick) -> bool {
        self.0.get(key, now).is_some()
    }
    fn set(&mut self, key: &[u8], expires_at: Tick, now: Tick) {
        self.0
            .set_at(key, b"v", Version { hlc: 1, node: 1 }, expires_at, 0, now);
    }
}

/// Exact LRU by entries, expired entries dropped when read (as the shard does).
struct Lru(lru::LruCache<Box<[u8]>, Tick>);

impl Cache for Lru {
    fn get(&mut self, key: &[u8], now: Tick) -> bool {
        match self.0.get(key) {
            Some(&exp) if exp != 0 && now >= exp => {
                self.0.pop(key);
                false
            }
            Some(_) => true,
            None => false,
        }
    }
    fn set(&mut self, key: &[u8], expires_at: Tick, _now: Tick) {
        self.0.put(key.into(), expires_at);
    }
}

const REQUESTS_PER_TICK: u64 = 10_000;

fn key(buf: &mut [u8; 16], i: u64) -> &[u8] {
    buf[0] = b'k';
    let mut n = i;
    for b in buf[1..].iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
    &buf[..]
}

pub fn simulate(which: Which, spec: &Spec) -> Outcome {
    let mut cache: Box<dyn Cache> = match which {
        Which::Lru => Box::new(Lru(lru::LruCache::new(
            NonZeroUsize::new(spec.entries.max(1)).expect("at least one"),
        ))),
        Which::S3fifo | Which::Clock => Box::new(ShardCache(Shard::with(
            if which == Which::Clock {
                Policy::Clock
            } else {
                Policy::S3Fifo
            },
            Limits {
                bytes: usize::MAX,
                entries: spec.entries.max(1),
            },
        ))),
    };
    let zipf = Zipf::new(spec.keys as f64, spec.exponent).expect("valid Zipf parameters");
    let mut rng = SmallRng::seed_from_u64(spec.seed);
    let mut out = Outcome::default();
    let mut buf = [0u8; 16];
    // Scan keys come after the Zipf key space and are never reused.
    let mut next_scan_key = spec.keys;
    let scan_len = 2 * spec.entries as u64;
    for i in 0..spec.requests {
        let now = (i / REQUESTS_PER_TICK) as Tick;
        if spec.mix == Mix::Scan && i > 0 && i % spec.scan_every == 0 {
            for _ in 0..scan_len {
                let k = key(&mut buf, next_scan_key);
                if !cache.get(k, now) {
                    cache.set(k, 0, now);
                }
                next_scan_key += 1;
            }
        }
        let index = (zipf.sample(&mut rng) as u64).clamp(1, spec.keys) - 1;
        let k = key(&mut buf, index);
        out.gets += 1;
        if cache.get(k, now) {
            out.hits += 1;
        } else {
            let expires_at = match spec.mix {
                Mix::Ttl if rng.random_ratio(3, 10) => expiry_tick(now, Some(10)),
                Mix::Ttl => expiry_tick(now, Some(300)),
                _ => 0,
            };
            cache.set(k, expires_at, now);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mix: Mix) -> Spec {
        Spec {
            keys: 100_000,
            exponent: 0.99,
            entries: 1_000,
            requests: 400_000,
            mix,
            scan_every: 50_000,
            seed: 7,
        }
    }

    #[test]
    fn s3fifo_keeps_the_hot_set_through_scans() {
        let s3 = simulate(Which::S3fifo, &spec(Mix::Scan)).ratio();
        let lru = simulate(Which::Lru, &spec(Mix::Scan)).ratio();
        let clock = simulate(Which::Clock, &spec(Mix::Scan)).ratio();
        assert!(
            s3 > lru && s3 > clock,
            "s3fifo {s3} lru {lru} clock {clock}"
        );
    }

    #[test]
    fn a_larger_cache_hits_more() {
        let small = simulate(Which::S3fifo, &spec(Mix::Plain)).ratio();
        let big = simulate(
            Which::S3fifo,
            &Spec {
                entries: 10_000,
                ..spec(Mix::Plain)
            },
        )
        .ratio();
        assert!(big > small + 0.05, "{small} -> {big}");
    }
}
