//! Unit tests of `antientropy`, on the test thread (a current-thread tokio runtime where a
//! test needs one).

use super::*;

fn entry(len: usize) -> ReplicaEntry {
    ReplicaEntry {
        key: b"k".to_vec(),
        value: vec![0; len],
        version: Version { hlc: 1, node: 1 },
        ttl_ms: 0,
        flags: 0,
    }
}

#[test]
fn batches_are_bounded_by_count_and_bytes() {
    let small: Vec<_> = (0..1200).map(|_| entry(10)).collect();
    let b = batches(&small);
    assert_eq!(
        b.iter().map(|b| b.len()).collect::<Vec<_>>(),
        vec![512, 512, 176]
    );
    let big: Vec<_> = (0..5).map(|_| entry(600 << 10)).collect();
    assert!(
        batches(&big).iter().all(|b| b.len() == 1),
        "one big entry per batch"
    );
    assert!(batches(&[]).is_empty());
}

#[test]
fn key_lists_are_batched_by_entry_count() {
    let buckets: Vec<(usize, u64)> = vec![(1, 30), (2, 30), (3, 100), (4, 5), (5, 5)];
    let sets: Vec<Vec<usize>> = list_batches(&buckets, 60)
        .iter()
        .map(|s| s.iter().collect())
        .collect();
    assert_eq!(sets, vec![vec![1, 2], vec![3], vec![4, 5]]);
    assert!(list_batches(&[], 60).is_empty());
}

#[test]
fn group_digests_cover_only_the_requested_buckets() {
    let digests: Vec<u64> = (0..BUCKETS as u64).map(|i| i * 7 + 1).collect();
    let mut set = BucketSet::default();
    set.insert(3);
    set.insert(70);
    let g = group_digests(&digests, &set);
    assert_eq!(g[0], digests[3]);
    assert_eq!(g[1], digests[70]);
    assert!(g[2..].iter().all(|&x| x == 0));
}

/// A replica held in memory, answering as the cores do; its applies can be made to fail
/// after a number of calls (a peer going away mid hand-off).
#[derive(Clone)]
struct MemoryReplica {
    entries: Arc<std::sync::Mutex<std::collections::BTreeMap<Vec<u8>, ReplicaEntry>>>,
    applies_left: Arc<AtomicU64>,
}

