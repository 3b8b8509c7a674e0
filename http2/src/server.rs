//! The server side: a connection as a state machine with no I/O of its own ([`Connection`]:
//! bytes in, [`Event`]s out, replies written into its output buffer), and [`serve`], its
//! driver on a glommio executor, which runs an [`App`] over one TCP connection.
//!
//! What it implements of RFC 9113: the preface and SETTINGS, HEADERS with CONTINUATION and
//! padding, DATA, flow control both ways (a stream's receive window comes back as its consumer
//! takes what arrived; the peer's windows are respected for every DATA frame sent), RST_STREAM,
//! PING, GOAWAY (graceful, and on a protocol error), stream limits, and the rules of 8.2 and
//! 8.3 on request fields. No server push, no priorities (both optional; PRIORITY frames are
//! validated and ignored).
//!
//! Every resource a client can make a connection hold is bounded: streams (one the client
//! reset counts until its consumer lets go of it), resets and control frames per second
//! ([`Limits`]), header lists, reply bytes waiting in the output (reading stops above a high
//! water mark), and time (handshake and idle timeouts, in the driver). Each bound answers as
//! RFC 9113 and the major servers do and is counted ([`Bound`]).

use crate::{
    frame::{self, code},
    hpack,
};
use bytes::Bytes;
use std::{
    collections::{hash_map::Entry, HashMap},
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

/// The largest frame we accept: the protocol's default, which we never raise.
pub const MAX_FRAME: usize = frame::DEFAULT_MAX_FRAME;
/// Holds a whole frame of MAX_FRAME and then some, so a read never waits for room.
const RECV_BUFFER: usize = 64 * 1024;
/// Each stream's receive window.
pub const STREAM_WINDOW: u32 = 1 << 20;
/// The connection's receive window, shared by its streams.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Concurrent streams per connection, as many as hyper allows by default.
pub const MAX_STREAMS: usize = 200;
/// Largest request header block, compressed or decoded (names, values, 32 bytes per field).
pub const MAX_HEADER_LIST: usize = 64 * 1024;
/// Output waiting for the socket beyond which no more requests are read.
pub const WRITE_HIGH_WATER: usize = 256 * 1024;
/// Entries one SETTINGS frame may carry: RFC 9113 defines seven settings, and nghttp2 refuses
/// frames of more than 32 entries for the same reason (each may touch every open stream).
const MAX_SETTINGS_ENTRIES: usize = 32;
/// Streams we reset whose ids are remembered, so that frames the client sent before it saw
/// the reset are ignored rather than taken for a reuse of a closed stream id.
const RECENTLY_RESET: usize = 64;

/// A connection's bounds that a user may need to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time to receive the client's preface after accepting the connection.
    pub handshake_timeout: Duration,
    /// Time without a byte read or written and with nothing under way before GOAWAY.
    pub idle_timeout: Duration,
    /// RST_STREAM frames a client may send per second (and at once) before GOAWAY
    /// ENHANCE_YOUR_CALM: the Rapid Reset attack (CVE-2023-44487) is many of them.
    pub resets_per_sec: u32,
    /// SETTINGS and PING frames per second (and at once), each of which costs us an answer.
    pub control_frames_per_sec: u32,
}

impl Default for Limits {
    /// nginx's and h2o's defaults for the timeouts.
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(180),
            resets_per_sec: 1000,
            control_frames_per_sec: 1000,
        }
    }
}

/// A bound a client ran into, counted by the connection for its owner's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// GOAWAY ENHANCE_YOUR_CALM for too many RST_STREAM frames.
    ResetFlood,
    /// GOAWAY ENHANCE_YOUR_CALM for too many SETTINGS/PING frames, an oversized SETTINGS or
    /// an endless header block.
    ControlFlood,
    /// A stream refused over MAX_CONCURRENT_STREAMS.
    StreamRefused,
    /// Closed for not sending its preface within the handshake timeout.
    HandshakeTimeout,
    /// GOAWAY after the idle timeout.
    IdleTimeout,
    /// A connection error answered with GOAWAY (protocol, flow control, compression).
    ProtocolError,
}

impl Bound {
    pub const ALL: [Bound; 6] = [
        Bound::ResetFlood,
        Bound::ControlFlood,
        Bound::StreamRefused,
        Bound::HandshakeTimeout,
        Bound::IdleTimeout,
        Bound::ProtocolError,
    ];
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

/// What the connection hands its owner.
pub enum Event<'a, T> {
    /// A new request's header block. Its stream now exists with `T::default()` as its
    /// state; the owner answers it, or resets it.
    Request { id: u32, head: &'a Head, end: bool },
    /// Request body bytes (empty when only END_STREAM came, or trailers, which are not
    /// read). Unless the owner asked for [`Connection::consume_manually`], they count as
    /// consumed at once and the window comes back.
    Data {
        id: u32,
        data: &'a [u8],
        end: bool,
        state: &'a mut T,
    },
    /// The client reset the stream. Nothing more is sent on it; it still counts against
    /// MAX_CONCURRENT_STREAMS until the owner calls [`Connection::forget`], which it does once
    /// the work it started for the stream has ended.
    Reset { id: u32, state: &'a mut T },
}

/// A request's header block, decoded and checked (RFC 9113, 8.2 and 8.3): valid names and
/// values, the pseudo-header fields each once and before the others, no connection-specific
/// field. Reused from request to request: reading it allocates nothing once warm.
#[derive(Default)]
pub struct Head {
    /// Names and values of every field, one after another.
    bytes: Vec<u8>,
    /// Regular fields: (name start, name end, value end) in `bytes`.
    fields: Vec<(u32, u32, u32)>,
    method: (u32, u32),
    path: (u32, u32),
    authority: Option<(u32, u32)>,
    /// Bytes of the decoded list, as MAX_HEADER_LIST counts them.
    size: usize,
    malformed: bool,
    /// PSEUDO_* bits of the pseudo-header fields present.
    pseudo: u8,
    content_length: Option<u64>,
}

/// Bits of `Head::pseudo`: which request pseudo-header fields were present.
const PSEUDO_METHOD: u8 = 1;
const PSEUDO_PATH: u8 = 2;
const PSEUDO_SCHEME: u8 = 4;
const PSEUDO_AUTHORITY: u8 = 8;
/// What every request other than CONNECT carries (RFC 9113, 8.3.1); we serve no CONNECT.
const PSEUDO_REQUIRED: u8 = PSEUDO_METHOD | PSEUDO_PATH | PSEUDO_SCHEME;

impl Head {
    fn clear(&mut self) {
        self.bytes.clear();
        self.fields.clear();
        self.method = (0, 0);
        self.path = (0, 0);
        self.authority = None;
        self.size = 0;
        self.malformed = false;
        self.pseudo = 0;
        self.content_length = None;
    }

    fn at(&self, (start, end): (u32, u32)) -> &[u8] {
        &self.bytes[start as usize..end as usize]
    }

    /// `:method`.
    pub fn method(&self) -> &[u8] {
        self.at(self.method)
    }

    /// `:path`.
    pub fn path(&self) -> &[u8] {
        self.at(self.path)
    }

    /// `:authority`.
    pub fn authority(&self) -> Option<&[u8]> {
        self.authority.map(|a| self.at(a))
    }

    /// The regular fields, in their order.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|&(name, value, end)| {
            (
                &self.bytes[name as usize..value as usize],
                &self.bytes[value as usize..end as usize],
            )
        })
    }

    /// Whether the block decoded to more than MAX_HEADER_LIST: the fields past it are
    /// missing, and the request is best answered with an error.
    pub fn oversized(&self) -> bool {
        self.size > MAX_HEADER_LIST
    }

    /// One decoded field; `checked` is the verdict of `valid_field` when the decoder knows
    /// it. Returns that verdict.
    fn add(
        &mut self,
        name: &[u8],
        value: &[u8],
        checked: Option<bool>,
        regular_seen: &mut bool,
    ) -> bool {
        let valid = checked.unwrap_or_else(|| valid_field(name, value));
        self.malformed |= !valid;
        self.size += name.len() + value.len() + 32;
        if self.size > MAX_HEADER_LIST {
            return valid;
        }
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(name);
        let mid = self.bytes.len() as u32;
        self.bytes.extend_from_slice(value);
        let end = self.bytes.len() as u32;
        if name.first() == Some(&b':') {
            self.malformed |= *regular_seen;
            let seen = match name {
                b":method" => {
                    self.malformed |= !valid_token(value);
                    self.method = (mid, end);
                    PSEUDO_METHOD
                }
                b":path" => {
                    self.malformed |= value.is_empty();
                    self.path = (mid, end);
                    PSEUDO_PATH
                }
                b":authority" => {
                    self.authority = Some((mid, end));
                    PSEUDO_AUTHORITY
                }
                b":scheme" => PSEUDO_SCHEME,
                _ => {
                    self.malformed = true;
                    0
                }
            };
            // Each at most once.
            self.malformed |= self.pseudo & seen != 0;
            self.pseudo |= seen;
            return valid;
        }
        *regular_seen = true;
        match name {
            // Connection-specific fields have no place in HTTP/2 (RFC 9113, 8.2.2).
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => self.malformed = true,
            b"te" => self.malformed |= value != b"trailers",
            b"content-length" => match std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                Some(n) if self.content_length.is_none_or(|m| m == n) => {
                    self.content_length = Some(n)
                }
                _ => self.malformed = true,
            },
            _ => {}
        }
        self.fields.push((start, mid, end));
        valid
    }
}

