//! The consistency suite's pure half: a history of operations on a cache (one register per
//! key), as concurrent clients saw them, and a linearizability checker over it. The half that
//! starts nodes, drives clients and injects faults records into [`History`]; nothing here
//! does I/O or knows of gRPC.
//!
//! - [`history`]: operations, their outcomes (ok, definite failure, unknown), a history.
//! - [`linearizability`]: Wing & Gong's search with Lowe's memoisation (as Porcupine and
//!   Knossos implement it), partitioned by key, operations of unknown outcome taking effect
//!   at any later point or never; a failure comes with the shortest window that shows it.
//! - [`quorum`]: what QUORUM promises with last-write-wins versions: no read older than a
//!   write acknowledged before the read began.

pub mod history;
pub mod linearizability;
pub mod quorum;

pub use history::{History, Kind, Op, Outcome};
pub use linearizability::{check, Report, Verdict};
