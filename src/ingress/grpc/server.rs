//! gRPC over the `http2` crate's server: one connection per task on the core that accepted
//! it. The crate knows HTTP/2; this knows which requests are our unary methods (answered on
//! this core: the request message is decoded where it lies in the receive buffer when it came
//! in one DATA frame, and the reply, headers, message and trailers, is encoded straight into
//! the connection's output), and forwards everything else (reflection, health, Stats) as an
//! `http::Request` to tonic on the side thread, streaming its response back.
//!
//! Why not hyper: under callgrind, hyper's HTTP/2 server was four fifths of the node's
//! instructions per request (a connection task and a task per stream, each request's headers
//! built into a `HeaderMap`, a body channel, frames queued and moved between buffers).
//!
//! The bounds of the protocol are the crate's ([`http2::server`]); those of gRPC are here:
//! reply bytes a client leaves unread (per connection and per core: a call's answer is then
//! RESOURCE_EXHAUSTED), forwarded requests per connection, and forwarded bodies (their
//! window granted as the side thread consumes them).

use super::{Answer, Call, Method, PREFIX};
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

/// Requests forwarded to the side thread at once per connection (reflection, health, Stats): a
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
    /// Serves any other request elsewhere (the side thread).
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
}

pub type Forwarded = Pin<Box<dyn Future<Output = http::Response<Body>>>>;

/// Serves one connection until the peer closes it, it fails, or `shutdown` resolves and the
/// streams under way have been answered.
pub async fn serve<S: Service>(
    svc: S,
    io: glommio::net::TcpStream,
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
        },
    }
}

/// What a stream is to us.
#[derive(Default)]
pub struct State {
    recv: Recv,
    out: Out,
}

