//! The `pb.CacheService` methods on one core: decode with tonic's codec, validate, route to the
//! owning core (in place when it is this one, else one mesh hop), encode the reply. The only
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
use hyper::body::Incoming;
use std::{
    future::Future,
    rc::Rc,
    time::{Duration, Instant},
};
use tonic::{body::Body, server::UnaryService, Code, Status};

/// Adapts an async closure to tonic's `UnaryService` without boxing its future.
struct FnUnary<F>(Option<F>);

impl<F, Fut, M, R> UnaryService<M> for FnUnary<F>
where
    F: FnOnce(M) -> Fut,
    Fut: Future<Output = Result<tonic::Response<R>, Status>>,
{
    type Response = R;
    type Future = Fut;

    fn call(&mut self, request: tonic::Request<M>) -> Fut {
        let f = self.0.take().expect("tonic calls a unary service once");
        f(request.into_inner())
    }
}

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

/// Runs one unary method: rate limit, decode, `f`, encode; counts it on this core. `cmd` is
/// None for node-to-node calls, which are neither rate limited nor counted as client requests.
async fn unary<M, R, F, Fut>(
    ctx: &Rc<CoreCtx>,
    cmd: Option<Cmd>,
    req: http::Request<Incoming>,
    f: F,
) -> http::Response<Body>
where
    M: prost::Message + Default + Send + 'static,
    R: prost::Message + Send + 'static,
    F: FnOnce(Rc<CoreCtx>, M, Instant) -> Fut,
    Fut: Future<Output = Result<R, Error>>,
{
    let start = Instant::now();
    if let (Some(limiter), Some(cmd)) = (&ctx.limiter, cmd) {
        if limiter.check().is_err() {
            ctx.metrics.rate_limited();
            ctx.metrics
                .record(cmd, Code::ResourceExhausted, start.elapsed().as_secs_f64());
            return Status::from(Error::RateLimited).into_http();
        }
    }
    let deadline = deadline_of(req.headers(), start, ctx.rpc_timeout);
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<R, M>::default())
        .max_decoding_message_size(ctx.max_recv_msg_bytes)
        .max_encoding_message_size(ctx.max_send_msg_bytes);
    let handler_ctx = Rc::clone(ctx);
    let svc = FnUnary(Some(move |m: M| {
        let fut = f(handler_ctx, m, deadline);
        async move { fut.await.map(tonic::Response::new).map_err(Status::from) }
    }));
    let mut resp = grpc.unary(svc, req).await;
    // tonic answers an oversized request with OUT_OF_RANGE; gRPC's own servers (and our
    // contract) say RESOURCE_EXHAUSTED. Our handlers never produce OUT_OF_RANGE, so the
    // rewrite cannot hide one of theirs.
    let headers = resp.headers_mut();
    let code = match headers.get("grpc-status").map(|v| v.as_bytes()) {
        // A unary success carries its status in the trailers, so no header means OK.
        None => Code::Ok,
        Some(b"11") => {
            headers.insert("grpc-status", HeaderValue::from_static("8"));
            Code::ResourceExhausted
        }
        Some(v) => Code::from_bytes(v),
    };
    if let Some(cmd) = cmd {
        ctx.metrics.record(cmd, code, start.elapsed().as_secs_f64());
    }
    resp
}

/// Serves one HTTP/2 request on this core.
pub async fn dispatch(ctx: Rc<CoreCtx>, req: http::Request<Incoming>) -> http::Response<Body> {
    match req.uri().path() {
        "/pb.CacheService/Get" => unary(&ctx, Some(Cmd::Get), req, get).await,
        "/pb.CacheService/Set" => unary(&ctx, Some(Cmd::Set), req, set).await,
        "/pb.CacheService/Delete" => unary(&ctx, Some(Cmd::Delete), req, delete).await,
        "/pb.PeerService/Write" => unary(&ctx, None, req, replica_write).await,
        "/pb.PeerService/Read" => unary(&ctx, None, req, replica_read).await,
        _ => ctx.side.forward(req).await,
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
    let resp = pb::GetResponse {
        payload: Some(payload),
        version: version_pb(version),
    };
    let bytes = prost::Message::encoded_len(&resp);
    if bytes > ctx.max_send_msg_bytes {
        return Err(Error::ResponseTooLarge {
            bytes,
            limit: ctx.max_send_msg_bytes,
        });
    }
    Ok(resp)
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
