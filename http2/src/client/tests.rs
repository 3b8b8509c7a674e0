//! A client connection driven by hand: requests started, the server's frames fed in small
//! chunks, and what it wrote parsed back. Plain unit tests: no executor, no socket, each on
//! the test harness's thread.

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

/// The error code of the GOAWAY the connection wrote last.
fn goaway_code(c: &mut Connection) -> u32 {
    let sent = frames(c);
    let (h, payload) = sent.last().expect("a frame");
    assert_eq!(h.kind, frame::GOAWAY);
    u32::from_be_bytes(payload[4..8].try_into().unwrap())
}

#[test]
fn a_ping_on_a_stream_is_a_protocol_error_and_a_short_one_a_frame_size_error() {
    let mut c = Connection::new(&[]);
    frames(&mut c);
    let mut ping = Vec::new();
    frame::put_header(&mut ping, 8, frame::PING, 0, 1);
    ping.extend([0; 8]);
    feed(&mut c, &ping);
    assert!(c.failed().is_some());
    assert_eq!(goaway_code(&mut c), code::PROTOCOL_ERROR);

    let mut c = Connection::new(&[]);
    frames(&mut c);
    let mut short = Vec::new();
    frame::put_header(&mut short, 4, frame::PING, 0, 0);
    short.extend([0; 4]);
    feed(&mut c, &short);
    assert_eq!(goaway_code(&mut c), code::FRAME_SIZE_ERROR);
}

#[test]
fn an_initial_window_change_that_overflows_a_streams_window_is_a_flow_control_error() {
    let mut c = Connection::new(&[]);
    c.start(&REQ, b"x", true).unwrap();
    frames(&mut c);
    // The stream's window at the maximum: 65,535, less the 1-byte body, plus the rest.
    let mut update = Vec::new();
    frame::put_window_update(&mut update, 1, (frame::MAX_WINDOW - 65_534) as u32);
    feed(&mut c, &update);
    assert!(c.failed().is_none());
    feed(&mut c, &settings(&[(setting::INITIAL_WINDOW_SIZE, 65_536)]));
    assert!(c.failed().is_some());
    assert_eq!(goaway_code(&mut c), code::FLOW_CONTROL_ERROR);
}
