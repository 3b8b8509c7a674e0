//! Hybrid logical clock: versions that follow wall time but never go backwards and never
//! repeat on one clock. Each core owns its clock (a key is only ever versioned by the core that
//! owns its shard), so no clock is shared between threads.

/// A version: HLC timestamp, then the issuing node as tie-breaker. Ordered by (hlc, node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    /// Physical microseconds since the Unix epoch << 12 | a logical counter.
    pub hlc: u64,
    pub node: u32,
}

/// Microseconds, not milliseconds, in the physical part: QUORUM orders two coordinators'
/// writes to one key by their clocks alone, and a write acknowledged before another began is
/// at least a network round trip (tens of microseconds) older. In one millisecond both could
/// draw the same physical part and be ordered by logical counters and node ids instead, which
/// can lose the later write (a stale QUORUM read). 12 logical bits still give 4096 versions per
/// microsecond per core, and 52 physical bits last until 2112. Cassandra's timestamps are
/// microseconds for the same reason.
pub const LOGICAL_BITS: u32 = 12;

/// One core's clock.
#[derive(Debug, Clone)]
pub struct Hlc {
    last: u64,
    node: u32,
}

impl Hlc {
    pub fn new(node: u32) -> Self {
        Self { last: 0, node }
    }

    /// The next version at wall time `wall_us`. Strictly greater than every version this
    /// clock issued or observed before; when the wall clock stalls or steps back, the logical
    /// counter advances (and carries into the physical part if it ever overflows).
    pub fn tick(&mut self, wall_us: u64) -> Version {
        let physical = wall_us << LOGICAL_BITS;
        self.last = physical.max(self.last + 1);
        Version {
            hlc: self.last,
            node: self.node,
        }
    }

    /// Merges a version seen from elsewhere, so later ticks order after it.
    pub fn observe(&mut self, seen: Version) {
        self.last = self.last.max(seen.hlc);
    }
}

/// Microseconds since the Unix epoch, by the system clock.
pub fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn follows_wall_time() {
        let mut c = Hlc::new(7);
        let v = c.tick(1_000);
        assert_eq!(v.hlc >> LOGICAL_BITS, 1_000);
        assert_eq!(v.node, 7);
        assert_eq!(c.tick(2_000).hlc, 2_000 << LOGICAL_BITS);
    }

    #[test]
    fn wall_clock_going_back_still_advances() {
        let mut c = Hlc::new(1);
        let a = c.tick(5_000);
        let b = c.tick(4_000);
        let d = c.tick(5_000);
        assert!(a < b && b < d);
        assert_eq!(
            b.hlc >> LOGICAL_BITS,
            5_000,
            "physical part does not go back"
        );
    }

    #[test]
    fn observe_orders_later_ticks_after() {
        let mut c = Hlc::new(1);
        let remote = Version {
            hlc: 9_000 << LOGICAL_BITS,
            node: 2,
        };
        c.observe(remote);
        assert!(c.tick(1_000) > remote);
    }

    #[test]
    fn node_breaks_ties() {
        let a = Version { hlc: 5, node: 1 };
        let b = Version { hlc: 5, node: 2 };
        assert!(a < b);
    }

    proptest! {
        #[test]
        fn strictly_monotonic(walls in proptest::collection::vec(0u64..1u64 << 52, 1..200)) {
            let mut c = Hlc::new(3);
            let mut prev = Version::default();
            for w in walls {
                let v = c.tick(w);
                prop_assert!(v > prev);
                prev = v;
            }
        }
    }
}
