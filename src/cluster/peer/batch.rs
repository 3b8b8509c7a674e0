//! Replica calls batched per peer core: the replica writes and reads a core has ready for one
//! core of one peer within one turn of its executor travel as one `PeerService.Batch` call,
//! each item with its own deadline and its own answer.
//!
//! The first item queued for a peer core starts a flush task that yields once, so the
//! requests already decoded in this turn queue their items behind it, and then sends what is
//! queued. Nothing waits for more work: at light load the batch holds one item and leaves
//! after one yield. Each caller waits on its own [`Slot`] until its answer or its deadline;
//! a caller that gave up leaves its slot, and an item nobody waits for any more is not sent.
//! Runs on a core's executor.

use crate::pb::{self, replica_op::Op, replica_outcome::Outcome};
use std::{
    cell::{Cell, RefCell},
    future::Future,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
    time::Instant,
};
use tonic::{Code, Status};

/// Most items in one batch: a bound on the replica's work per call and on the answer's size.
pub const MAX_ITEMS: usize = 128;
/// Most bytes of keys and values in one batch (a larger single item still goes, alone).
pub const MAX_BYTES: usize = 1 << 20;

/// One replica request waiting for its batch.
pub struct Item {
    pub op: Op,
    pub deadline: Instant,
    pub slot: Rc<Slot>,
}

impl Item {
    pub fn key(&self) -> &[u8] {
        match &self.op {
            Op::Write(w) => &w.key,
            Op::Read(r) => &r.key,
        }
    }

    fn bytes(&self) -> usize {
        match &self.op {
            Op::Write(w) => w.key.len() + w.value.len(),
            Op::Read(r) => r.key.len(),
        }
    }

    /// Its caller stopped waiting (a deadline, a read that no longer needs this replica).
    pub fn abandoned(&self) -> bool {
        Rc::strong_count(&self.slot) == 1
    }
}

/// Where an item's answer goes: filled once by the batch, taken once by the caller.
#[derive(Default)]
pub struct Slot {
    outcome: RefCell<Option<Result<Outcome, Status>>>,
    waker: Cell<Option<Waker>>,
}

impl Slot {
    pub fn fill(&self, outcome: Result<Outcome, Status>) {
        *self.outcome.borrow_mut() = Some(outcome);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// The answer, once filled.
    pub fn answer(&self) -> impl Future<Output = Result<Outcome, Status>> + '_ {
        Answer(self)
    }
}

struct Answer<'a>(&'a Slot);

