//! Ingress: what each core runs. It joins the mesh, takes ownership of its shards, answers
//! other cores' requests, and accepts gRPC connections on the shared ADDR (SO_REUSEPORT: the
//! kernel spreads connections over the cores), serving HTTP/2 on the core itself.
//!
//! - [`http2`]: the HTTP/2 server connection (frames and HPACK from the `http2` crate).
//! - [`grpc`]: the CacheService and PeerService methods and routing to the owning core.
//! - [`side`]: reflection, health and Stats on a side thread.

pub mod grpc;
pub mod side;
pub mod steer;

use crate::observability::metrics::CoreMetrics;
use crate::{
    cluster::{coordinator::Coordinator, hints::Hints, peer::PeerClients, ring::Ring},
    config::Config,
    engine::{
        command::{Command, Request, Response},
        core::{CoreEngine, SWEEP_BUDGET, SWEEP_INTERVAL},
    },
    error::Error,
};
use executors::{Handled, Mesh, Router};
use futures_lite::future;
use std::{
    cell::Cell,
    os::fd::{AsRawFd, FromRawFd},
    rc::Rc,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

pub type RateLimiter = governor::DefaultDirectRateLimiter;

/// What every core is started with. Built once by the node; `Send`, cloned into each executor.
#[derive(Clone)]
pub struct CoreSetup {
    pub config: Arc<Config>,
    pub num_shards: u32,
    pub node_id: u32,
    pub epoch: Instant,
    pub mesh: Mesh<Request, Response>,
    pub side: side::SideHandle,
    /// One bucket for the whole node, so RATE_LIMIT means what it says whichever core a
    /// connection lands on. Only present when a limit is set; its atomic is then the one
    /// shared word on the request path, by the operator's choice.
    pub limiter: Option<Arc<RateLimiter>>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Each core reports once: listening, or why it could not.
    pub ready: crossbeam_channel::Sender<Result<usize, String>>,
    /// Cores that have finished draining their connections.
    pub drained: Arc<AtomicUsize>,
    /// Each core takes one receiver of snapshot requests from here (side::ControlReceiver).
    /// The side thread's channel to each core, by core index: anti-entropy sends entries to
    /// the core that owns their shard. Taken once, at start.
    pub control: Arc<Vec<std::sync::Mutex<Option<side::ControlReceiver>>>>,
    /// Each core's listener on the shard-aware port (steer.rs), by core index; empty when
    /// the node has none. Taken once, at start.
    pub shard_listeners: Arc<Vec<std::sync::Mutex<Option<std::os::fd::OwnedFd>>>>,
}

/// A core's state shared by its tasks.
pub struct CoreCtx {
    pub engine: Rc<CoreEngine>,
    pub router: Rc<Router<Request, Response>>,
    pub num_shards: u32,
    pub default_ttl_secs: Option<u64>,
    pub max_recv_msg_bytes: usize,
    pub max_send_msg_bytes: usize,
    pub rpc_timeout: Duration,
    pub limiter: Option<Arc<RateLimiter>>,
    pub side: side::SideHandle,
    pub metrics: CoreMetrics,
    pub coordinator: Rc<Coordinator>,
    /// HTTP2_* bounds of every connection.
    pub http2_limits: grpc::server::Limits,
    /// Reply bytes this core's connections hold for clients that have not read them.
    pub reply_bytes: Cell<usize>,
    /// By `grpc::server::Event`, in the order of `Event::ALL`; and connections turned away.
    pub http2_events: [Cell<u64>; grpc::server::Event::ALL.len()],
    pub connections_shed: Cell<u64>,
}

impl CoreCtx {
    /// Serves a request for one of this core's shards, from this core's ingress or from
    /// another core: replica commands and keys this node alone holds are answered at once;
    /// client commands with remote replicas are coordinated asynchronously.
    pub fn handle_owned(self: &Rc<Self>, req: Request) -> Handled<Response> {
        let key = match &req.command {
            Command::Apply(_) | Command::Read { .. } => {
                return Handled::Ready(self.engine.execute(req))
            }
            Command::Get { key } | Command::Set { key, .. } | Command::Delete { key } => key,
        };
        let ring = self.coordinator.ring();
        if self.coordinator.is_local_only(&ring, key) {
            return Handled::Ready(self.engine.execute(req));
        }
        if Instant::now() >= req.deadline {
            return Handled::Ready(Err(Error::DeadlineExceeded));
        }
        Handled::Later(Box::pin(Rc::clone(&self.coordinator).coordinate(req)))
    }
}

/// Summary a core returns when it stops.
#[derive(Debug, Default)]
pub struct CoreExit {
    pub core: usize,
    pub connections_left: usize,
}

/// The main future of one core.
pub async fn run_core(setup: CoreSetup) -> CoreExit {
    let config = Arc::clone(&setup.config);
    let router = Rc::new(setup.mesh.join().await);
    let core = router.core();
    let engine = Rc::new(CoreEngine::new(
        core,
        router.nr_cores(),
        setup.num_shards,
        config.capacity,
        setup.node_id,
        setup.epoch,
    ));
    glommio::spawn_local(sweep_forever(Rc::clone(&engine))).detach();
    let coordinator = Rc::new(Coordinator {
        engine: Rc::clone(&engine),
        peers: Rc::new(PeerClients::default()),
        me: config.addr.clone(),
        ring: std::cell::RefCell::new(Rc::new(Ring::new(
            [config.addr.clone()],
            config.vnodes,
            config.replication_factor,
        ))),
        write_quorum: config.write_quorum,
        read_quorum: config.read_quorum,
        tombstone_ttl_secs: config.tombstone_ttl_secs,
        read_repairs: std::cell::Cell::new(0),
        hints: Rc::new(Hints::new(config.hints.per_core(router.nr_cores()))),
        syncing: std::cell::RefCell::new(Rc::new(Default::default())),
        health: std::cell::RefCell::new(Rc::new(Default::default())),
        speculative: config.speculative_retry,
        speculative_retries: Cell::new(0),
        write_backs: Cell::new(0),
        skipped_down: Cell::new(0),
    });
    if coordinator.hints.enabled() {
        let ring_of = Rc::clone(&coordinator);
        glommio::spawn_local(Rc::clone(&coordinator.hints).deliver_forever(
            Rc::clone(&coordinator.peers),
            move |peer| ring_of.ring().contains(peer),
            config.rpc_timeout,
        ))
        .detach();
    }

    let ctx = Rc::new(CoreCtx {
        engine: Rc::clone(&engine),
        router: Rc::clone(&router),
        num_shards: setup.num_shards,
        default_ttl_secs: config.ttl_secs,
        max_recv_msg_bytes: config.max_recv_msg_bytes,
        max_send_msg_bytes: config.max_send_msg_bytes,
        rpc_timeout: config.rpc_timeout,
        limiter: setup.limiter.clone(),
        side: setup.side.clone(),
        metrics: CoreMetrics::default(),
        coordinator,
        http2_limits: config.http2,
        reply_bytes: Cell::new(0),
        http2_events: Default::default(),
        connections_shed: Cell::new(0),
    });
    {
        let ctx = Rc::clone(&ctx);
        router.serve(move |req| ctx.handle_owned(req));
    }
    let control = setup
        .control
        .get(core)
        .and_then(|slot| slot.lock().ok()?.take());
    if let Some(control) = control {
        glommio::spawn_local(answer_control(Rc::clone(&ctx), control)).detach();
    }

    let listener = match glommio::net::TcpListener::bind(config.listen_addr) {
        Ok(l) => l,
        Err(e) => {
            let _ = setup
                .ready
                .send(Err(format!("cannot listen on {}: {e}", config.addr)));
            return CoreExit {
                core,
                connections_left: 0,
            };
        }
    };
    let steered = setup
        .shard_listeners
        .get(core)
        .and_then(|slot| slot.lock().ok()?.take())
        .map(|fd| {
            use std::os::fd::{FromRawFd, IntoRawFd};
            // SAFETY: the descriptor is a listening TCP socket this core now owns alone.
            unsafe { glommio::net::TcpListener::from_raw_fd(fd.into_raw_fd()) }
        });
    let _ = setup.ready.send(Ok(core));
    tracing::debug!(core, shards = engine.nr_local_shards(), "core serving");

    let connections = Rc::new(Cell::new(0usize));
    // This core's share of MAX_CONNECTIONS (the kernel spreads connections over the cores).
    let max_connections = config.max_connections.div_ceil(router.nr_cores()).max(1);
    let mut accept_backoff = Duration::from_millis(10);
    let mut accept_failures = 0u64;
    let mut accept_logged = Instant::now() - Duration::from_secs(60);
    let mut shutdown = setup.shutdown.clone();
    loop {
        let on_addr = async { Some(listener.accept().await) };
        let on_shard_port = async {
            match &steered {
                Some(l) => Some(l.accept().await),
                None => future::pending().await,
            }
        };
        let accepted = future::or(future::or(on_addr, on_shard_port), async {
            let _ = shutdown.wait_for(|stop| *stop).await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) if connections.get() >= max_connections => {
                ctx.connections_shed.set(ctx.connections_shed.get() + 1);
                glommio::spawn_local(shed_connection(stream)).detach();
            }
            Some(Ok(stream)) => {
                accept_backoff = Duration::from_millis(10);
                // Small requests and replies must not wait for Nagle's algorithm.
                let _ = stream.set_nodelay(true);
                connections.set(connections.get() + 1);
                glommio::spawn_local(serve_connection(
                    Rc::clone(&ctx),
                    stream,
                    setup.shutdown.clone(),
                    Rc::clone(&connections),
                ))
                .detach();
            }
            Some(Err(e)) => {
                // EMFILE and friends: keep the core up and try again, backing off (the
                // pending connection stays in the backlog meanwhile), and say so at most once
                // a second rather than once a failure.
                accept_failures += 1;
                if accept_logged.elapsed() >= Duration::from_secs(1) {
                    tracing::warn!(core, error = %e, failures = accept_failures, "accept failed");
                    accept_logged = Instant::now();
                    accept_failures = 0;
                }
                glommio::timer::sleep(accept_backoff).await;
                accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    drop(listener);
    drop(steered);

    // Drain: connections were told to finish (GOAWAY); give them until the shutdown timeout.
    let deadline = Instant::now() + config.shutdown_timeout;
    while connections.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    let connections_left = connections.get();
    if connections_left > 0 {
        tracing::warn!(
            core,
            connections_left,
            "shutdown timeout hit with connections open"
        );
    }
    // Other cores may still be finishing requests that need this core's shards: keep the mesh
    // served until every core has drained.
    setup.drained.fetch_add(1, Ordering::SeqCst);
    let nr_cores = router.nr_cores();
    while setup.drained.load(Ordering::SeqCst) < nr_cores && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    CoreExit {
        core,
        connections_left,
    }
}

impl grpc::server::Service for Rc<CoreCtx> {
    fn call(
        &self,
        method: grpc::Method,
        message: &[u8],
        deadline: Instant,
        start: Instant,
    ) -> grpc::Call {
        grpc::start(self, method, message, deadline, start)
    }

    fn forward(&self, req: http::Request<tonic::body::Body>) -> grpc::server::Forwarded {
        let side = self.side.clone();
        Box::pin(async move { side.forward(req).await })
    }

    fn max_recv_msg_bytes(&self) -> usize {
        self.max_recv_msg_bytes
    }

    fn rpc_timeout(&self) -> Duration {
        self.rpc_timeout
    }

    fn limits(&self) -> grpc::server::Limits {
        self.http2_limits
    }

    fn core_reply_bytes(&self) -> Option<&Cell<usize>> {
        Some(&self.reply_bytes)
    }

    fn node_addr(&self) -> Option<&str> {
        Some(&self.coordinator.me)
    }

    fn count(&self, event: grpc::server::Event) {
        if let Some(i) = grpc::server::Event::ALL.iter().position(|e| *e == event) {
            self.http2_events[i].set(self.http2_events[i].get() + 1);
        }
    }
}

/// Turns away a connection over MAX_CONNECTIONS the way an HTTP/2 server says "not now": our
/// SETTINGS (the server preface) and GOAWAY ENHANCE_YOUR_CALM with no stream processed, so a
/// gRPC client retries elsewhere or later instead of seeing a reset. Bounded in time.
async fn shed_connection(mut stream: glommio::net::TcpStream) {
    use futures_lite::AsyncWriteExt;
    let goaway: [u8; 26] = [
        0, 0, 0, 0x4, 0, 0, 0, 0, 0, // SETTINGS, empty
        0, 0, 8, 0x7, 0, 0, 0, 0, 0, // GOAWAY
        0, 0, 0, 0, // last stream id 0
        0, 0, 0, 0xb, // ENHANCE_YOUR_CALM
    ];
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = stream.write_all(&goaway).await;
    lingering_close(stream).await;
}

async fn serve_connection(
    ctx: Rc<CoreCtx>,
    stream: glommio::net::TcpStream,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    connections: Rc<Cell<usize>>,
) {
    // A second handle on the socket outlives the connection's, for the lingering close below.
    // SAFETY: dup returns a new descriptor that nothing else owns.
    let linger = match unsafe { libc::dup(stream.as_raw_fd()) } {
        -1 => None,
        fd => Some(unsafe { glommio::net::TcpStream::from_raw_fd(fd) }),
    };
    let shutdown = Box::pin(async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    });
    let ended = grpc::server::serve(ctx, stream, shutdown).await;
    if ended == grpc::server::Ended::GoneAway {
        if let Some(linger) = linger {
            lingering_close(linger).await;
        }
    }
    connections.set(connections.get() - 1);
}

/// How long a closing connection keeps reading what the client sent before it saw GOAWAY.
const LINGER: Duration = Duration::from_millis(500);

/// Closes a connection after GOAWAY without a reset: frames the client sent before it read
/// the GOAWAY may still be arriving, and closing a socket with unread data makes the kernel
/// send RST, which the client reports as a reset on every stream still open, including the
/// ones the GOAWAY told it were never served (and so are safe to retry). Half-close, then read
/// and discard until the client closes too or LINGER passes.
async fn lingering_close(stream: glommio::net::TcpStream) {
    use futures_lite::AsyncReadExt;
    // SAFETY: a plain shutdown(2) on a descriptor this function owns.
    unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) };
    let mut stream = stream;
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + LINGER;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Answers the side thread: figures for scrapes and the Stats RPC, and new rings.
async fn answer_control(ctx: Rc<CoreCtx>, mut control: side::ControlReceiver) {
    while let Some(msg) = control.recv().await {
        let reply_tx = match msg {
            side::ControlMsg::Ring(ring) => {
                *ctx.coordinator.ring.borrow_mut() = Rc::new(*ring);
                continue;
            }
            side::ControlMsg::Health(health) => {
                *ctx.coordinator.health.borrow_mut() = Rc::new((*health).clone());
                continue;
            }
            side::ControlMsg::Syncing(buckets) => {
                *ctx.coordinator.syncing.borrow_mut() = Rc::new((*buckets).clone());
                continue;
            }
            side::ControlMsg::Snapshot(reply_tx) => reply_tx,
            // Anti-entropy and data movement on this core's shards. A list or drop scans the
            // core's entries once, yielding to requests as it goes.
            side::ControlMsg::Digests(tx) => {
                let _ = tx.send(ctx.engine.digests());
                continue;
            }
            side::ControlMsg::List(buckets, tx) => {
                let _ = tx.send(ctx.engine.list(&buckets).await);
                continue;
            }
            side::ControlMsg::Fetch(keys, tx) => {
                let _ = tx.send(ctx.engine.fetch(&keys));
                continue;
            }
            side::ControlMsg::Apply(entries, tx) => {
                let _ = tx.send(ctx.engine.apply_all(entries));
                continue;
            }
            side::ControlMsg::Drop(buckets, tx) => {
                let _ = tx.send(ctx.engine.drop_buckets(&buckets).await);
                continue;
            }
        };
        let router = &ctx.router;
        let in_flight = (0..router.nr_cores())
            .filter(|&c| c != router.core())
            .map(|c| router.in_flight(c) as u64)
            .sum();
        let mut snapshot = ctx.metrics.snapshot(
            router.core(),
            in_flight,
            ctx.engine.stats(),
            ctx.engine.panics(),
        );
        snapshot.replica_calls = ctx.coordinator.peers.outcome_counts();
        snapshot.peer_bytes = ctx.coordinator.peers.bytes();
        snapshot.read_repairs = ctx.coordinator.read_repairs.get();
        snapshot.speculative_retries = ctx.coordinator.speculative_retries.get();
        snapshot.write_backs = ctx.coordinator.write_backs.get();
        snapshot.skipped_down = ctx.coordinator.skipped_down.get();
        snapshot.peer_scores = ctx
            .coordinator
            .peers
            .latency_scores(ctx.coordinator.speculative);
        snapshot.hints = ctx.coordinator.hints.counts();
        snapshot.http2_events = grpc::server::Event::ALL
            .iter()
            .zip(&ctx.http2_events)
            .map(|(e, n)| (e.name(), n.get()))
            .collect();
        snapshot.connections_shed = ctx.connections_shed.get();
        snapshot.reply_bytes = ctx.reply_bytes.get() as u64;
        let _ = reply_tx.send(snapshot);
    }
}

async fn sweep_forever(engine: Rc<CoreEngine>) {
    loop {
        glommio::timer::sleep(SWEEP_INTERVAL).await;
        // Keep going while rounds find much to reclaim, yielding between rounds so requests
        // are not held up.
        for _ in 0..16 {
            let shards = engine.nr_local_shards().max(1);
            let expired = engine.sweep(SWEEP_BUDGET);
            if expired * 4 < SWEEP_BUDGET * shards {
                break;
            }
            glommio::yield_if_needed().await;
        }
    }
}
