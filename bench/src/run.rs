//! The load generator: `connections` HTTP/2 connections spread over the targets, `concurrency`
//! streams in flight on each, closed loop or open loop at a fixed rate. In open loop each
//! request's latency counts from when it was due, not when it was sent, so a stall shows
//! (no coordinated omission). Against nodes that serve TLS and check tokens, both clients
//! connect in TLS and send the token on every request (see [`Security`]).

use crate::{
    stats::{report, Recorder, Report},
    workload::{key_for, value_of, Generator, Op, Workload},
};
use anyhow::{anyhow, Context as _};
use distributed_cache::pb::{
    cache_service_client::CacheServiceClient, set_request, DeleteRequest, GetRequest, SetRequest,
};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{
    future::Future,
    io::IsTerminal,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, oneshot};
use tonic::{
    body::Body,
    codegen::http::{self, header::AUTHORIZATION, HeaderValue},
    metadata::MetadataValue,
    Code,
};

#[derive(Debug, Clone)]
pub struct RunOpts {
    pub targets: Vec<String>,
    pub connections: usize,
    pub concurrency: usize,
    /// OS threads driving the connections, each with its own single-threaded runtime.
    pub threads: usize,
    /// Requests per second over all workers; None = closed loop.
    pub rate: Option<f64>,
    pub workload: Workload,
    pub duration: Duration,
    /// Stop after this many measured requests (before `duration` if sooner).
    pub requests: Option<u64>,
    pub warmup: Duration,
    pub prepopulate: bool,
    pub rpc_timeout: Duration,
    pub seed: u64,
    /// Requests through the shard-aware client instead of the plain connections.
    pub smart: bool,
    pub security: Security,
    pub quiet: bool,
}

/// TLS and the token, as both clients use them.
#[derive(Clone, Default)]
pub struct Security {
    /// Sent as `authorization: Bearer TOKEN` on every request.
    pub token: Option<String>,
    /// Connect in TLS with this configuration (its CA read once, shared by every connection).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

// By hand: the token must not show.
impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// What the plain client's connections are made with, once per load thread.
#[derive(Clone)]
struct Dial {
    tls: Option<tokio_rustls::TlsConnector>,
    /// `Bearer TOKEN`, made once; each request clones it (a reference count, no copy).
    authorization: Option<HeaderValue>,
}

impl Dial {
    fn new(security: &Security) -> anyhow::Result<Dial> {
        let authorization = match &security.token {
            None => None,
            Some(token) => {
                let mut value = HeaderValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| anyhow!("the token cannot be sent in a header"))?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let tls = security.tls.as_ref().map(|c| {
            let mut c = (**c).clone();
            // The node serves HTTP/2 only.
            c.alpn_protocols = vec![b"h2".to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(c))
        });
        Ok(Dial { tls, authorization })
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// One HTTP/2 connection, handed to tonic's generated client as it is. tonic's `Channel` puts
/// a buffer task, a reconnect layer and a timer per request in front of the same connection:
/// on two cores shared with the servers under test, those hops between tasks and threads cost
/// more CPU per request than the servers themselves spend, and the generator set the pace.
#[derive(Clone)]
struct Conn {
    send: SendRequest<Body>,
    authorization: Option<HeaderValue>,
    scheme: &'static str,
}

impl tonic::codegen::Service<http::Request<Body>> for Conn {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        if let Some(value) = &self.authorization {
            req.headers_mut().insert(AUTHORIZATION, value.clone());
        }
        Box::pin(self.send.send_request(req))
    }
}

type Client = CacheServiceClient<Conn>;

/// The HTTP/2 handshake over `io`; the current runtime then drives the connection.
async fn http2<T>(io: T) -> Result<SendRequest<Body>, hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(conn);
    Ok(send)
}

/// Connects on the current runtime, which then drives the connection.
async fn connect(dial: &Dial, target: &str, timeout: Duration) -> anyhow::Result<Conn> {
    let unreachable = |e: &dyn std::fmt::Display| anyhow!("target {target} is unreachable: {e}");
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(target)
            .await
            .map_err(|e| unreachable(&e))?;
        tcp.set_nodelay(true)?;
        let send = match &dial.tls {
            None => http2(tcp).await.map_err(|e| unreachable(&e))?,
            Some(tls) => {
                let stream = tls.connect(server_name(target)?, tcp).await.map_err(|e| {
                    // A plaintext node answers a ClientHello with an HTTP/2 frame.
                    let not_tls = matches!(
                        e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
                        Some(rustls::Error::InvalidMessage(
                            rustls::InvalidMessage::InvalidContentType
                        ))
                    );
                    let hint = if not_tls { " (does it serve TLS?)" } else { "" };
                    unreachable(&format_args!("TLS handshake: {e}{hint}"))
                })?;
                http2(stream).await.map_err(|e| unreachable(&e))?
            }
        };
        anyhow::Ok(Conn {
            send,
            authorization: dial.authorization.clone(),
            scheme: dial.scheme(),
        })
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| unreachable(&format_args!("no answer within {timeout:?}")))?
}

/// The name a target's certificate must carry: its host part, an IP address or a DNS name.
fn server_name(target: &str) -> anyhow::Result<rustls::pki_types::ServerName<'static>> {
    let host = match target.rsplit_once(':') {
        Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => target,
    };
    rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| anyhow!("target {target}: {host:?} cannot name a TLS server ({e})"))
}

