//! The node's HTTP/2 server: one task per connection on the core that accepted it.
//!
//! Why not hyper: under callgrind, hyper's HTTP/2 server was four fifths of the node's
//! instructions per request (a connection task and a task per stream, each request's headers
//! built into a `HeaderMap`, a body channel, frames queued and moved between buffers). A gRPC
//! unary call needs far less: this connection parses the frames in its receive buffer, decodes
//! the request message in place when it came in one DATA frame, starts the call, and encodes
//! the reply (headers, message, trailers) straight into one write buffer that goes out in one
//! send for everything answered in the same turn. Everything that is not one of our unary
//! methods (reflection, health, Stats) is still served by tonic on the side thread: this
//! connection forwards it as an `http::Request` and streams the response back.
//!
//! What it implements of RFC 9113: the preface and SETTINGS, HEADERS with CONTINUATION and
//! padding, DATA, flow control both ways (our windows are replenished as data arrives; the
//! peer's are respected for every DATA frame we send), RST_STREAM, PING, GOAWAY (ours for a
//! graceful shutdown, and on a protocol error), and stream limits. No server push, no
//! priorities (both optional; PRIORITY frames are validated and ignored). HPACK is ours both
//! ways (the `http2` crate's): the encoder indexes only the two fields every reply repeats.
//!
//! Every resource a client can make a connection hold is bounded ([`Limits`]): streams (a
//! reset one counts until its call ends), resets and control frames per second, reply bytes a
//! client leaves unread (per connection and per core), forwarded bodies (window granted as
//! the side thread consumes them), and time (handshake and idle timeouts). Each bound answers
//! as RFC 9113 and the major servers do and is counted ([`Event`]).

use super::grpc::{Answer, Call, Method, PREFIX};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http2::{
    frame::{self, code},
    hpack,
};
use std::{
    collections::hash_map::Entry,
    collections::HashMap,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tonic::{body::Body, Status};

/// The largest frame we accept: the protocol's default, which we never raise.
const MAX_FRAME: usize = 16_384;
/// Holds a whole frame of MAX_FRAME and then some, so a read never waits for room.
const RECV_BUFFER: usize = 64 * 1024;
/// Each stream's receive window. A unary message larger than this is still received: the
/// window is replenished as it arrives, up to MAX_RECV_MSG_SIZE.
const STREAM_WINDOW: u32 = 1 << 20;
/// The connection's receive window, shared by its streams.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Concurrent streams per connection, as many as hyper allowed by default.
pub const MAX_STREAMS: usize = 200;
/// Largest request header block, compressed or decoded (names, values, 32 bytes per field).
const MAX_HEADER_LIST: usize = 64 * 1024;
/// Output waiting for the socket beyond which no more requests are read.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// How long finished replies may wait for the calls still under way on their connection, so
/// that those answered by another core go out in the same send. With two cores, sending each
/// core's answers as they came doubled the sends per request (6 requests per send against 13
/// on one core, under strace) and with them the kernel's and the client's work per request.
/// 200 us gave 12% more throughput than 50 us at 16 x 16 (bench/RESULTS.md); a connection with
/// one call in flight never waits, and under that load a reply's latency is milliseconds.
const HOLD: Duration = Duration::from_micros(200);
/// Output beyond which nothing is held.
const HOLD_MAX: usize = 64 * 1024;
/// Turns of the connection's loop before it yields to the core's other tasks.
const BUDGET: usize = 16;
/// Entries one SETTINGS frame may carry: RFC 9113 defines seven settings, and nghttp2 refuses
/// frames of more than 32 entries for the same reason (each may touch every open stream).
const MAX_SETTINGS_ENTRIES: usize = 32;
/// Requests forwarded to the side thread at once per connection (reflection, health, Stats): a
/// few are all a real client opens, and each may buffer up to a stream window of request body.
const MAX_FORWARDED: usize = 16;
/// Streams we reset whose ids are remembered, so that frames the client sent before it saw
/// the reset are ignored rather than taken for a reuse of a closed stream id.
const RECENTLY_RESET: usize = 64;

/// A connection's bounds, the same for every connection of the node (HTTP2_* variables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time to receive the client's preface after accepting the connection.
    pub handshake_timeout: Duration,
    /// Time without a byte read or written and with no call under way before GOAWAY.
    pub idle_timeout: Duration,
    /// RST_STREAM frames a client may send per second (and at once) before GOAWAY
    /// ENHANCE_YOUR_CALM: the Rapid Reset attack (CVE-2023-44487) is many of them.
    pub resets_per_sec: u32,
    /// SETTINGS and PING frames per second (and at once), each of which costs us an answer.
    pub control_frames_per_sec: u32,
    /// Reply bytes one connection may hold for a client that does not read them; beyond it,
    /// a call's answer is replaced by RESOURCE_EXHAUSTED.
    pub conn_reply_bytes: usize,
    /// The same over every connection of a core.
    pub core_reply_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(180),
            resets_per_sec: 1000,
            control_frames_per_sec: 1000,
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
}

/// A token bucket of `rate` per second holding at most `rate`: the frames a client may send
/// in a burst and then per second.
struct Bucket {
    tokens: f64,
    rate: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Self {
        Bucket {
            tokens: rate as f64,
            rate: rate as f64,
            at: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
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
}

pub type Forwarded = Pin<Box<dyn Future<Output = http::Response<Body>>>>;

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The peer closed it, or it failed.
    Closed,
    /// We sent GOAWAY and every stream it let finish has: the caller closes without a reset.
    GoneAway,
}

/// Serves one connection until the peer closes it, it fails, or `shutdown` resolves and the
/// streams under way have been answered.
pub async fn serve<S: Service>(
    svc: S,
    io: glommio::net::TcpStream,
    shutdown: Pin<Box<dyn Future<Output = ()>>>,
) -> Ended {
    let proto = Proto::new(svc);
    let mut conn = Connection {
        timeout: glommio::timer::Timer::new(proto.limits.handshake_timeout),
        proto,
        io,
        shutdown: Some(shutdown),
        hold: None,
        holding: false,
        last_activity: Instant::now(),
        reported_reply_bytes: 0,
    };
    let ended = std::future::poll_fn(|cx| conn.poll(cx)).await;
    conn.report_reply_bytes(0);
    ended
}

struct Connection<S: Service> {
    proto: Proto<S>,
    io: glommio::net::TcpStream,
    shutdown: Option<Pin<Box<dyn Future<Output = ()>>>>,
    /// Bounds the wait of held output; made once, reset for each wait.
    hold: Option<glommio::timer::Timer>,
    holding: bool,
    /// The handshake timeout until the preface is in, then the idle check (re-armed when it
    /// fires rather than on every read: a reset per read would cost the request path).
    timeout: glommio::timer::Timer,
    /// The last time a byte was read or written.
    last_activity: Instant,
    /// What this connection last added to its core's count of held reply bytes.
    reported_reply_bytes: usize,
}

impl<S: Service> Connection<S> {
    /// Moves this connection's share of its core's held reply bytes to `held`.
    fn report_reply_bytes(&mut self, held: usize) {
        if held == self.reported_reply_bytes {
            return;
        }
        if let Some(core) = self.proto.svc.core_reply_bytes() {
            core.set(core.get().saturating_sub(self.reported_reply_bytes) + held);
        }
        self.reported_reply_bytes = held;
    }

