//! The consistent-hash ring: each node owns `vnodes` points on a 64-bit circle, a key belongs to
//! the first `replication_factor` distinct nodes clockwise from its hash. Pure data; every core
//! holds its own copy (replaced when membership changes, see [`super::views`]), so reading it
//! takes no lock.
//!
//! Positions use xxh3 with fixed seeds: every node of every build computes the same replica set
//! for a key once membership has converged.

use crate::routing::buckets::{key_position, BucketSet, BUCKETS, BUCKET_SHIFT};
use xxhash_rust::xxh3::Xxh3;

/// Default number of points per node. 256 keeps each node's share within a few percent of the
/// mean for small clusters (the 5-node test asks for +-15% of keys).
pub const DEFAULT_VNODES: u32 = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    /// Node addresses, sorted; a point refers to a node by index here.
    nodes: Vec<String>,
    /// (position, node index), sorted by position.
    points: Vec<(u64, u32)>,
    replication_factor: usize,
}

fn vnode_position(node: &str, i: u32) -> u64 {
    let mut h = Xxh3::new();
    h.update(node.as_bytes());
    h.update(b"#");
    h.update(&i.to_le_bytes());
    // On a bucket boundary; two points of one boundary make an empty arc, which is harmless.
    h.digest() >> BUCKET_SHIFT << BUCKET_SHIFT
}

impl Ring {
    /// A ring over `nodes` (duplicates ignored) keeping `replication_factor` replicas per key,
    /// capped at the number of nodes.
    pub fn new(
        nodes: impl IntoIterator<Item = String>,
        vnodes: u32,
        replication_factor: usize,
    ) -> Ring {
        let mut nodes: Vec<String> = nodes.into_iter().collect();
        nodes.sort();
        nodes.dedup();
        let mut points = Vec::with_capacity(nodes.len() * vnodes as usize);
        for (idx, node) in nodes.iter().enumerate() {
            for i in 0..vnodes {
                points.push((vnode_position(node, i), idx as u32));
            }
        }
        points.sort_unstable();
        Ring {
            replication_factor: replication_factor.min(nodes.len()).max(1),
            nodes,
            points,
        }
    }

    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn contains(&self, node: &str) -> bool {
        self.nodes
            .binary_search_by(|n| n.as_str().cmp(node))
            .is_ok()
    }

    /// Replicas per key: the configured factor capped at the ring size.
    pub fn replication_factor(&self) -> usize {
        self.replication_factor
    }

    /// The replicas of the key at `position`, first (primary) to last.
    pub fn replicas_at(&self, position: u64) -> Vec<&str> {
        placement::replicas_at(&self.points, self.replication_factor, position)
            .map(|idx| self.nodes[idx as usize].as_str())
            .collect()
    }

    /// The ring's points, (position, index into [`Ring::nodes`]), sorted by position: what a
    /// client needs to place keys itself.
    pub fn points(&self) -> &[(u64, u32)] {
        &self.points
    }

    pub fn replicas(&self, key: &[u8]) -> Vec<&str> {
        self.replicas_at(key_position(key))
    }

    /// Whether `node` is one of `key`'s replicas: `replicas(key).contains(node)` without
    /// building the list (a replica asks it of every replica call it serves).
    pub fn is_replica(&self, key: &[u8], node: &str) -> bool {
        let Ok(wanted) = self.nodes.binary_search_by(|n| n.as_str().cmp(node)) else {
            return false;
        };
        if self.points.is_empty() {
            return false;
        }
        let start = self.points.partition_point(|&(p, _)| p < key_position(key));
        // Distinct nodes met so far (REPLICATION_FACTOR is at most 64, config.rs).
        let mut seen = [u32::MAX; 64];
        let mut distinct = 0;
        for i in 0..self.points.len() {
            let (_, idx) = self.points[(start + i) % self.points.len()];
            if idx as usize == wanted {
                return true;
            }
            if !seen[..distinct].contains(&idx) {
                seen[distinct] = idx;
                distinct += 1;
                if distinct == self.replication_factor.min(64) {
                    return false;
                }
            }
        }
        false
    }

    /// The replicas of every key in `bucket`.
    pub fn bucket_replicas(&self, bucket: usize) -> Vec<&str> {
        // The bucket's last position; for the last bucket this wraps to 0, whose first point
        // at or after it is the ring's first point, as for every key past the last point.
        self.replicas_at(((bucket as u64).wrapping_add(1)) << BUCKET_SHIFT)
    }

    /// The buckets whose replicas include both `a` and `b` (`a == b`: those `a` replicates).
    pub fn shared_buckets(&self, a: &str, b: &str) -> BucketSet {
        let mut set = BucketSet::default();
        for bucket in 0..BUCKETS {
            let r = self.bucket_replicas(bucket);
            if r.contains(&a) && r.contains(&b) {
                set.insert(bucket);
            }
        }
        set
    }

