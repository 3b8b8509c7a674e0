//! The side thread: gRPC reflection (v1 and v1alpha), the standard health service, the
//! NodeService (Stats) and the Prometheus endpoint, on a small tokio runtime because
//! tonic-reflection, tonic-health and hyper's tokio glue are built on tokio. None of it is on
//! the request path: a core's ingress hands such requests over a channel and streams the
//! response back (bodies are runtime-agnostic and poll fine from the glommio side), and
//! figures are gathered from the cores by message.

use crate::{
    cluster::{
        antientropy::{self, AntiEntropy, Cores},
        membership::{
            self, MemberState, MembershipCmd, MembershipSettings, MembershipView, SharedView,
        },
        ring::{BucketSet, Ring},
    },
    engine::{
        command::ReplicaEntry,
        core::{KeyVersion, Leaves},
    },
    observability::metrics::{self, CoreSnapshot, NodeSnapshot},
    pb,
    routing::ShardId,
};
use http::{Request, Response};
use hyper::body::Incoming;
use std::sync::{Arc, Mutex};
use std::{convert::Infallible, net::SocketAddr, thread, time::Duration, time::Instant};
use tokio::sync::{mpsc, oneshot};
use tonic::{body::Body, codegen::Service, Status};
use tonic_health::{server::HealthReporter, ServingStatus};

type Forwarded = (Request<Body>, oneshot::Sender<Response<Body>>);

/// What the side thread asks of a core.
pub enum ControlMsg {
    /// Its figures.
    Snapshot(oneshot::Sender<CoreSnapshot>),
    /// A new ring to use from now on.
    Ring(Box<Ring>),
    /// Anti-entropy: the XOR of its shards' digests, per ring bucket.
    Digests(oneshot::Sender<Leaves>),
    /// Anti-entropy: key, version and flags of its live entries in these buckets.
    List(Arc<BucketSet>, oneshot::Sender<Vec<KeyVersion>>),
    /// Anti-entropy: its entries for these keys (of its shards).
    Fetch(Vec<(ShardId, Vec<u8>)>, oneshot::Sender<Vec<ReplicaEntry>>),
    /// Anti-entropy: apply entries from another replica; answers how many changed something.
    Apply(Vec<(ShardId, ReplicaEntry)>, oneshot::Sender<usize>),
    /// Data movement: drop its entries in these buckets; answers how many.
    Drop(Arc<BucketSet>, oneshot::Sender<usize>),
    /// The buckets this node is still receiving.
    Syncing(Arc<BucketSet>),
    /// The failure detector's verdicts on the other members.
    Health(Arc<crate::cluster::snitch::Health>),
}
pub type ControlReceiver = mpsc::UnboundedReceiver<ControlMsg>;

/// A core's way to the side thread. `Send` and cheap to clone.
#[derive(Clone)]
pub struct SideHandle {
    tx: mpsc::UnboundedSender<Forwarded>,
}

impl SideHandle {
    /// Serves `req` on the side thread.
    pub async fn forward(&self, req: Request<Body>) -> Response<Body> {
        let (reply_tx, reply_rx) = oneshot::channel();
        if self.tx.send((req, reply_tx)).is_err() {
            return Status::unavailable("node is shutting down").into_http();
        }
        reply_rx
            .await
            .unwrap_or_else(|_| Status::unavailable("node is shutting down").into_http())
    }
}

/// Asks every core for its figures; a core that does not answer within a second is left out
/// rather than stalling the scrape.
#[derive(Clone)]
pub struct Gatherer {
    cores: Vec<mpsc::UnboundedSender<ControlMsg>>,
    started: Instant,
    view: SharedView,
    data_movement: Arc<antientropy::Counters>,
}

impl Gatherer {
    pub async fn gather(&self) -> NodeSnapshot {
        let mut waiting = Vec::with_capacity(self.cores.len());
        for tx in &self.cores {
            let (reply_tx, reply_rx) = oneshot::channel();
            if tx.send(ControlMsg::Snapshot(reply_tx)).is_ok() {
                waiting.push(reply_rx);
            }
        }
        let mut cores = Vec::with_capacity(waiting.len());
        for rx in waiting {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), rx).await {
                cores.push(s);
            }
        }
        cores.sort_by_key(|c| c.core);
        let mut members = vec![("ALIVE", 1u64), ("SUSPECT", 0), ("DOWN", 0), ("LEFT", 0)];
        if let Ok(v) = self.view.lock() {
            for (_, m) in v.table.members() {
                let state = if m.left { "LEFT" } else { m.state.as_str() };
                if let Some(slot) = members.iter_mut().find(|(s, _)| *s == state) {
                    slot.1 += 1;
                }
            }
        }
        NodeSnapshot {
            data_movement: self.data_movement.snapshot(),
            members,
            cores,
            rss_bytes: metrics::process_rss_bytes(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
        }
    }
}

