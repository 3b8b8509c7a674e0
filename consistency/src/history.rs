//! What a client did and saw: one [`Op`] per request, with its invocation and completion
//! times on one clock (nanoseconds since the run began).

use std::fmt;

/// What an operation does to its key's register. A Delete writes "absent".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Set (Some) or Delete (None).
    Write(Option<String>),
    /// Get, and what it returned (None: NOT_FOUND). Meaningless unless the outcome is Ok.
    Read(Option<String>),
}

/// How the client saw the operation end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged.
    Ok,
    /// Refused before it could take effect (INVALID_ARGUMENT, or UNAVAILABLE from a node whose
    /// failure detector had too few live replicas): it did not happen.
    Failed,
    /// Timed out, connection cut, or UNAVAILABLE after replicas were asked: it may have taken
    /// effect, at any point after its invocation, or not at all.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub client: u32,
    pub key: String,
    pub kind: Kind,
    pub invoked_ns: u64,
    /// When the answer came; for an unknown outcome, when the client gave up.
    pub completed_ns: u64,
    pub outcome: Outcome,
    /// The version the node answered with (a Set's, or the entry a Get returned), as
    /// (hybrid logical clock, node id).
    pub version: Option<(u64, u32)>,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<String>| match v {
            Some(v) => format!("{v:?}"),
            None => "absent".into(),
        };
        let what = match &self.kind {
            Kind::Write(v) => format!("write {}", show(v)),
            Kind::Read(v) => format!("read -> {}", show(v)),
        };
        let outcome = match self.outcome {
            Outcome::Ok => "",
            Outcome::Failed => " (failed)",
            Outcome::Unknown => " (unknown outcome)",
        };
        write!(
            f,
            "client {:>3} {:>10.3} ms .. {:>10.3} ms  {} {}{}",
            self.client,
            self.invoked_ns as f64 / 1e6,
            self.completed_ns as f64 / 1e6,
            self.key,
            what,
            outcome
        )?;
        match self.version {
            Some((hlc, node)) => write!(f, "  version {hlc}.{node}"),
            None => Ok(()),
        }
    }
}

/// Every operation of a run, in no particular order.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub ops: Vec<Op>,
}

impl History {
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// (operations, of which of unknown outcome).
    pub fn counts(&self) -> (usize, usize) {
        let unknown = self
            .ops
            .iter()
            .filter(|o| o.outcome == Outcome::Unknown)
            .count();
        (self.ops.len(), unknown)
    }
}
