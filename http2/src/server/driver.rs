//! [`serve`]: the driver that runs a [`Connection`] and its [`App`] over one TCP connection,
//! as a task on the glommio executor (one thread) that accepted it, with the handshake and
//! idle timeouts, and output held back a little so that answers on their way leave together.

use super::{Bound, Connection};
use crate::{frame::code, Transport};
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

/// What a connection's owner does with it, for [`serve`].
pub trait App {
    /// What the owner keeps per stream.
    type State: Default;
    /// Reads the connection's events (`conn.next_event`) after bytes arrived.
    fn on_input(&mut self, conn: &mut Connection<Self::State>, now: Instant);
    /// Polls the work under way for the streams; true if anything happened.
    fn poll_work(&mut self, conn: &mut Connection<Self::State>, cx: &mut Context<'_>) -> bool;
    /// Whether answers are on their way from elsewhere: finished replies may wait a little
    /// for them, so that they leave in one send.
    fn answers_pending(&self) -> bool {
        false
    }
    /// Whether anything is under way that the idle timeout must wait for.
    fn working(&self) -> bool;
    /// Counts the bounds the client met (`counts` by `Bound::ALL`'s order).
    fn count(&mut self, _counts: &[u32; Bound::ALL.len()]) {}
    /// The reply bytes the connection now holds for its client (after every turn).
    fn holding(&mut self, _reply_bytes: usize) {}
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The peer closed it, it failed, or it was closed after an error's GOAWAY.
    Closed,
    /// We sent GOAWAY and every stream it let finish has: the caller closes without a reset.
    GoneAway,
}

/// How long finished replies may wait for answers still on their way, so that those come
/// in the same send (see `App::answers_pending`): on two cores, sending each core's answers
/// as they came doubled the sends, and the kernel's and client's work, per request (see
/// bench/RESULTS.md). A connection with one call in flight never waits.
const HOLD: Duration = Duration::from_micros(200);
/// Output beyond which nothing is held.
const HOLD_MAX: usize = 64 * 1024;
/// Turns of the connection's loop before it yields to the executor's other tasks.
const BUDGET: usize = 16;

/// A connection and its owner: what [`serve`] drives, usable without a socket.
pub struct Server<A: App> {
    pub conn: Connection<A::State>,
    pub app: A,
}

impl<A: App> Server<A> {
    /// `n` bytes arrived in `conn.room()`.
    pub fn received(&mut self, n: usize, now: Instant) {
        self.conn.received(n);
        self.app.on_input(&mut self.conn, now);
    }

    pub fn poll_work(&mut self, cx: &mut Context<'_>) -> bool {
        self.app.poll_work(&mut self.conn, cx)
    }

    /// Some once nothing is left to do but close, and how it ended.
    pub fn finished(&self) -> Option<Ended> {
        self.conn.finished().map(|graceful| {
            if graceful {
                Ended::GoneAway
            } else {
                Ended::Closed
            }
        })
    }

