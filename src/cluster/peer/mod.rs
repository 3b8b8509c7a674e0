//! Node-to-node calls from a core: each core keeps its own HTTP/2 connection to each peer
//! (the `http2` crate's client on the core's executor, gRPC framing from
//! [`unary`]), so no connection pool is shared between cores and nothing locks.
//! A broken connection is dropped and the next call dials again.
//!
//! Replica calls go core to core: a core learns each peer's layout once (NodeService.Layout:
//! its cores, its NUM_SHARDS, its shard-aware port) and calls the replica of a key on a
//! connection that lands on the peer's core owning that key (routing/steer.rs), so the
//! replica serves it where it arrives. Peers may have other core counts: each is routed by its
//! own map. Until the layout is known, or for a peer without a shard-aware port, calls go to
//! its ADDR and the core they land on makes one hop.
//!
//! Replica writes and reads are batched per peer core ([`batch`]): what a core has ready for
//! one core of a peer in one turn goes as one call.

pub mod batch;
pub mod unary;

use super::{
    snitch::{CallEnd, PeerLatency, SpeculativeRetry},
    transport::PeerTransport,
};
use crate::{
    engine::command::ReplicaEntry,
    pb,
    routing::{owner_core, shard_of, steer},
};
use batch::Item;
use futures_lite::future;
use http2::client::{Client, Meter};
use pb::{replica_op::Op, replica_outcome::Outcome};
use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    net::{SocketAddr, ToSocketAddrs},
    rc::{Rc, Weak},
    sync::Arc,
    time::{Duration, Instant},
};
use tonic::Status;
use unary::{recurring, unary};

/// The largest answer a peer may send (an entry with its value): peers are trusted to answer
/// what was asked, this only keeps a broken one from filling memory.
const MAX_PEER_REPLY: usize = 1 << 30;

/// This core's connections to other nodes, by address, and what its calls to each peer showed.
pub struct PeerClients {
    /// Itself, for the flush tasks it starts.
    me: Weak<PeerClients>,
    /// Where flush tasks run: the queue requests run in, whichever queue the first caller of a
    /// batch (a request, or background hint replay) ran in.
    flush_queue: glommio::TaskQueueHandle,
    /// Replica requests waiting for their batch, by peer and lane (0: to its ADDR; 1 + i: to
    /// its core i).
    queues: RefCell<HashMap<String, Vec<Vec<Item>>>>,
    /// Batch calls sent.
    batches: Cell<u64>,
    /// Shared with the tasks that ask peers for their layouts.
    conns: Rc<RefCell<HashMap<String, PeerConns>>>,
    calls: RefCell<HashMap<String, PeerCalls>>,
    /// Bytes on the wire of every connection above, both ways.
    meter: Rc<Meter>,
    /// Connections for the control plane's bulk calls (anti-entropy, hand-off, leave), one per
    /// peer, to its ADDR: apart from the replica connections, so a megabyte batch neither
    /// waits replica calls behind its flow-control window nor counts as replica bytes or as a
    /// latency sample of the peer.
    bulk: RefCell<HashMap<String, Client>>,
    /// Whether peers are dialed with TLS (the node serves TLS), and with what configuration
    /// (None: no CA to check peers with, so dials fail saying so).
    tls: RefCell<Option<Option<Arc<rustls::ClientConfig>>>>,
}

/// This core's connections to one peer.
#[derive(Default)]
struct PeerConns {
    /// To its ADDR: for calls that name no key, and until its layout is known.
    plain: Option<Client>,
    layout: Layout,
    /// By the peer's core, through its shard-aware port.
    cores: Vec<Option<Client>>,
    /// It answered a batch UNIMPLEMENTED (an older node): its items go one call each.
    singles: bool,
}

#[derive(Default, Clone, Copy)]
enum Layout {
    #[default]
    Unknown,
    /// NodeService.Layout asked, no answer yet.
    Asking,
    Known {
        cores: u32,
        num_shards: u32,
        /// The peer's shard-aware port on its ADDR's host.
        shard_addr: SocketAddr,
    },
    /// It has no shard-aware port (or no Layout method): calls go to its ADDR.
    Plain,
}

