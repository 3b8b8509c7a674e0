//! The client's picture of the cluster and its connections: the topology, followed on one
//! `WatchTopology` stream (re-opened on another node when it ends); each node's layout,
//! asked once per node; and one HTTP/2 connection per (node, core), opened on first use from a
//! source port that the node's shard-aware port steers to that core. Every connection, the
//! topology stream's included, is made by the client's one [`Dialer`] (TLS, token).

use crate::conn::{Conn, Dialer};
use crate::{pb, Config, Error};
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::sync::{watch, OnceCell};
use tonic::Status;

/// The topology as the client places keys with it.
#[derive(Debug, Default)]
struct Topology {
    version: u64,
    replication_factor: usize,
    /// (address, held down).
    nodes: Vec<(String, bool)>,
    points: Vec<(u64, u32)>,
    /// Some seed is among the nodes: the addresses the nodes give themselves are the ones this
    /// client reaches them by. When none is (a seed behind NAT, or a published container
    /// port), the client cannot route and sends every request to its seeds.
    routable: bool,
}

impl Topology {
    fn from_pb(t: pb::TopologyReply, seeds: &[String]) -> Topology {
        let routable = t.nodes.iter().any(|n| seeds.contains(&n.addr));
        Topology {
            routable,
            version: t.version,
            replication_factor: t.replication_factor as usize,
            nodes: t.nodes.into_iter().map(|n| (n.addr, n.down)).collect(),
            points: t.positions.into_iter().zip(t.owners).collect(),
        }
    }
}

/// How to reach one node's cores.
#[derive(Debug, Clone, Copy)]
struct Layout {
    cores: u32,
    num_shards: u32,
    /// None: the node has no shard-aware port; requests go to its ADDR.
    shard_addr: Option<SocketAddr>,
}

/// One node's connections.
#[derive(Default)]
struct Node {
    layout: OnceCell<Layout>,
    /// To its ADDR: for its layout, and for requests when it has no shard-aware port.
    plain: Mutex<Option<Conn>>,
    /// By core, through its shard-aware port.
    cores: Mutex<HashMap<u32, Conn>>,
}

pub struct Router {
    topology: watch::Receiver<Arc<Topology>>,
    /// Topology messages received so far (the first included).
    pub updates: std::sync::atomic::AtomicU64,
    nodes: Mutex<HashMap<String, Arc<Node>>>,
    /// Nodes a request just failed to reach, until when they are asked last.
    avoid: Mutex<HashMap<String, Instant>>,
    connect_timeout: Duration,
    dialer: Arc<Dialer>,
}

/// How long a node that just failed a request is asked after the key's other replicas.
const AVOID_FOR: Duration = Duration::from_secs(1);

impl Router {
    /// Follows the topology from `config.seeds`; returns once it is known.
    pub async fn start(config: &Config) -> Result<Arc<Router>, Error> {
        let dialer = Arc::new(Dialer::new(config)?);
        let (tx, rx) = watch::channel(Arc::new(Topology::default()));
        let router = Arc::new(Router {
            topology: rx,
            updates: std::sync::atomic::AtomicU64::new(0),
            nodes: Mutex::default(),
            avoid: Mutex::default(),
            connect_timeout: config.timeout,
            dialer: Arc::clone(&dialer),
        });
        // The seeds in turn, once, before the caller is told anything: a client whose seeds
        // all refuse fails at once, naming why.
        let mut first = None;
        let mut why = Vec::new();
        // A seed that turned the client away (its token): what the client says when no seed
        // answers, as no other seed can be expected to take that token either.
        let mut refused = None;
        for seed in &config.seeds {
            let open = open_watch(&dialer, seed, config.timeout);
            match tokio::time::timeout(config.timeout, open).await {
                Ok(Ok(stream)) => {
                    first = Some(stream);
                    break;
                }
                // Its message says which node could not be reached, and why.
                Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {
                    why.push(s.message().to_string())
                }
                Ok(Err(s)) => {
                    why.push(format!("{seed} answered {:?}: {}", s.code(), s.message()));
                    if matches!(
                        s.code(),
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                    ) {
                        refused = Some(s.code());
                    }
                }
                Err(_) => why.push(format!(
                    "cannot reach {seed}: no answer within {:?}",
                    config.timeout
                )),
            }
        }
        let Some(first) = first else {
            return Err(match refused {
                Some(code) => Error::from(Status::new(code, why.join("; "))),
                None => Error::NoTopology(why.join("; ")),
            });
        };
        let mut known = router.topology.clone();
        tokio::spawn(follow(
            Arc::downgrade(&router),
            dialer,
            config.seeds.clone(),
            config.max_backoff,
            tx,
            Some(first),
        ));
        let first = tokio::time::timeout(config.timeout, async {
            known.wait_for(|t| !t.nodes.is_empty()).await.is_ok()
        })
        .await;
        match first {
            Ok(true) => Ok(router),
            _ => Err(Error::NoTopology(format!(
                "none of {:?} answered NodeService.WatchTopology within {:?}",
                config.seeds, config.timeout
            ))),
        }
    }

