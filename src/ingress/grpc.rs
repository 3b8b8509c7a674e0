//! The `pb.CacheService` methods on one core: decode the request's message, validate, route to
//! the owning core (in place when it is this one, else one mesh hop), encode the reply. The only
//! module that sees prost types. Runs on every core's executor; nothing here locks, logs per
//! request or allocates beyond the decoded message and the reply.

use super::CoreCtx;
use crate::{
    cluster::replication::Level,
    engine::command::{Command, Reply, Request, Response},
    error::Error,
    observability::metrics::Cmd,
    pb,
    routing::{owner_core, shard_of, ShardId},
};
use executors::Handled;
use http::HeaderValue;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::{
    future::Future,
    rc::Rc,
    time::{Duration, Instant},
};
use tonic::{body::Body, Code, Status};

/// The deadline the client asked for in `grpc-timeout`, else now + RPC_TIMEOUT.
fn deadline_of(headers: &http::HeaderMap, now: Instant, default: Duration) -> Instant {
    headers
        .get("grpc-timeout")
        .and_then(parse_grpc_timeout)
        .map(|d| now + d)
        .unwrap_or(now + default)
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n), per the gRPC HTTP/2 spec.
pub fn parse_grpc_timeout(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// gRPC's length-prefixed message header: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// Runs one unary method: rate limit, decode, `f`, encode; counts it on this core. `cmd` is
/// None for node-to-node calls, which are neither rate limited nor counted as client requests.
///
/// The message is decoded straight from the request's DATA frames and the reply is one DATA
/// frame and the OK trailers: tonic's generic server path (a streaming decoder, an encoder
/// stream, two boxed bodies) cost 5-9% of the node's instructions per request under callgrind
/// (bench/RESULTS.md), for a call that is always one message each way.
async fn unary<M, R, F, Fut>(
    ctx: &Rc<CoreCtx>,
    cmd: Option<Cmd>,
    req: http::Request<Incoming>,
    f: F,
) -> http::Response<ReplyBody>
where
    M: prost::Message + Default,
    R: prost::Message,
    F: FnOnce(Rc<CoreCtx>, M, Instant) -> Fut,
    Fut: Future<Output = Result<R, Error>>,
{
    let start = Instant::now();
    let result = async {
        if let (Some(limiter), Some(_)) = (&ctx.limiter, cmd) {
            if limiter.check().is_err() {
                ctx.metrics.rate_limited();
                return Err(Status::from(Error::RateLimited));
            }
        }
        let deadline = deadline_of(req.headers(), start, ctx.rpc_timeout);
        let m: M = read_message(req, ctx.max_recv_msg_bytes).await?;
        let reply = f(Rc::clone(ctx), m, deadline).await?;
        encode_message(&reply, ctx.max_send_msg_bytes)
    }
    .await;
    let (code, resp) = match result {
        Ok(body) => (Code::Ok, ReplyBody::message(body)),
        Err(status) => (status.code(), status.into_http().map(ReplyBody::Other)),
    };
    if let Some(cmd) = cmd {
        ctx.metrics.record(cmd, code, start.elapsed().as_secs_f64());
    }
    resp
}

/// Reads the one message of a unary request, refusing one over `limit` bytes as soon as its
/// length prefix arrives. A message that came in one DATA frame, as small ones do, is decoded
/// in place; only one split over frames is gathered first.
async fn read_message<M, B>(req: http::Request<B>, limit: usize) -> Result<M, Status>
where
    M: prost::Message + Default,
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if let Some(enc) = req.headers().get("grpc-encoding") {
        if enc.as_bytes() != b"identity" {
            return Err(Status::unimplemented(format!(
                "message compression {enc:?} is not supported"
            )));
        }
    }
    let mut body = req.into_body();
    let mut gathered = bytes::BytesMut::new();
    let mut first: Option<bytes::Bytes> = None;
    let whole = loop {
        let held = first.as_deref().unwrap_or(&gathered[..]);
        let have = held.len();
        if have >= PREFIX {
            if held[0] != 0 {
                return Err(Status::unimplemented(
                    "compressed messages are not supported",
                ));
            }
            let len = u32::from_be_bytes([held[1], held[2], held[3], held[4]]) as usize;
            if len > limit {
                return Err(Status::resource_exhausted(format!(
                    "request message of {len} bytes is over the limit of {limit} bytes"
                )));
            }
            if have >= PREFIX + len {
                break match first.take() {
                    Some(b) => b.slice(PREFIX..PREFIX + len),
                    None => gathered.freeze().slice(PREFIX..PREFIX + len),
                };
            }
        }
        let frame = match body.frame().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Err(Status::cancelled(format!("request body: {e}"))),
            None if have == 0 => return Err(Status::internal("missing request message")),
            None => return Err(Status::internal("request body ended inside a message")),
        };
        let Ok(data) = frame.into_data() else {
            continue; // request trailers carry nothing a unary call reads
        };
        if data.is_empty() {
            continue;
        }
        match first.take() {
            None if gathered.is_empty() => first = Some(data),
            None => gathered.extend_from_slice(&data),
            Some(b) => {
                gathered.extend_from_slice(&b);
                gathered.extend_from_slice(&data);
            }
        }
    };
    // Read on to the end of the stream before answering, as tonic does: a body dropped before
    // the client's END_STREAM makes h2 reset the stream, and a client that has not yet read
    // the reply then reports a successful call as CANCELLED.
    while let Some(frame) = body.frame().await {
        frame.map_err(|e| Status::cancelled(format!("request body: {e}")))?;
    }
    M::decode(whole).map_err(|e| Status::invalid_argument(format!("undecodable message: {e}")))
}

