//! TLS to the nodes: a CA's PEM turned into the rustls configuration the client dials with
//! (ring as the crypto provider, ALPN `h2`), and the name a node's certificate must carry.
//! The configuration is made once, where the client is made; the name on each dial, on the
//! task that dials.

use crate::Error;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, ServerName},
    ClientConfig, RootCertStore,
};
use std::{path::Path, sync::Arc};
use tonic::Status;

/// The protocol the nodes serve: HTTP/2 only, so the client must offer it (a node that
/// negotiates ALPN refuses a client offering only something else).
const ALPN_H2: &[u8] = b"h2";

/// A rustls configuration that trusts the CA certificates in the PEM file at `path`; the
/// error names the path.
///
/// ```no_run
/// # fn demo() -> Result<(), cache_client::Error> {
/// let tls = cache_client::tls_config_from_ca_file("/etc/cache/ca.pem".as_ref())?;
/// let config = cache_client::Config::new(["node1:8443"]).tls_config(tls);
/// # Ok(()) }
/// ```
pub fn tls_config_from_ca_file(path: &Path) -> Result<Arc<ClientConfig>, Error> {
    let pem = std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read the CA file {}: {e}", path.display())))?;
    tls_config_from_ca_pem(&pem).map_err(|e| match e {
        Error::Config(why) => Error::Config(format!("the CA file {}: {why}", path.display())),
        other => other,
    })
}

/// A rustls configuration that trusts the CA certificates in `pem` (one or more CERTIFICATE
/// blocks; other blocks are skipped).
///
/// ```
/// let err = cache_client::tls_config_from_ca_pem(b"not a certificate").unwrap_err();
/// assert!(err.to_string().contains("no CERTIFICATE"));
/// ```
pub fn tls_config_from_ca_pem(pem: &[u8]) -> Result<Arc<ClientConfig>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| Error::Config(format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::Config("no CERTIFICATE block in it".into()));
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("no TLS version to offer: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(with_h2(Arc::new(config)))
}

/// `config`, offering `h2` by ALPN: as given when it already does (no copy), else a copy that
/// offers only `h2`.
pub(crate) fn with_h2(config: Arc<ClientConfig>) -> Arc<ClientConfig> {
    if config.alpn_protocols.iter().any(|p| p == ALPN_H2) {
        return config;
    }
    let mut own = (*config).clone();
    own.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(own)
}

/// The name a node's certificate must carry: the host part of its address, an IP address or a
/// DNS name (`[::1]:8080` names `::1`).
pub(crate) fn server_name(addr: &str) -> Result<ServerName<'static>, Status> {
    let host = match addr.rsplit_once(':') {
        Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_string()).map_err(|e| {
        Status::invalid_argument(format!("{addr}: {host:?} cannot name a TLS server ({e})"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_the_host_part() {
        assert_eq!(
            server_name("127.0.0.1:8080").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            server_name("[::1]:8080").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        assert_eq!(
            server_name("node-1.cache:8080").unwrap(),
            ServerName::try_from("node-1.cache").unwrap()
        );
        assert!(server_name("bad host:1").is_err());
    }

    #[test]
    fn a_config_offers_h2_once() {
        let bare =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth();
        let h2 = with_h2(Arc::new(bare));
        assert_eq!(h2.alpn_protocols, vec![b"h2".to_vec()]);
        // Already offering h2: the same configuration, not a copy.
        assert!(Arc::ptr_eq(&h2, &with_h2(Arc::clone(&h2))));
    }

    #[test]
    fn a_ca_file_that_cannot_be_read_is_named() {
        let err = tls_config_from_ca_file(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("/nonexistent/ca.pem")),
            "{err}"
        );
    }
}
