//! The two adapters that let hyper's HTTP/2 client (the node's connections to its peers) run
//! on a glommio core without tokio: socket I/O (glommio's futures-io stream -> hyper's
//! `rt::Read`/`rt::Write`) and task spawning (hyper's `rt::Executor` -> `glommio::spawn_local`,
//! so nothing needs to be `Send`). The node's server side is `http2`, which needs neither.

use futures_lite::{AsyncBufRead, AsyncWrite};
use glommio::net::{Preallocated, TcpStream};
use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

/// Receive buffer per connection. hyper asks to read into uninitialised memory, which the
/// futures-io traits cannot express; reading into this initialised buffer and copying what
/// arrived costs a memcpy of the bytes received, where zeroing hyper's buffer on every read
/// would cost its whole size.
pub const RECV_BUFFER_BYTES: usize = 16 * 1024;

pub struct GlommioIo(TcpStream<Preallocated>);

impl GlommioIo {
    pub fn new(stream: TcpStream) -> Self {
        Self(stream.buffered_with(Preallocated::new(RECV_BUFFER_BYTES)))
    }
}

impl hyper::rt::Read for GlommioIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let n = {
            let data = ready!(Pin::new(&mut self.0).poll_fill_buf(cx))?;
            let n = data.len().min(buf.remaining());
            buf.put_slice(&data[..n]);
            n
        };
        Pin::new(&mut self.0).consume(n);
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for GlommioIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

/// Spawns hyper's per-stream tasks on the current glommio executor.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
    F::Output: 'static,
{
    fn execute(&self, fut: F) {
        glommio::spawn_local(fut).detach();
    }
}
