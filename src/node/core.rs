//! What one core runs, from start to stop: it joins the mesh, builds its engine (the shards it
//! owns) and its coordinator, follows the cluster views the control plane publishes, answers
//! other cores and the control plane, runs its background work, and serves connections
//! (ingress) until shutdown. Runs on the core's executor; one instance per core.

use crate::{
    cluster::{
        coordinator::{Coordinator, Routed},
        hints::Hints,
        peer::PeerClients,
        views::ClusterViews,
    },
    config::Config,
    engine::{command::Response, core::CoreEngine},
    ingress::{self, CoreCtx, Forwarder, RateLimiter},
    observability::metrics::CoreMetrics,
    security::CoreSecurity,
};
use executors::{Inbox, Mesh};
use std::{
    cell::{Cell, RefCell},
    os::fd::OwnedFd,
    rc::Rc,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// Background work (expiry sweeps, hint replay, the control plane's scans) gets this share of
/// a busy core against requests' 1000 (glommio's default queue): it still runs when requests
/// keep the core busy, without holding them up for more than a tenth of the time.
const BACKGROUND_SHARES: usize = 100;

/// Something each core takes once at start, by core index.
pub type PerCore<T> = Arc<Vec<Mutex<Option<T>>>>;

pub fn per_core<T>(items: Vec<T>) -> PerCore<T> {
    Arc::new(items.into_iter().map(|i| Mutex::new(Some(i))).collect())
}

fn take<T>(slots: &PerCore<T>, core: usize) -> Option<T> {
    slots.get(core).and_then(|slot| slot.lock().ok()?.take())
}

/// What every core is started with. Built once by the node; `Send`, cloned into each executor.
#[derive(Clone)]
pub struct CoreSetup {
    pub config: Arc<Config>,
    pub num_shards: u32,
    pub node_id: u32,
    pub epoch: Instant,
    pub mesh: Mesh<Routed, Response>,
    pub forwarder: Forwarder,
    /// One bucket for the whole node, so RATE_LIMIT means what it says whichever core a
    /// connection lands on. Only present when a limit is set; its atomic is then the one
    /// shared word on the request path, by the operator's choice.
    pub limiter: Option<Arc<RateLimiter>>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Each core reports once: listening, or why it could not.
    pub ready: crossbeam_channel::Sender<Result<usize, String>>,
    /// Cores that have finished draining their connections.
    pub drained: Arc<AtomicUsize>,
    /// The control plane's questions to each core.
    pub inboxes: PerCore<Inbox<CoreCtx>>,
    /// The ring, health verdicts and syncing buckets, as the control plane publishes them.
    pub views: ClusterViews,
    /// Each core's listener on the shard-aware port (routing/steer.rs); empty when the node
    /// has none.
    pub shard_listeners: PerCore<OwnedFd>,
    /// TLS and tokens as loaded at start (SIGHUP sends each core the reloaded ones).
    pub security: crate::security::Material,
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
    let background = glommio::executor().create_task_queue(
        glommio::Shares::Static(BACKGROUND_SHARES),
        glommio::Latency::NotImportant,
        "background",
    );
    let spawn_background = |task: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>| {
        if let Ok(task) = glommio::spawn_local_into(task, background) {
            task.detach();
        }
    };
    let engine = Rc::new(CoreEngine::new(
        core,
        router.nr_cores(),
        setup.num_shards,
        config.memory,
        setup.node_id,
        setup.epoch,
    ));
    spawn_background(Box::pin(Rc::clone(&engine).sweep_forever()));
    let views = setup.views.clone();
    let coordinator = Rc::new(Coordinator {
        engine: Rc::clone(&engine),
        peers: PeerClients::new(),
        me: config.addr.clone(),
        ring: RefCell::new(Rc::new((**views.ring.borrow()).clone())),
        write_quorum: config.write_quorum,
        read_quorum: config.read_quorum,
        tombstone_ttl_secs: config.tombstone_ttl_secs,
        read_repairs: Cell::new(0),
        hints: Rc::new(Hints::new(config.hints.per_core(router.nr_cores()))),
        syncing: RefCell::new(Rc::new((**views.syncing.borrow()).clone())),
        health: RefCell::new(Rc::new((**views.health.borrow()).clone())),
        speculative: config.speculative_retry,
        speculative_retries: Cell::new(0),
        write_backs: Cell::new(0),
        skipped_down: Cell::new(0),
    });
    for follow in Rc::clone(&coordinator).follow(views) {
        glommio::spawn_local(follow).detach();
    }
    if coordinator.hints.enabled() {
        let ring_of = Rc::clone(&coordinator);
        spawn_background(Box::pin(Rc::clone(&coordinator.hints).deliver_forever(
            Rc::clone(&coordinator.peers),
            move |peer| ring_of.ring().contains(peer),
            config.rpc_timeout,
        )));
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
        forwarder: setup.forwarder.clone(),
        metrics: CoreMetrics::default(),
        coordinator,
        http2_limits: config.http2,
        reply_bytes: Cell::new(0),
        http2_events: Default::default(),
        connections_shed: Cell::new(0),
        security: CoreSecurity::new(&setup.security, config.security.cluster.clone()),
    });
    ctx.coordinator
        .peers
        .set_tls(setup.security.tls.as_ref().map(|t| t.client.clone()));
    {
        let ctx = Rc::clone(&ctx);
        router.serve(move |req| ctx.handle_owned(req));
    }
    if let Some(inbox) = take(&setup.inboxes, core) {
        glommio::spawn_local(inbox.serve(Rc::clone(&ctx), background)).detach();
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
    let plaintext = match config.plaintext_addr.map(glommio::net::TcpListener::bind) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            let _ = setup.ready.send(Err(format!(
                "cannot listen on PLAINTEXT_ADDR {}: {e}",
                config
                    .plaintext_addr
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            )));
            return CoreExit {
                core,
                connections_left: 0,
            };
        }
    };
    let steered = take(&setup.shard_listeners, core).map(|fd| {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: the descriptor is a listening TCP socket this core now owns alone.
        unsafe { glommio::net::TcpListener::from_raw_fd(fd.into_raw_fd()) }
    });
    let _ = setup.ready.send(Ok(core));
    tracing::debug!(core, shards = engine.nr_local_shards(), "core serving");

    // This core's share of MAX_CONNECTIONS (the kernel spreads connections over the cores).
    let max_connections = config.max_connections.div_ceil(router.nr_cores()).max(1);
    let (connections_left, deadline) = ingress::serve_listeners(
        Rc::clone(&ctx),
        listener,
        steered,
        plaintext,
        setup.shutdown.clone(),
        max_connections,
        config.shutdown_timeout,
    )
    .await;
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
