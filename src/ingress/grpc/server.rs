//! gRPC over the `http2` crate's server: one connection per task on the core that accepted
//! it. The crate knows HTTP/2; this knows which requests are our unary methods (answered on
//! this core: the request message is decoded where it lies in the receive buffer when it came
//! in one DATA frame, and the reply, headers, message and trailers, is encoded straight into
//! the connection's output), and forwards everything else (reflection, health, NodeService,
//! PeerService's control methods) as an `http::Request` to tonic on the control plane,
//! streaming its response back.
//!
//! Why not hyper: under callgrind, hyper's HTTP/2 server was four fifths of the node's
//! instructions per request (a connection task and a task per stream, each request's headers
//! built into a `HeaderMap`, a body channel, frames queued and moved between buffers).
//!
//! The bounds of the protocol are the crate's ([`http2::server`]); those of gRPC are here:
//! reply bytes a client leaves unread (per connection and per core: a call's answer is then
//! RESOURCE_EXHAUSTED), forwarded requests per connection, and forwarded bodies (their
//! window granted as the control plane consumes them).

use super::{Answer, Call, Method, PREFIX};
use crate::security::{Need, Shown};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http2::{
    frame::code,
    server::{self as h2, Bound, Connection},
};
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tonic::{body::Body, Status};

pub use h2::{Ended, MAX_STREAMS};

/// Requests forwarded to the control plane at once per connection (reflection, health, Stats): a
/// few are all a real client opens, and each may buffer up to a stream window of request body.
const MAX_FORWARDED: usize = 16;

/// A connection's bounds, the same for every connection of the node (HTTP2_* variables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The protocol's: timeouts, resets and control frames per second.
    pub protocol: h2::Limits,
    /// Reply bytes one connection may hold for a client that does not read them; beyond it,
    /// a call's answer is replaced by RESOURCE_EXHAUSTED.
    pub conn_reply_bytes: usize,
    /// The same over every connection of a core.
    pub core_reply_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            protocol: h2::Limits::default(),
            conn_reply_bytes: 16 << 20,
            core_reply_bytes: 256 << 20,
        }
    }
}

/// What a connection counts for the metrics (by the Service, per core).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// GOAWAY ENHANCE_YOUR_CALM for too many RST_STREAM frames.
    ResetFlood,
    /// GOAWAY ENHANCE_YOUR_CALM for too many SETTINGS/PING frames, or an oversized SETTINGS.
    ControlFlood,
    /// A reply replaced by RESOURCE_EXHAUSTED: the client holds too many unread.
    ReplyRefused,
    /// A stream refused: MAX_CONCURRENT_STREAMS, or too many forwarded requests.
    StreamRefused,
    /// Closed for not sending its preface within the handshake timeout.
    HandshakeTimeout,
    /// GOAWAY after the idle timeout.
    IdleTimeout,
    /// A connection error we answered with GOAWAY (protocol, flow control, compression).
    ProtocolError,
}

impl Event {
    pub const ALL: [Event; 7] = [
        Event::ResetFlood,
        Event::ControlFlood,
        Event::ReplyRefused,
        Event::StreamRefused,
        Event::HandshakeTimeout,
        Event::IdleTimeout,
        Event::ProtocolError,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Event::ResetFlood => "reset_flood",
            Event::ControlFlood => "control_flood",
            Event::ReplyRefused => "reply_refused",
            Event::StreamRefused => "stream_refused",
            Event::HandshakeTimeout => "handshake_timeout",
            Event::IdleTimeout => "idle_timeout",
            Event::ProtocolError => "protocol_error",
        }
    }

    fn of(bound: Bound) -> Event {
        match bound {
            Bound::ResetFlood => Event::ResetFlood,
            Bound::ControlFlood => Event::ControlFlood,
            Bound::StreamRefused => Event::StreamRefused,
            Bound::HandshakeTimeout => Event::HandshakeTimeout,
            Bound::IdleTimeout => Event::IdleTimeout,
            Bound::ProtocolError => Event::ProtocolError,
        }
    }
}

