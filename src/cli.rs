//! The operator's command line: `distributed-cache <subcommand>` talks gRPC to a running node.
//! Run bare (or as `serve`), the binary is the node itself. Runs on the main thread with a
//! small tokio runtime; not part of the node. get, set and del go through the shard-aware
//! client (`cache-client`), seeded with `--addr`: to a replica of the key, on its core.

use crate::pb::{node_service_client::NodeServiceClient, StatsRequest};
use clap::{Parser, Subcommand};
use std::time::Duration;
use tonic::transport::Channel;

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
}

async fn channel(t: &Target) -> anyhow::Result<Channel> {
    let timeout = Duration::from_secs_f64(t.timeout.max(0.001));
    Channel::from_shared(format!("http://{}", t.addr))
        .map_err(|e| anyhow::anyhow!("invalid address {}: {e}", t.addr))?
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
            anyhow::anyhow!("cannot reach {}: {cause}", t.addr)
        })
}

/// The shard-aware client, seeded with the target; its deadline is the target's timeout.
async fn client(t: &Target) -> anyhow::Result<cache_client::Client> {
    let mut config = cache_client::Config::new([t.addr.clone()]);
    config.timeout = Duration::from_secs_f64(t.timeout.max(0.001));
    cache_client::Client::connect(config)
        .await
        .map_err(|e| client_error(t, e))
}

fn client_error(t: &Target, e: cache_client::Error) -> anyhow::Error {
    match e {
        // Its message names each seed it could not reach, and why.
        cache_client::Error::NoTopology(why) => anyhow::anyhow!("{why}"),
        e => anyhow::anyhow!("{} answered {e}", t.addr),
    }
}

fn status_error(t: &Target, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} answered {:?}: {}", t.addr, s.code(), s.message())
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