fn client(conn: &Conn, target: &str) -> Client {
    let origin = format!("{}://{target}", conn.scheme)
        .parse()
        .expect("a target is validated as host:port");
    CacheServiceClient::with_origin(conn.clone(), origin)
}

/// The connections `i` with `i % threads == t` belong to thread `t`.
struct Conns {
    /// (connection index, target, connection)
    mine: Vec<(usize, String, Conn)>,
    /// This thread's shard-aware client, when the run uses one.
    smart: Option<cache_client::Client>,
}

impl Conns {
    /// The workers this thread runs, of `total` spread over `connections`: worker i drives
    /// connection i % connections, whichever thread owns it. Yields (worker, target, connection).
    fn workers(
        &self,
        total: usize,
        connections: usize,
    ) -> impl Iterator<Item = (usize, &str, &Conn)> + '_ {
        self.mine.iter().flat_map(move |(c, target, conn)| {
            (*c..total)
                .step_by(connections)
                .map(move |i| (i, target.as_str(), conn))
        })
    }
}

type Job = Box<dyn FnOnce(Arc<Conns>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// Threads that each own a share of the connections on a single-threaded runtime, so that a
/// request, its connection's task and its reply stay on one thread: no wake-up crosses threads.
pub struct Pool {
    jobs: Vec<mpsc::UnboundedSender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    /// Starts the threads and opens every connection, round-robin over the targets.
    pub async fn connect(opts: &RunOpts) -> anyhow::Result<Pool> {
        let nr = opts.threads.clamp(1, opts.connections);
        let mut pool = Pool {
            jobs: Vec::with_capacity(nr),
            threads: Vec::with_capacity(nr),
        };
        let mut ready = Vec::with_capacity(nr);
        let dial = Dial::new(&opts.security)?;
        for t in 0..nr {
            let (jobs_tx, mut jobs_rx) = mpsc::unbounded_channel::<Job>();
            let (ready_tx, ready_rx) = oneshot::channel::<anyhow::Result<()>>();
            let targets: Vec<(usize, String)> = (t..opts.connections)
                .step_by(nr)
                .map(|i| (i, opts.targets[i % opts.targets.len()].clone()))
                .collect();
            let timeout = opts.rpc_timeout;
            let smart_seeds = opts.smart.then(|| opts.targets.clone());
            let (security, dial) = (opts.security.clone(), dial.clone());
            let thread = std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let mut mine = Vec::with_capacity(targets.len());
                        for (i, target) in targets {
                            match connect(&dial, &target, timeout).await {
                                Ok(conn) => mine.push((i, target, conn)),
                                Err(e) => {
                                    let _ = ready_tx.send(Err(e));
                                    return;
                                }
                            }
                        }
                        let smart = match smart_seeds {
                            Some(seeds) => {
                                let mut config = cache_client::Config::new(seeds);
                                config.timeout = timeout;
                                // The workers bound what is in flight themselves.
                                config.max_in_flight = usize::MAX >> 4;
                                config.token = security.token;
                                config.tls = security.tls.map(cache_client::Tls::Config);
                                match cache_client::Client::connect(config).await {
                                    Ok(c) => Some(c),
                                    Err(e) => {
                                        let _ = ready_tx.send(Err(e.into()));
                                        return;
                                    }
                                }
                            }
                            None => None,
                        };
                        let _ = ready_tx.send(Ok(()));
                        let conns = Arc::new(Conns { mine, smart });
                        while let Some(job) = jobs_rx.recv().await {
                            job(Arc::clone(&conns)).await;
                        }
                    });
                })
                .context("starting a load thread")?;
            pool.jobs.push(jobs_tx);
            pool.threads.push(thread);
            ready.push(ready_rx);
        }
        for r in ready {
            r.await
                .map_err(|_| anyhow!("a load thread ended while connecting"))??;
        }
        Ok(pool)
    }

    /// Runs `job` on every thread with its connections and collects what each returns.
    async fn each<T, F, Fut>(&self, job: F) -> Vec<T>
    where
        T: Send + 'static,
        F: Fn(Arc<Conns>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let mut results = Vec::with_capacity(self.jobs.len());
        for jobs in &self.jobs {
            let (tx, rx) = oneshot::channel();
            let job = job.clone();
            let boxed: Job = Box::new(move |conns| {
                Box::pin(async move {
                    let _ = tx.send(job(conns).await);
                })
            });
            if jobs.send(boxed).is_ok() {
                results.push(rx);
            }
        }
        let mut out = Vec::with_capacity(results.len());
        for rx in results {
            if let Ok(v) = rx.await {
                out.push(v);
            }
        }
        out
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}