    /// The handshake and idle timeouts: Some when the connection is to end.
    fn poll_timeout(&mut self, cx: &mut Context<'_>) -> Option<Ended> {
        if Pin::new(&mut self.timeout).poll(cx).is_pending() {
            return None;
        }
        let now = Instant::now();
        if !self.proto.preface {
            self.proto.svc.count(Event::HandshakeTimeout);
            return Some(Ended::Closed);
        }
        let idle_for = now.saturating_duration_since(self.last_activity);
        if idle_for >= self.proto.limits.idle_timeout && !self.proto.working() {
            self.proto.svc.count(Event::IdleTimeout);
            self.proto.close_with(code::NO_ERROR);
            return None;
        }
        let left = self.proto.limits.idle_timeout.saturating_sub(idle_for);
        self.timeout.reset(
            left.max(self.proto.limits.idle_timeout / 8)
                .max(Duration::from_millis(10)),
        );
        // The fresh deadline must be registered with this task's waker.
        let _ = Pin::new(&mut self.timeout).poll(cx);
        None
    }

    /// Whether to keep the output back for now: calls are still under way and HOLD has not
    /// passed since it was first kept back.
    fn hold_output(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.proto.calls_pending()
            || self.proto.output().len() >= HOLD_MAX
            || self.proto.going_away.is_some()
        {
            self.holding = false;
            return false;
        }
        let timer = self
            .hold
            .get_or_insert_with(|| glommio::timer::Timer::new(HOLD));
        if !self.holding {
            self.holding = true;
            timer.reset(HOLD);
        }
        if Pin::new(timer).poll(cx).is_ready() {
            self.holding = false;
            return false;
        }
        true
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        let ended = self.poll_inner(cx);
        let held = self.proto.reply_bytes();
        self.report_reply_bytes(held);
        ended
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        use futures_lite::{AsyncRead, AsyncWrite};
        if let Some(ended) = self.poll_timeout(cx) {
            return Poll::Ready(ended);
        }
        for _ in 0..BUDGET {
            let mut busy = false;
            if let Some(shutdown) = &mut self.shutdown {
                if shutdown.as_mut().poll(cx).is_ready() {
                    self.shutdown = None;
                    self.proto.go_away(code::NO_ERROR);
                    busy = true;
                }
            }
            let could_read = self.proto.wants_input();
            if could_read {
                match Pin::new(&mut self.io).poll_read(cx, self.proto.room()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ended::Closed),
                    Poll::Ready(Ok(n)) => {
                        let now = Instant::now();
                        self.last_activity = now;
                        self.proto.received(n, now);
                        busy = true;
                    }
                    Poll::Pending => {}
                }
            }
            busy |= self.proto.poll_work(cx);
            let hold = !self.proto.output().is_empty() && self.hold_output(cx);
            while !hold && !self.proto.output().is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, self.proto.output()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ended::Closed),
                    Poll::Ready(Ok(n)) => {
                        self.proto.sent(n);
                        self.last_activity = Instant::now();
                    }
                    Poll::Pending => break,
                }
            }
            if self.proto.output().is_empty() {
                if let Some(ended) = self.proto.finished() {
                    return Poll::Ready(ended);
                }
            }
            // Output drained below the high-water mark: reading may go on.
            busy |= !could_read && self.proto.wants_input();
            if !busy {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// One stream's state.
struct Stream {
    recv: Recv,
    /// Request bytes received on this stream since its window was last replenished.
    recv_unacked: u32,
    /// What the client may still send on it: more is a FLOW_CONTROL_ERROR.
    recv_window: i64,
    send_window: i64,
    out: Out,
    /// In `Proto::blocked`, waiting for window.
    blocked: bool,
    /// Reset by the client while its call was under way: it still counts against
    /// MAX_CONCURRENT_STREAMS until the call ends (the Rapid Reset attack relies on a reset
    /// freeing the slot at once), and nothing is sent on it.
    reset: bool,
    /// The request's content-length, checked against its DATA at END_STREAM.
    content_length: Option<u64>,
    body_bytes: u64,
}

impl Stream {
    fn new(recv: Recv, send_window: i64) -> Self {
        Stream {
            recv,
            recv_unacked: 0,
            recv_window: STREAM_WINDOW as i64,
            send_window,
            out: Out::Waiting,
            blocked: false,
            reset: false,
            content_length: None,
            body_bytes: 0,
        }
    }
}

/// How much of a forwarded request's body the side thread has consumed, so that its window
/// is granted as the receiver reads, not as bytes arrive.
#[derive(Default)]
struct SideFlow {
    consumed: std::sync::atomic::AtomicUsize,
    waker: futures_util::task::AtomicWaker,
}

enum Recv {
    /// One of our unary calls: its message so far (empty while it fits in one DATA frame).
    Unary {
        method: Method,
        deadline: Instant,
        start: Instant,
        held: Vec<u8>,
    },
    /// A request the side thread serves: its body's sender, how much of it was consumed, and
    /// how much of that the client has been granted back.
    Side(
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        std::sync::Arc<SideFlow>,
        usize,
    ),
    /// END_STREAM received, or the request refused.
    Closed,
}

enum Out {
    /// Waiting for the call's answer.
    Waiting,
    /// Waiting for the side thread's response (dropping it cancels the forwarded request).
    Forwarded(Forwarded),
    /// Sending `data` as the windows allow, then `then`.
    Sending { data: Bytes, then: Then },
    /// The side thread's response body, polled for its next frame.
    Body(Body),
    /// END_STREAM sent.
    Done,
}

enum Then {
    OkTrailers,
    Trailers(http::HeaderMap),
    Body(Body),
}

/// The protocol state of a connection, apart from its socket: bytes in, bytes out.
struct Proto<S: Service> {
    svc: S,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    preface: bool,
    decoder: hpack::Decoder,
    encoder: Encoder,
    streams: HashMap<u32, Stream, ahash::RandomState>,
    /// The highest stream id the peer opened.
    last_id: u32,
    /// A header block waiting for its CONTINUATION frames: stream, HEADERS flags, block.
    continuation: Option<(u32, u8, Vec<u8>)>,
    conn_send_window: i64,
    peer_initial_window: i64,
    peer_max_frame: usize,
    conn_recv_unacked: u32,
    /// Streams with output waiting for window.
    blocked: Vec<u32>,
    /// Calls started since the last poll; polled once before they join `calls`, so that one
    /// answered on this core at once costs no more than that poll.
    fresh: Vec<(u32, Call)>,
    calls: FuturesUnordered<Tagged<Call>>,
    /// Streams waiting for the side thread's response.
    forwarded: Vec<u32>,
    /// Streams whose response body is polled for more.
    bodies: Vec<u32>,
    /// GOAWAY sent: the last stream id it let through, and whether for an error.
    going_away: Option<(u32, bool)>,
    limits: Limits,
    resets: Bucket,
    control: Bucket,
    /// Ids of streams we reset, newest last (a ring).
    reset_ids: [u32; RECENTLY_RESET],
    reset_pos: usize,
    /// Reply bytes waiting in streams' `Out::Sending` for window.
    sending_bytes: usize,
    /// What the client may still send on the connection.
    conn_recv_window: i64,
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

/// What a request's header block says.
#[derive(Default)]
struct Head {
    /// `:method`; None for POST, the only one our methods take.
    verb: Option<http::Method>,
    /// `:path` when it is one of our methods: the path itself is then not kept.
    method: Option<Method>,
    path: Option<Vec<u8>>,
    authority: Option<Vec<u8>>,
    timeout: Option<Duration>,
    encoding: Option<Vec<u8>>,
    /// Every regular field, kept only for requests forwarded to the side thread.
    fields: Option<http::HeaderMap>,
    /// Bytes of the decoded list, as MAX_HEADER_LIST counts them.
    size: usize,
    malformed: bool,
    /// PSEUDO_* bits of the pseudo-header fields present.
    pseudo: u8,
    content_length: Option<u64>,
}

impl Head {
    /// Served on this core.
    fn ours(&self) -> Option<Method> {
        self.method.filter(|_| self.verb.is_none())
    }
}

impl<S: Service> Proto<S> {
    fn new(svc: S) -> Self {
        let limits = svc.limits();
        let now = Instant::now();
        Self {
            limits,
            resets: Bucket::new(limits.resets_per_sec, now),
            control: Bucket::new(limits.control_frames_per_sec, now),
            reset_ids: [0; RECENTLY_RESET],
            reset_pos: 0,
            sending_bytes: 0,
            conn_recv_window: frame::DEFAULT_WINDOW,
            svc,
            rbuf: vec![0; RECV_BUFFER],
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(16 * 1024),
            wpos: 0,
            preface: false,
            decoder: hpack::Decoder::new(4096),
            encoder: Encoder::default(),
            streams: HashMap::default(),
            last_id: 0,
            continuation: None,
            conn_send_window: frame::DEFAULT_WINDOW,
            peer_initial_window: frame::DEFAULT_WINDOW,
            peer_max_frame: MAX_FRAME,
            conn_recv_unacked: 0,
            blocked: Vec::new(),
            fresh: Vec::new(),
            calls: FuturesUnordered::new(),
            forwarded: Vec::new(),
            bodies: Vec::new(),
            going_away: None,
        }
    }

    fn calls_pending(&self) -> bool {
        !self.calls.is_empty()
    }

    /// Whether anything is under way that the idle timeout must wait for.
    fn working(&self) -> bool {
        !self.calls.is_empty()
            || !self.fresh.is_empty()
            || !self.forwarded.is_empty()
            || !self.bodies.is_empty()
    }

    /// Reply bytes this connection holds for its client: written and not yet sent, or
    /// waiting for window.
    fn reply_bytes(&self) -> usize {
        self.wbuf.len() - self.wpos + self.sending_bytes
    }

    /// Removes a stream, dropping whatever it still had under way or to send.
    fn drop_stream(&mut self, id: u32) {
        if let Some(stream) = self.streams.remove(&id) {
            if let Out::Sending { data, .. } = &stream.out {
                self.sending_bytes -= data.len();
            }
        }
    }

    fn wants_input(&self) -> bool {
        !matches!(self.going_away, Some((_, true)))
            && self.wbuf.len() - self.wpos < WRITE_HIGH_WATER
    }

    /// Free space to read into.
    fn room(&mut self) -> &mut [u8] {
        if self.rend == self.rbuf.len() {
            // Only part of a frame is left (parsing took every whole one): move it to the front.
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        &mut self.rbuf[self.rend..]
    }

    fn output(&self) -> &[u8] {
        &self.wbuf[self.wpos..]
    }

    fn sent(&mut self, n: usize) {
        self.wpos += n;
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
    }

    /// Some once nothing is left to do but close.
    fn finished(&self) -> Option<Ended> {
        match self.going_away {
            Some((_, true)) => Some(Ended::Closed),
            Some((_, false)) if self.streams.is_empty() => Some(Ended::GoneAway),
            _ => None,
        }
    }

    /// `n` more bytes arrived in `room()`.
    fn received(&mut self, n: usize, now: Instant) {
        self.rend += n;
        let rbuf = std::mem::take(&mut self.rbuf);
        let mut pos = self.rstart;
        if !self.preface {
            if self.rend - pos < frame::PREFACE.len() {
                self.rbuf = rbuf;
                return;
            }
            if &rbuf[pos..pos + frame::PREFACE.len()] != frame::PREFACE {
                self.rbuf = rbuf;
                self.go_away(code::PROTOCOL_ERROR);
                return;
            }
            pos += frame::PREFACE.len();
            self.preface = true;
            self.greet();
        }
        while !matches!(self.going_away, Some((_, true))) && self.rend - pos >= frame::HEADER_LEN {
            let h = &rbuf[pos..pos + frame::HEADER_LEN];
            let len = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
            let (kind, flags) = (h[3], h[4]);
            let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if len > MAX_FRAME {
                self.go_away(code::FRAME_SIZE_ERROR);
                break;
            }
            if self.rend - pos < frame::HEADER_LEN + len {
                break;
            }
            let payload = &rbuf[pos + frame::HEADER_LEN..pos + frame::HEADER_LEN + len];
            pos += frame::HEADER_LEN + len;
            self.frame(kind, flags, id, payload, now);
        }
        self.rbuf = rbuf;
        self.rstart = pos;
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
    }

    /// Our SETTINGS, and the connection window raised from the protocol's 64 KiB.
    fn greet(&mut self) {
        let settings: [(u16, u32); 3] = [
            (0x3, MAX_STREAMS as u32),     // MAX_CONCURRENT_STREAMS
            (0x4, STREAM_WINDOW),          // INITIAL_WINDOW_SIZE
            (0x6, MAX_HEADER_LIST as u32), // MAX_HEADER_LIST_SIZE
        ];
        frame::put_header(&mut self.wbuf, settings.len() * 6, frame::SETTINGS, 0, 0);
        for (id, value) in settings {
            self.wbuf.extend_from_slice(&id.to_be_bytes());
            self.wbuf.extend_from_slice(&value.to_be_bytes());
        }
        frame::put_window_update(
            &mut self.wbuf,
            0,
            CONNECTION_WINDOW - frame::DEFAULT_WINDOW as u32,
        );
        self.conn_recv_window = CONNECTION_WINDOW as i64;
    }

    fn frame(&mut self, kind: u8, flags: u8, id: u32, payload: &[u8], now: Instant) {
        if let Some((cid, _, _)) = &self.continuation {
            if kind != frame::CONTINUATION || id != *cid {
                return self.go_away(code::PROTOCOL_ERROR);
            }
        }
        match kind {
            frame::DATA => self.data(flags, id, payload),
            frame::HEADERS => self.headers(flags, id, payload, now),
            frame::CONTINUATION => {
                let Some((sid, hflags, mut block)) = self.continuation.take() else {
                    return self.go_away(code::PROTOCOL_ERROR);
                };
                if block.len() + payload.len() > MAX_HEADER_LIST {
                    return self.calm_down(Event::ControlFlood);
                }
                block.extend_from_slice(payload);
                if flags & frame::END_HEADERS != 0 {
                    self.header_block(hflags, sid, &block, now);
                } else {
                    self.continuation = Some((sid, hflags, block));
                }
            }
            frame::PRIORITY => self.priority(id, payload),
            frame::RST_STREAM => self.peer_reset(id, payload, now),
            frame::SETTINGS => {
                if flags & frame::ACK == 0 && !self.control.take(now) {
                    return self.calm_down(Event::ControlFlood);
                }
                self.settings(flags, id, payload)
            }
            frame::PUSH_PROMISE => self.go_away(code::PROTOCOL_ERROR),
            frame::PING => {
                if id != 0 {
                    return self.go_away(code::PROTOCOL_ERROR);
                }
                if payload.len() != 8 {
                    return self.go_away(code::FRAME_SIZE_ERROR);
                }
                if flags & frame::ACK == 0 {
                    if !self.control.take(now) {
                        return self.calm_down(Event::ControlFlood);
                    }
                    frame::put_header(&mut self.wbuf, 8, frame::PING, frame::ACK, 0);
                    self.wbuf.extend_from_slice(payload);
                }
            }
            // The peer opens no more streams; those under way finish and it closes.
            frame::GOAWAY => {}
            frame::WINDOW_UPDATE => self.peer_window_update(id, payload),
            _ => {} // unknown frame types are ignored (RFC 9113, 4.1)
        }
    }

    /// PRIORITY is advisory and ignored, but validated (RFC 9113, 6.3 and 5.3.1).
    fn priority(&mut self, id: u32, payload: &[u8]) {
        if id == 0 {
            return self.go_away(code::PROTOCOL_ERROR);
        }
        if payload.len() != 5 {
            return self.stream_error(id, code::FRAME_SIZE_ERROR);
        }
        let depends_on = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        if depends_on & 0x7fff_ffff == id {
            self.stream_error(id, code::PROTOCOL_ERROR);
        }
    }

    /// A stream error: the stream ends with RST_STREAM `error`, the connection goes on.
    fn stream_error(&mut self, id: u32, error: u32) {
        self.drop_stream(id);
        self.reset(id, error);
    }

    fn peer_reset(&mut self, id: u32, payload: &[u8], now: Instant) {
        if id == 0 {
            return self.go_away(code::PROTOCOL_ERROR);
        }
        if payload.len() != 4 {
            return self.go_away(code::FRAME_SIZE_ERROR);
        }
        if id > self.last_id {
            // Idle: nothing to reset (RFC 9113, 5.1).
            return self.go_away(code::PROTOCOL_ERROR);
        }
        if !self.resets.take(now) {
            return self.calm_down(Event::ResetFlood);
        }
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if matches!(stream.out, Out::Waiting) && matches!(stream.recv, Recv::Closed) {
            // Its call is under way: the slot stays taken until the call ends.
            stream.reset = true;
            return;
        }
        // Anything else is dropped now: a forwarded request's response future (which cancels
        // it), a body being streamed, a request not complete yet.
        self.drop_stream(id);
    }

    /// GOAWAY ENHANCE_YOUR_CALM: the client sends more of something than any client needs.
    fn calm_down(&mut self, why: Event) {
        self.svc.count(why);
        self.close_with(code::ENHANCE_YOUR_CALM);
    }

    fn data(&mut self, flags: u8, id: u32, payload: &[u8]) {
        if id == 0 {
            return self.go_away(code::PROTOCOL_ERROR);
        }
        // The whole frame counts against the connection window, padding included.
        self.conn_recv_window -= payload.len() as i64;
        if self.conn_recv_window < 0 {
            return self.go_away(code::FLOW_CONTROL_ERROR);
        }
        self.conn_recv_unacked += payload.len() as u32;
        if self.conn_recv_unacked >= CONNECTION_WINDOW / 2 {
            let n = std::mem::take(&mut self.conn_recv_unacked);
            self.conn_recv_window += n as i64;
            frame::put_window_update(&mut self.wbuf, 0, n);
        }
        let Some(data) = frame::unpad(flags, payload) else {
            return self.go_away(code::PROTOCOL_ERROR);
        };
        let end = flags & frame::END_STREAM != 0;
        let Some(stream) = self.streams.get_mut(&id) else {
            if id > self.last_id {
                self.go_away(code::PROTOCOL_ERROR);
            }
            // Else a stream already answered or reset: frames the peer sent before it knew.
            return;
        };
        if stream.reset {
            return;
        }
        stream.recv_window -= payload.len() as i64;
        if stream.recv_window < 0 {
            return self.stream_error(id, code::FLOW_CONTROL_ERROR);
        }
        stream.body_bytes += data.len() as u64;
        if end
            && stream
                .content_length
                .is_some_and(|n| n != stream.body_bytes)
        {
            return self.stream_error(id, code::PROTOCOL_ERROR);
        }
        if !matches!(stream.recv, Recv::Side(..)) {
            // Our own calls consume what arrives as it arrives (bounded by MAX_RECV_MSG_SIZE);
            // a forwarded request's window comes back as the side thread reads it.
            stream.recv_unacked += payload.len() as u32;
            if !end && stream.recv_unacked >= STREAM_WINDOW / 2 {
                let n = std::mem::take(&mut stream.recv_unacked);
                stream.recv_window += n as i64;
                frame::put_window_update(&mut self.wbuf, id, n);
            }
        }
        let limit = self.svc.max_recv_msg_bytes();
        match &mut stream.recv {
            Recv::Unary { held, .. } if !end => {
                held.extend_from_slice(data);
                if let Err(status) = message_of(held, limit, false) {
                    self.refuse(id, status, false);
                }
            }
            Recv::Unary { .. } => {
                let Recv::Unary {
                    method,
                    deadline,
                    start,
                    mut held,
                } = std::mem::replace(&mut stream.recv, Recv::Closed)
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
                    }
                    Err(status) => self.write_status(id, status),
                }
            }
            Recv::Side(tx, flow, _) => {
                if data.is_empty() {
                    // Padding and empty frames are consumed at once.
                    flow.consumed
                        .fetch_add(payload.len(), std::sync::atomic::Ordering::Relaxed);
                } else {
                    // The side thread may be gone (shutting down): its response says so.
                    let _ = tx.send(Bytes::copy_from_slice(data));
                    let padding = payload.len() - data.len();
                    flow.consumed
                        .fetch_add(padding, std::sync::atomic::Ordering::Relaxed);
                }
                if end {
                    stream.recv = Recv::Closed;
                    self.close_if_done(id);
                }
            }
            Recv::Closed => {
                self.stream_error(id, code::STREAM_CLOSED);
            }
        }
    }

    fn headers(&mut self, flags: u8, id: u32, payload: &[u8], now: Instant) {
        if id == 0 || id % 2 == 0 {
            return self.go_away(code::PROTOCOL_ERROR);
        }
        let Some(mut block) = frame::unpad(flags, payload) else {
            return self.go_away(code::PROTOCOL_ERROR);
        };
        let mut self_dependent = false;
        if flags & frame::PRIORITY_FLAG != 0 {
            if block.len() < 5 {
                return self.go_away(code::PROTOCOL_ERROR);
            }
            let depends_on = u32::from_be_bytes([block[0], block[1], block[2], block[3]]);
            self_dependent = depends_on & 0x7fff_ffff == id;
            block = &block[5..];
        }
        if flags & frame::END_HEADERS == 0 {
            self.continuation = Some((id, flags, block.to_vec()));
            return;
        }
        self.header_block(flags, id, block, now);
        if self_dependent && self.streams.contains_key(&id) {
            self.stream_error(id, code::PROTOCOL_ERROR);
        }
    }

    fn header_block(&mut self, flags: u8, id: u32, block: &[u8], now: Instant) {
        let end = flags & frame::END_STREAM != 0;
        let mut head = Head::default();
        let mut regular = false;
        let decoded = self.decoder.decode(block, |name, value| {
            head.size += name.len() + value.len() + 32;
            if head.size > MAX_HEADER_LIST {
                return;
            }
            head.malformed |= !valid_value(value);
            if name.first() == Some(&b':') {
                head.malformed |= regular;
                let seen = match name {
                    b":method" => {
                        if value != b"POST" {
                            match http::Method::from_bytes(value) {
                                Ok(verb) => head.verb = Some(verb),
                                Err(_) => head.malformed = true,
                            }
                        }
                        PSEUDO_METHOD
                    }
                    b":path" => {
                        match Method::of_path(value) {
                            Some(m) => head.method = Some(m),
                            None => head.path = Some(value.to_vec()),
                        }
                        head.malformed |= value.is_empty();
                        PSEUDO_PATH
                    }
                    b":authority" => {
                        head.authority = Some(value.to_vec());
                        PSEUDO_AUTHORITY
                    }
                    b":scheme" => PSEUDO_SCHEME,
                    _ => {
                        head.malformed = true;
                        0
                    }
                };
                // Each at most once.
                head.malformed |= head.pseudo & seen != 0;
                head.pseudo |= seen;
                return;
            }
            regular = true;
            head.malformed |= !valid_name(name);
            match name {
                b"grpc-timeout" => head.timeout = super::grpc::parse_grpc_timeout(value),
                b"grpc-encoding" => head.encoding = Some(value.to_vec()),
                // Connection-specific fields have no place in HTTP/2 (RFC 9113, 8.2.2).
                b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
                | b"upgrade" => head.malformed = true,
                b"te" => head.malformed |= value != b"trailers",
                b"content-length" => match std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    Some(n) if head.content_length.is_none_or(|m| m == n) => {
                        head.content_length = Some(n)
                    }
                    _ => head.malformed = true,
                },
                _ => {}
            }
            if head.ours().is_none() {
                match (
                    http::HeaderName::from_bytes(name),
                    http::HeaderValue::from_bytes(value),
                ) {
                    (Ok(n), Ok(v)) => {
                        head.fields
                            .get_or_insert_with(http::HeaderMap::new)
                            .append(n, v);
                    }
                    _ => head.malformed = true,
                }
            }
        });
        if decoded.is_err() {
            return self.go_away(code::COMPRESSION_ERROR);
        }
        if id <= self.last_id {
            match self.streams.get(&id) {
                // Trailers of a request under way: they end its body and carry nothing we
                // read.
                Some(stream) if !stream.reset && !matches!(stream.recv, Recv::Closed) => {
                    if !end || head.pseudo != 0 {
                        return self.stream_error(id, code::PROTOCOL_ERROR);
                    }
                    return self.data(frame::END_STREAM, id, &[]);
                }
                // Sent before the client saw our RST_STREAM.
                _ if self.reset_ids.contains(&id) => return,
                // A stream id reused, or lower than one already opened (RFC 9113, 5.1.1).
                _ => return self.go_away(code::PROTOCOL_ERROR),
            }
        }
        self.last_id = id;
        if self.going_away.is_some() {
            return; // opened after our GOAWAY: never served, the client may retry it
        }
        if self.streams.len() >= MAX_STREAMS {
            self.svc.count(Event::StreamRefused);
            return self.reset(id, code::REFUSED_STREAM);
        }
        if head.malformed
            || (head.method.is_none() && head.path.is_none())
            || head.pseudo & PSEUDO_REQUIRED != PSEUDO_REQUIRED
            || (end && head.content_length.is_some_and(|n| n != 0))
        {
            return self.reset(id, code::PROTOCOL_ERROR);
        }
        let recv = match head.ours() {
            Some(method) => Recv::Unary {
                method,
                deadline: now + head.timeout.unwrap_or_else(|| self.svc.rpc_timeout()),
                start: now,
                held: Vec::new(),
            },
            None => {
                if self.forwarded.len() >= MAX_FORWARDED {
                    self.svc.count(Event::StreamRefused);
                    return self.reset(id, code::REFUSED_STREAM);
                }
                Recv::Closed // forward() opens it
            }
        };
        let mut stream = Stream::new(recv, self.peer_initial_window);
        stream.content_length = head.content_length;
        self.streams.insert(id, stream);
        if head.size > MAX_HEADER_LIST {
            let status =
                Status::resource_exhausted(format!("request headers over {MAX_HEADER_LIST} bytes"));
            return self.refuse(id, status, end);
        }
        if head.ours().is_none() {
            return self.forward(id, head, end);
        }
        if let Some(enc) = head.encoding.filter(|e| e != b"identity") {
            let enc = String::from_utf8_lossy(&enc);
            let status =
                Status::unimplemented(format!("message compression {enc:?} is not supported"));
            return self.refuse(id, status, end);
        }
        if end {
            self.data(frame::END_STREAM, id, &[]);
        }
    }

    fn forward(&mut self, id: u32, head: Head, end: bool) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let path = match (head.path, head.method) {
            (Some(path), _) => path,
            (None, Some(method)) => method.path().as_bytes().to_vec(),
            (None, None) => Vec::new(),
        };
        let uri = match head.authority {
            Some(authority) => http::Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path)
                .build(),
            None => http::Uri::try_from(path).map_err(http::Error::from),
        };
        let Ok(uri) = uri else {
            return self.stream_error(id, code::PROTOCOL_ERROR);
        };
        let flow = std::sync::Arc::new(SideFlow::default());
        let mut req = http::Request::new(Body::new(RequestBody {
            rx,
            flow: std::sync::Arc::clone(&flow),
        }));
        *req.method_mut() = head.verb.unwrap_or(http::Method::POST);
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_2;
        if let Some(fields) = head.fields {
            *req.headers_mut() = fields;
        }
        let fut = self.svc.forward(req);
        let stream = self.streams.get_mut(&id).expect("inserted by the caller");
        if !end {
            stream.recv = Recv::Side(tx, flow, 0);
        }
        stream.out = Out::Forwarded(fut);
        self.forwarded.push(id);
    }

    /// Answers `id` with `status` before its request is complete (`end` false) and tells
    /// the peer to send no more of it.
    fn refuse(&mut self, id: u32, status: Status, end: bool) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.recv = Recv::Closed;
        }
        self.write_status(id, status);
        if !end {
            self.reset(id, code::NO_ERROR);
        }
    }

    fn settings(&mut self, flags: u8, id: u32, payload: &[u8]) {
        if id != 0 {
            return self.go_away(code::PROTOCOL_ERROR);
        }
        if flags & frame::ACK != 0 {
            if !payload.is_empty() {
                self.go_away(code::FRAME_SIZE_ERROR);
            }
            return;
        }
        if payload.len() % 6 != 0 {
            return self.go_away(code::FRAME_SIZE_ERROR);
        }
        if payload.len() / 6 > MAX_SETTINGS_ENTRIES {
            return self.calm_down(Event::ControlFlood);
        }
        // INITIAL_WINDOW_SIZE touches every open stream: applied once, with its last value.
        let mut initial_window = None;
        for setting in payload.chunks_exact(6) {
            let key = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match key {
                0x1 => self.encoder.table_size(value as usize),
                0x2 if value > 1 => return self.go_away(code::PROTOCOL_ERROR),
                0x4 => {
                    if value as i64 > frame::MAX_WINDOW {
                        return self.go_away(code::FLOW_CONTROL_ERROR);
                    }
                    initial_window = Some(value as i64);
                }
                0x5 => {
                    if !(16_384..=16_777_215).contains(&value) {
                        return self.go_away(code::PROTOCOL_ERROR);
                    }
                    self.peer_max_frame = value as usize;
                }
                _ => {}
            }
        }
        if let Some(value) = initial_window {
            let delta = value - self.peer_initial_window;
            self.peer_initial_window = value;
            for stream in self.streams.values_mut() {
                stream.send_window += delta;
                if stream.send_window > frame::MAX_WINDOW {
                    return self.go_away(code::FLOW_CONTROL_ERROR);
                }
            }
            if delta > 0 {
                self.unblock_all();
            }
        }
        frame::put_header(&mut self.wbuf, 0, frame::SETTINGS, frame::ACK, 0);
    }

    fn peer_window_update(&mut self, id: u32, payload: &[u8]) {
        if payload.len() != 4 {
            return self.go_away(code::FRAME_SIZE_ERROR);
        }
        let inc =
            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
        if id == 0 {
            if inc == 0 {
                return self.go_away(code::PROTOCOL_ERROR);
            }
            self.conn_send_window += inc as i64;
            if self.conn_send_window > frame::MAX_WINDOW {
                return self.go_away(code::FLOW_CONTROL_ERROR);
            }
            return self.unblock_all();
        }
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.send_window += inc as i64;
        if inc == 0 || stream.send_window > frame::MAX_WINDOW {
            let code = if inc == 0 {
                code::PROTOCOL_ERROR
            } else {
                code::FLOW_CONTROL_ERROR
            };
            return self.stream_error(id, code);
        }
        self.push(id);
    }

    fn unblock_all(&mut self) {
        for id in std::mem::take(&mut self.blocked) {
            if let Some(stream) = self.streams.get_mut(&id) {
                stream.blocked = false;
                self.push(id);
            }
        }
    }

    /// Polls what is under way: new and pending calls, forwarded requests, response bodies,
    /// and the side thread's consumption of forwarded bodies. True if anything happened.
    fn poll_work(&mut self, cx: &mut Context<'_>) -> bool {
        let mut busy = false;
        for (id, mut call) in std::mem::take(&mut self.fresh) {
            match call.as_mut().poll(cx) {
                Poll::Ready(answer) => self.answer(id, answer),
                Poll::Pending => self.calls.push(Tagged { id, fut: call }),
            }
            busy = true;
        }
        while let Poll::Ready(Some((id, answer))) = self.calls.poll_next_unpin(cx) {
            self.answer(id, answer);
            busy = true;
        }
        let mut i = 0;
        while i < self.forwarded.len() {
            let id = self.forwarded[i];
            let resp = match self.streams.get_mut(&id) {
                Some(Stream {
                    out: Out::Forwarded(fut),
                    ..
                }) => match fut.as_mut().poll(cx) {
                    Poll::Pending => None,
                    Poll::Ready(resp) => Some(Some(resp)),
                },
                _ => Some(None), // gone: reset, or the connection failed it
            };
            match resp {
                None => {
                    self.grant_consumed(id, cx);
                    i += 1;
                }
                Some(resp) => {
                    self.forwarded.swap_remove(i);
                    if let Some(resp) = resp {
                        self.respond(id, resp);
                    }
                    busy = true;
                }
            }
        }
        let mut i = 0;
        while i < self.bodies.len() && self.wbuf.len() - self.wpos < WRITE_HIGH_WATER {
            let id = self.bodies[i];
            self.grant_consumed(id, cx);
            match self.poll_body(id, cx) {
                Poll::Pending => i += 1,
                Poll::Ready(()) => {
                    self.bodies.swap_remove(i);
                    busy = true;
                }
            }
        }
        busy
    }

    /// Gives a forwarded request's window back as the side thread consumes its body.
    fn grant_consumed(&mut self, id: u32, cx: &mut Context<'_>) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Recv::Side(_, flow, granted) = &mut stream.recv else {
            return;
        };
        flow.waker.register(cx.waker());
        let consumed = flow.consumed.load(std::sync::atomic::Ordering::Relaxed);
        let owed = consumed - *granted;
        if owed >= (STREAM_WINDOW / 4) as usize || (owed > 0 && stream.recv_window < 16_384) {
            *granted = consumed;
            stream.recv_window += owed as i64;
            frame::put_window_update(&mut self.wbuf, id, owed as u32);
        }
    }

    fn answer(&mut self, id: u32, answer: Result<Answer, Status>) {
        match self.streams.get(&id) {
            None => return, // gone with the connection's error
            Some(s) if s.reset => return self.drop_stream(id),
            Some(_) => {}
        }
        let answer = match answer {
            Ok(answer) => answer,
            Err(status) => return self.write_status(id, status),
        };
        let len = answer.framed_len();
        let held = self.reply_bytes();
        let core_held = self.svc.core_reply_bytes().map_or(0, |c| c.get());
        if held + len > self.limits.conn_reply_bytes
            || core_held + len > self.limits.core_reply_bytes
        {
            // A client that does not read its replies holds no more of them.
            self.svc.count(Event::ReplyRefused);
            return self.write_status(
                id,
                Status::resource_exhausted(format!(
                    "reply of {len} bytes refused: {held} bytes of replies on this connection \
                     (node: {core_held} on this core) wait for the client to read them"
                )),
            );
        }
        self.encoder
            .response_head(&mut self.wbuf, id, http::StatusCode::OK, None, false);
        let stream = self.streams.get_mut(&id).expect("checked above");
        if len as i64 <= self.conn_send_window.min(stream.send_window) && len <= self.peer_max_frame
        {
            // The usual case: the reply goes straight into the write buffer.
            self.conn_send_window -= len as i64;
            stream.send_window -= len as i64;
            frame::put_header(&mut self.wbuf, len, frame::DATA, 0, id);
            answer.encode_framed(&mut self.wbuf);
            self.write_ok_trailers(id);
            return;
        }
        let mut data = Vec::with_capacity(len);
        answer.encode_framed(&mut data);
        self.sending_bytes += data.len();
        stream.out = Out::Sending {
            data: data.into(),
            then: Then::OkTrailers,
        };
        self.push(id);
    }

    fn respond(&mut self, id: u32, resp: http::Response<Body>) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let (parts, body) = resp.into_parts();
        let end = http_body::Body::is_end_stream(&body);
        self.encoder
            .response_head(&mut self.wbuf, id, parts.status, Some(&parts.headers), end);
        if end {
            stream.out = Out::Done;
            self.close_if_done(id);
        } else {
            stream.out = Out::Body(body);
            self.bodies.push(id);
        }
    }

    /// Ready once the body is done with (ended, failed, or its stream gone); Pending while
    /// it waits for the body or for window.
    fn poll_body(&mut self, id: u32, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(stream) = self.streams.get_mut(&id) else {
                return Poll::Ready(());
            };
            let Out::Body(body) = &mut stream.out else {
                return Poll::Pending; // a frame of it waits for window: push() puts it back
            };
            let frame = match http_body::Body::poll_frame(Pin::new(body), cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    stream.out = Out::Done;
                    frame::put_header(&mut self.wbuf, 0, frame::DATA, frame::END_STREAM, id);
                    self.close_if_done(id);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(_))) => {
                    self.stream_error(id, code::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
            };
            let Out::Body(body) = std::mem::replace(&mut stream.out, Out::Done) else {
                unreachable!("matched above")
            };
            match frame.into_data() {
                Ok(data) => {
                    self.sending_bytes += data.len();
                    stream.out = Out::Sending {
                        data,
                        then: Then::Body(body),
                    };
                    self.push(id);
                }
                Err(frame) => {
                    stream.out = Out::Sending {
                        data: Bytes::new(),
                        then: Then::Trailers(frame.into_trailers().unwrap_or_default()),
                    };
                    self.push(id);
                    return Poll::Ready(());
                }
            }
        }
    }

    /// Sends what stream `id` has to send, as far as the windows allow.
    fn push(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Out::Sending { data, .. } = &mut stream.out else {
            return;
        };
        while !data.is_empty() {
            let n = data
                .len()
                .min(self.peer_max_frame)
                .min(self.conn_send_window.max(0) as usize)
                .min(stream.send_window.max(0) as usize);
            if n == 0 {
                if !stream.blocked {
                    stream.blocked = true;
                    self.blocked.push(id);
                }
                return;
            }
            frame::put_header(&mut self.wbuf, n, frame::DATA, 0, id);
            self.wbuf.extend_from_slice(&data[..n]);
            bytes::Buf::advance(data, n);
            self.sending_bytes -= n;
            self.conn_send_window -= n as i64;
            stream.send_window -= n as i64;
        }
        let Out::Sending { then, .. } = std::mem::replace(&mut stream.out, Out::Done) else {
            unreachable!("matched above")
        };
        match then {
            Then::OkTrailers => self.write_ok_trailers(id),
            Then::Trailers(trailers) => {
                self.encoder.trailers(&mut self.wbuf, id, &trailers);
                self.close_if_done(id);
            }
            Then::Body(body) => stream.out = Out::Body(body),
        }
    }

    fn write_ok_trailers(&mut self, id: u32) {
        self.encoder.ok_trailers(&mut self.wbuf, id);
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.out = Out::Done;
        }
        self.close_if_done(id);
    }

    /// A trailers-only response: the status in the one HEADERS frame, which ends the stream.
    fn write_status(&mut self, id: u32, status: Status) {
        let mut fields = http::HeaderMap::with_capacity(3);
        fields.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        if status.add_header(&mut fields).is_err() {
            fields.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        self.encoder.response_head(
            &mut self.wbuf,
            id,
            http::StatusCode::OK,
            Some(&fields),
            true,
        );
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.out = Out::Done;
        }
        self.close_if_done(id);
    }

    fn close_if_done(&mut self, id: u32) {
        if let Entry::Occupied(e) = self.streams.entry(id) {
            if matches!(e.get().recv, Recv::Closed) && matches!(e.get().out, Out::Done) {
                e.remove();
            }
        }
    }

    /// Our RST_STREAM on `id` (the stream itself is the caller's to drop or keep).
    fn reset(&mut self, id: u32, error: u32) {
        self.reset_ids[self.reset_pos] = id;
        self.reset_pos = (self.reset_pos + 1) % RECENTLY_RESET;
        frame::put_reset(&mut self.wbuf, id, error);
    }

    /// GOAWAY: for a graceful shutdown (NO_ERROR) the streams already opened finish; after
    /// an error the connection closes once the frame is written.
    fn go_away(&mut self, error: u32) {
        let failed = error != code::NO_ERROR;
        if failed {
            self.svc.count(Event::ProtocolError);
        }
        self.send_go_away(error, failed);
    }

    /// GOAWAY `error`, then close as soon as it is written, whatever is under way (idle
    /// connections, and clients told to calm down).
    fn close_with(&mut self, error: u32) {
        self.send_go_away(error, true);
    }

    fn send_go_away(&mut self, error: u32, close: bool) {
        match self.going_away {
            Some((_, true)) => return,
            Some((_, false)) if !close => return,
            _ => {}
        }
        self.going_away = Some((self.last_id, close));
        frame::put_header(&mut self.wbuf, 8, frame::GOAWAY, 0, 0);
        self.wbuf.extend_from_slice(&self.last_id.to_be_bytes());
        self.wbuf.extend_from_slice(&error.to_be_bytes());
        if close {
            tracing::debug!(error, "HTTP/2 connection closing");
        }
    }
}

