//! TLS material: the PEM files named by TLS_* turned into rustls configurations, for the
//! node's server (what clients and peers connect to) and for its peer client (what it dials
//! other members with). Loaded at start on the main thread and again on SIGHUP; the cores
//! only ever see the finished `Arc`s.

use super::LoadError;
use rustls::{
    client::WebPkiServerVerifier,
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};
use std::{path::PathBuf, sync::Arc};

/// Where the node's TLS material lives (TLS_* variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// TLS_CERT_FILE: the node's chain, its own certificate first.
    pub cert: PathBuf,
    /// TLS_KEY_FILE: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// TLS_CLIENT_CA_FILE: when given, every connection must present a certificate it signed
    /// (clients and peers alike: members then authenticate each other with their own
    /// certificates).
    pub client_ca: Option<PathBuf>,
    /// TLS_CA_FILE: what other members' certificates are checked against when this node dials
    /// them (defaults to TLS_CLIENT_CA_FILE).
    pub peer_ca: Option<PathBuf>,
}

/// The configurations made from [`TlsFiles`].
#[derive(Clone)]
pub struct Tls {
    pub server: Arc<ServerConfig>,
    /// None without a CA to check peers with: dials to peers then fail with that reason.
    pub client: Option<Arc<ClientConfig>>,
}

/// ring's suites with AES-128-GCM ahead of AES-256-GCM (the server's order decides, see
/// `ignore_client_order`): as Go's crypto/tls orders them on CPUs with AES instructions. The
/// 256-bit key costs 40% more rounds per block for no margin a cache's traffic needs.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| !format!("{:?}", suite.suite()).contains("AES_128"));
    Arc::new(provider)
}

fn certs(var: &'static str, path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| LoadError::new(var, path, pem_reason(e)))?;
    if certs.is_empty() {
        return Err(LoadError::new(
            var,
            path,
            "no CERTIFICATE block in the file",
        ));
    }
    Ok(certs)
}

fn pem_reason(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => format!("cannot read: {e}"),
        other => format!("not PEM: {other:?}"),
    }
}

fn roots(var: &'static str, path: &PathBuf) -> Result<Arc<RootCertStore>, LoadError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(var, path)? {
        roots
            .add(cert)
            .map_err(|e| LoadError::new(var, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

impl Tls {
    /// Reads and checks every file: each failure names its variable and path.
    pub fn load(files: &TlsFiles) -> Result<Tls, LoadError> {
        let provider = provider();
        let chain = certs("TLS_CERT_FILE", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
            LoadError::new(
                "TLS_KEY_FILE",
                &files.key,
                pem_reason(e) + " (need a PRIVATE KEY)",
            )
        })?;
        let versions =
            |e: rustls::Error| LoadError::new("TLS_CERT_FILE", &files.cert, e.to_string());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(versions)?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    roots("TLS_CLIENT_CA_FILE", ca)?,
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| LoadError::new("TLS_CLIENT_CA_FILE", ca, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut server = builder
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| {
                LoadError::new(
                    "TLS_KEY_FILE",
                    &files.key,
                    format!(
                        "does not go with TLS_CERT_FILE {}: {e}",
                        files.cert.display()
                    ),
                )
            })?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        server.ignore_client_order = true;

        let client = match files.peer_ca.as_ref().or(files.client_ca.as_ref()) {
            None => None,
            Some(ca) => {
                let var = if files.peer_ca.is_some() {
                    "TLS_CA_FILE"
                } else {
                    "TLS_CLIENT_CA_FILE"
                };
                let verifier = WebPkiServerVerifier::builder_with_provider(
                    roots(var, ca)?,
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| LoadError::new(var, ca, e.to_string()))?;
                let builder = ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(versions)?
                    .with_webpki_verifier(verifier);
                // Members present their own certificate when members must (mutual TLS).
                let mut client = if files.client_ca.is_some() {
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| LoadError::new("TLS_KEY_FILE", &files.key, e.to_string()))?
                } else {
                    builder.with_no_client_auth()
                };
                client.alpn_protocols = vec![b"h2".to_vec()];
                Some(Arc::new(client))
            }
        };
        Ok(Tls {
            server: Arc::new(server),
            client,
        })
    }
}

/// The name a peer's certificate must carry: the host part of its address (an IP address or
/// a DNS name).
pub fn server_name(addr: &str) -> Result<rustls::pki_types::ServerName<'static>, String> {
    let host = match addr.rsplit_once(':') {
        Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} cannot name a TLS server: {e}"))
}

/// Why a TLS handshake failed, for the metrics: the few reasons an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client did not finish within HTTP2_HANDSHAKE_TIMEOUT.
    Timeout,
    /// It spoke something other than TLS (plaintext HTTP/2, say).
    NotTls,
    /// Its certificate was refused (unknown CA, expired, wrong name), or it refused ours.
    Certificate,
    /// Anything else: no common protocol version or cipher, a closed connection.
    Other,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 4] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::NotTls,
        HandshakeFailure::Certificate,
        HandshakeFailure::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::Certificate => "certificate",
            HandshakeFailure::Other => "other",
        }
    }

    /// The reason of an error the handshake returned (rustls' error travels inside the
    /// `io::Error`).
    pub fn of(e: &std::io::Error) -> HandshakeFailure {
        let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
            return HandshakeFailure::Other;
        };
        match tls {
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                HandshakeFailure::NotTls
            }
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::AlertReceived(
                rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::UnknownCA
                | rustls::AlertDescription::CertificateExpired
                | rustls::AlertDescription::CertificateUnknown
                | rustls::AlertDescription::CertificateRequired,
            ) => HandshakeFailure::Certificate,
            _ => HandshakeFailure::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_comes_first_in_each_version() {
        let names: Vec<String> = provider()
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert!(names[0].starts_with("TLS13_AES_128_GCM"), "{names:?}");
        assert!(
            names.iter().any(|n| n.starts_with("TLS13_AES_256_GCM")),
            "{names:?}"
        );
    }

    #[test]
    fn peer_names_are_the_host_part() {
        assert_eq!(
            format!("{:?}", server_name("127.0.0.1:8080").unwrap()),
            format!(
                "{:?}",
                rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap()
            )
        );
        assert!(server_name("node1:8080").is_ok());
        assert!(server_name("[::1]:8080").is_ok());
        assert!(server_name("bad host:1").is_err());
    }
}
