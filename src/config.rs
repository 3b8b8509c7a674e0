//! Environment variables -> a validated [`Config`]. Every check on configuration lives here, and
//! each failure names the variable and its value in one line. Runs once, on the main thread.

use crate::engine::{
    budget::Memory,
    shard::{Policy, SHARD_FIXED_BYTES},
};
use serde::Deserialize;
use std::{
    net::{SocketAddr, ToSocketAddrs},
    num::NonZeroU32,
    time::Duration,
};

/// The raw variables, as strings: parsing is ours so every error can name its variable.
/// (envy matches variable names to fields case-insensitively.)
#[derive(Debug, Default, Deserialize)]
struct RawEnv {
    addr: Option<String>,
    peers: Option<String>,
    num_shards: Option<String>,
    capacity: Option<String>,
    max_memory: Option<String>,
    eviction: Option<String>,
    ttl: Option<String>,
    max_recv_msg_size: Option<String>,
    max_send_msg_size: Option<String>,
    rpc_timeout: Option<String>,
    rate_limit: Option<String>,
    rate_limit_burst: Option<String>,
    cores: Option<String>,
    queue_depth: Option<String>,
    shutdown_timeout: Option<String>,
    spin_before_park_us: Option<String>,
    log_format: Option<String>,
    metrics_addr: Option<String>,
    listen_addr: Option<String>,
    replication_factor: Option<String>,
    write_quorum: Option<String>,
    read_quorum: Option<String>,
    dead_node_timeout: Option<String>,
    tombstone_ttl: Option<String>,
    vnodes: Option<String>,
    hinted_handoff: Option<String>,
    max_hints: Option<String>,
    max_hint_bytes: Option<String>,
    hint_ttl: Option<String>,
    anti_entropy_interval: Option<String>,
    anti_entropy: Option<String>,
    speculative_retry: Option<String>,
    http2_handshake_timeout: Option<String>,
    http2_idle_timeout: Option<String>,
    http2_max_resets_per_sec: Option<String>,
    http2_max_control_frames_per_sec: Option<String>,
    http2_conn_reply_buffer: Option<String>,
    http2_core_reply_buffer: Option<String>,
    max_connections: Option<String>,
    shard_port: Option<String>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    tls_client_ca_file: Option<String>,
    tls_ca_file: Option<String>,
    plaintext_addr: Option<String>,
    auth_tokens_file: Option<String>,
    cluster_secret: Option<String>,
    cluster_secret_file: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The address as given (for logs) and as resolved (to bind).
    pub addr: String,
    pub listen_addr: SocketAddr,
    pub peers: Vec<String>,
    pub num_shards: u32,
    /// What the node may hold: MAX_MEMORY bytes, at most CAPACITY entries if given, and how
    /// it evicts.
    pub memory: Memory,
    /// Default time to live; `None` keeps entries until evicted.
    pub ttl_secs: Option<u64>,
    pub max_recv_msg_bytes: usize,
    pub max_send_msg_bytes: usize,
    pub rpc_timeout: Duration,
    /// Requests per second over the whole node; `None` is no limit.
    pub rate_limit: Option<NonZeroU32>,
    pub rate_limit_burst: NonZeroU32,
    /// Use at most this many of the allowed cores.
    pub cores: Option<usize>,
    /// Calls one core may have outstanding towards another before it sheds.
    pub queue_depth: usize,
    pub shutdown_timeout: Duration,
    pub spin_before_park: Option<Duration>,
    pub log_format: LogFormat,
    /// Where /metrics is served; None = off.
    pub metrics_addr: Option<SocketAddr>,
    /// Replicas per key (capped at the ring size at run time).
    pub replication_factor: usize,
    pub write_quorum: usize,
    pub read_quorum: usize,
    /// How long a DOWN member keeps its ring share before it is dropped from the ring.
    pub dead_node_timeout: Duration,
    /// How long a delete's tombstone is kept (must outlast any replica's downtime).
    pub tombstone_ttl_secs: u64,
    pub vnodes: u32,
    /// Hinted handoff: on or off, and the node's bounds on what it keeps.
    pub hints: crate::cluster::hints::HintLimits,
    /// How often replicas compare their digest trees; None = never (ANTI_ENTROPY=off).
    pub anti_entropy_interval: Option<Duration>,
    /// When a read waiting for a slow replica asks one more (SPECULATIVE_RETRY).
    pub speculative_retry: crate::cluster::snitch::SpeculativeRetry,
    /// Each client connection's bounds (HTTP2_* variables).
    pub http2: crate::ingress::grpc::server::Limits,
    /// Client connections the node serves at once (split over its cores); more are turned
    /// away with GOAWAY.
    pub max_connections: usize,
    /// The shard-aware port (routing/steer.rs): Some(0) for one the kernel picks (the
    /// default: NodeService.Layout tells peers which), None when SHARD_PORT is off.
    pub shard_port: Option<u16>,
    /// TLS, tokens and the cluster secret (the files are read by `security::Material::load`).
    pub security: crate::security::Settings,
    /// With TLS on ADDR: where the node also serves plaintext (PLAINTEXT_ADDR), if anywhere.
    pub plaintext_addr: Option<SocketAddr>,
}