struct NodeStats {
    gatherer: Gatherer,
    view: SharedView,
    replication_factor: usize,
    write_quorum: usize,
    read_quorum: usize,
    layout: pb::LayoutReply,
}

/// The peer protocol's endpoints served here: Leave, and anti-entropy's (Write and Read are
/// served on the cores).
struct PeerLeave {
    membership: mpsc::UnboundedSender<MembershipCmd>,
    cores: Cores,
}

#[tonic::async_trait]
impl pb::peer_service_server::PeerService for PeerLeave {
    async fn write(
        &self,
        _: tonic::Request<pb::ReplicaWrite>,
    ) -> Result<tonic::Response<pb::ReplicaAck>, Status> {
        Err(Status::internal("replica writes are served by the cores"))
    }
    async fn read(
        &self,
        _: tonic::Request<pb::ReplicaRead>,
    ) -> Result<tonic::Response<pb::ReplicaEntry>, Status> {
        Err(Status::internal("replica reads are served by the cores"))
    }
    async fn leave(
        &self,
        req: tonic::Request<pb::LeaveNotice>,
    ) -> Result<tonic::Response<pb::LeaveAck>, Status> {
        let _ = self
            .membership
            .send(MembershipCmd::PeerLeft(req.into_inner().addr));
        Ok(tonic::Response::new(pb::LeaveAck {}))
    }
    async fn digests(
        &self,
        req: tonic::Request<pb::DigestRequest>,
    ) -> Result<tonic::Response<pb::DigestReply>, Status> {
        antientropy::serve_digests(&self.cores, req.into_inner())
            .await
            .map(tonic::Response::new)
    }
    async fn keys(
        &self,
        req: tonic::Request<pb::KeysRequest>,
    ) -> Result<tonic::Response<pb::KeysReply>, Status> {
        antientropy::serve_keys(&self.cores, req.into_inner())
            .await
            .map(tonic::Response::new)
    }
    async fn fetch(
        &self,
        req: tonic::Request<pb::FetchRequest>,
    ) -> Result<tonic::Response<pb::EntryBatch>, Status> {
        Ok(tonic::Response::new(
            antientropy::serve_fetch(&self.cores, req.into_inner()).await,
        ))
    }
    async fn apply(
        &self,
        req: tonic::Request<pb::EntryBatch>,
    ) -> Result<tonic::Response<pb::ApplyAck>, Status> {
        Ok(tonic::Response::new(
            antientropy::serve_apply(&self.cores, req.into_inner()).await,
        ))
    }
}

