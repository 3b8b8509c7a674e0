//! Replica requests in batches (cluster/peer/batch.rs) on real nodes: one call whose items end
//! each their own way; a batch on a core not owning its keys; a peer killed while batches to it
//! are in flight, and restarted.

use crate::cluster::{
    free_cluster_port, get, metric_sum, set, start_node, value_of, wait_converged,
};
use crate::steering::{client_on_core, layout, replica_hops, T};
use crate::support::{free_port, on_glommio, Node};
use distributed_cache::{
    cluster::peer::unary::unary,
    pb::{
        replica_op::Op, replica_outcome::Outcome, Consistency, ReplicaBatch, ReplicaBatchReply,
        ReplicaEntry, ReplicaOp, ReplicaRead, ReplicaWrite,
    },
    routing::{owner_core, shard_of},
};
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tonic::Code;

fn write_op(key: &str, timeout: Duration) -> ReplicaOp {
    ReplicaOp {
        op: Some(Op::Write(ReplicaWrite {
            key: key.into(),
            value: b"v".to_vec(),
            hlc: 1 << 20,
            node: 7,
            ttl_ms: 0,
            flags: 0,
        })),
        timeout_us: timeout.as_micros() as u64,
    }
}

fn read_op(key: &str) -> ReplicaOp {
    ReplicaOp {
        op: Some(Op::Read(ReplicaRead { key: key.into() })),
        timeout_us: T.as_micros() as u64,
    }
}

/// Sends `ops` as one Batch call on a connection that lands on `core` of `node`.
async fn batch_on_core(node: &Node, core: u32, ops: Vec<ReplicaOp>) -> ReplicaBatchReply {
    let l = layout(node).await;
    let mut shard_addr: SocketAddr = node.addr.parse().unwrap();
    shard_addr.set_port(l.shard_port as u16);
    let authority = node.addr.clone();
    let cores = l.cores;
    tokio::task::spawn_blocking(move || {
        on_glommio(move || async move {
            let c = client_on_core(shard_addr, core, cores);
            let msg = ReplicaBatch { ops };
            unary(&c, &authority, "/pb.PeerService/Batch", &msg, T, 1 << 20)
                .await
                .expect("the batch is answered")
        })
    })
    .await
    .unwrap()
}

/// Keys whose owning core on a node with 2 cores and 8 shards is `core`.
fn keys_owned_by(core: usize, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|k| owner_core(shard_of(k.as_bytes(), 8), 2) == core)
        .take(n)
        .collect()
}

/// Items past their deadline, rejected, stored and read, in one call: each has its own
/// outcome, in order; only the stored one is stored. The batch reached the core that owns
/// none of its keys: the items it served were served there with one hop each, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_batch_answers_each_item_its_own_way_on_a_core_not_owning_its_keys() {
    let node = Node::start(&[("CORES", "2"), ("NUM_SHARDS", "8")]).await;
    let keys = keys_owned_by(1, "mixed-", 3);
    let (late, stored, absent) = (&keys[0], &keys[1], &keys[2]);
    let before = replica_hops(&node).await;
    let reply = batch_on_core(
        &node,
        0,
        vec![
            write_op(late, Duration::ZERO),
            write_op("", T),
            write_op(stored, T),
            read_op(absent),
        ],
    )
    .await;
    let outcomes: Vec<Outcome> = reply
        .outcomes
        .into_iter()
        .map(|o| o.outcome.expect("an outcome"))
        .collect();
    assert_eq!(outcomes.len(), 4, "{outcomes:?}");
    assert!(
        matches!(&outcomes[0], Outcome::Status(s) if s.code == Code::DeadlineExceeded as i32),
        "{outcomes:?}"
    );
    assert!(
        matches!(&outcomes[1], Outcome::Status(s) if s.code == Code::InvalidArgument as i32),
        "{outcomes:?}"
    );
    assert!(
        matches!(&outcomes[2], Outcome::Ack(a) if a.applied),
        "{outcomes:?}"
    );
    assert!(
        matches!(&outcomes[3], Outcome::Entry(e) if !e.found),
        "{outcomes:?}"
    );
    // What is stored now: only `stored`.
    let reply = batch_on_core(&node, 1, vec![read_op(late), read_op(stored)]).await;
    let found: Vec<bool> = reply
        .outcomes
        .into_iter()
        .map(|o| matches!(o.outcome, Some(Outcome::Entry(ReplicaEntry { found, .. })) if found))
        .collect();
    assert_eq!(found, [false, true]);
    let after = replica_hops(&node).await;
    assert_eq!(
        (after[0] - before[0], after[1] - before[1]),
        (2, 0),
        "hops by core: the two served items on core 0, none for the reads on their owner"
    );
}

