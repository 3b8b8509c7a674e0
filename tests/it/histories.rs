//! The consistency suite: real nodes (each its own user, as in degraded.rs), concurrent clients
//! at QUORUM, LINEARIZABLE and ONE on separate keys, and a schedule of faults, each bounded
//! and healed: a pause (SIGSTOP), a kill (SIGKILL, restarted empty on the same ADDR), a cut
//! (iptables, every packet between one node and the others) of 6 s and one of 2.5 s healed
//! before the failure detector's verdict, a node joining, a node leaving
//! gracefully, and two combinations (a join while a replica is paused, a leave while another
//! replica is killed). Every operation is recorded and, at the end, each level's promise is
//! checked on its own keys:
//! - QUORUM: no read older than a write acknowledged before the read began;
//! - LINEARIZABLE: the whole history is linearizable (and so also the above);
//! - ONE (and all the others): once the faults are healed, every replica holds the same entry.
//!
//! `long_schedules` (ignored; `bench/consistency.sh` runs it) repeats each fault alone on a
//! fresh cluster and prints a table: fault, operations, unknown outcomes, verdicts.
//! `quorum_loses_a_write_from_a_node_whose_clock_is_behind` shows what QUORUM cannot promise.

use crate::cluster::{free_cluster_port, get, members, set, start_node, wait_converged};
use crate::degraded::{start_user_node, uid, user_cluster, Cut, UserNode};
use crate::support::{wait_until, Node};
use consistency::{quorum::stale_reads, History, Kind, Op, Outcome, Verdict};
use distributed_cache::pb::{
    cache_service_client::CacheServiceClient, get_response, peer_service_client::PeerServiceClient,
    Consistency, DeleteRequest, ReplicaRead,
};
use std::{
    cell::{Cell, RefCell},
    rc::Rc,
    time::{Duration, Instant},
};
use tonic::{transport::Channel, Code};

const KEYS: usize = 4;
const CLIENTS_PER_LEVEL: u32 = 3;
/// Each level's clients and the prefix of their keys.
const LEVELS: [(Consistency, &str); 3] = [
    (Consistency::Quorum, "q"),
    (Consistency::Linearizable, "l"),
    (Consistency::One, "o"),
];
const NODE_ENV: [(&str, &str); 2] = [("RPC_TIMEOUT", "2"), ("ANTI_ENTROPY_INTERVAL", "2")];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pause,
    Kill,
    Cut,
    /// A cut healed before the failure detector's verdict.
    ShortCut,
    Join,
    Leave,
    JoinDuringPause,
    LeaveDuringKill,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Pause => "pause (SIGSTOP 1.5 s)",
            Fault::Kill => "kill -9, restart empty",
            Fault::Cut => "cut 6 s (iptables)",
            Fault::ShortCut => "cut 2.5 s, healed before the verdict",
            Fault::Join | Fault::Leave => "a node joins, then leaves",
            Fault::JoinDuringPause | Fault::LeaveDuringKill => {
                "join while paused, leave while killed"
            }
        }
    }
}

/// The outcome a client can tell from a status.
fn outcome_of(status: &tonic::Status) -> Outcome {
    match status.code() {
        // Refused before any replica was asked: it did not happen.
        Code::Unavailable if status.message().contains("live replicas") => Outcome::Failed,
        Code::InvalidArgument | Code::ResourceExhausted => Outcome::Failed,
        // A replica may have applied it.
        _ => Outcome::Unknown,
    }
}

fn timed<T>(m: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(m);
    req.set_timeout(Duration::from_secs(1));
    req
}

