//! The connection driven by raw frames, its events read as an owner reads them, its
//! output decoded with loona-hpack (an HPACK nobody here wrote).
//! Plain unit tests: no executor, no socket, each on the test harness's thread.

use super::*;
use bytes::Bytes;

/// An event, owned.
#[derive(Debug, PartialEq)]
enum Got {
    Request {
        id: u32,
        method: String,
        path: String,
        fields: Vec<(String, String)>,
        end: bool,
    },
    Data {
        id: u32,
        len: usize,
        end: bool,
    },
    Reset(u32),
}

/// A frame the connection sent.
#[derive(Debug)]
struct Sent {
    kind: u8,
    flags: u8,
    id: u32,
    payload: Vec<u8>,
}

struct Peer {
    conn: Connection<u32>,
    encoder: loona_hpack::Encoder<'static>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Peer {
    /// Past the preface, SETTINGS and their acknowledgement.
    fn new(settings: &[(u16, u32)]) -> Self {
        let mut peer = Peer {
            conn: Connection::new(Limits::default(), &[]),
            encoder: loona_hpack::Encoder::new(),
        };
        let mut bytes = frame::PREFACE.to_vec();
        frame::put_settings(&mut bytes, false, settings);
        assert!(peer.feed(&bytes).is_empty());
        let kinds: Vec<_> = peer.sent().iter().map(|f| (f.kind, f.flags)).collect();
        assert_eq!(
            kinds,
            [
                (frame::SETTINGS, 0),
                (frame::WINDOW_UPDATE, 0),
                (frame::SETTINGS, frame::ACK)
            ]
        );
        peer
    }

    fn feed(&mut self, mut bytes: &[u8]) -> Vec<Got> {
        let mut got = vec![];
        while !bytes.is_empty() {
            let room = self.conn.room();
            let n = room.len().min(bytes.len());
            room[..n].copy_from_slice(&bytes[..n]);
            self.conn.received(n);
            bytes = &bytes[n..];
            while let Some(event) = self.conn.next_event(Instant::now()) {
                got.push(match event {
                    Event::Request { id, head, end } => Got::Request {
                        id,
                        method: text(head.method()),
                        path: text(head.path()),
                        fields: head.fields().map(|(n, v)| (text(n), text(v))).collect(),
                        end,
                    },
                    Event::Data {
                        id,
                        data,
                        end,
                        state,
                    } => {
                        *state += data.len() as u32;
                        Got::Data {
                            id,
                            len: data.len(),
                            end,
                        }
                    }
                    Event::Reset { id, .. } => Got::Reset(id),
                });
            }
        }
        got
    }

    fn sent(&mut self) -> Vec<Sent> {
        let out = self.conn.output().to_vec();
        self.conn.sent(out.len());
        let mut frames = vec![];
        let mut rest = &out[..];
        while let Some(h) = frame::Header::parse(rest) {
            let payload = rest[frame::HEADER_LEN..frame::HEADER_LEN + h.len].to_vec();
            frames.push(Sent {
                kind: h.kind,
                flags: h.flags,
                id: h.id,
                payload,
            });
            rest = &rest[frame::HEADER_LEN + h.len..];
        }
        frames
    }

    fn headers(&mut self, id: u32, fields: &[(&[u8], &[u8])], flags: u8) -> Vec<u8> {
        let block = self.encoder.encode(fields.iter().copied());
        let mut bytes = vec![];
        frame::put_header(&mut bytes, block.len(), frame::HEADERS, flags, id);
        bytes.extend_from_slice(&block);
        bytes
    }

    fn request(&mut self, id: u32, extra: &[(&[u8], &[u8])], flags: u8) -> Vec<u8> {
        let mut fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/echo"),
            (b":authority", b"localhost"),
        ];
        fields.extend_from_slice(extra);
        self.headers(id, &fields, flags | frame::END_HEADERS)
    }
}

fn data(id: u32, len: usize, flags: u8) -> Vec<u8> {
    let mut bytes = vec![];
    frame::put_header(&mut bytes, len, frame::DATA, flags, id);
    bytes.resize(bytes.len() + len, b'd');
    bytes
}