/// A replica is killed while batches of writes to it are in flight, then restarted empty:
/// no QUORUM write fails, the items that failed became hints, and every key written after
/// its death reaches it once it is back. Bounded: 16 writers of at most 3000 keys each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_mid_batch_fails_no_quorum_write_and_gets_its_hints_back() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_cluster_port()))
        .collect();
    // Hints alone bring node 3 up to date: anti-entropy would too.
    let env = [("CAPACITY", "100000"), ("ANTI_ENTROPY", "off")];
    let mut nodes = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let mut e = env.to_vec();
        if i == 0 {
            e.push(("METRICS_ADDR", &metrics));
        }
        nodes.push(start_node(a, &addrs[0], &e).await);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;

    // 0: node 3 alive; 1: node 3 dead (its process reaped) or back.
    let phase = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for t in 0..16 {
        let mut c = nodes[0].client().await.unwrap();
        let (phase, stop, acked) = (phase.clone(), stop.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let (mut done, mut failed) = (Vec::new(), Vec::new());
            for i in 0..3000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let p = phase.load(Ordering::SeqCst);
                let key = format!("mid-{t}-{i}");
                match c.set(set(&key, &key)).await {
                    Ok(_) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        done.push((key, p));
                    }
                    Err(e) => failed.push((key, e.to_string())),
                }
            }
            (done, failed)
        }));
    }
    let wait_acked = |n: usize| {
        let acked = acked.clone();
        async move {
            crate::support::wait_until(Duration::from_secs(30), "more writes acknowledged", || {
                let acked = acked.clone();
                async move { acked.load(Ordering::Relaxed) >= n }
            })
            .await
        }
    };
    wait_acked(2000).await;
    nodes[2].signal(libc::SIGKILL);
    nodes[2].wait_exit(Duration::from_secs(5)).await;
    phase.store(1, Ordering::SeqCst);
    let at_death = acked.load(Ordering::Relaxed);
    wait_acked(at_death + 2000).await;
    nodes[2] = start_node(&addrs[2], &addrs[0], &env).await;
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&refs, &addrs).await;
    let back = acked.load(Ordering::Relaxed);
    wait_acked(back + 2000).await;
    stop.store(true, Ordering::Relaxed);

    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for w in writers {
        let (d, f) = w.await.unwrap();
        done.extend(d);
        failed.extend(f);
    }
    assert!(failed.is_empty(), "QUORUM writes failed: {failed:?}");
    let text = crate::metrics::scrape(&metrics);
    let peer3 = format!("peer=\"{}\"", addrs[2]);
    let failed_items: f64 = ["error", "timeout"]
        .iter()
        .map(|o| {
            metric_sum(
                &text,
                "cache_replica_calls_total",
                &format!("{peer3},outcome=\"{o}\""),
            )
        })
        .sum();
    assert!(failed_items > 0.0, "no item to node 3 failed:\n{text}");
    assert!(metric_sum(&text, "cache_hints_total", "event=\"stored\"") > 0.0);
    let per_batch = metric_sum(&text, "cache_replica_calls_total", "")
        / metric_sum(&text, "cache_replica_batches_total", "");
    assert!(per_batch > 1.5, "{per_batch} replica requests per batch");

    // Every key acknowledged is there at QUORUM; every key written after node 3's death is
    // on node 3 itself (ONE through node 3 answers from its own replica).
    let mut c1 = nodes[0].client().await.unwrap();
    for (key, _) in done.iter().step_by(7) {
        let got = c1.get(get(key, Consistency::Quorum)).await.unwrap();
        assert_eq!(&value_of(&got.into_inner()), key);
    }
    let mut c3 = nodes[2].client().await.unwrap();
    let mut missing: Vec<&String> = done
        .iter()
        .filter(|(_, p)| *p == 1)
        .map(|(k, _)| k)
        .collect();
    assert!(missing.len() >= 2000);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !missing.is_empty() {
        assert!(
            Instant::now() < deadline,
            "node 3 still lacks {} keys written after its death, e.g. {}",
            missing.len(),
            missing[0]
        );
        let mut still = Vec::new();
        for key in missing {
            match c3.get(get(key, Consistency::One)).await {
                Ok(r) => assert_eq!(&value_of(&r.into_inner()), key),
                Err(e) if e.code() == Code::NotFound => still.push(key),
                Err(e) => panic!("ONE read of {key} on node 3: {e}"),
            }
        }
        missing = still;
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A peer of an older version, without PeerService.Batch: a tonic server in this process
/// that stores writes and counts the calls it gets. (An older build of the node cannot be
/// started here; this speaks the same protocol, minus the method.)
#[derive(Default, Clone)]
struct OlderPeer {
    writes: Arc<AtomicUsize>,
    batches: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl distributed_cache::pb::peer_service_server::PeerService for OlderPeer {
    async fn write(
        &self,
        _: tonic::Request<ReplicaWrite>,
    ) -> Result<tonic::Response<distributed_cache::pb::ReplicaAck>, tonic::Status> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(tonic::Response::new(distributed_cache::pb::ReplicaAck {
            applied: true,
            ..Default::default()
        }))
    }
    async fn read(
        &self,
        _: tonic::Request<ReplicaRead>,
    ) -> Result<tonic::Response<ReplicaEntry>, tonic::Status> {
        Ok(tonic::Response::new(ReplicaEntry::default()))
    }
    async fn batch(
        &self,
        _: tonic::Request<ReplicaBatch>,
    ) -> Result<tonic::Response<ReplicaBatchReply>, tonic::Status> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        Err(tonic::Status::unimplemented("an older node"))
    }
    async fn leave(
        &self,
        _: tonic::Request<distributed_cache::pb::LeaveNotice>,
    ) -> Result<tonic::Response<distributed_cache::pb::LeaveAck>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn digests(
        &self,
        _: tonic::Request<distributed_cache::pb::DigestRequest>,
    ) -> Result<tonic::Response<distributed_cache::pb::DigestReply>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn keys(
        &self,
        _: tonic::Request<distributed_cache::pb::KeysRequest>,
    ) -> Result<tonic::Response<distributed_cache::pb::KeysReply>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn fetch(
        &self,
        _: tonic::Request<distributed_cache::pb::FetchRequest>,
    ) -> Result<tonic::Response<distributed_cache::pb::EntryBatch>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn apply(
        &self,
        _: tonic::Request<distributed_cache::pb::EntryBatch>,
    ) -> Result<tonic::Response<distributed_cache::pb::ApplyAck>, tonic::Status> {
        Err(tonic::Status::unimplemented(""))
    }
}

