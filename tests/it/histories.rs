//! The consistency suite's first schedule: three nodes, concurrent clients writing and
//! reading a few keys at QUORUM through nodes 1 and 2, while node 3 is paused (SIGSTOP), then
//! killed (SIGKILL) and restarted empty on the same ADDR, and then node 2 is cut off from the
//! others for 6 s (iptables, as in degraded.rs; its clients see timeouts, then UNAVAILABLE).
//! Every operation is recorded (client, key, kind, value, invocation and completion, outcome,
//! version) and the history is checked: QUORUM's promise (no read older than a write acknowledged before it
//! began) must hold; the linearizability verdict is printed, as QUORUM does not promise it.

use crate::cluster::{get, set, wait_converged};
use crate::degraded::{start_user_node, user_cluster, Cut};
use consistency::{quorum::stale_reads, History, Kind, Op, Outcome};
use distributed_cache::pb::{get_response, Consistency};
use std::{
    cell::RefCell,
    rc::Rc,
    time::{Duration, Instant},
};
use tonic::Code;

const KEYS: usize = 4;
const CLIENTS: u32 = 6;

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

async fn client_loop(
    id: u32,
    url: String,
    start: Instant,
    stop: Rc<RefCell<bool>>,
    history: Rc<RefCell<History>>,
) {
    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("client connects");
    let mut c = distributed_cache::pb::cache_service_client::CacheServiceClient::new(channel);
    let ns = |t: Instant| t.duration_since(start).as_nanos() as u64;
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        let key = format!("c{}", (n as usize * 7 + id as usize) % KEYS);
        let invoked = Instant::now();
        let (kind, outcome, version) = if (n + id as u64) % 2 == 0 {
            let value = format!("{id}-{n}");
            let mut req = tonic::Request::new(set(&key, &value));
            req.set_timeout(Duration::from_secs(1));
            match c.set(req).await {
                Ok(r) => (
                    Kind::Write(Some(value)),
                    Outcome::Ok,
                    r.into_inner().version.map(|v| (v.hlc, v.node)),
                ),
                Err(s) => (Kind::Write(Some(value)), outcome_of(&s), None),
            }
        } else {
            let mut req = tonic::Request::new(get(&key, Consistency::Quorum));
            req.set_timeout(Duration::from_secs(1));
            match c.get(req).await {
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
            }
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

async fn converged(nodes: &[crate::degraded::UserNode], addrs: &[String]) {
    let refs: Vec<&crate::support::Node> = nodes.iter().map(|n| &n.node).collect();
    wait_converged(&refs, addrs).await;
}

#[tokio::test]
async fn quorum_reads_see_every_acknowledged_write_through_a_pause_a_restart_and_a_cut() {
    let mut nodes = user_cluster(3, &[], &[("RPC_TIMEOUT", "2")]).await;
    let addrs: Vec<String> = nodes.iter().map(|n| n.node.addr.clone()).collect();
    let start = Instant::now();
    let stop = Rc::new(RefCell::new(false));
    let history = Rc::new(RefCell::new(History::default()));
    let local = tokio::task::LocalSet::new();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            local.spawn_local(client_loop(
                id,
                nodes[id as usize % 2].node.url(),
                start,
                Rc::clone(&stop),
                Rc::clone(&history),
            ))
        })
        .collect();
    let schedule = async {
        // The schedule of faults, against the load the clients keep up meanwhile.
        tokio::time::sleep(Duration::from_millis(500)).await;
        nodes[2].node.signal(libc::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        nodes[2].node.signal(libc::SIGCONT);
        tokio::time::sleep(Duration::from_millis(500)).await;
        nodes[2].node.signal(libc::SIGKILL);
        nodes[2].node.wait_exit(Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        nodes[2].node = start_user_node(nodes[2].uid, &addrs[2], &addrs[0], &[]).await;
        converged(&nodes, &addrs).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Long enough for the failure detectors' verdict (a cut of 2.5 s, healed before it,
        // left node 2 SUSPECT in the others' view for over 20 s in some runs: see the notes).
        let cut = Cut::new(&nodes[1], &[&nodes[0], &nodes[2]]);
        tokio::time::sleep(Duration::from_millis(6000)).await;
        drop(cut);
        converged(&nodes, &addrs).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        *stop.borrow_mut() = true;
    };
    local
        .run_until(async {
            schedule.await;
            for c in clients {
                c.await.unwrap();
            }
        })
        .await;
    let history = history.borrow();
    let (ops, unknown) = history.counts();
    let acked = history
        .ops
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .count();
    println!("{ops} operations, {acked} acknowledged, {unknown} of unknown outcome");
    assert!(acked >= 200, "too little load to say anything: {acked}");
    let stale = stale_reads(&history);
    assert!(
        stale.is_empty(),
        "{} stale reads at QUORUM; the first:\n{}",
        stale.len(),
        stale[0]
    );
    match consistency::check(&history) {
        consistency::Verdict::NotLinearizable(reports) => {
            println!(
                "not linearizable (QUORUM does not promise it):\n{}",
                reports[0]
            )
        }
        verdict => println!("linearizability: {verdict:?}"),
    }
}
