//! A client for distributed-cache that sends every request to a replica of its key, on a
//! connection that lands on the core of that replica which owns the key: no network hop to a
//! coordinator that holds no copy, no hop between the node's cores. ScyllaDB's shard-aware
//! drivers and Redis Cluster's slot-aware clients do the same.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cache_client::Error> {
//! use cache_client::{Client, Config, Options};
//! use std::time::Duration;
//!
//! let client = Client::connect(Config::new(["127.0.0.1:50051"])).await?;
//! client.set("greeting", "hello", None).await?;
//! assert_eq!(client.get("greeting").await?.unwrap().as_bytes(), b"hello");
//! // Per call: consistency level and deadline.
//! let opts = Options::default().timeout(Duration::from_millis(50));
//! client.set_with("session", vec![1, 2, 3], Some(Duration::from_secs(60)), opts).await?;
//! assert!(client.delete("greeting").await?);
//! # Ok(()) }
//! ```
//!
//! How it routes: the client follows the cluster's topology (`NodeService.WatchTopology`: the
//! ring's nodes and points, and which nodes are down) on one stream, re-opened on another node
//! when it breaks, and asks each node once for its layout (`NodeService.Layout`: its cores,
//! its shard count and its shard-aware port). A request goes to the first replica of its key
//! that is not down, on a connection whose source port the node's shard-aware port steers to
//! the key's core (see [`placement`]). Connections are opened on first use, one per (node,
//! core), and multiplex every request to that core.
//!
//! Retries: a Get that fails for want of its node (refused, reset, unreachable) is retried on
//! the key's next replica. A Set or Delete is retried only when its connection could not be
//! made, so it was never sent: a write whose outcome is unknown is the caller's to retry, as
//! sending it again elsewhere could reorder it with a later write.
//!
//! Security: against nodes that serve TLS and check tokens, name the CA that signed their
//! certificates and the token to send (`authorization: Bearer TOKEN` on every request, the
//! topology's included). A node's certificate must name the host part of its address.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cache_client::Error> {
//! let config = cache_client::Config::new(["node1.cache:8443"])
//!     .tls_ca_file("/etc/cache/ca.pem")
//!     .token("rw-token-0123456789");
//! let client = cache_client::Client::connect(config).await?;
//! # Ok(()) }
//! ```

mod pb {
    tonic::include_proto!("pb");
}
mod conn;
mod route;
mod tls;

/// The rustls this crate is built with, for callers that make their own [`Tls::Config`].
pub use rustls;
pub use tls::{tls_config_from_ca_file, tls_config_from_ca_pem};

use conn::Conn;
use pb::{cache_service_client::CacheServiceClient, get_response, set_request};
use route::Router;
use std::{path::PathBuf, sync::Arc, time::Duration};
use tokio::sync::Semaphore;
use tonic::{Code, Status};

/// How a client starts.
#[derive(Clone)]
pub struct Config {
    /// Nodes to learn the cluster from (`host:port`, their `ADDR`); one that answers is enough.
    pub seeds: Vec<String>,
    /// Requests in flight at most; one more fails at once with [`Error::TooManyInFlight`].
    pub max_in_flight: usize,
    /// Deadline of a call that names none.
    pub timeout: Duration,
    /// Consistency level of a call that names none.
    pub consistency: Consistency,
    /// Longest wait between attempts to reach a node (connections and the topology stream
    /// back off from 50 ms, doubling up to this).
    pub max_backoff: Duration,
    /// Sent as `authorization: Bearer TOKEN` on every request (see [`Config::token`]).
    pub token: Option<String>,
    /// Connect in TLS (see [`Config::tls_ca_file`]); None: plaintext.
    pub tls: Option<Tls>,
}

/// How the client checks the nodes' certificates.
#[derive(Debug, Clone)]
pub enum Tls {
    /// Trust the CA certificates in this PEM file (read when the client connects).
    CaFile(PathBuf),
    /// A whole rustls configuration (its roots, a client certificate for mutual TLS...).
    /// Build it with the ring provider; the client offers ALPN `h2` whatever it says.
    Config(Arc<rustls::ClientConfig>),
}

