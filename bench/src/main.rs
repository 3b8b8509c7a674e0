//! cache-bench: load generator for distributed-cache, baseline servers, and side-by-side
//! comparison. See `cache-bench --help`.

mod baseline;
mod certs;
mod compare;
mod hitratio;
mod run;
mod stats;
mod workload;

use clap::{Args, Parser, Subcommand};
use std::{path::PathBuf, time::Duration};
use workload::{KeyDist, Workload};

#[derive(Parser)]
#[command(
    name = "cache-bench",
    version,
    about = "Load generator and baselines for distributed-cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load a node or a cluster and report throughput, latency and errors.
    Run {
        /// host:port[,host:port...]; requests are spread over all of them.
        #[arg(long, value_delimiter = ',', required = true, value_parser = parse_target)]
        target: Vec<String>,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        security: SecurityArgs,
        /// Write every figure and the settings as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Write test certificates for TLS nodes into DIR: ca.pem (a self-signed CA), node.pem
    /// and node-key.pem (signed by it, naming every --names entry, for serverAuth and
    /// clientAuth, so members can also use them for mutual TLS), client.pem and
    /// client-key.pem (clientAuth, CN "client"). For tests and benchmarks only: the CA's key
    /// is not kept, the keys are as readable as the certificates (a node in a container runs
    /// as its own user), and nothing expires before the year 4096.
    ///
    /// Example: `cache-bench certs --out /tmp/c --names 127.0.0.1,localhost`, then a node
    /// with TLS_CERT_FILE=/tmp/c/node.pem TLS_KEY_FILE=/tmp/c/node-key.pem, and clients
    /// with --ca /tmp/c/ca.pem.
    Certs {
        /// Directory to write into (made if missing; files there are replaced).
        #[arg(long)]
        out: PathBuf,
        /// The names the nodes are reached by: each an IP address if it parses as one, else
        /// a DNS name (e.g. 127.0.0.1,localhost,node1,node2).
        #[arg(long, value_delimiter = ',', required = true)]
        names: Vec<String>,
    },
    /// Serve pb.CacheService with plain tonic: `none` (the gRPC ceiling) or `mutex` (sharded Mutex<LruCache>).
    Baseline {
        #[arg(long, default_value = "127.0.0.1:8090")]
        addr: std::net::SocketAddr,
        #[arg(long, value_enum, default_value = "none")]
        store: baseline::Store,
        #[arg(long, default_value_t = 1_000_000)]
        capacity: usize,
        #[arg(long, default_value_t = 100)]
        value_bytes: usize,
    },
    /// Run the ceiling, the mutex baseline and the node alternately (A B C, several rounds) with
    /// the same load, and print medians, spreads and ratios.
    Compare {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// The distributed-cache binary (default: next to this one).
        #[arg(long)]
        node_bin: Option<PathBuf>,
        /// Extra environment for the node, KEY=VALUE (repeatable), e.g. NUM_SHARDS=64.
        #[arg(long = "node-env", value_parser = parse_env)]
        node_env: Vec<(String, String)>,
        /// Also run a second node variant ("node-b") in the same rotation: this binary...
        #[arg(long)]
        node_b_bin: Option<PathBuf>,
        /// ...and/or this extra environment (repeatable), e.g. METRICS_ADDR=127.0.0.1:9100.
        #[arg(long = "node-b-env", value_parser = parse_env)]
        node_b_env: Vec<(String, String)>,
        /// Also load this many keys into a fresh node and a fresh mutex baseline and report
        /// their RSS per entry.
        #[arg(long)]
        memory_keys: Option<u64>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Hit ratios of the eviction policies (the node's shard code, in process) and an exact
    /// LRU, side by side: a cache-aside client over Zipf keys, every combination of the
    /// exponents and cache sizes given.
    HitRatio {
        /// Zipf key space.
        #[arg(long, default_value_t = 10_000_000)]
        keys: u64,
        #[arg(long, value_delimiter = ',', default_value = "0.8,0.99")]
        zipf: Vec<f64>,
        /// Cache sizes, in percent of the key space (entries).
        #[arg(long, value_delimiter = ',', default_value = "1,10")]
        cache_percent: Vec<f64>,
        /// Zipf requests per run, in multiples of the cache size (enough to fill it and
        /// settle).
        #[arg(long, default_value_t = 10)]
        requests_per_entry: u64,
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "plain,scan,ttl"
        )]
        mix: Vec<hitratio::Mix>,
        /// Zipf requests between two scans (the scan mix), in multiples of the cache size.
        #[arg(long, default_value_t = 2)]
        scan_every_entries: u64,
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "s3fifo,clock,lru"
        )]
        policy: Vec<hitratio::Which>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Args, Clone, Debug, serde::Serialize)]