/// Bits of `CHARS`: what a byte may be.
const TCHAR: u8 = 1;
const LOWER_TCHAR: u8 = 2;
const NOT_IN_VALUE: u8 = 4;

/// Byte classes, one load per byte.
static CHARS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let tchar = matches!(c, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.'
            | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'^' | b'`' | b'|' | b'~');
        if tchar {
            t[b] |= TCHAR;
            if !c.is_ascii_uppercase() {
                t[b] |= LOWER_TCHAR;
            }
        }
        if matches!(c, 0 | b'\r' | b'\n') {
            t[b] |= NOT_IN_VALUE;
        }
        b += 1;
    }
    t
};

/// A field as RFC 9113 8.2.1 allows it: a name of lowercase token characters (after the
/// colon of a pseudo-header field), a value without NUL, CR or LF, nor white space at either
/// end.
fn valid_field(name: &[u8], value: &[u8]) -> bool {
    let name = name.strip_prefix(b":").unwrap_or(name);
    !name.is_empty()
        && name.iter().all(|&b| CHARS[b as usize] & LOWER_TCHAR != 0)
        && value.iter().all(|&b| CHARS[b as usize] & NOT_IN_VALUE == 0)
        && !matches!(value.first(), Some(b' ' | b'\t'))
        && !matches!(value.last(), Some(b' ' | b'\t'))
}

/// A method: token characters (RFC 9110, 9.1).
fn valid_token(value: &[u8]) -> bool {
    !value.is_empty() && value.iter().all(|&b| CHARS[b as usize] & TCHAR != 0)
}

/// One stream's protocol state, and its owner's.
struct Stream<T> {
    state: T,
    /// END_STREAM not received yet.
    recv_open: bool,
    /// Request bytes consumed since the window was last replenished.
    recv_unacked: u32,
    /// What the client may still send on it: more is a FLOW_CONTROL_ERROR.
    recv_window: i64,
    /// The owner returns the window itself, as it consumes ([`Connection::release`]).
    manual_credit: bool,
    send_window: i64,
    send: Send,
    /// In `Connection::blocked`, waiting for window.
    blocked: bool,
    /// Reset by the client: nothing is sent on it, and it stays until the owner forgets it.
    reset: bool,
    /// The request's content-length, checked against its DATA at END_STREAM.
    content_length: Option<u64>,
    body_bytes: u64,
}

/// What a stream has to send.
enum Send {
    /// Nothing waiting; the reply goes on.
    Open,
    /// `data` waiting for window, then `then`.
    Queued { data: Bytes, then: Then },
    /// END_STREAM sent.
    Done,
}

enum Then {
    /// More may follow.
    More,
    /// An empty DATA frame with END_STREAM.
    End,
    /// Trailers, which end the stream.
    Trailers(Vec<(Vec<u8>, Vec<u8>)>),
}

/// What a frame came to, for the owner.
enum Found {
    Nothing,
    Request {
        id: u32,
        end: bool,
    },
    /// Data of stream `id` at `range` of the receive buffer (empty when not in it).
    Data {
        id: u32,
        range: (usize, usize),
        end: bool,
    },
    Reset {
        id: u32,
    },
}

/// A server connection's protocol state, apart from its socket: bytes in, events out, replies
/// into the output buffer. `T` is what the owner keeps per stream.
pub struct Connection<T> {
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    preface: bool,
    decoder: hpack::Decoder,
    encoder: hpack::Encoder,
    head: Head,
    streams: HashMap<u32, Stream<T>, BuildId>,
    /// The highest stream id the peer opened.
    last_id: u32,
    /// A header block waiting for its CONTINUATION frames: stream, HEADERS flags, block.
    continuation: Option<(u32, u8, Vec<u8>)>,
    conn_send_window: i64,
    peer_initial_window: i64,
    peer_max_frame: usize,
    conn_recv_unacked: u32,
    /// What the client may still send on the connection.
    conn_recv_window: i64,
    /// Streams with output waiting for window.
    blocked: Vec<u32>,
    /// GOAWAY sent: the last stream id it let through, and whether to close at once.
    going_away: Option<(u32, bool)>,
    limits: Limits,
    resets: Bucket,
    control: Bucket,
    /// Ids of streams we reset, newest last (a ring).
    reset_ids: [u32; RECENTLY_RESET],
    reset_pos: usize,
    /// Bytes waiting in streams' queues for window.
    queued_bytes: usize,
    /// Bounds met since the owner last took them, by `Bound::ALL`'s order.
    bounds: [u32; Bound::ALL.len()],
    bounds_met: bool,
    /// A stream whose last DATA the owner is reading, closed at the next call if its reply
    /// is all sent.
    closing: Option<u32>,
}

/// Stream ids are the peer's, odd and increasing: hashing them with a keyed hash buys
/// nothing over this multiplicative one.
#[derive(Default, Clone, Copy)]
pub struct BuildId;

