//! Quorum logic, pure: how many replicas a request needs, when a set of answers decides it,
//! and which answer wins a read and which replicas need repair. The plans ([`super::plan`])
//! feed it answers as they arrive, on the core that coordinates the request.

use crate::engine::hlc::Version;

/// Consistency level of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    One,
    Quorum,
    All,
    /// Quorum reads and writes with an extra round each (ABD): a majority at least, whatever
    /// WRITE_QUORUM and READ_QUORUM say, so that every read quorum meets every write quorum.
    Linearizable,
}

/// Replicas that must answer for `level`, given `rf` replicas and the configured quorum
/// (capped at `rf`: a cluster smaller than REPLICATION_FACTOR still works).
pub fn required(level: Level, rf: usize, quorum: usize) -> usize {
    match level {
        Level::One => 1,
        Level::Quorum => quorum.min(rf).max(1),
        Level::All => rf.max(1),
        Level::Linearizable => quorum.max(majority(rf)).min(rf).max(1),
    }
}

/// The default quorum: a majority of the replication factor.
pub fn majority(rf: usize) -> usize {
    rf / 2 + 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    /// Enough replicas succeeded.
    Reached,
    /// Too many failed for the rest to make up the quorum.
    Impossible,
}

/// Counts answers towards a quorum.
#[derive(Debug, Clone)]
pub struct Tally {
    pub needed: usize,
    pub total: usize,
    pub ok: usize,
    pub failed: usize,
}

impl Tally {
    pub fn new(needed: usize, total: usize) -> Self {
        Self {
            needed,
            total,
            ok: 0,
            failed: 0,
        }
    }

    pub fn outcome(&self) -> Outcome {
        if self.ok >= self.needed {
            Outcome::Reached
        } else if self.total - self.failed < self.needed {
            Outcome::Impossible
        } else {
            Outcome::Pending
        }
    }

    pub fn ok(&mut self) -> Outcome {
        self.ok += 1;
        self.outcome()
    }

    pub fn fail(&mut self) -> Outcome {
        self.failed += 1;
        self.outcome()
    }
}

/// One replica's answer to a read: its entry's version, if it had one (tombstones included).
pub trait Versioned {
    fn version(&self) -> Version;
}

/// The newest of the answers, and the indices of the answers that are older or missing and
/// should be repaired with it. `None` when no replica had the key at all.
pub fn resolve<T: Versioned>(answers: &[Option<T>]) -> Option<(usize, Vec<usize>)> {
    let (winner, newest) = answers
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.as_ref().map(|e| (i, e.version())))
        // Among equal versions, the first answer wins (max_by keeps the last, so the index
        // comparison is reversed).
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))?;
    let stale = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| a.as_ref().map(|e| e.version() < newest).unwrap_or(true))
        .map(|(i, _)| i)
        .collect();
    Some((winner, stale))
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Versioned for Version {
        fn version(&self) -> Version {
            *self
        }
    }

    fn v(hlc: u64, node: u32) -> Version {
        Version { hlc, node }
    }

    #[test]
    fn required_counts() {
        assert_eq!(majority(3), 2);
        assert_eq!(majority(5), 3);
        assert_eq!(majority(1), 1);
        assert_eq!(required(Level::Quorum, 3, 2), 2);
        assert_eq!(
            required(Level::Quorum, 1, 2),
            1,
            "capped by a small cluster"
        );
        assert_eq!(required(Level::One, 3, 2), 1);
        assert_eq!(required(Level::All, 3, 2), 3);
        assert_eq!(required(Level::Linearizable, 3, 2), 2);
        assert_eq!(
            required(Level::Linearizable, 3, 1),
            2,
            "never less than a majority"
        );
        assert_eq!(required(Level::Linearizable, 5, 4), 4);
    }

    #[test]
    fn tally_decides_as_soon_as_it_can() {
        let mut t = Tally::new(2, 3);
        assert_eq!(t.ok(), Outcome::Pending);
        assert_eq!(t.fail(), Outcome::Pending);
        assert_eq!(t.ok(), Outcome::Reached);
        let mut t = Tally::new(2, 3);
        assert_eq!(t.fail(), Outcome::Pending);
        assert_eq!(t.fail(), Outcome::Impossible);
        let mut t = Tally::new(3, 3);
        assert_eq!(t.fail(), Outcome::Impossible);
    }

    #[test]
    fn newest_wins_and_the_rest_are_repaired() {
        let answers = [Some(v(5, 1)), None, Some(v(7, 2)), Some(v(7, 2))];
        let (winner, stale) = resolve(&answers).unwrap();
        assert_eq!(winner, 2);
        assert_eq!(stale, vec![0, 1]);
        // Node id breaks hlc ties.
        let (winner, stale) = resolve(&[Some(v(7, 3)), Some(v(7, 2))]).unwrap();
        assert_eq!((winner, stale), (0, vec![1]));
        assert!(resolve::<Version>(&[None, None]).is_none());
    }
}