// By hand: the token must not show in logs.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("seeds", &self.seeds)
            .field("max_in_flight", &self.max_in_flight)
            .field("timeout", &self.timeout)
            .field("consistency", &self.consistency)
            .field("max_backoff", &self.max_backoff)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl Config {
    /// Defaults for `seeds`: 1,024 requests in flight, 5 s deadlines, QUORUM, backoff up to
    /// 2 s.
    ///
    /// ```
    /// let c = cache_client::Config::new(["127.0.0.1:50051"]);
    /// assert_eq!(c.seeds, ["127.0.0.1:50051"]);
    /// ```
    pub fn new<S: Into<String>>(seeds: impl IntoIterator<Item = S>) -> Config {
        Config {
            seeds: seeds.into_iter().map(Into::into).collect(),
            max_in_flight: 1024,
            timeout: Duration::from_secs(5),
            consistency: Consistency::Quorum,
            max_backoff: Duration::from_secs(2),
            token: None,
            tls: None,
        }
    }

    /// Sends `token` as `authorization: Bearer TOKEN` on every request, for nodes started
    /// with `AUTH_TOKENS_FILE`.
    ///
    /// ```
    /// let c = cache_client::Config::new(["127.0.0.1:50051"]).token("rw-token-0123456789");
    /// assert!(!format!("{c:?}").contains("rw-token"));
    /// ```
    pub fn token(mut self, token: impl Into<String>) -> Config {
        self.token = Some(token.into());
        self
    }

    /// Connects in TLS, trusting the CA certificates in the PEM file at `path`; a node's
    /// certificate must name the host part of its address (an IP address or a DNS name).
    ///
    /// ```
    /// let c = cache_client::Config::new(["127.0.0.1:8443"]).tls_ca_file("ca.pem");
    /// ```
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Config {
        self.tls = Some(Tls::CaFile(path.into()));
        self
    }

    /// Connects in TLS with `config` (see [`Tls::Config`]).
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), cache_client::Error> {
    /// let tls = cache_client::tls_config_from_ca_file("ca.pem".as_ref())?;
    /// let c = cache_client::Config::new(["127.0.0.1:8443"]).tls_config(tls);
    /// # Ok(()) }
    /// ```
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Config {
        self.tls = Some(Tls::Config(config));
        self
    }
}

/// How many replicas must answer (see the node's README, "What each level promises").
///
/// ```
/// use cache_client::{Consistency, Options};
/// assert_eq!(Consistency::default(), Consistency::Quorum);
/// let fast_read = Options::default().consistency(Consistency::One);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    #[default]
    Quorum,
    One,
    All,
    Linearizable,
}

impl Consistency {
    fn pb(self) -> i32 {
        (match self {
            Consistency::Quorum => pb::Consistency::Quorum,
            Consistency::One => pb::Consistency::One,
            Consistency::All => pb::Consistency::All,
            Consistency::Linearizable => pb::Consistency::Linearizable,
        }) as i32
    }
}

/// Per-call settings; unset ones come from the [`Config`].
///
/// ```
/// use cache_client::{Consistency, Options};
/// let o = Options::default().consistency(Consistency::One);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    consistency: Option<Consistency>,
    timeout: Option<Duration>,
}

impl Options {
    /// The call's consistency level.
    ///
    /// ```
    /// let o = cache_client::Options::default().consistency(cache_client::Consistency::All);
    /// ```
    pub fn consistency(mut self, level: Consistency) -> Options {
        self.consistency = Some(level);
        self
    }

    /// The call's deadline, from when it starts; it travels to the node as `grpc-timeout`.
    ///
    /// ```
    /// let o = cache_client::Options::default().timeout(std::time::Duration::from_millis(20));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Options {
        self.timeout = Some(timeout);
        self
    }
}

/// A stored value: text, or bytes that need not be UTF-8.
///
/// ```
/// use cache_client::Value;
/// assert_eq!(Value::from("hi").as_bytes(), b"hi");
/// assert_eq!(Value::from(vec![0xff]).as_bytes(), [0xff]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Text(String),
    Bytes(Vec<u8>),
}

impl Value {
    /// The value's bytes, whichever kind it is.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Value::Text(s) => s.as_bytes(),
            Value::Bytes(b) => b,
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Text(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Text(s)
    }
}

impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Value {
        Value::Bytes(b)
    }
}

impl From<&[u8]> for Value {
    fn from(b: &[u8]) -> Value {
        Value::Bytes(b.to_vec())
    }
}

