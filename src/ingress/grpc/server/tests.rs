//! Unit tests of `server`: plain, no executor, no socket, each on the test harness's thread.

use super::*;
use crate::pb;
use http2::{
    frame,
    server::{MAX_FRAME, WRITE_HIGH_WATER},
};
use std::{cell::RefCell, rc::Rc, task::Waker};

/// Our calls answer a Get whose value is as long as the request message says (or wait,
/// when told to); forwarded requests are recorded and answered with a two-chunk body and
/// trailers.
#[derive(Clone, Default)]
struct Fake {
    value_len: Rc<RefCell<usize>>,
    hold: Rc<RefCell<Option<Vec<tokio::sync::oneshot::Sender<()>>>>>,
    forwarded: Rc<RefCell<Vec<http::Request<Body>>>>,
}

impl Service for Fake {
    fn call(&self, _: Method, message: &[u8], _: Instant, _: Instant) -> Call {
        let answer = Answer::Get(pb::GetResponse {
            payload: Some(pb::get_response::Payload::ValueBytes(vec![
                7;
                *self
                    .value_len
                    .borrow()
            ])),
            version: None,
        });
        let key_len = message.len();
        match self.hold.borrow_mut().as_mut() {
            Some(senders) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                senders.push(tx);
                Box::pin(async move {
                    let _ = rx.await;
                    Ok(answer)
                })
            }
            None if key_len == 0 => {
                Box::pin(std::future::ready(Err(Status::invalid_argument("empty"))))
            }
            None => Box::pin(std::future::ready(Ok(answer))),
        }
    }

    fn forward(&self, req: http::Request<Body>) -> Forwarded {
        self.forwarded.borrow_mut().push(req);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let chunks = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"first"))),
            Ok(http_body::Frame::data(Bytes::from_static(b"second"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c: Result<_, std::convert::Infallible>| c),
        ));
        let mut resp = http::Response::new(Body::new(body));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        Box::pin(std::future::ready(resp))
    }

    fn max_recv_msg_bytes(&self) -> usize {
        1000
    }

    fn rpc_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
}

/// A frame we sent, its header block decoded when it has one.
#[derive(Debug)]
struct Sent {
    kind: u8,
    flags: u8,
    id: u32,
    payload: Vec<u8>,
    fields: Vec<(String, String)>,
}

struct Peer {
    proto: h2::Server<Grpc<Fake>>,
    fake: Fake,
    encoder: loona_hpack::Encoder<'static>,
    decoder: loona_hpack::Decoder<'static>,
}

impl Peer {
    /// A connection past the preface and the SETTINGS exchange.
    fn new() -> Self {
        Self::with_settings(&[])
    }

    fn with_settings(settings: &[(u16, u32)]) -> Self {
        let fake = Fake::default();
        *fake.value_len.borrow_mut() = 10;
        let mut peer = Peer {
            proto: server(fake.clone()),
            fake,
            encoder: loona_hpack::Encoder::new(),
            decoder: loona_hpack::Decoder::new(),
        };
        let mut bytes = frame::PREFACE.to_vec();
        let mut payload = vec![];
        for (k, v) in settings {
            payload.extend_from_slice(&k.to_be_bytes());
            payload.extend_from_slice(&v.to_be_bytes());
        }
        frame::put_header(&mut bytes, payload.len(), frame::SETTINGS, 0, 0);
        bytes.extend_from_slice(&payload);
        peer.feed(&bytes);
        let sent = peer.sent();
        let kinds: Vec<_> = sent.iter().map(|f| (f.kind, f.flags)).collect();
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

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = self.proto.conn.room();
            let n = room.len().min(bytes.len());
            room[..n].copy_from_slice(&bytes[..n]);
            self.proto.received(n, Instant::now());
            bytes = &bytes[n..];
        }
        self.proto
            .poll_work(&mut Context::from_waker(Waker::noop()));
    }

    fn sent(&mut self) -> Vec<Sent> {
        self.proto
            .poll_work(&mut Context::from_waker(Waker::noop()));
        let out = self.proto.conn.output().to_vec();
        self.proto.conn.sent(out.len());
        let mut frames = vec![];
        let mut rest = &out[..];
        while !rest.is_empty() {
            let len = (rest[0] as usize) << 16 | (rest[1] as usize) << 8 | rest[2] as usize;
            let id = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = rest[frame::HEADER_LEN..frame::HEADER_LEN + len].to_vec();
            let fields = if rest[3] == frame::HEADERS {
                let fields = self.decoder.decode(&payload).expect("our HPACK decodes");
                fields
                    .into_iter()
                    .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                    .collect()
            } else {
                vec![]
            };
            frames.push(Sent {
                kind: rest[3],
                flags: rest[4],
                id,
                payload,
                fields,
            });
            rest = &rest[frame::HEADER_LEN + len..];
        }
        frames
    }

    fn headers(&mut self, id: u32, path: &str, flags: u8) -> Vec<u8> {
        let block = self.encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", b"4999998u"),
        ]);
        let mut bytes = vec![];
        frame::put_header(&mut bytes, block.len(), frame::HEADERS, flags, id);
        bytes.extend_from_slice(&block);
        bytes
    }

    /// A whole unary request: HEADERS, then DATA with the framed message and END_STREAM.
    fn request(&mut self, id: u32, message: &[u8]) -> Vec<u8> {
        let mut bytes = self.headers(id, "/pb.CacheService/Get", frame::END_HEADERS);
        let data = framed(message);
        frame::put_header(&mut bytes, data.len(), frame::DATA, frame::END_STREAM, id);
        bytes.extend_from_slice(&data);
        bytes
    }
}

