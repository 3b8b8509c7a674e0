//! MAX_MEMORY, CAPACITY and EVICTION against a running node: the budget follows the keys from
//! core to core, entries larger than a core's share, and what a scan of cold keys leaves.

use crate::{
    steering::stats,
    support::{wait_until, Node},
};
use distributed_cache::{
    pb::{get_response, set_request, GetRequest, SetRequest, StatsResponse},
    routing::{owner_core, shard_of},
};
use std::time::Duration;
use tonic::Code;

fn set_bytes(key: &str, value: Vec<u8>) -> SetRequest {
    SetRequest {
        key: key.into(),
        payload: Some(set_request::Payload::ValueBytes(value)),
        ..Default::default()
    }
}

fn get(key: &str) -> GetRequest {
    GetRequest {
        key: key.into(),
        ..Default::default()
    }
}

/// Keys whose shard core `core` owns (of `nr_cores`, with `num_shards` shards).
fn keys_on_core(core: usize, nr_cores: usize, num_shards: u32, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("key-{i}"))
        .filter(|k| owner_core(shard_of(k.as_bytes(), num_shards), nr_cores) == core)
        .take(n)
        .collect()
}

fn used(s: &StatsResponse) -> u64 {
    s.cores.iter().map(|c| c.memory_used_bytes).sum()
}

fn shares(s: &StatsResponse) -> Vec<u64> {
    let mut out = vec![0; s.cores.len()];
    for c in &s.cores {
        out[c.core as usize] = c.memory_share_bytes;
    }
    out
}

const BUDGET: u64 = 32 << 20;

#[tokio::test]
async fn the_budget_follows_the_keys_to_their_core() {
    let node = Node::start(&[
        ("CORES", "2"),
        ("NUM_SHARDS", "2"),
        ("MAX_MEMORY", "32mb"),
        ("TTL", "0"),
    ])
    .await;
    let s = stats(&node).await;
    assert_eq!(s.memory_budget_bytes, BUDGET);
    assert_eq!(s.cores.len(), 2, "the test needs two cores");
    assert_eq!(shares(&s).iter().sum::<u64>(), BUDGET);
    // 48 MB of 1 KB values, every key on core 0: more than the whole budget.
    let keys = keys_on_core(0, 2, 2, 48 * 1024);
    let mut writers = Vec::new();
    for part in keys.chunks(keys.len() / 8) {
        let mut c = node.client().await.unwrap();
        let part = part.to_vec();
        writers.push(tokio::spawn(async move {
            for k in part {
                c.set(set_bytes(&k, vec![7; 1000])).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    wait_until(
        Duration::from_secs(10),
        "core 0 holds most of the budget",
        || async { shares(&stats(&node).await)[0] > BUDGET * 9 / 10 },
    )
    .await;
    let s = stats(&node).await;
    assert_eq!(shares(&s).iter().sum::<u64>(), BUDGET, "{s:?}");
    assert!(
        used(&s) <= BUDGET + BUDGET / 100,
        "{} used of {BUDGET}",
        used(&s)
    );
    let core0 = s.cores.iter().find(|c| c.core == 0).unwrap();
    // Half the budget holds ~15k such entries; core 0 holds far more than its even half.
    assert!(
        core0.entries > 25_000,
        "{} entries on core 0",
        core0.entries
    );
    assert!(core0.evictions > 0);
    // The newest keys are there; memory stays within the budget whatever was written.
    let mut c = node.client().await.unwrap();
    assert!(c.get(get(keys.last().unwrap())).await.is_ok());
}

#[tokio::test]
async fn an_entry_larger_than_a_cores_share_is_stored_one_larger_than_the_budget_refused() {
    let node = Node::start(&[
        ("CORES", "2"),
        ("NUM_SHARDS", "2"),
        ("MAX_MEMORY", "32mb"),
        ("MAX_RECV_MSG_SIZE", "67108864"),
        ("MAX_SEND_MSG_SIZE", "67108864"),
    ])
    .await;
    let mut c = node.client().await.unwrap();
    // Each core starts with 16 MB; this needs 24.
    let big = vec![3u8; 24 << 20];
    c.set(set_bytes("big", big.clone())).await.unwrap();
    let got = c.get(get("big")).await.unwrap().into_inner();
    assert!(
        got.payload == Some(get_response::Payload::ValueBytes(big)),
        "the big value reads back whole"
    );
    for i in 0..10 {
        c.set(set_bytes(&format!("small-{i}"), vec![1; 100]))
            .await
            .unwrap();
    }
    wait_until(
        Duration::from_secs(10),
        "the shares are back within the budget",
        || async {
            let s = stats(&node).await;
            shares(&s).iter().sum::<u64>() == BUDGET && used(&s) <= BUDGET
        },
    )
    .await;
    let err = c
        .set(set_bytes("huge", vec![4u8; 40 << 20]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("MAX_MEMORY") && err.message().contains(&BUDGET.to_string()),
        "{}",
        err.message()
    );
    // The refusal evicted nothing.
    for i in 0..10 {
        assert!(c.get(get(&format!("small-{i}"))).await.is_ok(), "small-{i}");
    }
    assert!(c.get(get("big")).await.is_ok());
    assert_eq!(c.get(get("huge")).await.unwrap_err().code(), Code::NotFound);
}

/// A budget of 1 TiB over 256 shards: each shard's log reserves room for the whole budget, up
/// to its part of the node's address space (256 x 1 TiB would not fit in a process's), so the
/// node starts, serves and reports the budget it was given.
#[tokio::test]
async fn a_terabyte_budget_over_many_shards_starts_and_serves() {
    let node = Node::start(&[("CORES", "2"), ("NUM_SHARDS", "256"), ("MAX_MEMORY", "1tb")]).await;
    let mut c = node.client().await.unwrap();
    for i in 0..64 {
        c.set(set_bytes(&format!("k{i}"), vec![i as u8; 100]))
            .await
            .unwrap();
    }
    for i in 0..64 {
        let got = c.get(get(&format!("k{i}"))).await.unwrap().into_inner();
        assert!(got.payload == Some(get_response::Payload::ValueBytes(vec![i as u8; 100])));
    }
    let s = stats(&node).await;
    assert_eq!(s.memory_budget_bytes, 1 << 40);
}

/// 100 keys read twice, then a one-pass scan of 3,000 keys set once into room for 1,000:
/// how many of the 100 are left.
async fn hot_keys_left_after_a_scan(eviction: &str) -> usize {
    let node = Node::start(&[
        ("CORES", "1"),
        ("NUM_SHARDS", "1"),
        ("CAPACITY", "1000"),
        ("EVICTION", eviction),
    ])
    .await;
    let mut c = node.client().await.unwrap();
    for i in 0..100 {
        c.set(set_bytes(&format!("hot-{i}"), vec![1; 10]))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        for i in 0..100 {
            c.get(get(&format!("hot-{i}"))).await.unwrap();
        }
    }
    for i in 0..3000 {
        c.set(set_bytes(&format!("scan-{i}"), vec![2; 10]))
            .await
            .unwrap();
    }
    let mut left = 0;
    for i in 0..100 {
        left += c.get(get(&format!("hot-{i}"))).await.is_ok() as usize;
    }
    left
}

#[tokio::test]
async fn a_scan_of_cold_keys_leaves_the_hot_set_with_s3fifo_not_with_clock() {
    assert_eq!(hot_keys_left_after_a_scan("s3fifo").await, 100);
    assert_eq!(hot_keys_left_after_a_scan("clock").await, 0);
}