/// What a connection asks of its core: our unary calls, and everything else.
pub trait Service {
    /// Starts a unary call on its request message (without the gRPC prefix).
    fn call(&self, method: Method, message: &[u8], deadline: Instant, start: Instant) -> Call;
    /// Serves any other request elsewhere (the control plane).
    fn forward(&self, req: http::Request<Body>) -> Forwarded;
    /// MAX_RECV_MSG_SIZE.
    fn max_recv_msg_bytes(&self) -> usize;
    /// RPC_TIMEOUT, the deadline of a request without `grpc-timeout`.
    fn rpc_timeout(&self) -> Duration;
    /// The connection's bounds.
    fn limits(&self) -> Limits {
        Limits::default()
    }
    /// Reply bytes held by every connection of this core (each connection adds its own).
    fn core_reply_bytes(&self) -> Option<&std::cell::Cell<usize>> {
        None
    }
    /// Counts `event`.
    fn count(&self, _event: Event) {}
    /// This node's ADDR: a replica call names it as its `:authority`, and one that names
    /// another node reached the wrong process (a peer's stale layout).
    fn node_addr(&self) -> Option<&str> {
        None
    }
    /// Whether a request that needs `need` may go on, by the credentials in `head`; `shown`
    /// is what its connection already showed.
    fn admit(&self, _need: Need, _head: &h2::Head, _shown: &mut Shown) -> Result<(), Status> {
        Ok(())
    }
}

pub type Forwarded = Pin<Box<dyn Future<Output = http::Response<Body>>>>;

/// Serves one connection until the peer closes it, it fails, or `shutdown` resolves and the
/// streams under way have been answered.
pub async fn serve<S: Service>(
    svc: S,
    io: impl http2::Transport,
    shutdown: Pin<Box<dyn Future<Output = ()>>>,
) -> Ended {
    h2::serve(server(svc), io, shutdown).await
}

/// A connection serving `svc`, before its first byte.
pub fn server<S: Service>(svc: S) -> h2::Server<Grpc<S>> {
    let limits = svc.limits();
    h2::Server {
        conn: Connection::new(limits.protocol, &RECURRING),
        app: Grpc {
            svc,
            limits,
            fresh: Vec::new(),
            calls: FuturesUnordered::new(),
            forwarded: Vec::new(),
            bodies: Vec::new(),
            reported_reply_bytes: 0,
            shown: Shown::default(),
        },
    }
}

/// What a stream is to us.
#[derive(Default)]
pub struct State {
    recv: Recv,
    out: Out,
}

/// How much of a forwarded request's body the control plane has consumed, so that its window
/// is granted as the receiver reads, not as bytes arrive.
#[derive(Default)]
struct SideFlow {
    consumed: std::sync::atomic::AtomicUsize,
    waker: futures_util::task::AtomicWaker,
}

#[derive(Default)]
enum Recv {
    /// One of our unary calls: its message so far (empty while it fits in one DATA frame).
    Unary {
        method: Method,
        deadline: Instant,
        start: Instant,
        held: Vec<u8>,
    },
    /// A request the control plane serves: its body's sender, how much of it was consumed, and
    /// how much of that was given back to the client.
    Side(
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        std::sync::Arc<SideFlow>,
        usize,
    ),
    /// All of it received (its call is under way once the stream is ours), or refused.
    #[default]
    Closed,
}

#[derive(Default)]
enum Out {
    /// Waiting for the call's answer.
    #[default]
    Waiting,
    /// Waiting for the control plane's response (dropping it cancels the forwarded request).
    Forwarded(Forwarded),
    /// The control plane's response body, polled for its next frame.
    Body(Body),
    /// Nothing more to send.
    Done,
}

/// gRPC on a connection: the calls and forwarded requests under way.
pub struct Grpc<S: Service> {
    svc: S,
    limits: Limits,
    /// Calls started since the last poll; polled once before they join `calls`, so that one
    /// answered on this core at once costs no more than that poll.
    fresh: Vec<(u32, Call)>,
    calls: FuturesUnordered<Tagged<Call>>,
    /// Streams waiting for the control plane's response.
    forwarded: Vec<u32>,
    /// Streams whose response body is polled for more.
    bodies: Vec<u32>,
    /// What this connection last added to its core's count of held reply bytes.
    reported_reply_bytes: usize,
    /// The credentials this connection showed that passed.
    shown: Shown,
}

/// A future with the stream it answers.
struct Tagged<F> {
    id: u32,
    fut: F,
}

impl<F: Future + Unpin> Future for Tagged<F> {
    type Output = (u32, F::Output);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.id;
        Pin::new(&mut self.fut).poll(cx).map(|out| (id, out))
    }
}

