//! Asking the cores from outside them, as seastar's `sharded<T>::invoke_on` and
//! `invoke_on_all` do: a thread that is not a core (the node's control plane, on tokio) sends
//! a closure to one core or to every core; the core runs it with its own state `T` (which
//! need not be `Send`: `Rc`s and cells) on the task queue the core chose, and the typed answer
//! comes back.
//!
//! Bounded and timed: each core queues at most `depth` jobs (an asker waits for room), and
//! every ask has a deadline: a core does not start a job whose asker has given up, and the
//! asker stops waiting at the deadline. The asking side uses tokio's timer, so it runs on a
//! tokio runtime; the cores' side is runtime-agnostic.

use std::{
    future::Future,
    pin::Pin,
    rc::Rc,
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, oneshot};

type Job<T> = Box<dyn FnOnce(Rc<T>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// Why an ask got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unanswered {
    #[error("core {0} is gone")]
    Gone(usize),
    #[error("core {0} did not answer before the deadline")]
    Late(usize),
}

/// The asking side: `Send`, cheap to clone.
pub struct Sharded<T> {
    inboxes: Vec<mpsc::Sender<Job<T>>>,
}

impl<T> Clone for Sharded<T> {
    fn clone(&self) -> Self {
        Self {
            inboxes: self.inboxes.clone(),
        }
    }
}

/// One core's side: taken by that core at start and served with [`Inbox::serve`].
pub struct Inbox<T> {
    rx: mpsc::Receiver<Job<T>>,
}

/// An ask sent to a core; [`Pending::answer`] waits for its answer.
pub struct Pending<R> {
    core: usize,
    deadline: Instant,
    /// Err: it was never queued, and why.
    reply_rx: Result<oneshot::Receiver<R>, Unanswered>,
}

impl<R> Pending<R> {
    pub async fn answer(self) -> Result<R, Unanswered> {
        let reply_rx = self.reply_rx?;
        match tokio::time::timeout_at(self.deadline.into(), reply_rx).await {
            Ok(Ok(r)) => Ok(r),
            // The core dropped the job: it stopped, or it saw the deadline pass first.
            Ok(Err(_)) if Instant::now() < self.deadline => Err(Unanswered::Gone(self.core)),
            Ok(Err(_)) | Err(_) => Err(Unanswered::Late(self.core)),
        }
    }
}

/// A handle for `nr_cores` cores, each queueing at most `depth` jobs, and the cores' inboxes
/// (index = core).
pub fn sharded<T: 'static>(nr_cores: usize, depth: usize) -> (Sharded<T>, Vec<Inbox<T>>) {
    let (inboxes, rxs) = (0..nr_cores)
        .map(|_| {
            let (tx, rx) = mpsc::channel(depth.max(1));
            (tx, Inbox { rx })
        })
        .unzip();
    (Sharded { inboxes }, rxs)
}

impl<T: 'static> Sharded<T> {
    pub fn nr_cores(&self) -> usize {
        self.inboxes.len()
    }

    /// Queues `f` on `core` and returns at once (or when the core has room); the answer is
    /// awaited separately, so one asker can have a job on every core at the same time.
    pub async fn send<R, F, Fut>(&self, core: usize, deadline: Instant, f: F) -> Pending<R>
    where
        F: FnOnce(Rc<T>) -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
        R: Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel();
        let job: Job<T> = Box::new(move |state| {
            Box::pin(async move {
                // The asker gave up or went away: the work would be thrown away.
                if Instant::now() >= deadline || reply_tx.is_closed() {
                    return;
                }
                let _ = reply_tx.send(f(state).await);
            })
        });
        let queued = match self.inboxes.get(core) {
            Some(tx) => match tokio::time::timeout_at(deadline.into(), tx.send(job)).await {
                Ok(Ok(())) => Ok(reply_rx),
                Ok(Err(_)) => Err(Unanswered::Gone(core)),
                // Its queue stayed full until the deadline.
                Err(_) => Err(Unanswered::Late(core)),
            },
            None => Err(Unanswered::Gone(core)),
        };
        Pending {
            core,
            deadline,
            reply_rx: queued,
        }
    }

    /// Runs `f` on `core` with its state, within `timeout`.
    pub async fn invoke_on<R, F, Fut>(
        &self,
        core: usize,
        timeout: Duration,
        f: F,
    ) -> Result<R, Unanswered>
    where
        F: FnOnce(Rc<T>) -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
        R: Send + 'static,
    {
        self.send(core, Instant::now() + timeout, f)
            .await
            .answer()
            .await
    }

    /// Runs `f` on every core at once, within `timeout`; the answers in core order.
    pub async fn invoke_on_all<R, F, Fut>(
        &self,
        timeout: Duration,
        f: F,
    ) -> Vec<Result<R, Unanswered>>
    where
        F: Fn(Rc<T>) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = R> + 'static,
        R: Send + 'static,
    {
        let deadline = Instant::now() + timeout;
        let mut pending = Vec::with_capacity(self.inboxes.len());
        for core in 0..self.inboxes.len() {
            pending.push(self.send(core, deadline, f.clone()).await);
        }
        let mut answers = Vec::with_capacity(pending.len());
        for p in pending {
            answers.push(p.answer().await);
        }
        answers
    }

    /// Runs `f` on every core and folds the answers with `reduce`, or fails with the first
    /// core that did not answer.
    pub async fn map_reduce<R, A, F, Fut>(
        &self,
        timeout: Duration,
        f: F,
        init: A,
        mut reduce: impl FnMut(A, R) -> A,
    ) -> Result<A, Unanswered>
    where
        F: Fn(Rc<T>) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = R> + 'static,
        R: Send + 'static,
    {
        let mut acc = init;
        for answer in self.invoke_on_all(timeout, f).await {
            acc = reduce(acc, answer?);
        }
        Ok(acc)
    }
}

