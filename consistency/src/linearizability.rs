//! Is a history linearizable, as a register per key? Wing & Gong's search over the orders in
//! which operations may have taken effect, with Lowe's memoisation of (operations placed,
//! register value) states already explored, partitioned by key (registers are independent,
//! so a history is linearizable exactly when every key's is: Herlihy & Wing's locality).
//!
//! An operation may be placed next when no unplaced operation completed before it was
//! invoked. An operation of unknown outcome completed at infinity: it may take effect at any
//! point after its invocation, and it need not take effect at all; a read of unknown outcome
//! says nothing and is left out, as is any failed operation.

use crate::history::{History, Kind, Op, Outcome};
use std::collections::{HashMap, HashSet};
use std::fmt;

/// States explored per key before the checker gives up (the search is exponential in the
/// number of concurrent operations in the worst case).
pub const MAX_STATES: usize = 2_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// At least one key's history is not; a report per such key.
    NotLinearizable(Vec<Report>),
    /// A key's search exceeded MAX_STATES.
    Undecided {
        key: String,
    },
}

/// Why one key's history is not linearizable: the longest order found that explains a
/// prefix of it, the operation no order could place next, and the operations whose windows
/// overlap around it: the shortest window that shows the anomaly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub key: String,
    /// Operations placed, in order, in the deepest state the search reached.
    pub placed: Vec<Op>,
    /// The acknowledged operation that could not be placed.
    pub stuck: Op,
    /// Operations overlapping the stuck one's window, by invocation.
    pub window: Vec<Op>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "key {:?} is not linearizable.", self.key)?;
        if let Some(last_write) = self
            .placed
            .iter()
            .rev()
            .find(|o| matches!(o.kind, Kind::Write(_)))
        {
            writeln!(f, "  the register was last set by:  {last_write}")?;
        }
        writeln!(f, "  no order explains:             {}", self.stuck)?;
        writeln!(f, "  operations around it:")?;
        for op in &self.window {
            let mark = if *op == self.stuck { ">" } else { " " };
            writeln!(f, "  {mark} {op}")?;
        }
        Ok(())
    }
}

/// Checks `history`, key by key.
pub fn check(history: &History) -> Verdict {
    let mut by_key: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in &history.ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut keys: Vec<&str> = by_key.keys().copied().collect();
    keys.sort_unstable();
    let mut reports = Vec::new();
    for key in keys {
        match check_key(&by_key[key]) {
            KeyVerdict::Ok => {}
            KeyVerdict::Fails(report) => reports.push(report),
            KeyVerdict::Undecided => {
                return Verdict::Undecided {
                    key: key.to_string(),
                }
            }
        }
    }
    if reports.is_empty() {
        Verdict::Linearizable
    } else {
        Verdict::NotLinearizable(reports)
    }
}

enum KeyVerdict {
    Ok,
    Fails(Report),
    Undecided,
}

/// One operation as the search sees it: values interned (0 = absent).
#[derive(Clone, Copy)]
struct Entry {
    write: bool,
    value: u32,
    invoked: u64,
    /// u64::MAX for an unknown outcome.
    completed: u64,
    required: bool,
}