/// One client: Sets, Gets and (but at QUORUM, whose check is about Sets) Deletes on its
/// level's keys, recorded until `stop`.
async fn client_loop(
    id: u32,
    url: String,
    level: Consistency,
    prefix: &'static str,
    start: Instant,
    stop: Rc<Cell<bool>>,
    history: Rc<RefCell<History>>,
) {
    let channel = Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("client connects");
    let mut c = CacheServiceClient::new(channel);
    let ns = |t: Instant| t.duration_since(start).as_nanos() as u64;
    let deletes = level != Consistency::Quorum;
    let mut n = 0u64;
    while !stop.get() {
        n += 1;
        let key = format!("{prefix}{}", (n as usize * 7 + id as usize) % KEYS);
        let invoked = Instant::now();
        let (kind, outcome, version) = match (n + id as u64) % 10 {
            0 if deletes => {
                let req = DeleteRequest {
                    key: key.clone(),
                    consistency: level as i32,
                };
                match c.delete(timed(req)).await {
                    Ok(_) => (Kind::Write(None), Outcome::Ok, None),
                    Err(s) => (Kind::Write(None), outcome_of(&s), None),
                }
            }
            0..=4 => {
                let value = format!("{id}-{n}");
                let mut req = set(&key, &value);
                req.consistency = level as i32;
                match c.set(timed(req)).await {
                    Ok(r) => (
                        Kind::Write(Some(value)),
                        Outcome::Ok,
                        r.into_inner().version.map(|v| (v.hlc, v.node)),
                    ),
                    Err(s) => (Kind::Write(Some(value)), outcome_of(&s), None),
                }
            }
            _ => match c.get(timed(get(&key, level))).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let value = match r.payload {
                        Some(get_response::Payload::Value(v)) => v,
                        other => panic!("unexpected payload {other:?}"),
                    };
                    (
                        Kind::Read(Some(value)),
                        Outcome::Ok,
                        r.version.map(|v| (v.hlc, v.node)),
                    )
                }
                Err(s) if s.code() == Code::NotFound => (Kind::Read(None), Outcome::Ok, None),
                Err(s) => (Kind::Read(None), outcome_of(&s), None),
            },
        };
        history.borrow_mut().push(Op {
            client: id,
            key,
            kind,
            invoked_ns: ns(invoked),
            completed_ns: ns(Instant::now()),
            outcome,
            version,
        });
    }
}

/// Three nodes that stay (clients go through the first two; faults hit nodes 2 and 3, and the
/// cut node 2), and a fourth that joins and leaves.
struct Cluster {
    tag: u32,
    nodes: Vec<UserNode>,
    joiner: Option<UserNode>,
}

impl Cluster {
    async fn new(tag: u32) -> Cluster {
        Cluster {
            tag,
            nodes: user_cluster(tag, &[], &NODE_ENV).await,
            joiner: None,
        }
    }

    fn addrs(&self) -> Vec<String> {
        let mut addrs: Vec<String> = self.nodes.iter().map(|n| n.node.addr.clone()).collect();
        addrs.extend(self.joiner.iter().map(|n| n.node.addr.clone()));
        addrs
    }

    async fn converged(&self) {
        let mut refs: Vec<&Node> = self.nodes.iter().map(|n| &n.node).collect();
        refs.extend(self.joiner.iter().map(|n| &n.node));
        wait_converged(&refs, &self.addrs()).await;
    }

    async fn start_joiner(&mut self) {
        let port = free_cluster_port();
        let addr = format!("127.0.0.1:{port}");
        let uid = uid(self.tag, 3);
        self.joiner = Some(start_user_node(uid, &addr, &self.nodes[0].node.addr, &NODE_ENV).await);
    }

    async fn restart_killed(&mut self) {
        let seed = self.nodes[0].node.addr.clone();
        let n = &mut self.nodes[2];
        n.node.wait_exit(Duration::from_secs(5)).await;
        let addr = n.node.addr.clone();
        *n = start_user_node(n.uid, &addr, &seed, &NODE_ENV).await;
    }

    /// Waits for the joiner's graceful leave (its hand-off included) to end.
    async fn joiner_left(&mut self) {
        let mut joiner = self.joiner.take().expect("a node joined");
        let status = joiner.node.wait_exit(Duration::from_secs(60)).await;
        assert!(status.success(), "the leaving node exited with {status}");
    }

