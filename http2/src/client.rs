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

use crate::{
    frame::{self, code, setting, Header},
    hpack::{Decoder, Encoder},
};
use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
};

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

    /// Sends what the windows allow of stream `id`'s pending body.
    fn flush_stream(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        loop {
            let n = s
                .pending
                .len()
                .min(self.peer_max_frame)
                .min(s.send_window.max(0) as usize)
                .min(self.send_window.max(0) as usize);
            let last = n == s.pending.len();
            if n == 0 && !(last && s.pending_end) {
                return;
            }
            let flags = if last && s.pending_end {
                frame::END_STREAM
            } else {
                0
            };
            frame::put_header(&mut self.out, n, frame::DATA, flags, id);
            self.out.extend_from_slice(&s.pending[..n]);
            s.pending.drain(..n);
            s.send_window -= n as i64;
            self.send_window -= n as i64;
            if last {
                s.pending_end = false;
                s.pending = Vec::new();
                return;
            }
        }
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

    /// Moves the body bytes received so far on stream `id` to `into`, crediting them back to
    /// the server: the caller has consumed them.
    pub fn take_body(&mut self, id: u32, into: &mut Vec<u8>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let n = s.response.body.len();
        if n == 0 {
            return;
        }
        if into.is_empty() {
            std::mem::swap(into, &mut s.response.body);
        } else {
            into.append(&mut s.response.body);
        }
        s.uncredited += n;
        self.uncredited += n;
        self.credit(Some(id));
    }

    /// Sends WINDOW_UPDATEs for consumed bytes, in steps.
    fn credit(&mut self, id: Option<u32>) {
        if let Some(s) = id.and_then(|id| self.streams.get_mut(&id).map(|s| (id, s))) {
            let (id, s) = s;
            if s.uncredited >= CREDIT_STEP && s.done.is_none() {
                frame::put_window_update(&mut self.out, id, s.uncredited as u32);
                s.recv_window += s.uncredited as i64;
                s.uncredited = 0;
            }
        }
        if self.uncredited >= CREDIT_STEP {
            frame::put_window_update(&mut self.out, 0, self.uncredited as u32);
            self.recv_window += self.uncredited as i64;
            self.uncredited = 0;
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

    /// Streams with news since the last call (each at most... possibly more than once).
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

    fn frame(&mut self, h: Header, payload: &[u8]) {
        if let Some((id, _, _)) = &self.continuation {
            if h.kind != frame::CONTINUATION || h.id != *id {
                return self.connection_error(code::PROTOCOL_ERROR, "header block interrupted");
            }
        }
        match h.kind {
            frame::DATA => self.data(h, payload),
            frame::HEADERS => self.headers(h, payload),
            frame::CONTINUATION => self.continuation(h, payload),
            frame::RST_STREAM => {
                if payload.len() != 4 {
                    return self.connection_error(code::FRAME_SIZE_ERROR, "RST_STREAM size");
                }
                let error = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let outcome = match error {
                    code::REFUSED_STREAM => Error::Refused,
                    // NO_ERROR after a whole response: the server needs no more request body.
                    code::NO_ERROR => return self.end_stream(h.id, Ok(())),
                    other => Error::Reset(other),
                };
                self.end_stream(h.id, Err(outcome));
            }
            frame::SETTINGS => self.settings(h, payload),
            frame::PING => {
                if payload.len() != 8 || h.id != 0 {
                    return self.connection_error(code::FRAME_SIZE_ERROR, "PING size");
                }
                if h.flags & frame::ACK == 0 {
                    let mut data = [0; 8];
                    data.copy_from_slice(payload);
                    frame::put_ping(&mut self.out, true, data);
                }
            }
            frame::GOAWAY => {
                if payload.len() < 8 {
                    return self.connection_error(code::FRAME_SIZE_ERROR, "GOAWAY size");
                }
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                    & 0x7fff_ffff;
                self.going_away = true;
                let refused: Vec<u32> = self
                    .streams
                    .keys()
                    .copied()
                    .filter(|&id| id > last)
                    .collect();
                for id in refused {
                    self.end_stream(id, Err(Error::Refused));
                }
            }
            frame::WINDOW_UPDATE => self.window_update(h, payload),
            frame::PUSH_PROMISE => {
                self.connection_error(code::PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
            }
            // PRIORITY and unknown frames are ignored (RFC 9113, 5.5).
            _ => {}
        }
    }

    /// Ends stream `id` for its caller (its response stays until `finish`).
    fn end_stream(&mut self, id: u32, outcome: Result<(), Error>) {
        if let Some(s) = self.streams.get_mut(&id) {
            if s.done.is_none() {
                s.done = Some(outcome);
                self.changed.push(id);
            }
        }
    }

    fn data(&mut self, h: Header, payload: &[u8]) {
        if h.id == 0 {
            return self.connection_error(code::PROTOCOL_ERROR, "DATA on stream 0");
        }
        let len = payload.len() as i64;
        self.recv_window -= len;
        if self.recv_window < 0 {
            return self.connection_error(code::FLOW_CONTROL_ERROR, "connection window overrun");
        }
        let Some(body) = frame::unpad(h.flags, payload) else {
            return self.connection_error(code::PROTOCOL_ERROR, "padding longer than DATA");
        };
        let open = self
            .streams
            .get(&h.id)
            .is_some_and(|s| s.done.is_none() && s.has_head);
        if !open {
            // A stream we cancelled (or never had): its bytes are nobody's, credit them now.
            if h.id >= self.next_id {
                return self.connection_error(code::PROTOCOL_ERROR, "DATA on an idle stream");
            }
            self.uncredited += payload.len();
            return self.credit(None);
        }
        let s = self.streams.get_mut(&h.id).expect("open");
        s.recv_window -= len;
        if s.recv_window < 0 {
            frame::put_reset(&mut self.out, h.id, code::FLOW_CONTROL_ERROR);
            self.uncredited += payload.len();
            self.end_stream(h.id, Err(Error::Reset(code::FLOW_CONTROL_ERROR)));
            return self.credit(None);
        }
        // Padding is consumed at once; the body when its caller takes it.
        let padding = payload.len() - body.len();
        s.uncredited += padding;
        self.uncredited += padding;
        s.response.body.extend_from_slice(body);
        self.changed.push(h.id);
        if h.flags & frame::END_STREAM != 0 {
            self.end_stream(h.id, Ok(()));
        }
    }

    fn headers(&mut self, h: Header, payload: &[u8]) {
        if h.id == 0 {
            return self.connection_error(code::PROTOCOL_ERROR, "HEADERS on stream 0");
        }
        let Some(mut block) = frame::unpad(h.flags, payload) else {
            return self.connection_error(code::PROTOCOL_ERROR, "padding longer than HEADERS");
        };
        if h.flags & frame::PRIORITY_FLAG != 0 {
            if block.len() < 5 {
                return self.connection_error(code::FRAME_SIZE_ERROR, "HEADERS priority");
            }
            block = &block[5..];
        }
        if h.flags & frame::END_HEADERS == 0 {
            self.continuation = Some((h.id, h.flags, block.to_vec()));
            return;
        }
        self.header_block(h.id, h.flags, block);
    }

    fn continuation(&mut self, h: Header, payload: &[u8]) {
        let Some((id, flags, mut block)) = self.continuation.take() else {
            return self.connection_error(code::PROTOCOL_ERROR, "CONTINUATION without HEADERS");
        };
        block.extend_from_slice(payload);
        if block.len() > MAX_HEADER_BLOCK {
            return self.connection_error(code::ENHANCE_YOUR_CALM, "header block too large");
        }
        if h.flags & frame::END_HEADERS == 0 {
            self.continuation = Some((id, flags, block));
            return;
        }
        self.header_block(id, flags, &block);
    }

    fn header_block(&mut self, id: u32, flags: u8, block: &[u8]) {
        // Decoded whatever the stream's state: the decoder's table must follow the server's.
        let mut fields = Vec::new();
        if self
            .decoder
            .decode(block, |n, v| fields.push((n.to_vec(), v.to_vec())))
            .is_err()
        {
            return self.connection_error(code::COMPRESSION_ERROR, "undecodable header block");
        }
        let end = flags & frame::END_STREAM != 0;
        let Some(s) = self.streams.get_mut(&id) else {
            if id >= self.next_id {
                self.connection_error(code::PROTOCOL_ERROR, "HEADERS on an idle stream");
            }
            return;
        };
        if s.done.is_some() {
            return;
        }
        if !s.has_head {
            let status = fields
                .iter()
                .find(|(n, _)| n == b":status")
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u16>().ok());
            let Some(status) = status else {
                frame::put_reset(&mut self.out, id, code::PROTOCOL_ERROR);
                return self.end_stream(id, Err(Error::Reset(code::PROTOCOL_ERROR)));
            };
            if (100..200).contains(&status) {
                // Informational: the final head follows.
                return;
            }
            s.has_head = true;
            s.response.status = status;
            fields.retain(|(n, _)| !n.starts_with(b":"));
            s.response.head = fields;
        } else if end {
            s.response.trailers = fields;
        } else {
            frame::put_reset(&mut self.out, id, code::PROTOCOL_ERROR);
            return self.end_stream(id, Err(Error::Reset(code::PROTOCOL_ERROR)));
        }
        self.changed.push(id);
        if end {
            self.end_stream(id, Ok(()));
        }
    }

    fn settings(&mut self, h: Header, payload: &[u8]) {
        if h.id != 0 {
            return self.connection_error(code::PROTOCOL_ERROR, "SETTINGS on a stream");
        }
        if h.flags & frame::ACK != 0 {
            return;
        }
        let Some(params) = frame::settings(payload) else {
            return self.connection_error(code::FRAME_SIZE_ERROR, "SETTINGS size");
        };
        for (id, value) in params {
            match id {
                setting::HEADER_TABLE_SIZE => self.encoder.table_size(value as usize),
                setting::MAX_CONCURRENT_STREAMS => self.peer_max_streams = value as usize,
                setting::INITIAL_WINDOW_SIZE => {
                    if value as i64 > frame::MAX_WINDOW {
                        return self.connection_error(
                            code::FLOW_CONTROL_ERROR,
                            "initial window too large",
                        );
                    }
                    let delta = value as i64 - self.peer_initial_window;
                    self.peer_initial_window = value as i64;
                    for s in self.streams.values_mut() {
                        s.send_window += delta;
                    }
                }
                setting::MAX_FRAME_SIZE => {
                    if !(16_384..=16_777_215).contains(&value) {
                        return self.connection_error(code::PROTOCOL_ERROR, "MAX_FRAME_SIZE");
                    }
                    self.peer_max_frame = value as usize;
                }
                _ => {}
            }
        }
        frame::put_settings(&mut self.out, true, &[]);
        self.flush_all();
    }

    fn window_update(&mut self, h: Header, payload: &[u8]) {
        if payload.len() != 4 {
            return self.connection_error(code::FRAME_SIZE_ERROR, "WINDOW_UPDATE size");
        }
        let n = (u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff)
            as i64;
        if h.id == 0 {
            self.send_window += n;
            if n == 0 || self.send_window > frame::MAX_WINDOW {
                return self.connection_error(code::FLOW_CONTROL_ERROR, "connection window");
            }
            return self.flush_all();
        }
        if let Some(s) = self.streams.get_mut(&h.id) {
            s.send_window += n;
            if n == 0 || s.send_window > frame::MAX_WINDOW {
                frame::put_reset(&mut self.out, h.id, code::FLOW_CONTROL_ERROR);
                return self.end_stream(h.id, Err(Error::Reset(code::FLOW_CONTROL_ERROR)));
            }
            self.flush_stream(h.id);
        }
    }

    /// Sends what the windows now allow of every stream's pending body.
    fn flush_all(&mut self) {
        let waiting: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.pending.is_empty() || s.pending_end)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.flush_stream(id);
        }
    }
}