fn framed(message: &[u8]) -> Vec<u8> {
    let mut data = vec![0];
    data.extend_from_slice(&(message.len() as u32).to_be_bytes());
    data.extend_from_slice(message);
    data
}

fn field<'a>(f: &'a Sent, name: &str) -> Option<&'a str> {
    f.fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn get_reply(value_len: usize) -> Vec<u8> {
    let mut buf = vec![];
    Answer::Get(pb::GetResponse {
        payload: Some(pb::get_response::Payload::ValueBytes(vec![7; value_len])),
        version: None,
    })
    .encode_framed(&mut buf);
    buf
}

/// The frames of a successful unary answer on `id`.
fn assert_answered(frames: &[Sent], id: u32, value_len: usize) {
    let mine: Vec<_> = frames.iter().filter(|f| f.id == id).collect();
    assert_eq!(mine.len(), 3, "{frames:?}");
    assert_eq!(mine[0].kind, frame::HEADERS);
    assert_eq!(field(mine[0], ":status"), Some("200"));
    assert_eq!(field(mine[0], "content-type"), Some("application/grpc"));
    assert_eq!((mine[1].kind, mine[1].flags), (frame::DATA, 0));
    assert_eq!(mine[1].payload, get_reply(value_len));
    assert_eq!(mine[2].kind, frame::HEADERS);
    assert_eq!(mine[2].flags, frame::END_HEADERS | frame::END_STREAM);
    assert_eq!(mine[2].fields, [("grpc-status".into(), "0".into())]);
}

#[test]
fn unary_calls_are_answered_and_the_second_answer_uses_the_peers_table() {
    let mut peer = Peer::new();
    let req = peer.request(1, b"key");
    peer.feed(&req);
    let first = peer.sent();
    assert_answered(&first, 1, 10);
    let req = peer.request(3, b"key");
    peer.feed(&req);
    let second = peer.sent();
    assert_answered(&second, 3, 10);
    // Indexed from the peer's dynamic table: one byte per field after the first time.
    assert_eq!(second[0].payload, [0x88, 0xbf], ":status 200, content-type");
    assert_eq!(second[2].payload, [0xbe], "grpc-status: 0");
    assert!(peer.proto.conn.stream_count() == 0, "both streams closed");
}

#[test]
fn a_request_split_over_continuation_padding_and_many_data_frames_is_served() {
    let mut peer = Peer::new();
    let whole = peer.headers(1, "/pb.CacheService/Get", 0);
    let block = &whole[frame::HEADER_LEN..];
    let (a, b) = block.split_at(block.len() / 2);
    let mut bytes = vec![];
    // HEADERS, padded, without END_HEADERS; then CONTINUATION.
    frame::put_header(
        &mut bytes,
        1 + a.len() + 3,
        frame::HEADERS,
        frame::PADDED,
        1,
    );
    bytes.push(3);
    bytes.extend_from_slice(a);
    bytes.extend_from_slice(&[0, 0, 0]);
    frame::put_header(
        &mut bytes,
        b.len(),
        frame::CONTINUATION,
        frame::END_HEADERS,
        1,
    );
    bytes.extend_from_slice(b);
    // The message one byte per DATA frame, every other one padded.
    let data = framed(b"some-key");
    for (i, byte) in data.iter().enumerate() {
        if i % 2 == 0 {
            frame::put_header(&mut bytes, 3, frame::DATA, frame::PADDED, 1);
            bytes.extend_from_slice(&[1, *byte, 0]);
        } else {
            frame::put_header(&mut bytes, 1, frame::DATA, 0, 1);
            bytes.push(*byte);
        }
    }
    frame::put_header(&mut bytes, 0, frame::DATA, frame::END_STREAM, 1);
    // Arriving one byte at a time, too.
    for b in &bytes {
        peer.feed(std::slice::from_ref(b));
    }
    assert_answered(&peer.sent(), 1, 10);
}