    /// Injects `fault`, heals it, and waits for the membership to settle again.
    async fn inject(&mut self, fault: Fault) {
        let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
        match fault {
            Fault::Pause => {
                self.nodes[2].node.signal(libc::SIGSTOP);
                pause(1500).await;
                self.nodes[2].node.signal(libc::SIGCONT);
            }
            Fault::Kill => {
                self.nodes[2].node.signal(libc::SIGKILL);
                pause(500).await;
                self.restart_killed().await;
            }
            Fault::Cut | Fault::ShortCut => {
                let cut = Cut::new(&self.nodes[1], &[&self.nodes[0], &self.nodes[2]]);
                pause(if fault == Fault::Cut { 6000 } else { 2500 }).await;
                drop(cut);
            }
            Fault::Join => self.start_joiner().await,
            Fault::Leave => {
                self.joiner
                    .as_ref()
                    .expect("joined")
                    .node
                    .signal(libc::SIGTERM);
                self.joiner_left().await;
            }
            Fault::JoinDuringPause => {
                self.nodes[2].node.signal(libc::SIGSTOP);
                self.start_joiner().await;
                let joiner = self.joiner.as_ref().unwrap().node.addr.clone();
                let first = &self.nodes[0].node;
                wait_until(Duration::from_secs(20), "the joiner to be seen", || {
                    let joiner = joiner.clone();
                    async move {
                        members(first)
                            .await
                            .iter()
                            .any(|(a, s)| *a == joiner && s == "ALIVE")
                    }
                })
                .await;
                pause(500).await;
                self.nodes[2].node.signal(libc::SIGCONT);
            }
            Fault::LeaveDuringKill => {
                self.joiner
                    .as_ref()
                    .expect("joined")
                    .node
                    .signal(libc::SIGTERM);
                self.nodes[2].node.signal(libc::SIGKILL);
                self.joiner_left().await;
                self.restart_killed().await;
            }
        }
        self.converged().await;
    }

