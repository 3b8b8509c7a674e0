//! What a client connection reads: the server's frames, each checked as RFC 9113 says, its
//! responses assembled in their streams, and its SETTINGS, PING and GOAWAY answered. Runs on
//! the client's executor thread, in the driver task (from [`Connection::received`]).

use super::{Connection, Error, MAX_HEADER_BLOCK};
use crate::frame::{self, code, setting, Header};

impl Connection {
    pub(super) fn frame(&mut self, h: Header, payload: &[u8]) {
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
                // RFC 9113, 6.7: PING on a stream is a protocol error, a wrong length a frame
                // size error.
                if h.id != 0 {
                    return self.connection_error(code::PROTOCOL_ERROR, "PING on a stream");
                }
                if payload.len() != 8 {
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
    pub(super) fn end_stream(&mut self, id: u32, outcome: Result<(), Error>) {
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
                    let mut overflow = false;
                    for s in self.streams.values_mut() {
                        s.send_window += delta;
                        overflow |= s.send_window > frame::MAX_WINDOW;
                    }
                    // RFC 9113, 6.9.2: a change that takes any stream's window past the
                    // maximum is a connection error.
                    if overflow {
                        return self.connection_error(
                            code::FLOW_CONTROL_ERROR,
                            "initial window change overflows a stream's window",
                        );
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
}