/// This core's record of its calls to one peer.
#[derive(Default)]
struct PeerCalls {
    /// [ok, error, timeout]; plain counters, this core only.
    outcomes: [u64; 3],
    latency: PeerLatency,
}

/// Outcome labels of replica calls, in the order of the counters.
pub const OUTCOMES: [&str; 3] = ["ok", "error", "timeout"];

/// How long a peer may take to tell its layout before it is asked again.
const LAYOUT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a call must have waited, on a connection that received nothing meanwhile, for
/// its timeout to condemn the connection.
const STUCK_AFTER: Duration = Duration::from_millis(100);

/// How long a dial may take before the peer counts as unreachable for this call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The socket address of `addr`. A peer named by host name (a compose service, say) is looked
/// up on the executor's blocking thread: getaddrinfo may wait seconds on a resolver, and on the
/// core it would stall every request the core serves meanwhile.
async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    if let Ok(sockaddr) = addr.parse() {
        return Ok(sockaddr);
    }
    let name = addr.to_string();
    glommio::executor()
        .spawn_blocking(move || {
            // IPv4 first, as the node named `name` chose when it bound (config.rs).
            let all: Vec<SocketAddr> = name.to_socket_addrs()?.collect();
            all.iter()
                .find(|a| a.is_ipv4())
                .or_else(|| all.first())
                .copied()
                .ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no address for this name")
                })
        })
        .await
}

impl PeerClients {
    /// A core's peer clients; made on the core's executor, in the task queue requests run in.
    pub fn new() -> Rc<Self> {
        Rc::new_cyclic(|me| PeerClients {
            me: me.clone(),
            flush_queue: glommio::executor().current_task_queue(),
            queues: RefCell::default(),
            batches: Cell::new(0),
            conns: Rc::default(),
            calls: RefCell::default(),
            meter: Rc::default(),
            bulk: RefCell::default(),
            tls: RefCell::default(),
        })
    }

    /// Dials peers with TLS from now on (`Some`; its configuration, or None without a CA),
    /// or in plaintext (`None`). Open connections keep what they had.
    pub fn set_tls(&self, tls: Option<Option<Arc<rustls::ClientConfig>>>) {
        *self.tls.borrow_mut() = tls;
    }

    /// A client over `io`, a connection to `addr`: with TLS when peers speak it, the
    /// handshake bounded by CONNECT_TIMEOUT.
    async fn over(
        &self,
        addr: &str,
        io: glommio::net::TcpStream,
        meter: Rc<Meter>,
    ) -> Result<Client, Status> {
        let tls = self.tls.borrow().clone();
        let Some(config) = tls else {
            return Ok(Client::over_metered(io, recurring(), meter));
        };
        let unavailable = |why: String| Status::unavailable(format!("cannot reach {addr}: {why}"));
        let config = config.ok_or_else(|| {
            unavailable(
                "TLS is on and no TLS_CA_FILE names the CA of the peers' certificates".into(),
            )
        })?;
        let name = crate::security::tls::server_name(addr).map_err(unavailable)?;
        let dial = futures_rustls::TlsConnector::from(config).connect(name, io);
        match glommio::timer::timeout(CONNECT_TIMEOUT, async { Ok(dial.await) }).await {
            Ok(Ok(io)) => Ok(Client::over_metered(io, recurring(), meter)),
            Ok(Err(e)) => Err(unavailable(format!("TLS handshake failed: {e}"))),
            Err(_) => Err(unavailable("TLS handshake timed out".into())),
        }
    }

    /// Dials `addr`'s ADDR, counting its bytes on `meter`.
    async fn connect(
        &self,
        addr: &str,
        deadline: Instant,
        meter: Rc<Meter>,
    ) -> Result<Client, Status> {
        let dial = async {
            let sockaddr = resolve(addr)
                .await
                .map_err(|e| Status::unavailable(format!("cannot reach {addr}: {e}")))?;
            let io = glommio::net::TcpStream::connect(sockaddr)
                .await
                .map_err(|e| Status::unavailable(format!("cannot reach {addr}: {e}")))?;
            // Small requests and replies must not wait for Nagle's algorithm.
            let _ = io.set_nodelay(true);
            self.over(addr, io, meter).await
        };
        let wait = CONNECT_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
        future::or(dial, async {
            glommio::timer::sleep(wait).await;
            Err(Status::unavailable(format!(
                "cannot reach {addr}: connect timed out"
            )))
        })
        .await
    }