pub struct LoadArgs {
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    connections: u64,
    /// Streams in flight per connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    concurrency: u64,
    /// OS threads for the connections, each running its share on its own single-threaded
    /// runtime (default: the cores this process may use).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Option<u64>,
    /// Open loop at this many requests/s in total (default: closed loop).
    #[arg(long, value_parser = parse_positive)]
    rate: Option<f64>,
    /// Key space size.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// Index of the first key (keys are first-key .. first-key + keys), e.g. to aim a
    /// one-key run at a key owned by a given core.
    #[arg(long, default_value_t = 0)]
    first_key: u64,
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=65536))]
    key_bytes: u64,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=(64 << 20)))]
    value_bytes: u64,
    /// Values of random sizes from --value-bytes up to this, log-uniformly.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=(64 << 20)))]
    value_bytes_max: Option<u64>,
    /// Share of Gets among Gets and Sets, 0..1.
    #[arg(long, default_value_t = 0.9, value_parser = parse_ratio)]
    read_ratio: f64,
    /// Share of Deletes among all requests, 0..1.
    #[arg(long, default_value_t = 0.0, value_parser = parse_ratio)]
    delete_ratio: f64,
    /// uniform, or zipf:EXPONENT (e.g. zipf:0.99).
    #[arg(long, default_value = "uniform", value_parser = parse_dist)]
    #[serde(skip)]
    dist: KeyDist,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0, value_parser = parse_positive)]
    duration: f64,
    /// Stop after this many measured requests.
    #[arg(long)]
    requests: Option<u64>,
    /// Seconds of load before measuring (not counted).
    #[arg(long, default_value_t = 2.0, value_parser = parse_non_negative)]
    warmup: f64,
    /// Set every key once before the warm-up.
    #[arg(long, default_value_t = false)]
    prepopulate: bool,
    /// Per-request timeout, seconds; also bounds connecting.
    #[arg(long, default_value_t = 5.0, value_parser = parse_positive)]
    rpc_timeout: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Consistency level of every request: quorum, one, all or linearizable.
    #[arg(long, value_enum, default_value = "quorum")]
    #[serde(skip)]
    consistency: Level,
    /// plain: each connection to one target, requests sent where they land; smart: the
    /// shard-aware client (cache-client), each request to a replica of its key on the core
    /// that owns it (the targets are its seeds; one client per load thread).
    #[arg(long, value_enum, default_value = "plain")]
    #[serde(skip)]
    client: ClientKind,
}

/// How `run` reaches nodes that serve TLS and check tokens; both clients use them.
#[derive(Args, Clone)]
struct SecurityArgs {
    /// Bearer token sent on every request (`authorization: Bearer TOKEN`), for nodes started
    /// with AUTH_TOKENS_FILE; writes need a read-write one.
    #[arg(long, env = "CACHE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM file of the CA that signed the nodes' certificates: connect in TLS. A node's
    /// certificate must name the host part of its --target (see `cache-bench certs`).
    #[arg(long, env = "CACHE_CA_FILE", value_name = "PEM_FILE")]
    ca: Option<PathBuf>,
}

impl SecurityArgs {
    /// Reads the CA once, for every connection of every load thread.
    fn load(&self) -> anyhow::Result<run::Security> {
        let tls = match &self.ca {
            None => None,
            Some(path) => Some(
                cache_client::tls_config_from_ca_file(path).map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
        };
        let token = self.token.as_deref().map(str::trim).map(str::to_string);
        if token.as_deref() == Some("") {
            anyhow::bail!("--token is empty");
        }
        Ok(run::Security { token, tls })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ClientKind {
    Plain,
    Smart,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Level {
    Quorum = 0,
    One = 1,
    All = 2,
    Linearizable = 3,
}

impl LoadArgs {
    fn dist_name(&self) -> String {
        match self.dist {
            KeyDist::Uniform => "uniform".into(),
            KeyDist::Zipf(s) => format!("zipf:{s}"),
        }
    }

    fn to_opts(&self, targets: Vec<String>, quiet: bool) -> run::RunOpts {
        run::RunOpts {
            targets,
            connections: self.connections as usize,
            concurrency: self.concurrency as usize,
            threads: self.threads.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get()),
                |t| t as usize,
            ),
            rate: self.rate,
            workload: Workload {
                keys: self.keys,
                first_key: self.first_key,
                key_bytes: self.key_bytes as usize,
                value_bytes: self.value_bytes as usize,
                value_bytes_max: self.value_bytes_max.map(|m| m as usize),
                read_ratio: self.read_ratio,
                delete_ratio: self.delete_ratio,
                dist: self.dist,
                consistency: self.consistency as i32,
            },
            duration: Duration::from_secs_f64(self.duration),
            requests: self.requests,
            warmup: Duration::from_secs_f64(self.warmup),
            prepopulate: self.prepopulate,
            rpc_timeout: Duration::from_secs_f64(self.rpc_timeout),
            seed: self.seed,
            smart: self.client == ClientKind::Smart,
            security: run::Security::default(),
            quiet,
        }
    }
}

fn parse_target(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{s:?} is not host:port"));
    }
    Ok(s.to_string())
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=1.0).contains(&x) {
        return Err(format!("{x} is not between 0 and 1"));
    }
    Ok(x)
}

