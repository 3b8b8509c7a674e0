//! Metrics: each core counts into its own plain counters (no atomics, no locks: the core is
//! the only writer), and a scrape gathers a [`CoreSnapshot`] from every core by message and
//! renders them with prometheus-client on the control plane. Counting runs on every core's
//! executor; gathering and rendering run on the control plane.

use crate::engine::shard::ShardStats;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use std::cell::Cell;
use tonic::Code;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Get = 0,
    Set = 1,
    Delete = 2,
}

pub const CMDS: [(Cmd, &str); 3] = [
    (Cmd::Get, "get"),
    (Cmd::Set, "set"),
    (Cmd::Delete, "delete"),
];

/// Upper bounds of the latency buckets, seconds.
pub const LATENCY_BUCKETS_SECS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

const NR_CODES: usize = 17;

/// A latency histogram owned by one core.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    /// Non-cumulative counts per bucket, the last one being +Inf.
    pub buckets: [u64; LATENCY_BUCKETS_SECS.len() + 1],
    pub sum_secs: f64,
    pub count: u64,
}

impl LatencyHistogram {
    fn observe(&mut self, secs: f64) {
        let i = LATENCY_BUCKETS_SECS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS_SECS.len());
        self.buckets[i] += 1;
        self.sum_secs += secs;
        self.count += 1;
    }
}

/// One core's request counters. Lives in the core's context; only that core touches it.
#[derive(Default)]
pub struct CoreMetrics {
    requests: [[Cell<u64>; NR_CODES]; 3],
    latency: [std::cell::RefCell<LatencyHistogram>; 3],
    hits: Cell<u64>,
    misses: Cell<u64>,
    rate_limited: Cell<u64>,
    shed: Cell<u64>,
    replica_hops: Cell<u64>,
    client_hops: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

impl CoreMetrics {
    pub fn record(&self, cmd: Cmd, code: Code, secs: f64) {
        let code = (code as usize).min(NR_CODES - 1);
        bump(&self.requests[cmd as usize][code]);
        self.latency[cmd as usize].borrow_mut().observe(secs);
    }

    pub fn hit(&self) {
        bump(&self.hits);
    }

    pub fn miss(&self) {
        bump(&self.misses);
    }

    pub fn rate_limited(&self) {
        bump(&self.rate_limited);
    }

    /// A replica request that arrived on a core not owning its key.
    pub fn replica_hop(&self) {
        bump(&self.replica_hops);
    }

    /// A client request (Get, Set, Delete) that arrived on a core not owning its key.
    pub fn client_hop(&self) {
        bump(&self.client_hops);
    }

    pub fn shed(&self) {
        bump(&self.shed);
    }

    pub fn snapshot(
        &self,
        core: usize,
        in_flight: u64,
        engine: ShardStats,
        panics: u64,
    ) -> CoreSnapshot {
        let mut requests = Vec::new();
        for (cmd, name) in CMDS {
            for code in 0..NR_CODES {
                let n = self.requests[cmd as usize][code].get();
                if n > 0 {
                    requests.push((name, code_name(code as i32), n));
                }
            }
        }
        CoreSnapshot {
            core,
            requests,
            latency: CMDS
                .map(|(cmd, name)| (name, self.latency[cmd as usize].borrow().clone()))
                .to_vec(),
            hits: self.hits.get(),
            misses: self.misses.get(),
            rate_limited: self.rate_limited.get(),
            shed: self.shed.get(),
            replica_hops: self.replica_hops.get(),
            client_hops: self.client_hops.get(),
            in_flight,
            engine,
            panics,
            replica_calls: Vec::new(),
            peer_bytes: (0, 0),
            replica_batches: 0,
            read_repairs: 0,
            speculative_retries: 0,
            write_backs: 0,
            skipped_down: 0,
            peer_scores: Vec::new(),
            http2_events: Vec::new(),
            connections_shed: 0,
            tls_handshakes: 0,
            tls_handshake_failures: Vec::new(),
            refused: Vec::new(),
            reply_bytes: 0,
            hints: Default::default(),
        }
    }
}

/// The gRPC code's canonical name (OK, NOT_FOUND, ...), as grpc-go and Prometheus users know them.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        _ => "UNAUTHENTICATED",
    }
}