impl std::hash::BuildHasher for BuildId {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl<T: Default> Connection<T> {
    /// A connection that has read nothing yet. `recurring` names the reply fields worth the
    /// peer's dynamic table (see [`hpack::Encoder::new`]).
    pub fn new(limits: Limits, recurring: &'static [(&'static [u8], &'static [u8])]) -> Self {
        let now = Instant::now();
        Connection {
            rbuf: vec![0; RECV_BUFFER],
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(16 * 1024),
            wpos: 0,
            preface: false,
            decoder: hpack::Decoder::new(4096),
            encoder: hpack::Encoder::new(recurring),
            head: Head::default(),
            streams: HashMap::default(),
            last_id: 0,
            continuation: None,
            conn_send_window: frame::DEFAULT_WINDOW,
            peer_initial_window: frame::DEFAULT_WINDOW,
            peer_max_frame: MAX_FRAME,
            conn_recv_unacked: 0,
            conn_recv_window: frame::DEFAULT_WINDOW,
            blocked: Vec::new(),
            going_away: None,
            limits,
            resets: Bucket::new(limits.resets_per_sec, now),
            control: Bucket::new(limits.control_frames_per_sec, now),
            reset_ids: [0; RECENTLY_RESET],
            reset_pos: 0,
            queued_bytes: 0,
            bounds: [0; Bound::ALL.len()],
            bounds_met: false,
            closing: None,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether the client's preface has arrived.
    pub fn preface_received(&self) -> bool {
        self.preface
    }

    /// Open streams, those reset by the client and not yet forgotten included.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// The owner's state of stream `id`, while it is open.
    pub fn state(&mut self, id: u32) -> Option<&mut T> {
        self.streams.get_mut(&id).map(|s| &mut s.state)
    }

    /// Every open stream's state, for the owner's checks.
    pub fn states(&self) -> impl Iterator<Item = (u32, &T)> {
        self.streams.iter().map(|(id, s)| (*id, &s.state))
    }

    /// Whether stream `id` is open and was not reset by the client.
    pub fn is_live(&self, id: u32) -> bool {
        self.streams.get(&id).is_some_and(|s| !s.reset)
    }

    /// Whether stream `id` waits for its client: for more of its request, or for window.
    pub fn waits_on_peer(&self, id: u32) -> bool {
        self.streams
            .get(&id)
            .is_some_and(|s| s.recv_open || matches!(s.send, Send::Queued { .. }))
    }

    /// Whether stream `id` has data waiting for window (its owner holds back what follows).
    pub fn is_queued(&self, id: u32) -> bool {
        self.streams
            .get(&id)
            .is_some_and(|s| matches!(s.send, Send::Queued { .. }))
    }

    /// Bytes this connection holds for its client: written and not yet sent, or queued for
    /// window.
    pub fn reply_bytes(&self) -> usize {
        self.wbuf.len() - self.wpos + self.queued_bytes
    }

    /// Whether to read more: not after an error's GOAWAY, nor while the client leaves too
    /// much of our output unread.
    pub fn wants_input(&self) -> bool {
        !matches!(self.going_away, Some((_, true)))
            && self.wbuf.len() - self.wpos < WRITE_HIGH_WATER
    }

    /// Whether a GOAWAY was sent.
    pub fn going_away(&self) -> bool {
        self.going_away.is_some()
    }

    /// Free space to read into.
    pub fn room(&mut self) -> &mut [u8] {
        if self.rend == self.rbuf.len() {
            // Only part of a frame is left (parsing took every whole one): move it to the front.
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        &mut self.rbuf[self.rend..]
    }

    /// `n` more bytes arrived in `room()`: [`Connection::next_event`] reads them.
    pub fn received(&mut self, n: usize) {
        self.rend += n;
    }

    /// What is to be sent.
    pub fn output(&self) -> &[u8] {
        &self.wbuf[self.wpos..]
    }

    /// `n` bytes of `output()` were sent.
    pub fn sent(&mut self, n: usize) {
        self.wpos += n;
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
    }

    /// True once nothing is left to do but close: after an error's GOAWAY, or after a
    /// graceful one once every stream it let through has ended. `gracefully` tells which.
    pub fn finished(&self) -> Option<bool> {
        match self.going_away {
            Some((_, true)) => Some(false),
            Some((_, false)) if self.streams.is_empty() => Some(true),
            _ => None,
        }
    }

    /// The bounds met since the last call, if any (by `Bound::ALL`'s order).
    pub fn take_bounds(&mut self) -> Option<[u32; Bound::ALL.len()]> {
        if !self.bounds_met {
            return None;
        }
        self.bounds_met = false;
        Some(std::mem::take(&mut self.bounds))
    }

    fn count(&mut self, bound: Bound) {
        let i = Bound::ALL.iter().position(|b| *b == bound).unwrap_or(0);
        self.bounds[i] += 1;
        self.bounds_met = true;
    }

    /// The next event in what arrived, handling every frame that is the connection's own
    /// business (SETTINGS, PING, WINDOW_UPDATE, ...) on the way. None once the whole frames
    /// received are read.
    pub fn next_event(&mut self, now: Instant) -> Option<Event<'_, T>> {
        if let Some(id) = self.closing.take() {
            self.close_if_done(id);
        }
        loop {
            if matches!(self.going_away, Some((_, true))) {
                return None;
            }
            if !self.preface {
                if self.rend - self.rstart < frame::PREFACE.len() {
                    return None;
                }
                if &self.rbuf[self.rstart..self.rstart + frame::PREFACE.len()] != frame::PREFACE {
                    self.go_away(code::PROTOCOL_ERROR);
                    return None;
                }
                self.rstart += frame::PREFACE.len();
                self.preface = true;
                self.greet();
            }
            let h = frame::Header::parse(&self.rbuf[self.rstart..self.rend])?;
            if h.len > MAX_FRAME {
                self.go_away(code::FRAME_SIZE_ERROR);
                return None;
            }
            if self.rend - self.rstart < frame::HEADER_LEN + h.len {
                return None;
            }
            let start = self.rstart + frame::HEADER_LEN;
            self.rstart = start + h.len;
            let rbuf = std::mem::take(&mut self.rbuf);
            let found = self.frame(h, &rbuf, start, now);
            self.rbuf = rbuf;
            if self.rstart == self.rend {
                self.rstart = 0;
                self.rend = 0;
            }
            match found {
                Found::Nothing => {}
                Found::Request { id, end } => {
                    return Some(Event::Request {
                        id,
                        head: &self.head,
                        end,
                    })
                }
                Found::Data {
                    id,
                    range: (from, to),
                    end,
                } => {
                    // data() found the stream and kept it.
                    let stream = self.streams.get_mut(&id)?;
                    if end && matches!(stream.send, Send::Done) {
                        // Its reply is all sent: the stream ends once the owner has read this.
                        self.closing = Some(id);
                    }
                    return Some(Event::Data {
                        id,
                        data: &self.rbuf[from..to],
                        end,
                        state: &mut stream.state,
                    });
                }
                Found::Reset { id } => {
                    let stream = self.streams.get_mut(&id)?;
                    return Some(Event::Reset {
                        id,
                        state: &mut stream.state,
                    });
                }
            }
        }
    }

    /// Our SETTINGS, and the connection window raised from the protocol's 64 KiB.
    fn greet(&mut self) {
        frame::put_settings(
            &mut self.wbuf,
            false,
            &[
                (frame::setting::MAX_CONCURRENT_STREAMS, MAX_STREAMS as u32),
                (frame::setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (frame::setting::MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST as u32),
            ],
        );
        frame::put_window_update(
            &mut self.wbuf,
            0,
            CONNECTION_WINDOW - frame::DEFAULT_WINDOW as u32,
        );
        self.conn_recv_window = CONNECTION_WINDOW as i64;
    }

    /// One frame whose payload is `rbuf[start..start + h.len]`.
    fn frame(&mut self, h: frame::Header, rbuf: &[u8], start: usize, now: Instant) -> Found {
        let payload = &rbuf[start..start + h.len];
        let (kind, flags, id) = (h.kind, h.flags, h.id);
        if let Some((cid, _, _)) = &self.continuation {
            if kind != frame::CONTINUATION || id != *cid {
                self.go_away(code::PROTOCOL_ERROR);
                return Found::Nothing;
            }
        }
        match kind {
            frame::DATA => self.data(flags, id, payload, start),
            frame::HEADERS => self.headers(flags, id, payload),
            frame::CONTINUATION => {
                let Some((sid, hflags, mut block)) = self.continuation.take() else {
                    self.go_away(code::PROTOCOL_ERROR);
                    return Found::Nothing;
                };
                if block.len() + payload.len() > MAX_HEADER_LIST {
                    self.calm_down(Bound::ControlFlood);
                    return Found::Nothing;
                }
                block.extend_from_slice(payload);
                if flags & frame::END_HEADERS != 0 {
                    self.header_block(hflags, sid, &block)
                } else {
                    self.continuation = Some((sid, hflags, block));
                    Found::Nothing
                }
            }
            frame::PRIORITY => {
                self.priority(id, payload);
                Found::Nothing
            }
            frame::RST_STREAM => self.peer_reset(id, payload, now),
            frame::SETTINGS => {
                if flags & frame::ACK == 0 && !self.control.take(now) {
                    self.calm_down(Bound::ControlFlood);
                } else {
                    self.settings(flags, id, payload);
                }
                Found::Nothing
            }
            frame::PUSH_PROMISE => {
                self.go_away(code::PROTOCOL_ERROR);
                Found::Nothing
            }
            frame::PING => {
                if id != 0 {
                    self.go_away(code::PROTOCOL_ERROR);
                } else if payload.len() != 8 {
                    self.go_away(code::FRAME_SIZE_ERROR);
                } else if flags & frame::ACK == 0 {
                    if self.control.take(now) {
                        frame::put_header(&mut self.wbuf, 8, frame::PING, frame::ACK, 0);
                        self.wbuf.extend_from_slice(payload);
                    } else {
                        self.calm_down(Bound::ControlFlood);
                    }
                }
                Found::Nothing
            }
            // The peer opens no more streams; those under way finish and it closes.
            frame::GOAWAY => Found::Nothing,
            frame::WINDOW_UPDATE => {
                self.peer_window_update(id, payload);
                Found::Nothing
            }
            _ => Found::Nothing, // unknown frame types are ignored (RFC 9113, 4.1)
        }
    }

    /// PRIORITY is advisory and ignored, but validated (RFC 9113, 6.3 and 5.3.1).
    fn priority(&mut self, id: u32, payload: &[u8]) {
        if id == 0 {
            return self.go_away(code::PROTOCOL_ERROR);
        }
        if payload.len() != 5 {
            return self.reset(id, code::FRAME_SIZE_ERROR);
        }
        let depends_on = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        if depends_on & 0x7fff_ffff == id {
            self.reset(id, code::PROTOCOL_ERROR);
        }
    }

    fn peer_reset(&mut self, id: u32, payload: &[u8], now: Instant) -> Found {
        if id == 0 {
            self.go_away(code::PROTOCOL_ERROR);
            return Found::Nothing;
        }
        if payload.len() != 4 {
            self.go_away(code::FRAME_SIZE_ERROR);
            return Found::Nothing;
        }
        if id > self.last_id {
            // Idle: nothing to reset (RFC 9113, 5.1).
            self.go_away(code::PROTOCOL_ERROR);
            return Found::Nothing;
        }
        if !self.resets.take(now) {
            self.calm_down(Bound::ResetFlood);
            return Found::Nothing;
        }
        let Some(stream) = self.streams.get_mut(&id) else {
            return Found::Nothing;
        };
        if stream.reset {
            return Found::Nothing;
        }
        stream.reset = true;
        stream.recv_open = false;
        if let Send::Queued { data, .. } = &stream.send {
            self.queued_bytes -= data.len();
        }
        stream.send = Send::Done;
        Found::Reset { id }
    }

    /// GOAWAY ENHANCE_YOUR_CALM: the client sends more of something than any client needs.
    fn calm_down(&mut self, why: Bound) {
        self.count(why);
        self.close_with(code::ENHANCE_YOUR_CALM);
    }

    fn data(&mut self, flags: u8, id: u32, payload: &[u8], start: usize) -> Found {
        if id == 0 {
            self.go_away(code::PROTOCOL_ERROR);
            return Found::Nothing;
        }
        // The whole frame counts against the connection window, padding included; the
        // connection's window comes back at once (each stream's bounds what it holds).
        self.conn_recv_window -= payload.len() as i64;
        if self.conn_recv_window < 0 {
            self.go_away(code::FLOW_CONTROL_ERROR);
            return Found::Nothing;
        }
        self.conn_recv_unacked += payload.len() as u32;
        if self.conn_recv_unacked >= CONNECTION_WINDOW / 2 {
            let n = std::mem::take(&mut self.conn_recv_unacked);
            self.conn_recv_window += n as i64;
            frame::put_window_update(&mut self.wbuf, 0, n);
        }
        let Some(data) = frame::unpad(flags, payload) else {
            self.go_away(code::PROTOCOL_ERROR);
            return Found::Nothing;
        };
        let end = flags & frame::END_STREAM != 0;
        let Some(stream) = self.streams.get_mut(&id) else {
            if id > self.last_id {
                self.go_away(code::PROTOCOL_ERROR);
            }
            // Else a stream already answered or reset: frames the peer sent before it knew.
            return Found::Nothing;
        };
        if stream.reset {
            return Found::Nothing;
        }
        if !stream.recv_open {
            self.reset(id, code::STREAM_CLOSED);
            return Found::Nothing;
        }
        stream.recv_window -= payload.len() as i64;
        if stream.recv_window < 0 {
            self.reset(id, code::FLOW_CONTROL_ERROR);
            return Found::Nothing;
        }
        stream.body_bytes += data.len() as u64;
        if end
            && stream
                .content_length
                .is_some_and(|n| n != stream.body_bytes)
        {
            self.reset(id, code::PROTOCOL_ERROR);
            return Found::Nothing;
        }
        // Padding is consumed at once; the data as the owner consumes it.
        let consumed = if stream.manual_credit {
            payload.len() - data.len()
        } else {
            payload.len()
        };
        stream.recv_unacked += consumed as u32;
        if end {
            stream.recv_open = false;
        } else if stream.recv_unacked >= STREAM_WINDOW / 2 {
            let n = std::mem::take(&mut stream.recv_unacked);
            stream.recv_window += n as i64;
            frame::put_window_update(&mut self.wbuf, id, n);
        }
        let from = start + (data.as_ptr() as usize - payload.as_ptr() as usize);
        Found::Data {
            id,
            range: (from, from + data.len()),
            end,
        }
    }

    fn headers(&mut self, flags: u8, id: u32, payload: &[u8]) -> Found {
        if id == 0 || id % 2 == 0 {
            self.go_away(code::PROTOCOL_ERROR);
            return Found::Nothing;
        }
        let Some(mut block) = frame::unpad(flags, payload) else {
            self.go_away(code::PROTOCOL_ERROR);
            return Found::Nothing;
        };
        let mut self_dependent = false;
        if flags & frame::PRIORITY_FLAG != 0 {
            if block.len() < 5 {
                self.go_away(code::PROTOCOL_ERROR);
                return Found::Nothing;
            }
            let depends_on = u32::from_be_bytes([block[0], block[1], block[2], block[3]]);
            self_dependent = depends_on & 0x7fff_ffff == id;
            block = &block[5..];
        }
        if flags & frame::END_HEADERS == 0 {
            self.continuation = Some((id, flags, block.to_vec()));
            return Found::Nothing;
        }
        if self_dependent {
            // A stream cannot depend on itself (RFC 9113, 5.3.1): a stream error, once the
            // block has been read into the decoder's table.
            let found = self.header_block(flags, id, block);
            if let Found::Request { .. } = found {
                self.reset(id, code::PROTOCOL_ERROR);
                return Found::Nothing;
            }
            return found;
        }
        self.header_block(flags, id, block)
    }

    fn header_block(&mut self, flags: u8, id: u32, block: &[u8]) -> Found {
        let end = flags & frame::END_STREAM != 0;
        let head = &mut self.head;
        head.clear();
        let mut regular = false;
        let decoded = self.decoder.decode_checked(block, |name, value, checked| {
            head.add(name, value, checked, &mut regular)
        });
        if decoded.is_err() {
            self.go_away(code::COMPRESSION_ERROR);
            return Found::Nothing;
        }
        if id <= self.last_id {
            return match self.streams.get(&id) {
                // Trailers of a request under way: they end its body and carry nothing we
                // read.
                Some(stream) if !stream.reset && stream.recv_open => {
                    if !end || self.head.pseudo != 0 {
                        self.reset(id, code::PROTOCOL_ERROR);
                        return Found::Nothing;
                    }
                    self.data(frame::END_STREAM, id, &[], 0)
                }
                // Sent before the client saw our RST_STREAM.
                _ if self.reset_ids.contains(&id) => Found::Nothing,
                // A stream id reused, or lower than one already opened (RFC 9113, 5.1.1).
                _ => {
                    self.go_away(code::PROTOCOL_ERROR);
                    Found::Nothing
                }
            };
        }
        self.last_id = id;
        if self.going_away.is_some() {
            return Found::Nothing; // opened after our GOAWAY: never served, may be retried
        }
        if self.streams.len() >= MAX_STREAMS {
            self.count(Bound::StreamRefused);
            self.send_reset(id, code::REFUSED_STREAM);
            return Found::Nothing;
        }
        let head = &self.head;
        if head.malformed
            || head.pseudo & PSEUDO_REQUIRED != PSEUDO_REQUIRED
            || (end && head.content_length.is_some_and(|n| n != 0))
        {
            self.send_reset(id, code::PROTOCOL_ERROR);
            return Found::Nothing;
        }
        self.streams.insert(
            id,
            Stream {
                state: T::default(),
                recv_open: !end,
                recv_unacked: 0,
                recv_window: STREAM_WINDOW as i64,
                manual_credit: false,
                send_window: self.peer_initial_window,
                send: Send::Open,
                blocked: false,
                reset: false,
                content_length: head.content_length,
                body_bytes: 0,
            },
        );
        Found::Request { id, end }
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
            return self.calm_down(Bound::ControlFlood);
        }
        // INITIAL_WINDOW_SIZE touches every open stream: applied once, with its last value.
        let mut initial_window = None;
        for setting in payload.chunks_exact(6) {
            let key = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match key {
                frame::setting::HEADER_TABLE_SIZE => self.encoder.table_size(value as usize),
                frame::setting::ENABLE_PUSH if value > 1 => {
                    return self.go_away(code::PROTOCOL_ERROR)
                }
                frame::setting::INITIAL_WINDOW_SIZE => {
                    if value as i64 > frame::MAX_WINDOW {
                        return self.go_away(code::FLOW_CONTROL_ERROR);
                    }
                    initial_window = Some(value as i64);
                }
                frame::setting::MAX_FRAME_SIZE => {
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
            return self.reset(id, code);
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

    /// Stream `id`'s window comes back as its owner consumes what arrived, by
    /// [`Connection::release`], rather than as it arrives.
    pub fn consume_manually(&mut self, id: u32) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.manual_credit = true;
        }
    }

    /// The owner consumed `n` more bytes of stream `id`'s body: the client may send them
    /// again (in WINDOW_UPDATEs of a quarter window, or sooner when its window runs low).
    pub fn release(&mut self, id: u32, n: usize) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.recv_unacked += n as u32;
        let owed = stream.recv_unacked;
        if stream.recv_open
            && owed > 0
            && (owed >= STREAM_WINDOW / 4 || stream.recv_window < MAX_FRAME as i64)
        {
            stream.recv_unacked = 0;
            stream.recv_window += owed as i64;
            frame::put_window_update(&mut self.wbuf, id, owed);
        }
    }

    /// A HEADERS frame (with CONTINUATIONs if need be) with `:status` and `fields`; `end`
    /// ends the stream with it. Nothing is sent on a stream the client reset.
    pub fn send_headers<'f>(
        &mut self,
        id: u32,
        status: u16,
        fields: impl IntoIterator<Item = (&'f [u8], &'f [u8])>,
        end: bool,
    ) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.reset {
            return;
        }
        if end {
            stream.send = Send::Done;
        }
        let at = self.encoder.open(&mut self.wbuf);
        if status == 200 {
            self.encoder.indexed(&mut self.wbuf, 8); // ":status: 200"
        } else {
            let mut digits = [0u8; 3];
            let s = status.min(999);
            digits[0] = b'0' + (s / 100) as u8;
            digits[1] = b'0' + (s / 10 % 10) as u8;
            digits[2] = b'0' + (s % 10) as u8;
            self.encoder.static_name(&mut self.wbuf, 8, &digits);
        }
        for (name, value) in fields {
            self.encoder.field(&mut self.wbuf, name, value);
        }
        let flags = if end { frame::END_STREAM } else { 0 };
        hpack::Encoder::close(&mut self.wbuf, at, id, flags, self.peer_max_frame);
        if end {
            self.close_if_done(id);
        }
    }

    /// Writes a DATA frame of `len` bytes, filled by `write`, straight into the output when
    /// the windows and the peer's frame size allow it and nothing is queued before it. False
    /// when not (the caller then queues the bytes with [`Connection::send_data`]), or when
    /// the stream is gone or reset (nothing to send).
    pub fn send_data_with(
        &mut self,
        id: u32,
        len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> bool {
        let Some(stream) = self.streams.get_mut(&id) else {
            return false;
        };
        if stream.reset
            || !matches!(stream.send, Send::Open)
            || len > self.peer_max_frame
            || len as i64 > self.conn_send_window.min(stream.send_window)
        {
            return false;
        }
        self.conn_send_window -= len as i64;
        stream.send_window -= len as i64;
        frame::put_header(&mut self.wbuf, len, frame::DATA, 0, id);
        let at = self.wbuf.len();
        write(&mut self.wbuf);
        debug_assert_eq!(self.wbuf.len() - at, len, "send_data_with wrote its length");
        true
    }

    /// Sends `data` on stream `id` as the windows allow; what they do not allow waits (see
    /// [`Connection::is_queued`]).
    pub fn send_data(&mut self, id: u32, data: Bytes) {
        self.queue(id, data, Then::More);
    }

    /// Ends stream `id` with trailers, after whatever data waits for window.
    pub fn send_trailers<'f>(
        &mut self,
        id: u32,
        fields: impl IntoIterator<Item = (&'f [u8], &'f [u8])>,
    ) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        match &mut stream.send {
            Send::Queued { then, .. } => {
                *then = Then::Trailers(
                    fields
                        .into_iter()
                        .map(|(n, v)| (n.to_vec(), v.to_vec()))
                        .collect(),
                );
            }
            Send::Open => {
                stream.send = Send::Done;
                let at = self.encoder.open(&mut self.wbuf);
                for (name, value) in fields {
                    self.encoder.field(&mut self.wbuf, name, value);
                }
                hpack::Encoder::close(
                    &mut self.wbuf,
                    at,
                    id,
                    frame::END_STREAM,
                    self.peer_max_frame,
                );
                self.close_if_done(id);
            }
            Send::Done => {}
        }
    }

