//! What a server connection reads: the preface, then frame after frame, each checked as RFC
//! 9113 says and either handed to the owner as an [`Event`] or handled on the spot
//! (SETTINGS, PING, WINDOW_UPDATE). Runs on the connection's executor thread, when its owner
//! asks for the next event.

use super::{
    head::PSEUDO_REQUIRED,
    stream::{Send, Stream},
    Bound, Connection, Event, CONNECTION_WINDOW, MAX_FRAME, MAX_HEADER_LIST, MAX_STREAMS,
    STREAM_WINDOW,
};
use crate::frame::{self, code};
use std::time::Instant;

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

impl<T: Default> Connection<T> {
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
}
