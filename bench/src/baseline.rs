//! The baseline servers `compare` measures the node against, speaking the same
//! `pb.CacheService` through plain tonic on tokio's multi-thread runtime:
//! - `none`: no cache work at all (Get answers a fixed value): the ceiling of the gRPC path.
//! - `mutex`: what one writes first: sharded `Mutex<LruCache>` maps.

use distributed_cache::pb::{
    cache_service_server::{CacheService, CacheServiceServer},
    get_response, set_request, DeleteRequest, DeleteResponse, GetRequest, GetResponse, SetRequest,
    SetResponse, Version,
};
use lru::LruCache;
use std::{
    hash::{BuildHasher, RandomState},
    num::NonZeroUsize,
    sync::Mutex,
};
use tonic::{Request, Response, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    None,
    Mutex,
}

struct NoStore {
    value: String,
}

#[tonic::async_trait]
impl CacheService for NoStore {
    async fn set(&self, _: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        Ok(Response::new(SetResponse {
            version: Some(Version { hlc: 1, node: 0 }),
        }))
    }
    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Ok(Response::new(GetResponse {
            payload: Some(get_response::Payload::Value(self.value.clone())),
            version: Some(Version { hlc: 1, node: 0 }),
        }))
    }
    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        Ok(Response::new(DeleteResponse { deleted: true }))
    }
}

type Stored = (Vec<u8>, bool, u64);

struct MutexStore {
    shards: Vec<Mutex<LruCache<String, Stored>>>,
    hasher: RandomState,
    clock: std::sync::atomic::AtomicU64,
}

impl MutexStore {
    fn shard(&self, key: &str) -> &Mutex<LruCache<String, Stored>> {
        &self.shards[(self.hasher.hash_one(key) % self.shards.len() as u64) as usize]
    }
}

#[tonic::async_trait]
impl CacheService for MutexStore {
    async fn set(&self, req: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        let m = req.into_inner();
        if m.key.is_empty() {
            return Err(Status::invalid_argument("key must not be empty"));
        }
        let (value, binary) = match m.payload {
            Some(set_request::Payload::Value(s)) => (s.into_bytes(), false),
            Some(set_request::Payload::ValueBytes(b)) => (b, true),
            None => (Vec::new(), false),
        };
        let hlc = self
            .clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let shard = self.shard(&m.key);
        shard
            .lock()
            .expect("no panics while locked")
            .put(m.key, (value, binary, hlc));
        Ok(Response::new(SetResponse {
            version: Some(Version { hlc, node: 0 }),
        }))
    }
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let key = req.into_inner().key;
        let found = self
            .shard(&key)
            .lock()
            .expect("no panics while locked")
            .get(&key)
            .cloned();
        match found {
            Some((value, binary, hlc)) => Ok(Response::new(GetResponse {
                payload: Some(if binary {
                    get_response::Payload::ValueBytes(value)
                } else {
                    get_response::Payload::Value(String::from_utf8(value).unwrap_or_default())
                }),
                version: Some(Version { hlc, node: 0 }),
            })),
            None => Err(Status::not_found(format!("key {key:?} not found"))),
        }
    }
    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let key = req.into_inner().key;
        let deleted = self
            .shard(&key)
            .lock()
            .expect("no panics while locked")
            .pop(&key)
            .is_some();
        Ok(Response::new(DeleteResponse { deleted }))
    }
}

/// Serves until the process is stopped.
pub async fn serve(
    addr: std::net::SocketAddr,
    store: Store,
    capacity: usize,
    value_bytes: usize,
) -> anyhow::Result<()> {
    let mut server = tonic::transport::Server::builder().tcp_nodelay(true);
    match store {
        Store::None => {
            let svc = CacheServiceServer::new(NoStore {
                value: "v".repeat(value_bytes),
            });
            server.add_service(svc).serve(addr).await?;
        }
        Store::Mutex => {
            let shards = 16;
            let per_shard = NonZeroUsize::new((capacity / shards).max(1)).expect("at least 1");
            let svc = CacheServiceServer::new(MutexStore {
                shards: (0..shards)
                    .map(|_| Mutex::new(LruCache::new(per_shard)))
                    .collect(),
                hasher: RandomState::new(),
                clock: std::sync::atomic::AtomicU64::new(1),
            });
            server.add_service(svc).serve(addr).await?;
        }
    }
    Ok(())
}