    /// Ends stream `id` with an empty DATA frame, after whatever data waits for window.
    pub fn end_stream(&mut self, id: u32) {
        self.queue(id, Bytes::new(), Then::End);
    }

    fn queue(&mut self, id: u32, data: Bytes, next: Then) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        match &mut stream.send {
            Send::Open => {
                self.queued_bytes += data.len();
                stream.send = Send::Queued { data, then: next };
                self.push(id);
            }
            // Only the owner's mistake: more after what ends the stream, or before the window
            // took what was queued (the owner checks `is_queued`).
            Send::Queued { .. } | Send::Done => {
                debug_assert!(false, "data queued on stream {id} out of turn");
            }
        }
    }

    /// Sends what stream `id` has queued, as far as the windows allow.
    fn push(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Send::Queued { data, then } = &mut stream.send else {
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
            self.queued_bytes -= n;
            self.conn_send_window -= n as i64;
            stream.send_window -= n as i64;
        }
        match std::mem::replace(then, Then::More) {
            Then::More => stream.send = Send::Open,
            Then::End => {
                stream.send = Send::Done;
                frame::put_header(&mut self.wbuf, 0, frame::DATA, frame::END_STREAM, id);
                self.close_if_done(id);
            }
            Then::Trailers(fields) => {
                stream.send = Send::Open;
                self.send_trailers(id, fields.iter().map(|(n, v)| (&n[..], &v[..])));
            }
        }
    }