fn parse_positive(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(x.is_finite() && x > 0.0) {
        return Err(format!("{x} must be positive"));
    }
    Ok(x)
}

fn parse_non_negative(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(x.is_finite() && x >= 0.0) {
        return Err(format!("{x} must not be negative"));
    }
    Ok(x)
}

fn parse_dist(s: &str) -> Result<KeyDist, String> {
    if s == "uniform" {
        return Ok(KeyDist::Uniform);
    }
    let exp = s
        .strip_prefix("zipf:")
        .ok_or_else(|| format!("{s:?}: expected uniform or zipf:EXPONENT"))?;
    let e: f64 = exp
        .parse()
        .map_err(|_| format!("{exp:?} is not a number"))?;
    if !(e.is_finite() && e > 0.0) {
        return Err("the Zipf exponent must be positive".into());
    }
    Ok(KeyDist::Zipf(e))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result = rt.block_on(async move {
        match cli.command {
            Cmd::Run {
                target,
                load,
                security,
                json,
            } => {
                let mut opts = load.to_opts(target.clone(), false);
                opts.security = security.load()?;
                let load_before = stats::loadavg();
                let rep = run::run(&opts).await?;
                let load_after = stats::loadavg();
                stats::print_report(&format!("run against {}", target.join(",")), &rep);
                println!("  load average before {load_before}  after {load_after}");
                if let Some(path) = json {
                    let doc = serde_json::json!({
                        "settings": {
                            "targets": target, "load": load, "dist": load.dist_name(),
                            "tls": opts.security.tls.is_some(),
                            "token": opts.security.token.is_some(),
                        },
                        "report": rep,
                        "loadavg_before": load_before,
                        "loadavg_after": load_after,
                    });
                    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
                }
                anyhow::Ok(())
            }
            Cmd::Certs { out, names } => {
                for path in certs::write(&out, &names)? {
                    println!("{}", path.display());
                }
                anyhow::Ok(())
            }
            Cmd::Baseline {
                addr,
                store,
                capacity,
                value_bytes,
            } => baseline::serve(addr, store, capacity, value_bytes).await,
            Cmd::HitRatio {
                keys,
                zipf,
                cache_percent,
                requests_per_entry,
                mix,
                scan_every_entries,
                policy,
                json,
            } => {
                let mut rows = Vec::new();
                println!("| mix | zipf | cache | {} |", policy.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(" | "));
                for &m in &mix {
                    for &exponent in &zipf {
                        for &percent in &cache_percent {
                            let entries = ((keys as f64 * percent / 100.0) as usize).max(1);
                            let spec = hitratio::Spec {
                                keys,
                                exponent,
                                entries,
                                requests: entries as u64 * requests_per_entry,
                                mix: m,
                                scan_every: (entries as u64 * scan_every_entries).max(1),
                                seed: 42,
                            };
                            let ratios: Vec<_> = policy
                                .iter()
                                .map(|&p| (p, hitratio::simulate(p, &spec)))
                                .collect();
                            println!(
                                "| {m:?} | {exponent} | {percent}% ({entries}) | {} |",
                                ratios
                                    .iter()
                                    .map(|(_, o)| format!("{:.4}", o.ratio()))
                                    .collect::<Vec<_>>()
                                    .join(" | ")
                            );
                            rows.push(serde_json::json!({
                                "mix": m, "zipf": exponent, "cache_percent": percent,
                                "entries": entries, "requests": spec.requests,
                                "ratios": ratios.iter().map(|(p, o)| serde_json::json!({"policy": p, "gets": o.gets, "hits": o.hits, "ratio": o.ratio()})).collect::<Vec<_>>(),
                            }));
                        }
                    }
                }
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_vec_pretty(&rows)?)?;
                }
                anyhow::Ok(())
            }
            Cmd::Compare {
                load,
                rounds,
                node_bin,
                node_env,
                node_b_bin,
                node_b_env,
                memory_keys,
                json,
            } => {
                compare::compare(compare::CompareOpts {
                    load,
                    rounds,
                    node_bin,
                    node_env,
                    node_b_bin,
                    node_b_env,
                    memory_keys,
                    json,
                })
                .await
            }
        }
    });
    if let Err(e) = result {
        eprintln!("cache-bench: {e:#}");
        std::process::exit(1);
    }
}
