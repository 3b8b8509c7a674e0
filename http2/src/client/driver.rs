//! [`Client`]: the driver of a client [`Connection`], a task on the glommio executor (one
//! thread) the client was created on, and the futures of the requests multiplexed over it,
//! which share the connection with the task through a `RefCell` rather than a lock.

use super::{Connection, Error, Request, Response};
use crate::Transport;
use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
};

/// Bytes a client's connections moved, for its owner's metrics: shared by every connection
/// made with it.
#[derive(Default, Debug)]
pub struct Meter {
    pub sent: Cell<u64>,
    pub received: Cell<u64>,
}

/// What a [`Client`] and its driver task share (one executor, no lock).
struct Shared {
    conn: RefCell<Connection>,
    meter: Rc<Meter>,
    /// Bytes this connection received: a call that timed out on a connection that received
    /// nothing meanwhile tells its owner the connection, not the call, is stuck.
    received: Cell<u64>,
    /// The driver task, to wake when there is output.
    driver: RefCell<Option<Waker>>,
    /// Callers waiting on their stream.
    waiters: RefCell<HashMap<u32, Waker>>,
    /// Callers waiting for a free stream.
    waiting_for_room: RefCell<Vec<Waker>>,
}

impl Shared {
    fn wake_driver(&self) {
        if let Some(w) = self.driver.borrow_mut().take() {
            w.wake();
        }
    }
}

/// An HTTP/2 connection to one server, driven by a task on the current glommio executor:
/// every request is its own future, all multiplexed on one TCP connection. Cheap to clone;
/// the connection ends when the last clone is dropped (or the server ends it).
#[derive(Clone)]
pub struct Client {
    shared: Rc<Shared>,
}

impl Client {
    /// Connects to `addr` and starts the connection's driver; requests may follow at once.
    /// `recurring`: fields sent on every request, worth indexing (see [`Encoder::new`]).
    ///
    /// [`Encoder::new`]: crate::hpack::Encoder::new
    pub async fn connect(
        addr: std::net::SocketAddr,
        recurring: &'static [(&'static [u8], &'static [u8])],
    ) -> std::io::Result<Client> {
        Self::connect_metered(addr, recurring, Rc::default()).await
    }

    /// [`Client::connect`], counting the bytes into `meter`.
    pub async fn connect_metered(
        addr: std::net::SocketAddr,
        recurring: &'static [(&'static [u8], &'static [u8])],
        meter: Rc<Meter>,
    ) -> std::io::Result<Client> {
        let io = glommio::net::TcpStream::connect(addr).await?;
        io.set_nodelay(true)?;
        Ok(Client::over_metered(io, recurring, meter))
    }

    /// A client on a connection made elsewhere (from a chosen source port, say).
    pub fn over(
        io: impl Transport,
        recurring: &'static [(&'static [u8], &'static [u8])],
    ) -> Client {
        Self::over_metered(io, recurring, Rc::default())
    }

    /// [`Client::over`], counting the bytes into `meter`.
    pub fn over_metered(
        io: impl Transport,
        recurring: &'static [(&'static [u8], &'static [u8])],
        meter: Rc<Meter>,
    ) -> Client {
        let shared = Rc::new(Shared {
            conn: RefCell::new(Connection::new(recurring)),
            meter,
            received: Cell::new(0),
            driver: RefCell::new(None),
            waiters: RefCell::new(HashMap::new()),
            waiting_for_room: RefCell::new(Vec::new()),
        });
        glommio::spawn_local(drive(Rc::downgrade(&shared), io)).detach();
        Client { shared }
    }

    /// Whether the connection ended (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.shared.conn.borrow().failed().is_some()
    }

    /// Bytes received on this connection so far.
    pub fn received(&self) -> u64 {
        self.shared.received.get()
    }

    /// Streams open on the connection.
    pub fn open_streams(&self) -> usize {
        self.shared.conn.borrow().open_streams()
    }

    /// Sends a request with a whole `body` and returns the whole response, its body at most
    /// `max_body` bytes (beyond it, the stream is cancelled). Dropping the future cancels the
    /// stream (RST_STREAM CANCEL): wrap it in a timeout for a deadline.
    pub async fn request(
        &self,
        req: &Request<'_>,
        body: &[u8],
        max_body: usize,
    ) -> Result<Response, Error> {
        let id = std::future::poll_fn(|cx| {
            let started = self.shared.conn.borrow_mut().start(req, body, true);
            match started {
                Err(Error::Busy) => {
                    self.shared
                        .waiting_for_room
                        .borrow_mut()
                        .push(cx.waker().clone());
                    Poll::Pending
                }
                other => Poll::Ready(other),
            }
        })
        .await?;
        self.shared.wake_driver();
        let mut stream = Open {
            shared: &self.shared,
            id,
            body: Vec::new(),
        };
        std::future::poll_fn(|cx| stream.poll(cx, max_body)).await
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The driver notices when it runs that it was the last holder.
        self.shared.wake_driver();
    }
}

