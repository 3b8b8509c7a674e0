//! The client side: [`Connection`], one HTTP/2 connection as a state machine with no I/O of
//! its own, and [`Client`], its driver on the glommio executor it is created on.
//!
//! A [`Connection`] takes the bytes read from the socket ([`Connection::room`] and
//! [`Connection::received`]) and gives the bytes to write ([`Connection::output`] and
//! [`Connection::sent`]); requests go in with [`Connection::start`] and come out whole with
//! [`Connection::finish`]. Flow control answers to the consumer: the body bytes of a response
//! are credited back to the server (WINDOW_UPDATE) only when the caller takes them
//! ([`Connection::take_body`]), so a caller that stops reading stops the server, and memory
//! held per stream is bounded by the window we advertise.
//!
//! What it implements of RFC 9113: the preface and SETTINGS both ways, HEADERS with
//! CONTINUATION and padding, DATA, flow control both ways, RST_STREAM (received, and sent for
//! a request its caller gave up on), PING (answered), GOAWAY (the streams it did not take fail
//! as refused, safe to retry), MAX_CONCURRENT_STREAMS (a request waits for a free stream). No
//! server push (disabled in our SETTINGS) and no priorities.
//!
//! Both run on one thread, that of the glommio executor the [`Client`] was created on: its
//! task drives the connection, and the callers' futures share it with the task through a
//! `RefCell`; nothing crosses threads. The connection's parts: `recv` (the server's frames
//! in), `flow` (request bodies out as windows allow, credit back as bodies are taken) and
//! `driver` ([`Client`] and its task).

mod driver;
mod flow;
mod recv;
#[cfg(test)]
mod tests;

pub use driver::{Client, Meter};

use crate::{
    frame::{self, code, setting, Header},
    hpack::{Decoder, Encoder},
};
use std::collections::HashMap;

/// The receive window of each stream we open (SETTINGS_INITIAL_WINDOW_SIZE): the most a
/// response may have in flight that its caller has not taken yet.
const STREAM_WINDOW: u32 = 1 << 20;
/// The connection's receive window, over all streams.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Credit is returned in steps of at least this much (or when a stream ends), not per frame.
const CREDIT_STEP: usize = 64 * 1024;
/// The largest header block we accept from the server.
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Output past this much waits before more requests are encoded into it.
const OUTPUT_HIGH_WATER: usize = 1 << 20;

/// A request's head. The method and scheme of a gRPC call are POST and http.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a [u8],
    pub scheme: &'a [u8],
    pub authority: &'a [u8],
    pub path: &'a [u8],
    /// More fields, in order (names lowercase).
    pub fields: &'a [(&'a [u8], &'a [u8])],
}

/// A whole response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub head: Vec<(Vec<u8>, Vec<u8>)>,
    /// The body bytes the caller has not taken with [`Connection::take_body`] yet.
    pub body: Vec<u8>,
    pub trailers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Response {
    /// The value of the first field named `name`, trailers first (where gRPC's status is),
    /// then the head (where a trailers-only response has it).
    pub fn field(&self, name: &[u8]) -> Option<&[u8]> {
        self.trailers
            .iter()
            .chain(&self.head)
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The server reset the stream with this code.
    Reset(u32),
    /// The server did not take the stream (REFUSED_STREAM, or beyond its GOAWAY): nothing was
    /// processed, so it is safe to send again, on another connection.
    Refused,
    /// The connection is closed or failed (the reason); its streams did not all finish.
    Closed(String),
    /// MAX_CONCURRENT_STREAMS streams are open: wait for one to end.
    Busy,
    /// The response is larger than the caller allowed; its stream was cancelled.
    TooLarge,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Reset(c) => write!(f, "stream reset by the server (error code {c:#x})"),
            Error::Refused => f.write_str("request refused by the server before processing"),
            Error::Closed(why) => write!(f, "connection closed: {why}"),
            Error::Busy => f.write_str("every stream the server allows is in use"),
            Error::TooLarge => f.write_str("response over the caller's limit"),
        }
    }
}

impl std::error::Error for Error {}

struct Stream {
    /// Body bytes not sent yet for want of window; sent as WINDOW_UPDATEs arrive.
    pending: Vec<u8>,
    /// END_STREAM still owed after `pending`.
    pending_end: bool,
    send_window: i64,
    /// Bytes received that the caller took but the server was not credited for yet.
    uncredited: usize,
    /// Receive window left.
    recv_window: i64,
    response: Response,
    /// The head arrived (a final status, not 1xx).
    has_head: bool,
    done: Option<Result<(), Error>>,
}