    fn report(&mut self) {
        if let Some(counts) = self.conn.take_bounds() {
            self.app.count(&counts);
        }
        self.app.holding(self.conn.reply_bytes());
    }
}

/// Serves one connection until the peer closes it, it fails, or `shutdown` resolves and the
/// streams under way have been answered.
pub async fn serve<A: App, T: Transport>(
    server: Server<A>,
    io: T,
    shutdown: Pin<Box<dyn Future<Output = ()>>>,
) -> Ended {
    let mut driver = Driver {
        timeout: glommio::timer::Timer::new(server.conn.limits.handshake_timeout),
        server,
        io,
        shutdown: Some(shutdown),
        hold: None,
        holding: false,
        last_activity: Instant::now(),
    };
    let ended = std::future::poll_fn(|cx| {
        let ended = driver.poll(cx);
        driver.server.report();
        ended
    })
    .await;
    driver.server.app.holding(0);
    ended
}

struct Driver<A: App, T> {
    server: Server<A>,
    io: T,
    shutdown: Option<Pin<Box<dyn Future<Output = ()>>>>,
    /// Bounds the wait of held output; made once, reset for each wait.
    hold: Option<glommio::timer::Timer>,
    holding: bool,
    /// The handshake timeout until the preface is in, then the idle check (re-armed when it
    /// fires rather than on every read: a reset per read would cost the request path).
    timeout: glommio::timer::Timer,
    /// The last time a byte was read or written.
    last_activity: Instant,
}

impl<A: App, T: Transport> Driver<A, T> {
    /// The handshake and idle timeouts: Some when the connection is to end.
    fn poll_timeout(&mut self, cx: &mut Context<'_>) -> Option<Ended> {
        if Pin::new(&mut self.timeout).poll(cx).is_pending() {
            return None;
        }
        let conn = &mut self.server.conn;
        let now = Instant::now();
        if !conn.preface {
            conn.count(Bound::HandshakeTimeout);
            return Some(Ended::Closed);
        }
        let idle_timeout = conn.limits.idle_timeout;
        let idle_for = now.saturating_duration_since(self.last_activity);
        if idle_for >= idle_timeout && !self.server.app.working() {
            conn.count(Bound::IdleTimeout);
            conn.close_with(code::NO_ERROR);
            return None;
        }
        let left = idle_timeout.saturating_sub(idle_for);
        self.timeout
            .reset(left.max(idle_timeout / 8).max(Duration::from_millis(10)));
        // The fresh deadline must be registered with this task's waker.
        let _ = Pin::new(&mut self.timeout).poll(cx);
        None
    }

    /// Whether to keep the output back for now: answers are on their way and HOLD has not
    /// passed since it was first kept back.
    fn hold_output(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.server.app.answers_pending()
            || self.server.conn.output().len() >= HOLD_MAX
            || self.server.conn.going_away.is_some()
        {
            self.holding = false;
            return false;
        }
        let timer = self
            .hold
            .get_or_insert_with(|| glommio::timer::Timer::new(HOLD));
        if !self.holding {
            self.holding = true;
            timer.reset(HOLD);
        }
        if Pin::new(timer).poll(cx).is_ready() {
            self.holding = false;
            return false;
        }
        true
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        if let Some(ended) = self.poll_timeout(cx) {
            return Poll::Ready(ended);
        }
        for _ in 0..BUDGET {
            let mut busy = false;
            if let Some(shutdown) = &mut self.shutdown {
                if shutdown.as_mut().poll(cx).is_ready() {
                    self.shutdown = None;
                    self.server.conn.go_away(code::NO_ERROR);
                    busy = true;
                }
            }
            let could_read = self.server.conn.wants_input();
            if could_read {
                match Pin::new(&mut self.io).poll_read(cx, self.server.conn.room()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ended::Closed),
                    Poll::Ready(Ok(n)) => {
                        let now = Instant::now();
                        self.last_activity = now;
                        self.server.received(n, now);
                        busy = true;
                    }
                    Poll::Pending => {}
                }
            }
            busy |= self.server.poll_work(cx);
            let hold = !self.server.conn.output().is_empty() && self.hold_output(cx);
            while !hold && !self.server.conn.output().is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, self.server.conn.output()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ended::Closed),
                    Poll::Ready(Ok(n)) => {
                        self.server.conn.sent(n);
                        self.last_activity = Instant::now();
                    }
                    Poll::Pending => break,
                }
            }
            if self.server.conn.output().is_empty() {
                // What a layer under us kept (TLS records) leaves now, or wakes us when it can.
                if let Poll::Ready(Err(_)) = Pin::new(&mut self.io).poll_flush(cx) {
                    return Poll::Ready(Ended::Closed);
                }
                if let Some(ended) = self.server.finished() {
                    return Poll::Ready(ended);
                }
            }
            // Output drained below the high-water mark: reading may go on.
            busy |= !could_read && self.server.conn.wants_input();
            if !busy {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