/// The reply's one length-prefixed message, or RESOURCE_EXHAUSTED past `limit`.
fn encode_message<R: prost::Message>(reply: &R, limit: usize) -> Result<bytes::Bytes, Status> {
    let len = reply.encoded_len();
    if len > limit {
        return Err(Error::ResponseTooLarge { bytes: len, limit }.into());
    }
    let mut buf = Vec::with_capacity(PREFIX + len);
    buf.push(0);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    reply
        .encode(&mut buf)
        .map_err(|e| Status::internal(format!("encoding the reply: {e}")))?;
    Ok(buf.into())
}

/// A response body: a unary reply (its message, then `grpc-status: 0`), or whatever tonic
/// built (errors, and the services the side thread answers).
pub enum ReplyBody {
    Message {
        data: Option<bytes::Bytes>,
        trailers: bool,
    },
    Other(Body),
}

impl ReplyBody {
    fn message(data: bytes::Bytes) -> http::Response<Self> {
        let mut resp = http::Response::new(ReplyBody::Message {
            data: Some(data),
            trailers: true,
        });
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        resp
    }
}

impl http_body::Body for ReplyBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        use std::task::Poll;
        match self.get_mut() {
            ReplyBody::Message { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                if std::mem::take(trailers) {
                    let mut map = http::HeaderMap::with_capacity(1);
                    map.insert("grpc-status", HeaderValue::from_static("0"));
                    return Poll::Ready(Some(Ok(http_body::Frame::trailers(map))));
                }
                Poll::Ready(None)
            }
            ReplyBody::Other(body) => std::pin::Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReplyBody::Message { data, trailers } => data.is_none() && !trailers,
            ReplyBody::Other(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ReplyBody::Message { data, .. } => {
                http_body::SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ReplyBody::Other(body) => body.size_hint(),
        }
    }
}

/// Serves one HTTP/2 request on this core.
pub async fn dispatch(ctx: Rc<CoreCtx>, req: http::Request<Incoming>) -> http::Response<ReplyBody> {
    match req.uri().path() {
        "/pb.CacheService/Get" => unary(&ctx, Some(Cmd::Get), req, get).await,
        "/pb.CacheService/Set" => unary(&ctx, Some(Cmd::Set), req, set).await,
        "/pb.CacheService/Delete" => unary(&ctx, Some(Cmd::Delete), req, delete).await,
        "/pb.PeerService/Write" => unary(&ctx, None, req, replica_write).await,
        "/pb.PeerService/Read" => unary(&ctx, None, req, replica_read).await,
        _ => ctx.side.forward(req).await.map(ReplyBody::Other),
    }
}

impl CoreCtx {
    /// The shard of `key`; computed before the key moves into its command, so it is never
    /// copied.
    fn shard(&self, key: &[u8]) -> ShardId {
        shard_of(key, self.num_shards)
    }

    /// Executes `command` on the core that owns `shard`.
    async fn route(
        self: &Rc<Self>,
        shard: ShardId,
        command: Command,
        deadline: Instant,
        level: Level,
    ) -> Response {
        let owner = owner_core(shard, self.router.nr_cores());
        let req = Request {
            shard,
            command,
            deadline,
            level,
        };
        if owner == self.router.core() {
            return match self.handle_owned(req) {
                Handled::Ready(resp) => resp,
                Handled::Later(fut) => fut.await,
            };
        }
        match self.router.call(owner, req) {
            Ok(reply) => reply.await,
            Err((_, _)) => {
                self.metrics.shed();
                Err(Error::Overloaded { core: owner })
            }
        }
    }
}

fn level_of(c: i32) -> Level {
    match pb::Consistency::try_from(c) {
        Ok(pb::Consistency::One) => Level::One,
        Ok(pb::Consistency::All) => Level::All,
        _ => Level::Quorum,
    }
}