    /// The key's replicas: those not down and not just failed first, each group in ring order.
    pub fn replicas(&self, key: &[u8]) -> Vec<String> {
        let t = Arc::clone(&self.topology.borrow());
        if !t.routable {
            return Vec::new();
        }
        let now = Instant::now();
        // Looked up under the lock, not copied out: this runs on every request.
        let avoid = lock(&self.avoid);
        let mut all: Vec<(bool, String)> = placement::replicas_at(
            &t.points,
            t.replication_factor,
            placement::key_position(key),
        )
        .filter_map(|i| t.nodes.get(i as usize))
        .map(|(addr, down)| {
            let avoided = avoid.get(addr).is_some_and(|until| *until > now);
            (*down || avoided, addr.clone())
        })
        .collect();
        drop(avoid);
        // Stable: ring order within each group.
        all.sort_by_key(|(last, _)| *last);
        all.into_iter().map(|(_, addr)| addr).collect()
    }

    /// A request to `node` failed on its connection: ask it last for a while, and dial again.
    pub fn failed(&self, node: &str) {
        if let Ok(mut avoid) = self.avoid.lock() {
            avoid.insert(node.to_string(), Instant::now() + AVOID_FOR);
        }
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.remove(node);
        }
    }

    /// Drops what the client knew of nodes that went down or came up between `old` and
    /// `new`: one that restarted may have other cores or another shard-aware port.
    fn forget_changed(&self, old: &Topology, new: &Topology) {
        let Ok(mut nodes) = self.nodes.lock() else {
            return;
        };
        for (addr, down) in &new.nodes {
            if !old.nodes.iter().any(|(a, d)| a == addr && d == down) {
                nodes.remove(addr);
            }
        }
    }

    fn node(&self, addr: &str) -> Arc<Node> {
        let mut nodes = lock(&self.nodes);
        // Looked up before inserting: `entry` would allocate the key on every request.
        if let Some(node) = nodes.get(addr) {
            return Arc::clone(node);
        }
        Arc::clone(nodes.entry(addr.to_string()).or_default())
    }

    /// The connection to `addr`'s ADDR, where any request may go (the node coordinates it).
    pub async fn plain(&self, addr: &str) -> Result<Conn, Status> {
        let node = self.node(addr);
        let open = lock(&node.plain).clone().filter(|c| !c.is_closed());
        if let Some(c) = open {
            return Ok(c);
        }
        let c = connect_plain(&self.dialer, addr, self.connect_timeout).await?;
        *lock(&node.plain) = Some(c.clone());
        Ok(c)
    }

    /// The connection for `key` on `addr`: to the core that owns it, once the node's layout
    /// is known; an error means nothing was sent.
    pub async fn channel(&self, addr: &str, key: &[u8]) -> Result<Conn, Status> {
        let node = self.node(addr);
        let layout = match node.layout.get() {
            Some(l) => *l,
            None => {
                let plain = self.plain(addr).await?;
                *node
                    .layout
                    .get_or_try_init(|| ask_layout(addr, plain))
                    .await?
            }
        };
        let Some(shard_addr) = layout.shard_addr else {
            return self.plain(addr).await;
        };
        let core = placement::core_of(key, layout.num_shards, layout.cores as usize) as u32;
        let open = lock(&node.cores)
            .get(&core)
            .filter(|c| !c.is_closed())
            .cloned();
        if let Some(c) = open {
            return Ok(c);
        }
        let c = connect_to_core(
            &self.dialer,
            addr,
            shard_addr,
            core,
            layout.cores,
            self.connect_timeout,
        )
        .await?;
        lock(&node.cores).insert(core, c.clone());
        Ok(c)
    }
}

/// A lock held for a lookup or an insert, never across an await; a panic elsewhere leaves
/// the data usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unavailable(addr: &str, e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("cannot reach {addr}: {e}"))
}

async fn connect_plain(dialer: &Dialer, addr: &str, timeout: Duration) -> Result<Conn, Status> {
    let dial = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| unavailable(addr, e))?;
        dialer.handshake(tcp, addr).await
    };
    tokio::time::timeout(timeout, dial)
        .await
        .map_err(|_| unavailable(addr, format_args!("no answer within {timeout:?}")))?
}

