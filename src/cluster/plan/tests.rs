//! The plans against scripted answers and a fake clock: every path of a quorum write and a
//! quorum read, with no network and no sleep: plain unit tests, on the test harness's thread.

use super::*;
use crate::engine::hlc::Version;

const MS: Duration = Duration::from_millis(1);

fn entry(hlc: u64) -> ReplicaEntry {
    ReplicaEntry {
        key: b"k".to_vec(),
        value: format!("v{hlc}").into_bytes(),
        version: Version { hlc, node: 1 },
        ttl_ms: 0,
        flags: 0,
    }
}

fn found(hlc: u64) -> ReadAnswer {
    Ok((Some(entry(hlc)), false))
}

const NOT_FOUND: ReadAnswer = Ok((None, false));
const SYNCING_NOT_FOUND: ReadAnswer = Ok((None, true));
const STORED: WriteAnswer = Ok((false, false));

/// Runs `plan` until it waits or is done, answering replica asks from `now_answers` (an
/// answer given at once, as this node's own shard gives) and recording the others as asked
/// with the speculative deadline `speculate`. Returns the step it stopped at and who it asked.
fn run_asks(
    plan: &mut ReadPlan,
    now: Instant,
    deadline: Instant,
    now_answers: &mut dyn FnMut(usize) -> Option<ReadAnswer>,
    speculate: Option<Instant>,
) -> (ReadStep, Vec<usize>) {
    let mut asked = Vec::new();
    loop {
        match plan.next(now, deadline) {
            ReadStep::Ask(i) => {
                asked.push(i);
                plan.asked(i, speculate);
                if let Some(a) = now_answers(i) {
                    plan.answer(i, a);
                }
            }
            step => return (step, asked),
        }
    }
}

#[test]
fn a_write_quorum_met_late_succeeds_and_reports_an_existing_value() {
    let t = Instant::now();
    let mut plan = WritePlan::new(Level::Quorum, 3, 0, 2).unwrap();
    plan.answer(0, STORED);
    assert_eq!(plan.outcome(), None);
    plan.answer(1, Err(()));
    assert_eq!(
        plan.outcome(),
        None,
        "one failure leaves two that can make it"
    );
    assert_eq!(plan.wake_at(t, t + 2000 * MS), t + HEALTH_RECHECK);
    assert_eq!(plan.on_timer(t + 100 * MS, t + 2000 * MS, |_| false), None);
    plan.answer(2, Ok((true, false)));
    assert_eq!(plan.outcome(), Some(Ok(true)));
}

#[test]
fn a_write_fails_when_the_rest_cannot_make_the_quorum() {
    let mut plan = WritePlan::new(Level::Quorum, 3, 0, 2).unwrap();
    plan.answer(1, Err(()));
    plan.answer(2, Err(()));
    assert_eq!(
        plan.outcome(),
        Some(Err(Error::Unavailable {
            answered: 0,
            needed: 2,
            total: 3
        }))
    );
}

#[test]
fn a_write_is_refused_before_any_call_when_too_few_are_live() {
    assert_eq!(
        WritePlan::new(Level::Quorum, 1, 2, 2).unwrap_err(),
        Error::TooFewLive {
            live: 1,
            needed: 2,
            total: 3
        }
    );
    assert!(WritePlan::new(Level::One, 1, 2, 2).is_ok());
}

#[test]
fn a_syncing_replicas_ack_counts_at_one_but_not_at_quorum() {
    let mut quorum = WritePlan::new(Level::Quorum, 3, 0, 2).unwrap();
    quorum.answer(0, STORED);
    quorum.answer(1, Ok((false, true)));
    assert_eq!(quorum.outcome(), None);
    quorum.answer(2, STORED);
    assert_eq!(quorum.outcome(), Some(Ok(false)));

    let mut one = WritePlan::new(Level::One, 3, 0, 2).unwrap();
    one.answer(1, Ok((false, true)));
    assert_eq!(one.outcome(), Some(Ok(false)));
}

#[test]
fn a_replica_declared_down_while_waited_for_fails_the_write_before_its_deadline() {
    let t = Instant::now();
    let deadline = t + 2000 * MS;
    let mut plan = WritePlan::new(Level::All, 3, 0, 2).unwrap();
    plan.answer(0, STORED);
    plan.answer(1, STORED);
    assert_eq!(plan.on_timer(t + 100 * MS, deadline, |_| false), None);
    assert!(matches!(
        plan.on_timer(t + 200 * MS, deadline, |i| i == 2),
        Some(Err(Error::Unavailable { answered: 2, .. }))
    ));
    // Its late answer is not counted a second time.
    plan.answer(2, STORED);
    assert!(matches!(plan.outcome(), Some(Err(_))));
}

#[test]
fn a_write_past_its_deadline_fails() {
    let t = Instant::now();
    let mut plan = WritePlan::new(Level::Quorum, 3, 0, 2).unwrap();
    plan.answer(0, STORED);
    assert_eq!(plan.wake_at(t, t + 30 * MS), t + 30 * MS);
    assert_eq!(
        plan.on_timer(t + 30 * MS, t + 30 * MS, |_| false),
        Some(Err(Error::DeadlineExceeded))
    );
}

#[test]
fn a_quorum_read_asks_only_as_many_as_it_needs_and_repairs_the_stale_one() {
    let t = Instant::now();
    let deadline = t + 2000 * MS;
    let mut plan = ReadPlan::new(Level::Quorum, 3, 0, 2).unwrap();
    // Replica 0 is this node: it answers at once.
    let (step, asked) = run_asks(
        &mut plan,
        t,
        deadline,
        &mut |i| (i == 0).then(|| found(5)),
        None,
    );
    assert_eq!(asked, vec![0, 1], "RF=3 QUORUM costs one remote call");
    assert_eq!(step, ReadStep::Wait(t + HEALTH_RECHECK));
    assert!(plan.answer(1, found(3)));
    assert_eq!(plan.next(t, deadline), ReadStep::Done(Ok(())));
    let learned = plan.learned(2);
    assert_eq!(learned.newest, Some(entry(5)));
    assert_eq!(learned.stale, vec![1]);
    assert!(!learned.settled, "one holder of 3 is no write quorum");
}

