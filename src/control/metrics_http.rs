//! The node's figures: gathered from every core by message plus what the control plane holds
//! itself (members, data movement), for the Prometheus endpoint served here and for
//! NodeService.Stats. Runs on the control plane; the cores only take their own snapshots.

use super::cores::Cores;
use crate::security::secret::GossipRefusal;
use crate::{
    cluster::{antientropy, membership::SharedView},
    observability::metrics::{self, NodeSnapshot},
};
use http::{Request, Response};
use hyper::body::Incoming;
use std::{convert::Infallible, sync::Arc, time::Instant};

#[derive(Clone)]
pub struct Gatherer {
    pub cores: Cores,
    pub started: Instant,
    pub view: SharedView,
    pub data_movement: Arc<antientropy::Counters>,
    pub memory: crate::engine::budget::Memory,
    /// Gossip datagrams dropped, by `GossipRefusal::ALL`'s order.
    pub gossip_refused: Arc<[std::sync::atomic::AtomicU64; 3]>,
}

impl Gatherer {
    pub async fn gather(&self) -> NodeSnapshot {
        let cores = self.cores.snapshots().await;
        let mut members = vec![("ALIVE", 1u64), ("SUSPECT", 0), ("DOWN", 0), ("LEFT", 0)];
        if let Ok(v) = self.view.lock() {
            for (_, m) in v.table.members() {
                let state = if m.left { "LEFT" } else { m.state.as_str() };
                if let Some(slot) = members.iter_mut().find(|(s, _)| *s == state) {
                    slot.1 += 1;
                }
            }
        }
        NodeSnapshot {
            data_movement: self.data_movement.snapshot(),
            members,
            cores,
            rss_bytes: metrics::process_rss_bytes(),
            memory_budget_bytes: self.memory.max_bytes,
            capacity: self.memory.max_entries.unwrap_or(0),
            gossip_refused: GossipRefusal::ALL
                .iter()
                .zip(self.gossip_refused.iter())
                .map(|(r, n)| (r.name(), n.load(std::sync::atomic::Ordering::Relaxed)))
                .collect(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
        }
    }
}

/// Serves `/metrics` until the runtime stops. The listener is bound before the cores start, so
/// a bad METRICS_ADDR is a start-up error.
pub async fn serve_metrics(listener: tokio::net::TcpListener, gatherer: Gatherer) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let gatherer = gatherer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let gatherer = gatherer.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        let text = metrics::render(gatherer.gather().await);
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(http_body_util::Full::new(bytes::Bytes::from(text)))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                b"try /metrics\n",
                            )))
                    };
                    Ok::<_, Infallible>(resp.expect("static response parts are valid"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
