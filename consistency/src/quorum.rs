//! QUORUM's promise (W + R > RF, last write wins by version): a read returns the newest of
//! what a read quorum holds, and every write acknowledged before the read began is on a write
//! quorum, which meets the read quorum. So no acknowledged read is older than a write
//! acknowledged before it was invoked. Weaker than linearizability: two reads concurrent with
//! one write may see new, then old (no write-back before answering).

use crate::history::{History, Kind, Op, Outcome};
use std::collections::HashMap;

/// A read that missed a write acknowledged before it began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleRead {
    pub read: Op,
    /// The newest write acknowledged before the read was invoked.
    pub missed: Op,
}

impl std::fmt::Display for StaleRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "stale read on {:?}:", self.read.key)?;
        writeln!(
            f,
            "  acknowledged: {} at {:?}",
            self.missed, self.missed.version
        )?;
        write!(
            f,
            "  then read:    {} at {:?}",
            self.read, self.read.version
        )
    }
}

/// Every acknowledged read older than a write (Set, with its version) acknowledged before the
/// read began. Reads of nothing count as older than any write.
pub fn stale_reads(history: &History) -> Vec<StaleRead> {
    let mut writes: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in &history.ops {
        if op.outcome == Outcome::Ok && matches!(op.kind, Kind::Write(Some(_))) {
            writes.entry(op.key.as_str()).or_default().push(op);
        }
    }
    let mut stale = Vec::new();
    for read in &history.ops {
        if read.outcome != Outcome::Ok || !matches!(read.kind, Kind::Read(_)) {
            continue;
        }
        let newest_before = writes
            .get(read.key.as_str())
            .into_iter()
            .flatten()
            .filter(|w| w.completed_ns < read.invoked_ns)
            .max_by_key(|w| w.version);
        if let Some(missed) = newest_before {
            if read.version < missed.version {
                stale.push(StaleRead {
                    read: read.clone(),
                    missed: (*missed).clone(),
                });
            }
        }
    }
    stale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: Kind, invoked: u64, completed: u64, version: Option<(u64, u32)>) -> Op {
        Op {
            client: 1,
            key: "k".into(),
            kind,
            invoked_ns: invoked,
            completed_ns: completed,
            outcome: Outcome::Ok,
            version,
        }
    }

    #[test]
    fn a_read_older_than_an_acknowledged_write_is_stale_and_a_concurrent_one_is_not() {
        let set = |v: &str, t, ver| op(Kind::Write(Some(v.into())), t, t + 1, Some((ver, 1)));
        let get = |v: Option<&str>, t, ver: Option<u64>| {
            op(Kind::Read(v.map(Into::into)), t, t + 1, ver.map(|h| (h, 1)))
        };
        let history = History {
            ops: vec![
                set("a", 0, 10),
                set("b", 10, 20),
                get(Some("b"), 20, Some(20)),
                get(Some("a"), 30, Some(10)), // stale: b was acknowledged at 11
                get(None, 40, None),          // stale: nothing, after two writes
            ],
        };
        let stale = stale_reads(&history);
        assert_eq!(stale.len(), 2);
        assert!(stale.iter().all(|s| s.missed.version == Some((20, 1))));
        assert!(stale[0].to_string().contains("stale read"));
        // A read that began before the write was acknowledged may miss it.
        let history = History {
            ops: vec![
                set("a", 0, 10),
                get(None, 0, None),
                set("b", 5, 20),
                get(Some("a"), 5, Some(10)),
            ],
        };
        assert!(stale_reads(&history).is_empty());
    }
}