    /// The request of stream `id` is answered before it was all received: RST_STREAM
    /// NO_ERROR tells the client to send no more of it (RFC 9113, 8.1).
    pub fn stop_receiving(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.recv_open && !stream.reset {
            stream.recv_open = false;
            self.send_reset(id, code::NO_ERROR);
        }
        self.close_if_done(id);
    }

    /// A stream reset by the client, whose work the owner has ended: its slot is free.
    pub fn forget(&mut self, id: u32) {
        if let Entry::Occupied(e) = self.streams.entry(id) {
            if e.get().reset {
                e.remove();
            }
        }
    }

    /// Ends stream `id` with RST_STREAM `error` (a stream error): its state is dropped.
    pub fn reset(&mut self, id: u32, error: u32) {
        if let Some(stream) = self.streams.remove(&id) {
            if let Send::Queued { data, .. } = &stream.send {
                self.queued_bytes -= data.len();
            }
        }
        self.send_reset(id, error);
    }

    fn close_if_done(&mut self, id: u32) {
        if let Entry::Occupied(e) = self.streams.entry(id) {
            let s = e.get();
            if !s.recv_open && matches!(s.send, Send::Done) && !s.reset {
                e.remove();
            }
        }
    }

    /// Our RST_STREAM on `id`, remembered so that what the client sent before it saw it is
    /// ignored.
    fn send_reset(&mut self, id: u32, error: u32) {
        self.reset_ids[self.reset_pos] = id;
        self.reset_pos = (self.reset_pos + 1) % RECENTLY_RESET;
        frame::put_reset(&mut self.wbuf, id, error);
    }

