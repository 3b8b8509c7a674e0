//! The control plane's calls to other nodes (anti-entropy, hand-off, leave), made on the
//! cores' own HTTP/2 clients: the control plane hands each call to a core, which makes it on
//! its bulk connection to the peer (`PeerClients::bulk_call`). One peer client in the node,
//! and no tokio HTTP client. Calls are spread over the cores in turn.

use super::cores::Cores;
use crate::{
    cluster::antientropy::{RemoteReplicas, CALL_TIMEOUT, MAX_MESSAGE_BYTES},
    pb,
};
use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};
use tonic::Status;

/// How much longer than its call the control plane waits for the core making it.
const HANDOVER_SLACK: Duration = Duration::from_secs(1);

pub struct CorePeers {
    pub cores: Cores,
    next_core: AtomicUsize,
}

impl CorePeers {
    pub fn new(cores: Cores) -> Self {
        CorePeers {
            cores,
            next_core: AtomicUsize::new(0),
        }
    }

    /// Calls `path` on `peer` from the next core, within `timeout`.
    pub async fn call<M, R>(
        &self,
        peer: &str,
        path: &'static str,
        msg: M,
        timeout: Duration,
    ) -> Result<R, Status>
    where
        M: prost::Message + Send + 'static,
        R: prost::Message + Default + Send + 'static,
    {
        let core = self.next_core.fetch_add(1, Ordering::Relaxed) % self.cores.sharded.nr_cores();
        let deadline = Instant::now() + timeout;
        let peer = peer.to_string();
        self.cores
            .sharded
            .invoke_on(core, timeout + HANDOVER_SLACK, move |ctx| async move {
                ctx.coordinator
                    .peers
                    .bulk_call(&peer, path, msg, deadline, MAX_MESSAGE_BYTES)
                    .await
            })
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
    }
}

impl RemoteReplicas for CorePeers {
    async fn digests(&self, peer: &str, req: pb::DigestRequest) -> Result<pb::DigestReply, Status> {
        self.call(peer, "/pb.PeerService/Digests", req, CALL_TIMEOUT)
            .await
    }

    async fn keys(&self, peer: &str, req: pb::KeysRequest) -> Result<pb::KeysReply, Status> {
        self.call(peer, "/pb.PeerService/Keys", req, CALL_TIMEOUT)
            .await
    }

    async fn fetch(&self, peer: &str, req: pb::FetchRequest) -> Result<pb::EntryBatch, Status> {
        self.call(peer, "/pb.PeerService/Fetch", req, CALL_TIMEOUT)
            .await
    }

    async fn apply(&self, peer: &str, req: pb::EntryBatch) -> Result<pb::ApplyAck, Status> {
        self.call(peer, "/pb.PeerService/Apply", req, CALL_TIMEOUT)
            .await
    }
}