/// Bytes a client's connections moved, for its owner's metrics: shared by every connection
/// made with it.
#[derive(Default, Debug)]
pub struct Meter {
    pub sent: Cell<u64>,
    pub received: Cell<u64>,
}

/// What a [`Client`] and its driver task share (one executor, no lock).
struct Shared {
    conn: RefCell<Connection>,
    meter: Rc<Meter>,
    /// Bytes this connection received: a call that timed out on a connection that received
    /// nothing meanwhile tells its owner the connection, not the call, is stuck.
    received: Cell<u64>,
    /// The driver task, to wake when there is output.
    driver: RefCell<Option<Waker>>,
    /// Callers waiting on their stream.
    waiters: RefCell<HashMap<u32, Waker>>,
    /// Callers waiting for a free stream.
    waiting_for_room: RefCell<Vec<Waker>>,
}

impl Shared {
    fn wake_driver(&self) {
        if let Some(w) = self.driver.borrow_mut().take() {
            w.wake();
        }
    }
}

/// An HTTP/2 connection to one server, driven by a task on the current glommio executor:
/// every request is its own future, all multiplexed on one TCP connection. Cheap to clone;
/// the connection ends when the last clone is dropped (or the server ends it).
#[derive(Clone)]
pub struct Client {
    shared: Rc<Shared>,
}