impl MemoryReplica {
    fn new() -> Self {
        MemoryReplica {
            entries: Default::default(),
            applies_left: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

impl LocalReplica for MemoryReplica {
    async fn digests(&self) -> Result<Leaves, Unanswered> {
        let mut leaves = Leaves::default();
        for e in self.entries.lock().unwrap().values() {
            let b = crate::routing::buckets::bucket_of(&e.key);
            leaves.digests[b] ^= crate::engine::shard::entry_digest(&e.key, e.version, e.flags);
            leaves.counts[b] += 1;
        }
        Ok(leaves)
    }

    async fn list(&self, buckets: &BucketSet) -> Result<Vec<KeyVersion>, Unanswered> {
        Ok(self
            .entries
            .lock()
            .unwrap()
            .values()
            .filter(|e| buckets.contains(crate::routing::buckets::bucket_of(&e.key)))
            .map(|e| KeyVersion {
                key: e.key.clone(),
                version: e.version,
                flags: e.flags,
            })
            .collect())
    }

    async fn fetch(&self, keys: Vec<Vec<u8>>) -> Result<Vec<ReplicaEntry>, Unanswered> {
        let entries = self.entries.lock().unwrap();
        Ok(keys
            .iter()
            .filter_map(|k| entries.get(k).cloned())
            .collect())
    }

    async fn apply(&self, batch: Vec<ReplicaEntry>) -> Result<usize, Unanswered> {
        let left = self.applies_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(Unanswered::Gone(0));
        }
        self.applies_left
            .store(left.saturating_sub(1), Ordering::SeqCst);
        let mut entries = self.entries.lock().unwrap();
        let mut changed = 0;
        for e in batch {
            if entries
                .get(&e.key)
                .is_none_or(|old| old.version < e.version)
            {
                entries.insert(e.key.clone(), e);
                changed += 1;
            }
        }
        Ok(changed)
    }

    async fn drop_buckets(&self, buckets: &BucketSet) -> Result<usize, Unanswered> {
        let mut entries = self.entries.lock().unwrap();
        let before = entries.len();
        entries.retain(|k, _| !buckets.contains(crate::routing::buckets::bucket_of(k)));
        Ok(before - entries.len())
    }
}

/// Peers reached in memory, answering with the same handlers PeerService uses.
struct MemoryPeers(HashMap<String, MemoryReplica>);

impl MemoryPeers {
    fn peer(&self, addr: &str) -> Result<&MemoryReplica, tonic::Status> {
        self.0
            .get(addr)
            .ok_or_else(|| tonic::Status::unavailable("no such peer"))
    }
}

impl RemoteReplicas for MemoryPeers {
    async fn digests(
        &self,
        peer: &str,
        req: pb::DigestRequest,
    ) -> Result<pb::DigestReply, tonic::Status> {
        answer::digests(self.peer(peer)?, req).await
    }

    async fn keys(&self, peer: &str, req: pb::KeysRequest) -> Result<pb::KeysReply, tonic::Status> {
        answer::keys(self.peer(peer)?, req).await
    }

    async fn fetch(
        &self,
        peer: &str,
        req: pb::FetchRequest,
    ) -> Result<pb::EntryBatch, tonic::Status> {
        answer::fetch(self.peer(peer)?, req).await
    }

    async fn apply(&self, peer: &str, req: pb::EntryBatch) -> Result<pb::ApplyAck, tonic::Status> {
        answer::apply(self.peer(peer)?, req).await
    }
}

#[test]
fn a_hand_off_interrupted_keeps_everything_and_the_next_one_completes() {
    let (a, b) = (MemoryReplica::new(), MemoryReplica::new());
    for i in 0..2000u64 {
        let key = format!("key-{i}").into_bytes();
        let e = ReplicaEntry {
            key: key.clone(),
            value: b"v".to_vec(),
            version: Version {
                hlc: i + 1,
                node: 1,
            },
            ttl_ms: 0,
            flags: 0,
        };
        a.entries.lock().unwrap().insert(key, e);
    }
    let (syncing_tx, _syncing) = watch::channel(Arc::new(BucketSet::default()));
    let ae = AntiEntropy::new(
        Settings {
            me: "a".into(),
            interval: Duration::MAX,
            transition: Duration::ZERO,
        },
        a.clone(),
        MemoryPeers(HashMap::from([("b".to_string(), b.clone())])),
        Arc::new(Counters::default()),
        syncing_tx,
    );
    // "a" left: "b" takes over every bucket.
    let ring = Ring::new(["b".to_string()], 16, 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();

    // b goes away after one batch: not acknowledged, nothing dropped here.
    b.applies_left.store(1, Ordering::SeqCst);
    assert!(!runtime.block_on(ae.hand_off(&ring, true)));
    assert_eq!(a.len(), 2000);
    assert_eq!(b.len(), ENTRIES_PER_BATCH);

    // b is back: the next hand-off sends the rest, sees the digests agree, and drops.
    b.applies_left.store(u64::MAX, Ordering::SeqCst);
    assert!(runtime.block_on(ae.hand_off(&ring, true)));
    assert_eq!(b.len(), 2000);
    assert_eq!(a.len(), 0);
    let counts = ae.counters.snapshot();
    assert_eq!(counts.handed_off, 2000);
    assert_eq!(counts.dropped, 2000);
}

#[test]
fn a_hand_off_sends_each_orphaned_bucket_to_its_replicas_and_nothing_else() {
    let ring = Ring::new(["b", "c", "d"].map(String::from), 16, 2);
    let mut counts = vec![0u32; BUCKETS];
    // "a" (not in the ring) holds entries in every tenth bucket.
    for b in (0..BUCKETS).step_by(10) {
        counts[b] = 3;
    }
    let plan = plan_hand_off(&counts, &ring, "a");
    assert_eq!(plan.orphans.len(), BUCKETS.div_ceil(10));
    for (b, &held) in counts.iter().enumerate() {
        let to: Vec<&str> = plan
            .targets
            .iter()
            .filter(|(_, set)| set.contains(b))
            .map(|(n, _)| n.as_str())
            .collect();
        if held == 0 {
            assert!(to.is_empty(), "bucket {b} is empty here");
        } else {
            let mut replicas = ring.bucket_replicas(b);
            replicas.sort();
            assert_eq!(to, replicas, "bucket {b}");
        }
    }
    // A node that replicates everything it holds hands off nothing.
    let plan = plan_hand_off(&counts, &ring, "b");
    for (b, &n) in counts.iter().enumerate() {
        assert_eq!(
            plan.orphans.contains(b),
            n > 0 && !ring.bucket_replicas(b).contains(&"b")
        );
    }
}
