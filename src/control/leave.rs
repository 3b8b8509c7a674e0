//! Leaving the cluster gracefully: tell the other members (so they drop this node from their
//! rings at once, without waiting for the failure detector), then push everything this node
//! holds to the nodes taking over its buckets. Both go out on the cores' peer clients. Called
//! from the node's main thread at shutdown; the work runs on the control plane's runtime,
//! bounded in time.

use super::{peers::CorePeers, ControlPlane};
use crate::{
    cluster::{membership::MemberState, membership::MembershipCmd, ring::Ring},
    pb,
};
use std::{sync::Arc, time::Duration, time::Instant};
use tokio::sync::oneshot;

/// Tells every other member this node is leaving, best effort, at most `timeout`.
async fn announce_leave(
    peers: Arc<CorePeers>,
    me: String,
    members: Vec<String>,
    timeout: Duration,
) {
    let calls = members.iter().map(|member| {
        let notice = pb::LeaveNotice { addr: me.clone() };
        let peers = Arc::clone(&peers);
        async move {
            let _: Result<pb::LeaveAck, _> = peers
                .call(member, "/pb.PeerService/Leave", notice, timeout)
                .await;
        }
    });
    futures_util::future::join_all(calls).await;
}

impl ControlPlane {
    /// Leaves the cluster gracefully: tells the other members and gossip, waiting at most
    /// `timeout`.
    pub fn leave(&self, timeout: Duration) {
        let peers: Vec<String> = match self.view.lock() {
            Ok(v) => v
                .table
                .members()
                .filter(|(_, m)| !m.left && m.state != MemberState::Down)
                .map(|(a, _)| a.clone())
                .collect(),
            Err(_) => Vec::new(),
        };
        if peers.is_empty() {
            return;
        }
        let (done_tx, done_rx) = oneshot::channel();
        let _ = self.membership.send(MembershipCmd::Leave(done_tx));
        let me = self.me.clone();
        let calls = Arc::clone(&self.peers);
        let (finished_tx, finished_rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = tokio::time::timeout(timeout, done_rx).await;
            announce_leave(calls, me, peers, timeout).await;
            let _ = finished_tx.send(());
        });
        let _ = finished_rx.recv_timeout(timeout * 2);
    }

    /// Before exiting after a graceful leave: pushes everything this node holds to the nodes
    /// that take over its buckets, waiting at most `timeout` for them to acknowledge.
    pub fn hand_off_all(&self, timeout: Duration) {
        let others: Vec<String> = match self.view.lock() {
            Ok(v) => v
                .ring
                .nodes()
                .iter()
                .filter(|n| **n != self.me)
                .cloned()
                .collect(),
            Err(_) => Vec::new(),
        };
        if others.is_empty() {
            return;
        }
        let ring = Ring::new(others, self.vnodes, self.replication_factor);
        let ae = Arc::clone(&self.anti_entropy);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let started = Instant::now();
        self.runtime.spawn(async move {
            let acked = ae.hand_off(&ring, false).await;
            let _ = done_tx.send(acked);
        });
        match done_rx.recv_timeout(timeout) {
            Ok(true) => tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "handed off every bucket to the nodes taking over"
            ),
            Ok(false) => {
                tracing::warn!("hand-off incomplete: some nodes taking over did not acknowledge")
            }
            Err(_) => tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                "hand-off timeout hit before the nodes taking over acknowledged"
            ),
        }
    }
}
