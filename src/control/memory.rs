//! The node's memory budget among its cores: every REBALANCE_INTERVAL the control plane asks
//! each core what it holds and what it had to evict for new entries, divides MAX_MEMORY (and
//! CAPACITY) by [`crate::engine::budget::divide`], and tells each core its share, the cores
//! that shrink first so that the shares in force never add up to more than the budget. Runs on
//! the control plane's thread; the cores evict down to a smaller share as they receive it.

use super::cores::Cores;
use crate::engine::budget::{divide, Demand, Memory};
use std::time::Duration;

/// How often the budget is divided again: often enough that a core filling up gets room
/// before it has evicted much, rare enough to cost nothing measurable (two messages per core).
pub const REBALANCE_INTERVAL: Duration = Duration::from_millis(100);

/// Divides the budget forever; a core that does not answer a round keeps its share.
pub async fn rebalance_forever(cores: Cores, memory: Memory) {
    let mut ticker = tokio::time::interval(REBALANCE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shares: Vec<(u64, Option<u64>)> = Vec::new();
    loop {
        ticker.tick().await;
        let Some(demands) = cores.demands().await else {
            continue;
        };
        let bytes = divide(
            memory.max_bytes,
            &demands.iter().map(|d| d.bytes).collect::<Vec<Demand>>(),
        );
        let entries = memory
            .max_entries
            .map(|n| divide(n, &demands.iter().map(|d| d.entries).collect::<Vec<_>>()));
        let new: Vec<(u64, Option<u64>)> = (0..bytes.len())
            .map(|c| (bytes[c], entries.as_ref().map(|e| e[c])))
            .collect();
        // Shrinks before grows: a core told to grow before another has shrunk would let the
        // node hold more than its budget for a moment.
        let shrinks = |c: usize| {
            shares
                .get(c)
                .is_none_or(|old: &(u64, Option<u64>)| new[c].0 < old.0 || new[c].1 < old.1)
        };
        for pass_shrinking in [true, false] {
            for c in (0..new.len()).filter(|&c| shrinks(c) == pass_shrinking) {
                if let Err(e) = cores.set_share(c, new[c].0, new[c].1).await {
                    tracing::debug!(core = c, error = %e, "memory share not delivered");
                }
            }
        }
        shares = new;
    }
}
