//! The shard-aware port (routing/steer.rs) on real nodes: a connection from a chosen source
//! port is served by the core it names; replica calls land on the core that owns their key,
//! peers with another NUM_SHARDS included; and a replica request that reaches a core not
//! owning its key is still served, with one hop, and counted.

use crate::cluster::{cluster, set};
use crate::support::{on_glommio, Node};
use distributed_cache::{
    cluster::peer::unary::{unary, RECURRING},
    pb::{
        node_service_client::NodeServiceClient, GetRequest, LayoutReply, LayoutRequest, ReplicaAck,
        ReplicaWrite, StatsRequest, StatsResponse,
    },
    routing::{owner_core, shard_of, steer},
};
use http2::client::Client;
use std::{net::SocketAddr, time::Duration};

pub const T: Duration = Duration::from_secs(5);

async fn node_service(node: &Node) -> NodeServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(node.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    NodeServiceClient::new(channel)
}

pub async fn layout(node: &Node) -> LayoutReply {
    node_service(node)
        .await
        .layout(LayoutRequest {})
        .await
        .unwrap()
        .into_inner()
}

pub async fn stats(node: &Node) -> StatsResponse {
    node_service(node)
        .await
        .stats(StatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Requests each core of `node` has counted, by core.
async fn requests_by_core(node: &Node) -> Vec<u64> {
    let s = stats(node).await;
    let mut out = vec![0; s.cores.len()];
    for c in s.cores {
        out[c.core as usize] = c.requests.iter().map(|r| r.count).sum();
    }
    out
}

pub async fn replica_hops(node: &Node) -> Vec<u64> {
    let s = stats(node).await;
    let mut out = vec![0; s.cores.len()];
    for c in s.cores {
        out[c.core as usize] = c.replica_hops;
    }
    out
}

/// A client whose connection lands on `core` of the node at `shard_addr`.
pub fn client_on_core(shard_addr: SocketAddr, core: u32, cores: u32) -> Client {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let stream = steer::connect_to_core(shard_addr, core, cores, T).expect("connects");
    // SAFETY: a connected TCP socket, handed over whole.
    let io = unsafe { glommio::net::TcpStream::from_raw_fd(stream.into_raw_fd()) };
    Client::over(io, &RECURRING)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_connection_from_a_chosen_source_port_is_served_on_the_core_it_names() {
    let node = Node::start(&[("CORES", "2"), ("SHARD_PORT", "0")]).await;
    let l = layout(&node).await;
    assert_eq!(l.cores, 2);
    assert_ne!(l.shard_port, 0, "SHARD_PORT=0: a free port");
    let mut shard_addr: SocketAddr = node.addr.parse().unwrap();
    shard_addr.set_port(l.shard_port as u16);
    for core in 0..l.cores {
        let before = requests_by_core(&node).await;
        let authority = node.addr.clone();
        tokio::task::spawn_blocking(move || {
            on_glommio(move || async move {
                let c = client_on_core(shard_addr, core, 2);
                for i in 0..20 {
                    let got: Result<distributed_cache::pb::GetResponse, tonic::Status> = unary(
                        &c,
                        &authority,
                        "/pb.CacheService/Get",
                        &GetRequest {
                            key: format!("k{i}"),
                            ..Default::default()
                        },
                        T,
                        1 << 20,
                    )
                    .await;
                    assert_eq!(got.unwrap_err().code(), tonic::Code::NotFound);
                }
            })
        })
        .await
        .unwrap();
        let after = requests_by_core(&node).await;
        let added: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let mut want = vec![0; 2];
        want[core as usize] = 20;
        assert_eq!(
            added, want,
            "requests by core, connection aimed at core {core}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_replica_request_on_a_core_not_owning_its_key_is_served_with_one_hop_and_counted() {
    let node = Node::start(&[("CORES", "2"), ("NUM_SHARDS", "8"), ("SHARD_PORT", "0")]).await;
    let l = layout(&node).await;
    assert_eq!((l.cores, l.num_shards), (2, 8));
    let mut shard_addr: SocketAddr = node.addr.parse().unwrap();
    shard_addr.set_port(l.shard_port as u16);
    let key = b"misplaced".to_vec();
    let owner = owner_core(shard_of(&key, 8), 2) as u32;
    let authority = node.addr.clone();
    let ack: ReplicaAck = tokio::task::spawn_blocking(move || {
        on_glommio(move || async move {
            let c = client_on_core(shard_addr, 1 - owner, 2);
            let write = ReplicaWrite {
                key,
                value: b"v".to_vec(),
                hlc: 1 << 20,
                node: 7,
                ttl_ms: 0,
                flags: 0,
            };
            unary(&c, &authority, "/pb.PeerService/Write", &write, T, 1 << 20)
                .await
                .expect("served")
        })
    })
    .await
    .unwrap();
    assert!(ack.applied);
    let mut want = vec![0; 2];
    want[1 - owner as usize] = 1;
    assert_eq!(replica_hops(&node).await, want);
}

/// Three nodes, one of them with another NUM_SHARDS (its own map): once each core knows its
/// peers' layouts, no replica request hops on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn replica_calls_land_on_the_core_that_owns_the_key_by_each_peers_own_map() {
    let (nodes, _) = cluster(3, &[("CORES", "2"), ("SHARD_PORT", "0")]).await;
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(n.client().await.unwrap());
    }
    settle(&nodes).await;
    let before: Vec<u64> = hops_by_node(&nodes).await;
    for i in 0..200 {
        clients[i % 3]
            .set(set(&format!("key{i}"), "v"))
            .await
            .unwrap();
    }
    let after: Vec<u64> = hops_by_node(&nodes).await;
    assert_eq!(after, before, "replica hops by node after the warm-up");
    drop(nodes);

    // NUM_SHARDS differs between nodes: each is routed by its own.
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", crate::cluster::free_cluster_port()))
        .collect();
    let mut nodes = Vec::new();
    for (a, shards) in addrs.iter().zip(["4", "10", "7"]) {
        nodes.push(
            crate::cluster::start_node(
                a,
                &addrs[0],
                &[("CORES", "2"), ("NUM_SHARDS", shards), ("SHARD_PORT", "0")],
            )
            .await,
        );
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    crate::cluster::wait_converged(&refs, &addrs).await;
    let mut c = nodes[0].client().await.unwrap();
    for i in 0..100 {
        c.set(set(&format!("warm{i}"), "v")).await.unwrap();
    }
    let before = hops_by_node(&nodes).await;
    for i in 0..200 {
        c.set(set(&format!("key{i}"), "v")).await.unwrap();
    }
    assert_eq!(hops_by_node(&nodes).await, before);
    assert_eq!(layout(&nodes[2]).await.num_shards, 7);
}

/// A peer with the shard-aware port off (SHARD_PORT=off) in a cluster whose other nodes have
/// it: its layout says so, its replicas are called on its ADDR and make one hop where they land
/// on the wrong core (counted there), and every write and read still reaches all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_peer_without_the_shard_aware_port_is_called_on_its_addr_with_one_hop() {
    use crate::cluster::{get, value_of};
    use distributed_cache::pb::Consistency;
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", crate::cluster::free_cluster_port()))
        .collect();
    let mut nodes = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        // Node 3 has its own NUM_SHARDS too: whichever of its cores a connection lands on,
        // about half the keys it carries belong to the other core.
        let (port, shards) = if i == 2 { ("off", "7") } else { ("0", "8") };
        let env = [("CORES", "2"), ("SHARD_PORT", port), ("NUM_SHARDS", shards)];
        nodes.push(crate::cluster::start_node(a, &addrs[0], &env).await);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    crate::cluster::wait_converged(&refs, &addrs).await;
    assert_eq!(layout(&nodes[2]).await.shard_port, 0, "SHARD_PORT=off");
    assert_ne!(layout(&nodes[0]).await.shard_port, 0, "on by default");
    settle(&nodes[..2]).await;
    let before = hops_by_node(&nodes).await;
    let mut c = nodes[0].client().await.unwrap();
    for i in 0..200 {
        let mut w = set(&format!("key{i}"), &format!("v{i}"));
        w.consistency = Consistency::All as i32;
        c.set(w).await.unwrap();
    }
    for i in (0..200).step_by(7) {
        let got = c.get(get(&format!("key{i}"), Consistency::All)).await;
        assert_eq!(value_of(&got.unwrap().into_inner()), format!("v{i}"));
    }
    let after = hops_by_node(&nodes).await;
    assert_eq!(after[1], before[1], "node 2 has the port: no hop there");
    // Node 3 is a replica of every key (RF=3), called on ADDR.
    assert!(
        after[2] - before[2] >= 20,
        "hops on node 3: {before:?} -> {after:?}"
    );
}

/// Waits until the nodes' cores know their peers' layouts: the first calls to a peer go to
/// its ADDR while its layout is asked in the background, so Sets through every node until a
/// round of them makes no hop.
async fn settle(nodes: &[Node]) {
    let mut round = 0;
    crate::support::wait_until(
        Duration::from_secs(20),
        "a round of Sets with no replica hop",
        || {
            round += 1;
            let round = round;
            async move {
                let before = hops_by_node(nodes).await;
                for (i, n) in nodes.iter().enumerate() {
                    let mut c = n.client().await.unwrap();
                    for k in 0..40 {
                        c.set(set(&format!("settle{round}-{i}-{k}"), "v"))
                            .await
                            .unwrap();
                    }
                }
                hops_by_node(nodes).await == before
            }
        },
    )
    .await;
}

/// Replica hops per node (all cores).
async fn hops_by_node(nodes: &[Node]) -> Vec<u64> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(replica_hops(n).await.iter().sum());
    }
    out
}

/// A peer that restarts comes back on another shard-aware port (SHARD_PORT=0: a free one): the
/// cores that knew its old port call it through ADDR at once and learn the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_peer_restarted_on_another_shard_port_is_called_at_once() {
    use distributed_cache::pb::Consistency;
    let (mut nodes, addrs) = cluster(3, &[("CORES", "2"), ("SHARD_PORT", "0")]).await;
    let mut c = nodes[0].client().await.unwrap();
    for i in 0..40 {
        c.set(set(&format!("before{i}"), "v")).await.unwrap();
    }
    let old_port = layout(&nodes[2]).await.shard_port;
    nodes[2].signal(libc::SIGKILL);
    nodes[2].wait_exit(Duration::from_secs(5)).await;
    nodes[2] =
        crate::cluster::start_node(&addrs[2], &addrs[0], &[("CORES", "2"), ("SHARD_PORT", "0")])
            .await;
    let refs: Vec<&Node> = nodes.iter().collect();
    crate::cluster::wait_converged(&refs, &addrs).await;
    assert_ne!(layout(&nodes[2]).await.shard_port, old_port);
    // ALL needs node 3 on every call: none may fail on the old port.
    for i in 0..40 {
        let mut w = set(&format!("after{i}"), "v");
        w.consistency = Consistency::All as i32;
        c.set(w)
            .await
            .expect("a Set at ALL right after the restart");
    }
}