    /// The connection for a call to `addr` about `key` (None: no key): to the peer's core
    /// that owns the key when its layout is known, else to its ADDR.
    async fn client(
        &self,
        addr: &str,
        key: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<Client, Status> {
        // One lookup of the peer: its layout and, when known, the open connection to the
        // key's core.
        let routed = key.and_then(|key| {
            let conns = self.conns.borrow();
            let p = conns.get(addr)?;
            let Layout::Known {
                cores,
                num_shards,
                shard_addr,
            } = p.layout
            else {
                return None;
            };
            let core = owner_core(shard_of(key, num_shards), cores as usize) as u32;
            let open = p
                .cores
                .get(core as usize)
                .and_then(|c| c.as_ref().filter(|c| !c.is_closed()).cloned());
            Some((core, cores, shard_addr, open))
        });
        if let Some((core, cores, shard_addr, open)) = routed {
            if let Some(c) = open {
                return Ok(c);
            }
            match self
                .connect_to_core(addr, shard_addr, core, cores, deadline)
                .await
            {
                Ok(c) => {
                    if let Some(p) = self.conns.borrow_mut().get_mut(addr) {
                        if p.cores.len() < cores as usize {
                            p.cores.resize(cores as usize, None);
                        }
                        p.cores[core as usize] = Some(c.clone());
                    }
                    return Ok(c);
                }
                // The peer may have restarted on another shard-aware port (a free one with
                // SHARD_PORT=0): this call goes to its ADDR, which asks the layout again.
                Err(_) => self.forget(addr),
            }
        }
        let open = self
            .conns
            .borrow()
            .get(addr)
            .and_then(|p| p.plain.as_ref().filter(|c| !c.is_closed()).cloned());
        if let Some(c) = open {
            return Ok(c);
        }
        let c = self.connect(addr, deadline, Rc::clone(&self.meter)).await?;
        let ask = {
            let mut conns = self.conns.borrow_mut();
            let p = match conns.get_mut(addr) {
                Some(p) => p,
                None => conns.entry(addr.to_string()).or_default(),
            };
            p.plain = Some(c.clone());
            let ask = matches!(p.layout, Layout::Unknown);
            if ask {
                p.layout = Layout::Asking;
            }
            ask
        };
        if ask {
            // In the background: this call goes on on ADDR's connection meanwhile, and a slow
            // answer delays no call.
            let conns = Rc::clone(&self.conns);
            let (client, addr) = (c.clone(), addr.to_string());
            glommio::spawn_local(async move {
                let layout =
                    Self::ask_layout(&client, &addr, Instant::now() + LAYOUT_TIMEOUT).await;
                if let Some(p) = conns.borrow_mut().get_mut(&addr) {
                    if matches!(p.layout, Layout::Asking) {
                        p.layout = layout;
                    }
                }
            })
            .detach();
        }
        Ok(c)
    }

    /// What the peer says of its cores (NodeService.Layout), once per peer and connection.
    async fn ask_layout(client: &Client, addr: &str, deadline: Instant) -> Layout {
        let wait = deadline.saturating_duration_since(Instant::now());
        let reply: Result<pb::LayoutReply, Status> = unary(
            client,
            addr,
            "/pb.NodeService/Layout",
            &pb::LayoutRequest {},
            wait.max(Duration::from_millis(1)),
            1024,
        )
        .await;
        match reply {
            Ok(l) if l.shard_port != 0 && l.cores > 0 && l.num_shards > 0 => {
                match resolve(addr).await {
                    Ok(mut shard_addr) => {
                        shard_addr.set_port(l.shard_port as u16);
                        Layout::Known {
                            cores: l.cores,
                            num_shards: l.num_shards,
                            shard_addr,
                        }
                    }
                    Err(_) => Layout::Unknown,
                }
            }
            Ok(_) => Layout::Plain,
            // An older node: never ask it again on this connection.
            Err(s) if s.code() == tonic::Code::Unimplemented => Layout::Plain,
            // Ask again with the next connection.
            Err(_) => Layout::Unknown,
        }
    }

    /// A connection to `addr`'s core `core` through its shard-aware port: the dial runs on the
    /// executor's blocking thread (a connect from a chosen source port has no io_uring form
    /// in glommio), bounded like any dial.
    async fn connect_to_core(
        &self,
        addr: &str,
        shard_addr: SocketAddr,
        core: u32,
        cores: u32,
        deadline: Instant,
    ) -> Result<Client, Status> {
        let wait = CONNECT_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
        if wait.is_zero() {
            return Err(Status::deadline_exceeded("deadline passed before the dial"));
        }
        let stream = glommio::executor()
            .spawn_blocking(move || steer::connect_to_core(shard_addr, core, cores, wait))
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach {addr} (core {core}): {e}")))?;
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: a connected TCP socket, handed over whole.
        let io = unsafe { glommio::net::TcpStream::from_raw_fd(stream.into_raw_fd()) };
        self.over(addr, io, self.meter.clone()).await
    }

    /// Drops the peer's connections and layout after a call failed on one of them: the
    /// layout is asked again with the next connection, as the peer may have restarted with
    /// other cores or on another shard-aware port (one a process of another node now holds:
    /// it refuses calls meant for this peer).
    fn forget(&self, addr: &str) {
        self.conns.borrow_mut().remove(addr);
    }

    /// A control-plane call to `addr` (PeerService's Leave, Digests, Keys, Fetch, Apply) on
    /// this core's bulk connection to it, answers up to `max_reply` bytes. A connection that
    /// failed or refused the call is dropped and the next call dials again.
    pub async fn bulk_call<M, R>(
        &self,
        addr: &str,
        path: &'static str,
        msg: M,
        deadline: Instant,
        max_reply: usize,
    ) -> Result<R, Status>
    where
        M: prost::Message,
        R: prost::Message + Default,
    {
        let existing = self.bulk.borrow().get(addr).cloned();
        let client = match existing {
            Some(client) => client,
            None => {
                // Unmetered: anti-entropy counts its own bytes (cache_anti_entropy_bytes).
                let client = self.connect(addr, deadline, Rc::default()).await?;
                self.bulk
                    .borrow_mut()
                    .insert(addr.to_string(), client.clone());
                client
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let result = unary(&client, addr, path, &msg, left, max_reply).await;
        if let Err(status) = &result {
            if matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
            ) {
                self.bulk.borrow_mut().remove(addr);
            }
        }
        result
    }

    /// One call to the replica `addr` (about `key`, which picks the peer's core): the peer's
    /// latency record sees it, and a connection it shows broken or stuck is dropped.
    async fn unary<M, R>(
        &self,
        addr: &str,
        key: Option<&[u8]>,
        path: &'static str,
        msg: &M,
        deadline: Instant,
    ) -> Result<R, Status>
    where
        M: prost::Message,
        R: prost::Message + Default,
    {
        // (bytes the connection had received when the call began, then the connection).
        let used: RefCell<Option<(u64, Client)>> = RefCell::new(None);
        let call = async {
            let client = self.client(addr, key, deadline).await?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Status::deadline_exceeded(
                    "deadline passed before the replica call",
                ));
            }
            *used.borrow_mut() = Some((client.received(), client.clone()));
            // The client's deadline travels with the call (grpc-timeout), so the replica drops
            // work nobody waits for any more.
            unary(&client, addr, path, msg, left, MAX_PEER_REPLY).await
        };
        let started = Instant::now();
        self.with_calls(addr, |c| c.latency.started(started));
        let result = call.await;
        let end = match &result {
            Ok(_) => CallEnd::Answered,
            Err(s) if s.code() == tonic::Code::DeadlineExceeded => CallEnd::TimedOut,
            // A status the peer sent is an answer; one made here (refused, reset) is not.
            Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => {
                CallEnd::Failed
            }
            Err(_) => CallEnd::Answered,
        };
        let now = Instant::now();
        self.with_calls(addr, |c| c.latency.ended(now, now - started, end));
        if let Err(status) = &result {
            // A call that waited STUCK_AFTER or more and timed out while its connection
            // received nothing at all: the connection is stuck (a peer stopped behind an open
            // socket, a port another process took over), and calls on it would keep timing
            // out; the next one dials again. (A short deadline missed under load says nothing
            // of the connection.)
            let stuck = status.code() == tonic::Code::DeadlineExceeded
                && now - started >= STUCK_AFTER
                && used
                    .borrow()
                    .as_ref()
                    .is_some_and(|(before, c)| c.received() == *before);
            if stuck
                || status.code() == tonic::Code::Unavailable
                || status.code() == tonic::Code::Unknown
            {
                self.forget(addr);
            }
        }
        result
    }