/// A WatchTopology stream from the node at `addr`.
async fn open_watch(
    dialer: &Dialer,
    addr: &str,
    timeout: Duration,
) -> Result<tonic::Streaming<pb::TopologyReply>, Status> {
    let conn = connect_plain(dialer, addr, timeout).await?;
    Ok(conn
        .node()
        .watch_topology(pb::TopologyRequest {})
        .await?
        .into_inner())
}

async fn ask_layout(addr: &str, plain: Conn) -> Result<Layout, Status> {
    let l = plain
        .node()
        .layout(pb::LayoutRequest {})
        .await?
        .into_inner();
    let shard_addr = if l.shard_port == 0 {
        None
    } else {
        let mut a = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| unavailable(addr, e))?
            .find(|a| a.is_ipv4())
            .ok_or_else(|| unavailable(addr, "no IPv4 address"))?;
        a.set_port(l.shard_port as u16);
        Some(a)
    };
    Ok(Layout {
        cores: l.cores.max(1),
        num_shards: l.num_shards.max(1),
        shard_addr,
    })
}

/// A connection to `shard_addr` from a source port its node steers to `core`.
async fn connect_to_core(
    dialer: &Dialer,
    addr: &str,
    shard_addr: SocketAddr,
    core: u32,
    cores: u32,
    timeout: Duration,
) -> Result<Conn, Status> {
    let dial = async {
        let tcp = dial_from_core_port(shard_addr, core, cores)
            .await
            .map_err(|e| unavailable(addr, format_args!("{e} (core {core})")))?;
        // The authority names the node (its ADDR), as a request to ADDR would; so does the
        // name its certificate is checked for (the shard-aware port is the same node, and
        // `shard_addr` is only what ADDR resolved to).
        dialer.handshake(tcp, addr).await
    };
    tokio::time::timeout(timeout, dial)
        .await
        .map_err(|_| unavailable(addr, format_args!("no answer within {timeout:?}")))?
}

/// Linux's ephemeral port range, where a client's source ports come from.
fn local_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .filter(|(lo, hi)| lo < hi)
        .unwrap_or((32768, 60999))
}

async fn dial_from_core_port(
    to: SocketAddr,
    core: u32,
    cores: u32,
) -> std::io::Result<tokio::net::TcpStream> {
    let (lo, hi) = local_port_range();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let span = (hi - lo) as u32 + 1;
    let mut port = placement::port_for_core((lo as u32 + seed % span) as u16, core, cores, lo, hi);
    let mut last = std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free source port");
    for _ in 0..64 {
        let socket = if to.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        let from: SocketAddr = if to.is_ipv4() {
            ([0, 0, 0, 0], port).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, port).into()
        };
        match socket.bind(from) {
            Ok(()) => match socket.connect(to).await {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => last = e,
                Err(e) => return Err(e),
            },
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = e,
            Err(e) => return Err(e),
        }
        port = placement::port_for_core(port.saturating_add(1), core, cores, lo, hi);
    }
    Err(last)
}

/// Keeps `tx` current from one WatchTopology stream at a time: the seeds and the nodes of
/// the last topology are tried in turn, backing off while none answers. Ends with the client.
async fn follow(
    router: std::sync::Weak<Router>,
    dialer: Arc<Dialer>,
    seeds: Vec<String>,
    max_backoff: Duration,
    tx: watch::Sender<Arc<Topology>>,
    mut next: Option<tonic::Streaming<pb::TopologyReply>>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut turn = 0usize;
    loop {
        if router.strong_count() == 0 {
            return;
        }
        let opened = match next.take() {
            Some(stream) => Some(stream),
            None => {
                let mut candidates: Vec<String> =
                    tx.borrow().nodes.iter().map(|n| n.0.clone()).collect();
                for s in &seeds {
                    if !candidates.contains(s) {
                        candidates.push(s.clone());
                    }
                }
                turn = turn.wrapping_add(1);
                let addr = candidates[turn % candidates.len().max(1)].clone();
                open_watch(&dialer, &addr, Duration::from_secs(1))
                    .await
                    .ok()
            }
        };
        if let Some(mut stream) = opened {
            backoff = Duration::from_millis(50);
            loop {
                let t = tokio::select! {
                    m = stream.message() => match m {
                        Ok(Some(t)) => t,
                        _ => break,
                    },
                    // Every clone of the client is gone.
                    _ = tx.closed() => return,
                };
                let t = Topology::from_pb(t, &seeds);
                let Some(router) = router.upgrade() else {
                    return;
                };
                router
                    .updates
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if t.version != tx.borrow().version {
                    router.forget_changed(&tx.borrow(), &t);
                    let _ = tx.send(Arc::new(t));
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max_backoff);
    }
}
