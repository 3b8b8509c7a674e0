//! NodeService, served on the control plane: Stats (every core's figures), Layout (how to
//! reach this node's cores) and Members (the member table and ring shares).

use super::metrics_http::Gatherer;
use crate::{
    cluster::membership::{MemberState, SharedView},
    pb,
};
use tonic::Status;

pub struct NodeStats {
    pub gatherer: Gatherer,
    pub view: SharedView,
    pub replication_factor: usize,
    pub write_quorum: usize,
    pub read_quorum: usize,
    pub layout: pb::LayoutReply,
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
        }))
    }

    async fn layout(
        &self,
        _: tonic::Request<pb::LayoutRequest>,
    ) -> Result<tonic::Response<pb::LayoutReply>, Status> {
        Ok(tonic::Response::new(self.layout))
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