/// What one core reports when asked.
#[derive(Debug, Clone, Default)]
pub struct CoreSnapshot {
    pub core: usize,
    /// (command, code, count), non-zero only.
    pub requests: Vec<(&'static str, &'static str, u64)>,
    pub latency: Vec<(&'static str, LatencyHistogram)>,
    pub hits: u64,
    pub misses: u64,
    pub rate_limited: u64,
    pub shed: u64,
    /// Replica requests that arrived here for a key another core owns (one hop each).
    pub replica_hops: u64,
    /// Client requests that arrived here for a key another core owns (one hop each).
    pub client_hops: u64,
    /// Calls this core has outstanding towards other cores.
    pub in_flight: u64,
    /// Totals of the shards this core owns.
    pub engine: ShardStats,
    pub panics: u64,
    /// (peer, outcome, count) of replica calls this core made.
    pub replica_calls: Vec<(String, &'static str, u64)>,
    /// Bytes this core's connections to peers (replica calls) sent and received.
    pub peer_bytes: (u64, u64),
    /// Batch calls of replica requests this core sent.
    pub replica_batches: u64,
    pub read_repairs: u64,
    /// Reads that asked one more replica after one was slower than its speculative delay.
    pub speculative_retries: u64,
    /// LINEARIZABLE reads that wrote their answer back to a quorum before answering.
    pub write_backs: u64,
    /// Replicas left out of requests because the failure detector held them DOWN.
    pub skipped_down: u64,
    /// (peer, latency score in seconds, speculative delay in seconds) as this core sees them.
    pub peer_scores: Vec<(String, f64, Option<f64>)>,
    /// (event, count) of the HTTP/2 bounds (ingress::grpc::server::Event).
    pub http2_events: Vec<(&'static str, u64)>,
    /// Connections turned away over MAX_CONNECTIONS.
    pub connections_shed: u64,
    /// TLS handshakes completed, and (reason, count) of those that failed.
    pub tls_handshakes: u64,
    pub tls_handshake_failures: Vec<(&'static str, u64)>,
    /// (reason, count) of requests refused for their credentials (security::Refusal).
    pub refused: Vec<(&'static str, u64)>,
    /// Reply bytes held for clients that have not read them.
    pub reply_bytes: u64,
    pub hints: crate::cluster::hints::HintCounts,
}

/// Everything a scrape renders: the cores' snapshots plus process figures.
#[derive(Debug, Default)]
pub struct NodeSnapshot {
    pub cores: Vec<CoreSnapshot>,
    /// Anti-entropy and data movement, node-wide (they run on the control plane).
    pub data_movement: crate::cluster::antientropy::Counts,
    /// (state, number of members in it), this node included.
    pub members: Vec<(&'static str, u64)>,
    pub rss_bytes: u64,
    pub uptime_secs: f64,
    /// MAX_MEMORY, and CAPACITY (0: none).
    pub memory_budget_bytes: u64,
    pub capacity: u64,
    /// (reason, count) of gossip datagrams dropped (security::secret::GossipRefusal).
    pub gossip_refused: Vec<(&'static str, u64)>,
}

/// Resident set size of this process, from /proc.
pub fn process_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

type Labels = Vec<(&'static str, String)>;

fn core_label(core: usize) -> Labels {
    vec![("core", core.to_string())]
}

#[derive(Debug)]
struct SnapshotCollector(NodeSnapshot);

fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A gauge family of whole numbers (i64) or of seconds (f64).
fn gauge_family<N: prometheus_client::encoding::EncodeGaugeValue + Copy + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, N)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cores = &self.0.cores;
        let per_core = |f: &dyn Fn(&CoreSnapshot) -> u64| -> Vec<(Labels, u64)> {
            cores.iter().map(|c| (core_label(c.core), f(c))).collect()
        };
        let requests: Vec<(Labels, u64)> = cores
            .iter()
            .flat_map(|c| {
                c.requests.iter().map(move |(cmd, code, n)| {
                    (
                        vec![
                            ("core", c.core.to_string()),
                            ("command", cmd.to_string()),
                            ("code", code.to_string()),
                        ],
                        *n,
                    )
                })
            })
            .collect();
        counter_family(
            &mut encoder,
            "cache_requests",
            "Client requests answered, by core, command and gRPC status.",
            &requests,
        )?;

        {
            let mut m = encoder.encode_descriptor(
                "cache_request_duration_seconds",
                "Time from a request's arrival at ingress to its answer, by core and command.",
                None,
                MetricType::Histogram,
            )?;
            for c in cores {
                for (cmd, h) in &c.latency {
                    let labels: Labels =
                        vec![("core", c.core.to_string()), ("command", cmd.to_string())];
                    // The encoder accumulates the per-bucket counts itself.
                    let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_SECS
                        .iter()
                        .copied()
                        .chain([f64::INFINITY])
                        .zip(h.buckets.iter().copied())
                        .collect();
                    m.encode_family(&labels)?
                        .encode_histogram::<NoLabelSet>(h.sum_secs, h.count, &buckets, None)?;
                }
            }
        }
        counter_family(
            &mut encoder,
            "cache_get_hits",
            "Gets that found a live entry.",
            &per_core(&|c| c.hits),
        )?;
        counter_family(
            &mut encoder,
            "cache_get_misses",
            "Gets that found no live entry.",
            &per_core(&|c| c.misses),
        )?;
        counter_family(
            &mut encoder,
            "cache_rate_limited_requests",
            "Requests refused by RATE_LIMIT.",
            &per_core(&|c| c.rate_limited),
        )?;
        counter_family(
            &mut encoder,
            "cache_replica_hops",
            "Replica requests from peers that arrived on a core not owning their key and took one hop to it (a peer without this node's layout, or a connection to ADDR).",
            &per_core(&|c| c.replica_hops),
        )?;
        counter_family(
            &mut encoder,
            "cache_client_hops",
            "Client requests (Get, Set, Delete) that arrived on a core not owning their key and took one hop to it (a client that does not place keys by core).",
            &per_core(&|c| c.client_hops),
        )?;
        counter_family(
            &mut encoder,
            "cache_shed_requests",
            "Requests refused because the owning core's queue was full.",
            &per_core(&|c| c.shed),
        )?;
        counter_family(
            &mut encoder,
            "cache_evictions",
            "Entries evicted (EVICTION: S3-FIFO or CLOCK) to stay within MAX_MEMORY and CAPACITY, by owning core.",
            &per_core(&|c| c.engine.evictions),
        )?;
        counter_family(
            &mut encoder,
            "cache_expirations",
            "Entries expired by TTL, by owning core.",
            &per_core(&|c| c.engine.expirations),
        )?;
        counter_family(
            &mut encoder,
            "cache_panics",
            "Requests that panicked on their core.",
            &per_core(&|c| c.panics),
        )?;
        let gauge = |f: &dyn Fn(&CoreSnapshot) -> u64| -> Vec<(Labels, i64)> {
            cores
                .iter()
                .map(|c| (core_label(c.core), f(c) as i64))
                .collect()
        };
        gauge_family(
            &mut encoder,
            "cache_entries",
            "Entries held, by owning core.",
            &gauge(&|c| c.engine.entries),
        )?;
        gauge_family(
            &mut encoder,
            "cache_entry_bytes",
            "Bytes of entries held (header, key, value), by owning core.",
            &gauge(&|c| c.engine.bytes),
        )?;
        gauge_family(
            &mut encoder,
            "cache_memory_used_bytes",
            "Memory the core's shards hold as MAX_MEMORY counts it (entries as allocated, index, queues), by owning core.",
            &gauge(&|c| c.engine.used_bytes),
        )?;
        gauge_family(
            &mut encoder,
            "cache_memory_share_bytes",
            "The core's current share of MAX_MEMORY, moved between cores as they need it.",
            &gauge(&|c| c.engine.limit_bytes),
        )?;
        gauge_family(
            &mut encoder,
            "cache_queue_depth",
            "Requests this core has outstanding towards other cores.",
            &gauge(&|c| c.in_flight),
        )?;
        let replica_calls: Vec<(Labels, u64)> = cores
            .iter()
            .flat_map(|c| {
                c.replica_calls.iter().map(move |(peer, outcome, n)| {
                    (
                        vec![
                            ("core", c.core.to_string()),
                            ("peer", peer.clone()),
                            ("outcome", outcome.to_string()),
                        ],
                        *n,
                    )
                })
            })
            .collect();
        counter_family(
            &mut encoder,
            "cache_replica_calls",
            "Calls to other nodes' replicas, by core, peer and outcome (ok, error, timeout).",
            &replica_calls,
        )?;
        let peer_bytes: Vec<(Labels, u64)> = cores
            .iter()
            .flat_map(|c| {
                [("sent", c.peer_bytes.0), ("received", c.peer_bytes.1)].map(|(way, n)| {
                    (
                        vec![("core", c.core.to_string()), ("direction", way.to_string())],
                        n,
                    )
                })
            })
            .collect();
        counter_family(
            &mut encoder,
            "cache_peer_bytes",
            "Bytes on the wire of this core's connections to other nodes (replica calls), HTTP/2 framing included.",
            &peer_bytes,
        )?;
        counter_family(
            &mut encoder,
            "cache_replica_batches",
            "Batch calls carrying this core's replica requests (cache_replica_calls) to other nodes, by core.",
            &per_core(&|c| c.replica_batches),
        )?;
        counter_family(
            &mut encoder,
            "cache_read_repairs",
            "Replicas brought up to date by reads, by coordinating core.",
            &per_core(&|c| c.read_repairs),
        )?;
        let http2_events: Vec<(Labels, u64)> = cores
            .iter()
            .flat_map(|c| {
                c.http2_events.iter().map(move |(event, n)| {
                    (
                        vec![("core", c.core.to_string()), ("event", event.to_string())],
                        *n,
                    )
                })
            })
            .collect();
        counter_family(
            &mut encoder,
            "cache_http2_events",
            "HTTP/2 bounds enforced, by core and event: GOAWAY ENHANCE_YOUR_CALM for a reset or \
             control-frame flood, replies refused (RESOURCE_EXHAUSTED) for a client that does \
             not read, streams refused, handshake and idle timeouts, protocol errors.",
            &http2_events,
        )?;
        counter_family(
            &mut encoder,
            "cache_connections_shed",
            "Connections turned away with GOAWAY because the core had its share of \
             MAX_CONNECTIONS.",
            &per_core(&|c| c.connections_shed),
        )?;
        counter_family(
            &mut encoder,
            "cache_tls_handshakes",
            "TLS handshakes completed, by core.",
            &per_core(&|c| c.tls_handshakes),
        )?;
        let by_reason = |pick: &dyn Fn(&CoreSnapshot) -> &Vec<(&'static str, u64)>| {
            cores
                .iter()
                .flat_map(|c| {
                    pick(c).iter().map(move |(reason, n)| {
                        (
                            vec![("core", c.core.to_string()), ("reason", reason.to_string())],
                            *n,
                        )
                    })
                })
                .collect::<Vec<(Labels, u64)>>()
        };
        counter_family(
            &mut encoder,
            "cache_tls_handshake_failures",
            "TLS handshakes that failed, by core and reason: timeout, not_tls (plaintext to a \
             TLS port), certificate (refused by either side), other.",
            &by_reason(&|c| &c.tls_handshake_failures),
        )?;
        counter_family(
            &mut encoder,
            "cache_requests_refused",
            "Requests refused for their credentials, by core and reason: unauthenticated (no or \
             unknown token), permission_denied (a read-only token writing), not_member (a \
             PeerService call without the cluster's credential).",
            &by_reason(&|c| &c.refused),
        )?;
        let gossip_refused: Vec<(Labels, u64)> = self
            .0
            .gossip_refused
            .iter()
            .map(|(reason, n)| (vec![("reason", reason.to_string())], *n))
            .collect();
        counter_family(
            &mut encoder,
            "cache_gossip_refused",
            "Gossip datagrams dropped under CLUSTER_SECRET, by reason: bad_tag (unsigned, \
             forged or changed), stale (outside the replay window), replayed.",
            &gossip_refused,
        )?;
        gauge_family(
            &mut encoder,
            "cache_http2_reply_bytes",
            "Reply bytes held for clients that have not read them yet, by core.",
            &gauge(&|c| c.reply_bytes),
        )?;
        counter_family(
            &mut encoder,
            "cache_speculative_retries",
            "Reads that asked one more replica because one was slower than SPECULATIVE_RETRY, \
             by coordinating core.",
            &per_core(&|c| c.speculative_retries),
        )?;
        counter_family(
            &mut encoder,
            "cache_linearizable_write_backs",
            "LINEARIZABLE reads that wrote the value they return back to a quorum first (the \
             replicas they heard from disagreed), by coordinating core.",
            &per_core(&|c| c.write_backs),
        )?;
        counter_family(
            &mut encoder,
            "cache_replicas_skipped_down",
            "Replicas left out of a request (writes hinted instead) because the failure \
             detector held them DOWN, by coordinating core.",
            &per_core(&|c| c.skipped_down),
        )?;
        let peer_rows = |f: &dyn Fn(f64, Option<f64>) -> Option<f64>| -> Vec<(Labels, f64)> {
            cores
                .iter()
                .flat_map(|c| {
                    c.peer_scores
                        .iter()
                        .filter_map(move |(peer, score, delay)| {
                            let v = f(*score, *delay)?;
                            Some((
                                vec![("core", c.core.to_string()), ("peer", peer.clone())],
                                v,
                            ))
                        })
                })
                .collect()
        };
        gauge_family(
            &mut encoder,
            "cache_peer_latency_score_seconds",
            "How a core ranks a peer for reads (lower is asked first): its recent latency, or \
             how long it has been silent with calls outstanding if longer, plus recent failures.",
            &peer_rows(&|score, _| Some(score)),
        )?;
        gauge_family(
            &mut encoder,
            "cache_peer_speculative_delay_seconds",
            "How long a read waiting for this peer waits before asking another replica.",
            &peer_rows(&|_, delay| delay),
        )?;
        let hints: Vec<(Labels, u64)> = cores
            .iter()
            .flat_map(|c| {
                let h = c.hints;
                [
                    ("stored", h.stored),
                    ("delivered", h.delivered),
                    ("dropped", h.dropped),
                    ("expired", h.expired),
                ]
                .into_iter()
                .map(move |(event, n)| {
                    (
                        vec![("core", c.core.to_string()), ("event", event.to_string())],
                        n,
                    )
                })
            })
            .collect();
        counter_family(
            &mut encoder,
            "cache_hints",
            "Hinted handoff, by coordinating core: hints stored, delivered, dropped (limits \
             or replica gone) and expired.",
            &hints,
        )?;
        gauge_family(
            &mut encoder,
            "cache_hints_queued",
            "Hints held for replicas that have not answered yet, by core.",
            &gauge(&|c| c.hints.queued),
        )?;
        let dm = self.0.data_movement;
        for (name, help, value) in [
            (
                "cache_anti_entropy_rounds",
                "Anti-entropy rounds run (every interval and after each ring change).",
                dm.rounds,
            ),
            (
                "cache_anti_entropy_buckets_compared",
                "Ring buckets compared with a peer's (the ranges of the digest tree).",
                dm.buckets_compared,
            ),
            (
                "cache_anti_entropy_bytes",
                "Bytes of anti-entropy messages sent and received (digests, key lists, entries).",
                dm.bytes,
            ),
            (
                "cache_rebalance_entries_handed_off",
                "Entries pushed to their new replicas from buckets this node no longer replicates.",
                dm.handed_off,
            ),
            (
                "cache_rebalance_entries_dropped",
                "Entries dropped from buckets this node no longer replicates, once handed off.",
                dm.dropped,
            ),
        ] {
            counter_family(&mut encoder, name, help, &[(Vec::new(), value)])?;
        }
        gauge_family(
            &mut encoder,
            "cache_syncing_buckets",
            "Ring buckets this node replicates but has not compared with a peer since it \
             started or became their replica: its answers about their keys do not count \
             toward a quorum yet.",
            &[(Vec::new(), dm.syncing as i64)],
        )?;
        counter_family(
            &mut encoder,
            "cache_anti_entropy_entries",
            "Entries repaired or streamed by anti-entropy, pulled from peers or pushed to them.",
            &[
                (vec![("direction", "pulled".to_string())], dm.pulled),
                (vec![("direction", "pushed".to_string())], dm.pushed),
            ],
        )?;
        let members: Vec<(Labels, i64)> = self
            .0
            .members
            .iter()
            .map(|(state, n)| (vec![("state", state.to_string())], *n as i64))
            .collect();
        gauge_family(
            &mut encoder,
            "cache_members",
            "Cluster members known to this node, by state.",
            &members,
        )?;
        gauge_family(
            &mut encoder,
            "cache_memory_budget_bytes",
            "MAX_MEMORY: what the node's cores may hold in all.",
            &[(Vec::new(), self.0.memory_budget_bytes as i64)],
        )?;
        gauge_family(
            &mut encoder,
            "cache_capacity_entries",
            "CAPACITY: the most entries the node holds (0: no cap).",
            &[(Vec::new(), self.0.capacity as i64)],
        )?;
        gauge_family(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident set size.",
            &[(Vec::new(), self.0.rss_bytes as i64)],
        )?;
        let mut m = encoder.encode_descriptor(
            "process_uptime_seconds",
            "Seconds since the node started.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.0.uptime_secs)
            .encode(m.encode_family(&Vec::<(&str, String)>::new())?)?;
        Ok(())
    }
}

/// The Prometheus text exposition of a node snapshot.
pub fn render(snapshot: NodeSnapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_with_core_labels() {
        let m = CoreMetrics::default();
        m.record(Cmd::Set, Code::Ok, 0.0001);
        m.record(Cmd::Set, Code::Ok, 0.002);
        m.record(Cmd::Get, Code::NotFound, 0.00002);
        m.miss();
        let snap = m.snapshot(
            1,
            3,
            ShardStats {
                entries: 5,
                bytes: 700,
                evictions: 2,
                expirations: 1,
                used_bytes: 4096,
                limit_bytes: 1 << 20,
                ..Default::default()
            },
            0,
        );
        let text = render(NodeSnapshot {
            data_movement: crate::cluster::antientropy::Counts {
                rounds: 4,
                pulled: 7,
                ..Default::default()
            },
            members: vec![("ALIVE", 3)],
            cores: vec![snap],
            rss_bytes: 1 << 20,
            uptime_secs: 1.5,
            memory_budget_bytes: 1 << 30,
            capacity: 0,
            gossip_refused: vec![("bad_tag", 2)],
        });
        assert!(
            text.contains("\ncache_memory_budget_bytes 1073741824\n")
                && text.contains(r#"cache_memory_used_bytes{core="1"} 4096"#)
                && text.contains(r#"cache_memory_share_bytes{core="1"} 1048576"#)
                && text.contains(r#"cache_gossip_refused_total{reason="bad_tag"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cache_requests_total{core="1",command="set",code="OK"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("\ncache_anti_entropy_rounds_total 4\n"),
            "{text}"
        );
        assert!(
            text.contains(r#"cache_anti_entropy_entries_total{direction="pulled"} 7"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cache_requests_total{core="1",command="get",code="NOT_FOUND"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"cache_request_duration_seconds_bucket{core="1",command="set",le="0.0001"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"cache_request_duration_seconds_count{core="1",command="set"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"cache_entries{core="1"} 5"#), "{text}");
        assert!(text.contains(r#"cache_queue_depth{core="1"} 3"#), "{text}");
        assert!(
            text.contains("process_resident_memory_bytes 1048576"),
            "{text}"
        );
    }
}
