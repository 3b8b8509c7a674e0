//! One HTTP/2 connection handed to tonic's generated clients as it is. tonic's `Channel` puts
//! a buffer task and a reconnect layer between a caller and its connection: a hop between
//! tasks on every request, which showed in the 1 x 1 latency (bench/RESULTS.md, the
//! shard-aware client). Here a request goes straight to hyper's connection; a connection that
//! ended is replaced by the router on the next request.

use crate::pb::{cache_service_client::CacheServiceClient, node_service_client::NodeServiceClient};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};
use tonic::{
    body::Body,
    codegen::http::{self, Uri},
    Status,
};

#[derive(Clone)]
pub struct Conn {
    send: SendRequest<Body>,
    /// `http://` and the node's ADDR: the authority of every request.
    origin: Uri,
}

impl Conn {
    /// HTTP/2 over `tcp` to the node named `addr`; its connection task runs on the current
    /// runtime until the connection ends.
    pub async fn handshake(tcp: tokio::net::TcpStream, addr: &str) -> Result<Conn, Status> {
        let origin: Uri = format!("http://{addr}")
            .parse()
            .map_err(|e| Status::invalid_argument(format!("bad node address {addr}: {e}")))?;
        tcp.set_nodelay(true)
            .map_err(|e| Status::unavailable(format!("cannot reach {addr}: {e}")))?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach {addr}: {e}")))?;
        tokio::spawn(conn);
        Ok(Conn { send, origin })
    }

    /// Whether the connection ended (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }

    pub fn cache(&self) -> CacheServiceClient<Conn> {
        CacheServiceClient::with_origin(self.clone(), self.origin.clone())
    }

    pub fn node(&self) -> NodeServiceClient<Conn> {
        NodeServiceClient::with_origin(self.clone(), self.origin.clone())
    }
}

impl tower::Service<http::Request<Body>> for Conn {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(self.send.send_request(req))
    }
}
