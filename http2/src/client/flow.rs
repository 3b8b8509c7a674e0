//! Flow control of a client connection both ways: request bodies go out as the server's
//! windows allow, the rest as its WINDOW_UPDATEs come, and the server gets credit back as
//! callers take the response bodies, in steps rather than per frame. Runs on the client's
//! executor thread, as its [`Connection`] does.

use super::{Connection, Error, CREDIT_STEP};
use crate::frame::{self, code, Header};

impl Connection {
    /// Sends what the windows allow of stream `id`'s pending body.
    pub(super) fn flush_stream(&mut self, id: u32) {
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
    pub(super) fn credit(&mut self, id: Option<u32>) {
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

    pub(super) fn window_update(&mut self, h: Header, payload: &[u8]) {
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
    pub(super) fn flush_all(&mut self) {
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
