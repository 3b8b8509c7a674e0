//! A server stream's state (what it received, what it has to send, its windows) and how a
//! stream ends: answered, reset by either side, or forgotten once its owner's work is over.
//! Runs on the connection's executor thread, as its [`Connection`] does.

use super::{Connection, RECENTLY_RESET};
use crate::frame::{self, code};
use bytes::Bytes;
use std::collections::hash_map::Entry;

/// One stream's protocol state, and its owner's.
pub(super) struct Stream<T> {
    pub(super) state: T,
    /// END_STREAM not received yet.
    pub(super) recv_open: bool,
    /// Request bytes consumed since the window was last replenished.
    pub(super) recv_unacked: u32,
    /// What the client may still send on it: more is a FLOW_CONTROL_ERROR.
    pub(super) recv_window: i64,
    /// The owner returns the window itself, as it consumes ([`Connection::release`]).
    pub(super) manual_credit: bool,
    pub(super) send_window: i64,
    pub(super) send: Send,
    /// In `Connection::blocked`, waiting for window.
    pub(super) blocked: bool,
    /// Reset by the client: nothing is sent on it, and it stays until the owner forgets it.
    pub(super) reset: bool,
    /// The request's content-length, checked against its DATA at END_STREAM.
    pub(super) content_length: Option<u64>,
    pub(super) body_bytes: u64,
}

/// What a stream has to send.
pub(super) enum Send {
    /// Nothing waiting; the reply goes on.
    Open,
    /// `data` waiting for window, then `then`.
    Queued { data: Bytes, then: Then },
    /// END_STREAM sent.
    Done,
}

pub(super) enum Then {
    /// More may follow.
    More,
    /// An empty DATA frame with END_STREAM.
    End,
    /// Trailers, which end the stream.
    Trailers(Vec<(Vec<u8>, Vec<u8>)>),
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

    pub(super) fn close_if_done(&mut self, id: u32) {
        if let Entry::Occupied(e) = self.streams.entry(id) {
            let s = e.get();
            if !s.recv_open && matches!(s.send, Send::Done) && !s.reset {
                e.remove();
            }
        }
    }

    /// Our RST_STREAM on `id`, remembered so that what the client sent before it saw it is
    /// ignored.
    pub(super) fn send_reset(&mut self, id: u32, error: u32) {
        self.reset_ids[self.reset_pos] = id;
        self.reset_pos = (self.reset_pos + 1) % RECENTLY_RESET;
        frame::put_reset(&mut self.wbuf, id, error);
    }
}
