//! HTTP/2 (RFC 9113) and HPACK (RFC 7541), as a thread-per-core node needs them, and nothing
//! of what travels over them (no gRPC, no protobuf).
//!
//! - [`frame`]: frame and error-code numbers, frame headers, and the small frames written
//!   whole (RST_STREAM, WINDOW_UPDATE, SETTINGS, PING, GOAWAY).
//! - [`hpack`]: header compression both ways: a decoder with the static table and Huffman
//!   code, and an encoder that indexes only the fields its user names as repeated.
//! - [`client`]: a client connection as a state machine with no I/O of its own (bytes in,
//!   responses out; the caller returns flow-control credit as it consumes what arrived), and
//!   [`client::Client`], its driver on a glommio executor: many concurrent requests over one
//!   TCP connection, each awaited on its own.
//! - [`server`]: a server connection as a state machine with no I/O of its own (bytes in,
//!   requests and their bodies out as events, replies written as the owner gives them), its
//!   bounds against hostile clients, and [`server::serve`], its driver on a glommio executor.
//!
//! Each connection and its driver run on one thread, that of the executor it was made on.
//! The drivers run over any [`Transport`]: a glommio TCP stream, or TLS over one.

pub mod client;
pub mod frame;
pub mod hpack;
pub mod server;

/// What a driver reads and writes: a byte stream of the executor it runs on. A layer that
/// buffers what it was given (TLS records) must send it on `poll_flush`, which the drivers call
/// whenever they have written all they hold.
pub trait Transport: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + 'static {}

impl<T: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + 'static> Transport for T {}