async fn replica_write(
    ctx: Rc<CoreCtx>,
    m: pb::ReplicaWrite,
    deadline: Instant,
) -> Result<pb::ReplicaAck, Error> {
    let entry = crate::cluster::antientropy::entry_from_pb(m);
    match ctx
        .route(
            ctx.shard(&entry.key),
            Command::Apply(entry),
            deadline,
            Level::One,
        )
        .await?
    {
        Reply::Applied { applied, existed } => Ok(pb::ReplicaAck { applied, existed }),
        _ => Err(Error::Internal(
            "unexpected reply to a replica write".into(),
        )),
    }
}

async fn replica_read(
    ctx: Rc<CoreCtx>,
    m: pb::ReplicaRead,
    deadline: Instant,
) -> Result<pb::ReplicaEntry, Error> {
    let key = m.key;
    let syncing = ctx.coordinator.syncing(&key);
    match ctx
        .route(ctx.shard(&key), Command::Read { key }, deadline, Level::One)
        .await?
    {
        Reply::Entry(Some(e)) => Ok(pb::ReplicaEntry {
            found: true,
            value: e.value,
            hlc: e.version.hlc,
            node: e.version.node,
            ttl_ms: e.ttl_ms,
            flags: e.flags as u32,
            syncing,
        }),
        Reply::Entry(None) => Ok(pb::ReplicaEntry {
            syncing,
            ..Default::default()
        }),
        _ => Err(Error::Internal("unexpected reply to a replica read".into())),
    }
}

fn check_key(key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::InvalidArgument("key must not be empty"));
    }
    Ok(())
}

fn version_pb(v: crate::engine::hlc::Version) -> Option<pb::Version> {
    Some(pb::Version {
        hlc: v.hlc,
        node: v.node,
    })
}

async fn get(
    ctx: Rc<CoreCtx>,
    m: pb::GetRequest,
    deadline: Instant,
) -> Result<pb::GetResponse, Error> {
    check_key(&m.key)?;
    let level = level_of(m.consistency);
    let key = m.key.into_bytes();
    let reply = match ctx
        .route(ctx.shard(&key), Command::Get { key }, deadline, level)
        .await
    {
        Ok(reply) => {
            ctx.metrics.hit();
            reply
        }
        Err(e) => {
            if matches!(e, Error::NotFound { .. }) {
                ctx.metrics.miss();
            }
            return Err(e);
        }
    };
    let Reply::Value {
        value,
        binary,
        version,
    } = reply
    else {
        return Err(Error::Internal("unexpected reply to Get".into()));
    };
    let payload = if binary {
        pb::get_response::Payload::ValueBytes(value)
    } else {
        match String::from_utf8(value) {
            Ok(s) => pb::get_response::Payload::Value(s),
            Err(e) => pb::get_response::Payload::ValueBytes(e.into_bytes()),
        }
    };
    Ok(pb::GetResponse {
        payload: Some(payload),
        version: version_pb(version),
    })
}

async fn set(
    ctx: Rc<CoreCtx>,
    m: pb::SetRequest,
    deadline: Instant,
) -> Result<pb::SetResponse, Error> {
    check_key(&m.key)?;
    let (value, binary) = match m.payload {
        Some(pb::set_request::Payload::Value(s)) => (s.into_bytes(), false),
        Some(pb::set_request::Payload::ValueBytes(b)) => (b, true),
        None => (Vec::new(), false),
    };
    let ttl_secs = match m.ttl_seconds {
        None => ctx.default_ttl_secs,
        Some(0) => None,
        Some(secs) => Some(secs),
    };
    let level = level_of(m.consistency);
    let key = m.key.into_bytes();
    let reply = ctx
        .route(
            ctx.shard(&key),
            Command::Set {
                key,
                value,
                ttl_secs,
                binary,
            },
            deadline,
            level,
        )
        .await?;
    match reply {
        Reply::Stored { version } => Ok(pb::SetResponse {
            version: version_pb(version),
        }),
        _ => Err(Error::Internal("unexpected reply to Set".into())),
    }
}