    /// GOAWAY: for a graceful shutdown (NO_ERROR) the streams already opened finish; after
    /// an error the connection closes once the frame is written.
    pub fn go_away(&mut self, error: u32) {
        let failed = error != code::NO_ERROR;
        if failed {
            self.count(Bound::ProtocolError);
        }
        self.send_go_away(error, failed);
    }

    /// GOAWAY `error`, then close as soon as it is written, whatever is under way (idle
    /// connections, and clients told to calm down).
    pub fn close_with(&mut self, error: u32) {
        self.send_go_away(error, true);
    }

    fn send_go_away(&mut self, error: u32, close: bool) {
        match self.going_away {
            Some((_, true)) => return,
            Some((_, false)) if !close => return,
            _ => {}
        }
        self.going_away = Some((self.last_id, close));
        frame::put_goaway(&mut self.wbuf, self.last_id, error);
    }
}

/// What a connection's owner does with it, for [`serve`].
pub trait App {
    /// What the owner keeps per stream.
    type State: Default;
    /// Reads the connection's events (`conn.next_event`) after bytes arrived.
    fn on_input(&mut self, conn: &mut Connection<Self::State>, now: Instant);
    /// Polls the work under way for the streams; true if anything happened.
    fn poll_work(&mut self, conn: &mut Connection<Self::State>, cx: &mut Context<'_>) -> bool;
    /// Whether answers are on their way from elsewhere: finished replies may wait a little
    /// for them, so that they leave in one send.
    fn answers_pending(&self) -> bool {
        false
    }
    /// Whether anything is under way that the idle timeout must wait for.
    fn working(&self) -> bool;
    /// Counts the bounds the client met (`counts` by `Bound::ALL`'s order).
    fn count(&mut self, _counts: &[u32; Bound::ALL.len()]) {}
    /// The reply bytes the connection now holds for its client (after every turn).
    fn holding(&mut self, _reply_bytes: usize) {}
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The peer closed it, it failed, or it was closed after an error's GOAWAY.
    Closed,
    /// We sent GOAWAY and every stream it let finish has: the caller closes without a reset.
    GoneAway,
}

/// How long finished replies may wait for answers still on their way, so that those come
/// in the same send (see `App::answers_pending`). With two cores, sending each core's
/// answers as they came doubled the sends per request (6 requests per send against 13 on one
/// core, under strace) and with them the kernel's and the client's work per request. 200 us
/// gave 12% more throughput than 50 us at 16 x 16 (bench/RESULTS.md); a connection with one
/// call in flight never waits, and under that load a reply's latency is milliseconds.
const HOLD: Duration = Duration::from_micros(200);
/// Output beyond which nothing is held.
const HOLD_MAX: usize = 64 * 1024;
/// Turns of the connection's loop before it yields to the executor's other tasks.
const BUDGET: usize = 16;

/// A connection and its owner: what [`serve`] drives, usable without a socket.
pub struct Server<A: App> {
    pub conn: Connection<A::State>,
    pub app: A,
}

impl<A: App> Server<A> {
    /// `n` bytes arrived in `conn.room()`.
    pub fn received(&mut self, n: usize, now: Instant) {
        self.conn.received(n);
        self.app.on_input(&mut self.conn, now);
    }

    pub fn poll_work(&mut self, cx: &mut Context<'_>) -> bool {
        self.app.poll_work(&mut self.conn, cx)
    }

    /// Some once nothing is left to do but close, and how it ended.
    pub fn finished(&self) -> Option<Ended> {
        self.conn.finished().map(|graceful| {
            if graceful {
                Ended::GoneAway
            } else {
                Ended::Closed
            }
        })
    }