fn check_key(ops: &[&Op]) -> KeyVerdict {
    let mut kept: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| {
            !matches!(
                (o.outcome, &o.kind),
                (Outcome::Failed, _) | (Outcome::Unknown, Kind::Read(_))
            )
        })
        .collect();
    kept.sort_by_key(|o| (o.invoked_ns, o.completed_ns));
    let mut values: HashMap<String, u32> = HashMap::new();
    let mut intern = |v: &Option<String>| -> u32 {
        match v {
            None => 0,
            Some(v) => {
                let next = values.len() as u32 + 1;
                *values.entry(v.clone()).or_insert(next)
            }
        }
    };
    let entries: Vec<Entry> = kept
        .iter()
        .map(|o| {
            let (write, value) = match &o.kind {
                Kind::Write(v) => (true, intern(v)),
                Kind::Read(v) => (false, intern(v)),
            };
            let unknown = o.outcome == Outcome::Unknown;
            Entry {
                write,
                value,
                invoked: o.invoked_ns,
                completed: if unknown { u64::MAX } else { o.completed_ns },
                required: !unknown,
            }
        })
        .collect();
    let n = entries.len();
    let required = entries.iter().filter(|e| e.required).count();
    let words = n.div_ceil(64).max(1);

    // Depth-first over (placed set, value), each explored once.
    let mut seen: HashSet<(Vec<u64>, u32)> = HashSet::new();
    // A frame: the placed set, the register's value, the order so far, the next candidate
    // index to try.
    struct Frame {
        placed: Vec<u64>,
        value: u32,
        order: Vec<usize>,
        next: usize,
        done: usize,
    }
    let mut stack = vec![Frame {
        placed: vec![0; words],
        value: 0,
        order: Vec::new(),
        next: 0,
        done: 0,
    }];
    let mut deepest: (usize, Vec<usize>, Vec<u64>) = (0, Vec::new(), vec![0; words]);
    let is_placed = |set: &[u64], i: usize| set[i / 64] & (1 << (i % 64)) != 0;
    while let Some(frame) = stack.last_mut() {
        if frame.done == required {
            return KeyVerdict::Ok;
        }
        if frame.done > deepest.0 {
            deepest = (frame.done, frame.order.clone(), frame.placed.clone());
        }
        // Nothing unplaced may have completed before a candidate was invoked.
        let horizon = (0..n)
            .filter(|&i| !is_placed(&frame.placed, i))
            .map(|i| entries[i].completed)
            .min()
            .unwrap_or(u64::MAX);
        let mut child = None;
        while frame.next < n {
            let i = frame.next;
            frame.next += 1;
            let e = entries[i];
            if is_placed(&frame.placed, i) || e.invoked > horizon {
                continue;
            }
            if !e.write && e.value != frame.value {
                continue;
            }
            let mut placed = frame.placed.clone();
            placed[i / 64] |= 1 << (i % 64);
            let value = if e.write { e.value } else { frame.value };
            if !seen.insert((placed.clone(), value)) {
                continue;
            }
            if seen.len() > MAX_STATES {
                return KeyVerdict::Undecided;
            }
            let mut order = frame.order.clone();
            order.push(i);
            child = Some(Frame {
                placed,
                value,
                order,
                next: 0,
                done: frame.done + e.required as usize,
            });
            break;
        }
        match child {
            Some(c) => stack.push(c),
            None => {
                stack.pop();
            }
        }
    }
    KeyVerdict::Fails(report(&kept, &entries, deepest.1, &deepest.2))
}

