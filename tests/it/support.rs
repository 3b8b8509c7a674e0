//! Shared test support: start the real binary on a free port, wait for it with a deadline,
//! talk to it with the generated tonic client, and always reap it (Drop kills and waits).

use distributed_cache::pb::cache_service_client::CacheServiceClient;
use std::{
    io::Read,
    net::TcpListener,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_distributed-cache");

/// A port that was free a moment ago, for TCP and UDP, below the kernel's ephemeral range
/// (32768 up on Linux): a port the kernel hands out is also what it picks for the source of an
/// outgoing connection, and a node once failed to start because a connection of another test
/// had taken the port it was given. Ports go out in turn from a start that differs per
/// process, so two tests of one run never get the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Node {
    pub child: Child,
    pub addr: String,
    /// How clients reach it when it serves TLS (the CA's PEM) or wants a token.
    pub access: Access,
    log_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// What a client needs to reach a node that serves TLS or checks tokens.
#[derive(Clone, Default)]
pub struct Access {
    pub ca_pem: Option<String>,
    /// A client certificate and key (PEM), for a node that requires one.
    pub identity: Option<(String, String)>,
    pub token: Option<String>,
}

impl Node {
    /// Starts a node on a free loopback port with `env` on top of the defaults, and waits
    /// until it answers a health check.
    pub async fn start(env: &[(&str, &str)]) -> Node {
        Self::start_with(None, env).await
    }

    /// As `start`, run under `wrapper` (for example `taskset -c 1`).
    pub async fn start_with(wrapper: Option<&[&str]>, env: &[(&str, &str)]) -> Node {
        Self::start_full(wrapper, env, Access::default()).await
    }

    /// As `start`, for a node that serves TLS or checks tokens: readiness is asked of the
    /// open health service, over TLS when `access` has a CA.
    pub async fn start_secured(env: &[(&str, &str)], access: Access) -> Node {
        Self::start_full(None, env, access).await
    }

    async fn start_full(wrapper: Option<&[&str]>, env: &[(&str, &str)], access: Access) -> Node {
        let addr = env
            .iter()
            .find(|(k, _)| *k == "ADDR")
            .map(|(_, v)| v.to_string())
            .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let dir = tempfile::tempdir().expect("temp dir");
        let log_path = dir.path().join("node.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = Command::new(w[0]);
                c.args(&w[1..]).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.env("ADDR", &addr)
            .env("LOG_FORMAT", "text")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawning distributed-cache");
        let mut node = Node {
            child,
            addr,
            access,
            log_path,
            _dir: dir,
        };
        node.wait_ready().await;
        node
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("node exited during start-up with {status}: {}", self.log());
            }
            if self.access.ca_pem.is_some() || self.access.token.is_some() {
                if let Ok(channel) = self.channel().await {
                    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                    let serving = health
                        .check(tonic_health::pb::HealthCheckRequest::default())
                        .await
                        .is_ok_and(|r| r.into_inner().status == 1);
                    if serving {
                        return;
                    }
                }
            } else if let Ok(mut c) = self.client().await {
                if c.get(distributed_cache::pb::GetRequest {
                    key: "__ready".into(),
                    ..Default::default()
                })
                .await
                .err()
                .map(|s| s.code())
                    == Some(tonic::Code::NotFound)
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node not ready within 20 s: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A fresh channel: TLS with the node's CA when it has one (the token, if any, goes on
    /// each request).
    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        tls_channel(&self.addr, &self.access).await
    }

    /// A fresh connection (its own HTTP/2 connection, so possibly another core).
    pub async fn client(&self) -> Result<CacheServiceClient<Channel>, tonic::transport::Error> {
        let channel = Channel::from_shared(self.url())
            .expect("valid url")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect()
            .await?;
        Ok(CacheServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node did not exit within {timeout:?}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

/// A channel to `addr`: plaintext without a CA, else TLS checked against `access`'s CA (the
/// name checked is the address's host), with its client certificate if it has one.
pub async fn tls_channel(addr: &str, access: &Access) -> Result<Channel, tonic::transport::Error> {
    let Some(ca) = &access.ca_pem else {
        return Channel::from_shared(format!("http://{addr}"))
            .expect("valid url")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect()
            .await;
    };
    let host = addr.rsplit_once(':').map_or("localhost", |(h, _)| h);
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name(host);
    if let Some((cert, key)) = &access.identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("valid url")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// `message` with `token` as its bearer token.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .expect("a valid header value"),
    );
    req
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs the binary with `env` and expects it to refuse to start; returns (exit status, stderr).
pub fn run_expecting_failure(env: &[(&str, &str)]) -> (ExitStatus, String) {
    run_expecting_failure_with(env, |_| {})
}

/// [`run_expecting_failure`] with `setup` applied to the command first (say, a process limit).
pub fn run_expecting_failure_with(
    env: &[(&str, &str)],
    setup: impl FnOnce(&mut Command),
) -> (ExitStatus, String) {
    let mut cmd = Command::new(BIN);
    cmd.env("ADDR", format!("127.0.0.1:{}", free_port()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    setup(&mut cmd);
    let mut child = cmd.spawn().expect("spawning distributed-cache");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("node with {env:?} did not exit within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .expect("reading stderr");
    (status, stderr)
}

/// Runs `f` on a fresh glommio executor thread (as a node's core would make its calls) and
/// returns its result.
pub fn on_glommio<F, Fut, R>(f: F) -> R
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R> + 'static,
    R: Send + 'static,
{
    glommio::LocalExecutorBuilder::default()
        .spawn(f)
        .expect("a glommio executor (needs 512 KiB of locked memory: ulimit -l)")
        .join()
        .expect("the executor thread")
}