    /// Waits until every node holds the same entry (or none) for every key, as its own
    /// replica sees it (PeerService.Read: no coordination, no repair).
    async fn assert_replicas_converge(&self, keys: &[String]) {
        let mut peers = Vec::new();
        for n in &self.nodes {
            let channel = Channel::from_shared(n.node.url())
                .unwrap()
                .connect()
                .await
                .expect("connects");
            peers.push(PeerServiceClient::new(channel));
        }
        let entries = |peers: Vec<PeerServiceClient<Channel>>| async move {
            let mut all = Vec::new();
            for key in keys {
                let mut seen = Vec::new();
                for mut p in peers.clone() {
                    let read = ReplicaRead {
                        key: key.clone().into_bytes(),
                    };
                    let mut read = tonic::Request::new(read);
                    read.set_timeout(Duration::from_secs(2));
                    seen.push(p.read(read).await.ok().map(|r| {
                        let e = r.into_inner();
                        (e.found, e.value, e.hlc, e.node, e.flags)
                    }));
                }
                all.push((key.clone(), seen));
            }
            all
        };
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let all = entries(peers.clone()).await;
            let diverged: Vec<_> = all
                .iter()
                .filter(|(_, seen)| seen.iter().any(|s| s.is_none() || *s != seen[0]))
                .collect();
            if diverged.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replicas still differ 40 s after the last fault healed: {diverged:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// One level's record of a run.
struct Record {
    level: Consistency,
    history: Rc<RefCell<History>>,
}

/// What a run found, per level.
struct Findings {
    /// (level, operations, acknowledged, unknown, stale reads, linearizability verdict).
    rows: Vec<(Consistency, usize, usize, usize, usize, Verdict)>,
    /// When each fault began and when the cluster had settled after it, in ms from the start:
    /// printed with an anomaly, to tell which fault it came with.
    faults: Vec<(&'static str, f64, f64)>,
    /// Every write, to show the one that wrote a value an anomalous read returned.
    writes: Vec<Vec<Op>>,
    /// Per level, the first stale read, described.
    first_stale: Vec<Option<String>>,
}

impl Findings {
    fn context(&self, level: usize, values: &[&str]) -> String {
        let mut out = String::from("faults:\n");
        for (name, from, to) in &self.faults {
            out += &format!("  {from:>10.3} ms .. {to:>10.3} ms  {name}\n");
        }
        out += "the writes of the values read:\n";
        for w in &self.writes[level] {
            if matches!(&w.kind, Kind::Write(Some(v)) if values.contains(&v.as_str())) {
                out += &format!("  {w}\n");
            }
        }
        out
    }
}

/// Runs `faults` in order against the three levels' clients on a fresh cluster, then checks
/// every replica converged.
async fn run(tag: u32, faults: &[Fault]) -> Findings {
    let mut cluster = Cluster::new(tag).await;
    let start = Instant::now();
    let stop = Rc::new(Cell::new(false));
    let records: Vec<Record> = LEVELS
        .iter()
        .map(|(level, _)| Record {
            level: *level,
            history: Rc::new(RefCell::new(History::default())),
        })
        .collect();
    let local = tokio::task::LocalSet::new();
    let mut clients = Vec::new();
    let mut timeline = Vec::new();
    for (r, (level, prefix)) in records.iter().zip(LEVELS) {
        for i in 0..CLIENTS_PER_LEVEL {
            let id = (level as u32) * 100 + i;
            clients.push(local.spawn_local(client_loop(
                id,
                cluster.nodes[i as usize % 2].node.url(),
                level,
                prefix,
                start,
                Rc::clone(&stop),
                Rc::clone(&r.history),
            )));
        }
    }
    local
        .run_until(async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for fault in faults {
                let from = start.elapsed().as_secs_f64() * 1e3;
                eprintln!("{from:>10.3} ms: {}", fault.name());
                cluster.inject(*fault).await;
                let to = start.elapsed().as_secs_f64() * 1e3;
                timeline.push((fault.name(), from, to));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            stop.set(true);
            for c in clients {
                c.await.unwrap();
            }
        })
        .await;
    let keys: Vec<String> = LEVELS
        .iter()
        .flat_map(|(_, p)| (0..KEYS).map(move |k| format!("{p}{k}")))
        .collect();
    cluster.assert_replicas_converge(&keys).await;
    let rows = records
        .iter()
        .map(|r| {
            let h = r.history.borrow();
            let (ops, unknown) = h.counts();
            let acked = h.ops.iter().filter(|o| o.outcome == Outcome::Ok).count();
            let stale = stale_reads(&h).len();
            (r.level, ops, acked, unknown, stale, consistency::check(&h))
        })
        .collect();
    let writes = records
        .iter()
        .map(|r| {
            let h = r.history.borrow();
            h.ops
                .iter()
                .filter(|o| matches!(o.kind, Kind::Write(_)))
                .cloned()
                .collect()
        })
        .collect();
    let first_stale = records
        .iter()
        .map(|r| {
            stale_reads(&r.history.borrow())
                .first()
                .map(|s| s.to_string())
        })
        .collect();
    Findings {
        rows,
        faults: timeline,
        writes,
        first_stale,
    }
}

fn verdict_name(v: &Verdict) -> String {
    match v {
        Verdict::Linearizable => "linearizable".into(),
        Verdict::NotLinearizable(r) => format!("NOT linearizable ({} keys)", r.len()),
        Verdict::Undecided { key } => format!("undecided ({key})"),
    }
}

/// Asserts each level's promise; prints what was seen.
fn assert_promises(findings: &Findings, what: &str) {
    for (i, (level, ops, acked, unknown, stale, verdict)) in findings.rows.iter().enumerate() {
        let stale_note = match level {
            Consistency::Quorum => format!("{stale} stale reads"),
            _ => "stale reads not judged (Deletes)".into(),
        };
        println!(
            "{what}: {level:?}: {ops} operations, {acked} acknowledged, {unknown} unknown, \
             {stale_note}, {}",
            verdict_name(verdict)
        );
        assert!(*acked >= 100, "{level:?}: too little load to say anything");
        // (Deletes, which only the other levels' clients send, make this check meaningless;
        // linearizability implies it.)
        if *level == Consistency::Quorum {
            assert!(
                *stale == 0,
                "QUORUM read older than an acknowledged write ({stale} reads), the first:\n{}{}",
                findings.first_stale[i].as_deref().unwrap_or(""),
                findings.context(i, &[])
            );
        }
        if *level == Consistency::Linearizable {
            match verdict {
                Verdict::Linearizable => {}
                Verdict::NotLinearizable(reports) => {
                    let values: Vec<&str> = reports[0]
                        .window
                        .iter()
                        .filter_map(|o| match &o.kind {
                            Kind::Read(Some(v)) => Some(v.as_str()),
                            _ => None,
                        })
                        .collect();
                    panic!(
                        "LINEARIZABLE history is not:\n{}{}",
                        reports[0],
                        findings.context(i, &values)
                    )
                }
                Verdict::Undecided { key } => panic!("the checker gave up on {key}"),
            }
        }
    }
}

#[tokio::test]
async fn each_level_keeps_its_promise_through_faults_joins_and_leaves() {
    let faults = [
        Fault::Pause,
        Fault::Kill,
        Fault::Cut,
        Fault::ShortCut,
        Fault::Join,
        Fault::Leave,
        Fault::JoinDuringPause,
        Fault::LeaveDuringKill,
    ];
    let findings = run(3, &faults).await;
    assert_promises(&findings, "schedule");
}

/// Each fault alone, `CONSISTENCY_ROUNDS` times (default 3) on a fresh cluster, and a table.
#[tokio::test]
#[ignore = "long: bench/consistency.sh"]
async fn long_schedules() {
    let rounds: usize = std::env::var("CONSISTENCY_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let all = [
        Fault::Pause,
        Fault::Kill,
        Fault::Cut,
        Fault::ShortCut,
        Fault::Join,
        Fault::Leave,
        Fault::JoinDuringPause,
        Fault::LeaveDuringKill,
    ];
    let schedules: [(&str, Vec<Fault>); 7] = [
        (Fault::Pause.name(), vec![Fault::Pause; rounds]),
        (Fault::Kill.name(), vec![Fault::Kill; rounds]),
        (Fault::Cut.name(), vec![Fault::Cut; rounds]),
        (Fault::ShortCut.name(), vec![Fault::ShortCut; rounds]),
        (
            Fault::Join.name(),
            [Fault::Join, Fault::Leave].repeat(rounds),
        ),
        (
            Fault::JoinDuringPause.name(),
            [Fault::JoinDuringPause, Fault::LeaveDuringKill].repeat(rounds),
        ),
        ("all of the above, in turn", all.repeat(rounds)),
    ];
    let mut table = vec![
        "| faults | level | operations | unknown outcome | stale reads | verdict |".to_string(),
        "|---|---|---:|---:|---:|---|".to_string(),
    ];
    let mut all_findings = Vec::new();
    for (i, (name, faults)) in schedules.iter().enumerate() {
        let findings = run(4 + i as u32, faults).await;
        for (level, ops, _, unknown, stale, verdict) in &findings.rows {
            // Only QUORUM's clients send no Deletes, which the stale-read check cannot judge.
            let stale = match level {
                Consistency::Quorum => stale.to_string(),
                _ => "n/a".into(),
            };
            table.push(format!(
                "| {name} x{rounds} | {level:?} | {ops} | {unknown} | {stale} | {} |",
                verdict_name(verdict)
            ));
        }
        all_findings.push((name, findings));
    }
    println!("{}", table.join("\n"));
    for (name, findings) in &all_findings {
        assert_promises(findings, name);
    }
}

/// QUORUM orders writes by their versions, and a version is the coordinator's hybrid clock:
/// a write through a node whose wall clock is behind, to a key it holds no replica of (so its
/// clock never saw the key's newer version), is acknowledged and then loses to the older
/// write. LINEARIZABLE learns the newest version first and writes above it. The clock is
/// set back with libfaketime (a real clock as the process sees it; monotonic time untouched).
#[tokio::test]
async fn quorum_loses_a_write_from_a_node_whose_clock_is_behind() {
    let faketime = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .expect("this test needs libfaketime (apt-get install faketime)");
    let faketime = faketime.to_str().unwrap();
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_cluster_port()))
        .collect();
    let rf = [("REPLICATION_FACTOR", "2")];
    let skewed = [
        ("REPLICATION_FACTOR", "2"),
        ("LD_PRELOAD", faketime),
        ("FAKETIME", "-60s"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let nodes = [
        start_node(&addrs[0], &addrs[0], &rf).await,
        start_node(&addrs[1], &addrs[0], &rf).await,
        start_node(&addrs[2], &addrs[0], &skewed).await,
    ];
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    let (mut first, mut behind) = (
        nodes[0].client().await.unwrap(),
        nodes[2].client().await.unwrap(),
    );
    let start = Instant::now();
    let ns = |t: Instant| t.duration_since(start).as_nanos() as u64;
    let mut lost = [0usize; 2];
    for (l, level) in [Consistency::Quorum, Consistency::Linearizable]
        .into_iter()
        .enumerate()
    {
        let mut history = History::default();
        for k in 0..30 {
            let key = format!("skew-{level:?}-{k}");
            for (client, node, value) in [(0, &mut first, "first"), (1, &mut behind, "later")] {
                let mut req = set(&key, value);
                req.consistency = level as i32;
                let invoked = Instant::now();
                let r = node.set(req).await.expect("set").into_inner();
                history.push(Op {
                    client,
                    key: key.clone(),
                    kind: Kind::Write(Some(value.into())),
                    invoked_ns: ns(invoked),
                    completed_ns: ns(Instant::now()),
                    outcome: Outcome::Ok,
                    version: r.version.map(|v| (v.hlc, v.node)),
                });
            }
            let invoked = Instant::now();
            let r = first.get(get(&key, level)).await.expect("get").into_inner();
            let value = crate::cluster::value_of(&r);
            lost[l] += usize::from(value == "first");
            history.push(Op {
                client: 0,
                key,
                kind: Kind::Read(Some(value)),
                invoked_ns: ns(invoked),
                completed_ns: ns(Instant::now()),
                outcome: Outcome::Ok,
                version: r.version.map(|v| (v.hlc, v.node)),
            });
        }
        let verdict = consistency::check(&history);
        println!(
            "{level:?}: {} of 30 acknowledged later writes lost; {}",
            lost[l],
            verdict_name(&verdict)
        );
        if let Verdict::NotLinearizable(r) = &verdict {
            println!("{}", r[0]);
        }
        match level {
            // Node 3 holds no replica of about a third of the keys.
            Consistency::Quorum => assert!(
                lost[l] > 0 && matches!(verdict, Verdict::NotLinearizable(_)),
                "the skewed clock should have lost a write at QUORUM"
            ),
            _ => assert!(
                lost[l] == 0 && verdict == Verdict::Linearizable,
                "LINEARIZABLE lost {} writes",
                lost[l]
            ),
        }
    }
}

#[tokio::test]
async fn an_unknown_consistency_level_is_invalid_argument_naming_it() {
    let node = Node::start(&[]).await;
    let mut c = node.client().await.unwrap();
    let mut req = get("k", Consistency::Quorum);
    req.consistency = 7;
    let s = c.get(req).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("consistency level 7"),
        "{}",
        s.message()
    );
    let mut req = set("k", "v");
    req.consistency = -1;
    let s = c.set(req).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = c
        .delete(DeleteRequest {
            key: "k".into(),
            consistency: 4,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    // Nothing was written by the refused Set.
    let s = c
        .get(get("k", Consistency::Linearizable))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
}
