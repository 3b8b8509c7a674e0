//! The operator's command line: `distributed-cache <subcommand>` talks gRPC to a running node.
//! Run bare (or as `serve`), the binary is the node itself. Runs on the main thread with a
//! small tokio runtime; not part of the node. get, set and del go through the shard-aware
//! client (`cache-client`), seeded with `--addr`: to a replica of the key, on its core.
//! Against a node that serves TLS and checks tokens, `--ca` and `--token` (or CACHE_CA_FILE
//! and CACHE_TOKEN) apply to every subcommand: the token goes on every request.

use crate::pb::{node_service_client::NodeServiceClient, StatsRequest};
use clap::{Parser, Subcommand};
use std::{path::PathBuf, time::Duration};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig},
};

#[derive(Parser, Debug)]
#[command(
    name = "distributed-cache",
    version,
    about = "A distributed in-memory cache. Run without a subcommand to serve."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node (the default; configured by environment variables, see the README).
    Serve,
    /// Check a node's health (grpc.health.v1); exit 0 when SERVING.
    Health(Target),
    /// Print the value of KEY.
    Get {
        key: String,
        /// Replicas that must answer: one (the node's own replica when it has one), quorum,
        /// all, or linearizable (a quorum, and a write-back of what is returned).
        #[arg(long, default_value = "quorum", value_parser = ["one", "quorum", "all", "linearizable"])]
        consistency: String,
        #[command(flatten)]
        target: Target,
    },
    /// Set KEY to VALUE.
    Set {
        key: String,
        value: String,
        /// Time to live in seconds (0 = never expires; default: the node's TTL).
        #[arg(long)]
        ttl: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Delete KEY.
    Del {
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// Per-core figures of a node, as a table.
    Stats(Target),
    /// The cluster's members as a node sees them: state and share of the ring.
    Members(Target),
}

#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// The node, host:port.
    #[arg(long, default_value = "localhost:8080")]
    pub addr: String,
    /// Seconds to wait for the node.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// Bearer token, for a node started with AUTH_TOKENS_FILE (sent as `authorization:
    /// Bearer TOKEN`; set/del need a read-write one).
    #[arg(long, env = "CACHE_TOKEN", hide_env_values = true, value_parser = parse_token)]
    pub token: Option<Token>,
    /// PEM file of the CA that signed the node's certificate: connect in TLS. The
    /// certificate must name the host part of --addr (an IP address or a DNS name).
    #[arg(long, env = "CACHE_CA_FILE", value_name = "PEM_FILE")]
    pub ca: Option<PathBuf>,
}

/// A bearer token; its Debug does not show it.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

fn parse_token(s: &str) -> Result<Token, String> {
    // A token read from a file with `$(cat ...)` keeps no newline, but one pasted may.
    let token = s.trim();
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    Ok(Token(token.to_string()))
}

/// Puts the target's token on every request of a tonic client.
#[derive(Clone)]
struct Authorization(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Authorization {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

impl Authorization {
    fn of(t: &Target) -> anyhow::Result<Authorization> {
        let Some(Token(token)) = &t.token else {
            return Ok(Authorization(None));
        };
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            anyhow::anyhow!("the token cannot be sent in a header (it has a control character)")
        })?;
        value.set_sensitive(true);
        Ok(Authorization(Some(value)))
    }
}

/// The host part of `host:port` (`[::1]:8080` gives `::1`): the name the node's certificate
/// must carry.
fn host_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    }
}

/// A tonic channel to the target (TLS with `--ca`) whose requests carry its token.
async fn channel(t: &Target) -> anyhow::Result<InterceptedService<Channel, Authorization>> {
    let timeout = Duration::from_secs_f64(t.timeout.max(0.001));
    let authorization = Authorization::of(t)?;
    let scheme = if t.ca.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{}", t.addr))
        .map_err(|e| anyhow::anyhow!("invalid address {}: {e}", t.addr))?;
    if let Some(path) = &t.ca {
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read the CA file {}: {e}", path.display()))?;
        // Checked here: tonic skips what it cannot parse, and every handshake would then fail
        // with an unknown issuer rather than name the file.
        cache_client::tls_config_from_ca_pem(&pem)
            .map_err(|e| anyhow::anyhow!("the CA file {}: {e}", path.display()))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(host_of(&t.addr));
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("TLS to {}: {e}", t.addr))?;
    }
    let channel = endpoint
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| {
            // tonic's Display says only "transport error"; the cause is in the source chain.
            let mut cause = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                cause = s.to_string();
                source = s.source();
            }
            // rustls' words for a peer that answered a ClientHello with something else.
            let hint = if t.ca.is_some() && cause.contains("InvalidContentType") {
                " (does the node serve TLS?)"
            } else {
                ""
            };
            anyhow::anyhow!("cannot reach {}: {cause}{hint}", t.addr)
        })?;
    Ok(InterceptedService::new(channel, authorization))
}

/// The shard-aware client, seeded with the target; its deadline is the target's timeout.
async fn client(t: &Target) -> anyhow::Result<cache_client::Client> {
    let mut config = cache_client::Config::new([t.addr.clone()]);
    config.timeout = Duration::from_secs_f64(t.timeout.max(0.001));
    if let Some(Token(token)) = &t.token {
        config = config.token(token.clone());
    }
    if let Some(path) = &t.ca {
        config = config.tls_ca_file(path.clone());
    }
    cache_client::Client::connect(config)
        .await
        .map_err(|e| match e {
            // At connect, these name each seed and what it answered.
            cache_client::Error::Unauthenticated(why)
            | cache_client::Error::PermissionDenied(why) => {
                anyhow::anyhow!("{why}")
            }
            e => client_error(t, e),
        })
}