/// One client connection, without I/O.
pub struct Connection {
    out: Vec<u8>,
    /// Bytes read and not parsed yet are `input[parsed..filled]`; the rest is room.
    input: Vec<u8>,
    parsed: usize,
    filled: usize,
    encoder: Encoder,
    decoder: Decoder,
    next_id: u32,
    streams: HashMap<u32, Stream>,
    send_window: i64,
    recv_window: i64,
    /// Connection credit owed to the server for bytes consumed or discarded.
    uncredited: usize,
    peer_initial_window: i64,
    peer_max_frame: usize,
    peer_max_streams: usize,
    /// A header block being assembled: (stream, flags of its HEADERS, block so far).
    continuation: Option<(u32, u8, Vec<u8>)>,
    /// No new streams: the server's GOAWAY, or ours.
    going_away: bool,
    /// The connection failed, or was closed: why.
    failed: Option<String>,
    /// Streams with news for their callers since the last [`Connection::changed`].
    changed: Vec<u32>,
}

impl Connection {
    /// A connection whose header blocks index `recurring` fields (see [`Encoder::new`]). The
    /// preface and our SETTINGS are queued at once: a client may send requests right after.
    pub fn new(recurring: &'static [(&'static [u8], &'static [u8])]) -> Self {
        let mut out = Vec::with_capacity(64 * 1024);
        out.extend_from_slice(frame::PREFACE);
        frame::put_settings(
            &mut out,
            false,
            &[
                (setting::ENABLE_PUSH, 0),
                (setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (setting::MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK as u32),
            ],
        );
        frame::put_window_update(
            &mut out,
            0,
            CONNECTION_WINDOW - frame::DEFAULT_WINDOW as u32,
        );
        Connection {
            out,
            input: vec![0; 64 * 1024],
            parsed: 0,
            filled: 0,
            encoder: Encoder::new(recurring),
            decoder: Decoder::new(4096),
            next_id: 1,
            streams: HashMap::new(),
            send_window: frame::DEFAULT_WINDOW,
            recv_window: CONNECTION_WINDOW as i64,
            uncredited: 0,
            peer_initial_window: frame::DEFAULT_WINDOW,
            peer_max_frame: frame::DEFAULT_MAX_FRAME,
            // Until the server's SETTINGS say otherwise (RFC 9113 advises at least 100).
            peer_max_streams: 100,
            continuation: None,
            going_away: false,
            failed: None,
            changed: Vec::new(),
        }
    }

    /// Opens a stream for `req` and queues its HEADERS and as much of `body` as the windows
    /// allow (the rest follows as credit arrives). `end`: the request ends with `body`.
    pub fn start(&mut self, req: &Request<'_>, body: &[u8], end: bool) -> Result<u32, Error> {
        if let Some(why) = &self.failed {
            return Err(Error::Closed(why.clone()));
        }
        if self.going_away || self.next_id > i32::MAX as u32 {
            return Err(Error::Refused);
        }
        if self.streams.len() >= self.peer_max_streams || self.out.len() >= OUTPUT_HIGH_WATER {
            return Err(Error::Busy);
        }
        let id = self.next_id;
        self.next_id += 2;
        let at = self.encoder.open(&mut self.out);
        let e = &mut self.encoder;
        match req.method {
            b"POST" => e.indexed(&mut self.out, 3),
            b"GET" => e.indexed(&mut self.out, 2),
            m => e.static_name(&mut self.out, 2, m),
        }
        match req.scheme {
            b"http" => e.indexed(&mut self.out, 6),
            b"https" => e.indexed(&mut self.out, 7),
            s => e.static_name(&mut self.out, 6, s),
        }
        e.static_name(&mut self.out, 4, req.path);
        e.static_name(&mut self.out, 1, req.authority);
        for (name, value) in req.fields {
            e.field(&mut self.out, name, value);
        }
        let flags = if end && body.is_empty() {
            frame::END_STREAM
        } else {
            0
        };
        Encoder::close(&mut self.out, at, id, flags, self.peer_max_frame);
        self.streams.insert(
            id,
            Stream {
                pending: body.to_vec(),
                pending_end: end && !body.is_empty(),
                send_window: self.peer_initial_window,
                uncredited: 0,
                recv_window: STREAM_WINDOW as i64,
                response: Response::default(),
                has_head: false,
                done: None,
            },
        );
        self.flush_stream(id);
        Ok(id)
    }

    /// The caller gives up on stream `id` (a deadline, a drop): RST_STREAM CANCEL, and what it
    /// received is credited back.
    pub fn cancel(&mut self, id: u32) {
        if let Some(s) = self.streams.remove(&id) {
            if s.done.is_none() && self.failed.is_none() {
                frame::put_reset(&mut self.out, id, code::CANCEL);
            }
            self.uncredited += s.response.body.len();
            self.credit(None);
        }
    }

    /// Stream `id`'s response once it ended (or its error), removing the stream; None while
    /// it is under way. Body bytes still in the response count as consumed.
    pub fn finish(&mut self, id: u32) -> Option<Result<Response, Error>> {
        let done = self.streams.get(&id)?.done.clone()?;
        let s = self.streams.remove(&id)?;
        self.uncredited += s.response.body.len();
        self.credit(None);
        Some(done.map(|()| s.response))
    }

    /// Whether stream `id` has body bytes, or its end, for its caller.
    pub fn has_news(&self, id: u32) -> bool {
        self.streams
            .get(&id)
            .is_none_or(|s| s.done.is_some() || !s.response.body.is_empty())
    }

    /// Streams with news since the last call, a stream possibly more than once.
    pub fn changed(&mut self) -> std::vec::Drain<'_, u32> {
        self.changed.drain(..)
    }

