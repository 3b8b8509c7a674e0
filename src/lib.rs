//! distributed-cache: an in-memory cache served over gRPC by a thread-per-core engine.
//!
//! # Layout
//! - [`cli`]: the operator subcommands (health, get, set, del, stats), gRPC clients of a node.
//! - [`cluster`]: ring, quorum replication, peer clients and SWIM membership.
//! - [`config`]: environment variables -> a validated [`config::Config`] (every check lives here).
//! - [`error`]: the node's request error enum and its single mapping to gRPC status codes.
//! - [`routing`]: key -> shard -> owning core, with a hash that is stable across machines.
//! - [`engine`]: commands, the single-threaded shard (map, LRU, TTL, versions), the HLC and
//!   what one core runs to serve its shards.
//! - [`ingress`]: per-core gRPC (our HTTP/2 server and prost on glommio), request validation and
//!   routing to the owning core; reflection and health on a side thread.
//! - [`node`]: starts the cores and the side thread, and shuts them down on a signal.
//! - [`observability`]: tracing setup.
//! - [`pb`]: the generated wire types and client (`proto/cache.proto`).

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
pub mod wire;

/// Generated from `proto/cache.proto` by build.rs.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("pb");

    /// The encoded descriptor set served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/cache_descriptor.bin"));
}