/// One invalid variable. Printed as is by main.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {var}={value:?}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub reason: String,
}

fn invalid(var: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// A variable's value, trimmed; None when unset or blank (the default applies).
fn given(raw: &Option<String>) -> Option<&str> {
    raw.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn parse_u64(
    var: &'static str,
    raw: &Option<String>,
    default: u64,
    min: u64,
) -> Result<u64, ConfigError> {
    let Some(value) = given(raw) else {
        return Ok(default);
    };
    let n: u64 = value
        .parse()
        .map_err(|_| invalid(var, value, "expected a whole number"))?;
    if n < min {
        return Err(invalid(var, value, format!("must be at least {min}")));
    }
    Ok(n)
}

const BYTES_EXPECTED: &str =
    "expected bytes with an optional unit: k, kb, m, mb, g, gb (e.g. 512mb)";

/// A size in bytes, as Redis reads `maxmemory`: a number with an optional unit, `k`/`m`/`g`
/// (powers of 1000) or `kb`/`mb`/`gb` (powers of 1024), case-insensitive.
fn parse_bytes(
    var: &'static str,
    raw: &Option<String>,
    default: u64,
    min: u64,
) -> Result<u64, ConfigError> {
    let Some(value) = given(raw) else {
        return Ok(default);
    };
    let lower = value.to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit: u64 = match &lower[digits.len()..] {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1 << 10,
        "m" => 1_000_000,
        "mb" => 1 << 20,
        "g" => 1_000_000_000,
        "gb" => 1 << 30,
        "t" => 1_000_000_000_000,
        "tb" => 1 << 40,
        _ => return Err(invalid(var, value, BYTES_EXPECTED)),
    };
    let n = digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| invalid(var, value, BYTES_EXPECTED))?;
    if n < min {
        return Err(invalid(
            var,
            value,
            format!("must be at least {min} bytes (what the node's shards need empty)"),
        ));
    }
    Ok(n)
}

fn parse_secs(
    var: &'static str,
    raw: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(value) = given(raw) else {
        return Ok(default);
    };
    let secs: f64 = value
        .parse()
        .map_err(|_| invalid(var, value, "expected a number of seconds"))?;
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(invalid(var, value, "must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Connections the process's open-file limit leaves room for: each takes two descriptors (the
/// socket and the handle kept for its lingering close), and a few hundred stay for peers,
/// gossip, metrics and io_uring.
/// The TLS_*, AUTH_TOKENS_FILE and CLUSTER_SECRET(_FILE) variables. The files themselves are
/// read at start by `security::Material::load`, whose errors name the variable and path.
fn security_settings(
    raw: &RawEnv,
    listen_addr: SocketAddr,
) -> Result<(crate::security::Settings, Option<SocketAddr>), ConfigError> {
    use crate::security::{secret::ClusterSecret, tls::TlsFiles};
    use std::path::PathBuf;
    let path = |raw: &Option<String>| given(raw).map(PathBuf::from);
    let cert = path(&raw.tls_cert_file);
    let key = path(&raw.tls_key_file);
    let tls = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert,
            key,
            client_ca: path(&raw.tls_client_ca_file),
            peer_ca: path(&raw.tls_ca_file),
        }),
        (Some(cert), None) => {
            return Err(invalid(
                "TLS_KEY_FILE",
                "",
                format!("required with TLS_CERT_FILE={}", cert.display()),
            ))
        }
        (None, Some(key)) => {
            return Err(invalid(
                "TLS_CERT_FILE",
                "",
                format!("required with TLS_KEY_FILE={}", key.display()),
            ))
        }
    };
    if tls.is_none() {
        for (var, value) in [
            ("TLS_CLIENT_CA_FILE", &raw.tls_client_ca_file),
            ("TLS_CA_FILE", &raw.tls_ca_file),
            ("PLAINTEXT_ADDR", &raw.plaintext_addr),
        ] {
            if let Some(value) = given(value) {
                return Err(invalid(var, value, "needs TLS_CERT_FILE and TLS_KEY_FILE"));
            }
        }
    }
    let plaintext_addr = match given(&raw.plaintext_addr) {
        None => None,
        Some(value) => {
            validate_host_port("PLAINTEXT_ADDR", value)?;
            let addr = value
                .to_socket_addrs()
                .map_err(|e| invalid("PLAINTEXT_ADDR", value, format!("cannot resolve: {e}")))?
                .find(|a| a.is_ipv4())
                .ok_or_else(|| invalid("PLAINTEXT_ADDR", value, "resolves to no IPv4 address"))?;
            if addr == listen_addr {
                return Err(invalid(
                    "PLAINTEXT_ADDR",
                    value,
                    "is the address TLS is served on",
                ));
            }
            Some(addr)
        }
    };
    // The secret itself is never echoed in an error.
    let cluster = match (given(&raw.cluster_secret), given(&raw.cluster_secret_file)) {
        (Some(_), Some(file)) => {
            return Err(invalid(
                "CLUSTER_SECRET_FILE",
                file,
                "give CLUSTER_SECRET or CLUSTER_SECRET_FILE, not both",
            ))
        }
        (Some(secret), None) => Some(
            ClusterSecret::new(secret.as_bytes())
                .map_err(|reason| invalid("CLUSTER_SECRET", "(hidden)", reason))?,
        ),
        (None, Some(file)) => {
            let secret = std::fs::read(file)
                .map_err(|e| invalid("CLUSTER_SECRET_FILE", file, format!("cannot read: {e}")))?;
            Some(
                ClusterSecret::new(secret.trim_ascii())
                    .map_err(|reason| invalid("CLUSTER_SECRET_FILE", file, reason))?,
            )
        }
        (None, None) => None,
    };
    Ok((
        crate::security::Settings {
            tls,
            tokens_file: path(&raw.auth_tokens_file),
            cluster,
        },
        plaintext_addr,
    ))
}

fn default_max_connections() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    (soft.min(1 << 20).saturating_sub(256) / 2).max(1)
}

