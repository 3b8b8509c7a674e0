//! What a server connection writes on its streams, and flow control both ways: replies go out
//! as the client's windows allow (the rest waits in its stream, sent as WINDOW_UPDATEs come),
//! and the client's windows come back as the owner consumes. Runs on the connection's
//! executor thread.

use super::{
    stream::{Send, Then},
    Connection, MAX_FRAME, STREAM_WINDOW,
};
use crate::{
    frame::{self, code},
    hpack,
};
use bytes::Bytes;

impl<T: Default> Connection<T> {
    pub(super) fn peer_window_update(&mut self, id: u32, payload: &[u8]) {
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

    pub(super) fn unblock_all(&mut self) {
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
}
