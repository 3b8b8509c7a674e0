//! Frames (RFC 9113, section 4 and 6): their numbers, their 9-byte header, and the frames
//! small enough to be written whole in one call. Pure; called on each connection's thread.

/// What a client sends before anything else.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE until the peer says otherwise (and what we advertise).
pub const DEFAULT_MAX_FRAME: usize = 16_384;
/// The initial flow-control window of a connection and of a stream, until SETTINGS.
pub const DEFAULT_WINDOW: i64 = 65_535;
/// The largest flow-control window (2^31 - 1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

/// SETTINGS parameters (RFC 9113, 6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// Error codes (RFC 9113, section 7).
pub mod code {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const INTERNAL_ERROR: u32 = 0x2;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const STREAM_CLOSED: u32 = 0x5;
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// A frame's header, as read off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    /// The stream id, its reserved bit cleared.
    pub id: u32,
}

impl Header {
    /// The header at the start of `buf`, if all 9 bytes are there.
    pub fn parse(buf: &[u8]) -> Option<Header> {
        let h: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Header {
            len: (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize,
            kind: h[3],
            flags: h[4],
            id: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        })
    }
}

/// The 9 bytes of a frame header.
pub fn header(len: usize, kind: u8, flags: u8, id: u32) -> [u8; HEADER_LEN] {
    let id = id.to_be_bytes();
    [
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        kind,
        flags,
        id[0],
        id[1],
        id[2],
        id[3],
    ]
}

pub fn put_header(buf: &mut Vec<u8>, len: usize, kind: u8, flags: u8, id: u32) {
    buf.extend_from_slice(&header(len, kind, flags, id));
}

pub fn put_reset(buf: &mut Vec<u8>, id: u32, error: u32) {
    put_header(buf, 4, RST_STREAM, 0, id);
    buf.extend_from_slice(&error.to_be_bytes());
}

pub fn put_window_update(buf: &mut Vec<u8>, id: u32, n: u32) {
    put_header(buf, 4, WINDOW_UPDATE, 0, id);
    buf.extend_from_slice(&n.to_be_bytes());
}

/// A SETTINGS frame with `params` (an empty one with ACK when `ack`).
pub fn put_settings(buf: &mut Vec<u8>, ack: bool, params: &[(u16, u32)]) {
    put_header(
        buf,
        params.len() * 6,
        SETTINGS,
        if ack { ACK } else { 0 },
        0,
    );
    for (id, value) in params {
        buf.extend_from_slice(&id.to_be_bytes());
        buf.extend_from_slice(&value.to_be_bytes());
    }
}

pub fn put_ping(buf: &mut Vec<u8>, ack: bool, data: [u8; 8]) {
    put_header(buf, 8, PING, if ack { ACK } else { 0 }, 0);
    buf.extend_from_slice(&data);
}

pub fn put_goaway(buf: &mut Vec<u8>, last_id: u32, error: u32) {
    put_header(buf, 8, GOAWAY, 0, 0);
    buf.extend_from_slice(&last_id.to_be_bytes());
    buf.extend_from_slice(&error.to_be_bytes());
}

/// The (parameter, value) pairs of a SETTINGS payload; None if its length is not a multiple
/// of 6 (a FRAME_SIZE_ERROR).
pub fn settings(payload: &[u8]) -> Option<impl Iterator<Item = (u16, u32)> + '_> {
    (payload.len() % 6 == 0).then(|| {
        payload.chunks_exact(6).map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
    })
}

/// A frame's payload without its padding; None if the padding does not fit.
pub fn unpad(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    if flags & PADDED == 0 {
        return Some(payload);
    }
    let (&pad, rest) = payload.split_first()?;
    rest.len().checked_sub(pad as usize).map(|n| &rest[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_the_reserved_bit_is_ignored() {
        let h = header(0x01_02_03, HEADERS, END_HEADERS, 0x8000_0005);
        let parsed = Header::parse(&h).unwrap();
        assert_eq!(
            parsed,
            Header {
                len: 0x01_02_03,
                kind: HEADERS,
                flags: END_HEADERS,
                id: 5
            }
        );
        assert!(Header::parse(&h[..8]).is_none());
    }

    #[test]
    fn settings_and_padding() {
        let mut buf = Vec::new();
        put_settings(&mut buf, false, &[(setting::INITIAL_WINDOW_SIZE, 1 << 20)]);
        let h = Header::parse(&buf).unwrap();
        assert_eq!((h.len, h.kind), (6, SETTINGS));
        let params: Vec<_> = settings(&buf[HEADER_LEN..]).unwrap().collect();
        assert_eq!(params, vec![(setting::INITIAL_WINDOW_SIZE, 1 << 20)]);
        assert!(settings(&[0; 5]).is_none());
        assert_eq!(unpad(PADDED, &[2, b'a', 0, 0]), Some(&b"a"[..]));
        assert_eq!(unpad(PADDED, &[4, b'a', 0, 0]), None);
        assert_eq!(unpad(0, b"ab"), Some(&b"ab"[..]));
    }
}