#[test]
fn the_answer_waits_for_end_stream_and_bad_messages_get_their_status() {
    let mut peer = Peer::new();
    let mut bytes = peer.headers(1, "/pb.CacheService/Get", frame::END_HEADERS);
    let data = framed(b"key");
    frame::put_header(&mut bytes, data.len(), frame::DATA, 0, 1);
    bytes.extend_from_slice(&data);
    peer.feed(&bytes);
    assert!(peer.sent().is_empty(), "answered before END_STREAM");

    let status_of = |peer: &mut Peer, id: u32, data: &[u8]| {
        let mut bytes = peer.headers(id, "/pb.CacheService/Get", frame::END_HEADERS);
        frame::put_header(&mut bytes, data.len(), frame::DATA, frame::END_STREAM, id);
        bytes.extend_from_slice(data);
        peer.feed(&bytes);
        let sent = peer.sent();
        assert_eq!(sent[0].flags, frame::END_HEADERS | frame::END_STREAM);
        field(&sent[0], "grpc-status").unwrap().to_string()
    };
    assert_eq!(status_of(&mut peer, 3, &[]), "13", "no message: INTERNAL");
    assert_eq!(
        status_of(&mut peer, 5, &[0, 0, 0, 0, 9, 1]),
        "13",
        "cut short"
    );
    assert_eq!(
        status_of(&mut peer, 7, &[1, 0, 0, 0, 0]),
        "12",
        "compressed"
    );
    assert_eq!(
        status_of(&mut peer, 9, &framed(b"")),
        "3",
        "the call's own error"
    );
}

#[test]
fn an_oversized_message_is_refused_from_its_prefix_alone() {
    let mut peer = Peer::new();
    let mut bytes = peer.headers(1, "/pb.CacheService/Get", frame::END_HEADERS);
    frame::put_header(&mut bytes, 5, frame::DATA, 0, 1);
    bytes.extend_from_slice(&[0, 0, 0, 0x03, 0xe9]); // 1001 bytes, the limit is 1000
    peer.feed(&bytes);
    let sent = peer.sent();
    assert_eq!(
        field(&sent[0], "grpc-status"),
        Some("8"),
        "RESOURCE_EXHAUSTED"
    );
    assert_eq!(sent[0].flags, frame::END_HEADERS | frame::END_STREAM);
    assert_eq!(
        (sent[1].kind, &sent[1].payload[..]),
        (frame::RST_STREAM, &[0, 0, 0, 0][..])
    );
    // What the client sent before it saw the reset is dropped quietly.
    let mut more = vec![];
    frame::put_header(&mut more, 3, frame::DATA, frame::END_STREAM, 1);
    more.extend_from_slice(b"abc");
    peer.feed(&more);
    assert!(peer.sent().is_empty());
}