impl Client {
    /// Connects to `addr` and starts the connection's driver; requests may follow at once.
    /// `recurring`: fields sent on every request, worth indexing (see [`Encoder::new`]).
    pub async fn connect(
        addr: std::net::SocketAddr,
        recurring: &'static [(&'static [u8], &'static [u8])],
    ) -> std::io::Result<Client> {
        Self::connect_metered(addr, recurring, Rc::default()).await
    }

    /// [`Client::connect`], counting the bytes into `meter`.
    pub async fn connect_metered(
        addr: std::net::SocketAddr,
        recurring: &'static [(&'static [u8], &'static [u8])],
        meter: Rc<Meter>,
    ) -> std::io::Result<Client> {
        let io = glommio::net::TcpStream::connect(addr).await?;
        io.set_nodelay(true)?;
        Ok(Client::over_metered(io, recurring, meter))
    }

    /// A client on a connection made elsewhere (from a chosen source port, say).
    pub fn over(
        io: glommio::net::TcpStream,
        recurring: &'static [(&'static [u8], &'static [u8])],
    ) -> Client {
        Self::over_metered(io, recurring, Rc::default())
    }

    /// [`Client::over`], counting the bytes into `meter`.
    pub fn over_metered(
        io: glommio::net::TcpStream,
        recurring: &'static [(&'static [u8], &'static [u8])],
        meter: Rc<Meter>,
    ) -> Client {
        let shared = Rc::new(Shared {
            conn: RefCell::new(Connection::new(recurring)),
            meter,
            received: Cell::new(0),
            driver: RefCell::new(None),
            waiters: RefCell::new(HashMap::new()),
            waiting_for_room: RefCell::new(Vec::new()),
        });
        glommio::spawn_local(drive(Rc::downgrade(&shared), io)).detach();
        Client { shared }
    }

