//! Clusters of real processes on loopback: placement, quorum, failures, repair, joins and
//! leaves. Each node has its own free port (TCP for gRPC, the same number over UDP for gossip).

use crate::support::{free_port, wait_until, Node};
use distributed_cache::pb::{
    get_response, node_service_client::NodeServiceClient, set_request, Consistency, GetRequest,
    MembersRequest, SetRequest, Version,
};
use std::time::{Duration, Instant};
use tonic::Code;

/// A free port whose number is also free over UDP.
pub fn free_cluster_port() -> u16 {
    loop {
        let p = free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

pub fn set(key: &str, value: &str) -> SetRequest {
    SetRequest {
        key: key.into(),
        payload: Some(set_request::Payload::Value(value.into())),
        ..Default::default()
    }
}

pub fn get(key: &str, level: Consistency) -> GetRequest {
    GetRequest {
        key: key.into(),
        consistency: level as i32,
    }
}

pub async fn start_node(addr: &str, seed: &str, extra: &[(&str, &str)]) -> Node {
    let mut env = vec![("ADDR", addr), ("PEERS", seed), ("RPC_TIMEOUT", "2")];
    env.extend_from_slice(extra);
    Node::start(&env).await
}

/// Members as `node` sees them: (addr, state).
pub async fn members(node: &Node) -> Vec<(String, String)> {
    let Ok(channel) = tonic::transport::Endpoint::from_shared(node.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
    else {
        return Vec::new();
    };
    let mut ask = tonic::Request::new(MembersRequest {});
    ask.set_timeout(Duration::from_secs(2));
    match NodeServiceClient::new(channel).members(ask).await {
        Ok(r) => r
            .into_inner()
            .members
            .into_iter()
            .map(|m| (m.addr, m.state))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Waits until every node sees every address in `addrs` as ALIVE.
pub async fn wait_converged(nodes: &[&Node], addrs: &[String]) {
    for node in nodes {
        wait_until(
            Duration::from_secs(20),
            "membership to converge",
            || async {
                let m = members(node).await;
                addrs
                    .iter()
                    .all(|a| m.iter().any(|(addr, state)| addr == a && state == "ALIVE"))
            },
        )
        .await;
    }
}

pub async fn cluster(n: usize, extra: &[(&str, &str)]) -> (Vec<Node>, Vec<String>) {
    cluster_on_host(n, "127.0.0.1", extra).await
}

/// `n` converged nodes whose ADDR is `host`:port.
pub async fn cluster_on_host(
    n: usize,
    host: &str,
    extra: &[(&str, &str)],
) -> (Vec<Node>, Vec<String>) {
    let addrs: Vec<String> = (0..n)
        .map(|_| format!("{host}:{}", free_cluster_port()))
        .collect();
    let mut nodes = Vec::new();
    for a in &addrs {
        nodes.push(start_node(a, &addrs[0], extra).await);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    (nodes, addrs)
}

pub fn value_of(r: &distributed_cache::pb::GetResponse) -> String {
    match &r.payload {
        Some(get_response::Payload::Value(v)) => v.clone(),
        other => panic!("unexpected payload {other:?}"),
    }
}

#[tokio::test]
async fn set_through_one_node_get_through_another() {
    let (nodes, _) = cluster(3, &[]).await;
    let mut c1 = nodes[0].client().await.unwrap();
    let mut c3 = nodes[2].client().await.unwrap();
    let v = c1
        .set(set("foo", "bar"))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    let got = c3
        .get(get("foo", Consistency::Quorum))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(value_of(&got), "bar");
    assert_eq!(got.version.unwrap(), v, "the same version on every node");
    // Every node can coordinate, for keys on every core.
    for i in 0..50 {
        let mut c = nodes[i % 3].client().await.unwrap();
        c.set(set(&format!("k{i}"), &format!("v{i}")))
            .await
            .unwrap();
        let mut r = nodes[(i + 1) % 3].client().await.unwrap();
        let got = r
            .get(get(&format!("k{i}"), Consistency::Quorum))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(value_of(&got), format!("v{i}"));
    }
}

/// Nodes named by host name, as in a compose file: the cores' replica clients resolve the
/// names (on the executor's blocking thread) to the address each node bound.
#[tokio::test]
async fn nodes_named_by_host_name_replicate() {
    let (nodes, _) = cluster_on_host(3, "localhost", &[]).await;
    let mut c1 = nodes[0].client().await.unwrap();
    for i in 0..20 {
        c1.set(set(&format!("named{i}"), "v")).await.unwrap();
    }
    // ALL needs an answer from every replica, so each node reached the others by name.
    for node in &nodes {
        let mut c = node.client().await.unwrap();
        for i in 0..20 {
            let got = c
                .get(get(&format!("named{i}"), Consistency::All))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(value_of(&got), "v");
        }
    }
}

#[tokio::test]
async fn quorum_survives_one_failure_and_refuses_on_two_then_recovers() {
    let (mut nodes, addrs) = cluster(3, &[]).await;
    let mut c1 = nodes[0].client().await.unwrap();
    c1.set(set("before", "1")).await.unwrap();

    nodes[2].signal(libc::SIGKILL);
    nodes[2].wait_exit(Duration::from_secs(5)).await;
    for i in 0..20 {
        c1.set(set(&format!("one-down-{i}"), "x")).await.unwrap();
        let mut c2 = nodes[1].client().await.unwrap();
        let got = c2
            .get(get(&format!("one-down-{i}"), Consistency::Quorum))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(value_of(&got), "x");
    }
    assert_eq!(
        value_of(
            &c1.get(get("before", Consistency::Quorum))
                .await
                .unwrap()
                .into_inner()
        ),
        "1"
    );

    nodes[1].signal(libc::SIGKILL);
    nodes[1].wait_exit(Duration::from_secs(5)).await;
    let started = Instant::now();
    let err = c1.set(set("two-down", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("1 of 2"),
        "names the count: {}",
        err.message()
    );
    let err = c1
        .get(get("before", Consistency::Quorum))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused quickly, not a hang: {:?}",
        started.elapsed()
    );
    // ONE still works on the survivor.
    assert_eq!(
        value_of(
            &c1.get(get("before", Consistency::One))
                .await
                .unwrap()
                .into_inner()
        ),
        "1"
    );

    // Restart both with the same addresses: they rejoin as themselves.
    nodes[1] = start_node(&addrs[1], &addrs[0], &[]).await;
    nodes[2] = start_node(&addrs[2], &addrs[0], &[]).await;
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    wait_until(Duration::from_secs(10), "writes to succeed again", || {
        let mut c = c1.clone();
        async move { c.set(set("after", "y")).await.is_ok() }
    })
    .await;
    let mut c3 = nodes[2].client().await.unwrap();
    assert_eq!(
        value_of(
            &c3.get(get("after", Consistency::Quorum))
                .await
                .unwrap()
                .into_inner()
        ),
        "y"
    );
}

#[tokio::test]
async fn concurrent_writers_converge_on_the_highest_version() {
    let (nodes, _) = cluster(3, &[]).await;
    let mut writers = Vec::new();
    for (w, node) in nodes.iter().enumerate() {
        let mut c = node.client().await.unwrap();
        writers.push(tokio::spawn(async move {
            let mut versions: Vec<(Version, String)> = Vec::new();
            for i in 0..50 {
                let value = format!("w{w}-{i}");
                if let Ok(r) = c.set(set("contended", &value)).await {
                    versions.push((r.into_inner().version.unwrap(), value));
                }
            }
            versions
        }));
    }
    let mut all = Vec::new();
    for w in writers {
        all.extend(w.await.unwrap());
    }
    let (winner_version, winner_value) = all
        .iter()
        .max_by_key(|(v, _)| (v.hlc, v.node))
        .cloned()
        .unwrap();
    for node in &nodes {
        let mut c = node.client().await.unwrap();
        let got = c
            .get(get("contended", Consistency::Quorum))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.version.unwrap(), winner_version);
        assert_eq!(value_of(&got), winner_value);
    }
}

#[tokio::test]
async fn a_read_repairs_a_stale_replica() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_cluster_port()))
        .collect();
    // Read repair alone: anti-entropy would bring node 3 up to date by itself.
    let no_ae = ("ANTI_ENTROPY", "off");
    let mut nodes = vec![
        start_node(
            &addrs[0],
            &addrs[0],
            &[("METRICS_ADDR", &metrics_addr), no_ae],
        )
        .await,
    ];
    for a in &addrs[1..] {
        nodes.push(start_node(a, &addrs[0], &[no_ae]).await);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    let mut c1 = nodes[0].client().await.unwrap();
    // Node 3 restarts empty, so it is stale for everything written before.
    c1.set(set("repair-me", "fresh")).await.unwrap();
    nodes[2].signal(libc::SIGKILL);
    nodes[2].wait_exit(Duration::from_secs(5)).await;
    nodes[2] = start_node(&addrs[2], &addrs[0], &[no_ae]).await;
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    let mut c3 = nodes[2].client().await.unwrap();
    // A ONE read coordinated by node 3 answers from its own replica first: stale.
    let err = c3
        .get(get("repair-me", Consistency::One))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A read that involves every replica repairs node 3.
    let got = c1
        .get(get("repair-me", Consistency::All))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(value_of(&got), "fresh");
    wait_until(Duration::from_secs(5), "node 3 to be repaired", || {
        let mut c = c3.clone();
        async move {
            c.get(get("repair-me", Consistency::One))
                .await
                .map(|r| value_of(&r.into_inner()) == "fresh")
                .unwrap_or(false)
        }
    })
    .await;
    // The coordinator counted the repair, its replica calls and the members it sees.
    let text = crate::metrics::scrape(&metrics_addr);
    let sum = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    assert!(sum("cache_read_repairs_total") >= 1.0, "{text}");
    assert!(sum("cache_replica_calls_total{") >= 2.0, "{text}");
    // Replica bytes on the wire, framing included: each call is at least a HEADERS and a
    // DATA frame (9-byte headers) with its message, and no call carries a kilobyte here.
    let calls = sum("cache_replica_calls_total{");
    let sent = crate::metrics::sum(&text, "cache_peer_bytes_total", &[("direction", "sent")]);
    let received = crate::metrics::sum(
        &text,
        "cache_peer_bytes_total",
        &[("direction", "received")],
    );
    assert!(sent >= 30.0 * calls && received >= 20.0 * calls, "{text}");
    // Each connection's preface and SETTINGS come on top of the calls.
    assert!(sent <= 1000.0 * calls + 8_000.0, "{text}");
    assert!(text.contains("cache_members{state=\"ALIVE\"} 3"), "{text}");
}

#[tokio::test]
async fn join_and_graceful_leave_under_a_writer() {
    let (mut nodes, mut addrs) = cluster(3, &[]).await;
    let mut c1 = nodes[0].client().await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let writer = {
        let stop = stop.clone();
        let mut c = c1.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            // Bounded: at most 200k writes, stopped by the test long before.
            for i in 0..200_000u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match c.set(set(&format!("live-{i}"), "v")).await {
                    Ok(_) => ok += 1,
                    // When, and which key: a failure is placed against the timeline below.
                    Err(e) => failed.push((started.elapsed(), format!("live-{i}"), e)),
                }
            }
            (ok, failed)
        })
    };
    let mut timeline = Vec::new();
    // A 4th node joins.
    let a4 = format!("127.0.0.1:{}", free_cluster_port());
    let metrics4 = format!("127.0.0.1:{}", free_port());
    nodes.push(start_node(&a4, &addrs[0], &[("METRICS_ADDR", &metrics4)]).await);
    addrs.push(a4);
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    timeline.push((started.elapsed(), "all four converged"));
    // One topology change at a time, as an operator would: until the joiner has received
    // its buckets its acknowledgements do not count toward a quorum, so a leave meanwhile
    // could leave a key's write with too few settled replicas.
    wait_until(
        Duration::from_secs(20),
        "the joiner to receive its buckets",
        || async {
            let text = crate::metrics::scrape(&metrics4);
            metric_sum(&text, "cache_syncing_buckets", "") == 0.0
        },
    )
    .await;
    timeline.push((started.elapsed(), "the joiner settled; node 2 leaves"));
    // Node 2 leaves gracefully.
    nodes[1].signal(libc::SIGTERM);
    let status = nodes[1].wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    timeline.push((started.elapsed(), "node 2 exited"));
    let gone = addrs[1].clone();
    wait_until(
        Duration::from_secs(10),
        "the leaver to be out of the ring",
        || async {
            let m = members(&nodes[0]).await;
            !m.iter().any(|(a, s)| *a == gone && s == "ALIVE")
        },
    )
    .await;
    // A little more load on the new topology, then stop.
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        c1.set(set("after-leave", "x")).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = writer.await.unwrap();
    assert!(ok > 100, "{ok} writes");
    assert!(
        failed.is_empty(),
        "writes failed during join/leave: {failed:?}; timeline {timeline:?}"
    );
}