/// An on/off variable, on by default.
fn parse_switch(var: &'static str, raw: &Option<String>) -> Result<bool, ConfigError> {
    match raw.as_deref().map(str::trim) {
        None | Some("") | Some("on") | Some("true") | Some("1") => Ok(true),
        Some("off") | Some("false") | Some("0") => Ok(false),
        Some(other) => Err(invalid(var, other, "expected on or off (true/false, 1/0)")),
    }
}

fn validate_host_port(var: &'static str, value: &str) -> Result<(), ConfigError> {
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| invalid(var, value, "expected host:port"))?;
    if host.is_empty() {
        return Err(invalid(var, value, "expected host:port, the host is empty"));
    }
    port.parse::<u16>()
        .map_err(|_| invalid(var, value, "expected host:port with a port from 0 to 65535"))?;
    Ok(())
}

impl Config {
    /// After a ring change, how long reads also ask the former owners of a key and former
    /// owners keep what they handed off: three anti-entropy rounds and some slack, time for
    /// new replicas to receive their data.
    pub fn transition(&self) -> Duration {
        self.anti_entropy_interval.unwrap_or(Duration::ZERO) * 3 + Duration::from_secs(5)
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the given variables (tests pass their own).
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(
        vars: I,
    ) -> Result<Config, ConfigError> {
        // Every field is an optional string, so envy itself cannot fail on values; it only
        // fails on what cannot happen with plain string variables.
        let raw: RawEnv = envy::from_iter(vars).map_err(|e| ConfigError {
            var: "environment",
            value: String::new(),
            reason: e.to_string(),
        })?;

        let addr = raw
            .addr
            .clone()
            .filter(|a| !a.trim().is_empty())
            .unwrap_or_else(|| "localhost:8080".to_string());
        let addr = addr.trim().to_string();
        validate_host_port("ADDR", &addr)?;
        let resolved: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| invalid("ADDR", &addr, format!("cannot resolve: {e}")))?
            .collect();
        // localhost resolves to ::1 and 127.0.0.1 in an order set by /etc/hosts; IPv4 first
        // matches what clients such as grpcurl and Go's dialer try first.
        let listen_addr = resolved
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| resolved.first())
            .copied()
            .ok_or_else(|| invalid("ADDR", &addr, "resolves to no address"))?;