impl Future for Answer<'_> {
    type Output = Result<Outcome, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.0.outcome.borrow_mut().take() {
            Some(outcome) => Poll::Ready(outcome),
            None => {
                self.0.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

/// Splits `items` into batches of at most [`MAX_ITEMS`] items and about [`MAX_BYTES`] bytes,
/// in order.
pub fn split(items: Vec<Item>) -> Vec<Vec<Item>> {
    let mut batches: Vec<Vec<Item>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let full = batches
            .last()
            .is_none_or(|b| b.len() >= MAX_ITEMS || (bytes + item.bytes() > MAX_BYTES));
        if full {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += item.bytes();
        if let Some(b) = batches.last_mut() {
            b.push(item);
        }
    }
    batches
}

/// The call's message for `items`, each with the time its caller still waits at `now`;
/// `items` keep their slots, their ops move into the message.
pub fn message(items: &mut [Item], now: Instant) -> pb::ReplicaBatch {
    let ops = items
        .iter_mut()
        .map(|item| {
            let placeholder = Op::Read(pb::ReplicaRead::default());
            pb::ReplicaOp {
                op: Some(std::mem::replace(&mut item.op, placeholder)),
                timeout_us: item.deadline.saturating_duration_since(now).as_micros() as u64,
            }
        })
        .collect();
    pb::ReplicaBatch { ops }
}

/// Gives each item its outcome from the call's `result`: its own answer, or the call's
/// failure for all of them.
pub fn answer(items: &[Item], result: Result<pb::ReplicaBatchReply, Status>) {
    match result {
        Ok(reply) if reply.outcomes.len() == items.len() => {
            for (item, outcome) in items.iter().zip(reply.outcomes) {
                item.slot.fill(
                    outcome
                        .outcome
                        .ok_or_else(|| Status::internal("a batch answer without an outcome")),
                );
            }
        }
        Ok(reply) => {
            let status = Status::internal(format!(
                "a batch of {} items answered with {} outcomes",
                items.len(),
                reply.outcomes.len()
            ));
            for item in items {
                item.slot.fill(Err(status.clone()));
            }
        }
        Err(status) => {
            for item in items {
                item.slot.fill(Err(status.clone()));
            }
        }
    }
}

/// An item's failure as the status a call of its own would have ended with.
pub fn item_status(s: pb::ItemStatus) -> Status {
    Status::new(Code::from(s.code), s.message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn write(key: &str, value_len: usize, deadline: Instant) -> Item {
        Item {
            op: Op::Write(pb::ReplicaWrite {
                key: key.into(),
                value: vec![0; value_len],
                ..Default::default()
            }),
            deadline,
            slot: Rc::default(),
        }
    }

    #[test]
    fn batches_are_cut_by_items_and_by_bytes_in_order() {
        let now = Instant::now();
        let items: Vec<Item> = (0..300).map(|i| write(&format!("k{i}"), 10, now)).collect();
        let sizes: Vec<usize> = split(items).iter().map(Vec::len).collect();
        assert_eq!(sizes, [MAX_ITEMS, MAX_ITEMS, 300 - 2 * MAX_ITEMS]);

        let big = MAX_BYTES / 2;
        let items = vec![
            write("a", big, now),
            write("b", big, now),
            write("c", 2 * MAX_BYTES, now),
            write("d", 1, now),
        ];
        let batches = split(items);
        let keys: Vec<Vec<&[u8]>> = batches
            .iter()
            .map(|b| b.iter().map(Item::key).collect())
            .collect();
        assert_eq!(
            keys,
            vec![
                vec![&b"a"[..]],
                vec![&b"b"[..]],
                vec![&b"c"[..]],
                vec![&b"d"[..]]
            ]
        );
    }

    #[test]
    fn each_item_gets_its_own_outcome_or_the_calls_failure() {
        let now = Instant::now();
        let mut items = vec![
            write("a", 1, now + Duration::from_millis(5)),
            write("b", 1, now + Duration::from_millis(9)),
        ];
        let m = message(&mut items, now);
        assert_eq!(m.ops[0].timeout_us, 5000);
        assert_eq!(m.ops[1].timeout_us, 9000);
        assert!(matches!(&m.ops[1].op, Some(Op::Write(w)) if w.key == b"b"));
        answer(
            &items,
            Ok(pb::ReplicaBatchReply {
                outcomes: vec![
                    pb::ReplicaOutcome {
                        outcome: Some(Outcome::Ack(pb::ReplicaAck {
                            applied: true,
                            ..Default::default()
                        })),
                    },
                    pb::ReplicaOutcome {
                        outcome: Some(Outcome::Status(pb::ItemStatus {
                            code: Code::DeadlineExceeded as i32,
                            message: "late".into(),
                        })),
                    },
                ],
            }),
        );
        let taken: Vec<_> = items
            .iter()
            .map(|i| i.slot.outcome.borrow_mut().take().unwrap())
            .collect();
        assert!(matches!(&taken[0], Ok(Outcome::Ack(a)) if a.applied));
        assert!(matches!(&taken[1], Ok(Outcome::Status(s)) if s.code == 4));

        answer(&items, Err(Status::unavailable("connection reset")));
        for i in &items {
            let got = i.slot.outcome.borrow_mut().take().unwrap();
            assert_eq!(got.unwrap_err().code(), Code::Unavailable);
        }
        // An answer with the wrong number of outcomes fails every item.
        answer(&items, Ok(pb::ReplicaBatchReply::default()));
        for i in &items {
            let got = i.slot.outcome.borrow_mut().take().unwrap();
            assert_eq!(got.unwrap_err().code(), Code::Internal);
        }
    }
}