fn client_error(t: &Target, e: cache_client::Error) -> anyhow::Error {
    match e {
        // Its message names each seed it could not reach, and why.
        cache_client::Error::NoTopology(why) => {
            anyhow::anyhow!("{why}{}", plaintext_hint(t, &why))
        }
        // A CA file that cannot be used, named in the message; nothing was sent.
        cache_client::Error::Config(why) => anyhow::anyhow!("{why}"),
        e => anyhow::anyhow!("{} answered {e}", t.addr),
    }
}

fn status_error(t: &Target, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "{} answered {:?}: {}{}",
        t.addr,
        s.code(),
        s.message(),
        plaintext_hint(t, s.message())
    )
}

/// A node that serves TLS drops a plaintext client during the HTTP/2 preface, which hyper
/// reports as a protocol error: say what likely went wrong.
fn plaintext_hint(t: &Target, message: &str) -> &'static str {
    if t.ca.is_none() && message.contains("h2 protocol error") {
        " (if the node serves TLS, pass --ca)"
    } else {
        ""
    }
}

/// Runs one client subcommand; the error is printed by main with exit code 1.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve => unreachable!("serve is handled by main"),
        Command::Health(t) => {
            let mut c = tonic_health::pb::health_client::HealthClient::new(channel(&t).await?);
            let resp = c
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|s| status_error(&t, s))?
                .into_inner();
            let status =
                tonic_health::pb::health_check_response::ServingStatus::try_from(resp.status)
                    .map(|s| s.as_str_name())
                    .unwrap_or("UNKNOWN");
            println!("{status}");
            if status != "SERVING" {
                anyhow::bail!("{} is {status}", t.addr);
            }
        }
        Command::Get {
            key,
            consistency,
            target,
        } => {
            let level = match consistency.as_str() {
                "one" => cache_client::Consistency::One,
                "all" => cache_client::Consistency::All,
                "linearizable" => cache_client::Consistency::Linearizable,
                _ => cache_client::Consistency::Quorum,
            };
            let c = client(&target).await?;
            let opts = cache_client::Options::default().consistency(level);
            match c
                .get_with(&key, opts)
                .await
                .map_err(|e| client_error(&target, e))?
            {
                Some(cache_client::Value::Text(v)) => println!("{v}"),
                Some(cache_client::Value::Bytes(b)) => {
                    use std::io::Write;
                    std::io::stdout().write_all(&b)?;
                    println!();
                }
                None => anyhow::bail!("{} answered NotFound: key {key:?} not found", target.addr),
            }
        }
        Command::Set {
            key,
            value,
            ttl,
            target,
        } => {
            let c = client(&target).await?;
            let v = c
                .set(&key, value, ttl.map(Duration::from_secs))
                .await
                .map_err(|e| client_error(&target, e))?;
            println!("OK version {}.{}", v.hlc, v.node);
        }
        Command::Del { key, target } => {
            let c = client(&target).await?;
            let deleted = c.delete(&key).await.map_err(|e| client_error(&target, e))?;
            println!("{}", if deleted { "deleted" } else { "not found" });
        }
        Command::Stats(t) => {
            let mut c = NodeServiceClient::new(channel(&t).await?);
            let s = c
                .stats(StatsRequest {})
                .await
                .map_err(|s| status_error(&t, s))?
                .into_inner();
            println!(
                "{:>4} {:>12} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>6} {:>8} {:>10} {:>9} {:>9}",
                "core",
                "requests",
                "hits",
                "misses",
                "entries",
                "entry_bytes",
                "evictions",
                "expired",
                "shed",
                "limited",
                "mean_us",
                "used_MB",
                "share_MB"
            );
            for c in &s.cores {
                let requests: u64 = c.requests.iter().map(|r| r.count).sum();
                println!(
                    "{:>4} {:>12} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>6} {:>8} {:>10.1} {:>9.1} {:>9.1}",
                    c.core,
                    requests,
                    c.hits,
                    c.misses,
                    c.entries,
                    c.entry_bytes,
                    c.evictions,
                    c.expirations,
                    c.shed,
                    c.rate_limited,
                    c.mean_latency_us,
                    c.memory_used_bytes as f64 / 1e6,
                    c.memory_share_bytes as f64 / 1e6
                );
            }
            println!(
                "rss {:.1} MB, MAX_MEMORY {:.1} MB, up {:.0} s",
                s.rss_bytes as f64 / 1e6,
                s.memory_budget_bytes as f64 / 1e6,
                s.uptime_seconds
            );
        }
        Command::Members(t) => {
            let mut c = NodeServiceClient::new(channel(&t).await?);
            let m = c
                .members(crate::pb::MembersRequest {})
                .await
                .map_err(|s| status_error(&t, s))?
                .into_inner();
            println!(
                "{:<28} {:<8} {:>8} {:>8} {:>8}",
                "member", "state", "primary", "replica", "in ring"
            );
            for member in &m.members {
                println!(
                    "{:<28} {:<8} {:>7.1}% {:>7.1}% {:>8}",
                    format!(
                        "{}{}",
                        member.addr,
                        if member.is_self { " (self)" } else { "" }
                    ),
                    member.state,
                    member.primary_share * 100.0,
                    member.replica_share * 100.0,
                    if member.in_ring { "yes" } else { "no" }
                );
            }
            println!(
                "replication factor {}, write quorum {}, read quorum {}",
                m.replication_factor, m.write_quorum, m.read_quorum
            );
        }
    }
    Ok(())
}
