//! distributed-cache: an in-memory cache served over gRPC by a thread-per-core engine.
//! Threads: one pinned glommio executor per core, one control-plane thread, the main thread.
//!
//! # Layout
//! The modules in the order a request meets them, then what runs beside the requests.
//! - [`node`]: starts the cores and the control plane, stops them on a signal; what a core runs.
//! - [`ingress`]: a core's connections: HTTP/2 and gRPC, validation, routing to the owning core.
//! - [`routing`]: key -> shard -> core, ring buckets, and the port that lands on a given core.
//! - [`cluster`]: ring, quorum plans and their coordinator, peer clients, hints, anti-entropy.
//! - [`security`]: TLS material, client tokens, the cluster secret; the per-request gate.
//! - [`wire`]: conversions between the peer protocol's messages and replica entries.
//! - [`engine`]: commands, the single-threaded shard, the HLC, a core's shards and sweeps.
//! - [`error`]: the node's request error enum and its single mapping to gRPC status codes.
//! - [`control`]: the control plane: admin and peer-control services, membership,
//!   anti-entropy, metrics, leave and hand-off; asks the cores through `executors::Sharded`.
//! - [`observability`]: tracing setup and the metrics each core counts.
//! - [`config`]: environment variables -> a validated [`config::Config`] (every check here).
//! - [`cli`]: the operator subcommands (health, get, set, del, stats), gRPC clients of a node.
//! - [`pb`]: the generated wire types and client (`proto/cache.proto`, `proto/peer.proto`).

pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod engine;
pub mod error;
pub mod ingress;
pub mod node;
pub mod observability;
pub mod routing;
pub mod security;
pub mod wire;

/// Generated from `proto/cache.proto` and `proto/peer.proto` by build.rs.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("pb");

    /// The encoded descriptor set served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/cache_descriptor.bin"));
}