    /// Queues `op` for the replica `addr` on the lane of `key`'s core there and waits for its
    /// answer until `deadline`; counts the outcome.
    async fn batched(
        &self,
        addr: &str,
        key: &[u8],
        op: Op,
        deadline: Instant,
    ) -> Result<Outcome, Status> {
        let lane = self.lane(addr, key);
        let slot = Rc::new(batch::Slot::default());
        let first = {
            let mut queues = self.queues.borrow_mut();
            let lanes = match queues.get_mut(addr) {
                Some(lanes) => lanes,
                None => queues.entry(addr.to_string()).or_default(),
            };
            if lanes.len() <= lane {
                lanes.resize_with(lane + 1, Vec::new);
            }
            lanes[lane].push(Item {
                op,
                deadline,
                slot: Rc::clone(&slot),
            });
            lanes[lane].len() == 1
        };
        if first {
            if let Some(me) = self.me.upgrade() {
                let flush = me.flush(addr.to_string(), lane);
                if let Ok(task) = glommio::spawn_local_into(flush, self.flush_queue) {
                    task.detach();
                }
            }
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        let result = match glommio::timer::timeout(wait, async { Ok(slot.answer().await) }).await {
            Ok(Ok(Outcome::Status(s))) => Err(batch::item_status(s)),
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded("no answer before the deadline")),
        };
        let outcome = match &result {
            Ok(_) => 0,
            Err(s) if s.code() == tonic::Code::DeadlineExceeded => 2,
            Err(_) => 1,
        };
        self.with_calls(addr, |c| c.outcomes[outcome] += 1);
        result
    }