    /// Whether a new stream could open now.
    pub fn has_room(&self) -> bool {
        self.failed.is_some()
            || self.going_away
            || (self.streams.len() < self.peer_max_streams && self.out.len() < OUTPUT_HIGH_WATER)
    }

    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// Why the connection ended, if it did.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Closes the connection: GOAWAY, every open stream fails.
    pub fn close(&mut self, why: &str) {
        if self.failed.is_none() {
            frame::put_goaway(&mut self.out, 0, code::NO_ERROR);
            self.fail(why.to_string());
        }
    }

    /// The socket reached its end or failed.
    pub fn io_closed(&mut self, why: &str) {
        self.out.clear();
        self.fail(why.to_string());
    }

    fn fail(&mut self, why: String) {
        for (id, s) in &mut self.streams {
            if s.done.is_none() {
                s.done = Some(Err(Error::Closed(why.clone())));
                self.changed.push(*id);
            }
        }
        self.failed = Some(why);
        self.going_away = true;
    }

    /// A connection error: GOAWAY with `error`, and the end.
    fn connection_error(&mut self, error: u32, why: &'static str) {
        if self.failed.is_none() {
            // The server opens no streams (push is off): the last one we processed is 0.
            frame::put_goaway(&mut self.out, 0, error);
            self.fail(format!("protocol error: {why}"));
        }
    }

    pub fn output(&self) -> &[u8] {
        &self.out
    }

    pub fn sent(&mut self, n: usize) {
        self.out.drain(..n);
    }

    /// Free space to read into.
    pub fn room(&mut self) -> &mut [u8] {
        if self.parsed > 0 {
            self.input.copy_within(self.parsed..self.filled, 0);
            self.filled -= self.parsed;
            self.parsed = 0;
        }
        let want = self.filled + frame::HEADER_LEN + self.peer_max_frame.max(16 * 1024);
        if self.input.len() < want {
            self.input.resize(want.next_power_of_two(), 0);
        }
        &mut self.input[self.filled..]
    }

    /// `n` bytes were read into [`Connection::room`]: handles every whole frame among them.
    pub fn received(&mut self, n: usize) {
        self.filled += n;
        let input = std::mem::take(&mut self.input);
        while self.failed.is_none() {
            let Some(h) = Header::parse(&input[self.parsed..self.filled]) else {
                break;
            };
            if h.len > frame::DEFAULT_MAX_FRAME {
                self.connection_error(code::FRAME_SIZE_ERROR, "frame over our maximum size");
                break;
            }
            let start = self.parsed + frame::HEADER_LEN;
            if self.filled < start + h.len {
                break;
            }
            self.parsed = start + h.len;
            self.frame(h, &input[start..start + h.len]);
        }
        self.input = input;
    }
}
