//! Ingress: how a core serves requests. It accepts gRPC connections on the shared ADDR
//! (SO_REUSEPORT: the kernel spreads connections over the cores) and on its shard-aware port,
//! serves HTTP/2 on the core itself, and hands each request to the core that owns its key;
//! methods a core does not serve (reflection, health, NodeService, PeerService's control
//! methods) go to the control plane over a channel. Runs on every core's executor.
//!
//! - [`grpc`]: the CacheService and PeerService methods, and routing to the owning core.

pub mod grpc;

use crate::observability::metrics::CoreMetrics;
use crate::security::{tls::HandshakeFailure, CoreSecurity, Need, Shown, MEMBER_HEADER};
use crate::{
    cluster::coordinator::{Coordinator, Routed},
    engine::{
        command::{Command, Response},
        core::CoreEngine,
    },
    error::Error,
};
use executors::{Handled, Router};
use futures_lite::future;
use http::{Request as HttpRequest, Response as HttpResponse};
use std::{
    cell::Cell,
    os::fd::{AsRawFd, FromRawFd},
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, oneshot};
use tonic::body::Body;

pub type RateLimiter = governor::DefaultDirectRateLimiter;

/// A request for the control plane, and where its response goes.
pub type Forwarded = (HttpRequest<Body>, oneshot::Sender<HttpResponse<Body>>);

/// A core's way to the control plane. `Send` and cheap to clone.
#[derive(Clone)]
pub struct Forwarder {
    tx: mpsc::UnboundedSender<Forwarded>,
}

/// The cores' forwarder and the control plane's end of it.
pub fn forwarder() -> (Forwarder, mpsc::UnboundedReceiver<Forwarded>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Forwarder { tx }, rx)
}

impl Forwarder {
    /// Serves `req` on the control plane.
    pub async fn forward(&self, req: HttpRequest<Body>) -> HttpResponse<Body> {
        let (reply_tx, reply_rx) = oneshot::channel();
        if self.tx.send((req, reply_tx)).is_err() {
            return tonic::Status::unavailable("node is shutting down").into_http();
        }
        reply_rx
            .await
            .unwrap_or_else(|_| tonic::Status::unavailable("node is shutting down").into_http())
    }
}

/// A core's state shared by its tasks.
pub struct CoreCtx {
    pub engine: Rc<CoreEngine>,
    pub router: Rc<Router<Routed, Response>>,
    pub num_shards: u32,
    pub default_ttl_secs: Option<u64>,
    pub max_recv_msg_bytes: usize,
    pub max_send_msg_bytes: usize,
    pub rpc_timeout: Duration,
    pub limiter: Option<Arc<RateLimiter>>,
    pub forwarder: Forwarder,
    pub metrics: CoreMetrics,
    pub coordinator: Rc<Coordinator>,
    /// HTTP2_* bounds of every connection.
    pub http2_limits: grpc::server::Limits,
    /// Reply bytes this core's connections hold for clients that have not read them.
    pub reply_bytes: Cell<usize>,
    /// By `grpc::server::Event`, in the order of `Event::ALL`; and connections turned away.
    pub http2_events: [Cell<u64>; grpc::server::Event::ALL.len()],
    pub connections_shed: Cell<u64>,
    /// Tokens, the cluster secret and TLS in force on this core, and what they refused.
    pub security: CoreSecurity,
}