    /// For each node, the fraction of the key space it is the primary of and the fraction it
    /// holds a replica of, computed exactly from the arcs between points.
    pub fn shares(&self) -> Vec<(String, f64, f64)> {
        let mut primary = vec![0f64; self.nodes.len()];
        let mut replica = vec![0f64; self.nodes.len()];
        let n = self.points.len();
        for i in 0..n {
            // The arc (prev, this] belongs to the replicas starting at this point.
            let (pos, _) = self.points[i];
            let prev = if i == 0 {
                self.points[n - 1].0
            } else {
                self.points[i - 1].0
            };
            let arc = pos.wrapping_sub(prev) as f64 / 2f64.powi(64);
            let arc = if n == 1 { 1.0 } else { arc };
            let owners = self.replicas_at(pos);
            for (k, owner) in owners.iter().enumerate() {
                let idx = self
                    .nodes
                    .iter()
                    .position(|x| x == owner)
                    .expect("owner is a ring node");
                if k == 0 {
                    primary[idx] += arc;
                }
                replica[idx] += arc;
            }
        }
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, node)| (node.clone(), primary[i], replica[i]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::buckets::{bucket_of, bucket_of_position};
    use proptest::prelude::*;

    fn ring(n: usize, rf: usize) -> Ring {
        Ring::new(
            (0..n).map(|i| format!("10.0.0.{i}:8080")),
            DEFAULT_VNODES,
            rf,
        )
    }

    #[test]
    fn replicas_are_distinct_and_capped() {
        let r = ring(5, 3);
        for i in 0..1000 {
            let reps = r.replicas(format!("key-{i}").as_bytes());
            assert_eq!(reps.len(), 3);
            let mut d = reps.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3);
        }
        assert_eq!(
            ring(2, 3).replicas(b"x").len(),
            2,
            "capped at the node count"
        );
        assert_eq!(ring(1, 3).replicas(b"x"), vec!["10.0.0.0:8080"]);
    }

    #[test]
    fn is_replica_agrees_with_replicas() {
        for (n, rf) in [(1, 1), (2, 3), (3, 3), (5, 2), (7, 3)] {
            let r = ring(n, rf);
            for i in 0..500 {
                let key = format!("key-{i}");
                let reps = r.replicas(key.as_bytes());
                for node in (0..n).map(|j| format!("10.0.0.{j}:8080")) {
                    assert_eq!(
                        r.is_replica(key.as_bytes(), &node),
                        reps.contains(&node.as_str()),
                        "{key} on {node}, {n} nodes, RF {rf}"
                    );
                }
                assert!(!r.is_replica(key.as_bytes(), "10.9.9.9:1"));
            }
        }
    }

    #[test]
    fn placement_is_independent_of_insertion_order() {
        let a = Ring::new(["b:1".to_string(), "a:1".into(), "c:1".into()], 64, 2);
        let b = Ring::new(
            ["c:1".to_string(), "b:1".into(), "a:1".into(), "a:1".into()],
            64,
            2,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn five_nodes_share_keys_within_15_percent() {
        let r = ring(5, 3);
        let mut held = std::collections::HashMap::new();
        for i in 0..10_000 {
            for node in r.replicas(format!("key-{i}").as_bytes()) {
                *held.entry(node.to_string()).or_insert(0u32) += 1;
            }
        }
        let mean = 10_000.0 * 3.0 / 5.0;
        for (node, n) in &held {
            assert!(
                (*n as f64 - mean).abs() / mean <= 0.15,
                "{node}: {n} vs mean {mean}"
            );
        }
        let shares = r.shares();
        let total_primary: f64 = shares.iter().map(|s| s.1).sum();
        let total_replica: f64 = shares.iter().map(|s| s.2).sum();
        assert!((total_primary - 1.0).abs() < 1e-9);
        assert!((total_replica - 3.0).abs() < 1e-9);
    }

    #[test]
    fn adding_a_node_moves_only_its_share() {
        let before = ring(4, 1);
        let after = ring(5, 1);
        let moved = (0..10_000)
            .filter(|i| {
                let k = format!("key-{i}");
                before.replicas(k.as_bytes())[0] != after.replicas(k.as_bytes())[0]
            })
            .count();
        // About 1/5 of the keys move to the new node, and only to it.
        assert!((1500..2500).contains(&moved), "{moved}");
    }

    #[test]
    fn every_key_of_a_bucket_has_the_buckets_replicas() {
        let r = ring(5, 3);
        for i in 0..20_000 {
            let k = format!("key-{i}");
            assert_eq!(
                r.replicas(k.as_bytes()),
                r.bucket_replicas(bucket_of(k.as_bytes()))
            );
        }
        // The edges: the first and last positions of the circle and of a bucket.
        for pos in [
            0u64,
            1,
            u64::MAX,
            1 << BUCKET_SHIFT,
            (1 << BUCKET_SHIFT) + 1,
        ] {
            assert_eq!(
                r.replicas_at(pos),
                r.bucket_replicas(bucket_of_position(pos))
            );
        }
    }

    #[test]
    fn shared_buckets_are_those_both_replicate() {
        let r = ring(4, 3);
        let (a, b) = ("10.0.0.0:8080", "10.0.0.1:8080");
        let shared = r.shared_buckets(a, b);
        assert!(!shared.is_empty() && shared.len() < BUCKETS);
        for bucket in 0..BUCKETS {
            let reps = r.bucket_replicas(bucket);
            assert_eq!(
                shared.contains(bucket),
                reps.contains(&a) && reps.contains(&b)
            );
        }
        // With as many replicas as nodes, every node replicates every bucket.
        assert_eq!(ring(3, 3).shared_buckets(a, b).len(), BUCKETS);
        let bytes = shared.to_bytes();
        assert_eq!(BucketSet::from_bytes(&bytes).unwrap(), shared);
        assert!(BucketSet::from_bytes(&bytes[1..]).is_none());
    }

    proptest! {
        #[test]
        fn every_key_has_rf_replicas(key: Vec<u8>, n in 1usize..8, rf in 1usize..5) {
            let r = ring(n, rf);
            prop_assert_eq!(r.replicas(&key).len(), rf.min(n));
        }
    }
}
