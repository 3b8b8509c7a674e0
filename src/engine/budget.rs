//! How a memory budget (or an entry cap) is divided among parts that each evict on their own:
//! the node's among its cores, a core's share among its shards. Pure arithmetic, run by the
//! control plane for cores and by each core for its shards.
//!
//! The rule, each round: every part keeps what it uses less a small tax (1/32); the tax and
//! whatever nobody uses go back out in proportion to each part's weight, which is what it had
//! to evict to take new entries since the last round plus a share of what it holds. A part that
//! keeps evicting grows, and the parts that did not shrink by at most the tax per round, so
//! memory follows the writes while the total handed out is exactly the budget. Parts with no
//! pressure keep what they hold: nothing is evicted to move budget nobody asked for.

use super::shard::Policy;

/// What the node may hold, as configured (`MAX_MEMORY`, `CAPACITY`, `EVICTION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub max_bytes: u64,
    pub max_entries: Option<u64>,
    pub policy: Policy,
}

/// One part, as a round sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// What the part holds now (bytes or entries).
    pub used: u64,
    /// What it evicted to make room for new entries since the last round.
    pub wanted: u64,
}

/// Divides `total` over `parts`; the shares sum to `total` exactly.
pub fn divide(total: u64, parts: &[Demand]) -> Vec<u64> {
    let n = parts.len() as u64;
    if n == 0 {
        return Vec::new();
    }
    let mut shares: Vec<u64> = parts.iter().map(|p| p.used - p.used / 32).collect();
    let kept: u128 = shares.iter().map(|&s| s as u128).sum();
    if kept > total as u128 {
        // Over budget (a part took an entry larger than its share): everyone gives back in
        // proportion.
        for s in &mut shares {
            *s = (*s as u128 * total as u128 / kept) as u64;
        }
    }
    let pool = total - shares.iter().sum::<u64>();
    let floor = (total / n / 1024).max(1);
    let weights: Vec<u128> = parts
        .iter()
        .map(|p| p.wanted as u128 + (p.used / 32) as u128 + floor as u128)
        .collect();
    let all: u128 = weights.iter().sum();
    let mut given = 0;
    for (s, w) in shares.iter_mut().zip(&weights) {
        let g = (pool as u128 * w / all) as u64;
        *s += g;
        given += g;
    }
    let heaviest = (0..parts.len())
        .max_by_key(|&i| weights[i])
        .expect("at least one part");
    shares[heaviest] += pool - given;
    shares
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(used: u64, wanted: u64) -> Demand {
        Demand { used, wanted }
    }

    #[test]
    fn an_idle_node_splits_evenly_and_stays_put() {
        assert_eq!(divide(1000, &[d(0, 0), d(0, 0)]), vec![500, 500]);
        // Full, nobody evicting: everyone keeps exactly what it holds.
        assert_eq!(divide(1000, &[d(500, 0), d(500, 0)]), vec![500, 500]);
    }

    #[test]
    fn budget_follows_the_part_that_evicts() {
        let total = 1 << 30;
        let mut shares = divide(total, &[d(0, 0), d(0, 0)]);
        // Part 0 gets every write: it fills its share and evicts; part 1 holds little.
        for _ in 0..200 {
            let parts = [d(shares[0], 1 << 20), d(1 << 20, 0)];
            shares = divide(total, &parts);
            assert_eq!(shares.iter().sum::<u64>(), total);
        }
        assert!(
            shares[0] > total - (4 << 20),
            "the busy part has nearly all: {shares:?}"
        );
        assert!(shares[1] >= 1 << 20, "the other keeps what it holds");
    }

    #[test]
    fn a_part_over_its_share_brings_the_total_back() {
        // Part 1 took an entry larger than its share.
        let shares = divide(1000, &[d(600, 0), d(700, 50)]);
        assert_eq!(shares.iter().sum::<u64>(), 1000);
        assert!(shares[0] < 600 && shares[1] < 700);
    }

    proptest! {
        #[test]
        fn shares_always_sum_to_the_total(
            total in 1u64..u64::MAX / 4,
            parts in proptest::collection::vec((0u64..1 << 40, 0u64..1 << 30), 1..64),
        ) {
            let parts: Vec<_> = parts.into_iter().map(|(u, w)| d(u, w)).collect();
            let shares = divide(total, &parts);
            prop_assert_eq!(shares.len(), parts.len());
            prop_assert_eq!(shares.iter().map(|&s| s as u128).sum::<u128>(), total as u128);
        }
    }
}
