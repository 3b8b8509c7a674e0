//! Request/reply between cores over bounded SPSC channels, one per ordered pair of cores in
//! each direction (glommio's channel mesh), so a request costs exactly one hop there and one
//! back.
//!
//! A [`Mesh`] is built once on the launching thread and handed to every executor; each core
//! joins it and gets its own [`Router`], which lives on that core only (`Rc`, `RefCell`, no
//! locks). A call parks its future in a local slab slot; the reply names the slot.
//!
//! Back-pressure: a caller may have at most `max_in_flight` calls outstanding towards one peer.
//! Both channels of the pair hold that many messages, so a request never waits for room and a
//! reply never does either: replies cannot deadlock against requests, and a saturated core
//! sheds new work ([`CallError::Overloaded`]) instead of queueing it without bound.

use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use slab::Slab;
use std::{
    cell::{Cell, RefCell},
    future::Future,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
};

struct CallMsg<Req> {
    slot: u32,
    req: Req,
}

struct ReplyMsg<Resp> {
    slot: u32,
    resp: Resp,
}

/// The channels of every core, before the cores have joined. Cheap to clone; `Send`.
pub struct Mesh<Req: Send + 'static, Resp: Send + 'static> {
    requests: MeshBuilder<CallMsg<Req>, Full>,
    replies: MeshBuilder<ReplyMsg<Resp>, Full>,
    max_in_flight: usize,
}

impl<Req: Send + 'static, Resp: Send + 'static> Clone for Mesh<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            requests: self.requests.clone(),
            replies: self.replies.clone(),
            max_in_flight: self.max_in_flight,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The caller already has `max_in_flight` calls outstanding towards that core.
    #[error("core {core} is saturated")]
    Overloaded { core: usize },
    /// The target core has gone (shutdown).
    #[error("core {core} is gone")]
    Disconnected { core: usize },
}

impl<Req: Send + 'static, Resp: Send + 'static> Mesh<Req, Resp> {
    /// A mesh for `nr_cores` cores. Must be joined by exactly that many executors.
    pub fn new(nr_cores: usize, max_in_flight: usize) -> Self {
        let max_in_flight = max_in_flight.max(1);
        Self {
            requests: MeshBuilder::full(nr_cores, max_in_flight),
            replies: MeshBuilder::full(nr_cores, max_in_flight),
            max_in_flight,
        }
    }

    /// Joins the mesh from the current executor. Completes once every core has joined.
    pub async fn join(self) -> Router<Req, Resp> {
        let max_in_flight = self.max_in_flight;
        let nr_cores = self.requests.nr_peers();
        // The mesh is sized for exactly the executors that `start` launched, so joining only
        // fails on a programming error.
        let (req_tx, req_rx) = self
            .requests
            .join()
            .await
            .expect("joining the request mesh: every core joins once");
        let (reply_tx, reply_rx) = self
            .replies
            .join()
            .await
            .expect("joining the reply mesh: every core joins once");
        Router {
            core: req_tx.peer_id(),
            nr_cores,
            req_tx,
            reply_tx,
            receivers: RefCell::new(Some((req_rx, reply_rx))),
            pending: RefCell::new(Slab::with_capacity(max_in_flight)),
            in_flight: (0..nr_cores).map(|_| Cell::new(0)).collect(),
            max_in_flight,
        }
    }
}

/// What a handler makes of a request: an answer now (the common case, no task spawned), or a
/// future that answers later (for work that waits on something, such as other nodes).
pub enum Handled<Resp> {
    Ready(Resp),
    Later(Pin<Box<dyn Future<Output = Resp>>>),
}

/// This core's incoming request and reply channels, until `serve` takes them.
type MeshReceivers<Req, Resp> = (Receivers<CallMsg<Req>>, Receivers<ReplyMsg<Resp>>);

enum Slot<Resp> {
    Waiting(Option<Waker>),
    Done(Resp),
    /// The caller's future was dropped; the reply only frees the slot.
    Abandoned,
}

/// One core's end of the mesh.
pub struct Router<Req: Send + 'static, Resp: Send + 'static> {
    core: usize,
    nr_cores: usize,
    req_tx: Senders<CallMsg<Req>>,
    reply_tx: Senders<ReplyMsg<Resp>>,
    receivers: RefCell<Option<MeshReceivers<Req, Resp>>>,
    pending: RefCell<Slab<Slot<Resp>>>,
    in_flight: Vec<Cell<usize>>,
    max_in_flight: usize,
}