#[test]
fn replies_respect_the_peers_windows_and_frame_size() {
    // A stream window of 100 bytes; a 100,000-byte reply; frames of at most 16,384.
    let mut peer = Peer::with_settings(&[(0x4, 100)]);
    *peer.fake.value_len.borrow_mut() = 100_000;
    let req = peer.request(1, b"key");
    peer.feed(&req);
    let sent = peer.sent();
    let data: usize = sent
        .iter()
        .filter(|f| f.kind == frame::DATA)
        .map(|f| f.payload.len())
        .sum();
    assert_eq!(data, 100, "{sent:?}");
    let mut update = vec![];
    frame::put_header(&mut update, 4, frame::WINDOW_UPDATE, 0, 1);
    update.extend_from_slice(&1_000_000u32.to_be_bytes());
    peer.feed(&update);
    // The connection window (65,535) stops it next.
    let sent = peer.sent();
    let sizes: Vec<_> = sent
        .iter()
        .filter(|f| f.kind == frame::DATA)
        .map(|f| f.payload.len())
        .collect();
    assert!(sizes.iter().all(|&n| n <= MAX_FRAME), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 65_535 - 100);
    assert!(
        sent.iter().all(|f| f.kind == frame::DATA),
        "no trailers yet"
    );
    let mut update = vec![];
    frame::put_header(&mut update, 4, frame::WINDOW_UPDATE, 0, 0);
    update.extend_from_slice(&1_000_000u32.to_be_bytes());
    peer.feed(&update);
    let sent = peer.sent();
    let last = sent.last().unwrap();
    assert_eq!(field(last, "grpc-status"), Some("0"));
    let total = 65_535
        + sent
            .iter()
            .filter(|f| f.kind == frame::DATA)
            .map(|f| f.payload.len())
            .sum::<usize>();
    assert_eq!(total, get_reply(100_000).len());
}

#[test]
fn ping_settings_and_unknown_frames() {
    let mut peer = Peer::new();
    let mut bytes = vec![];
    frame::put_header(&mut bytes, 8, frame::PING, 0, 0);
    bytes.extend_from_slice(b"12345678");
    frame::put_header(&mut bytes, 3, 0xee, 0, 0); // unknown type: ignored
    bytes.extend_from_slice(b"xyz");
    frame::put_header(&mut bytes, 0, frame::SETTINGS, frame::ACK, 0);
    peer.feed(&bytes);
    let sent = peer.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!((sent[0].kind, sent[0].flags), (frame::PING, frame::ACK));
    assert_eq!(sent[0].payload, b"12345678");
}

#[test]
fn protocol_errors_end_the_connection_with_goaway() {
    for bad in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        [
            frame::PREFACE,
            &[0, 0, 1, frame::SETTINGS, 0, 0, 0, 0, 0, 9],
        ]
        .concat(), // length not x6
        [frame::PREFACE, &[0, 0x40, 1, frame::DATA, 0, 0, 0, 0, 1]].concat(), // over MAX_FRAME
    ] {
        let mut proto = server(Fake::default());
        let room = proto.conn.room();
        room[..bad.len()].copy_from_slice(&bad);
        proto.received(bad.len(), Instant::now());
        assert_eq!(proto.finished(), Some(Ended::Closed));
        assert!(!proto.conn.wants_input());
        let out = proto.conn.output();
        let goaway = out.len() - frame::HEADER_LEN - 8;
        assert_eq!(out[goaway + 3], frame::GOAWAY, "{out:?}");
    }
}

#[test]
fn a_graceful_goaway_lets_open_streams_finish_and_refuses_new_ones() {
    let mut peer = Peer::new();
    *peer.fake.hold.borrow_mut() = Some(vec![]);
    let req = peer.request(1, b"key");
    peer.feed(&req);
    assert!(peer.sent().is_empty());
    peer.proto.conn.go_away(code::NO_ERROR);
    let sent = peer.sent();
    assert_eq!(sent[0].kind, frame::GOAWAY);
    assert_eq!(sent[0].payload[..4], 1u32.to_be_bytes(), "last stream id 1");
    let req = peer.request(3, b"key");
    peer.feed(&req);
    assert!(peer.sent().is_empty(), "stream 3 is not served");
    assert_eq!(peer.proto.finished(), None, "stream 1 is under way");
    for tx in peer.fake.hold.borrow_mut().take().unwrap() {
        tx.send(()).unwrap();
    }
    assert_answered(&peer.sent(), 1, 10);
    assert_eq!(peer.proto.finished(), Some(Ended::GoneAway));
}