async fn delete(
    ctx: Rc<CoreCtx>,
    m: pb::DeleteRequest,
    deadline: Instant,
) -> Result<pb::DeleteResponse, Error> {
    check_key(&m.key)?;
    let level = level_of(m.consistency);
    let key = m.key.into_bytes();
    match ctx
        .route(ctx.shard(&key), Command::Delete { key }, deadline, level)
        .await?
    {
        Reply::Deleted { existed } => Ok(pb::DeleteResponse { deleted: existed }),
        _ => Err(Error::Internal("unexpected reply to Delete".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        collections::VecDeque,
        pin::Pin,
        task::{Context, Poll},
    };

    /// A request body that yields the given chunks, then either ends or never answers again.
    struct Chunks {
        chunks: VecDeque<Vec<u8>>,
        then_hang: bool,
    }

    impl http_body::Body for Chunks {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            match self.chunks.pop_front() {
                Some(c) => Poll::Ready(Some(Ok(http_body::Frame::data(c.into())))),
                None if self.then_hang => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    /// One poll, with a waker nobody wakes: what a future does with what it already has.
    fn poll_once<F: Future>(fut: F) -> Poll<F::Output> {
        std::pin::pin!(fut).poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    fn framed(msg: &impl prost::Message) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn set_request() -> pb::SetRequest {
        pb::SetRequest {
            key: "some-key".into(),
            payload: Some(pb::set_request::Payload::Value("some value".into())),
            ..Default::default()
        }
    }

    fn read(chunks: Vec<Vec<u8>>, then_hang: bool, limit: usize) -> Result<pb::SetRequest, Status> {
        let body = Chunks {
            chunks: chunks.into(),
            then_hang,
        };
        // Every case below finishes without waiting on anything: a hang is a failure.
        match poll_once(read_message(http::Request::new(body), limit)) {
            Poll::Ready(r) => r,
            Poll::Pending => panic!("read_message waited for more than the test gave it"),
        }
    }

    #[test]
    fn a_message_in_one_frame_or_split_anywhere_decodes_the_same() {
        let bytes = framed(&set_request());
        assert_eq!(
            read(vec![bytes.clone()], false, 1024).unwrap(),
            set_request()
        );
        for cut in 1..bytes.len() {
            let (a, b) = bytes.split_at(cut);
            let got = read(vec![a.to_vec(), vec![], b.to_vec()], false, 1024);
            assert_eq!(got.unwrap(), set_request(), "split at {cut}");
        }
        let one_byte_each = bytes.iter().map(|&b| vec![b]).collect();
        assert_eq!(read(one_byte_each, false, 1024).unwrap(), set_request());
    }

    #[test]
    fn the_answer_waits_for_the_end_of_the_request_stream() {
        let body = Chunks {
            chunks: vec![framed(&set_request())].into(),
            then_hang: true,
        };
        let got = poll_once(read_message::<pb::SetRequest, _>(
            http::Request::new(body),
            1024,
        ));
        assert!(got.is_pending(), "answered before the client's END_STREAM");
    }

    #[test]
    fn an_oversized_message_is_refused_from_its_prefix_alone() {
        let bytes = framed(&set_request());
        let limit = bytes.len() - PREFIX - 1;
        let err = read(vec![bytes[..PREFIX].to_vec()], true, limit).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(read(vec![bytes], false, limit + 1).is_ok(), "at the limit");
    }

    #[test]
    fn bad_bodies_get_their_status() {
        let bytes = framed(&set_request());
        let code = |chunks, then_hang| read(chunks, then_hang, 1024).unwrap_err().code();
        assert_eq!(code(vec![], false), Code::Internal, "no message");
        let cut = bytes[..bytes.len() - 1].to_vec();
        assert_eq!(code(vec![cut], false), Code::Internal, "cut short");
        let mut compressed = bytes.clone();
        compressed[0] = 1;
        assert_eq!(code(vec![compressed], false), Code::Unimplemented);
        let garbage = vec![0, 0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert_eq!(code(vec![garbage], false), Code::InvalidArgument);
    }

    #[test]
    fn a_compressed_request_encoding_is_unimplemented() {
        let req = http::Request::builder()
            .header("grpc-encoding", "gzip")
            .body(Chunks {
                chunks: vec![framed(&set_request())].into(),
                then_hang: false,
            })
            .unwrap();
        let got = poll_once(read_message::<pb::SetRequest, _>(req, 1024));
        let Poll::Ready(Err(status)) = got else {
            panic!("expected an error at once")
        };
        assert_eq!(status.code(), Code::Unimplemented);
    }

    #[test]
    fn a_reply_is_one_prefixed_message_within_the_limit() {
        let reply = pb::DeleteResponse { deleted: true };
        let bytes = encode_message(&reply, 1024).unwrap();
        assert_eq!(bytes[..], framed(&reply)[..]);
        let len = prost::Message::encoded_len(&reply);
        let err = encode_message(&reply, len - 1).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
    }

    #[test]
    fn grpc_timeout_units() {
        let p = |s: &str| parse_grpc_timeout(&HeaderValue::from_str(s).unwrap());
        assert_eq!(p("5S"), Some(Duration::from_secs(5)));
        assert_eq!(p("250m"), Some(Duration::from_millis(250)));
        assert_eq!(p("100u"), Some(Duration::from_micros(100)));
        assert_eq!(p("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(p("2M"), Some(Duration::from_secs(120)));
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("S"), None);
        assert_eq!(p("5x"), None);
        assert_eq!(p("123456789S"), None, "more than 8 digits");
    }
}