    /// Whether the connection ended (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.shared.conn.borrow().failed().is_some()
    }

    /// Bytes received on this connection so far.
    pub fn received(&self) -> u64 {
        self.shared.received.get()
    }

    /// Streams open on the connection.
    pub fn open_streams(&self) -> usize {
        self.shared.conn.borrow().open_streams()
    }

    /// Sends a request with a whole `body` and returns the whole response, its body at most
    /// `max_body` bytes (beyond it, the stream is cancelled). Dropping the future cancels the
    /// stream (RST_STREAM CANCEL): wrap it in a timeout for a deadline.
    pub async fn request(
        &self,
        req: &Request<'_>,
        body: &[u8],
        max_body: usize,
    ) -> Result<Response, Error> {
        let id = std::future::poll_fn(|cx| {
            let started = self.shared.conn.borrow_mut().start(req, body, true);
            match started {
                Err(Error::Busy) => {
                    self.shared
                        .waiting_for_room
                        .borrow_mut()
                        .push(cx.waker().clone());
                    Poll::Pending
                }
                other => Poll::Ready(other),
            }
        })
        .await?;
        self.shared.wake_driver();
        let mut stream = Open {
            shared: &self.shared,
            id,
            body: Vec::new(),
        };
        std::future::poll_fn(|cx| stream.poll(cx, max_body)).await
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The driver notices when it runs that it was the last holder.
        self.shared.wake_driver();
    }
}

/// A request under way; cancels its stream if dropped before its end.
struct Open<'a> {
    shared: &'a Rc<Shared>,
    id: u32,
    body: Vec<u8>,
}