fn report(kept: &[&Op], entries: &[Entry], order: Vec<usize>, placed: &[u64]) -> Report {
    let is_placed = |i: usize| placed[i / 64] & (1 << (i % 64)) != 0;
    // The acknowledged operation that had to come next: the unplaced one that completed first.
    let stuck = (0..entries.len())
        .filter(|&i| !is_placed(i) && entries[i].required)
        .min_by_key(|&i| entries[i].completed)
        .expect("a failing search leaves a required operation unplaced");
    let start = (0..entries.len())
        .filter(|&i| !is_placed(i))
        .map(|i| entries[i].invoked)
        .min()
        .unwrap_or(0)
        .min(order.last().map_or(0, |&i| entries[i].invoked));
    let end = entries[stuck].completed;
    let window = kept
        .iter()
        .enumerate()
        .filter(|(i, o)| o.invoked_ns <= end && entries[*i].completed >= start)
        .map(|(_, o)| (*o).clone())
        .collect();
    Report {
        key: kept[stuck].key.clone(),
        placed: order.iter().map(|&i| kept[i].clone()).collect(),
        stuck: kept[stuck].clone(),
        window,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u32, kind: Kind, invoked_ms: u64, completed_ms: u64, outcome: Outcome) -> Op {
        Op {
            client,
            key: "k".into(),
            kind,
            invoked_ns: invoked_ms * 1_000_000,
            completed_ns: completed_ms * 1_000_000,
            outcome,
            version: None,
        }
    }

    fn w(v: &str) -> Kind {
        Kind::Write(Some(v.into()))
    }

    fn r(v: Option<&str>) -> Kind {
        Kind::Read(v.map(Into::into))
    }

    fn verdict(ops: Vec<Op>) -> Verdict {
        check(&History { ops })
    }

    fn fails(ops: Vec<Op>) -> Report {
        match verdict(ops) {
            Verdict::NotLinearizable(mut reports) => {
                assert_eq!(reports.len(), 1);
                reports.remove(0)
            }
            other => panic!("expected not linearizable, got {other:?}"),
        }
    }

    use Outcome::{Failed, Ok as Acked, Unknown};

    #[test]
    fn sequential_and_concurrent_histories_that_are_linearizable() {
        assert_eq!(verdict(vec![]), Verdict::Linearizable);
        assert_eq!(
            verdict(vec![
                op(1, r(None), 0, 1, Acked),
                op(1, w("a"), 2, 3, Acked),
                op(2, r(Some("a")), 4, 5, Acked),
                op(1, Kind::Write(None), 6, 7, Acked),
                op(2, r(None), 8, 9, Acked),
            ]),
            Verdict::Linearizable
        );
        // A read concurrent with a write may see either value, and two concurrent reads may
        // see the old and the new one in either order as long as an order exists.
        assert_eq!(
            verdict(vec![
                op(1, w("a"), 0, 1, Acked),
                op(1, w("b"), 2, 10, Acked),
                op(2, r(Some("b")), 3, 4, Acked),
                op(3, r(Some("a")), 3, 5, Acked),
            ]),
            Verdict::Linearizable
        );
    }

    #[test]
    fn the_classic_stale_read_is_caught() {
        let report = fails(vec![
            op(1, w("a"), 0, 1, Acked),
            op(1, w("b"), 2, 3, Acked),
            op(2, r(Some("a")), 4, 5, Acked),
        ]);
        assert_eq!(report.stuck.kind, r(Some("a")));
        let text = report.to_string();
        assert!(
            text.contains("last set by") && text.contains("\"b\""),
            "{text}"
        );
        assert!(text.contains("> client   2"), "{text}");
    }

    #[test]
    fn a_lost_write_is_caught() {
        // Acknowledged, and then every later read sees the value before it.
        let report = fails(vec![
            op(1, w("a"), 0, 1, Acked),
            op(2, w("b"), 2, 3, Acked),
            op(3, r(Some("a")), 4, 5, Acked),
            op(3, r(Some("a")), 6, 7, Acked),
        ]);
        assert_eq!(report.stuck.invoked_ns, 4_000_000);
    }

    #[test]
    fn a_read_of_a_value_never_written_is_caught() {
        let report = fails(vec![
            op(1, w("a"), 0, 1, Acked),
            op(2, r(Some("zombie")), 2, 3, Acked),
        ]);
        assert_eq!(report.stuck.kind, r(Some("zombie")));
    }

    #[test]
    fn unknown_outcomes_may_take_effect_late_or_never() {
        // A timed-out write that shows up long after its client gave up.
        assert_eq!(
            verdict(vec![
                op(1, w("a"), 0, 1, Acked),
                op(2, w("b"), 2, 3, Unknown),
                op(3, r(Some("a")), 10, 11, Acked),
                op(3, r(Some("b")), 20, 21, Acked),
            ]),
            Verdict::Linearizable
        );
        // ... or never.
        assert_eq!(
            verdict(vec![
                op(1, w("a"), 0, 1, Acked),
                op(2, w("b"), 2, 3, Unknown),
                op(3, r(Some("a")), 10, 11, Acked),
            ]),
            Verdict::Linearizable
        );
        // But not before it was invoked, and not twice.
        fails(vec![
            op(3, r(Some("b")), 0, 1, Acked),
            op(2, w("b"), 2, 3, Unknown),
        ]);
        fails(vec![
            op(1, w("a"), 0, 1, Acked),
            op(2, w("b"), 2, 3, Unknown),
            op(3, r(Some("b")), 10, 11, Acked),
            op(1, w("c"), 12, 13, Acked),
            op(3, r(Some("b")), 14, 15, Acked),
        ]);
    }

    #[test]
    fn failed_operations_and_unknown_reads_carry_nothing() {
        assert_eq!(
            verdict(vec![
                op(1, w("a"), 0, 1, Acked),
                op(2, w("b"), 2, 3, Failed),
                op(3, r(Some("zzz")), 4, 5, Unknown),
                op(3, r(Some("a")), 6, 7, Acked),
            ]),
            Verdict::Linearizable
        );
        fails(vec![
            op(1, w("a"), 0, 1, Acked),
            op(2, w("b"), 2, 3, Failed),
            op(3, r(Some("b")), 4, 5, Acked),
        ]);
    }

    #[test]
    fn keys_are_checked_apart_and_only_the_bad_one_is_reported() {
        let mut ops = vec![
            op(1, w("a"), 0, 1, Acked),
            op(1, w("b"), 2, 3, Acked),
            op(2, r(Some("a")), 4, 5, Acked),
        ];
        for (i, o) in ops.iter_mut().enumerate() {
            o.key = if i < 2 { "x".into() } else { "y".into() };
        }
        // On "y", a read of "a" with no write: not linearizable; "x" alone is fine.
        match verdict(ops) {
            Verdict::NotLinearizable(reports) => {
                assert_eq!(reports.len(), 1);
                assert_eq!(reports[0].key, "y");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn many_concurrent_clients_stay_tractable() {
        // 12 clients, 30 rounds each of a write and a read overlapping every other client's:
        // the memoisation keeps this to a fraction of MAX_STATES.
        let mut ops = vec![];
        for round in 0..30u64 {
            let t = round * 10;
            for c in 0..12u32 {
                ops.push(op(c, w(&format!("{round}-{c}")), t, t + 5, Acked));
            }
            for c in 0..12u32 {
                ops.push(op(c, r(Some(&format!("{round}-11"))), t + 6, t + 7, Acked));
            }
        }
        assert_eq!(verdict(ops), Verdict::Linearizable);
    }
}