#[test]
fn a_reset_stream_is_never_answered_and_streams_are_limited() {
    let mut peer = Peer::new();
    *peer.fake.hold.borrow_mut() = Some(vec![]);
    for i in 0..MAX_STREAMS as u32 {
        let req = peer.request(2 * i + 1, b"key");
        peer.feed(&req);
    }
    assert!(peer.sent().is_empty());
    let over = 2 * MAX_STREAMS as u32 + 1;
    let req = peer.request(over, b"key");
    peer.feed(&req);
    let sent = peer.sent();
    assert_eq!((sent[0].kind, sent[0].id), (frame::RST_STREAM, over));
    assert_eq!(sent[0].payload, code::REFUSED_STREAM.to_be_bytes());
    let mut rst = vec![];
    frame::put_header(&mut rst, 4, frame::RST_STREAM, 0, 1);
    let cancel: u32 = 0x8; // CANCEL, which the server itself never sends
    rst.extend_from_slice(&cancel.to_be_bytes());
    peer.feed(&rst);
    // The reset call still runs: its slot is not free (the Rapid Reset attack opens a new
    // stream for every one it resets).
    let again = 2 * MAX_STREAMS as u32 + 3;
    let req = peer.request(again, b"key");
    peer.feed(&req);
    let sent = peer.sent();
    assert_eq!((sent[0].kind, sent[0].id), (frame::RST_STREAM, again));
    assert_eq!(sent[0].payload, code::REFUSED_STREAM.to_be_bytes());
    for tx in peer.fake.hold.borrow_mut().take().unwrap() {
        tx.send(()).unwrap();
    }
    let sent = peer.sent();
    assert!(sent.iter().all(|f| f.id != 1), "stream 1 was reset");
    assert_eq!(
        sent.iter().filter(|f| f.kind == frame::DATA).count(),
        MAX_STREAMS - 1
    );
    assert!(peer.proto.conn.stream_count() == 0);
}

#[test]
fn a_flood_of_resets_or_pings_is_told_to_calm_down() {
    let limit = Limits::default().protocol.resets_per_sec;
    let mut peer = Peer::new();
    let mut bytes = vec![];
    for i in 0..=limit {
        let id = 2 * i + 1;
        bytes.extend(peer.request(id, b"key"));
        frame::put_header(&mut bytes, 4, frame::RST_STREAM, 0, id);
        bytes.extend_from_slice(&0x8u32.to_be_bytes());
    }
    peer.feed(&bytes);
    let sent = peer.sent();
    let last = sent.last().expect("a GOAWAY");
    assert_eq!(last.kind, frame::GOAWAY);
    assert_eq!(last.payload[4..], code::ENHANCE_YOUR_CALM.to_be_bytes());
    assert!(peer.proto.finished().is_some(), "the connection closes");

    let mut peer = Peer::new();
    let mut bytes = vec![];
    for _ in 0..=Limits::default().protocol.control_frames_per_sec {
        frame::put_header(&mut bytes, 8, frame::PING, 0, 0);
        bytes.extend_from_slice(&[0; 8]);
    }
    peer.feed(&bytes);
    let sent = peer.sent();
    let last = sent.last().expect("a GOAWAY");
    assert_eq!(last.kind, frame::GOAWAY);
    assert_eq!(last.payload[4..], code::ENHANCE_YOUR_CALM.to_be_bytes());
}

#[test]
fn other_requests_are_forwarded_and_their_bodies_streamed_back() {
    let mut peer = Peer::new();
    let mut bytes = peer.headers(1, "/grpc.health.v1.Health/Check", frame::END_HEADERS);
    frame::put_header(&mut bytes, 4, frame::DATA, 0, 1);
    bytes.extend_from_slice(b"abcd");
    frame::put_header(&mut bytes, 2, frame::DATA, frame::END_STREAM, 1);
    bytes.extend_from_slice(b"ef");
    peer.feed(&bytes);
    let sent = peer.sent();
    let kinds: Vec<_> = sent.iter().map(|f| f.kind).collect();
    assert_eq!(
        kinds,
        [frame::HEADERS, frame::DATA, frame::DATA, frame::HEADERS]
    );
    assert_eq!(sent[1].payload, b"first");
    assert_eq!(sent[2].payload, b"second");
    assert_eq!(field(&sent[3], "grpc-status"), Some("0"));
    assert_eq!(sent[3].flags, frame::END_HEADERS | frame::END_STREAM);

    let req = peer.fake.forwarded.borrow_mut().pop().unwrap();
    assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
    assert_eq!(req.uri().authority().unwrap().as_str(), "localhost");
    assert_eq!(req.method(), http::Method::POST);
    assert_eq!(req.headers()["te"], "trailers");
    assert_eq!(req.headers()["grpc-timeout"], "4999998u");
    let mut body = req.into_body();
    let mut got = vec![];
    let mut cx = Context::from_waker(Waker::noop());
    while let Poll::Ready(Some(Ok(frame))) =
        http_body::Body::poll_frame(Pin::new(&mut body), &mut cx)
    {
        got.extend_from_slice(&frame.into_data().unwrap());
    }
    assert_eq!(got, b"abcdef");
    assert!(peer.proto.conn.stream_count() == 0);
}

