//! Where a key lives: its position on the consistent-hash ring, the replicas a ring's points
//! give it, its shard on a node and the core that owns that shard, and the source port that
//! lands a connection on a given core of a node's shard-aware port.
//!
//! The node and its clients must agree on every answer, in every process and build, so the
//! hashes are xxh3 with fixed seeds and this crate is the one place they are written. Pure
//! functions, no dependencies beyond xxh3.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Seed of key positions; distinct from the shard hash so ring and shard choice are independent.
const KEY_SEED: u64 = 0x5eed_0fc0_ffee;

/// Position of a key on the ring.
///
/// ```
/// assert_eq!(placement::key_position(b"k"), placement::key_position(b"k"));
/// assert_ne!(placement::key_position(b"k"), placement::key_position(b"l"));
/// ```
#[inline]
pub fn key_position(key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, KEY_SEED)
}

/// The shard that holds `key` on a node with `num_shards` shards.
///
/// ```
/// assert!(placement::shard_of(b"k", 8) < 8);
/// ```
#[inline]
pub fn shard_of(key: &[u8], num_shards: u32) -> u32 {
    // Multiply-shift instead of modulo: one multiplication, and it uses the high bits of the
    // hash, which xxh3 mixes as well as the low ones.
    ((xxh3_64(key) as u128 * num_shards as u128) >> 64) as u32
}

/// The core that owns `shard` on a node with `cores` cores: shards are dealt round-robin.
///
/// ```
/// assert_eq!(placement::owner_core(5, 2), 1);
/// ```
#[inline]
pub fn owner_core(shard: u32, cores: usize) -> usize {
    shard as usize % cores.max(1)
}

/// The core of a node with `cores` cores and `num_shards` shards that owns `key`.
///
/// ```
/// let core = placement::core_of(b"k", 8, 2);
/// assert_eq!(core, placement::owner_core(placement::shard_of(b"k", 8), 2));
/// ```
#[inline]
pub fn core_of(key: &[u8], num_shards: u32, cores: usize) -> usize {
    owner_core(shard_of(key, num_shards), cores)
}

/// The replicas of the key at `position`, first (primary) to last: the first
/// `replication_factor` distinct nodes met clockwise from it on a ring of `points`
/// (position, node index), sorted by position. Yields node indices.
///
/// ```
/// let points = [(10, 0), (20, 1), (30, 0), (40, 2)];
/// let r: Vec<u32> = placement::replicas_at(&points, 2, 25).collect();
/// assert_eq!(r, [0, 2]);
/// let wrapped: Vec<u32> = placement::replicas_at(&points, 2, 45).collect();
/// assert_eq!(wrapped, [0, 1]);
/// ```
pub fn replicas_at(
    points: &[(u64, u32)],
    replication_factor: usize,
    position: u64,
) -> impl Iterator<Item = u32> + '_ {
    let start = points.partition_point(|&(p, _)| p < position);
    let mut seen: Vec<u32> = Vec::with_capacity(replication_factor);
    (0..points.len())
        .map(move |i| points[(start + i) % points.len()].1)
        .filter(move |idx| {
            if seen.contains(idx) {
                return false;
            }
            seen.push(*idx);
            true
        })
        .take(replication_factor)
}

/// The first source port at or after `from` (wrapping within `lo..=hi`) whose connections a
/// shard-aware port steers to `core` of a node with `cores` cores: the port steers source
/// port p to core p mod cores.
///
/// ```
/// let p = placement::port_for_core(40_001, 1, 4, 32_768, 60_999);
/// assert_eq!(p % 4, 1);
/// assert!(p >= 40_001);
/// ```
pub fn port_for_core(from: u16, core: u32, cores: u32, lo: u16, hi: u16) -> u16 {
    let cores = cores.max(1);
    let mut port = from.clamp(lo, hi) as u32;
    port += (core + cores - port % cores) % cores;
    if port > hi as u32 {
        port = lo as u32 + (core + cores - lo as u32 % cores) % cores;
    }
    port as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The functions' answers are fixed: a change would make nodes and clients of different
    /// builds disagree on where a key lives.
    #[test]
    fn answers_do_not_change_between_builds() {
        assert_eq!(key_position(b"bench-key"), 3_423_965_726_679_139_386);
        assert_eq!(
            (shard_of(b"bench-key", 64), core_of(b"bench-key", 64, 2)),
            (8, 0)
        );
    }

    #[test]
    fn replicas_are_distinct_and_capped_by_the_nodes() {
        let points = [(1, 0), (2, 0), (3, 1)];
        assert_eq!(replicas_at(&points, 3, 0).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(replicas_at(&[], 3, 0).count(), 0);
    }

    #[test]
    fn every_core_has_ports_in_the_range() {
        for cores in 1..8 {
            for core in 0..cores {
                for from in [32_768, 45_000, 60_999] {
                    let p = port_for_core(from, core, cores, 32_768, 60_999);
                    assert_eq!(p as u32 % cores, core);
                    assert!((32_768..=60_999).contains(&p));
                }
            }
        }
    }
}