    fn report(&mut self) {
        if let Some(counts) = self.conn.take_bounds() {
            self.app.count(&counts);
        }
        self.app.holding(self.conn.reply_bytes());
    }
}

/// Serves one connection until the peer closes it, it fails, or `shutdown` resolves and the
/// streams under way have been answered.
pub async fn serve<A: App>(
    server: Server<A>,
    io: glommio::net::TcpStream,
    shutdown: Pin<Box<dyn Future<Output = ()>>>,
) -> Ended {
    let mut driver = Driver {
        timeout: glommio::timer::Timer::new(server.conn.limits.handshake_timeout),
        server,
        io,
        shutdown: Some(shutdown),
        hold: None,
        holding: false,
        last_activity: Instant::now(),
    };
    let ended = std::future::poll_fn(|cx| {
        let ended = driver.poll(cx);
        driver.server.report();
        ended
    })
    .await;
    driver.server.app.holding(0);
    ended
}

struct Driver<A: App> {
    server: Server<A>,
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
}

impl<A: App> Driver<A> {
    /// The handshake and idle timeouts: Some when the connection is to end.
    fn poll_timeout(&mut self, cx: &mut Context<'_>) -> Option<Ended> {
        if Pin::new(&mut self.timeout).poll(cx).is_pending() {
            return None;
        }
        let conn = &mut self.server.conn;
        let now = Instant::now();
        if !conn.preface {
            conn.count(Bound::HandshakeTimeout);
            return Some(Ended::Closed);
        }
        let idle_timeout = conn.limits.idle_timeout;
        let idle_for = now.saturating_duration_since(self.last_activity);
        if idle_for >= idle_timeout && !self.server.app.working() {
            conn.count(Bound::IdleTimeout);
            conn.close_with(code::NO_ERROR);
            return None;
        }
        let left = idle_timeout.saturating_sub(idle_for);
        self.timeout
            .reset(left.max(idle_timeout / 8).max(Duration::from_millis(10)));
        // The fresh deadline must be registered with this task's waker.
        let _ = Pin::new(&mut self.timeout).poll(cx);
        None
    }