    /// The lane of requests about `key` to `addr`: its core there once its layout is known.
    fn lane(&self, addr: &str, key: &[u8]) -> usize {
        let conns = self.conns.borrow();
        match conns.get(addr).map(|p| p.layout) {
            Some(Layout::Known {
                cores, num_shards, ..
            }) => 1 + owner_core(shard_of(key, num_shards), cores as usize),
            _ => 0,
        }
    }

    /// Sends what is queued on `addr`'s `lane` after one yield: requests decoded in this turn
    /// of the executor queue theirs meanwhile.
    async fn flush(self: Rc<Self>, addr: String, lane: usize) {
        future::yield_now().await;
        let mut items = self
            .queues
            .borrow_mut()
            .get_mut(&addr)
            .and_then(|lanes| lanes.get_mut(lane))
            .map(std::mem::take)
            .unwrap_or_default();
        items.retain(|item| !item.abandoned());
        if items.is_empty() {
            return;
        }
        let calls = batch::split(items)
            .into_iter()
            .map(|items| self.send(&addr, items));
        futures_util::future::join_all(calls).await;
    }

    /// One batch call to `addr`, its outcomes to its items' callers. A peer that does not
    /// know the method (an older node) gets the items one call each, now and from then on.
    async fn send(&self, addr: &str, mut items: Vec<Item>) {
        let Some(deadline) = items.iter().map(|i| i.deadline).max() else {
            return;
        };
        let singles = self.conns.borrow().get(addr).is_some_and(|p| p.singles);
        let msg = batch::message(&mut items, Instant::now());
        if !singles {
            // The first item's key picks the connection: every item of a lane is for one core.
            let key = match msg.ops.first().and_then(|op| op.op.as_ref()) {
                Some(Op::Write(w)) => &w.key[..],
                Some(Op::Read(r)) => &r.key[..],
                None => &[],
            };
            self.batches.set(self.batches.get() + 1);
            let result = self
                .unary(addr, Some(key), "/pb.PeerService/Batch", &msg, deadline)
                .await;
            match result {
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    if let Some(p) = self.conns.borrow_mut().get_mut(addr) {
                        p.singles = true;
                    }
                }
                result => return batch::answer(&items, result),
            }
        }
        let calls = msg
            .ops
            .into_iter()
            .zip(&items)
            .map(|(op, item)| async move {
                let outcome = match op.op {
                    Some(Op::Write(w)) => self
                        .unary(
                            addr,
                            Some(&w.key),
                            "/pb.PeerService/Write",
                            &w,
                            item.deadline,
                        )
                        .await
                        .map(Outcome::Ack),
                    Some(Op::Read(r)) => self
                        .unary(
                            addr,
                            Some(&r.key),
                            "/pb.PeerService/Read",
                            &r,
                            item.deadline,
                        )
                        .await
                        .map(Outcome::Entry),
                    None => Err(Status::internal("a batch item without an op")),
                };
                item.slot.fill(outcome);
            });
        futures_util::future::join_all(calls).await;
    }

    /// Runs `f` on this core's record of `addr`, made on first use. Looked up before
    /// inserting: `entry` would allocate the key on every call.
    fn with_calls<T>(&self, addr: &str, f: impl FnOnce(&mut PeerCalls) -> T) -> T {
        let mut calls = self.calls.borrow_mut();
        if let Some(c) = calls.get_mut(addr) {
            return f(c);
        }
        f(calls.entry(addr.to_string()).or_default())
    }

    /// (peer, score in seconds, speculative delay in seconds) for every peer this core called.
    pub fn latency_scores(&self, policy: SpeculativeRetry) -> Vec<(String, f64, Option<f64>)> {
        let now = Instant::now();
        let mut out: Vec<_> = self
            .calls
            .borrow_mut()
            .iter_mut()
            .map(|(peer, c)| {
                (
                    peer.clone(),
                    c.latency.score_us(now) / 1e6,
                    c.latency.speculate_after(policy).map(|d| d.as_secs_f64()),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Batch calls this core sent so far.
    pub fn batches(&self) -> u64 {
        self.batches.get()
    }

    /// Bytes this core's peer connections sent and received so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.meter.sent.get(), self.meter.received.get())
    }

    /// (peer, outcome, count) of this core's replica calls so far.
    pub fn outcome_counts(&self) -> Vec<(String, &'static str, u64)> {
        let mut out = Vec::new();
        for (peer, c) in self.calls.borrow().iter() {
            for (i, n) in c.outcomes.iter().enumerate() {
                if *n > 0 {
                    out.push((peer.clone(), OUTCOMES[i], *n));
                }
            }
        }
        out.sort();
        out
    }
}

impl PeerTransport for PeerClients {
    /// The peer's rank for reads at `now` (lower is better; see [`PeerLatency::score_us`]).
    fn score_us(&self, addr: &str, now: Instant) -> f64 {
        self.calls
            .borrow()
            .get(addr)
            .map(|c| c.latency.score_us(now))
            .unwrap_or(0.0)
    }

    /// How long a read waits for `addr` before asking another replica, under `policy`.
    fn speculate_after(&self, addr: &str, policy: SpeculativeRetry) -> Option<Duration> {
        self.with_calls(addr, |c| c.latency.speculate_after(policy))
    }

    /// Applies `entry` on the replica `addr`: (a live value existed, the replica is still
    /// syncing the key's range, see `Coordinator::syncing`).
    async fn write(
        &self,
        addr: &str,
        entry: &ReplicaEntry,
        deadline: Instant,
    ) -> Result<(bool, bool), Status> {
        let op = Op::Write(crate::wire::entry_to_pb(entry));
        match self.batched(addr, &entry.key, op, deadline).await? {
            Outcome::Ack(ack) => Ok((ack.existed, ack.syncing)),
            _ => Err(Status::internal("a replica write answered with an entry")),
        }
    }

    /// The replica `addr`'s entry for `key`, tombstones included, and whether that replica
    /// is still receiving the key's range.
    async fn read(
        &self,
        addr: &str,
        key: &[u8],
        deadline: Instant,
    ) -> Result<(Option<ReplicaEntry>, bool), Status> {
        let op = Op::Read(pb::ReplicaRead { key: key.to_vec() });
        match self.batched(addr, key, op, deadline).await? {
            Outcome::Entry(e) => Ok(crate::wire::read_reply_from_pb(key, e)),
            _ => Err(Status::internal(
                "a replica read answered with an acknowledgement",
            )),
        }
    }
}
