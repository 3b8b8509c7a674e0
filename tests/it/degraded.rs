//! Degraded mode with a real cut: three nodes on loopback, each run as its own user, and
//! iptables rules on OUTPUT matched by those users (`-m owner`) dropping every packet between
//! one node and the other two, TCP and gossip alike, while clients (this test, as root) still
//! reach all three. A SIGSTOPped replica is the slow-not-dead case. Needs root and iptables.

use crate::cluster::{free_cluster_port, get, members, set, value_of, wait_converged};
use crate::metrics::{scrape, sum};
use crate::support::{free_port, wait_until, Node};
use distributed_cache::pb::{
    cache_service_client::CacheServiceClient, node_service_client::NodeServiceClient, Consistency,
    LayoutRequest, SetRequest,
};
use std::{
    process::Command,
    time::{Duration, Instant},
};
use tonic::{transport::Channel, Code};

/// A node run as user `uid`, so that iptables can tell its packets from everyone else's.
pub struct UserNode {
    pub node: Node,
    pub uid: u32,
    /// ADDR's port (gRPC and gossip), then the shard-aware port if the node has one: a cut
    /// that missed the latter would leave replica calls flowing (a partial partition).
    pub ports: Vec<u16>,
}

/// Starts (or restarts) the node of `uid` on `addr`, seeded by `seed`.
pub async fn start_user_node(uid: u32, addr: &str, seed: &str, extra: &[(&str, &str)]) -> UserNode {
    let (reuid, regid) = (format!("--reuid={uid}"), format!("--regid={uid}"));
    let wrapper = ["setpriv", &reuid, &regid, "--clear-groups"];
    let mut env = vec![("ADDR", addr), ("PEERS", seed), ("RPC_TIMEOUT", "20")];
    env.extend_from_slice(extra);
    let node = Node::start_with(Some(&wrapper), &env).await;
    let mut ports = vec![addr.rsplit(':').next().unwrap().parse().unwrap()];
    let mut layout = NodeServiceClient::connect(node.url())
        .await
        .expect("NodeService connects");
    let mut ask = tonic::Request::new(LayoutRequest {});
    ask.set_timeout(Duration::from_secs(10));
    let shard_port = layout
        .layout(ask)
        .await
        .unwrap_or_else(|e| panic!("Layout answers: {e}; the node's log:\n{}", node.log()))
        .into_inner()
        .shard_port;
    if shard_port != 0 {
        ports.push(shard_port as u16);
    }
    UserNode { node, uid, ports }
}

/// The user id of one test's node `i` (at most 8 per test): distinct from other tests' (by
/// process id and a tag) and far above any real account.
pub fn uid(tag: u32, i: u32) -> u32 {
    assert!(i < 8 && tag < 16);
    200_000 + (std::process::id() % 10_000) * 128 + tag * 8 + i
}

/// Three converged nodes; `first_extra` is more environment for the first one, `extra` for
/// every one.
pub async fn user_cluster(
    tag: u32,
    first_extra: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> Vec<UserNode> {
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_cluster_port()))
        .collect();
    let mut nodes = Vec::new();
    for (i, uid) in (0..3).map(|i| uid(tag, i)).enumerate() {
        let mut env = extra.to_vec();
        if i == 0 {
            env.extend_from_slice(first_extra);
        }
        nodes.push(start_user_node(uid, &addrs[i], &addrs[0], &env).await);
    }
    let refs: Vec<&Node> = nodes.iter().map(|n| &n.node).collect();
    wait_converged(&refs, &addrs).await;
    nodes
}