        // ADDR is the node's identity, the address peers reach it at; LISTEN_ADDR, when set, is
        // where it binds (0.0.0.0:8080 in a container whose ADDR is its service name).
        let listen_addr = match raw
            .listen_addr
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            None => listen_addr,
            Some(value) => {
                validate_host_port("LISTEN_ADDR", value)?;
                value
                    .to_socket_addrs()
                    .map_err(|e| invalid("LISTEN_ADDR", value, format!("cannot resolve: {e}")))?
                    .find(|a| a.is_ipv4())
                    .ok_or_else(|| invalid("LISTEN_ADDR", value, "resolves to no IPv4 address"))?
            }
        };

        let mut peers = Vec::new();
        if let Some(list) = raw.peers.as_deref() {
            for peer in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                validate_host_port("PEERS", peer).map_err(|e| invalid("PEERS", list, e.reason))?;
                peers.push(peer.to_string());
            }
        }

        let num_shards = parse_u64("NUM_SHARDS", &raw.num_shards, 1, 1)?;
        let num_shards = u32::try_from(num_shards)
            .ok()
            .filter(|&n| n <= 1 << 20)
            .ok_or_else(|| {
                invalid(
                    "NUM_SHARDS",
                    raw.num_shards.as_deref().unwrap_or(""),
                    "must be at most 1048576",
                )
            })?;
        let capacity = parse_u64("CAPACITY", &raw.capacity, 0, 1)?;
        // Each shard's fixed part, and 4 MiB for entries at the least.
        let min_memory = num_shards as u64 * SHARD_FIXED_BYTES as u64 + (4 << 20);
        let max_memory = parse_bytes("MAX_MEMORY", &raw.max_memory, 1 << 30, min_memory)?;
        let policy = match raw.eviction.as_deref().map(str::trim) {
            None | Some("") | Some("s3fifo") => Policy::S3Fifo,
            Some("clock") => Policy::Clock,
            Some(other) => return Err(invalid("EVICTION", other, "expected s3fifo or clock")),
        };
        let memory = Memory {
            max_bytes: max_memory,
            max_entries: (capacity > 0).then_some(capacity),
            policy,
        };
        let ttl = parse_u64("TTL", &raw.ttl, 3600, 0)?;
        let max_recv = parse_u64(
            "MAX_RECV_MSG_SIZE",
            &raw.max_recv_msg_size,
            4 * 1024 * 1024,
            1,
        )?;
        let max_send = parse_u64(
            "MAX_SEND_MSG_SIZE",
            &raw.max_send_msg_size,
            4 * 1024 * 1024,
            1,
        )?;
        let rpc_timeout = parse_secs("RPC_TIMEOUT", &raw.rpc_timeout, Duration::from_secs(5))?;
        let rate_limit = parse_u64("RATE_LIMIT", &raw.rate_limit, 0, 0)?;
        let rate_limit = u32::try_from(rate_limit).map_err(|_| {
            invalid(
                "RATE_LIMIT",
                raw.rate_limit.as_deref().unwrap_or(""),
                "must fit in 32 bits",
            )
        })?;
        let burst = parse_u64("RATE_LIMIT_BURST", &raw.rate_limit_burst, 100, 1)?;
        let burst = u32::try_from(burst)
            .ok()
            .and_then(NonZeroU32::new)
            .ok_or_else(|| {
                invalid(
                    "RATE_LIMIT_BURST",
                    raw.rate_limit_burst.as_deref().unwrap_or(""),
                    "must fit in 32 bits",
                )
            })?;
        let cores = match raw
            .cores
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            None => None,
            Some(_) => Some(parse_u64("CORES", &raw.cores, 0, 1)? as usize),
        };
        let queue_depth = parse_u64("QUEUE_DEPTH", &raw.queue_depth, 1024, 1)?;
        if queue_depth > 1 << 20 {
            return Err(invalid(
                "QUEUE_DEPTH",
                raw.queue_depth.as_deref().unwrap_or(""),
                "must be at most 1048576",
            ));
        }
        let shutdown_timeout = parse_secs(
            "SHUTDOWN_TIMEOUT",
            &raw.shutdown_timeout,
            Duration::from_secs(10),
        )?;
        let spin_us = parse_u64("SPIN_BEFORE_PARK_US", &raw.spin_before_park_us, 50, 0)?;
        let log_format = match raw.log_format.as_deref().map(str::trim) {
            None | Some("") | Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => return Err(invalid("LOG_FORMAT", other, "expected json or text")),
        };

        let metrics_addr = match raw
            .metrics_addr
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            None => None,
            Some(value) => {
                validate_host_port("METRICS_ADDR", value)?;
                Some(
                    value
                        .to_socket_addrs()
                        .map_err(|e| {
                            invalid("METRICS_ADDR", value, format!("cannot resolve: {e}"))
                        })?
                        .next()
                        .ok_or_else(|| invalid("METRICS_ADDR", value, "resolves to no address"))?,
                )
            }
        };

        let replication_factor = parse_u64("REPLICATION_FACTOR", &raw.replication_factor, 3, 1)?;
        if replication_factor > 64 {
            return Err(invalid(
                "REPLICATION_FACTOR",
                raw.replication_factor.as_deref().unwrap_or(""),
                "must be at most 64",
            ));
        }
        let majority = replication_factor / 2 + 1;
        let write_quorum = parse_u64("WRITE_QUORUM", &raw.write_quorum, majority, 1)?;
        if write_quorum > replication_factor {
            return Err(invalid(
                "WRITE_QUORUM",
                raw.write_quorum.as_deref().unwrap_or(""),
                format!("exceeds REPLICATION_FACTOR ({replication_factor})"),
            ));
        }
        let read_quorum = parse_u64("READ_QUORUM", &raw.read_quorum, majority, 1)?;
        if read_quorum > replication_factor {
            return Err(invalid(
                "READ_QUORUM",
                raw.read_quorum.as_deref().unwrap_or(""),
                format!("exceeds REPLICATION_FACTOR ({replication_factor})"),
            ));
        }
        let dead_node_timeout = parse_secs(
            "DEAD_NODE_TIMEOUT",
            &raw.dead_node_timeout,
            Duration::from_secs(300),
        )?;
        let tombstone_ttl_secs = parse_u64("TOMBSTONE_TTL", &raw.tombstone_ttl, 3600, 1)?;
        let vnodes = parse_u64(
            "VNODES",
            &raw.vnodes,
            crate::cluster::ring::DEFAULT_VNODES as u64,
            1,
        )?;
        if vnodes > 4096 {
            return Err(invalid(
                "VNODES",
                raw.vnodes.as_deref().unwrap_or(""),
                "must be at most 4096",
            ));
        }

        let hinted_handoff = parse_switch("HINTED_HANDOFF", &raw.hinted_handoff)?;
        let anti_entropy = parse_switch("ANTI_ENTROPY", &raw.anti_entropy)?;
        let max_hints = parse_u64("MAX_HINTS", &raw.max_hints, 100_000, 0)?;
        let max_hint_bytes = parse_u64("MAX_HINT_BYTES", &raw.max_hint_bytes, 64 << 20, 0)?;
        let hint_ttl = parse_secs("HINT_TTL", &raw.hint_ttl, Duration::from_secs(3 * 3600))?;
        let anti_entropy_interval = parse_secs(
            "ANTI_ENTROPY_INTERVAL",
            &raw.anti_entropy_interval,
            Duration::from_secs(30),
        )?;

        let speculative_retry = match raw.speculative_retry.as_deref().map(str::trim) {
            None | Some("") => Default::default(),
            Some(value) => value
                .parse()
                .map_err(|reason: String| invalid("SPECULATIVE_RETRY", value, reason))?,
        };

        let default_limits = crate::ingress::grpc::server::Limits::default();
        let u32_of = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let conn_reply_bytes = parse_u64(
            "HTTP2_CONN_REPLY_BUFFER",
            &raw.http2_conn_reply_buffer,
            (default_limits.conn_reply_bytes as u64).max(max_send + (64 << 10)),
            max_send + 5,
        )?;
        let default_protocol = default_limits.protocol;
        let http2 = crate::ingress::grpc::server::Limits {
            protocol: http2::server::Limits {
                handshake_timeout: parse_secs(
                    "HTTP2_HANDSHAKE_TIMEOUT",
                    &raw.http2_handshake_timeout,
                    default_protocol.handshake_timeout,
                )?,
                idle_timeout: parse_secs(
                    "HTTP2_IDLE_TIMEOUT",
                    &raw.http2_idle_timeout,
                    default_protocol.idle_timeout,
                )?,
                resets_per_sec: u32_of(parse_u64(
                    "HTTP2_MAX_RESETS_PER_SEC",
                    &raw.http2_max_resets_per_sec,
                    default_protocol.resets_per_sec as u64,
                    1,
                )?),
                control_frames_per_sec: u32_of(parse_u64(
                    "HTTP2_MAX_CONTROL_FRAMES_PER_SEC",
                    &raw.http2_max_control_frames_per_sec,
                    default_protocol.control_frames_per_sec as u64,
                    1,
                )?),
            },
            conn_reply_bytes: usize::try_from(conn_reply_bytes).unwrap_or(usize::MAX),
            core_reply_bytes: usize::try_from(parse_u64(
                "HTTP2_CORE_REPLY_BUFFER",
                &raw.http2_core_reply_buffer,
                (default_limits.core_reply_bytes as u64).max(conn_reply_bytes),
                conn_reply_bytes,
            )?)
            .unwrap_or(usize::MAX),
        };
        let max_connections = parse_u64(
            "MAX_CONNECTIONS",
            &raw.max_connections,
            default_max_connections(),
            1,
        )?;

        let shard_port = match raw.shard_port.as_deref().map(str::trim) {
            None | Some("") => Some(0),
            Some("off") => None,
            Some(value) => Some(value.parse::<u16>().map_err(|_| {
                invalid(
                    "SHARD_PORT",
                    value,
                    "expected a port number, 0 for any free port (the default), or off",
                )
            })?),
        };

        let (security, plaintext_addr) = security_settings(&raw, listen_addr)?;

        Ok(Config {
            security,
            plaintext_addr,
            shard_port,
            http2,
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
            speculative_retry,
            anti_entropy_interval: anti_entropy.then_some(anti_entropy_interval),
            hints: crate::cluster::hints::HintLimits {
                enabled: hinted_handoff,
                max_count: usize::try_from(max_hints).unwrap_or(usize::MAX),
                max_bytes: usize::try_from(max_hint_bytes).unwrap_or(usize::MAX),
                ttl: hint_ttl,
            },
            replication_factor: replication_factor as usize,
            write_quorum: write_quorum as usize,
            read_quorum: read_quorum as usize,
            dead_node_timeout,
            tombstone_ttl_secs,
            vnodes: vnodes as u32,
            metrics_addr,
            addr,
            listen_addr,
            peers,
            num_shards,
            memory,
            ttl_secs: (ttl > 0).then_some(ttl),
            max_recv_msg_bytes: max_recv as usize,
            max_send_msg_bytes: max_send as usize,
            rpc_timeout,
            rate_limit: NonZeroU32::new(rate_limit),
            rate_limit_burst: burst,
            cores,
            queue_depth: queue_depth as usize,
            shutdown_timeout,
            spin_before_park: (spin_us > 0).then(|| Duration::from_micros(spin_us)),
            log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_are_the_originals() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.addr, "localhost:8080");
        assert_eq!(c.listen_addr.port(), 8080);
        assert!(c.peers.is_empty());
        assert_eq!(c.num_shards, 1);
        assert_eq!(c.memory.max_entries, None);
        assert_eq!(c.memory.max_bytes, 1 << 30);
        assert_eq!(c.memory.policy, Policy::S3Fifo);
        assert_eq!(c.ttl_secs, Some(3600));
        assert_eq!(c.max_recv_msg_bytes, 4194304);
        assert_eq!(c.max_send_msg_bytes, 4194304);
        assert_eq!(c.rpc_timeout, Duration::from_secs(5));
        assert_eq!(c.rate_limit, None, "no limit unless asked for");
        assert_eq!(c.rate_limit_burst.get(), 100);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            (c.replication_factor, c.write_quorum, c.read_quorum),
            (3, 2, 2)
        );
        assert_eq!(
            c.speculative_retry,
            crate::cluster::snitch::SpeculativeRetry::Percentile(99.0)
        );
    }

    #[test]
    fn quorums_above_the_replication_factor_are_refused() {
        let e = parse(&[("REPLICATION_FACTOR", "3"), ("WRITE_QUORUM", "4")]).unwrap_err();
        assert_eq!(e.var, "WRITE_QUORUM");
        assert!(e.to_string().contains("exceeds REPLICATION_FACTOR"));
        let e = parse(&[("REPLICATION_FACTOR", "1"), ("READ_QUORUM", "2")]).unwrap_err();
        assert_eq!(e.var, "READ_QUORUM");
        let c = parse(&[("REPLICATION_FACTOR", "5")]).unwrap();
        assert_eq!((c.write_quorum, c.read_quorum), (3, 3));
    }

    #[test]
    fn values_are_read() {
        let c = parse(&[
            ("ADDR", "127.0.0.1:9000"),
            ("PEERS", "10.0.0.1:8080, node2:8080"),
            ("NUM_SHARDS", "64"),
            ("CAPACITY", "1000000"),
            ("MAX_MEMORY", "512mb"),
            ("EVICTION", "clock"),
            ("TTL", "0"),
            ("RPC_TIMEOUT", "0.5"),
            ("RATE_LIMIT", "10"),
            ("RATE_LIMIT_BURST", "20"),
            ("CORES", "1"),
            ("LOG_FORMAT", "text"),
            ("SPECULATIVE_RETRY", "20ms"),
        ])
        .unwrap();
        assert_eq!(
            c.speculative_retry,
            crate::cluster::snitch::SpeculativeRetry::Fixed(Duration::from_millis(20))
        );
        assert_eq!(c.listen_addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.peers, vec!["10.0.0.1:8080", "node2:8080"]);
        assert_eq!(c.num_shards, 64);
        assert_eq!(c.memory.max_entries, Some(1_000_000));
        assert_eq!(c.memory.max_bytes, 512 << 20);
        assert_eq!(c.memory.policy, Policy::Clock);
        assert_eq!(c.ttl_secs, None);
        assert_eq!(c.rpc_timeout, Duration::from_millis(500));
        assert_eq!(c.rate_limit.map(|r| r.get()), Some(10));
        assert_eq!(c.rate_limit_burst.get(), 20);
        assert_eq!(c.cores, Some(1));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(parse(&[("RATE_LIMIT", "0")]).unwrap().rate_limit, None);
    }

    #[test]
    fn sizes_read_as_redis_reads_maxmemory() {
        let bytes = |v: &str| parse(&[("MAX_MEMORY", v)]).map(|c| c.memory.max_bytes);
        assert_eq!(bytes("512mb"), Ok(512 << 20));
        assert_eq!(bytes("4GB"), Ok(4 << 30));
        assert_eq!(bytes("5g"), Ok(5_000_000_000));
        assert_eq!(bytes("100000000"), Ok(100_000_000));
        assert_eq!(bytes(" 64 mb "), Ok(64 << 20));
        // Below what the shards need empty: 1 shard here.
        let err = bytes("1mb").unwrap_err();
        assert!(err.to_string().contains("must be at least"), "{err}");
        let err = parse(&[("MAX_MEMORY", "64mb"), ("NUM_SHARDS", "1000")]).unwrap_err();
        assert_eq!(err.var, "MAX_MEMORY");
    }

    #[test]
    fn every_rejection_names_its_variable_and_value() {
        let cases: &[(&str, &str)] = &[
            ("NUM_SHARDS", "0"),
            ("NUM_SHARDS", "-1"),
            ("CAPACITY", "abc"),
            ("CAPACITY", "0"),
            ("MAX_MEMORY", "lots"),
            ("MAX_MEMORY", "1m"),
            ("MAX_MEMORY", "12xb"),
            ("MAX_MEMORY", "99999999999999gb"),
            ("EVICTION", "lru"),
            ("TTL", "-5"),
            ("ADDR", "localhost"),
            ("ADDR", "localhost:http"),
            ("ADDR", ":8080"),
            ("PEERS", "a:1,b"),
            ("MAX_RECV_MSG_SIZE", "0"),
            ("MAX_SEND_MSG_SIZE", "4MB"),
            ("RPC_TIMEOUT", "0"),
            ("RPC_TIMEOUT", "soon"),
            ("RATE_LIMIT", "lots"),
            ("RATE_LIMIT_BURST", "0"),
            ("CORES", "0"),
            ("QUEUE_DEPTH", "0"),
            ("LOG_FORMAT", "xml"),
            ("METRICS_ADDR", "9100"),
            ("LISTEN_ADDR", "0.0.0.0"),
            ("REPLICATION_FACTOR", "0"),
            ("DEAD_NODE_TIMEOUT", "never"),
            ("TOMBSTONE_TTL", "-1"),
            ("HINTED_HANDOFF", "maybe"),
            ("MAX_HINTS", "many"),
            ("MAX_HINT_BYTES", "-5"),
            ("HINT_TTL", "0"),
            ("ANTI_ENTROPY_INTERVAL", "often"),
            ("ANTI_ENTROPY", "sometimes"),
            ("SPECULATIVE_RETRY", "p100"),
            ("HTTP2_HANDSHAKE_TIMEOUT", "0"),
            ("HTTP2_IDLE_TIMEOUT", "never"),
            ("HTTP2_MAX_RESETS_PER_SEC", "0"),
            ("HTTP2_MAX_CONTROL_FRAMES_PER_SEC", "many"),
            ("HTTP2_CONN_REPLY_BUFFER", "1000"),
            ("HTTP2_CORE_REPLY_BUFFER", "1000"),
            ("MAX_CONNECTIONS", "0"),
            ("SHARD_PORT", "70000"),
            ("SHARD_PORT", "on"),
            ("SPECULATIVE_RETRY", "soon"),
        ];
        for (var, value) in cases {
            let err = parse(&[(var, value)]).expect_err(&format!("{var}={value} accepted"));
            assert_eq!(err.var, *var);
            let line = err.to_string();
            assert!(line.contains(var) && line.contains(value), "{line}");
            assert!(!line.contains('\n'));
        }
    }
}
