//! Conversions between the peer protocol's wire types (`pb`, proto/peer.proto) and the
//! engine's replica entries: the one place that knows both, used by the cores serving replica
//! calls, the peer client and anti-entropy. Pure functions, called on the cores and on the
//! control plane.

use crate::{
    engine::{command::ReplicaEntry, core::KeyVersion, hlc::Version},
    pb,
};

/// A replica write or an anti-entropy entry. Copies key and value: the entry stays with its
/// owner (a hint, a coordinator's other calls).
pub fn entry_to_pb(e: &ReplicaEntry) -> pb::ReplicaWrite {
    pb::ReplicaWrite {
        key: e.key.clone(),
        value: e.value.clone(),
        hlc: e.version.hlc,
        node: e.version.node,
        ttl_ms: e.ttl_ms,
        flags: e.flags as u32,
    }
}

pub fn entry_from_pb(m: pb::ReplicaWrite) -> ReplicaEntry {
    ReplicaEntry {
        version: Version {
            hlc: m.hlc,
            node: m.node,
        },
        ttl_ms: m.ttl_ms,
        flags: m.flags as u8,
        value: m.value,
        key: m.key,
    }
}

/// A replica's answer to a read: its entry (tombstones included) or none, and whether it is
/// still receiving the key's bucket. The key is not sent back: the caller knows it.
pub fn read_reply_to_pb(entry: Option<ReplicaEntry>, syncing: bool) -> pb::ReplicaEntry {
    match entry {
        Some(e) => pb::ReplicaEntry {
            found: true,
            value: e.value,
            hlc: e.version.hlc,
            node: e.version.node,
            ttl_ms: e.ttl_ms,
            flags: e.flags as u32,
            syncing,
        },
        None => pb::ReplicaEntry {
            syncing,
            ..Default::default()
        },
    }
}

pub fn read_reply_from_pb(key: &[u8], m: pb::ReplicaEntry) -> (Option<ReplicaEntry>, bool) {
    let entry = m.found.then(|| ReplicaEntry {
        key: key.to_vec(),
        value: m.value,
        version: Version {
            hlc: m.hlc,
            node: m.node,
        },
        ttl_ms: m.ttl_ms,
        flags: m.flags as u8,
    });
    (entry, m.syncing)
}

pub fn key_version_to_pb(kv: KeyVersion) -> pb::KeyVersion {
    pb::KeyVersion {
        key: kv.key,
        hlc: kv.version.hlc,
        node: kv.version.node,
        flags: kv.flags as u32,
    }
}

/// The key and version of a peer's key listing (its flags are not needed to compare).
pub fn key_version_from_pb(m: pb::KeyVersion) -> (Vec<u8>, Version) {
    (
        m.key,
        Version {
            hlc: m.hlc,
            node: m.node,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> ReplicaEntry {
        ReplicaEntry {
            key: b"key".to_vec(),
            value: b"value".to_vec(),
            version: Version { hlc: 42, node: 7 },
            ttl_ms: 1500,
            flags: 3,
        }
    }

    #[test]
    fn entries_survive_the_wire_format() {
        let e = entry();
        assert_eq!(entry_from_pb(entry_to_pb(&e)), e);
    }

    #[test]
    fn read_replies_survive_the_wire_format() {
        let e = entry();
        let (back, syncing) = read_reply_from_pb(b"key", read_reply_to_pb(Some(e.clone()), true));
        assert_eq!((back, syncing), (Some(e), true));
        assert_eq!(
            read_reply_from_pb(b"key", read_reply_to_pb(None, false)),
            (None, false)
        );
    }
}
