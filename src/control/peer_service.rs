//! PeerService's control methods, served on the control plane: Leave (a member announcing
//! its graceful exit) and anti-entropy's Digests, Keys, Fetch and Apply, answered from the
//! cores. Write and Read are served on the cores themselves (ingress/grpc).

use super::cores::Cores;
use crate::{
    cluster::{
        antientropy::{group_digests, LocalReplica},
        membership::MembershipCmd,
    },
    pb,
    routing::buckets::BucketSet,
    wire,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

pub struct PeerControl {
    pub membership: mpsc::UnboundedSender<MembershipCmd>,
    pub cores: Cores,
}

fn buckets_of(bytes: &[u8]) -> Result<BucketSet, Status> {
    BucketSet::from_bytes(bytes)
        .ok_or_else(|| Status::invalid_argument("buckets: expected a 512-byte bitmap"))
}

fn unavailable(e: executors::Unanswered) -> Status {
    Status::unavailable(e.to_string())
}

#[tonic::async_trait]
impl pb::peer_service_server::PeerService for PeerControl {
    async fn write(
        &self,
        _: Request<pb::ReplicaWrite>,
    ) -> Result<Response<pb::ReplicaAck>, Status> {
        Err(Status::internal("replica writes are served by the cores"))
    }

    async fn read(
        &self,
        _: Request<pb::ReplicaRead>,
    ) -> Result<Response<pb::ReplicaEntry>, Status> {
        Err(Status::internal("replica reads are served by the cores"))
    }

    async fn leave(&self, req: Request<pb::LeaveNotice>) -> Result<Response<pb::LeaveAck>, Status> {
        let _ = self
            .membership
            .send(MembershipCmd::PeerLeft(req.into_inner().addr));
        Ok(Response::new(pb::LeaveAck {}))
    }

    async fn digests(
        &self,
        req: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::DigestReply>, Status> {
        let req = req.into_inner();
        let buckets = buckets_of(&req.buckets)?;
        let leaves = self.cores.digests().await.map_err(unavailable)?;
        Ok(Response::new(if req.groups {
            pb::DigestReply {
                digests: group_digests(&leaves.digests, &buckets),
                counts: Vec::new(),
            }
        } else {
            pb::DigestReply {
                digests: buckets.iter().map(|b| leaves.digests[b]).collect(),
                counts: buckets.iter().map(|b| leaves.counts[b]).collect(),
            }
        }))
    }

    async fn keys(&self, req: Request<pb::KeysRequest>) -> Result<Response<pb::KeysReply>, Status> {
        let buckets = buckets_of(&req.into_inner().buckets)?;
        let keys = self.cores.list(&buckets).await.map_err(unavailable)?;
        Ok(Response::new(pb::KeysReply {
            keys: keys.into_iter().map(wire::key_version_to_pb).collect(),
        }))
    }

    async fn fetch(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::EntryBatch>, Status> {
        let entries = self
            .cores
            .fetch(req.into_inner().keys)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(pb::EntryBatch {
            entries: entries.iter().map(wire::entry_to_pb).collect(),
        }))
    }

    async fn apply(&self, req: Request<pb::EntryBatch>) -> Result<Response<pb::ApplyAck>, Status> {
        let entries = req
            .into_inner()
            .entries
            .into_iter()
            .map(wire::entry_from_pb)
            .collect();
        let applied = self.cores.apply(entries).await.map_err(unavailable)?;
        Ok(Response::new(pb::ApplyAck {
            applied: applied as u32,
        }))
    }
}
