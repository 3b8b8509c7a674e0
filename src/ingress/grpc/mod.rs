//! The `pb.CacheService` and `pb.PeerService` methods on one core: validate the decoded
//! message, route to the owning core (in place when it is this one, else one mesh hop), and
//! hand the reply message back to the connection, which encodes it straight into its write
//! buffer. A request's prost types stop here: the engine gets plain commands. Runs on every
//! core's executor; nothing here locks, logs per request or allocates beyond the decoded
//! message, the call's future and the reply.
//!
//! [`server`] runs the connections; the other direction, unary calls to another node over the
//! `http2` crate's client, is [`crate::cluster::peer::unary`].

pub mod server;

use super::CoreCtx;
use crate::{
    cluster::coordinator::{Level, Routed},
    engine::command::{Command, Reply, Request, Response},
    error::Error,
    observability::metrics::Cmd,
    pb,
    routing::{owner_core, shard_of, ShardId},
};
use executors::Handled;
use std::{
    future::Future,
    pin::Pin,
    rc::Rc,
    time::{Duration, Instant},
};
use tonic::{Code, Status};

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n), per the gRPC HTTP/2 spec.
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n.saturating_mul(3600)),
        b"M" => Duration::from_secs(n.saturating_mul(60)),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// gRPC's length-prefixed message header: a compression flag and a big-endian length.
pub const PREFIX: usize = 5;

/// The unary methods a core answers itself; any other path goes to the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Set,
    Delete,
    ReplicaWrite,
    ReplicaRead,
    ReplicaBatch,
}

impl Method {
    pub fn path(self) -> &'static str {
        match self {
            Method::Get => "/pb.CacheService/Get",
            Method::Set => "/pb.CacheService/Set",
            Method::Delete => "/pb.CacheService/Delete",
            Method::ReplicaWrite => "/pb.PeerService/Write",
            Method::ReplicaRead => "/pb.PeerService/Read",
            Method::ReplicaBatch => "/pb.PeerService/Batch",
        }
    }

    pub fn of_path(path: &[u8]) -> Option<Method> {
        Some(match path {
            b"/pb.CacheService/Get" => Method::Get,
            b"/pb.CacheService/Set" => Method::Set,
            b"/pb.CacheService/Delete" => Method::Delete,
            b"/pb.PeerService/Write" => Method::ReplicaWrite,
            b"/pb.PeerService/Read" => Method::ReplicaRead,
            b"/pb.PeerService/Batch" => Method::ReplicaBatch,
            _ => return None,
        })
    }
}

/// A call's reply message. An enum rather than encoded bytes so that the connection can
/// encode it straight into its write buffer, where the frame around it goes.
#[derive(Debug, PartialEq)]
pub enum Answer {
    Get(pb::GetResponse),
    Set(pb::SetResponse),
    Delete(pb::DeleteResponse),
    Ack(pb::ReplicaAck),
    Entry(pb::ReplicaEntry),
    Batch(pb::ReplicaBatchReply),
}

impl Answer {
    fn message(&self) -> &dyn EncodeInto {
        match self {
            Answer::Get(m) => m,
            Answer::Set(m) => m,
            Answer::Delete(m) => m,
            Answer::Ack(m) => m,
            Answer::Entry(m) => m,
            Answer::Batch(m) => m,
        }
    }

    /// Bytes of the length-prefixed message.
    pub fn framed_len(&self) -> usize {
        PREFIX + self.message().len()
    }

    /// Appends the length-prefixed message.
    pub fn encode_framed(&self, buf: &mut Vec<u8>) {
        let m = self.message();
        let len = m.len();
        buf.reserve(PREFIX + len);
        buf.push(0);
        buf.extend_from_slice(&(len as u32).to_be_bytes());
        m.encode_into(buf);
    }
}

/// prost's `Message` is not object safe; this is the part of it a reply needs.
trait EncodeInto {
    fn len(&self) -> usize;
    fn encode_into(&self, buf: &mut Vec<u8>);
}

impl<M: prost::Message> EncodeInto for M {
    fn len(&self) -> usize {
        self.encoded_len()
    }

    fn encode_into(&self, buf: &mut Vec<u8>) {
        // A Vec grows as needed: encoding into it cannot run out of room.
        let _ = self.encode(buf);
    }
}

/// A call under way; the connection polls it beside its other streams.
pub type Call = Pin<Box<dyn Future<Output = Result<Answer, Status>>>>;

