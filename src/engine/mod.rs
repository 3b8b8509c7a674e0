//! The cache engine: what a request is, how one shard stores entries, the clock that versions
//! them, and what each core runs to serve the shards it owns. All of it runs on the core that
//! owns the shard: other cores reach it over the mesh, the control plane by `executors::Sharded`.
//!
//! - [`command`]: the internal request and reply types (no prost types past ingress).
//! - [`shard`]: one shard's map, eviction (S3-FIFO or CLOCK) under limits in bytes and
//!   entries, and TTLs; synchronous, runtime-free, `now` passed in.
//! - [`ghost`]: S3-FIFO's memory of recently evicted keys, 2 bytes a key.
//! - [`budget`]: how MAX_MEMORY and CAPACITY are divided among cores and among shards.
//! - [`entry`]: the one-allocation entry layout the shard stores.
//! - [`slab`]: the cells entries are allocated from, per shard.
//! - [`hlc`]: hybrid logical clock versions.
//! - [`core`]: a core's shards, clock and counters; executes commands, sweeps expired entries.

pub mod budget;
pub mod command;
pub mod core;
pub mod entry;
pub mod ghost;
pub mod hlc;
pub mod index;
pub mod log;
pub mod shard;
