//! The cluster: where keys live across nodes and how replicas agree. The request path runs on
//! every core, membership and anti-entropy on the control plane, the pure parts on either.
//!
//! - [`coordinator`]: drives a client request's plan over the key's replicas, on the owning core.
//! - [`plan`]: quorum writes and reads as pure plans: events in, decisions out.
//! - [`replication`]: consistency levels, quorum counting and read resolution (pure).
//! - [`ring`]: consistent hashing with virtual nodes (pure; a copy per core).
//! - [`views`]: the ring, health verdicts and syncing buckets each core follows.
//! - [`transport`]: what coordination needs of peers, as a trait.
//! - [`peer`]: its real implementation, each core's own HTTP/2 clients to other nodes.
//! - [`snitch`]: per-core replica ranking by recent latency, and the speculative retry delay.
//! - [`hints`]: hinted handoff, writes kept for replicas that missed them.
//! - [`antientropy`]: digest-tree comparison between replicas, and data movement on ring
//!   changes (join, leave), on the control plane.
//! - [`membership`]: SWIM (foca) over UDP on the control plane, the member table and health.

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