/// Rolling upgrades: a peer that answers a batch UNIMPLEMENTED gets the batch's items as
/// single calls, every one acknowledged, and no batch again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_batches_gets_single_calls() {
    use distributed_cache::{
        cluster::{peer::PeerClients, transport::PeerTransport},
        engine::{command::ReplicaEntry as Entry, hlc::Version},
    };
    let older = OlderPeer::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                distributed_cache::pb::peer_service_server::PeerServiceServer::new(older.clone()),
            )
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let to = addr.clone();
    let results = tokio::task::spawn_blocking(move || {
        on_glommio(move || async move {
            let peers = PeerClients::new();
            let entry = |i: u32| Entry {
                key: format!("old-{i}").into_bytes(),
                value: b"v".to_vec(),
                version: Version {
                    hlc: 1 << 20,
                    node: 1,
                },
                ttl_ms: 0,
                flags: 0,
            };
            let deadline = Instant::now() + T;
            let (e1, e2, e3) = (entry(1), entry(2), entry(3));
            // Three writes in one turn: one batch, refused, then three single calls.
            let ((a, b), c) = futures_lite::future::zip(
                futures_lite::future::zip(
                    peers.write(&to, &e1, deadline),
                    peers.write(&to, &e2, deadline),
                ),
                peers.write(&to, &e3, deadline),
            )
            .await;
            let later = peers.write(&to, &entry(4), Instant::now() + T).await;
            vec![a, b, c, later]
        })
    })
    .await
    .unwrap();
    server.abort();
    for r in &results {
        assert!(r.is_ok(), "{results:?}");
    }
    assert_eq!(older.batches.load(Ordering::SeqCst), 1);
    assert_eq!(older.writes.load(Ordering::SeqCst), 4);
}