impl<T: 'static> Inbox<T> {
    /// Runs every job sent to this core, each as a task of its own on `queue` (a job that
    /// waits does not hold up the next), until every [`Sharded`] handle is gone. Runs on the
    /// core's executor.
    pub async fn serve(mut self, state: Rc<T>, queue: glommio::TaskQueueHandle) {
        while let Some(job) = self.rx.recv().await {
            // Fails only for a removed queue; the job is then dropped and its asker told the
            // core is gone.
            if let Ok(task) = glommio::spawn_local_into(job(Rc::clone(&state)), queue) {
                task.detach();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A core's state: not `Send`, as the cores' is.
    struct Counter {
        core: usize,
        seen: Cell<u32>,
    }

    fn run_cores(nr: usize, inboxes: Vec<Inbox<Counter>>) -> crate::Executors<()> {
        let cpus = crate::allowed_cores(None).unwrap();
        let cpus: Vec<_> = (0..nr).map(|i| cpus[i % cpus.len()]).collect();
        let inboxes: Vec<_> = inboxes
            .into_iter()
            .map(|i| std::sync::Mutex::new(Some(i)))
            .collect();
        let inboxes = std::sync::Arc::new(inboxes);
        crate::start(&cpus, &crate::ExecutorOptions::default(), move |core| {
            let inbox = inboxes[core].lock().unwrap().take().unwrap();
            async move {
                let state = Rc::new(Counter {
                    core,
                    seen: Cell::new(0),
                });
                inbox
                    .serve(state, glommio::executor().current_task_queue())
                    .await;
            }
        })
        .unwrap()
    }

    fn tokio() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn every_core_answers_with_its_own_state() {
        let (cores, inboxes) = sharded::<Counter>(2, 4);
        let running = run_cores(2, inboxes);
        tokio().block_on(async {
            let t = Duration::from_secs(5);
            let one = cores
                .invoke_on(1, t, |c| async move {
                    c.seen.set(c.seen.get() + 1);
                    (c.core, c.seen.get())
                })
                .await;
            assert_eq!(one, Ok((1, 1)));
            let all = cores
                .invoke_on_all(t, |c| async move {
                    c.seen.set(c.seen.get() + 1);
                    c.seen.get() * 10 + c.core as u32
                })
                .await;
            assert_eq!(all, vec![Ok(10), Ok(21)]);
            let sum = cores
                .map_reduce(t, |c| async move { c.seen.get() }, 0, |a, n| a + n)
                .await;
            assert_eq!(sum, Ok(3));
            assert_eq!(
                cores.invoke_on(7, t, |c| async move { c.core }).await,
                Err(Unanswered::Gone(7))
            );
        });
        drop(cores);
        assert!(running.join().iter().all(|r| r.is_ok()));
    }

    #[test]
    fn a_slow_core_is_late_and_the_others_still_answer() {
        let (cores, inboxes) = sharded::<Counter>(2, 4);
        let running = run_cores(2, inboxes);
        tokio().block_on(async {
            let all = cores
                .invoke_on_all(Duration::from_millis(200), |c| async move {
                    if c.core == 0 {
                        glommio::timer::sleep(Duration::from_secs(2)).await;
                    }
                    c.core
                })
                .await;
            assert_eq!(all, vec![Err(Unanswered::Late(0)), Ok(1)]);
        });
        drop(cores);
        assert!(running.join().iter().all(|r| r.is_ok()));
    }

    #[test]
    fn an_ask_to_a_full_queue_is_late_and_one_to_a_stopped_core_is_gone() {
        // Nobody serves the inboxes: the one slot fills and stays full.
        let (cores, inboxes) = sharded::<Counter>(1, 1);
        tokio().block_on(async {
            let deadline = Instant::now() + Duration::from_millis(50);
            let first = cores.send(0, deadline, |c| async move { c.core }).await;
            let second = cores.send(0, deadline, |c| async move { c.core }).await;
            assert_eq!(second.answer().await, Err(Unanswered::Late(0)));
            assert_eq!(first.answer().await, Err(Unanswered::Late(0)));
            drop(inboxes);
            let after = Instant::now() + Duration::from_secs(5);
            let gone = cores.send(0, after, |c| async move { c.core }).await;
            assert_eq!(gone.answer().await, Err(Unanswered::Gone(0)));
        });
    }
}
