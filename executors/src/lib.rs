//! The thread-per-core runtime: which cores the process may use, one pinned glommio executor on
//! each, and the request/reply mesh of SPSC channels between them.
//!
//! It knows nothing about caching, gRPC or clusters: a request is any `Send` value, and the
//! handler that answers it is the caller's. Everything here runs on the executor threads except
//! [`allowed_cores`], [`check_prerequisites`] and [`start`], which run on the launching thread.
//!
//! # Layout
//! - [`prereq`]: io_uring and locked-memory probes, so a missing prerequisite is one clear line.
//! - [`mesh`]: [`Mesh`] / [`Router`], one bounded SPSC channel per ordered pair of cores for
//!   requests and one for replies.
//! - [`sharded`]: [`Sharded`], asking one core or every core from outside them, with typed
//!   answers and a deadline.

pub mod mesh;
pub mod prereq;
pub mod sharded;

pub use mesh::{CallError, Handled, Mesh, Router};
pub use prereq::{check_prerequisites, PrereqError};
pub use sharded::{sharded, Inbox, Pending, Sharded, Unanswered};

use std::{thread, time::Duration};

/// A CPU the process's affinity mask allows (`taskset`, `docker --cpuset-cpus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu(pub usize);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read the process's CPU affinity mask")]
    NoAffinity,
    #[error("executor for core {core} on CPU {cpu} failed to start: {reason}")]
    Executor {
        core: usize,
        cpu: usize,
        reason: String,
    },
    #[error("cannot spawn the thread for core {core}: {source}")]
    Thread { core: usize, source: std::io::Error },
}

/// The CPUs of this process's affinity mask, in ascending order, at most `limit` of them.
///
/// glommio's own topology discovery lists every online CPU and ignores the mask, so the ids
/// come from `sched_getaffinity` (via core_affinity) and each executor is placed on one of
/// them explicitly.
pub fn allowed_cores(limit: Option<usize>) -> Result<Vec<Cpu>, StartError> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .ok_or(StartError::NoAffinity)?
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort_unstable();
    if let Some(limit) = limit {
        ids.truncate(limit.max(1));
    }
    if ids.is_empty() {
        return Err(StartError::NoAffinity);
    }
    Ok(ids.into_iter().map(Cpu).collect())
}

/// Settings shared by every executor.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// How long an idle executor polls before it parks. Waking a parked executor from another
    /// core costs an eventfd write and a futex wake (tens of microseconds); spinning a little
    /// keeps cross-core hops cheap at low load.
    pub spin_before_park: Option<Duration>,
    /// Memory registered with io_uring for file I/O. The cache does none, so the minimum keeps
    /// the locked-memory footprint small.
    pub io_memory_bytes: usize,
}

impl Default for ExecutorOptions {
    fn default() -> Self {
        Self {
            spin_before_park: Some(Duration::from_micros(50)),
            io_memory_bytes: 64 * 1024,
        }
    }
}

/// Handles of the running executors.
pub struct Executors<T> {
    // None only for an executor that failed to build, which `start` has already reported.
    threads: Vec<thread::JoinHandle<Option<T>>>,
}

impl<T> Executors<T> {
    /// Waits for every executor's main future to finish, in core order. An `Err` carries the
    /// panic of a core whose main future panicked.
    pub fn join(self) -> Vec<thread::Result<Option<T>>> {
        self.threads.into_iter().map(|t| t.join()).collect()
    }
}

/// Starts one executor per CPU in `cpus`, pinned to it; core `i` runs `main(i)`.
///
/// Returns only once every executor is up, so a failure (no io_uring, an unusable CPU) is an
/// error here and not a panic on some thread later. Cores are numbered in start order, which is
/// also the order of glommio's executor ids and therefore of the mesh's peer ids.
pub fn start<G, F, T>(
    cpus: &[Cpu],
    options: &ExecutorOptions,
    main: G,
) -> Result<Executors<T>, StartError>
where
    G: Fn(usize) -> F + Send + Clone + 'static,
    F: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    let mut threads = Vec::with_capacity(cpus.len());
    for (core, &Cpu(cpu)) in cpus.iter().enumerate() {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
        let mut builder = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu))
            .name(&format!("core-{core}"))
            .io_memory(options.io_memory_bytes);
        if let Some(spin) = options.spin_before_park {
            builder = builder.spin_before_park(spin);
        }
        let main = main.clone();
        let handle = thread::Builder::new()
            .name(format!("core-{core}"))
            .spawn(move || {
                let executor = match builder.make() {
                    Ok(executor) => {
                        let _ = ready_tx.send(Ok(()));
                        executor
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return None;
                    }
                };
                Some(executor.run(main(core)))
            })
            .map_err(|source| StartError::Thread { core, source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => threads.push(handle),
            Ok(Err(reason)) => {
                let _ = handle.join();
                return Err(StartError::Executor { core, cpu, reason });
            }
            Err(_) => {
                let _ = handle.join();
                return Err(StartError::Executor {
                    core,
                    cpu,
                    reason: "thread exited before reporting".into(),
                });
            }
        }
    }
    Ok(Executors { threads })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_cores_are_sorted_and_limited() {
        let all = allowed_cores(None).unwrap();
        assert!(!all.is_empty());
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
        let one = allowed_cores(Some(1)).unwrap();
        assert_eq!(one, vec![all[0]]);
    }
}
