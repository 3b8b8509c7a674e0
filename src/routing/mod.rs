//! Placement of a key: key -> shard -> owning core, the ring buckets keys fall in, and the
//! port that lands a connection on a given core. Pure functions, used on every core.
//!
//! The shard hash must give the same answer in every process and build (a restarted node, and
//! every node of a cluster, must agree), so it is xxh3 with a fixed seed. ahash is not:
//! it uses AES instructions where the CPU has them, and its output may change between
//! versions. ahash remains the hasher inside each shard's map, where only speed matters.

pub mod buckets;
pub mod steer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u32);

/// The shard that holds `key`, out of `num_shards`.
#[inline]
pub fn shard_of(key: &[u8], num_shards: u32) -> ShardId {
    ShardId(placement::shard_of(key, num_shards))
}

/// The core that owns `shard`: shards are dealt round-robin, so every core that owns any owns
/// `num_shards / nr_cores` of them, give or take one.
#[inline]
pub fn owner_core(shard: ShardId, nr_cores: usize) -> usize {
    placement::owner_core(shard.0, nr_cores)
}

/// Position of `shard` among the shards its owner holds.
#[inline]
pub fn local_index(shard: ShardId, nr_cores: usize) -> usize {
    shard.0 as usize / nr_cores
}

/// The shards `core` owns, in local-index order.
pub fn shards_of_core(core: usize, nr_cores: usize, num_shards: u32) -> Vec<ShardId> {
    (core as u32..num_shards)
        .step_by(nr_cores)
        .map(ShardId)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_shard_has_exactly_one_owner() {
        for nr_cores in 1..=8 {
            for num_shards in [1u32, 2, 3, 7, 8, 64, 100] {
                let mut owners = vec![0usize; num_shards as usize];
                for core in 0..nr_cores {
                    for (i, s) in shards_of_core(core, nr_cores, num_shards)
                        .into_iter()
                        .enumerate()
                    {
                        assert_eq!(owner_core(s, nr_cores), core);
                        assert_eq!(local_index(s, nr_cores), i);
                        owners[s.0 as usize] += 1;
                    }
                }
                assert!(
                    owners.iter().all(|&n| n == 1),
                    "{nr_cores} cores, {num_shards} shards"
                );
            }
        }
    }

    #[test]
    fn shard_hash_is_stable() {
        use xxhash_rust::xxh3::xxh3_64;
        // Pinned values: a change here moves every key of a running cluster.
        assert_eq!(xxh3_64(b"foo"), 0xab6e5f64077e7d8a);
        assert_eq!(shard_of(b"foo", 64), shard_of(b"foo", 64));
    }

    #[test]
    fn keys_spread_over_shards() {
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[shard_of(format!("key-{i}").as_bytes(), 16).0 as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    proptest! {
        #[test]
        fn shard_is_in_range(key: Vec<u8>, n in 1u32..10_000) {
            prop_assert!(shard_of(&key, n).0 < n);
        }
    }
}
