//! The control plane: everything a node does besides serving requests, on one thread with a
//! small tokio runtime (tonic's reflection and health services, hyper's /metrics, foca's UDP
//! transport and anti-entropy's client are built on tokio). None of it is on the request
//! path: the cores forward the gRPC methods they do not serve themselves over a channel
//! ([`crate::ingress::Forwarder`]), the control plane asks the cores what it needs through
//! [`cores::Cores`], and publishes the ring, health verdicts and syncing buckets to them
//! ([`crate::cluster::views::ClusterViews`]).
//!
//! - [`cores`]: the typed questions to one core or every core.
//! - [`node_service`]: NodeService (Stats, Layout, Members).
//! - [`peer_service`]: PeerService's control methods (Leave; anti-entropy's Digests, Keys,
//!   Fetch, Apply).
//! - [`metrics_http`]: the node's figures and the Prometheus endpoint.
//! - [`leave`]: a graceful leave, and the hand-off before exit.
//! - [`memory`]: MAX_MEMORY and CAPACITY divided among the cores, again and again.

pub mod cores;
pub mod leave;
pub mod memory;
pub mod metrics_http;
pub mod node_service;
pub mod peer_service;
pub mod peers;

use crate::{
    cluster::{
        antientropy::{self, AntiEntropy},
        membership::{self, MembershipCmd, MembershipSettings, MembershipView, SharedView},
        ring::Ring,
        views::ViewPublishers,
    },
    ingress::Forwarded,
    pb,
};
use cores::Cores;
use metrics_http::Gatherer;
use peers::CorePeers;
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, oneshot};
use tonic::codegen::Service;
use tonic_health::{server::HealthReporter, ServingStatus};

/// What the control plane needs to know of the node.
pub struct Settings {
    pub me: String,
    pub bind: SocketAddr,
    pub seeds: Vec<String>,
    pub dead_after: Duration,
    pub vnodes: u32,
    pub replication_factor: usize,
    pub write_quorum: usize,
    pub read_quorum: usize,
    pub num_shards: u32,
    pub nr_cores: usize,
    /// The shard-aware port (routing/steer.rs), 0 when there is none: told to peers and
    /// clients by NodeService.Layout.
    pub shard_port: u16,
    /// None: no anti-entropy rounds (ANTI_ENTROPY=off).
    pub anti_entropy_interval: Option<Duration>,
    /// After a ring change, how long reads also ask former owners and former owners keep data.
    pub transition: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub memory: crate::engine::budget::Memory,
    /// CLUSTER_SECRET: seals gossip.
    pub cluster: Option<crate::security::secret::ClusterSecret>,
}

/// The running control plane, as the node's main thread holds it.
pub struct ControlPlane {
    runtime: tokio::runtime::Handle,
    health: HealthReporter,
    membership: mpsc::UnboundedSender<MembershipCmd>,
    view: SharedView,
    anti_entropy: Arc<AntiEntropy<Cores, CorePeers>>,
    /// Calls to other nodes, made on the cores.
    peers: Arc<CorePeers>,
    vnodes: u32,
    replication_factor: usize,
    me: String,
    cores: Cores,
    thread: thread::JoinHandle<()>,
    stop_tx: oneshot::Sender<()>,
}

/// The service names whose health is reported: the empty name (the whole server) and ours.
const HEALTH_NAMES: [&str; 2] = ["", "pb.CacheService"];

/// The sockets the control plane serves, bound on the starting thread so that a taken port is
/// a start-up error naming it.
struct Sockets {
    gossip: std::net::UdpSocket,
    metrics: Option<std::net::TcpListener>,
}

impl Sockets {
    fn bind(settings: &Settings) -> anyhow::Result<Sockets> {
        let gossip = std::net::UdpSocket::bind(settings.bind).map_err(|e| {
            anyhow::anyhow!("cannot bind the gossip socket (UDP {}): {e}", settings.bind)
        })?;
        gossip.set_nonblocking(true)?;
        let metrics = match settings.metrics_addr {
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|e| anyhow::anyhow!("cannot listen on METRICS_ADDR {addr}: {e}"))?;
                listener.set_nonblocking(true)?;
                Some(listener)
            }
            None => None,
        };
        Ok(Sockets { gossip, metrics })
    }
}

/// The gRPC services the cores forward here, as one router.
fn routes(
    settings: &Settings,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    gatherer: Gatherer,
    view: SharedView,
    topology: node_service::TopologyViews,
    peer: peer_service::PeerControl,
) -> anyhow::Result<tonic::service::Routes> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok(tonic::service::Routes::new(health_service)
        .add_service(reflection.build_v1()?)
        .add_service(reflection_v1alpha)
        .add_service(pb::node_service_server::NodeServiceServer::new(
            node_service::NodeStats {
                gatherer,
                view,
                replication_factor: settings.replication_factor,
                write_quorum: settings.write_quorum,
                read_quorum: settings.read_quorum,
                layout: pb::LayoutReply {
                    cores: settings.nr_cores as u32,
                    num_shards: settings.num_shards,
                    shard_port: settings.shard_port as u32,
                },
                topology,
            },
        ))
        .add_service(
            pb::peer_service_server::PeerServiceServer::new(peer)
                .max_decoding_message_size(antientropy::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(antientropy::MAX_MESSAGE_BYTES),
        ))
}