/// A replica call that names another node as its authority reached the wrong process (a stale
/// layout whose port another node now holds): refused, never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_replica_call_meant_for_another_node_is_refused() {
    let node = Node::start(&[]).await;
    let addr: SocketAddr = node.addr.parse().unwrap();
    let (code, message) = tokio::task::spawn_blocking(move || {
        on_glommio(move || async move {
            let c = Client::connect(addr, &RECURRING).await.expect("connects");
            let write = ReplicaWrite {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                hlc: 1 << 20,
                node: 7,
                ttl_ms: 0,
                flags: 0,
            };
            let err = unary::<_, ReplicaAck>(
                &c,
                "127.0.0.1:1",
                "/pb.PeerService/Write",
                &write,
                T,
                1 << 20,
            )
            .await
            .unwrap_err();
            (err.code(), err.message().to_string())
        })
    })
    .await
    .unwrap();
    assert_eq!(code, tonic::Code::Unavailable, "{message}");
    assert!(message.contains("127.0.0.1:1"), "{message}");
    let mut c = node.client().await.unwrap();
    let got = c
        .get(GetRequest {
            key: "k".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        got.unwrap_err().code(),
        tonic::Code::NotFound,
        "not applied"
    );
}

/// Connections arriving together on ADDR and on the shard-aware port are all served: each
/// receives the server's SETTINGS. (A core once raced one listener's accept against the
/// other's and dropped the loser, losing a connection the kernel had accepted meanwhile: its
/// client waited on a socket nobody read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn connections_arriving_on_both_ports_at_once_are_all_served() {
    use std::io::{Read, Write};
    let node = Node::start(&[("CORES", "2"), ("SHARD_PORT", "0")]).await;
    let l = layout(&node).await;
    let addr: SocketAddr = node.addr.parse().unwrap();
    let mut shard_addr = addr;
    shard_addr.set_port(l.shard_port as u16);
    // Bounded: 2 x 200 connections, each waited for at most T.
    let dial = |to: SocketAddr| {
        std::thread::spawn(move || {
            (0..200)
                .map(|_| std::net::TcpStream::connect_timeout(&to, T).expect("connects"))
                .collect::<Vec<_>>()
        })
    };
    let (a, b) = (dial(addr), dial(shard_addr));
    let mut streams = a.join().unwrap();
    let on_addr = streams.len();
    streams.extend(b.join().unwrap());
    let silent = tokio::task::spawn_blocking(move || {
        // The client preface and an empty SETTINGS frame.
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let mut silent = Vec::new();
        for (i, s) in streams.iter_mut().enumerate() {
            s.set_read_timeout(Some(T)).unwrap();
            s.write_all(&hello).unwrap();
            let mut head = [0u8; 9];
            // The server's first frame is its SETTINGS.
            match s.read_exact(&mut head) {
                Ok(()) if head[3] == 0x4 => {}
                other => silent.push((i < on_addr, i, format!("{other:?} {head:?}"))),
            }
        }
        silent
    })
    .await
    .unwrap();
    assert!(
        silent.is_empty(),
        "connections not served (on ADDR, index, read): {silent:?}"
    );
}