/// Starts a unary call on its request message (without the prefix), decoded here from the
/// connection's receive buffer. Node-to-node calls (ReplicaWrite, ReplicaRead) are neither
/// rate limited nor counted as client requests.
pub fn start(
    ctx: &Rc<CoreCtx>,
    method: Method,
    message: &[u8],
    deadline: Instant,
    start: Instant,
) -> Call {
    match method {
        Method::Get => call(
            ctx,
            Some(Cmd::Get),
            message,
            deadline,
            start,
            get,
            Answer::Get,
        ),
        Method::Set => call(
            ctx,
            Some(Cmd::Set),
            message,
            deadline,
            start,
            set,
            Answer::Set,
        ),
        Method::Delete => call(
            ctx,
            Some(Cmd::Delete),
            message,
            deadline,
            start,
            delete,
            Answer::Delete,
        ),
        Method::ReplicaWrite => call(
            ctx,
            None,
            message,
            deadline,
            start,
            replica_write,
            Answer::Ack,
        ),
        Method::ReplicaRead => call(
            ctx,
            None,
            message,
            deadline,
            start,
            replica_read,
            Answer::Entry,
        ),
        Method::ReplicaBatch => call(
            ctx,
            None,
            message,
            deadline,
            start,
            replica_batch,
            Answer::Batch,
        ),
    }
}

fn call<M, R, F, Fut>(
    ctx: &Rc<CoreCtx>,
    cmd: Option<Cmd>,
    message: &[u8],
    deadline: Instant,
    start: Instant,
    f: F,
    wrap: fn(R) -> Answer,
) -> Call
where
    M: prost::Message + Default + 'static,
    R: 'static,
    F: FnOnce(Rc<CoreCtx>, M, Instant) -> Fut + 'static,
    Fut: Future<Output = Result<R, Error>> + 'static,
{
    let admitted = match (&ctx.limiter, cmd) {
        (Some(limiter), Some(_)) if limiter.check().is_err() => {
            ctx.metrics.rate_limited();
            Err(Status::from(Error::RateLimited))
        }
        _ => Ok(()),
    };
    let decoded = admitted.and_then(|()| {
        M::decode(message)
            .map_err(|e| Status::invalid_argument(format!("undecodable message: {e}")))
    });
    let ctx = Rc::clone(ctx);
    Box::pin(async move {
        let result = match decoded {
            Ok(m) => match f(Rc::clone(&ctx), m, deadline).await {
                Ok(reply) => within_limit(wrap(reply), ctx.max_send_msg_bytes),
                Err(e) => Err(Status::from(e)),
            },
            Err(status) => Err(status),
        };
        if let Some(cmd) = cmd {
            let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
            ctx.metrics.record(cmd, code, start.elapsed().as_secs_f64());
        }
        result
    })
}

/// The reply, or RESOURCE_EXHAUSTED when its message is over MAX_SEND_MSG_SIZE. A batch's
/// answer is exempt: each value in it was within the limit when stored, the coordinator bounds
/// how many items it asks at once, and failing the whole batch would fail every item.
fn within_limit(answer: Answer, limit: usize) -> Result<Answer, Status> {
    if matches!(answer, Answer::Batch(_)) {
        return Ok(answer);
    }
    let len = answer.message().len();
    if len > limit {
        return Err(Error::ResponseTooLarge { bytes: len, limit }.into());
    }
    Ok(answer)
}

impl CoreCtx {
    /// The shard of `key`; computed before the key moves into its command, so it is never
    /// copied.
    fn shard(&self, key: &[u8]) -> ShardId {
        shard_of(key, self.num_shards)
    }

    /// Counts a replica request for `shard` that arrived on a core not owning it.
    fn count_replica_hop(&self, shard: ShardId) {
        if owner_core(shard, self.router.nr_cores()) != self.router.core() {
            self.metrics.replica_hop();
        }
    }