/// Bits of `Head::pseudo`: which request pseudo-header fields were present.
const PSEUDO_METHOD: u8 = 1;
const PSEUDO_PATH: u8 = 2;
const PSEUDO_SCHEME: u8 = 4;
const PSEUDO_AUTHORITY: u8 = 8;
/// What every request other than CONNECT carries (RFC 9113, 8.3.1); we serve no CONNECT.
const PSEUDO_REQUIRED: u8 = PSEUDO_METHOD | PSEUDO_PATH | PSEUDO_SCHEME;

/// A field name as RFC 9113 8.2.1 allows it: lowercase token characters only.
fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.iter().all(|&b| {
            matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'!' | b'#' | b'$'
                | b'%' | b'&' | b'\'' | b'*' | b'+' | b'^' | b'`' | b'|' | b'~')
        })
}

/// A field value without NUL, CR or LF, nor white space at either end (RFC 9113, 8.2.1).
fn valid_value(value: &[u8]) -> bool {
    !value.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n')
        && !matches!(value.first(), Some(b' ' | b'\t'))
        && !matches!(value.last(), Some(b' ' | b'\t'))
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

/// HPACK encoding of our replies' header blocks, one frame each.
struct Encoder(hpack::Encoder);

impl Default for Encoder {
    fn default() -> Self {
        Encoder(hpack::Encoder::new(&RECURRING))
    }
}

impl Encoder {
    /// The peer's SETTINGS_HEADER_TABLE_SIZE.
    fn table_size(&mut self, size: usize) {
        self.0.table_size(size);
    }

    /// A HEADERS frame with `:status` and `fields` (`content-type: application/grpc` alone
    /// when None).
    fn response_head(
        &mut self,
        buf: &mut Vec<u8>,
        id: u32,
        status: http::StatusCode,
        fields: Option<&http::HeaderMap>,
        end: bool,
    ) {
        let at = self.0.open(buf);
        if status == http::StatusCode::OK {
            self.0.indexed(buf, 8); // ":status: 200"
        } else {
            self.0.static_name(buf, 8, status.as_str().as_bytes());
        }
        match fields {
            None => self.0.field(buf, CONTENT_TYPE.0, CONTENT_TYPE.1),
            Some(fields) => {
                for (name, value) in fields {
                    self.0
                        .field(buf, name.as_str().as_bytes(), value.as_bytes());
                }
            }
        }
        let flags = if end { frame::END_STREAM } else { 0 };
        close(buf, at, id, flags);
    }

    fn ok_trailers(&mut self, buf: &mut Vec<u8>, id: u32) {
        let at = self.0.open(buf);
        self.0.field(buf, STATUS_OK.0, STATUS_OK.1);
        close(buf, at, id, frame::END_STREAM);
    }

    fn trailers(&mut self, buf: &mut Vec<u8>, id: u32, fields: &http::HeaderMap) {
        let at = self.0.open(buf);
        for (name, value) in fields {
            self.0
                .field(buf, name.as_str().as_bytes(), value.as_bytes());
        }
        close(buf, at, id, frame::END_STREAM);
    }
}

/// Ends the HEADERS frame begun at `at` (CONTINUATION frames if the peer's frames are small).
fn close(buf: &mut Vec<u8>, at: usize, id: u32, flags: u8) {
    hpack::Encoder::close(buf, at, id, flags, frame::DEFAULT_MAX_FRAME);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
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
        proto: Proto<Fake>,
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
                proto: Proto::new(fake.clone()),
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
                let room = self.proto.room();
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
            let out = self.proto.output().to_vec();
            self.proto.sent(out.len());
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
        assert!(peer.proto.streams.is_empty(), "both streams closed");
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
            let mut proto = Proto::new(Fake::default());
            let room = proto.room();
            room[..bad.len()].copy_from_slice(&bad);
            proto.received(bad.len(), Instant::now());
            assert_eq!(proto.finished(), Some(Ended::Closed));
            assert!(!proto.wants_input());
            let out = proto.output();
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
        peer.proto.go_away(code::NO_ERROR);
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
        assert!(peer.proto.streams.is_empty());
    }

    #[test]
    fn a_flood_of_resets_or_pings_is_told_to_calm_down() {
        let limit = Limits::default().resets_per_sec;
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
        for _ in 0..=Limits::default().control_frames_per_sec {
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
        assert!(peer.proto.streams.is_empty());
    }

    mod fuzz {
        //! Arbitrary frame sequences against the connection (a coverage-guided fuzzer needs a
        //! nightly toolchain; these run on stable). A fixed budget in CI; for long runs:
        //! `PROPTEST_CASES=100000 cargo test --release --lib http2::tests::fuzz`.
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

        fn check_bounds(proto: &Proto<Fake>) -> Result<(), TestCaseError> {
            prop_assert!(
                proto.streams.len() <= MAX_STREAMS,
                "{} streams",
                proto.streams.len()
            );
            prop_assert!(proto.forwarded.len() <= MAX_FORWARDED);
            let bound = proto.limits.conn_reply_bytes + WRITE_HIGH_WATER + 4 * MAX_FRAME;
            prop_assert!(
                proto.reply_bytes() <= bound,
                "{} reply bytes held",
                proto.reply_bytes()
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
                let mut proto = Proto::new(fake.clone());
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
                    while !input.is_empty() && proto.wants_input() && proto.finished().is_none() {
                        let room = proto.room();
                        let n = room.len().min(input.len());
                        room[..n].copy_from_slice(&input[..n]);
                        input.drain(..n);
                        proto.received(n, Instant::now());
                    }
                    proto.poll_work(cx);
                    if reading {
                        let n = proto.output().len();
                        proto.sent(n);
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
                    let n = proto.output().len();
                    proto.sent(n);
                }
                check_bounds(&proto)?;
                if proto.finished().is_none() {
                    prop_assert!(!proto.working() || !proto.calls.is_empty() || !proto.bodies.is_empty(),
                        "fresh calls or forwarded requests left unpolled");
                    for (id, stream) in &proto.streams {
                        let waits_for_client = !matches!(stream.recv, Recv::Closed)
                            || matches!(stream.out, Out::Sending { .. })
                            || stream.blocked;
                        prop_assert!(waits_for_client || !stream.reset,
                            "stream {} reset and never dropped", id);
                        prop_assert!(!(matches!(stream.recv, Recv::Closed) && matches!(stream.out, Out::Done)),
                            "stream {} ended both ways and still held", id);
                    }
                }
            }
        }
    }
}