#[test]
fn a_replica_answering_stale_after_the_quorum_is_repaired_late() {
    let t = Instant::now();
    let deadline = t + 2000 * MS;
    let mut plan = ReadPlan::new(Level::One, 3, 0, 2).unwrap();
    let (step, _) = run_asks(&mut plan, t, deadline, &mut |_| Some(found(7)), None);
    assert_eq!(step, ReadStep::Done(Ok(())));
    let newest = plan.learned(2).newest.unwrap();
    // Replicas never asked, or answering after the decision, are judged against the winner.
    assert!(late_answer_is_stale(&found(6), &newest));
    assert!(late_answer_is_stale(&NOT_FOUND, &newest));
    assert!(!late_answer_is_stale(&found(7), &newest));
    assert!(!late_answer_is_stale(&Err(()), &newest));
}

#[test]
fn a_syncing_replicas_not_found_makes_a_one_read_ask_another() {
    let t = Instant::now();
    let deadline = t + 2000 * MS;
    let mut plan = ReadPlan::new(Level::One, 3, 0, 2).unwrap();
    let (step, asked) = run_asks(
        &mut plan,
        t,
        deadline,
        &mut |i| Some(if i == 0 { SYNCING_NOT_FOUND } else { found(2) }),
        None,
    );
    assert_eq!(asked, vec![0, 1]);
    assert_eq!(step, ReadStep::Done(Ok(())));
    assert_eq!(plan.learned(2).newest, Some(entry(2)));
}

#[test]
fn a_syncing_replicas_value_does_not_count_at_quorum() {
    let t = Instant::now();
    let deadline = t + 2000 * MS;
    let mut plan = ReadPlan::new(Level::Quorum, 3, 0, 2).unwrap();
    let (_, asked) = run_asks(
        &mut plan,
        t,
        deadline,
        &mut |i| {
            Some(if i == 0 {
                Ok((Some(entry(9)), true))
            } else {
                found(4)
            })
        },
        None,
    );
    assert_eq!(
        asked,
        vec![0, 1, 2],
        "the syncing answer is heard, not counted"
    );
    assert_eq!(plan.next(t, deadline), ReadStep::Done(Ok(())));
    let learned = plan.learned(2);
    assert_eq!(learned.newest, Some(entry(9)), "still heard: newest wins");
    assert_eq!(learned.stale, vec![1, 2]);
}

#[test]
fn a_slow_replica_past_its_speculative_delay_makes_the_read_ask_one_more() {
    let t = Instant::now();
    let deadline = t + 2000 * MS;
    let mut plan = ReadPlan::new(Level::Quorum, 3, 0, 2).unwrap();
    let (step, asked) = run_asks(
        &mut plan,
        t,
        deadline,
        &mut |i| (i == 0).then(|| found(1)),
        Some(t + 10 * MS),
    );
    assert_eq!(asked, vec![0, 1]);
    assert_eq!(
        step,
        ReadStep::Wait(t + 10 * MS),
        "wakes at the speculative delay"
    );
    assert_eq!(plan.on_timer(t + 10 * MS, deadline, |_| false), Ok(1));
    assert_eq!(plan.next(t + 10 * MS, deadline), ReadStep::Ask(2));
    plan.asked(2, None);
    // No spare replica left: waits in health slices, not for speculation.
    assert_eq!(
        plan.next(t + 10 * MS, deadline),
        ReadStep::Wait(t + 10 * MS + HEALTH_RECHECK)
    );
    // The slow one answers first after all: it still counts.
    assert!(plan.answer(1, found(1)));
    assert_eq!(plan.next(t + 11 * MS, deadline), ReadStep::Done(Ok(())));
    assert!(plan.learned(2).settled);
}

#[test]
fn a_read_whose_replicas_all_fail_is_unavailable_and_one_past_its_deadline_is_late() {
    let t = Instant::now();
    let deadline = t + 50 * MS;
    let mut plan = ReadPlan::new(Level::Quorum, 3, 0, 2).unwrap();
    let (step, asked) = run_asks(&mut plan, t, deadline, &mut |_| Some(Err(())), None);
    assert_eq!(asked, vec![0, 1, 2]);
    assert!(matches!(
        step,
        ReadStep::Done(Err(Error::Unavailable { answered: 0, .. }))
    ));

    let mut plan = ReadPlan::new(Level::Quorum, 3, 0, 2).unwrap();
    let (step, _) = run_asks(&mut plan, t, deadline, &mut |_| None, None);
    assert_eq!(step, ReadStep::Wait(deadline));
    assert_eq!(
        plan.on_timer(deadline, deadline, |_| false),
        Err(Error::DeadlineExceeded)
    );
}

#[test]
fn nobody_holding_the_key_is_settled_and_repairs_nothing() {
    let t = Instant::now();
    let mut plan = ReadPlan::new(Level::Linearizable, 3, 0, 2).unwrap();
    let (step, _) = run_asks(&mut plan, t, t + 50 * MS, &mut |_| Some(NOT_FOUND), None);
    assert_eq!(step, ReadStep::Done(Ok(())));
    assert_eq!(
        plan.learned(2),
        Learned {
            newest: None,
            settled: true,
            stale: Vec::new()
        }
    );
}
