//! Criterion micro-benchmarks of one shard, without any runtime: get (hit), set (overwrite),
//! and set with eviction (a full shard, every insert evicts an entry by CLOCK).

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use distributed_cache::engine::{hlc::Version, shard::Shard};

const KEYS: u64 = 100_000;

fn key(i: u64) -> [u8; 16] {
    format!("k{i:015}")
        .into_bytes()
        .try_into()
        .expect("16-byte keys")
}

fn filled(capacity: usize) -> Shard {
    let mut s = Shard::new(capacity);
    let value = [b'v'; 100];
    for i in 0..KEYS {
        s.set(&key(i), &value, Version { hlc: i, node: 1 }, 0, 0);
    }
    s
}

fn bench(c: &mut Criterion) {
    let value = [b'v'; 100];
    // One contiguous array: the harness's own reads of keys stay out of the figures.
    let keys: Vec<[u8; 16]> = (0..KEYS).map(key).collect();

    let mut s = filled(KEYS as usize);
    let mut i = 0usize;
    c.bench_function("shard get hit (100k keys, 16 B / 100 B)", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS as usize;
            black_box(s.get(&keys[i], 0).map(|f| f.value.len()))
        })
    });

    let mut n = 0u64;
    c.bench_function("shard set overwrite (100k keys)", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS as usize;
            n += 1;
            s.set(&keys[i], &value, Version { hlc: n, node: 1 }, 0, 0)
        })
    });

    // Capacity half the key space: every set of an absent key evicts.
    let mut e = filled(KEYS as usize / 2);
    let mut next = KEYS;
    c.bench_function("shard set with eviction (full, 50k capacity)", |b| {
        b.iter_batched(
            || {
                next += 1;
                (key(next), next)
            },
            |(k, hlc)| e.set(&k, &value, Version { hlc, node: 1 }, 0, 0),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