impl Open<'_> {
    fn poll(&mut self, cx: &mut Context<'_>, max_body: usize) -> Poll<Result<Response, Error>> {
        let mut conn = self.shared.conn.borrow_mut();
        conn.take_body(self.id, &mut self.body);
        if self.body.len() > max_body {
            conn.cancel(self.id);
            self.id = 0;
            drop(conn);
            self.shared.wake_driver();
            return Poll::Ready(Err(Error::TooLarge));
        }
        match conn.finish(self.id) {
            Some(done) => {
                self.id = 0;
                drop(conn);
                // Credit may be owed and a stream slot is free.
                self.shared.wake_driver();
                Poll::Ready(done.map(|mut r| {
                    r.body = std::mem::take(&mut self.body);
                    r
                }))
            }
            None => {
                if !conn.output().is_empty() {
                    self.shared.wake_driver();
                }
                self.shared
                    .waiters
                    .borrow_mut()
                    .insert(self.id, cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if self.id != 0 {
            self.shared.waiters.borrow_mut().remove(&self.id);
            self.shared.conn.borrow_mut().cancel(self.id);
            self.shared.wake_driver();
        }
    }
}

/// The driver: moves bytes between the socket and the connection, and wakes the callers
/// whose streams have news, until the connection ends or its last [`Client`] is dropped.
async fn drive(shared: std::rc::Weak<Shared>, mut io: glommio::net::TcpStream) {
    use futures_lite::{AsyncRead, AsyncWrite};
    std::future::poll_fn(|cx| {
        let Some(shared) = shared.upgrade() else {
            return Poll::Ready(());
        };
        // Only the driver holds it, for this poll: every Client is gone.
        let abandoned = Rc::strong_count(&shared) == 1;
        let mut conn = shared.conn.borrow_mut();
        if abandoned && conn.failed().is_none() {
            conn.close("client dropped");
        }
        for _ in 0..16 {
            let mut busy = false;
            while !conn.output().is_empty() {
                match Pin::new(&mut io).poll_write(cx, conn.output()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        conn.io_closed("write failed");
                        break;
                    }
                    Poll::Ready(Ok(n)) => {
                        conn.sent(n);
                        let sent = &shared.meter.sent;
                        sent.set(sent.get() + n as u64);
                    }
                    Poll::Pending => break,
                }
            }
            if conn.failed().is_some() && conn.output().is_empty() {
                drop(conn);
                wake_all(&shared);
                return Poll::Ready(());
            }
            match Pin::new(&mut io).poll_read(cx, conn.room()) {
                Poll::Ready(Ok(0)) => conn.io_closed("closed by the server"),
                Poll::Ready(Err(e)) => conn.io_closed(&format!("read failed: {e}")),
                Poll::Ready(Ok(n)) => {
                    conn.received(n);
                    let received = &shared.meter.received;
                    received.set(received.get() + n as u64);
                    shared.received.set(shared.received.get() + n as u64);
                    busy = true;
                }
                Poll::Pending => {}
            }
            let changed: Vec<u32> = conn.changed().collect();
            let room = conn.has_room();
            let failed = conn.failed().is_some();
            drop(conn);
            {
                let mut waiters = shared.waiters.borrow_mut();
                for id in changed {
                    if let Some(w) = waiters.remove(&id) {
                        w.wake();
                    }
                }
            }
            if room {
                for w in shared.waiting_for_room.borrow_mut().drain(..) {
                    w.wake();
                }
            }
            conn = shared.conn.borrow_mut();
            busy |= failed || !conn.output().is_empty();
            if !busy {
                *shared.driver.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
    let _ = futures_lite::AsyncWriteExt::close(&mut io).await;
}

fn wake_all(shared: &Shared) {
    for (_, w) in shared.waiters.borrow_mut().drain() {
        w.wake();
    }
    for w in shared.waiting_for_room.borrow_mut().drain(..) {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: Request<'static> = Request {
        method: b"POST",
        scheme: b"http",
        authority: b"node:1",
        path: b"/svc/Method",
        fields: &[(b"content-type", b"application/x"), (b"te", b"trailers")],
    };

    /// The frames a connection wrote since the last call (the preface skipped).
    fn frames(c: &mut Connection) -> Vec<(Header, Vec<u8>)> {
        let mut out = c.output().to_vec();
        c.sent(out.len());
        if out.starts_with(frame::PREFACE) {
            out.drain(..frame::PREFACE.len());
        }
        let mut frames = Vec::new();
        let mut pos = 0;
        while let Some(h) = Header::parse(&out[pos..]) {
            let start = pos + frame::HEADER_LEN;
            frames.push((h, out[start..start + h.len].to_vec()));
            pos = start + h.len;
        }
        assert_eq!(pos, out.len(), "whole frames only");
        frames
    }

    /// Feeds `bytes` to the connection as the server's.
    fn feed(c: &mut Connection, bytes: &[u8]) {
        for chunk in bytes.chunks(7) {
            let room = c.room();
            room[..chunk.len()].copy_from_slice(chunk);
            c.received(chunk.len());
        }
    }

    fn server_headers(enc: &mut Encoder, id: u32, fields: &[(&str, &str)], end: bool) -> Vec<u8> {
        let mut buf = Vec::new();
        let at = enc.open(&mut buf);
        for (n, v) in fields {
            enc.field(&mut buf, n.as_bytes(), v.as_bytes());
        }
        Encoder::close(
            &mut buf,
            at,
            id,
            if end { frame::END_STREAM } else { 0 },
            16_384,
        );
        buf
    }

    fn data(id: u32, body: &[u8], end: bool) -> Vec<u8> {
        let mut buf = Vec::new();
        frame::put_header(
            &mut buf,
            body.len(),
            frame::DATA,
            if end { frame::END_STREAM } else { 0 },
            id,
        );
        buf.extend_from_slice(body);
        buf
    }

    fn settings(params: &[(u16, u32)]) -> Vec<u8> {
        let mut buf = Vec::new();
        frame::put_settings(&mut buf, false, params);
        buf
    }

    #[test]
    fn a_request_and_its_response_with_trailers() {
        let mut c = Connection::new(&[(b"te", b"trailers")]);
        let first = frames(&mut c);
        assert_eq!(first[0].0.kind, frame::SETTINGS);
        assert_eq!(first[1].0.kind, frame::WINDOW_UPDATE);
        let id = c.start(&REQ, b"hello", true).unwrap();
        assert_eq!(id, 1);
        let sent = frames(&mut c);
        assert_eq!(sent[0].0.kind, frame::HEADERS);
        assert_eq!(sent[0].0.flags, frame::END_HEADERS);
        let mut fields = Vec::new();
        Decoder::new(4096)
            .decode(&sent[0].1, |n, v| {
                fields.push((
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                ))
            })
            .unwrap();
        let want: Vec<(String, String)> = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/svc/Method"),
            (":authority", "node:1"),
            ("content-type", "application/x"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        assert_eq!(fields, want);
        assert_eq!(
            (sent[1].0.kind, sent[1].0.flags),
            (frame::DATA, frame::END_STREAM)
        );
        assert_eq!(sent[1].1, b"hello");

        let mut enc = Encoder::new(&[]);
        let mut reply = settings(&[]);
        reply.extend(server_headers(
            &mut enc,
            1,
            &[(":status", "200"), ("content-type", "x")],
            false,
        ));
        reply.extend(data(1, b"wor", false));
        reply.extend(data(1, b"ld", false));
        reply.extend(server_headers(&mut enc, 1, &[("grpc-status", "0")], true));
        feed(&mut c, &reply);
        assert!(c.changed().any(|i| i == 1));
        let r = c.finish(1).unwrap().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"world");
        assert_eq!(r.field(b"grpc-status"), Some(&b"0"[..]));
        assert_eq!(r.field(b"content-type"), Some(&b"x"[..]));
        assert_eq!(c.open_streams(), 0);
        // Our SETTINGS ACK for theirs.
        assert!(frames(&mut c)
            .iter()
            .any(|(h, _)| h.kind == frame::SETTINGS && h.flags == frame::ACK));
        // The second request's recurring field is one byte.
        c.start(&REQ, b"", true).unwrap();
        let again = frames(&mut c);
        assert_eq!(again[0].0.flags, frame::END_HEADERS | frame::END_STREAM);
        assert_eq!(*again[0].1.last().unwrap(), 0x80 | 62);
    }

    #[test]
    fn a_body_waits_for_the_servers_window() {
        let mut c = Connection::new(&[]);
        feed(&mut c, &settings(&[(setting::INITIAL_WINDOW_SIZE, 10)]));
        frames(&mut c);
        c.start(&REQ, &[7; 25], true).unwrap();
        let sent = frames(&mut c);
        assert_eq!(sent.len(), 2);
        assert_eq!((sent[1].1.len(), sent[1].0.flags), (10, 0));
        let mut update = Vec::new();
        frame::put_window_update(&mut update, 1, 100);
        feed(&mut c, &update);
        let rest = frames(&mut c);
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].1.len(), rest[0].0.flags), (15, frame::END_STREAM));
    }

    #[test]
    fn credit_goes_back_as_the_caller_takes_the_body() {
        let mut c = Connection::new(&[]);
        frames(&mut c);
        c.start(&REQ, b"", true).unwrap();
        frames(&mut c);
        let mut enc = Encoder::new(&[]);
        let mut reply = server_headers(&mut enc, 1, &[(":status", "200")], false);
        for _ in 0..10 {
            reply.extend(data(1, &[1; 16_000], false));
        }
        feed(&mut c, &reply);
        assert!(
            frames(&mut c)
                .iter()
                .all(|(h, _)| h.kind != frame::WINDOW_UPDATE),
            "nothing is credited before it is consumed"
        );
        let mut body = Vec::new();
        c.take_body(1, &mut body);
        assert_eq!(body.len(), 160_000);
        let credit: Vec<(u32, u32)> = frames(&mut c)
            .iter()
            .filter(|(h, _)| h.kind == frame::WINDOW_UPDATE)
            .map(|(h, p)| (h.id, u32::from_be_bytes([p[0], p[1], p[2], p[3]])))
            .collect();
        assert_eq!(credit, vec![(1, 160_000), (0, 160_000)]);
        // A stream that overruns its window is reset, not buffered.
        let mut flood = Vec::new();
        for _ in 0..70 {
            flood.extend(data(1, &[1; 16_000], false));
        }
        feed(&mut c, &flood);
        assert_eq!(
            c.finish(1),
            Some(Err(Error::Reset(code::FLOW_CONTROL_ERROR)))
        );
    }

    #[test]
    fn goaway_refuses_the_streams_it_did_not_take_and_resets_fail_theirs() {
        let mut c = Connection::new(&[]);
        for _ in 0..3 {
            c.start(&REQ, b"x", true).unwrap();
        }
        let mut reset = Vec::new();
        frame::put_reset(&mut reset, 1, code::INTERNAL_ERROR);
        frame::put_goaway(&mut reset, 3, code::NO_ERROR);
        feed(&mut c, &reset);
        assert_eq!(c.finish(1), Some(Err(Error::Reset(code::INTERNAL_ERROR))));
        assert_eq!(c.finish(3), None, "stream 3 is still served");
        assert_eq!(c.finish(5), Some(Err(Error::Refused)));
        assert_eq!(c.start(&REQ, b"", true), Err(Error::Refused));
    }

    #[test]
    fn streams_wait_for_room_and_protocol_errors_end_the_connection() {
        let mut c = Connection::new(&[]);
        feed(&mut c, &settings(&[(setting::MAX_CONCURRENT_STREAMS, 1)]));
        c.start(&REQ, b"", true).unwrap();
        assert_eq!(c.start(&REQ, b"", true), Err(Error::Busy));
        assert!(!c.has_room());
        frames(&mut c);
        // DATA for a stream we never opened.
        feed(&mut c, &data(9, b"x", false));
        assert!(c.failed().is_some());
        assert!(matches!(c.finish(1), Some(Err(Error::Closed(_)))));
        let goaway = frames(&mut c);
        assert_eq!(goaway.last().unwrap().0.kind, frame::GOAWAY);
        assert!(matches!(c.start(&REQ, b"", true), Err(Error::Closed(_))));
    }

    #[test]
    fn a_cancelled_stream_is_reset_and_its_late_data_credited() {
        let mut c = Connection::new(&[]);
        c.start(&REQ, b"", true).unwrap();
        frames(&mut c);
        c.cancel(1);
        let sent = frames(&mut c);
        assert_eq!(sent[0].0.kind, frame::RST_STREAM);
        assert_eq!(sent[0].1, code::CANCEL.to_be_bytes());
        let mut enc = Encoder::new(&[]);
        let mut late = server_headers(&mut enc, 1, &[(":status", "200")], false);
        for _ in 0..5 {
            late.extend(data(1, &[0; 16_000], false));
        }
        feed(&mut c, &late);
        assert!(c.failed().is_none());
        assert!(frames(&mut c)
            .iter()
            .any(|(h, _)| h.kind == frame::WINDOW_UPDATE && h.id == 0));
    }
}
