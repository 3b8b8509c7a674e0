//! The cluster: where keys live across nodes and how replicas agree.
//!
//! - [`ring`]: consistent hashing with virtual nodes (pure; a copy per core).
//! - [`replication`]: quorum counting and read resolution (pure).
//! - [`coordinator`]: runs a client request over the key's replicas, on the owning core.
//! - [`peer`]: each core's own HTTP/2 clients to other nodes.
//! - [`hints`]: hinted handoff, writes kept for replicas that missed them.
//! - [`antientropy`]: digest-tree comparison between replicas, and data movement on ring
//!   changes (join, leave), on the side thread.
//! - [`membership`]: SWIM (foca) over UDP on the side thread, and the member table.
//! - [`snitch`]: per-core replica ranking by health and recent latency, and the speculative
//!   retry delay.

pub mod antientropy;
pub mod coordinator;
pub mod hints;
pub mod membership;
pub mod peer;
pub mod plan;
pub mod replication;
pub mod ring;
pub mod snitch;
pub mod transport;
pub mod views;