/// Answers what the cores forward, each request as a task of its own.
async fn serve_forwarded(
    routes: tonic::service::Routes,
    mut rx: mpsc::UnboundedReceiver<Forwarded>,
) {
    while let Some((req, reply_tx)) = rx.recv().await {
        let mut routes = routes.clone();
        tokio::spawn(async move {
            let resp: Result<_, Infallible> = routes.call(req).await;
            let resp = match resp {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let _ = reply_tx.send(resp);
        });
    }
}

impl ControlPlane {
    /// Starts the control plane's thread: binds its sockets, builds its services, and runs
    /// membership, anti-entropy, the metrics endpoint and the forwarded requests there.
    pub fn start(
        settings: Settings,
        cores: Cores,
        forwarded: mpsc::UnboundedReceiver<Forwarded>,
        views: ViewPublishers,
    ) -> anyhow::Result<ControlPlane> {
        let sockets = Sockets::bind(&settings)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("control")
            .build()?;
        let view: SharedView = Arc::new(Mutex::new(MembershipView {
            table: membership::MemberTable::new(settings.me.clone(), settings.dead_after),
            ring: Ring::clone(&views.ring.borrow()),
        }));
        let counters = Arc::new(antientropy::Counters::default());
        let peers = Arc::new(CorePeers::new(cores.clone()));
        let anti_entropy = Arc::new(AntiEntropy::new(
            antientropy::Settings {
                me: settings.me.clone(),
                interval: settings.anti_entropy_interval.unwrap_or(Duration::MAX),
                transition: settings.transition,
            },
            cores.clone(),
            CorePeers::new(cores.clone()),
            Arc::clone(&counters),
            views.syncing,
        ));
        let gossip_refused = Arc::new(Default::default());
        let gatherer = Gatherer {
            cores: cores.clone(),
            started: Instant::now(),
            view: Arc::clone(&view),
            data_movement: counters,
            memory: settings.memory,
            gossip_refused: Arc::clone(&gossip_refused),
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        let (membership_tx, membership_rx) = mpsc::unbounded_channel();
        let routes = routes(
            &settings,
            health_service,
            gatherer.clone(),
            Arc::clone(&view),
            node_service::TopologyViews {
                ring: views.ring.subscribe(),
                health: views.health.subscribe(),
            },
            peer_service::PeerControl {
                membership: membership_tx.clone(),
                cores: cores.clone(),
            },
        )?;
        let membership_settings = MembershipSettings {
            me: settings.me.clone(),
            seeds: settings.seeds.clone(),
            dead_after: settings.dead_after,
            vnodes: settings.vnodes,
            replication_factor: settings.replication_factor,
            seal: settings.cluster.clone(),
            refused: gossip_refused,
        };
        let rings = views.ring.subscribe();
        let settings_memory = settings.memory;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let control_cores = cores.clone();
        let main = {
            let (health, view, anti_entropy) =
                (health.clone(), Arc::clone(&view), Arc::clone(&anti_entropy));
            let anti_entropy_on = settings.anti_entropy_interval.is_some();
            async move {
                for name in HEALTH_NAMES {
                    health
                        .set_service_status(name, ServingStatus::Serving)
                        .await;
                }
                match tokio::net::UdpSocket::from_std(sockets.gossip) {
                    Ok(socket) => {
                        let (ring_tx, health_tx) = (views.ring, views.health);
                        tokio::spawn(membership::start(
                            membership_settings,
                            socket,
                            view,
                            membership_rx,
                            move |ring| {
                                let _ = ring_tx.send(Arc::new(ring));
                            },
                            move |health| {
                                let _ = health_tx.send(Arc::new(health));
                            },
                        ));
                    }
                    Err(e) => tracing::error!(error = %e, "gossip socket failed"),
                }
                if anti_entropy_on {
                    tokio::spawn(anti_entropy.run(rings));
                }
                tokio::spawn(memory::rebalance_forever(cores, settings_memory));
                if let Some(listener) = sockets.metrics {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => {
                            tokio::spawn(metrics_http::serve_metrics(l, gatherer));
                        }
                        Err(e) => tracing::error!(error = %e, "metrics endpoint failed"),
                    }
                }
                tokio::select! {
                    _ = serve_forwarded(routes, forwarded) => {}
                    _ = stop_rx => {}
                }
            }
        };
        let handle = runtime.handle().clone();
        let thread = thread::Builder::new()
            .name("control".into())
            .spawn(move || runtime.block_on(main))?;
        Ok(ControlPlane {
            runtime: handle,
            health,
            membership: membership_tx,
            view,
            anti_entropy,
            peers,
            vnodes: settings.vnodes,
            replication_factor: settings.replication_factor,
            me: settings.me,
            cores: control_cores,
            thread,
            stop_tx,
        })
    }

    /// Gives every core reloaded TLS material and tokens; how many cores took them.
    pub fn install_security(&self, material: crate::security::Material) -> usize {
        let cores = self.cores.clone();
        let material = Arc::new(material);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let taken = cores.install_security(material).await;
            let _ = done_tx.send(taken);
        });
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap_or(0)
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

    pub fn stop(self) {
        let _ = self.stop_tx.send(());
        let _ = self.thread.join();
    }
}
