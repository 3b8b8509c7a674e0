//! No data left behind, with real processes on loopback: a join and a graceful leave move data
//! so that every key stays on exactly REPLICATION_FACTOR nodes, anti-entropy alone brings a
//! restarted node up to date, and a single diverged key is repaired for a small exchange.

use crate::cluster::{
    cluster, free_cluster_port, get, held, metric_sum, set, start_node, value_of, wait_converged,
};
use crate::support::{free_port, wait_until, Node};
use distributed_cache::cluster::ring::{Ring, DEFAULT_VNODES};
use distributed_cache::pb::{peer_service_client::PeerServiceClient, Consistency, ReplicaWrite};
use std::time::Duration;

/// Writes `n` keys `{prefix}{i}` -> `v{i}` through `node`, 32 at a time.
async fn write_keys(node: &Node, prefix: &str, n: usize) {
    let client = node.client().await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..32 {
        let mut c = client.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (t..n).step_by(32) {
                c.set(set(&format!("{prefix}{i}"), &format!("v{i}")))
                    .await
                    .unwrap_or_else(|e| panic!("set {prefix}{i}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Reads every key `{prefix}{i}` through `node` at `level`; returns the keys that did not
/// read back as `v{i}`, with what came instead.
async fn unreadable(node: &Node, prefix: &str, n: usize, level: Consistency) -> Vec<String> {
    let client = node.client().await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..32 {
        let mut c = client.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut bad = Vec::new();
            for i in (t..n).step_by(32) {
                let key = format!("{prefix}{i}");
                match c.get(get(&key, level)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        if value_of(&r) != format!("v{i}") {
                            bad.push(format!("{key}: {:?}", r.payload));
                        }
                    }
                    Err(e) => bad.push(format!("{key}: {:?} {}", e.code(), e.message())),
                }
            }
            bad
        }));
    }
    let mut bad = Vec::new();
    for t in tasks {
        bad.extend(t.await.unwrap());
    }
    bad
}

/// Every key reads back at QUORUM through each of `nodes`.
async fn assert_every_key_reads_through_each(nodes: &[Node], prefix: &str, n: usize, when: &str) {
    for (i, node) in nodes.iter().enumerate() {
        let bad = unreadable(node, prefix, n, Consistency::Quorum).await;
        assert!(
            bad.is_empty(),
            "{when}, through node {} of {}: {} unreadable, e.g. {:?}",
            i + 1,
            nodes.len(),
            bad.len(),
            &bad[..bad.len().min(3)]
        );
    }
}

/// How many of the keys `{prefix}0..n` each node replicates on the ring over `addrs` (the
/// nodes' default VNODES and REPLICATION_FACTOR), in the order of `addrs`.
fn expected_holdings(addrs: &[String], prefix: &str, n: usize) -> Vec<u64> {
    let ring = Ring::new(addrs.iter().cloned(), DEFAULT_VNODES, 3);
    let mut counts = vec![0u64; addrs.len()];
    for i in 0..n {
        for r in ring.replicas(format!("{prefix}{i}").as_bytes()) {
            counts[addrs.iter().position(|a| a == r).expect("a ring node")] += 1;
        }
    }
    counts
}

const FAST_AE: (&str, &str) = ("ANTI_ENTROPY_INTERVAL", "1");
const ROOM: (&str, &str) = ("CAPACITY", "1000000");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_and_a_graceful_leave_keep_every_key_on_three_nodes() {
    const KEYS: usize = 10_000;
    let (mut nodes, mut addrs) = cluster(3, &[FAST_AE, ROOM]).await;
    write_keys(&nodes[0], "k", KEYS).await;
    wait_until(Duration::from_secs(30), "3 copies of every key", || async {
        held(&nodes).await.iter().sum::<u64>() == 3 * KEYS as u64
    })
    .await;

    // A 4th node joins: it receives its share, the others drop what they no longer replicate.
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let a4 = format!("127.0.0.1:{}", free_cluster_port());
    nodes.push(
        start_node(
            &a4,
            &addrs[0],
            &[FAST_AE, ROOM, ("METRICS_ADDR", &metrics_addr)],
        )
        .await,
    );
    addrs.push(a4);
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    // Each node ends up with exactly the keys the ring gives it: every key on exactly 3 nodes.
    let expected = expected_holdings(&addrs, "k", KEYS);
    wait_until(
        Duration::from_secs(60),
        "the 4th node's share to move and former replicas to drop theirs",
        || async { held(&nodes).await == expected },
    )
    .await;
    let h = held(&nodes).await;
    // Its share is about a quarter of the copies.
    assert!(
        (h[3] as f64 - 7500.0).abs() < 7500.0 * 0.3,
        "4th node holds {h:?}"
    );
    // It pulled part of it (the others pushed the rest in their own rounds).
    let text = crate::metrics::scrape(&metrics_addr);
    assert!(
        metric_sum(&text, "cache_anti_entropy_entries_total", "pulled") > 0.0,
        "{text}"
    );
    assert_every_key_reads_through_each(&nodes, "k", KEYS, "after the join").await;

    // An original node leaves gracefully: it hands its data over before it exits.
    nodes[0].signal(libc::SIGTERM);
    let status = nodes[0].wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", nodes[0].log());
    assert!(
        nodes[0].log().contains("handed off every bucket"),
        "{}",
        nodes[0].log()
    );
    drop(nodes.remove(0));
    addrs.remove(0);
    let expected = expected_holdings(&addrs, "k", KEYS);
    wait_until(
        Duration::from_secs(60),
        "3 copies of every key on the 3 remaining nodes",
        || async { held(&nodes).await == expected },
    )
    .await;
    assert_every_key_reads_through_each(&nodes, "k", KEYS, "after the leave").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_alone_brings_a_restarted_node_up_to_date() {
    const KEYS: usize = 1000;
    let no_hints = ("HINTED_HANDOFF", "off");
    let (mut nodes, addrs) = cluster(3, &[FAST_AE, ROOM, no_hints]).await;
    nodes[2].signal(libc::SIGKILL);
    nodes[2].wait_exit(Duration::from_secs(5)).await;
    write_keys(&nodes[0], "ae", KEYS).await;
    nodes[2] = start_node(&addrs[2], &addrs[0], &[FAST_AE, ROOM, no_hints]).await;
    // No client reads any key: node 3 fills by comparing digests with the others.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let h = held(&nodes).await;
        if h[2] == KEYS as u64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 3 holds {h:?} of {KEYS}:\n{}",
            nodes[2].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bad = unreadable(&nodes[2], "ae", KEYS, Consistency::One).await;
    assert!(
        bad.is_empty(),
        "{} unreadable at ONE on node 3, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
}

/// Sum of a metric over the scrapes of several nodes.
fn total(addrs: &[String], name: &str) -> f64 {
    addrs
        .iter()
        .map(|a| metric_sum(&crate::metrics::scrape(a), name, ""))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_diverged_key_in_100k_is_repaired_for_a_small_exchange() {
    const KEYS: usize = 100_000;
    let metrics: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_cluster_port()))
        .collect();
    let ae = ("ANTI_ENTROPY_INTERVAL", "2");
    let mut nodes = Vec::new();
    for (a, m) in addrs.iter().zip(&metrics) {
        nodes.push(start_node(a, &addrs[0], &[ae, ROOM, ("METRICS_ADDR", m)]).await);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    write_keys(&nodes[0], "d", KEYS).await;
    wait_until(Duration::from_secs(60), "3 copies of every key", || async {
        held(&nodes).await.iter().sum::<u64>() == 3 * KEYS as u64
    })
    .await;
    // Quiet: a full round everywhere (each node compares with both peers) after the load.
    let rounds_loaded = total(&metrics, "cache_anti_entropy_rounds_total");
    wait_until(Duration::from_secs(20), "a round on every node", || async {
        total(&metrics, "cache_anti_entropy_rounds_total") >= rounds_loaded + 6.0
    })
    .await;

    // One replica gets a newer version of one key behind everyone's back (the internal
    // protocol, as a write that reached only it would).
    let bytes_before = total(&metrics, "cache_anti_entropy_bytes_total");
    let rounds_before = total(&metrics, "cache_anti_entropy_rounds_total");
    let data_bytes = metric_sum(
        &crate::metrics::scrape(&metrics[0]),
        "cache_entry_bytes",
        "",
    );
    let mut peer = PeerServiceClient::connect(nodes[2].url()).await.unwrap();
    let newer = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
        + 60_000_000;
    peer.write(ReplicaWrite {
        key: b"d4242".to_vec(),
        value: b"diverged".to_vec(),
        hlc: newer << 12,
        node: 1,
        ttl_ms: 0,
        flags: 0,
    })
    .await
    .unwrap();

    // With no client reading it, the other replicas (ONE through a node reads only its own
    // replica) get the newer value from the next rounds.
    for node in &nodes[..2] {
        let c = node.client().await.unwrap();
        wait_until(
            Duration::from_secs(20),
            "the other replicas to be repaired",
            || {
                let mut c = c.clone();
                async move {
                    c.get(get("d4242", Consistency::One))
                        .await
                        .map(|r| value_of(&r.into_inner()) == "diverged")
                        .unwrap_or(false)
                }
            },
        )
        .await;
    }
    let exchanged = total(&metrics, "cache_anti_entropy_bytes_total") - bytes_before;
    let rounds = total(&metrics, "cache_anti_entropy_rounds_total") - rounds_before;
    let fraction = exchanged / data_bytes;
    println!(
        "anti-entropy: {exchanged} bytes in {rounds} rounds (3 nodes, each with both peers) to \
         repair 1 key of {KEYS}; one replica holds {data_bytes} bytes of entries: {:.3}%",
        fraction * 100.0
    );
    assert!(
        rounds >= 1.0 && exchanged > 0.0,
        "the repair was not counted"
    );
    assert!(
        fraction < 0.01,
        "{exchanged} bytes exchanged for {data_bytes} held"
    );
    // Every other key is untouched.
    let mut c1 = nodes[0].client().await.unwrap();
    let other = c1.get(get("d4243", Consistency::Quorum)).await.unwrap();
    assert_eq!(value_of(&other.into_inner()), "v4243");
}