/// A request under way; cancels its stream if dropped before its end.
struct Open<'a> {
    shared: &'a Rc<Shared>,
    id: u32,
    body: Vec<u8>,
}

impl Open<'_> {
    fn poll(&mut self, cx: &mut Context<'_>, max_body: usize) -> Poll<Result<Response, Error>> {
        let mut conn = self.shared.conn.borrow_mut();
        conn.take_body(self.id, &mut self.body);
        if self.body.len() > max_body {
            conn.cancel(self.id);
            self.id = 0;
            drop(conn);
            self.shared.wake_driver();
            return Poll::Ready(Err(Error::TooLarge));
        }
        match conn.finish(self.id) {
            Some(done) => {
                self.id = 0;
                drop(conn);
                // Credit may be owed and a stream slot is free.
                self.shared.wake_driver();
                Poll::Ready(done.map(|mut r| {
                    r.body = std::mem::take(&mut self.body);
                    r
                }))
            }
            None => {
                if !conn.output().is_empty() {
                    self.shared.wake_driver();
                }
                self.shared
                    .waiters
                    .borrow_mut()
                    .insert(self.id, cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if self.id != 0 {
            self.shared.waiters.borrow_mut().remove(&self.id);
            self.shared.conn.borrow_mut().cancel(self.id);
            self.shared.wake_driver();
        }
    }
}

/// The driver: moves bytes between the socket and the connection, and wakes the callers
/// whose streams have news, until the connection ends or its last [`Client`] is dropped.
async fn drive(shared: std::rc::Weak<Shared>, mut io: impl Transport) {
    std::future::poll_fn(|cx| {
        let Some(shared) = shared.upgrade() else {
            return Poll::Ready(());
        };
        // Only the driver holds it, for this poll: every Client is gone.
        let abandoned = Rc::strong_count(&shared) == 1;
        let mut conn = shared.conn.borrow_mut();
        if abandoned && conn.failed().is_none() {
            conn.close("client dropped");
        }
        for _ in 0..16 {
            let mut busy = false;
            while !conn.output().is_empty() {
                match Pin::new(&mut io).poll_write(cx, conn.output()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        conn.io_closed("write failed");
                        break;
                    }
                    Poll::Ready(Ok(n)) => {
                        conn.sent(n);
                        let sent = &shared.meter.sent;
                        sent.set(sent.get() + n as u64);
                    }
                    Poll::Pending => break,
                }
            }
            // What a layer under us kept (TLS records) leaves now, or wakes us when it can.
            if conn.output().is_empty() {
                if let Poll::Ready(Err(_)) = Pin::new(&mut io).poll_flush(cx) {
                    conn.io_closed("write failed");
                }
            }
            if conn.failed().is_some() && conn.output().is_empty() {
                drop(conn);
                wake_all(&shared);
                return Poll::Ready(());
            }
            match Pin::new(&mut io).poll_read(cx, conn.room()) {
                Poll::Ready(Ok(0)) => conn.io_closed("closed by the server"),
                Poll::Ready(Err(e)) => conn.io_closed(&format!("read failed: {e}")),
                Poll::Ready(Ok(n)) => {
                    conn.received(n);
                    let received = &shared.meter.received;
                    received.set(received.get() + n as u64);
                    shared.received.set(shared.received.get() + n as u64);
                    busy = true;
                }
                Poll::Pending => {}
            }
            let changed: Vec<u32> = conn.changed().collect();
            let room = conn.has_room();
            let failed = conn.failed().is_some();
            drop(conn);
            {
                let mut waiters = shared.waiters.borrow_mut();
                for id in changed {
                    if let Some(w) = waiters.remove(&id) {
                        w.wake();
                    }
                }
            }
            if room {
                for w in shared.waiting_for_room.borrow_mut().drain(..) {
                    w.wake();
                }
            }
            conn = shared.conn.borrow_mut();
            busy |= failed || !conn.output().is_empty();
            if !busy {
                *shared.driver.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
    let _ = futures_lite::AsyncWriteExt::close(&mut io).await;
}

fn wake_all(shared: &Shared) {
    for (_, w) in shared.waiters.borrow_mut().drain() {
        w.wake();
    }
    for w in shared.waiting_for_room.borrow_mut().drain(..) {
        w.wake();
    }
}
