//! The coordinator driving its plans against in-memory peers, on a real glommio executor:
//! replicas that fail, lag, answer late or stale, and hints delivered when a replica returns.
//! Delays are real but a few milliseconds; every wait for a background effect polls with a
//! deadline.

use super::*;
use crate::{
    cluster::{hints::HintLimits, transport::memory::InMemory},
    engine::hlc::Version,
};

const SECOND: Duration = Duration::from_secs(1);

fn run<F: Future<Output = ()> + 'static>(test: impl FnOnce() -> F + Send + 'static) {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(test)
        .expect("executor starts")
        .join()
        .expect("test ran");
}

fn coordinator(peers: Rc<InMemory>) -> Rc<Coordinator<InMemory>> {
    Rc::new(Coordinator {
        engine: Rc::new(CoreEngine::new(
            0,
            1,
            1,
            crate::engine::budget::Memory {
                max_bytes: 1 << 30,
                max_entries: Some(10_000),
                policy: crate::engine::shard::Policy::S3Fifo,
            },
            1,
            Instant::now(),
        )),
        peers,
        me: "a".into(),
        ring: RefCell::new(Rc::new(Ring::new(["a", "b", "c"].map(String::from), 16, 3))),
        write_quorum: 2,
        read_quorum: 2,
        tombstone_ttl_secs: 60,
        read_repairs: Cell::new(0),
        hints: Rc::new(Hints::new(HintLimits {
            enabled: true,
            max_count: 100,
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(60),
        })),
        syncing: RefCell::new(Rc::new(BucketSet::default())),
        health: RefCell::new(Rc::new(Health::default())),
        speculative: SpeculativeRetry::Off,
        speculative_retries: Cell::new(0),
        write_backs: Cell::new(0),
        skipped_down: Cell::new(0),
    })
}

fn request(command: Command, level: Level) -> Routed {
    Routed {
        request: Request {
            shard: ShardId(0),
            command,
            deadline: Instant::now() + SECOND,
        },
        level,
    }
}

fn set(key: &str, value: &str) -> Command {
    Command::Set {
        key: key.into(),
        value: value.into(),
        ttl_secs: None,
        binary: false,
    }
}

fn get(key: &str) -> Command {
    Command::Get { key: key.into() }
}

fn entry(key: &str, value: &str, hlc: u64) -> ReplicaEntry {
    ReplicaEntry {
        key: key.into(),
        value: value.into(),
        version: Version { hlc, node: 9 },
        ttl_ms: 0,
        flags: 0,
    }
}

/// Polls `done` every millisecond until it holds or a second passes.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + SECOND;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within a second");
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

#[test]
fn a_write_that_misses_a_replica_hints_it_and_the_hint_lands_when_it_returns() {
    run(|| async {
        let peers = Rc::new(InMemory::default());
        let coord = coordinator(Rc::clone(&peers));
        let (b, c) = (peers.replica("b"), peers.replica("c"));
        c.down.set(true);
        let stored = Rc::clone(&coord)
            .coordinate(request(set("k", "v1"), Level::Quorum))
            .await;
        assert!(matches!(stored, Ok(Reply::Stored { .. })), "{stored:?}");
        assert_eq!(b.entry(b"k").map(|e| e.value), Some(b"v1".to_vec()));
        eventually("a hint for c", || coord.hints.counts().stored == 1).await;

        // Still away: the hint stays.
        coord.hints.deliver(&*peers, &|_| true, SECOND).await;
        assert_eq!(coord.hints.counts().queued, 1);
        c.down.set(false);
        coord.hints.deliver(&*peers, &|_| true, SECOND).await;
        assert_eq!(c.entry(b"k").map(|e| e.value), Some(b"v1".to_vec()));
        assert_eq!(coord.hints.counts().delivered, 1);

        // A hint kept past HINT_TTL is dropped, not delivered.
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(61))
            .expect("the clock is past a minute");
        coord.hints.store("c", entry("old", "x", 1), long_ago);
        let writes = c.writes.get();
        coord.hints.deliver(&*peers, &|_| true, SECOND).await;
        assert_eq!(coord.hints.counts().expired, 1);
        assert_eq!(c.writes.get(), writes);
        assert_eq!(c.entry(b"old"), None);
    });
}

#[test]
fn a_quorum_met_late_still_succeeds_and_too_few_replicas_fail_fast() {
    run(|| async {
        let peers = Rc::new(InMemory::default());
        let coord = coordinator(Rc::clone(&peers));
        peers.replica("b").delay.set(Duration::from_millis(20));
        peers.replica("c").down.set(true);
        let started = Instant::now();
        let stored = Rc::clone(&coord)
            .coordinate(request(set("k", "v"), Level::Quorum))
            .await;
        assert!(matches!(stored, Ok(Reply::Stored { .. })), "{stored:?}");
        assert!(started.elapsed() >= Duration::from_millis(20));

        peers.replica("b").down.set(true);
        let refused = Rc::clone(&coord)
            .coordinate(request(set("k", "w"), Level::Quorum))
            .await;
        assert!(
            matches!(refused, Err(Error::Unavailable { answered: 1, .. })),
            "{refused:?}"
        );
    });
}

#[test]
fn a_slow_stale_replica_is_worked_around_and_repaired_when_it_answers() {
    run(|| async {
        let peers = Rc::new(InMemory::default());
        let coord = coordinator(Rc::clone(&peers));
        let (b, c) = (peers.replica("b"), peers.replica("c"));
        let newest = entry("k", "new", 20);
        coord
            .engine
            .execute(Request {
                shard: ShardId(0),
                command: Command::Apply(newest.clone()),
                deadline: Instant::now() + SECOND,
            })
            .expect("applies");
        c.apply(&newest);
        b.apply(&entry("k", "old", 10));
        // b ranks first but is slow: past its speculative delay the read asks c instead.
        b.delay.set(Duration::from_millis(30));
        b.speculate_after.set(Some(Duration::from_millis(2)));
        c.score_us.set(1000.0);
        let got = Rc::clone(&coord)
            .coordinate(request(get("k"), Level::Quorum))
            .await;
        assert!(
            matches!(&got, Ok(Reply::Value { value, .. }) if value == b"new"),
            "{got:?}"
        );
        assert_eq!(coord.speculative_retries.get(), 1);
        assert_eq!(c.reads.get(), 1);
        // b's stale answer arrives after the read was decided: it gets the newest entry.
        eventually("b repaired", || b.entry(b"k") == Some(newest.clone())).await;
        assert_eq!(coord.read_repairs.get(), 1);
    });
}

#[test]
fn a_syncing_replicas_not_found_is_no_answer_at_one() {
    run(|| async {
        let peers = Rc::new(InMemory::default());
        let coord = coordinator(Rc::clone(&peers));
        peers.replica("b").apply(&entry("k", "v", 5));
        peers.replica("c").apply(&entry("k", "v", 5));
        // Settled, this node's "not found" answers a ONE read.
        let missing = Rc::clone(&coord)
            .coordinate(request(get("k"), Level::One))
            .await;
        assert!(
            matches!(missing, Err(Error::NotFound { .. })),
            "{missing:?}"
        );
        // Still receiving the key's bucket, it asks a settled replica.
        *coord.syncing.borrow_mut() = Rc::new(BucketSet::all());
        let found = Rc::clone(&coord)
            .coordinate(request(get("k"), Level::One))
            .await;
        assert!(
            matches!(&found, Ok(Reply::Value { value, .. }) if value == b"v"),
            "{found:?}"
        );
    });
}