/// What an event leaves to do once the connection is free again.
enum Then {
    Nothing,
    /// Answer with this status (a trailers-only response); `refuse` when the request is not
    /// all in: the client is told to send no more.
    Status {
        id: u32,
        status: Box<Status>,
        refuse: bool,
    },
    /// Our unary method: its request is read from the stream's DATA.
    Unary {
        id: u32,
        method: Method,
        deadline: Instant,
        start: Instant,
        end: bool,
    },
    Forward {
        id: u32,
        fut: Forwarded,
        body: Option<(
            tokio::sync::mpsc::UnboundedSender<Bytes>,
            std::sync::Arc<SideFlow>,
        )>,
    },
    Reset {
        id: u32,
        error: u32,
    },
    Forget {
        id: u32,
    },
}

impl<S: Service> h2::App for Grpc<S> {
    type State = State;

    fn on_input(&mut self, conn: &mut Connection<State>, now: Instant) {
        loop {
            let then = match conn.next_event(now) {
                None => return,
                Some(h2::Event::Request { id, head, end }) => self.request(id, head, end, now),
                Some(h2::Event::Data {
                    id,
                    data,
                    end,
                    state,
                }) => self.data(id, data, end, state),
                Some(h2::Event::Reset { id, state }) => {
                    if matches!(state.out, Out::Waiting) && matches!(state.recv, Recv::Closed) {
                        // Its call is under way: the slot stays taken until the call ends
                        // (the Rapid Reset attack relies on a reset freeing it at once).
                        Then::Nothing
                    } else {
                        // Anything else is dropped now: a forwarded request's response future
                        // (which cancels it), a body being streamed, a request not all in.
                        *state = State::default();
                        Then::Forget { id }
                    }
                }
            };
            self.then(conn, then);
        }
    }

    fn poll_work(&mut self, conn: &mut Connection<State>, cx: &mut Context<'_>) -> bool {
        let mut busy = false;
        for (id, mut call) in std::mem::take(&mut self.fresh) {
            match call.as_mut().poll(cx) {
                Poll::Ready(answer) => self.answer(conn, id, answer),
                Poll::Pending => self.calls.push(Tagged { id, fut: call }),
            }
            busy = true;
        }
        while let Poll::Ready(Some((id, answer))) = self.calls.poll_next_unpin(cx) {
            self.answer(conn, id, answer);
            busy = true;
        }
        let mut i = 0;
        while i < self.forwarded.len() {
            let id = self.forwarded[i];
            let resp = match conn.state(id) {
                Some(State {
                    out: Out::Forwarded(fut),
                    ..
                }) => match fut.as_mut().poll(cx) {
                    Poll::Pending => None,
                    Poll::Ready(resp) => Some(Some(resp)),
                },
                _ => Some(None), // gone: reset, or failed with the connection
            };
            match resp {
                None => {
                    grant_consumed(conn, id, cx);
                    i += 1;
                }
                Some(resp) => {
                    self.forwarded.swap_remove(i);
                    if let Some(resp) = resp {
                        self.respond(conn, id, resp);
                    }
                    busy = true;
                }
            }
        }
        let mut i = 0;
        while i < self.bodies.len() && conn.wants_input() {
            let id = self.bodies[i];
            grant_consumed(conn, id, cx);
            match poll_body(conn, id, cx) {
                Poll::Pending => i += 1,
                Poll::Ready(()) => {
                    self.bodies.swap_remove(i);
                    busy = true;
                }
            }
        }
        busy
    }

    fn answers_pending(&self) -> bool {
        !self.calls.is_empty()
    }

    fn working(&self) -> bool {
        !self.calls.is_empty()
            || !self.fresh.is_empty()
            || !self.forwarded.is_empty()
            || !self.bodies.is_empty()
    }

    fn count(&mut self, counts: &[u32; Bound::ALL.len()]) {
        for (bound, &n) in Bound::ALL.iter().zip(counts) {
            for _ in 0..n {
                self.svc.count(Event::of(*bound));
            }
        }
    }

    /// Moves this connection's share of its core's held reply bytes to `held`.
    fn holding(&mut self, held: usize) {
        if held == self.reported_reply_bytes {
            return;
        }
        if let Some(core) = self.svc.core_reply_bytes() {
            core.set(core.get().saturating_sub(self.reported_reply_bytes) + held);
        }
        self.reported_reply_bytes = held;
    }
}