mod fuzz {
    //! Arbitrary frame sequences against the connection (a coverage-guided fuzzer needs a
    //! nightly toolchain; these run on stable). A fixed budget in CI; for long runs:
    //! `PROPTEST_CASES=100000 cargo test --release --lib grpc::server::tests::fuzz`.
    //! Invariants: no panic; streams, forwarded requests and held reply bytes within their
    //! bounds at every step; once the calls are released, every stream has ended but
    //! those still waiting for the client (request data, or window).
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Headers {
            id: u32,
            path: u8,
            end_stream: bool,
            end_headers: bool,
            priority: bool,
            padded: bool,
        },
        Data {
            id: u32,
            len: usize,
            framed: bool,
            end_stream: bool,
            padded: bool,
        },
        Continuation {
            id: u32,
            end_headers: bool,
            bytes: Vec<u8>,
        },
        Reset(u32, u32),
        Settings(Vec<(u16, u32)>, bool),
        WindowUpdate(u32, u32),
        Ping(bool),
        Priority(u32, u8, u32),
        GoAway,
        Unknown(u8, Vec<u8>),
        Garbage(Vec<u8>),
        /// Answer the calls held so far.
        Release,
        /// The client stops or starts reading what the node sends.
        Reading(bool),
    }

    fn id() -> impl Strategy<Value = u32> {
        prop_oneof![8 => 1u32..40, 1 => 0u32..8]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (id(), 0u8..6, any::<bool>(), prop::bool::weighted(0.97), any::<bool>(), any::<bool>())
                .prop_map(|(id, path, end_stream, end_headers, priority, padded)| Step::Headers {
                    id, path, end_stream, end_headers, priority, padded
                }),
            6 => (id(), prop_oneof![0usize..32, 0usize..40_000], prop::bool::weighted(0.7), any::<bool>(), any::<bool>())
                .prop_map(|(id, len, framed, end_stream, padded)| Step::Data {
                    id, len, framed, end_stream, padded
                }),
            1 => (id(), any::<bool>(), proptest::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(id, end_headers, bytes)| Step::Continuation { id, end_headers, bytes }),
            3 => (id(), 0u32..14).prop_map(|(id, code)| Step::Reset(id, code)),
            4 => (proptest::collection::vec(prop_oneof![
                    (Just(1u16), 0u32..8192),
                    (Just(3u16), 0u32..300),
                    (Just(4u16), 0u32..70_000),
                    (Just(5u16), 16_384u32..40_000),
                    (Just(6u16), any::<u32>()),
                ], 0..4), prop::bool::weighted(0.2))
                .prop_map(|(e, ack)| Step::Settings(e, ack)),
            1 => (proptest::collection::vec((0u16..8, any::<u32>()), 0..6), Just(false))
                .prop_map(|(e, ack)| Step::Settings(e, ack)),
            2 => (id(), prop_oneof![0u32..100_000, any::<u32>()]).prop_map(|(id, n)| Step::WindowUpdate(id, n)),
            1 => any::<bool>().prop_map(Step::Ping),
            1 => (id(), 3u8..7, id()).prop_map(|(id, len, dep)| Step::Priority(id, len, dep)),
            1 => Just(Step::GoAway),
            1 => (10u8..=255, proptest::collection::vec(any::<u8>(), 0..32)).prop_map(|(k, b)| Step::Unknown(k, b)),
            1 => proptest::collection::vec(any::<u8>(), 1..24).prop_map(Step::Garbage),
            24 => (0u32..40, 0u8..3, prop::bool::weighted(0.8)).prop_map(|(id, path, end_stream)| Step::Headers {
                id, path, end_stream, end_headers: true, priority: false, padded: false
            }),
            24 => (1u32..40, 0usize..32).prop_map(|(id, len)| Step::Data {
                id, len, framed: true, end_stream: true, padded: false
            }),
            2 => Just(Step::Release),
            1 => any::<bool>().prop_map(Step::Reading),
        ]
    }

    const PATHS: [&str; 6] = [
        "/pb.CacheService/Get",
        "/pb.CacheService/Set",
        "/pb.CacheService/Delete",
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/nowhere",
    ];

    fn frame_bytes(encoder: &mut loona_hpack::Encoder<'static>, step: &Step) -> Vec<u8> {
        let mut out = vec![];
        let pad = |flags: &mut u8, payload: &mut Vec<u8>, padded: bool| {
            if padded {
                *flags |= frame::PADDED;
                payload.insert(0, 3);
                payload.extend_from_slice(&[0, 0, 0]);
            }
        };
        match step {
            Step::Headers {
                id,
                path,
                end_stream,
                end_headers,
                priority,
                padded,
            } => {
                let mut payload = encoder.encode([
                    (&b":method"[..], &b"POST"[..]),
                    (b":scheme", b"http"),
                    (b":path", PATHS[*path as usize].as_bytes()),
                    (b"content-type", b"application/grpc"),
                    (b"te", b"trailers"),
                ]);
                let mut flags = 0;
                if *priority {
                    flags |= frame::PRIORITY_FLAG;
                    let mut p = 1u32.to_be_bytes().to_vec();
                    p.push(15);
                    payload.splice(0..0, p);
                }
                pad(&mut flags, &mut payload, *padded);
                if *end_stream {
                    flags |= frame::END_STREAM;
                }
                if *end_headers {
                    flags |= frame::END_HEADERS;
                }
                frame::put_header(&mut out, payload.len(), frame::HEADERS, flags, *id);
                out.extend_from_slice(&payload);
            }
            Step::Data {
                id,
                len,
                framed: f,
                end_stream,
                padded,
            } => {
                let mut payload = if *f {
                    let mut m = vec![0x0a, (*len).min(120) as u8];
                    m.extend(std::iter::repeat_n(b'k', (*len).min(120)));
                    framed(&m)
                } else {
                    vec![0; (*len).min(MAX_FRAME - 8)]
                };
                let mut flags = if *end_stream { frame::END_STREAM } else { 0 };
                pad(&mut flags, &mut payload, *padded);
                frame::put_header(&mut out, payload.len(), frame::DATA, flags, *id);
                out.extend_from_slice(&payload);
            }
            Step::Continuation {
                id,
                end_headers,
                bytes,
            } => {
                let flags = if *end_headers { frame::END_HEADERS } else { 0 };
                frame::put_header(&mut out, bytes.len(), frame::CONTINUATION, flags, *id);
                out.extend_from_slice(bytes);
            }
            Step::Reset(id, code) => frame::put_reset(&mut out, *id, *code),
            Step::Settings(entries, ack) => {
                let flags = if *ack { frame::ACK } else { 0 };
                let n = if *ack { 0 } else { entries.len() };
                frame::put_header(&mut out, n * 6, frame::SETTINGS, flags, 0);
                for (k, v) in entries.iter().take(n) {
                    out.extend_from_slice(&k.to_be_bytes());
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Step::WindowUpdate(id, n) => frame::put_window_update(&mut out, *id, *n),
            Step::Ping(ack) => {
                frame::put_header(
                    &mut out,
                    8,
                    frame::PING,
                    if *ack { frame::ACK } else { 0 },
                    0,
                );
                out.extend_from_slice(&[1; 8]);
            }
            Step::Priority(id, len, dep) => {
                frame::put_header(&mut out, *len as usize, frame::PRIORITY, 0, *id);
                let mut p = dep.to_be_bytes().to_vec();
                p.push(7);
                p.resize(*len as usize, 0);
                out.extend_from_slice(&p);
            }
            Step::GoAway => {
                frame::put_header(&mut out, 8, frame::GOAWAY, 0, 0);
                out.extend_from_slice(&[0; 8]);
            }
            Step::Unknown(kind, bytes) => {
                frame::put_header(&mut out, bytes.len(), *kind, 0, 1);
                out.extend_from_slice(bytes);
            }
            Step::Garbage(bytes) => out.extend_from_slice(bytes),
            Step::Release | Step::Reading(_) => {}
        }
        out
    }

    fn step_id(step: &Step) -> u32 {
        match step {
            Step::Data { id, .. } | Step::Reset(id, _) => *id,
            _ => 0,
        }
    }

    fn check_bounds(proto: &h2::Server<Grpc<Fake>>) -> Result<(), TestCaseError> {
        prop_assert!(
            proto.conn.stream_count() <= MAX_STREAMS,
            "{} streams",
            proto.conn.stream_count()
        );
        prop_assert!(proto.app.forwarded.len() <= MAX_FORWARDED);
        let bound = proto.app.limits.conn_reply_bytes + WRITE_HIGH_WATER + 4 * MAX_FRAME;
        prop_assert!(
            proto.conn.reply_bytes() <= bound,
            "{} reply bytes held",
            proto.conn.reply_bytes()
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512)
        ))]

        #[test]
        fn arbitrary_frames_keep_every_bound_and_every_stream_ends(
            steps in proptest::collection::vec(step(), 1..80),
            hold in any::<bool>(),
            big in prop::bool::weighted(0.2),
        ) {
            let fake = Fake::default();
            *fake.value_len.borrow_mut() = if big { 900 } else { 10 };
            if hold {
                *fake.hold.borrow_mut() = Some(vec![]);
            }
            let mut proto = server(fake.clone());
            let mut encoder = loona_hpack::Encoder::new();
            let mut reading = true;
            let mut input = frame::PREFACE.to_vec();
            frame::put_header(&mut input, 0, frame::SETTINGS, 0, 0);
            let cx = &mut Context::from_waker(std::task::Waker::noop());
            // Ids as a client uses them: new streams in increasing order, frames on the
            // streams opened so far; now and then an id of the raw step, valid or not.
            let (mut next_id, mut opened) = (1u32, Vec::<u32>::new());
            // Before any stream is open, a frame for one goes to a stream yet to come
            // (an idle stream: a protocol error) only with a raw id.
            let on_open = |opened: &Vec<u32>, raw: u32| -> u32 {
                match opened.len() {
                    _ if raw % 19 == 0 => raw,
                    0 => 1 + 2 * (raw % 3),
                    n => opened[raw as usize % n],
                }
            };
            let steps: Vec<Step> = steps
                .into_iter()
                .map(|step| match step {
                    Step::Headers { id, path, end_stream, end_headers, priority, padded } => {
                        let id = if id % 13 != 0 {
                            next_id += 2;
                            opened.push(next_id - 2);
                            next_id - 2
                        } else {
                            on_open(&opened, id)
                        };
                        Step::Headers { id, path, end_stream, end_headers, priority, padded }
                    }
                    Step::Data { .. } | Step::Reset(..) if opened.is_empty() && step_id(&step) % 19 != 0 => {
                        Step::Ping(false)
                    }
                    Step::Data { id, len, framed, end_stream, padded } => {
                        Step::Data { id: on_open(&opened, id), len, framed, end_stream, padded }
                    }
                    Step::Reset(id, code) => Step::Reset(on_open(&opened, id), code),
                    Step::WindowUpdate(id, n) => Step::WindowUpdate(on_open(&opened, id), n),
                    Step::Priority(id, len, dep) => Step::Priority(on_open(&opened, id), len, dep),
                    other => other,
                })
                .collect();
            for step in &steps {
                match step {
                    Step::Release => {
                        for tx in fake.hold.borrow_mut().iter_mut().flat_map(|v| v.drain(..)) {
                            let _ = tx.send(());
                        }
                    }
                    Step::Reading(r) => reading = *r,
                    _ => input.extend(frame_bytes(&mut encoder, step)),
                }
                // The node reads only while it wants input, as the connection does.
                while !input.is_empty() && proto.conn.wants_input() && proto.finished().is_none() {
                    let room = proto.conn.room();
                    let n = room.len().min(input.len());
                    room[..n].copy_from_slice(&input[..n]);
                    input.drain(..n);
                    proto.received(n, Instant::now());
                }
                proto.poll_work(cx);
                if reading {
                    let n = proto.conn.output().len();
                    proto.conn.sent(n);
                }
                check_bounds(&proto)?;
            }
            // Every call answered, every reply read.
            *fake.hold.borrow_mut() = None;
            for tx in fake.hold.borrow_mut().iter_mut().flat_map(|v| v.drain(..)) {
                let _ = tx.send(());
            }
            for _ in 0..4 {
                proto.poll_work(cx);
                let n = proto.conn.output().len();
                proto.conn.sent(n);
            }
            check_bounds(&proto)?;
            if proto.finished().is_none() {
                prop_assert!(!h2::App::working(&proto.app) || !proto.app.calls.is_empty() || !proto.app.bodies.is_empty(),
                    "fresh calls or forwarded requests left unpolled");
                let ids: Vec<u32> = proto.conn.states().map(|(id, _)| id).collect();
                for id in ids {
                    prop_assert!(proto.conn.waits_on_peer(id),
                        "stream {} ended, or reset and never forgotten, yet still held", id);
                }
            }
        }
    }
}
