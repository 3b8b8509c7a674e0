//! SETTINGS and bounds of a server connection: ours and the client's SETTINGS, the [`Limits`]
//! a user may change, the [`Bound`]s counted when a client meets one, and the token buckets
//! behind the per-second ones. Runs on the connection's executor thread, as its
//! [`Connection`] does.

use super::{
    Connection, CONNECTION_WINDOW, MAX_HEADER_LIST, MAX_SETTINGS_ENTRIES, MAX_STREAMS,
    STREAM_WINDOW,
};
use crate::frame::{self, code};
use std::time::{Duration, Instant};

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
pub(super) struct Bucket {
    tokens: f64,
    rate: f64,
    at: Instant,
}

impl Bucket {
    pub(super) fn new(rate: u32, now: Instant) -> Self {
        Bucket {
            tokens: rate as f64,
            rate: rate as f64,
            at: now,
        }
    }

    pub(super) fn take(&mut self, now: Instant) -> bool {
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

impl<T: Default> Connection<T> {
    /// Our SETTINGS, and the connection window raised from the protocol's 64 KiB.
    pub(super) fn greet(&mut self) {
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

    pub(super) fn settings(&mut self, flags: u8, id: u32, payload: &[u8]) {
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
}
