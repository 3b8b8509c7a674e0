//! One HTTP/2 connection handed to tonic's generated clients as it is, and the [`Dialer`] that
//! makes them (TLS when the client has it, and the bearer token every request carries).
//! tonic's `Channel` puts a buffer task and a reconnect layer between a caller and its
//! connection: a hop between tasks on every request, which showed in the 1 x 1 latency
//! (bench/RESULTS.md, the shard-aware client). Here a request goes straight to hyper's
//! connection; a connection that ended is replaced by the router on the next request.
//! Connections are made on the caller's task; each one's I/O then runs on a task of its own
//! on the same runtime.

use crate::pb::{cache_service_client::CacheServiceClient, node_service_client::NodeServiceClient};
use crate::{tls, Config, Error};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};
use tonic::{
    body::Body,
    codegen::http::{self, header::AUTHORIZATION, HeaderValue, Uri},
    Status,
};

/// How the client opens connections to nodes: in plaintext or TLS, and with which token.
/// Made once per client; shared by every dial.
pub struct Dialer {
    tls: Option<tokio_rustls::TlsConnector>,
    /// `Bearer TOKEN`, made once: each request clones it, which counts a reference rather
    /// than copying the token.
    authorization: Option<HeaderValue>,
}

impl Dialer {
    /// Reads what `config` names (a CA file); fails with [`Error::Config`].
    pub fn new(config: &Config) -> Result<Dialer, Error> {
        let authorization = match &config.token {
            None => None,
            Some(token) => {
                let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    Error::Config(
                        "the token cannot be sent in a header (it has a control character, \
                         such as a line break)"
                            .into(),
                    )
                })?;
                // Kept out of HPACK's dynamic table and of Debug output.
                value.set_sensitive(true);
                Some(value)
            }
        };
        let tls = match &config.tls {
            None => None,
            Some(crate::Tls::CaFile(path)) => Some(tls::tls_config_from_ca_file(path)?),
            Some(crate::Tls::Config(c)) => Some(tls::with_h2(std::sync::Arc::clone(c))),
        };
        Ok(Dialer {
            tls: tls.map(tokio_rustls::TlsConnector::from),
            authorization,
        })
    }

    /// HTTP/2 over `tcp` (in TLS when the client has it) to the node named `addr`: the
    /// authority of its requests, and the name its certificate must carry. Its connection
    /// task runs on the current runtime until the connection ends.
    pub async fn handshake(&self, tcp: tokio::net::TcpStream, addr: &str) -> Result<Conn, Status> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let origin: Uri = format!("{scheme}://{addr}")
            .parse()
            .map_err(|e| Status::invalid_argument(format!("bad node address {addr}: {e}")))?;
        tcp.set_nodelay(true)
            .map_err(|e| Status::unavailable(format!("cannot reach {addr}: {e}")))?;
        let send = match &self.tls {
            None => http2(tcp, addr).await?,
            Some(tls) => {
                let stream = tls
                    .connect(tls::server_name(addr)?, tcp)
                    .await
                    .map_err(|e| {
                        let hint = if not_tls(&e) {
                            " (does the node serve TLS?)"
                        } else {
                            ""
                        };
                        Status::unavailable(format!(
                            "cannot reach {addr}: TLS handshake: {e}{hint}"
                        ))
                    })?;
                http2(stream, addr).await?
            }
        };
        Ok(Conn {
            send,
            origin,
            authorization: self.authorization.clone(),
        })
    }
}

/// The handshake failed on the first bytes the node sent: not a TLS record (a plaintext node
/// answers a ClientHello with an HTTP/2 frame).
pub(crate) fn not_tls(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType
        ))
    )
}

/// The HTTP/2 handshake over `io`; the connection's task is spawned on the current runtime.
async fn http2<T>(io: T, addr: &str) -> Result<SendRequest<Body>, Status>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach {addr}: {e}")))?;
    tokio::spawn(conn);
    Ok(send)
}

#[derive(Clone)]
pub struct Conn {
    send: SendRequest<Body>,
    /// `http://` (or `https://`) and the node's ADDR: the authority of every request.
    origin: Uri,
    /// Set on every request when the client has a token.
    authorization: Option<HeaderValue>,
}

impl Conn {
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

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        if let Some(value) = &self.authorization {
            req.headers_mut().insert(AUTHORIZATION, value.clone());
        }
        Box::pin(self.send.send_request(req))
    }
}