/// The version a write was stored with: a hybrid logical clock timestamp (physical
/// microseconds << 12 | a logical counter) and the id of the node that issued it; newer
/// versions win, ordered by `hlc`, then `node`.
///
/// ```
/// let v = cache_client::Version { hlc: 1 << 12, node: 7 };
/// assert!(v < cache_client::Version { hlc: 2 << 12, node: 0 });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Version {
    pub hlc: u64,
    pub node: u32,
}

/// Why a call failed. A missing key is not an error: [`Client::get`] answers `Ok(None)`.
///
/// ```no_run
/// # async fn demo(client: cache_client::Client) {
/// use cache_client::Error;
/// match client.set("k", "v", None).await {
///     Ok(version) => println!("stored at {version:?}"),
///     Err(Error::TooManyInFlight { limit }) => println!("over {limit} in flight: back off"),
///     Err(Error::DeadlineExceeded(_)) => println!("outcome unknown: read before retrying"),
///     Err(e) => println!("failed: {e}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The request is invalid (an empty key, a value over the node's limit...).
    InvalidArgument(String),
    /// Not enough replicas could answer, or no node of the key could be reached.
    Unavailable(String),
    /// The deadline passed first; a write may or may not have been stored.
    DeadlineExceeded(String),
    /// The node turned the request away (rate limit, a saturated core, a reply too large).
    ResourceExhausted(String),
    /// [`Config::max_in_flight`] requests are in flight already.
    TooManyInFlight { limit: usize },
    /// No node could tell the cluster's topology within the deadline.
    NoTopology(String),
    /// The node wants a token, and the client sent none or one it does not know.
    Unauthenticated(String),
    /// The client's token does not allow the request (a read-only token and a write).
    PermissionDenied(String),
    /// The client's settings cannot be used: a CA file that cannot be read or holds no
    /// certificate, a token that cannot be sent in a header.
    Config(String),
    /// Any other status the node answered.
    Status { code: i32, message: String },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::Unavailable(m) => write!(f, "unavailable: {m}"),
            Error::DeadlineExceeded(m) => write!(f, "deadline exceeded: {m}"),
            Error::ResourceExhausted(m) => write!(f, "resource exhausted: {m}"),
            Error::TooManyInFlight { limit } => {
                write!(f, "{limit} requests already in flight (max_in_flight)")
            }
            Error::NoTopology(m) => write!(f, "no cluster topology: {m}"),
            Error::Unauthenticated(m) => write!(f, "unauthenticated: {m}"),
            Error::PermissionDenied(m) => write!(f, "permission denied: {m}"),
            Error::Config(m) => write!(f, "{m}"),
            Error::Status { code, message } => write!(f, "status {code}: {message}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<Status> for Error {
    fn from(s: Status) -> Error {
        let m = s.message().to_string();
        match s.code() {
            Code::InvalidArgument => Error::InvalidArgument(m),
            Code::Unavailable => Error::Unavailable(m),
            Code::DeadlineExceeded => Error::DeadlineExceeded(m),
            Code::ResourceExhausted => Error::ResourceExhausted(m),
            Code::Unauthenticated => Error::Unauthenticated(m),
            Code::PermissionDenied => Error::PermissionDenied(m),
            code => Error::Status {
                code: code as i32,
                message: m,
            },
        }
    }
}

/// A connection to a cluster. Cheap to clone; clones share connections and the topology.
///
/// ```no_run
/// # async fn demo() -> Result<(), cache_client::Error> {
/// let client = cache_client::Client::connect(cache_client::Config::new(["127.0.0.1:8080"])).await?;
/// let for_a_task = client.clone();
/// tokio::spawn(async move { for_a_task.get("k").await });
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    router: Arc<Router>,
    in_flight: Arc<Semaphore>,
    config: Arc<Config>,
}

