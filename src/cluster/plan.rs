//! Coordination as plans: what a client write or read does with its replicas, decided from
//! events (an answer, a failure, a timer) and nothing else. Pure: no I/O, no clock of their
//! own (`now` is passed in), so every path is unit-tested with a fake clock. The coordinator
//! ([`super::coordinator`]) drives them, on the core that owns the key: it performs the calls
//! a plan asks for through a [`super::transport::PeerTransport`], feeds the answers back and
//! acts on the outcome.
//!
//! Replicas are named by their index in the list the coordinator planned with (live ones in
//! asking order, see `Coordinator::rank`); a request waits on at most 64 of them
//! (REPLICATION_FACTOR is capped there, config.rs), one bit each.

use super::replication::{required, resolve, Level, Outcome, Tally, Versioned};
use crate::{engine::command::ReplicaEntry, error::Error};
use std::time::{Duration, Instant};

/// How often a request waiting on replicas, with none left to ask, looks again at the failure
/// detector's verdicts: a replica declared DOWN meanwhile fails the wait well before the
/// client's deadline.
pub const HEALTH_RECHECK: Duration = Duration::from_millis(100);

/// Whether a replica's answer counts toward `level`'s quorum. `found`: it held the key (a
/// write's acknowledgement always counts as found); `syncing`: the replica is still receiving
/// the key's bucket, or does not hold itself a replica of the key (see
/// `Coordinator::syncing`). At QUORUM and LINEARIZABLE a syncing replica never counts (what it
/// holds, a value or nothing, may be older than what a settled quorum acknowledged); it is
/// still heard, and read repaired. At ONE and ALL, which promise no intersection, only its "not
/// found" is no answer, so a read asks another replica rather than miss a key still on its way.
pub fn counts(level: Level, found: bool, syncing: bool) -> bool {
    match level {
        Level::Quorum | Level::Linearizable => !syncing,
        Level::One | Level::All => found || !syncing,
    }
}

/// How many must answer, or TooFewLive at once when the live replicas cannot make it: the
/// request is refused and made nowhere, as Cassandra's UnavailableException, a definite
/// failure the client may retry rather than a write that surfaces later through hints.
fn needed(level: Level, live: usize, down: usize, quorum: usize) -> Result<usize, Error> {
    let total = live + down;
    let needed = required(level, total, quorum);
    if live < needed {
        return Err(Error::TooFewLive {
            live,
            needed,
            total,
        });
    }
    Ok(needed)
}

/// A replica's answer to a write: (it held a live value, it is syncing), or a failure.
pub type WriteAnswer = Result<(bool, bool), ()>;

/// A write to every live replica, done once `needed` of them stored it.
#[derive(Debug)]
pub struct WritePlan {
    level: Level,
    needed: usize,
    total: usize,
    tally: Tally,
    /// Replicas asked and not answered yet.
    waiting: u64,
    existed: bool,
}

impl WritePlan {
    /// A write to `live` replicas (every one is asked at once) with `down` more that the
    /// failure detector holds DOWN (they get hints instead).
    pub fn new(level: Level, live: usize, down: usize, quorum: usize) -> Result<Self, Error> {
        let needed = needed(level, live, down, quorum)?;
        Ok(WritePlan {
            level,
            needed,
            total: live + down,
            tally: Tally::new(needed, live),
            waiting: if live >= 64 {
                u64::MAX
            } else {
                (1 << live) - 1
            },
            existed: false,
        })
    }

    /// Replica `i` answered. A replica no longer waited for (declared DOWN meanwhile) is not
    /// counted twice.
    pub fn answer(&mut self, i: usize, answer: WriteAnswer) {
        if self.waiting & (1 << i) == 0 {
            return;
        }
        self.waiting &= !(1 << i);
        match answer {
            Ok((existed, syncing)) => {
                self.existed |= existed;
                if counts(self.level, true, syncing) {
                    self.tally.ok();
                } else {
                    self.tally.fail();
                }
            }
            Err(()) => {
                self.tally.fail();
            }
        }
    }

