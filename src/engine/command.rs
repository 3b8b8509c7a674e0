//! The internal request and reply types: what ingress hands to the owning core and what comes
//! back. Plain data, `Send`, free of prost types; keys and values move, never copied.

use super::hlc::Version;
use crate::{error::Error, routing::ShardId};
use std::time::Instant;

#[derive(Debug)]
pub enum Command {
    /// Client commands: the owning core coordinates them over the key's replicas.
    Get {
        key: Vec<u8>,
    },
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
        /// Resolved at ingress: `None` never expires.
        ttl_secs: Option<u64>,
        /// The value came as bytes, not a UTF-8 string; Get answers in the same form.
        binary: bool,
    },
    Delete {
        key: Vec<u8>,
    },
    /// Replica commands, from a coordinator on this node or another: act on this node's shard
    /// only.
    Apply(ReplicaEntry),
    Read {
        key: Vec<u8>,
    },
}

/// An entry as replicas exchange it: with its version and remaining time to live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaEntry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub version: Version,
    /// Milliseconds left to live; 0 = never expires.
    pub ttl_ms: u64,
    /// `entry::FLAG_*` bits.
    pub flags: u8,
}

/// A command in its envelope: where it goes and until when it is worth doing.
#[derive(Debug)]
pub struct Request {
    pub shard: ShardId,
    pub command: Command,
    /// Past this instant the client has given up: the core answers DEADLINE_EXCEEDED and does
    /// not execute the command.
    pub deadline: Instant,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Value {
        value: Vec<u8>,
        binary: bool,
        version: Version,
    },
    Stored {
        version: Version,
    },
    Deleted {
        existed: bool,
    },
    Applied {
        applied: bool,
        existed: bool,
    },
    Entry(Option<ReplicaEntry>),
}

pub type Response = Result<Reply, Error>;
