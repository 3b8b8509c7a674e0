//! PeerService's control methods, served on the control plane: Leave (a member announcing
//! its graceful exit) and anti-entropy's Digests, Keys, Fetch and Apply, answered from the
//! cores. Write and Read are served on the cores themselves (ingress/grpc).

use super::cores::Cores;
use crate::{
    cluster::{antientropy::answer, membership::MembershipCmd},
    pb,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

pub struct PeerControl {
    pub membership: mpsc::UnboundedSender<MembershipCmd>,
    pub cores: Cores,
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

    async fn batch(
        &self,
        _: Request<pb::ReplicaBatch>,
    ) -> Result<Response<pb::ReplicaBatchReply>, Status> {
        Err(Status::internal("replica batches are served by the cores"))
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
        answer::digests(&self.cores, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn keys(&self, req: Request<pb::KeysRequest>) -> Result<Response<pb::KeysReply>, Status> {
        answer::keys(&self.cores, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn fetch(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::EntryBatch>, Status> {
        answer::fetch(&self.cores, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn apply(&self, req: Request<pb::EntryBatch>) -> Result<Response<pb::ApplyAck>, Status> {
        answer::apply(&self.cores, req.into_inner())
            .await
            .map(Response::new)
    }
}