    /// The outcome once decided: Ok(any replica had a live value) when enough stored it.
    pub fn outcome(&self) -> Option<Result<bool, Error>> {
        match self.tally.outcome() {
            Outcome::Reached => Some(Ok(self.existed)),
            Outcome::Impossible => Some(Err(Error::Unavailable {
                answered: self.tally.ok,
                needed: self.needed,
                total: self.total,
            })),
            Outcome::Pending => None,
        }
    }

    /// When the coordinator should call [`WritePlan::on_timer`] if no answer comes first.
    pub fn wake_at(&self, now: Instant, deadline: Instant) -> Instant {
        (now + HEALTH_RECHECK).min(deadline)
    }

    /// No answer came by the wake-up: past the deadline the write fails; otherwise the
    /// replicas now held DOWN are no longer waited for (their calls go on, and store a hint
    /// when they fail).
    pub fn on_timer(
        &mut self,
        now: Instant,
        deadline: Instant,
        is_down: impl Fn(usize) -> bool,
    ) -> Option<Result<bool, Error>> {
        if now >= deadline {
            return Some(Err(Error::DeadlineExceeded));
        }
        for i in bits(self.waiting) {
            if is_down(i) {
                self.answer(i, Err(()));
            }
        }
        self.outcome()
    }
}

/// A replica's answer to a read: (its entry, tombstones included, or none; it is syncing), or
/// a failure.
pub type ReadAnswer = Result<(Option<ReplicaEntry>, bool), ()>;

/// What a read decided, once it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// The newest entry among the answers, tombstones included.
    pub newest: Option<ReplicaEntry>,
    /// Whether a write quorum of the answers already held it: a LINEARIZABLE read then needs
    /// no write-back (the common case when no write is under way).
    pub settled: bool,
    /// Replicas that answered older or empty and get the newest entry (read repair).
    pub stale: Vec<usize>,
}

/// A read that asks only as many replicas as the level needs (quorum intersection needs no
/// more: a QUORUM read of RF=3 costs one remote call besides this node), and one more for each
/// that fails or is slower than its speculative delay.
#[derive(Debug)]
pub struct ReadPlan {
    level: Level,
    needed: usize,
    total: usize,
    replicas: usize,
    tally: Tally,
    asked: usize,
    waiting: u64,
    /// Asked replicas slower than their speculative delay: still heard if they answer, no
    /// longer counted on.
    written_off: u64,
    speculate_at: Vec<Option<Instant>>,
    /// (replica, its answer) for every replica that answered.
    answers: Vec<(usize, Option<ReplicaEntry>)>,
}

/// What the coordinator does next for a read.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStep {
    /// Ask replica `i` (and call [`ReadPlan::asked`] with its speculative deadline).
    Ask(usize),
    /// Wait for an answer until this instant, then call [`ReadPlan::on_timer`].
    Wait(Instant),
    Done(Result<(), Error>),
}

impl ReadPlan {
    pub fn new(level: Level, live: usize, down: usize, quorum: usize) -> Result<Self, Error> {
        let needed = needed(level, live, down, quorum)?;
        Ok(ReadPlan {
            level,
            needed,
            total: live + down,
            replicas: live,
            tally: Tally::new(needed, live),
            asked: 0,
            waiting: 0,
            written_off: 0,
            speculate_at: vec![None; live],
            answers: Vec::with_capacity(live),
        })
    }

    fn hopeful(&self) -> u64 {
        self.waiting & !self.written_off
    }

    fn unavailable(&self) -> Error {
        Error::Unavailable {
            answered: self.tally.ok,
            needed: self.needed,
            total: self.total,
        }
    }