/// Sets every key once, with `parallel` requests in flight spread over the connections.
pub async fn prepopulate(pool: &Pool, opts: &RunOpts, parallel: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let (w, connections, timeout) = (opts.workload.clone(), opts.connections, opts.rpc_timeout);
    let results = pool
        .each(move |conns: Arc<Conns>| {
            let (next, w) = (Arc::clone(&next), w.clone());
            async move {
                let value = value_of(w.value_bytes);
                let mut tasks = Vec::new();
                for (_, target, conn) in conns.workers(parallel.max(1), connections) {
                    let mut c = client(conn, target);
                    let (next, value, w) = (Arc::clone(&next), value.clone(), w.clone());
                    tasks.push(tokio::spawn(async move {
                        loop {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            if k >= w.keys {
                                return Ok::<_, anyhow::Error>(());
                            }
                            let k = k + w.first_key;
                            let set = c.set(SetRequest {
                                key: key_for(k, w.key_bytes),
                                payload: Some(set_request::Payload::Value(value.clone())),
                                ttl_seconds: None,
                                ..Default::default()
                            });
                            tokio::time::timeout(timeout, set)
                                .await
                                .map_err(|_| anyhow!("no answer within {timeout:?}"))
                                .and_then(|r| r.map_err(anyhow::Error::from))
                                .with_context(|| format!("pre-populating key {k}"))?;
                        }
                    }));
                }
                for t in tasks {
                    t.await??;
                }
                anyhow::Ok(())
            }
        })
        .await;
    results.into_iter().collect()
}

struct Phase {
    stop: AtomicBool,
    budget: AtomicU64,
    done: AtomicU64,
}

struct Request {
    timeout: Duration,
    /// The same deadline in the `grpc-timeout` header, made once, as every gRPC client sends it.
    header: MetadataValue<tonic::metadata::Ascii>,
}

impl Request {
    fn new(timeout: Duration) -> Self {
        let mut probe = tonic::Request::new(());
        probe.set_timeout(timeout);
        let header = probe
            .metadata()
            .get("grpc-timeout")
            .expect("set_timeout sets grpc-timeout")
            .clone();
        Self { timeout, header }
    }

