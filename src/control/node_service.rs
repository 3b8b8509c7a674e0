//! NodeService, served on the control plane: Stats (every core's figures), Layout (how to
//! reach this node's cores), Members (the member table and ring shares) and Topology (where
//! keys live, for clients that place keys themselves; also as a stream of changes).

use super::metrics_http::Gatherer;
use crate::{
    cluster::{
        membership::{Health, MemberState, SharedView},
        ring::Ring,
    },
    pb,
};
use futures_util::Stream;
use std::{pin::Pin, sync::Arc};
use tokio::sync::watch;
use tonic::Status;

/// The ring and the health verdicts, as the control plane publishes them to the cores.
#[derive(Clone)]
pub struct TopologyViews {
    pub ring: watch::Receiver<Arc<Ring>>,
    pub health: watch::Receiver<Arc<Health>>,
}

impl TopologyViews {
    /// The topology as it stands.
    fn reply(&self) -> pb::TopologyReply {
        let ring = Arc::clone(&self.ring.borrow());
        let health = Arc::clone(&self.health.borrow());
        topology(&ring, &health)
    }
}

/// `ring` and `health` as a client needs them; the version hashes what a client routes by.
pub fn topology(ring: &Ring, health: &Health) -> pb::TopologyReply {
    let nodes: Vec<pb::TopologyNode> = ring
        .nodes()
        .iter()
        .map(|addr| pb::TopologyNode {
            addr: addr.clone(),
            down: health.get(addr) == Some(&MemberState::Down),
        })
        .collect();
    let (positions, owners): (Vec<u64>, Vec<u32>) = ring.points().iter().copied().unzip();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(ring.replication_factor() as u64).to_le_bytes());
    for n in &nodes {
        h.update(n.addr.as_bytes());
        h.update(&[0, n.down as u8]);
    }
    pb::TopologyReply {
        version: h.digest(),
        replication_factor: ring.replication_factor() as u32,
        nodes,
        positions,
        owners,
    }
}

pub struct NodeStats {
    pub gatherer: Gatherer,
    pub view: SharedView,
    pub replication_factor: usize,
    pub write_quorum: usize,
    pub read_quorum: usize,
    pub layout: pb::LayoutReply,
    pub topology: TopologyViews,
}

#[tonic::async_trait]
impl pb::node_service_server::NodeService for NodeStats {
    async fn stats(
        &self,
        _: tonic::Request<pb::StatsRequest>,
    ) -> Result<tonic::Response<pb::StatsResponse>, Status> {
        let snap = self.gatherer.gather().await;
        let cores = snap
            .cores
            .iter()
            .map(|c| {
                let (sum, count) = c
                    .latency
                    .iter()
                    .fold((0.0, 0u64), |(s, n), (_, h)| (s + h.sum_secs, n + h.count));
                pb::CoreStats {
                    core: c.core as u32,
                    requests: c
                        .requests
                        .iter()
                        .map(|(command, code, count)| pb::RequestCount {
                            command: command.to_string(),
                            code: code.to_string(),
                            count: *count,
                        })
                        .collect(),
                    hits: c.hits,
                    misses: c.misses,
                    rate_limited: c.rate_limited,
                    shed: c.shed,
                    entries: c.engine.entries,
                    entry_bytes: c.engine.bytes,
                    evictions: c.engine.evictions,
                    expirations: c.engine.expirations,
                    queue_depth: c.in_flight,
                    replica_hops: c.replica_hops,
                    client_hops: c.client_hops,
                    memory_used_bytes: c.engine.used_bytes,
                    memory_share_bytes: c.engine.limit_bytes,
                    mean_latency_us: if count > 0 {
                        sum / count as f64 * 1e6
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        Ok(tonic::Response::new(pb::StatsResponse {
            cores,
            rss_bytes: snap.rss_bytes,
            uptime_seconds: snap.uptime_secs,
            memory_budget_bytes: snap.memory_budget_bytes,
            capacity: snap.capacity,
        }))
    }

    async fn layout(
        &self,
        _: tonic::Request<pb::LayoutRequest>,
    ) -> Result<tonic::Response<pb::LayoutReply>, Status> {
        Ok(tonic::Response::new(self.layout))
    }

    async fn topology(
        &self,
        _: tonic::Request<pb::TopologyRequest>,
    ) -> Result<tonic::Response<pb::TopologyReply>, Status> {
        Ok(tonic::Response::new(self.topology.reply()))
    }

    type WatchTopologyStream =
        Pin<Box<dyn Stream<Item = Result<pb::TopologyReply, Status>> + Send + 'static>>;

    /// The topology at once, then each time its version changes; nothing while it does not
    /// (a client at rest costs no requests).
    async fn watch_topology(
        &self,
        _: tonic::Request<pb::TopologyRequest>,
    ) -> Result<tonic::Response<Self::WatchTopologyStream>, Status> {
        let mut views = self.topology.clone();
        views.ring.mark_changed();
        let stream = futures_util::stream::unfold((views, None), |(mut views, sent)| async move {
            loop {
                let changed = tokio::select! {
                    r = views.ring.changed() => r,
                    r = views.health.changed() => r,
                };
                // The node is stopping: the stream ends and the client asks another node.
                changed.ok()?;
                let reply = views.reply();
                if sent != Some(reply.version) {
                    let version = reply.version;
                    return Some((Ok(reply), (views, Some(version))));
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn members(
        &self,
        _: tonic::Request<pb::MembersRequest>,
    ) -> Result<tonic::Response<pb::MembersResponse>, Status> {
        let v = self
            .view
            .lock()
            .map_err(|_| Status::internal("membership view unavailable"))?;
        let now = std::time::Instant::now();
        let shares: std::collections::HashMap<String, (f64, f64)> = v
            .ring
            .shares()
            .into_iter()
            .map(|(n, p, r)| (n, (p, r)))
            .collect();
        let me = v.table.me().to_string();
        let mut members = vec![pb::Member {
            addr: me.clone(),
            state: MemberState::Alive.as_str().into(),
            primary_share: shares.get(&me).map(|s| s.0).unwrap_or(0.0),
            replica_share: shares.get(&me).map(|s| s.1).unwrap_or(0.0),
            is_self: true,
            in_ring: true,
        }];
        for (addr, info) in v.table.members() {
            members.push(pb::Member {
                addr: addr.clone(),
                state: if info.left {
                    "LEFT".into()
                } else {
                    info.state.as_str().into()
                },
                primary_share: shares.get(addr).map(|s| s.0).unwrap_or(0.0),
                replica_share: shares.get(addr).map(|s| s.1).unwrap_or(0.0),
                is_self: false,
                in_ring: v.table.in_ring(addr, now),
            });
        }
        members.sort_by(|a, b| a.addr.cmp(&b.addr));
        Ok(tonic::Response::new(pb::MembersResponse {
            members,
            replication_factor: self.replication_factor.min(v.ring.nodes().len()) as u32,
            write_quorum: self.write_quorum as u32,
            read_quorum: self.read_quorum as u32,
        }))
    }
}