fn iptables(args: &[&str]) -> bool {
    Command::new("iptables")
        .arg("-w")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Every packet between `cut` and `others` dropped, both ways, until healed or dropped.
pub struct Cut {
    chain: String,
}

impl Cut {
    pub fn new(cut: &UserNode, others: &[&UserNode]) -> Cut {
        let chain = format!("DC_CUT_{}_{}", std::process::id(), cut.ports[0]);
        assert!(
            iptables(&["-N", &chain]) && iptables(&["-I", "OUTPUT", "-j", &chain]),
            "this test needs root and iptables (apt-get install iptables)"
        );
        let cut_ = Cut { chain };
        for other in others {
            let one_way = other.ports.iter().map(|&p| (cut.uid, p));
            let other_way = cut.ports.iter().map(|&p| (other.uid, p));
            for (from, to) in one_way.chain(other_way) {
                for proto in ["tcp", "udp"] {
                    assert!(iptables(&[
                        "-A",
                        &cut_.chain,
                        "-m",
                        "owner",
                        "--uid-owner",
                        &from.to_string(),
                        "-p",
                        proto,
                        "--dport",
                        &to.to_string(),
                        "-j",
                        "DROP",
                    ]));
                }
            }
        }
        cut_
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        iptables(&["-D", "OUTPUT", "-j", &self.chain]);
        iptables(&["-F", &self.chain]);
        iptables(&["-X", &self.chain]);
    }
}

async fn client(node: &Node) -> CacheServiceClient<Channel> {
    let channel = Channel::from_shared(node.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("client connects");
    CacheServiceClient::new(channel)
}

fn with_deadline<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// QUORUM Sets and Gets through `c` for `rounds` rounds over `keys` keys: every one succeeds
/// and every Get sees the value its key was last set to. Returns the slowest request.
async fn keeps_serving(
    c: &mut CacheServiceClient<Channel>,
    keys: usize,
    rounds: usize,
    tag: &str,
) -> Duration {
    let mut slowest = Duration::ZERO;
    for round in 0..rounds {
        for k in 0..keys {
            let key = format!("k{k}");
            let value = format!("{tag}-{round}");
            let t = Instant::now();
            let r = c
                .set(with_deadline(set(&key, &value), Duration::from_secs(10)))
                .await;
            assert!(r.is_ok(), "Set {key} in {tag} round {round}: {r:?}");
            let got = c
                .get(with_deadline(
                    get(&key, Consistency::Quorum),
                    Duration::from_secs(10),
                ))
                .await
                .unwrap_or_else(|e| panic!("Get {key} in {tag} round {round}: {e:?}"));
            assert_eq!(value_of(got.get_ref()), value, "{key} in {tag}");
            slowest = slowest.max(t.elapsed());
        }
    }
    slowest
}

fn states(m: &[(String, String)], addr: &str) -> Option<String> {
    m.iter().find(|(a, _)| a == addr).map(|(_, s)| s.clone())
}

#[tokio::test]
async fn a_cut_replica_leaves_quorum_through_healthy_nodes_and_the_cut_node_fails_fast() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let nodes = user_cluster(1, &[("METRICS_ADDR", metrics.as_str())], &[]).await;
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut c1 = client(&n1.node).await;
    let mut c2 = client(&n2.node).await;
    keeps_serving(&mut c1, 50, 1, "before").await;

    let cut = Cut::new(n2, &[n1, n3]);
    let cut_at = Instant::now();
    // A request through the cut-off node, sent as the cut begins, with a long deadline: it
    // must end UNAVAILABLE once the node's failure detector gives up on its peers, not at the
    // deadline.
    let early = tokio::spawn({
        let mut c2 = c2.clone();
        async move {
            let t = Instant::now();
            let r = c2
                .set(with_deadline(
                    set("k0", "through-2"),
                    Duration::from_secs(60),
                ))
                .await;
            (r.map(|_| ()).map_err(|e| e.code()), t.elapsed())
        }
    });

    // Right after the cut, before any failure detector has a verdict.
    keeps_serving(&mut c1, 50, 2, "just-cut").await;
    wait_until(
        Duration::from_secs(20),
        "node 1 to see node 2 DOWN",
        || async { states(&members(&n1.node).await, &n2.node.addr).as_deref() == Some("DOWN") },
    )
    .await;
    keeps_serving(&mut c1, 50, 2, "down").await;
    let m = scrape(&metrics);
    assert!(
        sum(&m, "cache_replicas_skipped_down_total", &[]) > 0.0,
        "DOWN replicas are left out and counted"
    );
    assert!(m.contains("cache_peer_latency_score_seconds{"), "{m}");

    // The cut-off node: UNAVAILABLE well before the 60 s deadline for the early request, and
    // at once when its detector already holds both peers DOWN.
    let (early, took) = early.await.unwrap();
    assert_eq!(early, Err(Code::Unavailable), "after {took:?}");
    assert!(took < Duration::from_secs(15), "UNAVAILABLE after {took:?}");
    wait_until(
        Duration::from_secs(20),
        "node 2 to see both peers DOWN",
        || async {
            let m = members(&n2.node).await;
            [&n1.node.addr, &n3.node.addr]
                .iter()
                .all(|a| states(&m, a).as_deref() == Some("DOWN"))
        },
    )
    .await;
    for _ in 0..5 {
        let t = Instant::now();
        let set = c2
            .set(with_deadline(set("k1", "x"), Duration::from_secs(30)))
            .await
            .unwrap_err();
        let get = c2
            .get(with_deadline(
                get("k1", Consistency::Quorum),
                Duration::from_secs(30),
            ))
            .await
            .unwrap_err();
        assert_eq!(
            (set.code(), get.code()),
            (Code::Unavailable, Code::Unavailable)
        );
        assert!(get.message().contains("live replicas"), "{get:?}");
        // LINEARIZABLE needs a majority too, and says so the same way.
        let lin = SetRequest {
            consistency: Consistency::Linearizable as i32,
            ..crate::cluster::set("k1", "x")
        };
        let lin = c2
            .set(with_deadline(lin, Duration::from_secs(30)))
            .await
            .unwrap_err();
        assert_eq!(lin.code(), Code::Unavailable);
        assert!(lin.message().contains("1 of 3 up, 2 needed"), "{lin:?}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    // A level this node can meet alone still works.
    let one = SetRequest {
        consistency: Consistency::One as i32,
        ..set("solo", "v")
    };
    c2.set(with_deadline(one, Duration::from_secs(5)))
        .await
        .expect("a write at ONE needs only this node");

    // Healed: node 2 catches up (hints), and QUORUM reads through it see the last writes.
    drop(cut);
    let elapsed = cut_at.elapsed();
    let addrs: Vec<String> = nodes.iter().map(|n| n.node.addr.clone()).collect();
    let refs: Vec<&Node> = nodes.iter().map(|n| &n.node).collect();
    wait_converged(&refs, &addrs).await;
    for k in 0..50 {
        let got = c2
            .get(with_deadline(
                get(&format!("k{k}"), Consistency::Quorum),
                Duration::from_secs(10),
            ))
            .await
            .unwrap_or_else(|e| panic!("k{k} after the heal ({elapsed:?} cut): {e:?}"));
        // The early write through node 2 is older than these, and the refused ones were made
        // nowhere.
        assert_eq!(value_of(got.get_ref()), "down-1", "k{k}");
    }
}

#[tokio::test]
async fn a_paused_replica_does_not_hold_quorum_reads_or_writes() {
    let nodes = user_cluster(2, &[], &[]).await;
    let mut c1 = client(&nodes[0].node).await;
    keeps_serving(&mut c1, 50, 1, "before").await;
    nodes[1].node.signal(libc::SIGSTOP);
    let paused = keeps_serving(&mut c1, 50, 3, "paused").await;
    nodes[1].node.signal(libc::SIGCONT);
    // The paused replica holds nothing up to the client's deadline (10 s).
    assert!(paused < Duration::from_secs(5), "slowest {paused:?}");
    let addrs: Vec<String> = nodes.iter().map(|n| n.node.addr.clone()).collect();
    let refs: Vec<&Node> = nodes.iter().map(|n| &n.node).collect();
    wait_converged(&refs, &addrs).await;
    let mut c2 = client(&nodes[1].node).await;
    for k in 0..50 {
        let got = c2
            .get(get(&format!("k{k}"), Consistency::Quorum))
            .await
            .unwrap();
        assert_eq!(value_of(got.get_ref()), "paused-2");
    }
}

/// A cut shorter than the failure detector's verdict, healed: every node sees every other
/// ALIVE again within seconds. (foca drops its pending timers when a peer tells it that it
/// was down, and a member it suspected just before stayed SUSPECT for good in about one run
/// in four; membership.rs ends such suspicions.)
#[tokio::test]
async fn a_short_cut_healed_before_the_verdict_leaves_nobody_suspect() {
    let nodes = user_cluster(9, &[], &[]).await;
    let addrs: Vec<String> = nodes.iter().map(|n| n.node.addr.clone()).collect();
    let refs: Vec<&Node> = nodes.iter().map(|n| &n.node).collect();
    for _ in 0..3 {
        let cut = Cut::new(&nodes[1], &[&nodes[0], &nodes[2]]);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        drop(cut);
        // Within wait_converged's 20 s; stuck suspicions lasted over 25 s.
        wait_converged(&refs, &addrs).await;
    }
}