impl Client {
    /// Learns the cluster from `config.seeds` and starts following it; fails with
    /// [`Error::NoTopology`] when no seed answers within `config.timeout`
    /// ([`Error::Unauthenticated`] when one turned the token away, [`Error::Config`] when the
    /// TLS or token settings cannot be used). Must be called inside a tokio runtime, where the
    /// client's background task runs.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), cache_client::Error> {
    /// let mut config = cache_client::Config::new(["10.0.0.1:8080", "10.0.0.2:8080"]);
    /// config.max_in_flight = 256;
    /// let client = cache_client::Client::connect(config).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(config: Config) -> Result<Client, Error> {
        let router = Router::start(&config).await?;
        Ok(Client {
            router,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            config: Arc::new(config),
        })
    }

    /// The value of `key`, or `None` when it is missing or expired.
    ///
    /// ```no_run
    /// # async fn demo(client: cache_client::Client) -> Result<(), cache_client::Error> {
    /// if let Some(v) = client.get("user:1").await? {
    ///     println!("{}", String::from_utf8_lossy(v.as_bytes()));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get(&self, key: &str) -> Result<Option<Value>, Error> {
        self.get_with(key, Options::default()).await
    }

    /// [`Client::get`] with per-call options.
    ///
    /// ```no_run
    /// # async fn demo(client: cache_client::Client) -> Result<(), cache_client::Error> {
    /// use cache_client::{Consistency, Options};
    /// let v = client.get_with("k", Options::default().consistency(Consistency::One)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_with(&self, key: &str, opts: Options) -> Result<Option<Value>, Error> {
        let req = pb::GetRequest {
            key: key.to_string(),
            consistency: opts.consistency.unwrap_or(self.config.consistency).pb(),
        };
        let reply = self
            .call(
                key,
                opts,
                true,
                |mut c, r| async move { c.get(r).await },
                req,
            )
            .await;
        match reply {
            Ok(r) => Ok(match r.payload {
                Some(get_response::Payload::Value(s)) => Some(Value::Text(s)),
                Some(get_response::Payload::ValueBytes(b)) => Some(Value::Bytes(b)),
                None => Some(Value::Bytes(Vec::new())),
            }),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    /// Stores `value` under `key`; returns the version it was stored with. `ttl`: None
    /// for the node's default (its `TTL`), `Some(Duration::ZERO)` for never, else the time
    /// to live, rounded up to whole seconds.
    ///
    /// ```no_run
    /// # async fn demo(client: cache_client::Client) -> Result<(), cache_client::Error> {
    /// use std::time::Duration;
    /// client.set("token", vec![0u8, 1, 2], Some(Duration::from_secs(30))).await?;
    /// client.set("config", "forever", Some(Duration::ZERO)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn set(
        &self,
        key: &str,
        value: impl Into<Value>,
        ttl: Option<Duration>,
    ) -> Result<Version, Error> {
        self.set_with(key, value, ttl, Options::default()).await
    }

    /// [`Client::set`] with per-call options.
    ///
    /// ```no_run
    /// # async fn demo(client: cache_client::Client) -> Result<(), cache_client::Error> {
    /// use cache_client::{Consistency, Options};
    /// let all = Options::default().consistency(Consistency::All);
    /// client.set_with("k", "v", None, all).await?;
    /// # Ok(()) }
    /// ```
    pub async fn set_with(
        &self,
        key: &str,
        value: impl Into<Value>,
        ttl: Option<Duration>,
        opts: Options,
    ) -> Result<Version, Error> {
        let payload = match value.into() {
            Value::Text(s) => set_request::Payload::Value(s),
            Value::Bytes(b) => set_request::Payload::ValueBytes(b),
        };
        let req = pb::SetRequest {
            key: key.to_string(),
            payload: Some(payload),
            ttl_seconds: ttl.map(|t| t.as_secs() + u64::from(t.subsec_nanos() > 0)),
            consistency: opts.consistency.unwrap_or(self.config.consistency).pb(),
        };
        self.call(
            key,
            opts,
            false,
            |mut c, r| async move { c.set(r).await },
            req,
        )
        .await
        .map(|r| {
            let v = r.version.unwrap_or_default();
            Version {
                hlc: v.hlc,
                node: v.node,
            }
        })
        .map_err(Error::from)
    }

    /// Removes `key`; whether a live value was there.
    ///
    /// ```no_run
    /// # async fn demo(client: cache_client::Client) -> Result<(), cache_client::Error> {
    /// let existed = client.delete("k").await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete(&self, key: &str) -> Result<bool, Error> {
        self.delete_with(key, Options::default()).await
    }

    /// [`Client::delete`] with per-call options.
    ///
    /// ```no_run
    /// # async fn demo(client: cache_client::Client) -> Result<(), cache_client::Error> {
    /// use std::time::Duration;
    /// let quick = cache_client::Options::default().timeout(Duration::from_millis(10));
    /// client.delete_with("k", quick).await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete_with(&self, key: &str, opts: Options) -> Result<bool, Error> {
        let req = pb::DeleteRequest {
            key: key.to_string(),
            consistency: opts.consistency.unwrap_or(self.config.consistency).pb(),
        };
        self.call(
            key,
            opts,
            false,
            |mut c, r| async move { c.delete(r).await },
            req,
        )
        .await
        .map(|r| r.deleted)
        .map_err(Error::from)
    }

    /// Topology messages the client received so far: one when it connects, then one per
    /// change of the cluster (a node joining, leaving, going down or coming back). A client at
    /// rest receives none and sends no request.
    ///
    /// ```no_run
    /// # async fn demo(client: cache_client::Client) {
    /// let before = client.topology_updates();
    /// tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    /// println!("{} topology messages in 10 s", client.topology_updates() - before);
    /// # }
    /// ```
    pub fn topology_updates(&self) -> u64 {
        self.router
            .updates
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The nodes holding `key`, in the order the client asks them (replicas that are up
    /// first), as the client's current topology says; empty when the client cannot route
    /// (no seed is among the addresses the nodes give themselves).
    ///
    /// ```no_run
    /// # fn demo(client: cache_client::Client) {
    /// println!("k lives on {:?}", client.replicas("k"));
    /// # }
    /// ```
    pub fn replicas(&self, key: &str) -> Vec<String> {
        self.router.replicas(key.as_bytes())
    }

    /// Sends `req` to the key's replicas in turn: the next one when the last could not be
    /// reached (`idempotent`: also when it failed after the request was sent).
    async fn call<Req, Resp, F, Fut>(
        &self,
        key: &str,
        opts: Options,
        idempotent: bool,
        send: F,
        req: Req,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(CacheServiceClient<Conn>, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err(Status::resource_exhausted(
                Error::TooManyInFlight {
                    limit: self.config.max_in_flight,
                }
                .to_string(),
            ));
        };
        let timeout = opts.timeout.unwrap_or(self.config.timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = Status::unavailable(format!("no replica of {key:?} in the topology"));
        // The key's replicas on their owning cores, then the seeds as plain coordinators
        // (the only ones when the cluster's own addresses are not the client's, see
        // `Router::replicas`).
        let routed = self
            .router
            .replicas(key.as_bytes())
            .into_iter()
            .map(|n| (n, true));
        let seeds = self.config.seeds.iter().map(|s| (s.clone(), false));
        for (node, on_core) in routed.chain(seeds) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(Status::deadline_exceeded("no answer before the deadline"));
            }
            let connect = async {
                if on_core {
                    self.router.channel(&node, key.as_bytes()).await
                } else {
                    self.router.plain(&node).await
                }
            };
            let channel = match tokio::time::timeout(left, connect).await {
                Ok(Ok(c)) => c,
                // Never sent: any request may go to the next replica. What the client knew of
                // the node goes (it may have restarted with other cores, on another port).
                Ok(Err(s)) => {
                    self.router.failed(&node);
                    last = s;
                    continue;
                }
                Err(_) => {
                    return Err(Status::deadline_exceeded(
                        "no connection before the deadline",
                    ))
                }
            };
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(left);
            let answer = match tokio::time::timeout(left, send(channel.cache(), r)).await {
                Ok(answer) => answer,
                Err(_) => return Err(Status::deadline_exceeded("no answer before the deadline")),
            };
            match answer {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(s) if is_transport(&s) => {
                    self.router.failed(&node);
                    if !idempotent && !never_sent(&s) {
                        return Err(s);
                    }
                    last = s;
                }
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }
}

/// The connection was refused or could not be made (a node restarted elsewhere, or gone):
/// the request never left, so any request may go to another replica.
fn never_sent(s: &Status) -> bool {
    use std::error::Error as _;
    let mut source = s.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            );
        }
        source = e.source();
    }
    false
}

/// A failure of the connection rather than an answer of the node.
fn is_transport(s: &Status) -> bool {
    use std::error::Error as _;
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    ) && s.source().is_some()
}