    /// Whether to keep the output back for now: answers are on their way and HOLD has not
    /// passed since it was first kept back.
    fn hold_output(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.server.app.answers_pending()
            || self.server.conn.output().len() >= HOLD_MAX
            || self.server.conn.going_away.is_some()
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
        use futures_lite::{AsyncRead, AsyncWrite};
        if let Some(ended) = self.poll_timeout(cx) {
            return Poll::Ready(ended);
        }
        for _ in 0..BUDGET {
            let mut busy = false;
            if let Some(shutdown) = &mut self.shutdown {
                if shutdown.as_mut().poll(cx).is_ready() {
                    self.shutdown = None;
                    self.server.conn.go_away(code::NO_ERROR);
                    busy = true;
                }
            }
            let could_read = self.server.conn.wants_input();
            if could_read {
                match Pin::new(&mut self.io).poll_read(cx, self.server.conn.room()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ended::Closed),
                    Poll::Ready(Ok(n)) => {
                        let now = Instant::now();
                        self.last_activity = now;
                        self.server.received(n, now);
                        busy = true;
                    }
                    Poll::Pending => {}
                }
            }
            busy |= self.server.poll_work(cx);
            let hold = !self.server.conn.output().is_empty() && self.hold_output(cx);
            while !hold && !self.server.conn.output().is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, self.server.conn.output()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ended::Closed),
                    Poll::Ready(Ok(n)) => {
                        self.server.conn.sent(n);
                        self.last_activity = Instant::now();
                    }
                    Poll::Pending => break,
                }
            }
            if self.server.conn.output().is_empty() {
                if let Some(ended) = self.server.finished() {
                    return Poll::Ready(ended);
                }
            }
            // Output drained below the high-water mark: reading may go on.
            busy |= !could_read && self.server.conn.wants_input();
            if !busy {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    //! The connection driven by raw frames, its events read as an owner reads them, its
    //! output decoded with loona-hpack (an HPACK nobody here wrote).
    use super::*;

    /// An event, owned.
    #[derive(Debug, PartialEq)]
    enum Got {
        Request {
            id: u32,
            method: String,
            path: String,
            fields: Vec<(String, String)>,
            end: bool,
        },
        Data {
            id: u32,
            len: usize,
            end: bool,
        },
        Reset(u32),
    }

    /// A frame the connection sent.
    #[derive(Debug)]
    struct Sent {
        kind: u8,
        flags: u8,
        id: u32,
        payload: Vec<u8>,
    }

    struct Peer {
        conn: Connection<u32>,
        encoder: loona_hpack::Encoder<'static>,
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    impl Peer {
        /// Past the preface, SETTINGS and their acknowledgement.
        fn new(settings: &[(u16, u32)]) -> Self {
            let mut peer = Peer {
                conn: Connection::new(Limits::default(), &[]),
                encoder: loona_hpack::Encoder::new(),
            };
            let mut bytes = frame::PREFACE.to_vec();
            frame::put_settings(&mut bytes, false, settings);
            assert!(peer.feed(&bytes).is_empty());
            let kinds: Vec<_> = peer.sent().iter().map(|f| (f.kind, f.flags)).collect();
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

        fn feed(&mut self, mut bytes: &[u8]) -> Vec<Got> {
            let mut got = vec![];
            while !bytes.is_empty() {
                let room = self.conn.room();
                let n = room.len().min(bytes.len());
                room[..n].copy_from_slice(&bytes[..n]);
                self.conn.received(n);
                bytes = &bytes[n..];
                while let Some(event) = self.conn.next_event(Instant::now()) {
                    got.push(match event {
                        Event::Request { id, head, end } => Got::Request {
                            id,
                            method: text(head.method()),
                            path: text(head.path()),
                            fields: head.fields().map(|(n, v)| (text(n), text(v))).collect(),
                            end,
                        },
                        Event::Data {
                            id,
                            data,
                            end,
                            state,
                        } => {
                            *state += data.len() as u32;
                            Got::Data {
                                id,
                                len: data.len(),
                                end,
                            }
                        }
                        Event::Reset { id, .. } => Got::Reset(id),
                    });
                }
            }
            got
        }

        fn sent(&mut self) -> Vec<Sent> {
            let out = self.conn.output().to_vec();
            self.conn.sent(out.len());
            let mut frames = vec![];
            let mut rest = &out[..];
            while let Some(h) = frame::Header::parse(rest) {
                let payload = rest[frame::HEADER_LEN..frame::HEADER_LEN + h.len].to_vec();
                frames.push(Sent {
                    kind: h.kind,
                    flags: h.flags,
                    id: h.id,
                    payload,
                });
                rest = &rest[frame::HEADER_LEN + h.len..];
            }
            frames
        }

        fn headers(&mut self, id: u32, fields: &[(&[u8], &[u8])], flags: u8) -> Vec<u8> {
            let block = self.encoder.encode(fields.iter().copied());
            let mut bytes = vec![];
            frame::put_header(&mut bytes, block.len(), frame::HEADERS, flags, id);
            bytes.extend_from_slice(&block);
            bytes
        }

        fn request(&mut self, id: u32, extra: &[(&[u8], &[u8])], flags: u8) -> Vec<u8> {
            let mut fields: Vec<(&[u8], &[u8])> = vec![
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", b"/echo"),
                (b":authority", b"localhost"),
            ];
            fields.extend_from_slice(extra);
            self.headers(id, &fields, flags | frame::END_HEADERS)
        }
    }

    fn data(id: u32, len: usize, flags: u8) -> Vec<u8> {
        let mut bytes = vec![];
        frame::put_header(&mut bytes, len, frame::DATA, flags, id);
        bytes.resize(bytes.len() + len, b'd');
        bytes
    }

    #[test]
    fn a_request_comes_out_as_events_and_the_reply_goes_out_as_written() {
        let mut peer = Peer::new(&[]);
        let mut bytes = peer.request(1, &[(b"x-thing", b"one")], 0);
        bytes.extend(data(1, 3, 0));
        bytes.extend(data(1, 4, frame::END_STREAM));
        let got = peer.feed(&bytes);
        assert_eq!(
            got,
            [
                Got::Request {
                    id: 1,
                    method: "POST".into(),
                    path: "/echo".into(),
                    fields: vec![("x-thing".into(), "one".into())],
                    end: false
                },
                Got::Data {
                    id: 1,
                    len: 3,
                    end: false
                },
                Got::Data {
                    id: 1,
                    len: 4,
                    end: true
                },
            ]
        );
        assert_eq!(peer.conn.state(1), Some(&mut 7));
        peer.conn
            .send_headers(1, 200, [(&b"content-type"[..], &b"text/plain"[..])], false);
        assert!(peer
            .conn
            .send_data_with(1, 5, |buf| buf.extend_from_slice(b"hello")));
        peer.conn.send_trailers(1, [(&b"x-done"[..], &b"yes"[..])]);
        assert_eq!(peer.conn.stream_count(), 0, "ended both ways");
        let sent = peer.sent();
        let mut decoder = loona_hpack::Decoder::new();
        let kinds: Vec<_> = sent.iter().map(|f| (f.kind, f.flags, f.id)).collect();
        assert_eq!(
            kinds,
            [
                (frame::HEADERS, frame::END_HEADERS, 1),
                (frame::DATA, 0, 1),
                (frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, 1),
            ]
        );
        let head = decoder.decode(&sent[0].payload).unwrap();
        assert_eq!(
            head,
            [
                (b":status".to_vec(), b"200".to_vec()),
                (b"content-type".to_vec(), b"text/plain".to_vec())
            ]
        );
        assert_eq!(sent[1].payload, b"hello");
        let trailers = decoder.decode(&sent[2].payload).unwrap();
        assert_eq!(trailers, [(b"x-done".to_vec(), b"yes".to_vec())]);
    }

    #[test]
    fn malformed_requests_are_reset_and_never_reach_the_owner() {
        let bad: [&[(&[u8], &[u8])]; 6] = [
            &[(b"X-Upper", b"1")],
            &[(b"connection", b"keep-alive")],
            &[(b"te", b"gzip")],
            &[(b"x-crlf", b"a\r\nb")],
            &[(b"x-space", b" padded")],
            &[(b"content-length", b"abc")],
        ];
        for (i, extra) in bad.iter().enumerate() {
            let mut peer = Peer::new(&[]);
            let req = peer.request(1, extra, frame::END_STREAM);
            assert!(peer.feed(&req).is_empty(), "case {i} reached the owner");
            let sent = peer.sent();
            assert_eq!(
                (sent[0].kind, sent[0].id),
                (frame::RST_STREAM, 1),
                "case {i}"
            );
            assert_eq!(
                sent[0].payload,
                code::PROTOCOL_ERROR.to_be_bytes(),
                "case {i}"
            );
            // The connection goes on.
            let req = peer.request(3, &[], frame::END_STREAM);
            assert_eq!(peer.feed(&req).len(), 1, "case {i}");
        }
        let mut peer = Peer::new(&[]);
        let block = peer.headers(
            1,
            &[(b":method", b"GET"), (b":path", b"/")], // no :scheme
            frame::END_HEADERS | frame::END_STREAM,
        );
        assert!(peer.feed(&block).is_empty());
        assert_eq!(peer.sent()[0].kind, frame::RST_STREAM);
    }

    #[test]
    fn a_field_repeated_from_the_peers_table_is_checked_once_and_a_bad_one_stays_bad() {
        let mut peer = Peer::new(&[]);
        // loona-hpack indexes every field, so the second request names each by its index.
        for id in [1, 3] {
            let req = peer.request(id, &[(b"x-ok", b"fine")], frame::END_STREAM);
            assert_eq!(peer.feed(&req).len(), 1, "stream {id}");
        }
        for id in [5, 7] {
            let req = peer.request(id, &[(b"x-bad", b"nul\0inside")], frame::END_STREAM);
            assert!(peer.feed(&req).is_empty(), "stream {id} reached the owner");
        }
        let resets: Vec<_> = peer
            .sent()
            .into_iter()
            .filter(|f| f.kind == frame::RST_STREAM)
            .map(|f| f.id)
            .collect();
        assert_eq!(resets, [5, 7]);
    }

    #[test]
    fn a_consumer_that_takes_its_time_gets_window_only_as_it_releases() {
        let mut peer = Peer::new(&[]);
        let req = peer.request(1, &[], 0);
        peer.feed(&req);
        peer.conn.consume_manually(1);
        let mut bytes = vec![];
        for _ in 0..20 {
            bytes.extend(data(1, 16_384, 0));
        }
        assert_eq!(peer.feed(&bytes).len(), 20);
        let updates = |sent: Vec<Sent>| -> Vec<(u32, u32)> {
            sent.iter()
                .filter(|f| f.kind == frame::WINDOW_UPDATE)
                .map(|f| (f.id, u32::from_be_bytes(f.payload[..4].try_into().unwrap())))
                .collect()
        };
        assert_eq!(updates(peer.sent()), [], "nothing consumed yet");
        peer.conn.release(1, 100_000);
        assert_eq!(updates(peer.sent()), [], "under a quarter window");
        peer.conn.release(1, 227_680);
        assert_eq!(updates(peer.sent()), [(1, 327_680)]);
    }

    #[test]
    fn a_stream_the_client_resets_keeps_its_slot_until_its_work_is_forgotten() {
        let mut peer = Peer::new(&[]);
        let req = peer.request(1, &[], frame::END_STREAM);
        peer.feed(&req);
        let mut rst = vec![];
        frame::put_reset(&mut rst, 1, code::CANCEL);
        assert_eq!(peer.feed(&rst), [Got::Reset(1)]);
        assert_eq!(peer.conn.stream_count(), 1);
        assert!(!peer.conn.is_live(1));
        peer.conn.send_headers(1, 200, [], true);
        assert!(peer.sent().is_empty(), "nothing is sent on a reset stream");
        peer.conn.forget(1);
        assert_eq!(peer.conn.stream_count(), 0);
    }

    #[test]
    fn data_waits_for_the_peers_window_and_the_trailers_follow_it() {
        let mut peer = Peer::new(&[(frame::setting::INITIAL_WINDOW_SIZE, 10)]);
        let req = peer.request(1, &[], frame::END_STREAM);
        peer.feed(&req);
        peer.conn.send_headers(1, 200, [], false);
        assert!(!peer.conn.send_data_with(1, 25, |_| unreachable!()));
        peer.conn
            .send_data(1, Bytes::from_static(b"0123456789abcdefghijklmno"));
        peer.conn.send_trailers(1, [(&b"x-end"[..], &b"1"[..])]);
        assert!(peer.conn.is_queued(1));
        assert_eq!(peer.conn.reply_bytes(), peer.conn.output().len() + 15);
        let sent = peer.sent();
        assert_eq!(sent.len(), 2);
        assert_eq!(
            (sent[1].kind, &sent[1].payload[..]),
            (frame::DATA, &b"0123456789"[..])
        );
        let mut update = vec![];
        frame::put_window_update(&mut update, 1, 15);
        peer.feed(&update);
        let sent = peer.sent();
        let kinds: Vec<_> = sent.iter().map(|f| (f.kind, f.flags)).collect();
        assert_eq!(
            kinds,
            [
                (frame::DATA, 0),
                (frame::HEADERS, frame::END_HEADERS | frame::END_STREAM)
            ]
        );
        assert_eq!(sent[0].payload, b"abcdefghijklmno");
        assert_eq!(peer.conn.stream_count(), 0);
        assert_eq!(peer.conn.reply_bytes(), 0);
    }
}