impl<S: Service> Grpc<S> {
    /// A new stream: ours, forwarded, or refused.
    fn request(&mut self, id: u32, head: &h2::Head, end: bool, now: Instant) -> Then {
        let method = match head.method() {
            b"POST" => Method::of_path(head.path()),
            _ => None,
        };
        if head.oversized() {
            let status = Status::resource_exhausted(format!(
                "request headers over {} bytes",
                h2::MAX_HEADER_LIST
            ));
            return Then::Status {
                id,
                status: Box::new(status),
                refuse: !end,
            };
        }
        let need = match method {
            Some(Method::Get) => Need::Read,
            Some(Method::Set | Method::Delete) => Need::Write,
            Some(Method::ReplicaWrite | Method::ReplicaRead | Method::ReplicaBatch) => Need::Member,
            None => Need::of_path(head.path()),
        };
        if let Err(status) = self.svc.admit(need, head, &mut self.shown) {
            return Then::Status {
                id,
                status: Box::new(status),
                refuse: !end,
            };
        }
        let Some(method) = method else {
            return self.forward(id, head, end);
        };
        if matches!(
            method,
            Method::ReplicaWrite | Method::ReplicaRead | Method::ReplicaBatch
        ) {
            if let Some(me) = self.svc.node_addr() {
                if head.authority() != Some(me.as_bytes()) {
                    let meant = String::from_utf8_lossy(head.authority().unwrap_or_default());
                    let status =
                        Status::unavailable(format!("a replica call for {meant} reached {me}"));
                    return Then::Status {
                        id,
                        status: Box::new(status),
                        refuse: !end,
                    };
                }
            }
        }
        let mut timeout = None;
        for (name, value) in head.fields() {
            match name {
                b"grpc-timeout" => timeout = super::parse_grpc_timeout(value),
                b"grpc-encoding" if value != b"identity" => {
                    let enc = String::from_utf8_lossy(value);
                    let status = Status::unimplemented(format!(
                        "message compression {enc:?} is not supported"
                    ));
                    return Then::Status {
                        id,
                        status: Box::new(status),
                        refuse: !end,
                    };
                }
                _ => {}
            }
        }
        Then::Unary {
            id,
            method,
            deadline: now + timeout.unwrap_or_else(|| self.svc.rpc_timeout()),
            start: now,
            end,
        }
    }