/// How much of a forwarded request's body the side thread has consumed, so that its window
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
    /// A request the side thread serves: its body's sender, how much of it was consumed, and
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
    /// Waiting for the side thread's response (dropping it cancels the forwarded request).
    Forwarded(Forwarded),
    /// The side thread's response body, polled for its next frame.
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
    /// Streams waiting for the side thread's response.
    forwarded: Vec<u32>,
    /// Streams whose response body is polled for more.
    bodies: Vec<u32>,
    /// What this connection last added to its core's count of held reply bytes.
    reported_reply_bytes: usize,
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
        let Some(method) = method else {
            return self.forward(id, head, end);
        };
        if matches!(method, Method::ReplicaWrite | Method::ReplicaRead) {
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
                    // The side thread may be gone (shutting down): its response says so.
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

/// Gives a forwarded request's window back as the side thread consumes its body.
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

/// The body of a request forwarded to the side thread, fed by the connection; what it hands
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
mod tests {
    use super::*;
    use crate::pb;
    use http2::{
        frame,
        server::{MAX_FRAME, WRITE_HIGH_WATER},
    };
    use std::{cell::RefCell, rc::Rc, task::Waker};

    /// Our calls answer a Get whose value is as long as the request message says (or wait,
    /// when told to); forwarded requests are recorded and answered with a two-chunk body and
    /// trailers.
    #[derive(Clone, Default)]
    struct Fake {
        value_len: Rc<RefCell<usize>>,
        hold: Rc<RefCell<Option<Vec<tokio::sync::oneshot::Sender<()>>>>>,
        forwarded: Rc<RefCell<Vec<http::Request<Body>>>>,
    }

    impl Service for Fake {
        fn call(&self, _: Method, message: &[u8], _: Instant, _: Instant) -> Call {
            let answer = Answer::Get(pb::GetResponse {
                payload: Some(pb::get_response::Payload::ValueBytes(vec![
                    7;
                    *self
                        .value_len
                        .borrow()
                ])),
                version: None,
            });
            let key_len = message.len();
            match self.hold.borrow_mut().as_mut() {
                Some(senders) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    senders.push(tx);
                    Box::pin(async move {
                        let _ = rx.await;
                        Ok(answer)
                    })
                }
                None if key_len == 0 => {
                    Box::pin(std::future::ready(Err(Status::invalid_argument("empty"))))
                }
                None => Box::pin(std::future::ready(Ok(answer))),
            }
        }

        fn forward(&self, req: http::Request<Body>) -> Forwarded {
            self.forwarded.borrow_mut().push(req);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let chunks = vec![
                Ok(http_body::Frame::data(Bytes::from_static(b"first"))),
                Ok(http_body::Frame::data(Bytes::from_static(b"second"))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(
                chunks
                    .into_iter()
                    .map(|c: Result<_, std::convert::Infallible>| c),
            ));
            let mut resp = http::Response::new(Body::new(body));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            Box::pin(std::future::ready(resp))
        }

        fn max_recv_msg_bytes(&self) -> usize {
            1000
        }

        fn rpc_timeout(&self) -> Duration {
            Duration::from_secs(5)
        }
    }

    /// A frame we sent, its header block decoded when it has one.
    #[derive(Debug)]
    struct Sent {
        kind: u8,
        flags: u8,
        id: u32,
        payload: Vec<u8>,
        fields: Vec<(String, String)>,
    }

    struct Peer {
        proto: h2::Server<Grpc<Fake>>,
        fake: Fake,
        encoder: loona_hpack::Encoder<'static>,
        decoder: loona_hpack::Decoder<'static>,
    }

    impl Peer {
        /// A connection past the preface and the SETTINGS exchange.
        fn new() -> Self {
            Self::with_settings(&[])
        }

        fn with_settings(settings: &[(u16, u32)]) -> Self {
            let fake = Fake::default();
            *fake.value_len.borrow_mut() = 10;
            let mut peer = Peer {
                proto: server(fake.clone()),
                fake,
                encoder: loona_hpack::Encoder::new(),
                decoder: loona_hpack::Decoder::new(),
            };
            let mut bytes = frame::PREFACE.to_vec();
            let mut payload = vec![];
            for (k, v) in settings {
                payload.extend_from_slice(&k.to_be_bytes());
                payload.extend_from_slice(&v.to_be_bytes());
            }
            frame::put_header(&mut bytes, payload.len(), frame::SETTINGS, 0, 0);
            bytes.extend_from_slice(&payload);
            peer.feed(&bytes);
            let sent = peer.sent();
            let kinds: Vec<_> = sent.iter().map(|f| (f.kind, f.flags)).collect();
            assert_eq!(
                kinds,
                [
                    (frame::SETTINGS, 0),
                    (frame::WINDOW_UPDATE, 0),
                    (frame::SETTINGS, frame::ACK)
                ]
            );
            peer
        }

        fn feed(&mut self, mut bytes: &[u8]) {
            while !bytes.is_empty() {
                let room = self.proto.conn.room();
                let n = room.len().min(bytes.len());
                room[..n].copy_from_slice(&bytes[..n]);
                self.proto.received(n, Instant::now());
                bytes = &bytes[n..];
            }
            self.proto
                .poll_work(&mut Context::from_waker(Waker::noop()));
        }

        fn sent(&mut self) -> Vec<Sent> {
            self.proto
                .poll_work(&mut Context::from_waker(Waker::noop()));
            let out = self.proto.conn.output().to_vec();
            self.proto.conn.sent(out.len());
            let mut frames = vec![];
            let mut rest = &out[..];
            while !rest.is_empty() {
                let len = (rest[0] as usize) << 16 | (rest[1] as usize) << 8 | rest[2] as usize;
                let id = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
                let payload = rest[frame::HEADER_LEN..frame::HEADER_LEN + len].to_vec();
                let fields = if rest[3] == frame::HEADERS {
                    let fields = self.decoder.decode(&payload).expect("our HPACK decodes");
                    fields
                        .into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect()
                } else {
                    vec![]
                };
                frames.push(Sent {
                    kind: rest[3],
                    flags: rest[4],
                    id,
                    payload,
                    fields,
                });
                rest = &rest[frame::HEADER_LEN + len..];
            }
            frames
        }

        fn headers(&mut self, id: u32, path: &str, flags: u8) -> Vec<u8> {
            let block = self.encoder.encode([
                (&b":method"[..], &b"POST"[..]),
                (b":scheme", b"http"),
                (b":path", path.as_bytes()),
                (b":authority", b"localhost"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"grpc-timeout", b"4999998u"),
            ]);
            let mut bytes = vec![];
            frame::put_header(&mut bytes, block.len(), frame::HEADERS, flags, id);
            bytes.extend_from_slice(&block);
            bytes
        }

        /// A whole unary request: HEADERS, then DATA with the framed message and END_STREAM.
        fn request(&mut self, id: u32, message: &[u8]) -> Vec<u8> {
            let mut bytes = self.headers(id, "/pb.CacheService/Get", frame::END_HEADERS);
            let data = framed(message);
            frame::put_header(&mut bytes, data.len(), frame::DATA, frame::END_STREAM, id);
            bytes.extend_from_slice(&data);
            bytes
        }
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut data = vec![0];
        data.extend_from_slice(&(message.len() as u32).to_be_bytes());
        data.extend_from_slice(message);
        data
    }

    fn field<'a>(f: &'a Sent, name: &str) -> Option<&'a str> {
        f.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn get_reply(value_len: usize) -> Vec<u8> {
        let mut buf = vec![];
        Answer::Get(pb::GetResponse {
            payload: Some(pb::get_response::Payload::ValueBytes(vec![7; value_len])),
            version: None,
        })
        .encode_framed(&mut buf);
        buf
    }

    /// The frames of a successful unary answer on `id`.
    fn assert_answered(frames: &[Sent], id: u32, value_len: usize) {
        let mine: Vec<_> = frames.iter().filter(|f| f.id == id).collect();
        assert_eq!(mine.len(), 3, "{frames:?}");
        assert_eq!(mine[0].kind, frame::HEADERS);
        assert_eq!(field(mine[0], ":status"), Some("200"));
        assert_eq!(field(mine[0], "content-type"), Some("application/grpc"));
        assert_eq!((mine[1].kind, mine[1].flags), (frame::DATA, 0));
        assert_eq!(mine[1].payload, get_reply(value_len));
        assert_eq!(mine[2].kind, frame::HEADERS);
        assert_eq!(mine[2].flags, frame::END_HEADERS | frame::END_STREAM);
        assert_eq!(mine[2].fields, [("grpc-status".into(), "0".into())]);
    }

    #[test]
    fn unary_calls_are_answered_and_the_second_answer_uses_the_peers_table() {
        let mut peer = Peer::new();
        let req = peer.request(1, b"key");
        peer.feed(&req);
        let first = peer.sent();
        assert_answered(&first, 1, 10);
        let req = peer.request(3, b"key");
        peer.feed(&req);
        let second = peer.sent();
        assert_answered(&second, 3, 10);
        // Indexed from the peer's dynamic table: one byte per field after the first time.
        assert_eq!(second[0].payload, [0x88, 0xbf], ":status 200, content-type");
        assert_eq!(second[2].payload, [0xbe], "grpc-status: 0");
        assert!(peer.proto.conn.stream_count() == 0, "both streams closed");
    }

    #[test]
    fn a_request_split_over_continuation_padding_and_many_data_frames_is_served() {
        let mut peer = Peer::new();
        let whole = peer.headers(1, "/pb.CacheService/Get", 0);
        let block = &whole[frame::HEADER_LEN..];
        let (a, b) = block.split_at(block.len() / 2);
        let mut bytes = vec![];
        // HEADERS, padded, without END_HEADERS; then CONTINUATION.
        frame::put_header(
            &mut bytes,
            1 + a.len() + 3,
            frame::HEADERS,
            frame::PADDED,
            1,
        );
        bytes.push(3);
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(&[0, 0, 0]);
        frame::put_header(
            &mut bytes,
            b.len(),
            frame::CONTINUATION,
            frame::END_HEADERS,
            1,
        );
        bytes.extend_from_slice(b);
        // The message one byte per DATA frame, every other one padded.
        let data = framed(b"some-key");
        for (i, byte) in data.iter().enumerate() {
            if i % 2 == 0 {
                frame::put_header(&mut bytes, 3, frame::DATA, frame::PADDED, 1);
                bytes.extend_from_slice(&[1, *byte, 0]);
            } else {
                frame::put_header(&mut bytes, 1, frame::DATA, 0, 1);
                bytes.push(*byte);
            }
        }
        frame::put_header(&mut bytes, 0, frame::DATA, frame::END_STREAM, 1);
        // Arriving one byte at a time, too.
        for b in &bytes {
            peer.feed(std::slice::from_ref(b));
        }
        assert_answered(&peer.sent(), 1, 10);
    }

    #[test]
    fn the_answer_waits_for_end_stream_and_bad_messages_get_their_status() {
        let mut peer = Peer::new();
        let mut bytes = peer.headers(1, "/pb.CacheService/Get", frame::END_HEADERS);
        let data = framed(b"key");
        frame::put_header(&mut bytes, data.len(), frame::DATA, 0, 1);
        bytes.extend_from_slice(&data);
        peer.feed(&bytes);
        assert!(peer.sent().is_empty(), "answered before END_STREAM");

        let status_of = |peer: &mut Peer, id: u32, data: &[u8]| {
            let mut bytes = peer.headers(id, "/pb.CacheService/Get", frame::END_HEADERS);
            frame::put_header(&mut bytes, data.len(), frame::DATA, frame::END_STREAM, id);
            bytes.extend_from_slice(data);
            peer.feed(&bytes);
            let sent = peer.sent();
            assert_eq!(sent[0].flags, frame::END_HEADERS | frame::END_STREAM);
            field(&sent[0], "grpc-status").unwrap().to_string()
        };
        assert_eq!(status_of(&mut peer, 3, &[]), "13", "no message: INTERNAL");
        assert_eq!(
            status_of(&mut peer, 5, &[0, 0, 0, 0, 9, 1]),
            "13",
            "cut short"
        );
        assert_eq!(
            status_of(&mut peer, 7, &[1, 0, 0, 0, 0]),
            "12",
            "compressed"
        );
        assert_eq!(
            status_of(&mut peer, 9, &framed(b"")),
            "3",
            "the call's own error"
        );
    }

    #[test]
    fn an_oversized_message_is_refused_from_its_prefix_alone() {
        let mut peer = Peer::new();
        let mut bytes = peer.headers(1, "/pb.CacheService/Get", frame::END_HEADERS);
        frame::put_header(&mut bytes, 5, frame::DATA, 0, 1);
        bytes.extend_from_slice(&[0, 0, 0, 0x03, 0xe9]); // 1001 bytes, the limit is 1000
        peer.feed(&bytes);
        let sent = peer.sent();
        assert_eq!(
            field(&sent[0], "grpc-status"),
            Some("8"),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(sent[0].flags, frame::END_HEADERS | frame::END_STREAM);
        assert_eq!(
            (sent[1].kind, &sent[1].payload[..]),
            (frame::RST_STREAM, &[0, 0, 0, 0][..])
        );
        // What the client sent before it saw the reset is dropped quietly.
        let mut more = vec![];
        frame::put_header(&mut more, 3, frame::DATA, frame::END_STREAM, 1);
        more.extend_from_slice(b"abc");
        peer.feed(&more);
        assert!(peer.sent().is_empty());
    }

    #[test]
    fn replies_respect_the_peers_windows_and_frame_size() {
        // A stream window of 100 bytes; a 100,000-byte reply; frames of at most 16,384.
        let mut peer = Peer::with_settings(&[(0x4, 100)]);
        *peer.fake.value_len.borrow_mut() = 100_000;
        let req = peer.request(1, b"key");
        peer.feed(&req);
        let sent = peer.sent();
        let data: usize = sent
            .iter()
            .filter(|f| f.kind == frame::DATA)
            .map(|f| f.payload.len())
            .sum();
        assert_eq!(data, 100, "{sent:?}");
        let mut update = vec![];
        frame::put_header(&mut update, 4, frame::WINDOW_UPDATE, 0, 1);
        update.extend_from_slice(&1_000_000u32.to_be_bytes());
        peer.feed(&update);
        // The connection window (65,535) stops it next.
        let sent = peer.sent();
        let sizes: Vec<_> = sent
            .iter()
            .filter(|f| f.kind == frame::DATA)
            .map(|f| f.payload.len())
            .collect();
        assert!(sizes.iter().all(|&n| n <= MAX_FRAME), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 65_535 - 100);
        assert!(
            sent.iter().all(|f| f.kind == frame::DATA),
            "no trailers yet"
        );
        let mut update = vec![];
        frame::put_header(&mut update, 4, frame::WINDOW_UPDATE, 0, 0);
        update.extend_from_slice(&1_000_000u32.to_be_bytes());
        peer.feed(&update);
        let sent = peer.sent();
        let last = sent.last().unwrap();
        assert_eq!(field(last, "grpc-status"), Some("0"));
        let total = 65_535
            + sent
                .iter()
                .filter(|f| f.kind == frame::DATA)
                .map(|f| f.payload.len())
                .sum::<usize>();
        assert_eq!(total, get_reply(100_000).len());
    }

    #[test]
    fn ping_settings_and_unknown_frames() {
        let mut peer = Peer::new();
        let mut bytes = vec![];
        frame::put_header(&mut bytes, 8, frame::PING, 0, 0);
        bytes.extend_from_slice(b"12345678");
        frame::put_header(&mut bytes, 3, 0xee, 0, 0); // unknown type: ignored
        bytes.extend_from_slice(b"xyz");
        frame::put_header(&mut bytes, 0, frame::SETTINGS, frame::ACK, 0);
        peer.feed(&bytes);
        let sent = peer.sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!((sent[0].kind, sent[0].flags), (frame::PING, frame::ACK));
        assert_eq!(sent[0].payload, b"12345678");
    }

    #[test]
    fn protocol_errors_end_the_connection_with_goaway() {
        for bad in [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            [
                frame::PREFACE,
                &[0, 0, 1, frame::SETTINGS, 0, 0, 0, 0, 0, 9],
            ]
            .concat(), // length not x6
            [frame::PREFACE, &[0, 0x40, 1, frame::DATA, 0, 0, 0, 0, 1]].concat(), // over MAX_FRAME
        ] {
            let mut proto = server(Fake::default());
            let room = proto.conn.room();
            room[..bad.len()].copy_from_slice(&bad);
            proto.received(bad.len(), Instant::now());
            assert_eq!(proto.finished(), Some(Ended::Closed));
            assert!(!proto.conn.wants_input());
            let out = proto.conn.output();
            let goaway = out.len() - frame::HEADER_LEN - 8;
            assert_eq!(out[goaway + 3], frame::GOAWAY, "{out:?}");
        }
    }

    #[test]
    fn a_graceful_goaway_lets_open_streams_finish_and_refuses_new_ones() {
        let mut peer = Peer::new();
        *peer.fake.hold.borrow_mut() = Some(vec![]);
        let req = peer.request(1, b"key");
        peer.feed(&req);
        assert!(peer.sent().is_empty());
        peer.proto.conn.go_away(code::NO_ERROR);
        let sent = peer.sent();
        assert_eq!(sent[0].kind, frame::GOAWAY);
        assert_eq!(sent[0].payload[..4], 1u32.to_be_bytes(), "last stream id 1");
        let req = peer.request(3, b"key");
        peer.feed(&req);
        assert!(peer.sent().is_empty(), "stream 3 is not served");
        assert_eq!(peer.proto.finished(), None, "stream 1 is under way");
        for tx in peer.fake.hold.borrow_mut().take().unwrap() {
            tx.send(()).unwrap();
        }
        assert_answered(&peer.sent(), 1, 10);
        assert_eq!(peer.proto.finished(), Some(Ended::GoneAway));
    }

    #[test]
    fn a_reset_stream_is_never_answered_and_streams_are_limited() {
        let mut peer = Peer::new();
        *peer.fake.hold.borrow_mut() = Some(vec![]);
        for i in 0..MAX_STREAMS as u32 {
            let req = peer.request(2 * i + 1, b"key");
            peer.feed(&req);
        }
        assert!(peer.sent().is_empty());
        let over = 2 * MAX_STREAMS as u32 + 1;
        let req = peer.request(over, b"key");
        peer.feed(&req);
        let sent = peer.sent();
        assert_eq!((sent[0].kind, sent[0].id), (frame::RST_STREAM, over));
        assert_eq!(sent[0].payload, code::REFUSED_STREAM.to_be_bytes());
        let mut rst = vec![];
        frame::put_header(&mut rst, 4, frame::RST_STREAM, 0, 1);
        let cancel: u32 = 0x8; // CANCEL, which the server itself never sends
        rst.extend_from_slice(&cancel.to_be_bytes());
        peer.feed(&rst);
        // The reset call still runs: its slot is not free (the Rapid Reset attack opens a new
        // stream for every one it resets).
        let again = 2 * MAX_STREAMS as u32 + 3;
        let req = peer.request(again, b"key");
        peer.feed(&req);
        let sent = peer.sent();
        assert_eq!((sent[0].kind, sent[0].id), (frame::RST_STREAM, again));
        assert_eq!(sent[0].payload, code::REFUSED_STREAM.to_be_bytes());
        for tx in peer.fake.hold.borrow_mut().take().unwrap() {
            tx.send(()).unwrap();
        }
        let sent = peer.sent();
        assert!(sent.iter().all(|f| f.id != 1), "stream 1 was reset");
        assert_eq!(
            sent.iter().filter(|f| f.kind == frame::DATA).count(),
            MAX_STREAMS - 1
        );
        assert!(peer.proto.conn.stream_count() == 0);
    }

    #[test]
    fn a_flood_of_resets_or_pings_is_told_to_calm_down() {
        let limit = Limits::default().protocol.resets_per_sec;
        let mut peer = Peer::new();
        let mut bytes = vec![];
        for i in 0..=limit {
            let id = 2 * i + 1;
            bytes.extend(peer.request(id, b"key"));
            frame::put_header(&mut bytes, 4, frame::RST_STREAM, 0, id);
            bytes.extend_from_slice(&0x8u32.to_be_bytes());
        }
        peer.feed(&bytes);
        let sent = peer.sent();
        let last = sent.last().expect("a GOAWAY");
        assert_eq!(last.kind, frame::GOAWAY);
        assert_eq!(last.payload[4..], code::ENHANCE_YOUR_CALM.to_be_bytes());
        assert!(peer.proto.finished().is_some(), "the connection closes");

        let mut peer = Peer::new();
        let mut bytes = vec![];
        for _ in 0..=Limits::default().protocol.control_frames_per_sec {
            frame::put_header(&mut bytes, 8, frame::PING, 0, 0);
            bytes.extend_from_slice(&[0; 8]);
        }
        peer.feed(&bytes);
        let sent = peer.sent();
        let last = sent.last().expect("a GOAWAY");
        assert_eq!(last.kind, frame::GOAWAY);
        assert_eq!(last.payload[4..], code::ENHANCE_YOUR_CALM.to_be_bytes());
    }

    #[test]
    fn other_requests_are_forwarded_and_their_bodies_streamed_back() {
        let mut peer = Peer::new();
        let mut bytes = peer.headers(1, "/grpc.health.v1.Health/Check", frame::END_HEADERS);
        frame::put_header(&mut bytes, 4, frame::DATA, 0, 1);
        bytes.extend_from_slice(b"abcd");
        frame::put_header(&mut bytes, 2, frame::DATA, frame::END_STREAM, 1);
        bytes.extend_from_slice(b"ef");
        peer.feed(&bytes);
        let sent = peer.sent();
        let kinds: Vec<_> = sent.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [frame::HEADERS, frame::DATA, frame::DATA, frame::HEADERS]
        );
        assert_eq!(sent[1].payload, b"first");
        assert_eq!(sent[2].payload, b"second");
        assert_eq!(field(&sent[3], "grpc-status"), Some("0"));
        assert_eq!(sent[3].flags, frame::END_HEADERS | frame::END_STREAM);

        let req = peer.fake.forwarded.borrow_mut().pop().unwrap();
        assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
        assert_eq!(req.uri().authority().unwrap().as_str(), "localhost");
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(req.headers()["te"], "trailers");
        assert_eq!(req.headers()["grpc-timeout"], "4999998u");
        let mut body = req.into_body();
        let mut got = vec![];
        let mut cx = Context::from_waker(Waker::noop());
        while let Poll::Ready(Some(Ok(frame))) =
            http_body::Body::poll_frame(Pin::new(&mut body), &mut cx)
        {
            got.extend_from_slice(&frame.into_data().unwrap());
        }
        assert_eq!(got, b"abcdef");
        assert!(peer.proto.conn.stream_count() == 0);
    }

    mod fuzz {
        //! Arbitrary frame sequences against the connection (a coverage-guided fuzzer needs a
        //! nightly toolchain; these run on stable). A fixed budget in CI; for long runs:
        //! `PROPTEST_CASES=100000 cargo test --release --lib grpc::server::tests::fuzz`.
        //! Invariants: no panic; streams, forwarded requests and held reply bytes within their
        //! bounds at every step; once the calls are released, every stream has ended but
        //! those still waiting for the client (request data, or window).
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Step {
            Headers {
                id: u32,
                path: u8,
                end_stream: bool,
                end_headers: bool,
                priority: bool,
                padded: bool,
            },
            Data {
                id: u32,
                len: usize,
                framed: bool,
                end_stream: bool,
                padded: bool,
            },
            Continuation {
                id: u32,
                end_headers: bool,
                bytes: Vec<u8>,
            },
            Reset(u32, u32),
            Settings(Vec<(u16, u32)>, bool),
            WindowUpdate(u32, u32),
            Ping(bool),
            Priority(u32, u8, u32),
            GoAway,
            Unknown(u8, Vec<u8>),
            Garbage(Vec<u8>),
            /// Answer the calls held so far.
            Release,
            /// The client stops or starts reading what the node sends.
            Reading(bool),
        }

        fn id() -> impl Strategy<Value = u32> {
            prop_oneof![8 => 1u32..40, 1 => 0u32..8]
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                6 => (id(), 0u8..6, any::<bool>(), prop::bool::weighted(0.97), any::<bool>(), any::<bool>())
                    .prop_map(|(id, path, end_stream, end_headers, priority, padded)| Step::Headers {
                        id, path, end_stream, end_headers, priority, padded
                    }),
                6 => (id(), prop_oneof![0usize..32, 0usize..40_000], prop::bool::weighted(0.7), any::<bool>(), any::<bool>())
                    .prop_map(|(id, len, framed, end_stream, padded)| Step::Data {
                        id, len, framed, end_stream, padded
                    }),
                1 => (id(), any::<bool>(), proptest::collection::vec(any::<u8>(), 0..16))
                    .prop_map(|(id, end_headers, bytes)| Step::Continuation { id, end_headers, bytes }),
                3 => (id(), 0u32..14).prop_map(|(id, code)| Step::Reset(id, code)),
                4 => (proptest::collection::vec(prop_oneof![
                        (Just(1u16), 0u32..8192),
                        (Just(3u16), 0u32..300),
                        (Just(4u16), 0u32..70_000),
                        (Just(5u16), 16_384u32..40_000),
                        (Just(6u16), any::<u32>()),
                    ], 0..4), prop::bool::weighted(0.2))
                    .prop_map(|(e, ack)| Step::Settings(e, ack)),
                1 => (proptest::collection::vec((0u16..8, any::<u32>()), 0..6), Just(false))
                    .prop_map(|(e, ack)| Step::Settings(e, ack)),
                2 => (id(), prop_oneof![0u32..100_000, any::<u32>()]).prop_map(|(id, n)| Step::WindowUpdate(id, n)),
                1 => any::<bool>().prop_map(Step::Ping),
                1 => (id(), 3u8..7, id()).prop_map(|(id, len, dep)| Step::Priority(id, len, dep)),
                1 => Just(Step::GoAway),
                1 => (10u8..=255, proptest::collection::vec(any::<u8>(), 0..32)).prop_map(|(k, b)| Step::Unknown(k, b)),
                1 => proptest::collection::vec(any::<u8>(), 1..24).prop_map(Step::Garbage),
                24 => (0u32..40, 0u8..3, prop::bool::weighted(0.8)).prop_map(|(id, path, end_stream)| Step::Headers {
                    id, path, end_stream, end_headers: true, priority: false, padded: false
                }),
                24 => (1u32..40, 0usize..32).prop_map(|(id, len)| Step::Data {
                    id, len, framed: true, end_stream: true, padded: false
                }),
                2 => Just(Step::Release),
                1 => any::<bool>().prop_map(Step::Reading),
            ]
        }

        const PATHS: [&str; 6] = [
            "/pb.CacheService/Get",
            "/pb.CacheService/Set",
            "/pb.CacheService/Delete",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/nowhere",
        ];

        fn frame_bytes(encoder: &mut loona_hpack::Encoder<'static>, step: &Step) -> Vec<u8> {
            let mut out = vec![];
            let pad = |flags: &mut u8, payload: &mut Vec<u8>, padded: bool| {
                if padded {
                    *flags |= frame::PADDED;
                    payload.insert(0, 3);
                    payload.extend_from_slice(&[0, 0, 0]);
                }
            };
            match step {
                Step::Headers {
                    id,
                    path,
                    end_stream,
                    end_headers,
                    priority,
                    padded,
                } => {
                    let mut payload = encoder.encode([
                        (&b":method"[..], &b"POST"[..]),
                        (b":scheme", b"http"),
                        (b":path", PATHS[*path as usize].as_bytes()),
                        (b"content-type", b"application/grpc"),
                        (b"te", b"trailers"),
                    ]);
                    let mut flags = 0;
                    if *priority {
                        flags |= frame::PRIORITY_FLAG;
                        let mut p = 1u32.to_be_bytes().to_vec();
                        p.push(15);
                        payload.splice(0..0, p);
                    }
                    pad(&mut flags, &mut payload, *padded);
                    if *end_stream {
                        flags |= frame::END_STREAM;
                    }
                    if *end_headers {
                        flags |= frame::END_HEADERS;
                    }
                    frame::put_header(&mut out, payload.len(), frame::HEADERS, flags, *id);
                    out.extend_from_slice(&payload);
                }
                Step::Data {
                    id,
                    len,
                    framed: f,
                    end_stream,
                    padded,
                } => {
                    let mut payload = if *f {
                        let mut m = vec![0x0a, (*len).min(120) as u8];
                        m.extend(std::iter::repeat_n(b'k', (*len).min(120)));
                        framed(&m)
                    } else {
                        vec![0; (*len).min(MAX_FRAME - 8)]
                    };
                    let mut flags = if *end_stream { frame::END_STREAM } else { 0 };
                    pad(&mut flags, &mut payload, *padded);
                    frame::put_header(&mut out, payload.len(), frame::DATA, flags, *id);
                    out.extend_from_slice(&payload);
                }
                Step::Continuation {
                    id,
                    end_headers,
                    bytes,
                } => {
                    let flags = if *end_headers { frame::END_HEADERS } else { 0 };
                    frame::put_header(&mut out, bytes.len(), frame::CONTINUATION, flags, *id);
                    out.extend_from_slice(bytes);
                }
                Step::Reset(id, code) => frame::put_reset(&mut out, *id, *code),
                Step::Settings(entries, ack) => {
                    let flags = if *ack { frame::ACK } else { 0 };
                    let n = if *ack { 0 } else { entries.len() };
                    frame::put_header(&mut out, n * 6, frame::SETTINGS, flags, 0);
                    for (k, v) in entries.iter().take(n) {
                        out.extend_from_slice(&k.to_be_bytes());
                        out.extend_from_slice(&v.to_be_bytes());
                    }
                }
                Step::WindowUpdate(id, n) => frame::put_window_update(&mut out, *id, *n),
                Step::Ping(ack) => {
                    frame::put_header(
                        &mut out,
                        8,
                        frame::PING,
                        if *ack { frame::ACK } else { 0 },
                        0,
                    );
                    out.extend_from_slice(&[1; 8]);
                }
                Step::Priority(id, len, dep) => {
                    frame::put_header(&mut out, *len as usize, frame::PRIORITY, 0, *id);
                    let mut p = dep.to_be_bytes().to_vec();
                    p.push(7);
                    p.resize(*len as usize, 0);
                    out.extend_from_slice(&p);
                }
                Step::GoAway => {
                    frame::put_header(&mut out, 8, frame::GOAWAY, 0, 0);
                    out.extend_from_slice(&[0; 8]);
                }
                Step::Unknown(kind, bytes) => {
                    frame::put_header(&mut out, bytes.len(), *kind, 0, 1);
                    out.extend_from_slice(bytes);
                }
                Step::Garbage(bytes) => out.extend_from_slice(bytes),
                Step::Release | Step::Reading(_) => {}
            }
            out
        }

        fn step_id(step: &Step) -> u32 {
            match step {
                Step::Data { id, .. } | Step::Reset(id, _) => *id,
                _ => 0,
            }
        }

        fn check_bounds(proto: &h2::Server<Grpc<Fake>>) -> Result<(), TestCaseError> {
            prop_assert!(
                proto.conn.stream_count() <= MAX_STREAMS,
                "{} streams",
                proto.conn.stream_count()
            );
            prop_assert!(proto.app.forwarded.len() <= MAX_FORWARDED);
            let bound = proto.app.limits.conn_reply_bytes + WRITE_HIGH_WATER + 4 * MAX_FRAME;
            prop_assert!(
                proto.conn.reply_bytes() <= bound,
                "{} reply bytes held",
                proto.conn.reply_bytes()
            );
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(
                std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512)
            ))]

            #[test]
            fn arbitrary_frames_keep_every_bound_and_every_stream_ends(
                steps in proptest::collection::vec(step(), 1..80),
                hold in any::<bool>(),
                big in prop::bool::weighted(0.2),
            ) {
                let fake = Fake::default();
                *fake.value_len.borrow_mut() = if big { 900 } else { 10 };
                if hold {
                    *fake.hold.borrow_mut() = Some(vec![]);
                }
                let mut proto = server(fake.clone());
                let mut encoder = loona_hpack::Encoder::new();
                let mut reading = true;
                let mut input = frame::PREFACE.to_vec();
                frame::put_header(&mut input, 0, frame::SETTINGS, 0, 0);
                let cx = &mut Context::from_waker(std::task::Waker::noop());
                // Ids as a client uses them: new streams in increasing order, frames on the
                // streams opened so far; now and then an id of the raw step, valid or not.
                let (mut next_id, mut opened) = (1u32, Vec::<u32>::new());
                // Before any stream is open, a frame for one goes to a stream yet to come
                // (an idle stream: a protocol error) only with a raw id.
                let on_open = |opened: &Vec<u32>, raw: u32| -> u32 {
                    match opened.len() {
                        _ if raw % 19 == 0 => raw,
                        0 => 1 + 2 * (raw % 3),
                        n => opened[raw as usize % n],
                    }
                };
                let steps: Vec<Step> = steps
                    .into_iter()
                    .map(|step| match step {
                        Step::Headers { id, path, end_stream, end_headers, priority, padded } => {
                            let id = if id % 13 != 0 {
                                next_id += 2;
                                opened.push(next_id - 2);
                                next_id - 2
                            } else {
                                on_open(&opened, id)
                            };
                            Step::Headers { id, path, end_stream, end_headers, priority, padded }
                        }
                        Step::Data { .. } | Step::Reset(..) if opened.is_empty() && step_id(&step) % 19 != 0 => {
                            Step::Ping(false)
                        }
                        Step::Data { id, len, framed, end_stream, padded } => {
                            Step::Data { id: on_open(&opened, id), len, framed, end_stream, padded }
                        }
                        Step::Reset(id, code) => Step::Reset(on_open(&opened, id), code),
                        Step::WindowUpdate(id, n) => Step::WindowUpdate(on_open(&opened, id), n),
                        Step::Priority(id, len, dep) => Step::Priority(on_open(&opened, id), len, dep),
                        other => other,
                    })
                    .collect();
                for step in &steps {
                    match step {
                        Step::Release => {
                            for tx in fake.hold.borrow_mut().iter_mut().flat_map(|v| v.drain(..)) {
                                let _ = tx.send(());
                            }
                        }
                        Step::Reading(r) => reading = *r,
                        _ => input.extend(frame_bytes(&mut encoder, step)),
                    }
                    // The node reads only while it wants input, as the connection does.
                    while !input.is_empty() && proto.conn.wants_input() && proto.finished().is_none() {
                        let room = proto.conn.room();
                        let n = room.len().min(input.len());
                        room[..n].copy_from_slice(&input[..n]);
                        input.drain(..n);
                        proto.received(n, Instant::now());
                    }
                    proto.poll_work(cx);
                    if reading {
                        let n = proto.conn.output().len();
                        proto.conn.sent(n);
                    }
                    check_bounds(&proto)?;
                }
                // Every call answered, every reply read.
                *fake.hold.borrow_mut() = None;
                for tx in fake.hold.borrow_mut().iter_mut().flat_map(|v| v.drain(..)) {
                    let _ = tx.send(());
                }
                for _ in 0..4 {
                    proto.poll_work(cx);
                    let n = proto.conn.output().len();
                    proto.conn.sent(n);
                }
                check_bounds(&proto)?;
                if proto.finished().is_none() {
                    prop_assert!(!h2::App::working(&proto.app) || !proto.app.calls.is_empty() || !proto.app.bodies.is_empty(),
                        "fresh calls or forwarded requests left unpolled");
                    let ids: Vec<u32> = proto.conn.states().map(|(id, _)| id).collect();
                    for id in ids {
                        prop_assert!(proto.conn.waits_on_peer(id),
                            "stream {} ended, or reset and never forgotten, yet still held", id);
                    }
                }
            }
        }
    }
}