#[tokio::test]
async fn five_nodes_spread_keys_within_15_percent() {
    let (nodes, _) = cluster(5, &[("CAPACITY", "100000")]).await;
    let mut c = nodes[0].client().await.unwrap();
    for i in 0..10_000 {
        c.set(set(&format!("spread-{i}"), "v")).await.unwrap();
    }
    // Writes past the quorum finish in the background: wait for all 30,000 copies.
    wait_until(
        Duration::from_secs(20),
        "every replica write to land",
        || async { held(&nodes).await.iter().sum::<u64>() == 30_000 },
    )
    .await;
    let held = held(&nodes).await;
    let mean = 30_000.0 / 5.0;
    for (i, n) in held.iter().enumerate() {
        let off = (*n as f64 - mean).abs() / mean;
        assert!(
            off <= 0.15,
            "node {i} holds {n}, {:.1}% from the mean {mean}",
            off * 100.0
        );
    }
}

/// Sum of the samples of every series of `name` whose labels contain `label` (all cores).
pub fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test]
async fn hinted_handoff_brings_a_restarted_replica_up_to_date_with_no_reads() {
    const KEYS: usize = 1000;
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_cluster_port()))
        .collect();
    // Room for every key: the default CAPACITY (1000) would evict some. Hints alone:
    // anti-entropy would also bring node 3 up to date (tested in movement.rs).
    let room = ("CAPACITY", "100000");
    let no_ae = ("ANTI_ENTROPY", "off");
    let mut nodes = vec![
        start_node(
            &addrs[0],
            &addrs[0],
            &[("METRICS_ADDR", &metrics_addr), room, no_ae],
        )
        .await,
    ];
    for a in &addrs[1..] {
        nodes.push(start_node(a, &addrs[0], &[room, no_ae]).await);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;

    nodes[2].signal(libc::SIGKILL);
    nodes[2].wait_exit(Duration::from_secs(5)).await;
    // RF=3, W=2: every write succeeds on nodes 1 and 2 and leaves a hint for node 3.
    let mut c1 = nodes[0].client().await.unwrap();
    for i in 0..KEYS {
        c1.set(set(&format!("hint-{i}"), &format!("v{i}")))
            .await
            .unwrap_or_else(|e| panic!("set hint-{i} with node 3 down: {e}"));
    }
    let text = crate::metrics::scrape(&metrics_addr);
    assert_eq!(
        metric_sum(&text, "cache_hints_total", "event=\"stored\""),
        KEYS as f64,
        "{text}"
    );

    // Restarted empty with the same address, it is still an owner; nobody reads the keys.
    nodes[2] = start_node(&addrs[2], &addrs[0], &[room, no_ae]).await;
    let mut c3 = nodes[2].client().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut missing: Vec<usize> = (0..KEYS).collect();
    while !missing.is_empty() {
        assert!(
            Instant::now() < deadline,
            "node 3 still lacks {} keys, e.g. hint-{}; node 1 metrics:\n{}",
            missing.len(),
            missing[0],
            crate::metrics::scrape(&metrics_addr)
        );
        let mut still = Vec::new();
        for i in missing {
            // ONE through node 3 answers from node 3's own replica.
            match c3.get(get(&format!("hint-{i}"), Consistency::One)).await {
                Ok(r) => assert_eq!(value_of(&r.into_inner()), format!("v{i}")),
                Err(e) if e.code() == Code::NotFound => still.push(i),
                Err(e) => panic!("ONE read of hint-{i} on node 3: {e}"),
            }
        }
        missing = still;
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let text = crate::metrics::scrape(&metrics_addr);
    assert_eq!(
        metric_sum(&text, "cache_hints_total", "event=\"delivered\""),
        KEYS as f64,
        "{text}"
    );
    assert_eq!(metric_sum(&text, "cache_hints_queued", ""), 0.0, "{text}");
}

/// Entries each node holds (all its cores), from its Stats RPC.
pub async fn held(nodes: &[Node]) -> Vec<u64> {
    let mut out = Vec::new();
    for node in nodes {
        let stats = crate::steering::stats(node).await;
        out.push(stats.cores.iter().map(|c| c.entries).sum::<u64>());
    }
    out
}

/// Writes `keys` keys through the node at `url` from 32 tasks, each on its own connection
/// (as many clients would); returns the failures.
async fn write_concurrently(url: String, prefix: &str, keys: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for t in 0..32 {
        let prefix = prefix.to_string();
        let channel = tonic::transport::Channel::from_shared(url.clone())
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap();
        let mut c = distributed_cache::pb::cache_service_client::CacheServiceClient::new(channel);
        tasks.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            for i in (t..keys).step_by(32) {
                if let Err(e) = c.set(set(&format!("{prefix}{i}"), "v")).await {
                    failed.push(format!("{prefix}{i}: {e}"));
                }
            }
            failed
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        failed.extend(t.await.unwrap());
    }
    failed
}

/// A peer killed while replica calls to it are in flight, and restarted empty: every write
/// still succeeds at QUORUM (the two others acknowledge), the calls that failed reach it as
/// hints once it is back, and anti-entropy brings back what it held before (its process took
/// those to the grave: no hint covers a call that had succeeded).
#[tokio::test]
async fn a_peer_restarting_under_load_loses_no_write() {
    const KEYS: usize = 10_000;
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_cluster_port()))
        .collect();
    let room = ("CAPACITY", "100000");
    let fast_ae = ("ANTI_ENTROPY_INTERVAL", "1");
    let metrics: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut nodes = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let mut env = vec![room, fast_ae];
        if let Some(m) = metrics.get(i) {
            env.push(("METRICS_ADDR", m.as_str()));
        }
        nodes.push(start_node(a, &addrs[0], &env).await);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    let writer = tokio::spawn(write_concurrently(nodes[0].url(), "r", KEYS));
    // Kill node 3 once writes are flowing to it.
    wait_until(
        Duration::from_secs(10),
        "writes to reach node 3",
        || async { held(&nodes[2..]).await[0] > 100 },
    )
    .await;
    nodes[2].signal(libc::SIGKILL);
    nodes[2].wait_exit(Duration::from_secs(5)).await;
    nodes[2] = start_node(&addrs[2], &addrs[0], &[room, fast_ae]).await;
    let failed = writer.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = held(&nodes).await;
        let text = crate::metrics::scrape(&metrics[0]);
        let stored = metric_sum(&text, "cache_hints_total", "event=\"stored\"");
        let delivered = metric_sum(&text, "cache_hints_total", "event=\"delivered\"");
        if h[2] == KEYS as u64 && delivered == stored {
            assert!(
                stored > 0.0,
                "no call failed: the kill came after the load\n{text}"
            );
            break;
        }
        if Instant::now() > deadline {
            let hints: Vec<String> = metrics
                .iter()
                .map(|m| {
                    crate::metrics::scrape(m)
                        .lines()
                        .filter(|l| {
                            l.starts_with("cache_hints") || l.starts_with("cache_replica_calls")
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .collect();
            panic!(
                "nodes hold {h:?} of {KEYS} keys; hints of nodes 1 and 2:\n{}",
                hints.join("\n--\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