impl<Req: Send + 'static, Resp: Send + 'static> Router<Req, Resp> {
    /// This core's index, `0..nr_cores`.
    pub fn core(&self) -> usize {
        self.core
    }

    pub fn nr_cores(&self) -> usize {
        self.nr_cores
    }

    /// Calls towards `core` that have not been answered yet.
    pub fn in_flight(&self, core: usize) -> usize {
        self.in_flight[core].get()
    }

    /// Sends `req` to `core` (not this one) and returns the future of its reply, or gives the
    /// request back at once if that core is saturated.
    pub fn call(
        self: &Rc<Self>,
        core: usize,
        req: Req,
    ) -> Result<ReplyFuture<Req, Resp>, (CallError, Req)> {
        debug_assert_ne!(core, self.core, "local requests are served in place");
        let in_flight = &self.in_flight[core];
        if in_flight.get() >= self.max_in_flight {
            return Err((CallError::Overloaded { core }, req));
        }
        let slot = self.pending.borrow_mut().insert(Slot::Waiting(None));
        match self.req_tx.try_send_to(
            core,
            CallMsg {
                slot: slot as u32,
                req,
            },
        ) {
            Ok(()) => {
                in_flight.set(in_flight.get() + 1);
                Ok(ReplyFuture {
                    router: Rc::clone(self),
                    slot,
                    done: false,
                })
            }
            Err(e) => {
                self.pending.borrow_mut().remove(slot);
                let err = match &e {
                    glommio::GlommioError::Closed(_) => CallError::Disconnected { core },
                    _ => CallError::Overloaded { core },
                };
                match e {
                    glommio::GlommioError::Closed(glommio::ResourceType::Channel(msg))
                    | glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(msg)) => {
                        Err((err, msg.req))
                    }
                    // try_send_to only fails with the two kinds above, or for a bad index,
                    // which the debug_assert and the in_flight indexing rule out.
                    other => panic!("unexpected mesh send error towards core {core}: {other}"),
                }
            }
        }
    }

    /// Starts this core's mesh tasks: one per peer that answers its requests with `handler`,
    /// and one per peer that delivers replies to waiting callers. Call once per core.
    ///
    /// Each task drains everything waiting in its channel before it yields, so a burst is
    /// handled as a batch with one wake-up.
    pub fn serve<H>(self: &Rc<Self>, handler: H)
    where
        H: Fn(Req) -> Handled<Resp> + 'static,
    {
        let Some((mut req_rx, mut reply_rx)) = self.receivers.borrow_mut().take() else {
            panic!("Router::serve called twice on core {}", self.core);
        };
        let handler = Rc::new(handler);
        for (peer, rx) in req_rx.streams() {
            let router = Rc::clone(self);
            let handler = Rc::clone(&handler);
            glommio::spawn_local(async move {
                while let Some(CallMsg { slot, req }) = rx.recv().await {
                    match handler(req) {
                        Handled::Ready(resp) => {
                            // Room is guaranteed by the in-flight bound (see module docs); a
                            // closed channel means the peer is shutting down and wants no answer.
                            if router
                                .reply_tx
                                .send_to(peer, ReplyMsg { slot, resp })
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                        Handled::Later(fut) => {
                            let router = Rc::clone(&router);
                            glommio::spawn_local(async move {
                                let resp = fut.await;
                                let _ =
                                    router.reply_tx.send_to(peer, ReplyMsg { slot, resp }).await;
                            })
                            .detach();
                        }
                    }
                }
            })
            .detach();
        }
        for (peer, rx) in reply_rx.streams() {
            let router = Rc::clone(self);
            glommio::spawn_local(async move {
                while let Some(ReplyMsg { slot, resp }) = rx.recv().await {
                    let in_flight = &router.in_flight[peer];
                    in_flight.set(in_flight.get().saturating_sub(1));
                    router.complete(slot as usize, resp);
                }
            })
            .detach();
        }
    }

    fn complete(&self, slot: usize, resp: Resp) {
        let mut pending = self.pending.borrow_mut();
        let Some(entry) = pending.get_mut(slot) else {
            return;
        };
        match std::mem::replace(entry, Slot::Abandoned) {
            Slot::Waiting(waker) => {
                *entry = Slot::Done(resp);
                drop(pending);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            Slot::Abandoned => {
                pending.remove(slot);
            }
            Slot::Done(_) => unreachable!("a slot is answered once"),
        }
    }

    /// Closes this core's outgoing channels so peers' mesh tasks finish.
    pub fn close(&self) {
        self.req_tx.close();
        self.reply_tx.close();
    }
}

/// The reply to one [`Router::call`]. Dropping it before the reply arrives is fine: the slot is
/// freed when the reply comes.
pub struct ReplyFuture<Req: Send + 'static, Resp: Send + 'static> {
    router: Rc<Router<Req, Resp>>,
    slot: usize,
    done: bool,
}

impl<Req: Send + 'static, Resp: Send + 'static> Future for ReplyFuture<Req, Resp> {
    type Output = Resp;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Resp> {
        let slot = self.slot;
        let mut pending = self.router.pending.borrow_mut();
        let entry = pending
            .get_mut(slot)
            .expect("a pending slot lives until its future completes or is dropped");
        match entry {
            Slot::Waiting(waker) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Slot::Done(_) => {
                let Slot::Done(resp) = pending.remove(slot) else {
                    unreachable!()
                };
                drop(pending);
                self.done = true;
                Poll::Ready(resp)
            }
            Slot::Abandoned => unreachable!("only a dropped future abandons its slot"),
        }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Drop for ReplyFuture<Req, Resp> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut pending = self.router.pending.borrow_mut();
        if let Some(entry) = pending.get_mut(self.slot) {
            match entry {
                Slot::Done(_) => {
                    pending.remove(self.slot);
                }
                _ => *entry = Slot::Abandoned,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{allowed_cores, start, ExecutorOptions};

    /// Two executors on the allowed CPUs (the same CPU twice when only one is allowed): each
    /// calls the other many times and checks every reply matches its request.
    #[test]
    fn calls_cross_cores_and_shed_when_full() {
        let cpus = allowed_cores(None).unwrap();
        let cpus = vec![cpus[0], *cpus.last().unwrap()];
        let mesh: Mesh<u64, u64> = Mesh::new(2, 4);
        let finished = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let executors = start(&cpus, &ExecutorOptions::default(), move |_core| {
            let mesh = mesh.clone();
            let finished = finished.clone();
            async move {
                let router = Rc::new(mesh.join().await);
                let me = router.core() as u64;
                router.serve(move |x| {
                    if x % 2 == 0 {
                        Handled::Ready(x * 10 + me)
                    } else {
                        Handled::Later(Box::pin(async move {
                            glommio::yield_if_needed().await;
                            x * 10 + me
                        }))
                    }
                });
                let peer = 1 - router.core();
                let mut sum = 0u64;
                for i in 0..1000u64 {
                    let fut = router.call(peer, i).map_err(|(e, _)| e).unwrap();
                    let r = fut.await;
                    assert_eq!(r, i * 10 + peer as u64);
                    sum += r;
                }
                // Four calls fill the window; the fifth is shed at once.
                let mut futs = Vec::new();
                for i in 0..4 {
                    futs.push(router.call(peer, i).map_err(|(e, _)| e).unwrap());
                }
                assert_eq!(
                    router.call(peer, 99).map_err(|(e, _)| e).err(),
                    Some(CallError::Overloaded { core: peer })
                );
                // Dropping unanswered calls frees their slots when the replies land.
                drop(futs);
                while router.in_flight(peer) > 0 {
                    glommio::timer::sleep(std::time::Duration::from_micros(100)).await;
                }
                assert!(router.pending.borrow().is_empty());
                // Keep serving until the peer is done with us too.
                finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while finished.load(std::sync::atomic::Ordering::SeqCst) < 2 {
                    assert!(std::time::Instant::now() < deadline, "peer never finished");
                    glommio::timer::sleep(std::time::Duration::from_micros(200)).await;
                }
                sum
            }
        })
        .unwrap();
        for r in executors.join() {
            assert!(r.unwrap().unwrap() > 0);
        }
    }
}