#[test]
fn a_request_comes_out_as_events_and_the_reply_goes_out_as_written() {
    let mut peer = Peer::new(&[]);
    let mut bytes = peer.request(1, &[(b"x-thing", b"one")], 0);
    bytes.extend(data(1, 3, 0));
    bytes.extend(data(1, 4, frame::END_STREAM));
    let got = peer.feed(&bytes);
    assert_eq!(
        got,
        [
            Got::Request {
                id: 1,
                method: "POST".into(),
                path: "/echo".into(),
                fields: vec![("x-thing".into(), "one".into())],
                end: false
            },
            Got::Data {
                id: 1,
                len: 3,
                end: false
            },
            Got::Data {
                id: 1,
                len: 4,
                end: true
            },
        ]
    );
    assert_eq!(peer.conn.state(1), Some(&mut 7));
    peer.conn
        .send_headers(1, 200, [(&b"content-type"[..], &b"text/plain"[..])], false);
    assert!(peer
        .conn
        .send_data_with(1, 5, |buf| buf.extend_from_slice(b"hello")));
    peer.conn.send_trailers(1, [(&b"x-done"[..], &b"yes"[..])]);
    assert_eq!(peer.conn.stream_count(), 0, "ended both ways");
    let sent = peer.sent();
    let mut decoder = loona_hpack::Decoder::new();
    let kinds: Vec<_> = sent.iter().map(|f| (f.kind, f.flags, f.id)).collect();
    assert_eq!(
        kinds,
        [
            (frame::HEADERS, frame::END_HEADERS, 1),
            (frame::DATA, 0, 1),
            (frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, 1),
        ]
    );
    let head = decoder.decode(&sent[0].payload).unwrap();
    assert_eq!(
        head,
        [
            (b":status".to_vec(), b"200".to_vec()),
            (b"content-type".to_vec(), b"text/plain".to_vec())
        ]
    );
    assert_eq!(sent[1].payload, b"hello");
    let trailers = decoder.decode(&sent[2].payload).unwrap();
    assert_eq!(trailers, [(b"x-done".to_vec(), b"yes".to_vec())]);
}

#[test]
fn malformed_requests_are_reset_and_never_reach_the_owner() {
    let bad: [&[(&[u8], &[u8])]; 6] = [
        &[(b"X-Upper", b"1")],
        &[(b"connection", b"keep-alive")],
        &[(b"te", b"gzip")],
        &[(b"x-crlf", b"a\r\nb")],
        &[(b"x-space", b" padded")],
        &[(b"content-length", b"abc")],
    ];
    for (i, extra) in bad.iter().enumerate() {
        let mut peer = Peer::new(&[]);
        let req = peer.request(1, extra, frame::END_STREAM);
        assert!(peer.feed(&req).is_empty(), "case {i} reached the owner");
        let sent = peer.sent();
        assert_eq!(
            (sent[0].kind, sent[0].id),
            (frame::RST_STREAM, 1),
            "case {i}"
        );
        assert_eq!(
            sent[0].payload,
            code::PROTOCOL_ERROR.to_be_bytes(),
            "case {i}"
        );
        // The connection goes on.
        let req = peer.request(3, &[], frame::END_STREAM);
        assert_eq!(peer.feed(&req).len(), 1, "case {i}");
    }
    let mut peer = Peer::new(&[]);
    let block = peer.headers(
        1,
        &[(b":method", b"GET"), (b":path", b"/")], // no :scheme
        frame::END_HEADERS | frame::END_STREAM,
    );
    assert!(peer.feed(&block).is_empty());
    assert_eq!(peer.sent()[0].kind, frame::RST_STREAM);
}

