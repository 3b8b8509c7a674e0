//! `cache-bench certs`: a throwaway CA and the certificates it signs, for TLS nodes in tests,
//! the Docker compose cluster and benchmarks. Runs once on the main thread; nothing here is
//! meant for production (the CA's key is dropped, and nothing expires before 4096).

use anyhow::{anyhow, Context as _};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// Writes ca.pem, node.pem, node-key.pem, client.pem and client-key.pem into `out`; returns
/// their paths in that order. `names`: what the node certificate names (IP addresses, else DNS
/// names).
pub fn write(out: &Path, names: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let names = check_names(names)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;

    let ca_key = KeyPair::generate().context("generating the CA's key")?;
    let mut ca_params = CertificateParams::default();
    // A name of its own: a certificate checked against the CA of another run then fails as
    // signed by an unknown issuer, not with a bad signature from a namesake.
    let made = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("cache-bench test CA {made:x}"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("signing the CA certificate")?;
    let issuer = Issuer::new(ca_params, ca_key);

    // One certificate for every node: each serves with it and, for mutual TLS, presents it
    // when it dials a peer, hence clientAuth as well as serverAuth.
    let node_key = KeyPair::generate().context("generating the node key")?;
    // `new` reads each name as an IP address when it parses as one, else as a DNS name.
    let mut node_params =
        CertificateParams::new(names.clone()).context("the names of the node certificate")?;
    node_params.distinguished_name = rcgen::DistinguishedName::new();
    node_params
        .distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    node_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    node_params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    node_params.use_authority_key_identifier_extension = true;
    let node_cert = node_params
        .signed_by(&node_key, &issuer)
        .context("signing the node certificate")?;

    let client_key = KeyPair::generate().context("generating the client key")?;
    let mut client_params = CertificateParams::default();
    client_params.distinguished_name = rcgen::DistinguishedName::new();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "client");
    client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    client_params.use_authority_key_identifier_extension = true;
    let client_cert = client_params
        .signed_by(&client_key, &issuer)
        .context("signing the client certificate")?;

    // The keys get the same mode as the certificates (the umask's): the node in the compose
    // cluster runs as its own user (uid 10001, see the Dockerfile) and must read a key
    // written by whoever ran this. Test material only.
    let files = [
        ("ca.pem", ca_cert.pem()),
        ("node.pem", node_cert.pem()),
        ("node-key.pem", node_key.serialize_pem()),
        ("client.pem", client_cert.pem()),
        ("client-key.pem", client_key.serialize_pem()),
    ];
    let mut written = Vec::with_capacity(files.len());
    for (name, pem) in files {
        let path = out.join(name);
        std::fs::write(&path, pem.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Each name must be one a TLS client can check a certificate against: an IP address or a
/// DNS name (rcgen would take "my host" and no client would ever match it).
fn check_names(names: &[String]) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = names
        .iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return Err(anyhow!(
            "--names: give at least one name (e.g. 127.0.0.1,localhost)"
        ));
    }
    for name in &names {
        rustls::pki_types::ServerName::try_from(name.as_str())
            .map_err(|_| anyhow!("--names: {name:?} is neither an IP address nor a DNS name"))?;
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_ip_addresses_or_dns_names() {
        assert!(check_names(&["127.0.0.1".into(), "node-1.cache".into(), "::1".into()]).is_ok());
        assert!(check_names(&["my host".into()]).is_err());
        assert!(check_names(&[" ".into()]).is_err());
    }

    #[test]
    fn a_client_trusting_the_ca_accepts_the_node_certificate() {
        use rustls::{
            client::{danger::ServerCertVerifier, WebPkiServerVerifier},
            pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
            RootCertStore,
        };
        let dir = std::env::temp_dir().join(format!("cache-bench-certs-{}", std::process::id()));
        let paths = write(&dir, &["127.0.0.1".into(), "localhost".into()]).unwrap();
        assert_eq!(paths.len(), 5);
        let ca = CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap();
        let node = CertificateDer::from_pem_file(dir.join("node.pem")).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
        for name in ["127.0.0.1", "localhost"] {
            verifier
                .verify_server_cert(
                    &node,
                    &[],
                    &ServerName::try_from(name).unwrap(),
                    &[],
                    UnixTime::now(),
                )
                .unwrap();
        }
        assert!(verifier
            .verify_server_cert(
                &node,
                &[],
                &ServerName::try_from("other.host").unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