    fn wrap<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("grpc-timeout", self.header.clone());
        r
    }
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    conn: Conn,
    smart: Option<cache_client::Client>,
    target: String,
    mut generator: Generator,
    w: Workload,
    phase: Arc<Phase>,
    interval: Option<Duration>,
    start: Instant,
    req: Arc<Request>,
) -> Recorder {
    let mut client = client(&conn, &target);
    let mut rec = Recorder::default();
    let value = value_of(w.value_bytes_max.unwrap_or(0).max(w.value_bytes));
    let mut due = start;
    while !phase.stop.load(Ordering::Relaxed) {
        if phase
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_err()
        {
            break;
        }
        let sent_from = match interval {
            Some(iv) => {
                due += iv;
                let now = Instant::now();
                if due > now {
                    tokio::time::sleep_until(due.into()).await;
                }
                due
            }
            None => Instant::now(),
        };
        let key = key_for(generator.key_index(), w.key_bytes);
        let op = generator.op();
        let value = &value[..generator.value_len()];
        if let Some(smart) = &smart {
            let outcome = smart_call(smart, op, &key, value, &w, req.timeout).await;
            rec.record_latency(sent_from.elapsed().as_micros() as u64);
            match outcome {
                Ok(hit) => {
                    rec.ok += 1;
                    if op == Op::Get {
                        rec.gets += 1;
                        rec.hits += hit as u64;
                    }
                }
                Err(code) => *rec.errors.entry(code).or_default() += 1,
            }
            phase.done.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let call = async {
            match op {
                Op::Get => client
                    .get(req.wrap(GetRequest {
                        key,
                        consistency: w.consistency,
                    }))
                    .await
                    .map(|_| true),
                Op::Set => client
                    .set(req.wrap(SetRequest {
                        key,
                        payload: Some(set_request::Payload::Value(value.to_string())),
                        ttl_seconds: None,
                        consistency: w.consistency,
                    }))
                    .await
                    .map(|_| false),
                Op::Delete => client
                    .delete(req.wrap(DeleteRequest {
                        key,
                        consistency: w.consistency,
                    }))
                    .await
                    .map(|_| false),
            }
        };
        let outcome = tokio::time::timeout(req.timeout, call).await;
        rec.record_latency(sent_from.elapsed().as_micros() as u64);
        match outcome {
            Ok(Ok(hit)) => {
                rec.ok += 1;
                if op == Op::Get {
                    rec.gets += 1;
                    rec.hits += hit as u64;
                }
            }
            Ok(Err(status)) if op == Op::Get && status.code() == Code::NotFound => {
                rec.ok += 1;
                rec.gets += 1;
            }
            Ok(Err(status)) => {
                *rec.errors.entry(code_name(status.code())).or_default() += 1;
                // Connections are not re-established: a worker whose connection has gone stops
                // after counting the error rather than failing in a tight loop.
                if conn.send.is_closed() {
                    break;
                }
            }
            Err(_) => {
                *rec.errors
                    .entry(code_name(Code::DeadlineExceeded))
                    .or_default() += 1
            }
        }
        phase.done.fetch_add(1, Ordering::Relaxed);
    }
    rec
}

/// One request through the shard-aware client: Ok(hit) or the name of its error.
async fn smart_call(
    client: &cache_client::Client,
    op: Op,
    key: &str,
    value: &str,
    w: &Workload,
    timeout: Duration,
) -> Result<bool, String> {
    use cache_client::{Consistency, Options};
    let level = match w.consistency {
        1 => Consistency::One,
        2 => Consistency::All,
        3 => Consistency::Linearizable,
        _ => Consistency::Quorum,
    };
    let opts = Options::default().consistency(level).timeout(timeout);
    let result = match op {
        Op::Get => client.get_with(key, opts).await.map(|v| v.is_some()),
        Op::Set => client.set_with(key, value, None, opts).await.map(|_| false),
        Op::Delete => client.delete_with(key, opts).await.map(|_| false),
    };
    result.map_err(|e| match e {
        cache_client::Error::InvalidArgument(_) => "InvalidArgument".into(),
        cache_client::Error::Unavailable(_) => "Unavailable".into(),
        cache_client::Error::DeadlineExceeded(_) => "DeadlineExceeded".into(),
        cache_client::Error::ResourceExhausted(_) => "ResourceExhausted".into(),
        cache_client::Error::TooManyInFlight { .. } => "TooManyInFlight".into(),
        cache_client::Error::NoTopology(_) => "NoTopology".into(),
        cache_client::Error::Unauthenticated(_) => "Unauthenticated".into(),
        cache_client::Error::PermissionDenied(_) => "PermissionDenied".into(),
        cache_client::Error::Config(_) => "Config".into(),
        cache_client::Error::Status { code, .. } => format!("{:?}", Code::from(code)),
    })
}

async fn run_phase(
    pool: &Pool,
    opts: &RunOpts,
    length: Duration,
    budget: Option<u64>,
    seed: u64,
    show_progress: bool,
) -> (Recorder, f64) {
    let workers = opts.connections * opts.concurrency;
    let phase = Arc::new(Phase {
        stop: AtomicBool::new(false),
        budget: AtomicU64::new(budget.unwrap_or(u64::MAX)),
        done: AtomicU64::new(0),
    });
    let interval = opts
        .rate
        .map(|r| Duration::from_secs_f64(workers as f64 / r));
    let req = Arc::new(Request::new(opts.rpc_timeout));
    let start = Instant::now();
    let (connections, w) = (opts.connections, opts.workload.clone());
    let load = {
        let phase = Arc::clone(&phase);
        pool.each(move |conns: Arc<Conns>| {
            let (phase, w, req) = (Arc::clone(&phase), w.clone(), Arc::clone(&req));
            async move {
                let mut tasks = Vec::new();
                for (i, target, conn) in conns.workers(workers, connections) {
                    let generator =
                        Generator::new(&w, seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
                    tasks.push(tokio::spawn(worker(
                        conn.clone(),
                        conns.smart.clone(),
                        target.to_string(),
                        generator,
                        w.clone(),
                        Arc::clone(&phase),
                        interval,
                        start,
                        Arc::clone(&req),
                    )));
                }
                let mut total = Recorder::default();
                for t in tasks {
                    if let Ok(rec) = t.await {
                        total.merge(&rec);
                    }
                }
                total
            }
        })
    };
    let progress = show_progress.then(|| {
        let phase = Arc::clone(&phase);
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = phase.done.load(Ordering::Relaxed);
                eprint!(
                    "\r  {:>6.1}s  {:>10} req/s  {:>12} requests",
                    start.elapsed().as_secs_f64(),
                    done - last,
                    done
                );
                last = done;
            }
        })
    });
    // Stop on time, or when the request budget runs out (workers then exit by themselves).
    let clock = async {
        let deadline = start + length;
        while Instant::now() < deadline && phase.budget.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(
                Duration::from_millis(10).min(deadline.saturating_duration_since(Instant::now())),
            )
            .await;
        }
        phase.stop.store(true, Ordering::Relaxed);
    };
    let (recs, ()) = tokio::join!(load, clock);
    let mut total = Recorder::default();
    for rec in &recs {
        total.merge(rec);
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    (total, seconds)
}

/// Connects, pre-populates if asked, warms up (not counted), then measures.
pub async fn run(opts: &RunOpts) -> anyhow::Result<Report> {
    let pool = Pool::connect(opts).await?;
    if opts.prepopulate {
        prepopulate(&pool, opts, opts.connections * opts.concurrency).await?;
    }
    if !opts.warmup.is_zero() {
        run_phase(&pool, opts, opts.warmup, None, opts.seed ^ 0x5eed, false).await;
    }
    let show = !opts.quiet && std::io::stderr().is_terminal();
    let updates = || {
        pool.each(|conns: Arc<Conns>| async move {
            conns.smart.as_ref().map_or(0, |c| c.topology_updates())
        })
    };
    let before: u64 = updates().await.into_iter().sum();
    let (rec, seconds) =
        run_phase(&pool, opts, opts.duration, opts.requests, opts.seed, show).await;
    if opts.smart && !opts.quiet {
        let during: u64 = updates().await.into_iter().sum::<u64>() - before;
        println!(
            "  topology       {during} messages to the smart clients ({} threads) in {seconds:.2}s",
            pool.jobs.len()
        );
    }
    Ok(report(&rec, seconds))
}
