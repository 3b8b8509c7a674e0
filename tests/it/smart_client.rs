//! The shard-aware client (`client/`) against clusters of real processes: each request goes
//! to a replica of its key, on the core that owns it; a node killed mid-load costs its Gets
//! nothing; a joining node and a node restarted with another core count are followed.

use crate::cluster::{free_cluster_port, metric_sum, start_node, wait_converged};
use crate::steering::stats;
use crate::support::{free_port, wait_until, Node};
use cache_client::{Client, Config, Consistency, Options};
use std::time::Duration;

/// Client requests each node has served (all cores, all codes).
async fn served(node: &Node) -> u64 {
    stats(node)
        .await
        .cores
        .iter()
        .flat_map(|c| c.requests.iter().map(|r| r.count))
        .sum()
}

/// Client requests that arrived on a core not owning their key, per node.
async fn client_hops(nodes: &[Node]) -> Vec<u64> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(stats(n).await.cores.iter().map(|c| c.client_hops).sum());
    }
    out
}

/// `n` converged nodes with 2 cores each and a metrics endpoint: (nodes, addrs, metrics).
async fn cluster_with_metrics(
    n: usize,
    extra: &[(&str, &str)],
) -> (Vec<Node>, Vec<String>, Vec<String>) {
    let addrs: Vec<String> = (0..n)
        .map(|_| format!("127.0.0.1:{}", free_cluster_port()))
        .collect();
    let metrics: Vec<String> = (0..n)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut nodes = Vec::new();
    for (a, m) in addrs.iter().zip(&metrics) {
        let mut env = vec![("CORES", "2"), ("METRICS_ADDR", m.as_str())];
        env.extend_from_slice(extra);
        nodes.push(start_node(a, &addrs[0], &env).await);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    (nodes, addrs, metrics)
}

/// Replica requests the nodes made, less the extra ones a read may add (a speculative retry
/// of a slow replica, a read repair of a stale one).
fn replica_calls(metrics: &[String]) -> f64 {
    metrics
        .iter()
        .map(|m| {
            let text = crate::metrics::scrape(m);
            metric_sum(&text, "cache_replica_calls_total", "")
                - metric_sum(&text, "cache_speculative_retries_total", "")
                - metric_sum(&text, "cache_read_repairs_total", "")
        })
        .sum()
}

/// Five nodes, RF=3: every Set is coordinated by one of its key's replicas (two replica
/// requests per Set over the cluster, not three) on the core that owns the key (no client
/// request hops between cores on any node), and every Get finds its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_a_replica_on_the_core_that_owns_the_key() {
    let (nodes, addrs, metrics) = cluster_with_metrics(5, &[]).await;
    let client = Client::connect(Config::new([addrs[0].clone()]))
        .await
        .unwrap();
    // The first request to each node asks its layout: warm every (node, core) up.
    for i in 0..200 {
        client.set(&format!("warm-{i}"), "v", None).await.unwrap();
    }
    let hops_before = client_hops(&nodes).await;
    let calls_before = replica_calls(&metrics);
    const SETS: usize = 300;
    for i in 0..SETS {
        client
            .set(&format!("key-{i}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    for i in 0..SETS {
        let got = client.get(&format!("key-{i}")).await.unwrap().unwrap();
        assert_eq!(got.as_bytes(), format!("v{i}").as_bytes());
    }
    assert_eq!(client.get("never-set").await.unwrap(), None);
    assert_eq!(
        client_hops(&nodes).await,
        hops_before,
        "client hops by node"
    );
    // Each Set: two replica requests from a coordinator that holds a copy (three from one
    // that does not); each QUORUM Get, the missing key's included: one (two). Hints would add
    // more.
    let calls = replica_calls(&metrics) - calls_before;
    assert_eq!(
        calls,
        (2 * SETS + SETS + 1) as f64,
        "replica requests over the cluster"
    );
    let replicas = client.replicas("key-0");
    assert_eq!(replicas.len(), 3, "{replicas:?}");
}

/// A node killed while Gets run at QUORUM: the Gets that were on it go to the key's next
/// replica; none fails. Bounded: 8 readers of at most 2,000 Gets each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_load_fails_no_get() {
    let (mut nodes, addrs, _) = cluster_with_metrics(3, &[("CAPACITY", "100000")]).await;
    let client = Client::connect(Config::new(addrs.clone())).await.unwrap();
    for i in 0..500 {
        client
            .set(&format!("k{i}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut readers = Vec::new();
    for r in 0..8 {
        let (client, done) = (client.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            for i in 0..2000usize {
                let key = format!("k{}", (i * 8 + r) % 500);
                let opts = Options::default().consistency(Consistency::Quorum);
                match client.get_with(&key, opts).await {
                    Ok(Some(v)) => {
                        assert_eq!(v.as_bytes(), format!("v{}", (i * 8 + r) % 500).as_bytes())
                    }
                    Ok(None) => failed.push(format!("{key}: missing")),
                    Err(e) => failed.push(format!("{key}: {e}")),
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            failed
        }));
    }
    wait_until(Duration::from_secs(20), "a quarter of the Gets", || {
        let done = done.clone();
        async move { done.load(std::sync::atomic::Ordering::Relaxed) >= 4000 }
    })
    .await;
    nodes[1].signal(libc::SIGKILL);
    nodes[1].wait_exit(Duration::from_secs(5)).await;
    let mut failed = Vec::new();
    for r in readers {
        failed.extend(r.await.unwrap());
    }
    assert!(
        failed.is_empty(),
        "{} Gets failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

/// A fourth node joins while a writer runs through the client: no write fails, and the
/// client places keys on the new ring (some keys have the new node among their replicas).
/// Then a node restarts with another core count: the client learns its new layout and its
/// requests still land on the owning cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_and_a_restart_with_other_cores_are_followed() {
    let (mut nodes, mut addrs, _) = cluster_with_metrics(3, &[("CAPACITY", "100000")]).await;
    let client = Client::connect(Config::new([addrs[0].clone()]))
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut failed = Vec::new();
            // Bounded: stopped by the test, at most 100k writes.
            for i in 0..100_000u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if let Err(e) = client.set(&format!("w{i}"), "v", None).await {
                    failed.push(format!("w{i}: {e}"));
                }
            }
            failed
        })
    };
    let a4 = format!("127.0.0.1:{}", free_cluster_port());
    nodes.push(start_node(&a4, &addrs[0], &[("CORES", "2"), ("CAPACITY", "100000")]).await);
    addrs.push(a4.clone());
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    wait_until(
        Duration::from_secs(10),
        "the client to place keys on node 4",
        || {
            let client = client.clone();
            let a4 = a4.clone();
            async move { (0..100).any(|i| client.replicas(&format!("p{i}")).contains(&a4)) }
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failed = writer.await.unwrap();
    assert!(
        failed.is_empty(),
        "writes failed during the join: {failed:?}"
    );

    // Node 3 restarts with one core instead of two (and comes back on another shard-aware
    // port): the client must not keep sending to its old layout.
    nodes[2].signal(libc::SIGKILL);
    nodes[2].wait_exit(Duration::from_secs(5)).await;
    nodes[2] = start_node(
        &addrs[2],
        &addrs[0],
        &[("CORES", "1"), ("CAPACITY", "100000")],
    )
    .await;
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    // Requests whose first replica is node 3: they succeed once the client re-learned it.
    let mine: Vec<String> = (0..2000)
        .map(|i| format!("r{i}"))
        .filter(|k| client.replicas(k).first() == Some(&addrs[2]))
        .take(50)
        .collect();
    assert!(!mine.is_empty());
    // Node 3 itself serves the ones the client sends it, not the next replica as it would
    // while the client kept dialing its old shard-aware port. (Under a loaded machine the
    // failure detector may hold node 3 down for a moment: the client then sends its keys
    // elsewhere, so only those it routed to node 3 count.)
    let node3 = &nodes[2];
    wait_until(Duration::from_secs(20), "node 3 to serve its keys", || {
        let (client, mine, a3) = (client.clone(), mine.clone(), addrs[2].clone());
        async move {
            let before = served(node3).await;
            let mut routed = 0;
            for k in &mine {
                routed += u64::from(client.replicas(k).first() == Some(&a3));
                client.set(k, "v", None).await.unwrap();
            }
            routed > 0 && served(node3).await - before == routed
        }
    })
    .await;
    // Node 3 (one core) and the others (two cores) are all reached on the owning core.
    let before = client_hops(&nodes).await;
    for i in 0..200 {
        client.set(&format!("after-{i}"), "v", None).await.unwrap();
    }
    assert_eq!(client_hops(&nodes).await, before);
}