#[tonic::async_trait]
impl pb::node_service_server::NodeService for NodeStats {
    async fn stats(
        &self,
        _: tonic::Request<pb::StatsRequest>,
    ) -> Result<tonic::Response<pb::StatsResponse>, Status> {
        let snap = self.gatherer.gather().await;
        let cores = snap
            .cores
            .iter()
            .map(|c| {
                let (sum, count) = c
                    .latency
                    .iter()
                    .fold((0.0, 0u64), |(s, n), (_, h)| (s + h.sum_secs, n + h.count));
                pb::CoreStats {
                    core: c.core as u32,
                    requests: c
                        .requests
                        .iter()
                        .map(|(command, code, count)| pb::RequestCount {
                            command: command.to_string(),
                            code: code.to_string(),
                            count: *count,
                        })
                        .collect(),
                    hits: c.hits,
                    misses: c.misses,
                    rate_limited: c.rate_limited,
                    shed: c.shed,
                    entries: c.engine.entries,
                    entry_bytes: c.engine.bytes,
                    evictions: c.engine.evictions,
                    expirations: c.engine.expirations,
                    queue_depth: c.in_flight,
                    replica_hops: c.replica_hops,
                    mean_latency_us: if count > 0 {
                        sum / count as f64 * 1e6
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        Ok(tonic::Response::new(pb::StatsResponse {
            cores,
            rss_bytes: snap.rss_bytes,
            uptime_seconds: snap.uptime_secs,
        }))
    }

    async fn layout(
        &self,
        _: tonic::Request<pb::LayoutRequest>,
    ) -> Result<tonic::Response<pb::LayoutReply>, Status> {
        Ok(tonic::Response::new(self.layout))
    }

    async fn members(
        &self,
        _: tonic::Request<pb::MembersRequest>,
    ) -> Result<tonic::Response<pb::MembersResponse>, Status> {
        let v = self
            .view
            .lock()
            .map_err(|_| Status::internal("membership view unavailable"))?;
        let now = std::time::Instant::now();
        let shares: std::collections::HashMap<String, (f64, f64)> = v
            .ring
            .shares()
            .into_iter()
            .map(|(n, p, r)| (n, (p, r)))
            .collect();
        let me = v.table.me().to_string();
        let mut members = vec![pb::Member {
            addr: me.clone(),
            state: MemberState::Alive.as_str().into(),
            primary_share: shares.get(&me).map(|s| s.0).unwrap_or(0.0),
            replica_share: shares.get(&me).map(|s| s.1).unwrap_or(0.0),
            is_self: true,
            in_ring: true,
        }];
        for (addr, info) in v.table.members() {
            members.push(pb::Member {
                addr: addr.clone(),
                state: if info.left {
                    "LEFT".into()
                } else {
                    info.state.as_str().into()
                },
                primary_share: shares.get(addr).map(|s| s.0).unwrap_or(0.0),
                replica_share: shares.get(addr).map(|s| s.1).unwrap_or(0.0),
                is_self: false,
                in_ring: v.table.in_ring(addr, now),
            });
        }
        members.sort_by(|a, b| a.addr.cmp(&b.addr));
        Ok(tonic::Response::new(pb::MembersResponse {
            members,
            replication_factor: self.replication_factor.min(v.ring.nodes().len()) as u32,
            write_quorum: self.write_quorum as u32,
            read_quorum: self.read_quorum as u32,
        }))
    }
}

/// What the side thread needs to run membership.
pub struct ClusterSettings {
    pub me: String,
    pub bind: SocketAddr,
    pub seeds: Vec<String>,
    pub dead_after: Duration,
    pub vnodes: u32,
    pub replication_factor: usize,
    pub write_quorum: usize,
    pub read_quorum: usize,
    pub num_shards: u32,
    /// The shard-aware port (steer.rs), 0 when there is none: told to peers and clients by
    /// NodeService.Layout.
    pub shard_port: u16,
    /// None: no anti-entropy rounds (ANTI_ENTROPY=off).
    pub anti_entropy_interval: Option<Duration>,
    /// After a ring change, how long reads also ask former owners and former owners keep data.
    pub transition: Duration,
}

/// Tells every other member this node is leaving, best effort, at most `timeout`.
async fn announce_leave(me: String, peers: Vec<String>, timeout: Duration) {
    let calls = peers.into_iter().map(|peer| {
        let me = me.clone();
        async move {
            let call = async {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{peer}"))
                    .ok()?
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect()
                    .await
                    .ok()?;
                pb::peer_service_client::PeerServiceClient::new(channel)
                    .leave(pb::LeaveNotice { addr: me })
                    .await
                    .ok()
            };
            let _ = tokio::time::timeout(timeout, call).await;
        }
    });
    futures_util::future::join_all(calls).await;
}

pub struct SideThread {
    pub handle: SideHandle,
    runtime: tokio::runtime::Handle,
    health: HealthReporter,
    membership: mpsc::UnboundedSender<MembershipCmd>,
    view: SharedView,
    anti_entropy: Arc<AntiEntropy>,
    vnodes: u32,
    replication_factor: usize,
    me: String,
    thread: thread::JoinHandle<()>,
    stop_tx: oneshot::Sender<()>,
}

/// The service names whose health is reported: the empty name (the whole server) and ours.
const HEALTH_NAMES: [&str; 2] = ["", "pb.CacheService"];

/// Serves `/metrics` until the runtime stops. Bound before the cores start, so a bad
/// METRICS_ADDR is a start-up error.
async fn serve_metrics(listener: tokio::net::TcpListener, gatherer: Gatherer) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let gatherer = gatherer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let gatherer = gatherer.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        let text = metrics::render(gatherer.gather().await);
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(http_body_util::Full::new(bytes::Bytes::from(text)))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                b"try /metrics\n",
                            )))
                    };
                    Ok::<_, Infallible>(resp.expect("static response parts are valid"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

impl SideThread {
    /// Starts the side thread. Returns it and one control receiver per core.
    pub fn start(
        nr_cores: usize,
        metrics_addr: Option<SocketAddr>,
        cluster: ClusterSettings,
    ) -> anyhow::Result<(SideThread, Vec<ControlReceiver>)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("side")
            .build()?;
        let rt_handle = runtime.handle().clone();
        let (controls, receivers): (Vec<_>, Vec<_>) =
            (0..nr_cores).map(|_| mpsc::unbounded_channel()).unzip();
        let view: SharedView = Arc::new(Mutex::new(MembershipView {
            table: membership::MemberTable::new(cluster.me.clone(), cluster.dead_after),
            ring: Ring::new(
                [cluster.me.clone()],
                cluster.vnodes,
                cluster.replication_factor,
            ),
        }));
        let counters = Arc::new(antientropy::Counters::default());
        let cores = Cores {
            txs: controls.clone(),
            num_shards: cluster.num_shards,
        };
        let anti_entropy = Arc::new(AntiEntropy::new(
            antientropy::Settings {
                me: cluster.me.clone(),
                interval: cluster.anti_entropy_interval.unwrap_or(Duration::MAX),
                transition: cluster.transition,
            },
            cores.clone(),
            Arc::clone(&counters),
        ));
        let (ring_tx, ring_rx) =
            tokio::sync::watch::channel(view.lock().expect("fresh").ring.clone());
        let gatherer = Gatherer {
            cores: controls,
            started: Instant::now(),
            view: Arc::clone(&view),
            data_movement: Arc::clone(&counters),
        };
        let metrics_listener = match metrics_addr {
            Some(addr) => {
                let std_listener = std::net::TcpListener::bind(addr)
                    .map_err(|e| anyhow::anyhow!("cannot listen on METRICS_ADDR {addr}: {e}"))?;
                std_listener.set_nonblocking(true)?;
                Some(std_listener)
            }
            None => None,
        };
        let (health, health_svc) = tonic_health::server::health_reporter();
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let (membership_tx, membership_rx) = mpsc::unbounded_channel();
        let routes = tonic::service::Routes::new(health_svc)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(pb::node_service_server::NodeServiceServer::new(NodeStats {
                gatherer: gatherer.clone(),
                view: Arc::clone(&view),
                replication_factor: cluster.replication_factor,
                write_quorum: cluster.write_quorum,
                read_quorum: cluster.read_quorum,
                layout: pb::LayoutReply {
                    cores: nr_cores as u32,
                    num_shards: cluster.num_shards,
                    shard_port: cluster.shard_port as u32,
                },
            }))
            .add_service(
                pb::peer_service_server::PeerServiceServer::new(PeerLeave {
                    membership: membership_tx.clone(),
                    cores: cores.clone(),
                })
                .max_decoding_message_size(antientropy::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(antientropy::MAX_MESSAGE_BYTES),
            );
        // Bound here, before the cores start, so a taken UDP port is a start-up error.
        let gossip_socket = std::net::UdpSocket::bind(cluster.bind).map_err(|e| {
            anyhow::anyhow!("cannot bind the gossip socket (UDP {}): {e}", cluster.bind)
        })?;
        gossip_socket.set_nonblocking(true)?;
        let membership_settings = MembershipSettings {
            me: cluster.me.clone(),
            seeds: cluster.seeds.clone(),
            dead_after: cluster.dead_after,
            vnodes: cluster.vnodes,
            replication_factor: cluster.replication_factor,
        };
        let ring_senders = gatherer.cores.clone();
        let membership_view = Arc::clone(&view);
        let (tx, mut rx) = mpsc::unbounded_channel::<Forwarded>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let reporter = health.clone();
        let ae_task = Arc::clone(&anti_entropy);
        let anti_entropy_on = cluster.anti_entropy_interval.is_some();
        let thread = thread::Builder::new().name("side".into()).spawn(move || {
            runtime.block_on(async move {
                for name in HEALTH_NAMES {
                    reporter
                        .set_service_status(name, ServingStatus::Serving)
                        .await;
                }
                match tokio::net::UdpSocket::from_std(gossip_socket) {
                    Ok(socket) => {
                        tokio::spawn(async move {
                            let health_senders = ring_senders.clone();
                            let on_health = move |health: crate::cluster::snitch::Health| {
                                let health = Arc::new(health);
                                for tx in &health_senders {
                                    let _ = tx.send(ControlMsg::Health(Arc::clone(&health)));
                                }
                            };
                            let on_ring = move |ring: Ring| {
                                for tx in &ring_senders {
                                    let _ = tx.send(ControlMsg::Ring(Box::new(ring.clone())));
                                }
                                let _ = ring_tx.send(ring);
                            };
                            membership::start(
                                membership_settings,
                                socket,
                                membership_view,
                                membership_rx,
                                on_ring,
                                on_health,
                            )
                            .await;
                        });
                    }
                    Err(e) => tracing::error!(error = %e, "gossip socket failed"),
                }
                if anti_entropy_on {
                    tokio::spawn(Arc::clone(&ae_task).run(ring_rx));
                }
                if let Some(l) = metrics_listener {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            tokio::spawn(serve_metrics(l, gatherer));
                        }
                        Err(e) => tracing::error!(error = %e, "metrics endpoint failed"),
                    }
                }
                let serve = async {
                    while let Some((req, reply_tx)) = rx.recv().await {
                        let mut routes = routes.clone();
                        tokio::spawn(async move {
                            let resp: Result<Response<Body>, Infallible> = routes.call(req).await;
                            let resp = match resp {
                                Ok(r) => r,
                                Err(never) => match never {},
                            };
                            let _ = reply_tx.send(resp);
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stop_rx => {}
                }
            });
        })?;
        Ok((
            SideThread {
                handle: SideHandle { tx },
                runtime: rt_handle,
                health,
                membership: membership_tx,
                view,
                anti_entropy,
                vnodes: cluster.vnodes,
                replication_factor: cluster.replication_factor,
                me: cluster.me,
                thread,
                stop_tx,
            },
            receivers,
        ))
    }

    /// Reports NOT_SERVING, so health checks and load balancers stop sending traffic while the
    /// node drains.
    pub fn set_not_serving(&self) {
        let health = self.health.clone();
        self.runtime.spawn(async move {
            for name in HEALTH_NAMES {
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
        });
    }

    /// Leaves the cluster gracefully: tells the other members (so they drop this node from
    /// their rings at once) and gossip, waiting at most `timeout`.
    pub fn leave(&self, timeout: Duration) {
        let peers: Vec<String> = match self.view.lock() {
            Ok(v) => v
                .table
                .members()
                .filter(|(_, m)| !m.left && m.state != MemberState::Down)
                .map(|(a, _)| a.clone())
                .collect(),
            Err(_) => Vec::new(),
        };
        if peers.is_empty() {
            return;
        }
        let (done_tx, done_rx) = oneshot::channel();
        let _ = self.membership.send(MembershipCmd::Leave(done_tx));
        let me = self.me.clone();
        let (finished_tx, finished_rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = tokio::time::timeout(timeout, done_rx).await;
            announce_leave(me, peers, timeout).await;
            let _ = finished_tx.send(());
        });
        let _ = finished_rx.recv_timeout(timeout * 2);
    }

    /// Before exiting after a graceful leave: pushes everything this node holds to the nodes
    /// that take over its buckets, waiting at most `timeout` for them to acknowledge.
    pub fn hand_off_all(&self, timeout: Duration) {
        let others: Vec<String> = match self.view.lock() {
            Ok(v) => v
                .ring
                .nodes()
                .iter()
                .filter(|n| **n != self.me)
                .cloned()
                .collect(),
            Err(_) => Vec::new(),
        };
        if others.is_empty() {
            return;
        }
        let ring = Ring::new(others, self.vnodes, self.replication_factor);
        let ae = Arc::clone(&self.anti_entropy);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let started = Instant::now();
        self.runtime.spawn(async move {
            let acked = ae.hand_off(&ring, false).await;
            let _ = done_tx.send(acked);
        });
        match done_rx.recv_timeout(timeout) {
            Ok(true) => tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "handed off every bucket to the nodes taking over"
            ),
            Ok(false) => {
                tracing::warn!("hand-off incomplete: some nodes taking over did not acknowledge")
            }
            Err(_) => tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                "hand-off timeout hit before the nodes taking over acknowledged"
            ),
        }
    }

    pub fn stop(self) {
        let _ = self.stop_tx.send(());
        let _ = self.thread.join();
    }
}