    /// The shard of a client's `key`, counting the hop when another core owns it.
    fn client_shard(&self, key: &[u8]) -> ShardId {
        let shard = self.shard(key);
        if owner_core(shard, self.router.nr_cores()) != self.router.core() {
            self.metrics.client_hop();
        }
        shard
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
        let req = Routed {
            request: Request {
                shard,
                command,
                deadline,
            },
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

fn level_of(c: i32) -> Result<Level, Error> {
    Ok(match pb::Consistency::try_from(c) {
        Ok(pb::Consistency::Quorum) => Level::Quorum,
        Ok(pb::Consistency::One) => Level::One,
        Ok(pb::Consistency::All) => Level::All,
        Ok(pb::Consistency::Linearizable) => Level::Linearizable,
        Err(_) => return Err(Error::UnknownConsistency(c)),
    })
}

async fn replica_write(
    ctx: Rc<CoreCtx>,
    m: pb::ReplicaWrite,
    deadline: Instant,
) -> Result<pb::ReplicaAck, Error> {
    check_replica_key(&m.key)?;
    let entry = crate::wire::entry_from_pb(m);
    let syncing = ctx.coordinator.syncing(&entry.key);
    let shard = ctx.shard(&entry.key);
    ctx.count_replica_hop(shard);
    match ctx
        .route(shard, Command::Apply(entry), deadline, Level::One)
        .await?
    {
        Reply::Applied { applied, existed } => Ok(pb::ReplicaAck {
            applied,
            existed,
            syncing,
        }),
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
    check_replica_key(&m.key)?;
    let key = m.key;
    let syncing = ctx.coordinator.syncing(&key);
    let shard = ctx.shard(&key);
    ctx.count_replica_hop(shard);
    match ctx
        .route(shard, Command::Read { key }, deadline, Level::One)
        .await?
    {
        Reply::Entry(entry) => Ok(crate::wire::read_reply_to_pb(entry, syncing)),
        _ => Err(Error::Internal("unexpected reply to a replica read".into())),
    }
}

/// The items of a batch run side by side, each to its own deadline, and are answered in
/// order once the last is done: an item that fails is its own outcome, never the call's.
async fn replica_batch(
    ctx: Rc<CoreCtx>,
    m: pb::ReplicaBatch,
    deadline: Instant,
) -> Result<pb::ReplicaBatchReply, Error> {
    use pb::{replica_op::Op, replica_outcome::Outcome};
    let arrived = Instant::now();
    let items = m.ops.into_iter().map(|item| {
        let ctx = Rc::clone(&ctx);
        let item_deadline = arrived
            .checked_add(Duration::from_micros(item.timeout_us))
            .map_or(deadline, |d| d.min(deadline));
        async move {
            let result = if item.timeout_us == 0 || item_deadline <= Instant::now() {
                Err(Error::DeadlineExceeded)
            } else {
                match item.op {
                    Some(Op::Write(w)) => {
                        replica_write(ctx, w, item_deadline).await.map(Outcome::Ack)
                    }
                    Some(Op::Read(r)) => replica_read(ctx, r, item_deadline)
                        .await
                        .map(Outcome::Entry),
                    None => Err(Error::InvalidArgument("a batch item without an op")),
                }
            };
            let outcome = result.unwrap_or_else(|e| {
                let status = Status::from(e);
                Outcome::Status(pb::ItemStatus {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                })
            });
            pb::ReplicaOutcome {
                outcome: Some(outcome),
            }
        }
    });
    Ok(pb::ReplicaBatchReply {
        outcomes: futures_util::future::join_all(items).await,
    })
}

/// A replica entry without a key is refused (a client's empty key never gets this far).
fn check_replica_key(key: &[u8]) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::InvalidArgument("replica key must not be empty"));
    }
    Ok(())
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
    let level = level_of(m.consistency)?;
    let key = m.key.into_bytes();
    let reply = match ctx
        .route(
            ctx.client_shard(&key),
            Command::Get { key },
            deadline,
            level,
        )
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
    let level = level_of(m.consistency)?;
    let key = m.key.into_bytes();
    let reply = ctx
        .route(
            ctx.client_shard(&key),
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
    let level = level_of(m.consistency)?;
    let key = m.key.into_bytes();
    match ctx
        .route(
            ctx.client_shard(&key),
            Command::Delete { key },
            deadline,
            level,
        )
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
    fn a_framed_answer_is_one_prefixed_message() {
        let reply = pb::DeleteResponse { deleted: true };
        let mut buf = vec![];
        Answer::Delete(reply).encode_framed(&mut buf);
        let body = prost::Message::encode_to_vec(&reply);
        assert_eq!(buf[0], 0, "not compressed");
        assert_eq!(buf[1..PREFIX], (body.len() as u32).to_be_bytes());
        assert_eq!(buf[PREFIX..], body[..]);
        assert_eq!(Answer::Delete(reply).framed_len(), buf.len());
    }

    #[test]
    fn an_answer_over_the_send_limit_is_resource_exhausted() {
        let reply = Answer::Delete(pb::DeleteResponse { deleted: true });
        let len = reply.framed_len() - PREFIX;
        let err = within_limit(reply, len - 1).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        let reply = Answer::Delete(pb::DeleteResponse { deleted: true });
        assert!(within_limit(reply, len).is_ok(), "at the limit");
    }

    #[test]
    fn paths_name_their_methods() {
        assert_eq!(Method::of_path(b"/pb.CacheService/Get"), Some(Method::Get));
        assert_eq!(
            Method::of_path(b"/pb.PeerService/Read"),
            Some(Method::ReplicaRead)
        );
        assert_eq!(Method::of_path(b"/pb.CacheService/Gets"), None);
        assert_eq!(Method::of_path(b"/grpc.health.v1.Health/Check"), None);
    }

    #[test]
    fn grpc_timeout_units() {
        let p = |s: &str| parse_grpc_timeout(s.as_bytes());
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