    fn forward(&mut self, id: u32, head: &h2::Head, end: bool) -> Then {
        if self.forwarded.len() >= MAX_FORWARDED {
            self.svc.count(Event::StreamRefused);
            return Then::Reset {
                id,
                error: code::REFUSED_STREAM,
            };
        }
        let malformed = Then::Reset {
            id,
            error: code::PROTOCOL_ERROR,
        };
        let uri = match head.authority() {
            Some(authority) => http::Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(head.path())
                .build(),
            None => http::Uri::try_from(head.path()).map_err(http::Error::from),
        };
        let (Ok(uri), Ok(verb)) = (uri, http::Method::from_bytes(head.method())) else {
            return malformed;
        };
        let mut fields = http::HeaderMap::new();
        for (name, value) in head.fields() {
            match (
                http::HeaderName::from_bytes(name),
                http::HeaderValue::from_bytes(value),
            ) {
                (Ok(n), Ok(v)) => {
                    fields.append(n, v);
                }
                _ => return malformed,
            }
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let flow = std::sync::Arc::new(SideFlow::default());
        let mut req = http::Request::new(Body::new(RequestBody {
            rx,
            flow: std::sync::Arc::clone(&flow),
        }));
        *req.method_mut() = verb;
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_2;
        *req.headers_mut() = fields;
        Then::Forward {
            id,
            fut: self.svc.forward(req),
            body: (!end).then_some((tx, flow)),
        }
    }

    /// Request body bytes of stream `id`.
    fn data(&mut self, id: u32, data: &[u8], end: bool, state: &mut State) -> Then {
        let limit = self.svc.max_recv_msg_bytes();
        match &mut state.recv {
            Recv::Unary { held, .. } if !end => {
                held.extend_from_slice(data);
                match message_of(held, limit, false) {
                    Ok(_) => Then::Nothing,
                    Err(status) => Then::Status {
                        id,
                        status: Box::new(status),
                        refuse: true,
                    },
                }
            }
            Recv::Unary { .. } => {
                let Recv::Unary {
                    method,
                    deadline,
                    start,
                    mut held,
                } = std::mem::take(&mut state.recv)
                else {
                    unreachable!("matched above")
                };
                // The usual case: the whole message in one frame, decoded where it lies.
                let whole = if held.is_empty() {
                    data
                } else {
                    held.extend_from_slice(data);
                    &held
                };
                match message_of(whole, limit, true) {
                    Ok(message) => {
                        let call = self.svc.call(method, message, deadline, start);
                        self.fresh.push((id, call));
                        Then::Nothing
                    }
                    Err(status) => Then::Status {
                        id,
                        status: Box::new(status),
                        refuse: false,
                    },
                }
            }
            Recv::Side(tx, _, _) => {
                if !data.is_empty() {
                    // The control plane may be gone (shutting down): its response says so.
                    let _ = tx.send(Bytes::copy_from_slice(data));
                }
                if end {
                    state.recv = Recv::Closed;
                }
                Then::Nothing
            }
            // Refused already: what the client sent before it knew.
            Recv::Closed => Then::Nothing,
        }
    }

    fn then(&mut self, conn: &mut Connection<State>, then: Then) {
        match then {
            Then::Nothing => {}
            Then::Status { id, status, refuse } => {
                if let Some(state) = conn.state(id) {
                    state.recv = Recv::Closed;
                }
                write_status(conn, id, *status);
                if refuse {
                    conn.stop_receiving(id);
                }
            }
            Then::Unary {
                id,
                method,
                deadline,
                start,
                end,
            } => {
                if let Some(state) = conn.state(id) {
                    state.recv = Recv::Unary {
                        method,
                        deadline,
                        start,
                        held: Vec::new(),
                    };
                }
                if end {
                    if let Some(state) = conn.state(id) {
                        let then = self.data(id, &[], true, state);
                        self.then(conn, then);
                    }
                }
            }
            Then::Forward { id, fut, body } => {
                let Some(state) = conn.state(id) else {
                    return;
                };
                state.out = Out::Forwarded(fut);
                if let Some((tx, flow)) = body {
                    state.recv = Recv::Side(tx, flow, 0);
                    conn.consume_manually(id);
                }
                self.forwarded.push(id);
            }
            Then::Reset { id, error } => conn.reset(id, error),
            Then::Forget { id } => conn.forget(id),
        }
    }

    fn answer(&mut self, conn: &mut Connection<State>, id: u32, answer: Result<Answer, Status>) {
        if !conn.is_live(id) {
            // Reset by the client while its call ran: now its slot is free.
            return conn.forget(id);
        }
        let answer = match answer {
            Ok(answer) => answer,
            Err(status) => return write_status(conn, id, status),
        };
        let len = answer.framed_len();
        let held = conn.reply_bytes();
        let core_held = self.svc.core_reply_bytes().map_or(0, |c| c.get());
        if held + len > self.limits.conn_reply_bytes
            || core_held + len > self.limits.core_reply_bytes
        {
            // A client that does not read its replies holds no more of them.
            self.svc.count(Event::ReplyRefused);
            return write_status(
                conn,
                id,
                Status::resource_exhausted(format!(
                    "reply of {len} bytes refused: {held} bytes of replies on this connection \
                     (node: {core_held} on this core) wait for the client to read them"
                )),
            );
        }
        conn.send_headers(id, 200, [CONTENT_TYPE], false);
        // The usual case: the reply goes straight into the output.
        if !conn.send_data_with(id, len, |buf| answer.encode_framed(buf)) {
            let mut data = Vec::with_capacity(len);
            answer.encode_framed(&mut data);
            conn.send_data(id, data.into());
        }
        conn.send_trailers(id, [STATUS_OK]);
    }

    fn respond(&mut self, conn: &mut Connection<State>, id: u32, resp: http::Response<Body>) {
        let (parts, body) = resp.into_parts();
        let end = http_body::Body::is_end_stream(&body);
        let fields = parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
        conn.send_headers(id, parts.status.as_u16(), fields, end);
        if let Some(state) = conn.state(id) {
            if end {
                state.out = Out::Done;
            } else {
                state.out = Out::Body(body);
                self.bodies.push(id);
            }
        }
    }
}

/// Gives a forwarded request's window back as the control plane consumes its body.
fn grant_consumed(conn: &mut Connection<State>, id: u32, cx: &mut Context<'_>) {
    let Some(State {
        recv: Recv::Side(_, flow, granted),
        ..
    }) = conn.state(id)
    else {
        return;
    };
    flow.waker.register(cx.waker());
    let consumed = flow.consumed.load(std::sync::atomic::Ordering::Relaxed);
    let owed = consumed - *granted;
    *granted = consumed;
    if owed > 0 {
        conn.release(id, owed);
    }
}

/// Ready once the body is done with (ended, failed, or its stream gone); Pending while it
/// waits for the body or for window.
fn poll_body(conn: &mut Connection<State>, id: u32, cx: &mut Context<'_>) -> Poll<()> {
    loop {
        if conn.is_queued(id) {
            return Poll::Pending; // a frame of it waits for window
        }
        let Some(State {
            out: Out::Body(body),
            ..
        }) = conn.state(id)
        else {
            return Poll::Ready(());
        };
        let frame = match http_body::Body::poll_frame(Pin::new(body), cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(None) => {
                set_out(conn, id, Out::Done);
                conn.end_stream(id);
                return Poll::Ready(());
            }
            Poll::Ready(Some(Err(_))) => {
                conn.reset(id, code::INTERNAL_ERROR);
                return Poll::Ready(());
            }
        };
        match frame.into_data() {
            Ok(data) => conn.send_data(id, data),
            Err(frame) => {
                set_out(conn, id, Out::Done);
                let trailers = frame.into_trailers().unwrap_or_default();
                let fields = trailers
                    .iter()
                    .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
                conn.send_trailers(id, fields);
                return Poll::Ready(());
            }
        }
    }
}

fn set_out(conn: &mut Connection<State>, id: u32, out: Out) {
    if let Some(state) = conn.state(id) {
        state.out = out;
    }
}

/// A trailers-only response: the status in the one HEADERS frame, which ends the stream.
fn write_status(conn: &mut Connection<State>, id: u32, status: Status) {
    let mut fields = http::HeaderMap::with_capacity(3);
    fields.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    if status.add_header(&mut fields).is_err() {
        fields.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    set_out(conn, id, Out::Done);
    let fields = fields
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    conn.send_headers(id, 200, fields, true);
}

/// The message of a unary request from what arrived of its body: the message once whole, an
/// empty slice while more may come (`end` false). An oversized or compressed one is refused
/// as soon as its prefix is in.
fn message_of(held: &[u8], limit: usize, end: bool) -> Result<&[u8], Status> {
    if held.len() >= PREFIX {
        if held[0] != 0 {
            return Err(Status::unimplemented(
                "compressed messages are not supported",
            ));
        }
        let len = u32::from_be_bytes([held[1], held[2], held[3], held[4]]) as usize;
        if len > limit {
            return Err(Status::resource_exhausted(format!(
                "request message of {len} bytes is over the limit of {limit} bytes"
            )));
        }
        if held.len() >= PREFIX + len {
            return Ok(&held[PREFIX..PREFIX + len]);
        }
    }
    match (end, held.is_empty()) {
        (false, _) => Ok(&[]),
        (true, true) => Err(Status::internal("missing request message")),
        (true, false) => Err(Status::internal("request body ended inside a message")),
    }
}

/// The body of a request forwarded to the control plane, fed by the connection; what it hands
/// on counts as consumed, and wakes the connection to grant the window back.
struct RequestBody {
    rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    flow: std::sync::Arc<SideFlow>,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(data)) = &polled {
            self.flow
                .consumed
                .fetch_add(data.len(), std::sync::atomic::Ordering::Relaxed);
            self.flow.waker.wake();
        }
        polled.map(|data| data.map(|d| Ok(http_body::Frame::data(d))))
    }
}

/// The recurring fields of our replies: every reply carries `content-type:
/// application/grpc`, and almost every one ends with `grpc-status: 0`; each is one byte after
/// its first use on a connection (see `http2::hpack::Encoder`).
static RECURRING: [(&[u8], &[u8]); 2] = [CONTENT_TYPE, STATUS_OK];
const CONTENT_TYPE: (&[u8], &[u8]) = (b"content-type", b"application/grpc");
const STATUS_OK: (&[u8], &[u8]) = (b"grpc-status", b"0");

#[cfg(test)]
mod tests;