impl CoreCtx {
    /// Serves a request for one of this core's shards, from this core's ingress or from
    /// another core: replica commands and keys this node alone holds are answered at once;
    /// client commands with remote replicas are coordinated asynchronously.
    pub fn handle_owned(self: &Rc<Self>, routed: Routed) -> Handled<Response> {
        let key = match &routed.request.command {
            Command::Apply(_) | Command::Read { .. } => {
                return Handled::Ready(self.engine.execute(routed.request))
            }
            Command::Get { key } | Command::Set { key, .. } | Command::Delete { key } => key,
        };
        let ring = self.coordinator.ring();
        if self.coordinator.is_local_only(&ring, key) {
            return Handled::Ready(self.engine.execute(routed.request));
        }
        if Instant::now() >= routed.request.deadline {
            return Handled::Ready(Err(Error::DeadlineExceeded));
        }
        Handled::Later(Box::pin(Rc::clone(&self.coordinator).coordinate(routed)))
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
        let forwarder = self.forwarder.clone();
        Box::pin(async move { forwarder.forward(req).await })
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

    fn admit(
        &self,
        need: Need,
        head: &http2::server::Head,
        shown: &mut Shown,
    ) -> Result<(), tonic::Status> {
        let gate = self.security.gate.borrow();
        // Before the scan of the fields: an open node pays nothing more per request.
        if need == Need::Nothing || gate.is_open() {
            return Ok(());
        }
        let (mut authorization, mut member) = (None, None);
        for (name, value) in head.fields() {
            match name {
                b"authorization" => authorization = Some(value),
                MEMBER_HEADER => member = Some(value),
                _ => {}
            }
        }
        gate.admit(need, authorization, member, shown)
            .map_err(|refusal| {
                self.security.count_refusal(refusal);
                refusal.status()
            })
    }

    fn count(&self, event: grpc::server::Event) {
        if let Some(i) = grpc::server::Event::ALL.iter().position(|e| *e == event) {
            self.http2_events[i].set(self.http2_events[i].get() + 1);
        }
    }
}

/// Accepts connections on `listener` (the shared ADDR), `steered` (this core's shard-aware
/// port) and `plaintext` (PLAINTEXT_ADDR) until `shutdown`, serving each on this core (with
/// TLS when the node has it, except on `plaintext`); then waits up to `drain_timeout` for
/// the open ones to finish. Returns how many were still open, and the deadline it waited until.
pub async fn serve_listeners(
    ctx: Rc<CoreCtx>,
    listener: glommio::net::TcpListener,
    steered: Option<glommio::net::TcpListener>,
    plaintext: Option<glommio::net::TcpListener>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    max_connections: usize,
    drain_timeout: Duration,
) -> (usize, Instant) {
    let connections = Rc::new(Cell::new(0usize));
    // One loop per listener, both polled by this task. Never one accept raced against the
    // other: a glommio accept dropped after the kernel completed it loses the connection (its
    // descriptor is never handed over), and the peer that opened it waits on a socket nobody
    // reads.
    let accepting = |listener, tls| {
        accept_until_shutdown(
            Rc::clone(&ctx),
            listener,
            tls,
            shutdown.clone(),
            Rc::clone(&connections),
            max_connections,
        )
    };
    let on_shard_port = async {
        if let Some(steered) = steered {
            accepting(steered, true).await;
        }
    };
    let in_plaintext = async {
        if let Some(plaintext) = plaintext {
            accepting(plaintext, false).await;
        }
    };
    future::zip(
        accepting(listener, true),
        future::zip(on_shard_port, in_plaintext),
    )
    .await;

    // Drain: connections were told to finish (GOAWAY); give them until the shutdown timeout.
    let deadline = Instant::now() + drain_timeout;
    while connections.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    (connections.get(), deadline)
}

/// Accepts on `listener` until `shutdown`, then closes it.
async fn accept_until_shutdown(
    ctx: Rc<CoreCtx>,
    listener: glommio::net::TcpListener,
    tls: bool,
    shutdown: tokio::sync::watch::Receiver<bool>,
    connections: Rc<Cell<usize>>,
    max_connections: usize,
) {
    let core = ctx.router.core();
    let mut accept_backoff = Duration::from_millis(10);
    let mut accept_failures = 0u64;
    let mut accept_logged = Instant::now() - Duration::from_secs(60);
    let mut stop = shutdown.clone();
    loop {
        // The only accept ever dropped in flight is the last one, at shutdown, when the
        // listener closes anyway.
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            let _ = stop.wait_for(|stop| *stop).await;
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
                let tls = tls.then(|| ctx.security.tls.borrow().clone()).flatten();
                glommio::spawn_local(serve_connection(
                    Rc::clone(&ctx),
                    stream,
                    tls,
                    shutdown.clone(),
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
    tls: Option<Arc<rustls::ServerConfig>>,
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
    let ended = match tls {
        None => grpc::server::serve(Rc::clone(&ctx), stream, shutdown).await,
        Some(config) => match handshake(&ctx, config, stream).await {
            Ok(stream) => grpc::server::serve(Rc::clone(&ctx), stream, shutdown).await,
            Err((failure, stream)) => {
                if let (HandshakeFailure::NotTls, Some(stream)) = (failure, stream) {
                    refuse_plaintext(stream).await;
                }
                connections.set(connections.get() - 1);
                return;
            }
        },
    };
    if ended == grpc::server::Ended::GoneAway {
        if let Some(linger) = linger {
            lingering_close(linger).await;
        }
    }
    connections.set(connections.get() - 1);
}

/// The server side of a TLS handshake, bounded by HTTP2_HANDSHAKE_TIMEOUT, and counted. A
/// client whose first byte does not open a TLS handshake record gets its socket back
/// untouched, to be told in HTTP/2 (before rustls answers it with a TLS alert, which an
/// HTTP/2 client reports as a garbled frame).
async fn handshake(
    ctx: &CoreCtx,
    config: Arc<rustls::ServerConfig>,
    stream: glommio::net::TcpStream,
) -> Result<
    futures_rustls::server::TlsStream<glommio::net::TcpStream>,
    (HandshakeFailure, Option<glommio::net::TcpStream>),
> {
    /// The content type of a TLS record carrying a handshake message (RFC 8446, 5.1).
    const HANDSHAKE_RECORD: u8 = 0x16;
    let timeout = ctx.http2_limits.protocol.handshake_timeout;
    let started = Instant::now();
    let mut first = [0u8; 1];
    let peeked = glommio::timer::timeout(timeout, async { Ok(stream.peek(&mut first).await) });
    let result = match peeked.await {
        Err(_) => Err((HandshakeFailure::Timeout, None)),
        Ok(Err(_) | Ok(0)) => Err((HandshakeFailure::Other, None)),
        Ok(Ok(_)) if first[0] != HANDSHAKE_RECORD => Err((HandshakeFailure::NotTls, Some(stream))),
        Ok(Ok(_)) => {
            let accept = futures_rustls::TlsAcceptor::from(config).accept(stream);
            let left = timeout.saturating_sub(started.elapsed());
            match glommio::timer::timeout(left, async { Ok(accept.await) }).await {
                Err(_) => Err((HandshakeFailure::Timeout, None)),
                Ok(Err(e)) => Err((HandshakeFailure::of(&e), None)),
                Ok(Ok(stream)) => Ok(stream),
            }
        }
    };
    ctx.security
        .count_handshake(result.as_ref().map(|_| ()).map_err(|(f, _)| *f));
    result
}

/// Tells a client that spoke plaintext HTTP/2 to a TLS port why it is closed, in its own
/// protocol: GOAWAY PROTOCOL_ERROR saying so, in place of the SETTINGS a server opens with.
/// Not SETTINGS first: a connection that opened well and then went away is one gRPC's C core
/// dials again at once, over and over until the call's deadline; one that opened wrong fails
/// the call at once (with the GOAWAY's text in h2-based clients' errors).
async fn refuse_plaintext(mut stream: glommio::net::TcpStream) {
    use futures_lite::AsyncWriteExt;
    const WHY: &[u8] = b"this port serves TLS only";
    let mut frames = Vec::with_capacity(9 + 8 + WHY.len());
    let len = (8 + WHY.len()) as u32;
    frames.extend_from_slice(&len.to_be_bytes()[1..]);
    frames.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]); // GOAWAY on stream 0
    frames.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x1]); // last stream 0, PROTOCOL_ERROR
    frames.extend_from_slice(WHY);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = stream.write_all(&frames).await;
    lingering_close(stream).await;
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
