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
//!
//! All of it runs on the thread of the executor that accepted the connection: a
//! [`Connection`] has no I/O and no lock, and [`serve`] drives it as one task of that
//! executor. Its parts: `settings` (SETTINGS both ways and the bounds on a client), `head` (a
//! request's header block, checked), `stream` (a stream's state and how it ends), `recv`
//! (frames in, [`Event`]s out), `flow` (flow control and the replies written) and `driver`
//! ([`serve`] over a glommio socket).

mod driver;
mod flow;
mod head;
mod recv;
mod settings;
mod stream;
#[cfg(test)]
mod tests;

pub use driver::{serve, App, Ended, Server};
pub use head::Head;
pub use settings::{Bound, Limits};
pub use stream::{BuildId, IdHasher};

use crate::{
    frame::{self, code},
    hpack,
};
use settings::Bucket;
use std::{collections::HashMap, time::Instant};
use stream::{Send, Stream};

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

    /// Some once nothing is left to do but close: Some(false) after an error's GOAWAY,
    /// Some(true) after a graceful one once every stream it let through has ended.
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

    /// GOAWAY ENHANCE_YOUR_CALM: the client sends more of something than any client needs.
    fn calm_down(&mut self, why: Bound) {
        self.count(why);
        self.close_with(code::ENHANCE_YOUR_CALM);
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