#[test]
fn a_field_repeated_from_the_peers_table_is_checked_once_and_a_bad_one_stays_bad() {
    let mut peer = Peer::new(&[]);
    // loona-hpack indexes every field, so the second request names each by its index.
    for id in [1, 3] {
        let req = peer.request(id, &[(b"x-ok", b"fine")], frame::END_STREAM);
        assert_eq!(peer.feed(&req).len(), 1, "stream {id}");
    }
    for id in [5, 7] {
        let req = peer.request(id, &[(b"x-bad", b"nul\0inside")], frame::END_STREAM);
        assert!(peer.feed(&req).is_empty(), "stream {id} reached the owner");
    }
    let resets: Vec<_> = peer
        .sent()
        .into_iter()
        .filter(|f| f.kind == frame::RST_STREAM)
        .map(|f| f.id)
        .collect();
    assert_eq!(resets, [5, 7]);
}

#[test]
fn a_consumer_that_takes_its_time_gets_window_only_as_it_releases() {
    let mut peer = Peer::new(&[]);
    let req = peer.request(1, &[], 0);
    peer.feed(&req);
    peer.conn.consume_manually(1);
    let mut bytes = vec![];
    for _ in 0..20 {
        bytes.extend(data(1, 16_384, 0));
    }
    assert_eq!(peer.feed(&bytes).len(), 20);
    let updates = |sent: Vec<Sent>| -> Vec<(u32, u32)> {
        sent.iter()
            .filter(|f| f.kind == frame::WINDOW_UPDATE)
            .map(|f| (f.id, u32::from_be_bytes(f.payload[..4].try_into().unwrap())))
            .collect()
    };
    assert_eq!(updates(peer.sent()), [], "nothing consumed yet");
    peer.conn.release(1, 100_000);
    assert_eq!(updates(peer.sent()), [], "under a quarter window");
    peer.conn.release(1, 227_680);
    assert_eq!(updates(peer.sent()), [(1, 327_680)]);
}

#[test]
fn a_stream_the_client_resets_keeps_its_slot_until_its_work_is_forgotten() {
    let mut peer = Peer::new(&[]);
    let req = peer.request(1, &[], frame::END_STREAM);
    peer.feed(&req);
    let mut rst = vec![];
    frame::put_reset(&mut rst, 1, code::CANCEL);
    assert_eq!(peer.feed(&rst), [Got::Reset(1)]);
    assert_eq!(peer.conn.stream_count(), 1);
    assert!(!peer.conn.is_live(1));
    peer.conn.send_headers(1, 200, [], true);
    assert!(peer.sent().is_empty(), "nothing is sent on a reset stream");
    peer.conn.forget(1);
    assert_eq!(peer.conn.stream_count(), 0);
}

#[test]
fn data_waits_for_the_peers_window_and_the_trailers_follow_it() {
    let mut peer = Peer::new(&[(frame::setting::INITIAL_WINDOW_SIZE, 10)]);
    let req = peer.request(1, &[], frame::END_STREAM);
    peer.feed(&req);
    peer.conn.send_headers(1, 200, [], false);
    assert!(!peer.conn.send_data_with(1, 25, |_| unreachable!()));
    peer.conn
        .send_data(1, Bytes::from_static(b"0123456789abcdefghijklmno"));
    peer.conn.send_trailers(1, [(&b"x-end"[..], &b"1"[..])]);
    assert!(peer.conn.is_queued(1));
    assert_eq!(peer.conn.reply_bytes(), peer.conn.output().len() + 15);
    let sent = peer.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        (sent[1].kind, &sent[1].payload[..]),
        (frame::DATA, &b"0123456789"[..])
    );
    let mut update = vec![];
    frame::put_window_update(&mut update, 1, 15);
    peer.feed(&update);
    let sent = peer.sent();
    let kinds: Vec<_> = sent.iter().map(|f| (f.kind, f.flags)).collect();
    assert_eq!(
        kinds,
        [
            (frame::DATA, 0),
            (frame::HEADERS, frame::END_HEADERS | frame::END_STREAM)
        ]
    );
    assert_eq!(sent[0].payload, b"abcdefghijklmno");
    assert_eq!(peer.conn.stream_count(), 0);
    assert_eq!(peer.conn.reply_bytes(), 0);
}