    /// The next thing to do, at `now`.
    pub fn next(&mut self, now: Instant, deadline: Instant) -> ReadStep {
        if self.asked < self.replicas
            && self.tally.ok + (self.hopeful().count_ones() as usize) < self.needed
        {
            let i = self.asked;
            self.asked += 1;
            return ReadStep::Ask(i);
        }
        match self.tally.outcome() {
            Outcome::Reached => return ReadStep::Done(Ok(())),
            Outcome::Impossible => return ReadStep::Done(Err(self.unavailable())),
            Outcome::Pending => {}
        }
        if self.waiting == 0 {
            // Everyone was asked and nobody is left to answer.
            return ReadStep::Done(Err(self.unavailable()));
        }
        // With a spare replica, wake for the next speculative delay; with none, in slices, so
        // that a replica declared DOWN meanwhile stops holding the read.
        let spare = self.asked < self.replicas;
        let next_speculation = bits(self.hopeful())
            .filter_map(|i| self.speculate_at[i])
            .min()
            .filter(|_| spare);
        ReadStep::Wait(
            next_speculation
                .unwrap_or(now + HEALTH_RECHECK)
                .min(deadline),
        )
    }

    /// Replica `i` was asked; past `speculate_at` another replica is asked in its stead.
    pub fn asked(&mut self, i: usize, speculate_at: Option<Instant>) {
        self.waiting |= 1 << i;
        self.speculate_at[i] = speculate_at;
    }

    /// Replica `i` answered. Returns false for an answer no longer waited for.
    pub fn answer(&mut self, i: usize, answer: ReadAnswer) -> bool {
        if self.waiting & (1 << i) == 0 {
            return false;
        }
        self.waiting &= !(1 << i);
        self.written_off &= !(1 << i);
        match answer {
            Ok((entry, syncing)) => {
                if counts(self.level, entry.is_some(), syncing) {
                    self.tally.ok();
                } else {
                    self.tally.fail();
                }
                self.answers.push((i, entry));
            }
            Err(()) => {
                self.tally.fail();
            }
        }
        true
    }

    /// No answer came by the wake-up. Past the deadline the read fails. Otherwise replicas
    /// past their speculative delay are written off (so the next step asks one more for each;
    /// they may still answer and count) and the ones now held DOWN are no longer waited for.
    /// Returns how many were written off (speculative retries).
    pub fn on_timer(
        &mut self,
        now: Instant,
        deadline: Instant,
        is_down: impl Fn(usize) -> bool,
    ) -> Result<u64, Error> {
        if now >= deadline {
            return Err(Error::DeadlineExceeded);
        }
        let spare = self.asked < self.replicas;
        let mut retries = 0;
        for i in bits(self.hopeful()) {
            if spare && self.speculate_at[i].is_some_and(|at| now >= at) {
                self.written_off |= 1 << i;
                retries += 1;
            }
        }
        for i in bits(self.waiting) {
            if is_down(i) {
                self.waiting &= !(1 << i);
                self.tally.fail();
            }
        }
        self.written_off &= self.waiting;
        Ok(retries)
    }

    /// What the answers decided: the newest entry, whether a write quorum already holds it,
    /// and who needs repair.
    pub fn learned(&self, write_quorum: usize) -> Learned {
        let entries: Vec<Option<&ReplicaEntry>> =
            self.answers.iter().map(|(_, e)| e.as_ref()).collect();
        let Some((winner, stale)) = resolve(&entries) else {
            // Nobody had it; replicas that answer later cannot hold anything newer than what
            // a quorum lacked.
            return Learned {
                newest: None,
                settled: true,
                stale: Vec::new(),
            };
        };
        let holders = self.answers.len() - stale.len();
        Learned {
            newest: self.answers[winner].1.clone(),
            settled: holders >= required(Level::Linearizable, self.total, write_quorum),
            stale: stale.into_iter().map(|a| self.answers[a].0).collect(),
        }
    }
}

impl Versioned for &ReplicaEntry {
    fn version(&self) -> crate::engine::hlc::Version {
        self.version
    }
}

/// Whether a replica that answered after the read was decided needs the read's newest entry.
pub fn late_answer_is_stale(answer: &ReadAnswer, newest: &ReplicaEntry) -> bool {
    match answer {
        Ok((Some(e), _)) => e.version < newest.version,
        Ok((None, _)) => true,
        Err(()) => false,
    }
}

/// The indices of the set bits of `set`, lowest first.
fn bits(mut set: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if set == 0 {
            return None;
        }
        let i = set.trailing_zeros() as usize;
        set &= set - 1;
        Some(i)
    })
}

#[cfg(test)]
mod tests;
