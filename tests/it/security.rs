//! Security of real nodes: TLS with certificates minted at test time (rcgen), checked by
//! tonic and grpcurl; refusals (wrong CA, expired client certificate, plaintext to a TLS
//! port); bearer tokens; the cluster secret on peer calls and gossip; reloads on SIGHUP
//! under load; and bad files at start.

use crate::{
    grpcurl::grpcurl,
    metrics::{scrape, sum},
    support::{
        free_port, run_expecting_failure, tls_channel, wait_until, with_token, Access, Node,
    },
};
use distributed_cache::pb::{
    cache_service_client::CacheServiceClient, peer_service_client::PeerServiceClient, set_request,
    EntryBatch, GetRequest, ReplicaWrite, SetRequest,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

/// Certificates written to a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    path: String,
}

impl Ca {
    fn pem(&self) -> String {
        self.issuer.pem()
    }
}

/// A leaf: (certificate PEM, key PEM, certificate path, key path).
struct Leaf {
    cert: String,
    key: String,
    cert_path: String,
    key_path: String,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path: PathBuf = self.dir.path().join(name);
        std::fs::write(&path, text).expect("writing a test file");
        path.to_string_lossy().into_owned()
    }

    fn ca(&self, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signed CA");
        let path = self.write(&format!("{name}.pem"), &issuer.pem());
        Ca { issuer, path }
    }

    /// A certificate for `names` (IP addresses or DNS names) signed by `ca`, good for
    /// servers and clients; `expired` makes one whose validity ended yesterday.
    fn leaf(&self, ca: &Ca, file: &str, names: &[&str], expired: bool) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, file);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time_now();
        params.not_before = now - time::Duration::days(30);
        params.not_after = if expired {
            now - time::Duration::days(1)
        } else {
            now + time::Duration::days(30)
        };
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &ca.issuer).expect("signed leaf");
        let (cert, key) = (cert.pem(), key.serialize_pem());
        Leaf {
            cert_path: self.write(&format!("{file}.pem"), &cert),
            key_path: self.write(&format!("{file}-key.pem"), &key),
            cert,
            key,
        }
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn set(key: &str, value: &str) -> SetRequest {
    SetRequest {
        key: key.into(),
        payload: Some(set_request::Payload::Value(value.into())),
        ..Default::default()
    }
}

fn get(key: &str) -> GetRequest {
    GetRequest {
        key: key.into(),
        ..Default::default()
    }
}

/// The whole chain of a transport error (tonic's Display says only "transport error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}

/// A Get of "k" on a new connection made with `access`: the error, connecting or calling.
async fn try_get(addr: &str, access: &Access) -> Result<(), String> {
    match tls_channel(addr, access).await {
        Ok(channel) => CacheServiceClient::new(channel)
            .get(get("k"))
            .await
            .map(|_| ())
            .map_err(|s| format!("{s:?}")),
        Err(e) => Err(chain(&e)),
    }
}

#[tokio::test]
async fn tls_serves_tonic_and_grpcurl_and_refuses_a_wrong_ca_and_plaintext() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let other = pki.ca("other-ca");
    let leaf = pki.leaf(&ca, "node", &["127.0.0.1", "localhost"], false);
    let plain_addr = format!("127.0.0.1:{}", free_port());
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let node = Node::start_secured(
        &[
            ("TLS_CERT_FILE", &leaf.cert_path),
            ("TLS_KEY_FILE", &leaf.key_path),
            ("PLAINTEXT_ADDR", &plain_addr),
            ("METRICS_ADDR", &metrics_addr),
        ],
        Access {
            ca_pem: Some(ca.pem()),
            ..Access::default()
        },
    )
    .await;

    let mut c = CacheServiceClient::new(node.channel().await.expect("TLS channel"));
    c.set(set("k", "v")).await.expect("Set over TLS");
    let got = c.get(get("k")).await.expect("Get over TLS").into_inner();
    assert!(format!("{got:?}").contains("\"v\""), "{got:?}");

    let (ok, out) = grpcurl(&[
        "-cacert",
        &ca.path,
        "-d",
        r#"{"key":"k"}"#,
        &node.addr,
        "pb.CacheService/Get",
    ]);
    assert!(ok && out.contains("\"value\": \"v\""), "{out}");

    // A client that trusts another CA refuses the node's certificate.
    let wrong = Access {
        ca_pem: Some(other.pem()),
        ..Access::default()
    };
    let refused = try_get(&node.addr, &wrong).await;
    let why = refused.expect_err("a certificate from an unknown CA must be refused");
    assert!(
        why.contains("UnknownIssuer") || why.contains("certificate"),
        "{why}"
    );

    // Plaintext to the TLS port: a clear failure, at once.
    let started = Instant::now();
    let plaintext = async {
        let channel = tls_channel(&node.addr, &Access::default()).await?;
        Ok::<_, tonic::transport::Error>(CacheServiceClient::new(channel).get(get("k")).await)
    };
    match tokio::time::timeout(Duration::from_secs(5), plaintext).await {
        Err(_) => panic!("plaintext to the TLS port hung"),
        Ok(Ok(Ok(answer))) => panic!("plaintext to the TLS port answered: {answer:?}"),
        Ok(Ok(Err(status))) => {
            assert!(format!("{status:?}").contains("TLS only"), "{status:?}")
        }
        Ok(Err(e)) => assert!(chain(&e).contains("TLS only"), "{}", chain(&e)),
    }
    assert!(started.elapsed() < Duration::from_secs(3));

    // PLAINTEXT_ADDR serves the same node without TLS.
    let mut plain = CacheServiceClient::new(
        tls_channel(&plain_addr, &Access::default())
            .await
            .expect("plaintext channel"),
    );
    plain.get(get("k")).await.expect("Get on PLAINTEXT_ADDR");

    let text = scrape(&metrics_addr);
    assert!(
        sum(&text, "cache_tls_handshakes_total", &[]) >= 2.0,
        "{text}"
    );
    assert!(
        sum(
            &text,
            "cache_tls_handshake_failures_total",
            &[("reason", "not_tls")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        sum(
            &text,
            "cache_tls_handshake_failures_total",
            &[("reason", "certificate")]
        ) >= 1.0,
        "{text}"
    );
}

#[tokio::test]
async fn client_certificates_are_required_and_an_expired_one_refused() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let leaf = pki.leaf(&ca, "node", &["127.0.0.1"], false);
    let client = pki.leaf(&ca, "client", &["client"], false);
    let expired = pki.leaf(&ca, "expired", &["client"], true);
    let access = |id: Option<&Leaf>| Access {
        ca_pem: Some(ca.pem()),
        identity: id.map(|l| (l.cert.clone(), l.key.clone())),
        token: None,
    };
    let node = Node::start_secured(
        &[
            ("TLS_CERT_FILE", &leaf.cert_path),
            ("TLS_KEY_FILE", &leaf.key_path),
            ("TLS_CLIENT_CA_FILE", &ca.path),
        ],
        access(Some(&client)),
    )
    .await;
    let mut c = CacheServiceClient::new(node.channel().await.expect("mutual TLS"));
    c.set(set("k", "v"))
        .await
        .expect("Set with a client certificate");

    for (what, id) in [("no", None), ("an expired", Some(&expired))] {
        let outcome = try_get(&node.addr, &access(id)).await;
        assert!(outcome.is_err(), "{what} client certificate was accepted");
    }
}

/// A node whose own certificate has expired still starts (rustls does not check the
/// certificate it serves), and every client refuses it, saying why.
#[tokio::test]
async fn a_node_serving_an_expired_certificate_is_refused() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let leaf = pki.leaf(&ca, "node", &["127.0.0.1"], true);
    let addr = format!("127.0.0.1:{}", free_port());
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _node = Reaped(
        std::process::Command::new(crate::support::BIN)
            .env("ADDR", &addr)
            .env("TLS_CERT_FILE", &leaf.cert_path)
            .env("TLS_KEY_FILE", &leaf.key_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawning distributed-cache"),
    );
    let access = Access {
        ca_pem: Some(ca.pem()),
        ..Access::default()
    };
    // Until the node listens the error is a refused connection; then it must name the expiry.
    wait_until(
        Duration::from_secs(20),
        "a refusal naming the expiry",
        || {
            let (addr, access) = (addr.clone(), access.clone());
            async move {
                try_get(&addr, &access)
                    .await
                    .err()
                    .is_some_and(|why| why.to_lowercase().contains("expired"))
            }
        },
    )
    .await;
}

#[tokio::test]
async fn tokens_decide_who_reads_and_who_writes() {
    let pki = Pki::new();
    let tokens = pki.write(
        "tokens",
        "# test tokens\nrw-0123456789abcdef read-write\nro-0123456789abcdef read-only\n",
    );
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let node = Node::start_secured(
        &[
            ("AUTH_TOKENS_FILE", &tokens),
            ("METRICS_ADDR", &metrics_addr),
        ],
        Access {
            token: Some("ro-0123456789abcdef".into()),
            ..Access::default()
        },
    )
    .await;
    let mut c = CacheServiceClient::new(node.channel().await.expect("channel"));
    let code = |r: Result<_, tonic::Status>| r.err().map(|s: tonic::Status| s.code());
    let unauthenticated = Some(tonic::Code::Unauthenticated);
    assert_eq!(code(c.get(get("k")).await), unauthenticated);
    let wrong = with_token(get("k"), "wrong-0123456789abcdef");
    assert_eq!(code(c.get(wrong).await), unauthenticated);
    let read_only_write = with_token(set("k", "v"), "ro-0123456789abcdef");
    assert_eq!(
        c.set(read_only_write).await.err().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
    c.set(with_token(set("k", "v"), "rw-0123456789abcdef"))
        .await
        .expect("a read-write token writes");
    c.get(with_token(get("k"), "ro-0123456789abcdef"))
        .await
        .expect("a read-only token reads");

    // Health stays open; reflection follows the data API's rule.
    let (ok, out) = grpcurl(&["-plaintext", &node.addr, "list"]);
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    let (ok, out) = grpcurl(&[
        "-plaintext",
        "-H",
        "authorization: Bearer ro-0123456789abcdef",
        &node.addr,
        "list",
    ]);
    assert!(ok && out.contains("pb.CacheService"), "{out}");
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(node.channel().await.expect("channel"));
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health needs no token");

    let text = scrape(&metrics_addr);
    assert!(
        sum(
            &text,
            "cache_requests_refused_total",
            &[("reason", "unauthenticated")]
        ) >= 3.0,
        "{text}"
    );
    assert_eq!(
        sum(
            &text,
            "cache_requests_refused_total",
            &[("reason", "permission_denied")]
        ),
        1.0,
        "{text}"
    );
}

fn refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Two members with TLS both ways (mutual), tokens and a cluster secret: writes replicate
/// (their peer calls carry the credential over TLS), while a client with a valid certificate
/// and a read-write token cannot call PeerService.Apply.
#[tokio::test]
async fn the_peer_plane_is_for_members_only() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let leaf = pki.leaf(&ca, "node", &["127.0.0.1"], false);
    let client = pki.leaf(&ca, "client", &["client"], false);
    let tokens = pki.write("tokens", "rw-0123456789abcdef read-write\n");
    let access = Access {
        ca_pem: Some(ca.pem()),
        identity: Some((client.cert.clone(), client.key.clone())),
        token: Some("rw-0123456789abcdef".into()),
    };
    let (a_addr, b_addr) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let common = |addr: &str, peer: &str| {
        vec![
            ("ADDR".to_string(), addr.to_string()),
            ("PEERS".to_string(), peer.to_string()),
            ("REPLICATION_FACTOR".to_string(), "2".to_string()),
            ("TLS_CERT_FILE".to_string(), leaf.cert_path.clone()),
            ("TLS_KEY_FILE".to_string(), leaf.key_path.clone()),
            ("TLS_CLIENT_CA_FILE".to_string(), ca.path.clone()),
            ("AUTH_TOKENS_FILE".to_string(), tokens.clone()),
            (
                "CLUSTER_SECRET".to_string(),
                "a secret only members know".to_string(),
            ),
        ]
    };
    let mut a_env = common(&a_addr, &b_addr);
    a_env.push(("METRICS_ADDR".into(), metrics_addr.clone()));
    let b_env = common(&b_addr, &a_addr);
    let a = Node::start_secured(&refs(&a_env), access.clone()).await;
    let b = Node::start_secured(&refs(&b_env), access.clone()).await;

    // Every key lives on both nodes at RF=2: a write through A is read back through B once
    // the two see each other.
    let mut on_a = CacheServiceClient::new(a.channel().await.expect("channel to A"));
    let mut on_b = CacheServiceClient::new(b.channel().await.expect("channel to B"));
    wait_until(
        Duration::from_secs(20),
        "a write through A read on B",
        || {
            let (mut on_a, mut on_b) = (on_a.clone(), on_b.clone());
            async move {
                on_a.set(with_token(set("shared", "yes"), "rw-0123456789abcdef"))
                    .await
                    .is_ok()
                    && on_b
                        .get(with_token(get("shared"), "rw-0123456789abcdef"))
                        .await
                        .is_ok()
            }
        },
    )
    .await;

    // A forged Apply: a client certificate and a read-write token, but no cluster secret.
    let mut peer = PeerServiceClient::new(a.channel().await.expect("channel"));
    let forged = EntryBatch {
        entries: vec![ReplicaWrite {
            key: b"forged".to_vec(),
            value: b"evil".to_vec(),
            hlc: u64::MAX >> 1,
            node: 1,
            ttl_ms: 0,
            flags: 0,
        }],
    };
    let refused = peer
        .apply(with_token(forged.clone(), "rw-0123456789abcdef"))
        .await
        .expect_err("a client cannot call PeerService");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let mut forged_req = with_token(forged, "rw-0123456789abcdef");
    forged_req
        .metadata_mut()
        .insert("x-cluster-auth", "00".repeat(32).parse().unwrap());
    let refused = peer
        .apply(forged_req)
        .await
        .expect_err("a made-up credential");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    for c in [&mut on_a, &mut on_b] {
        let got = c
            .get(with_token(get("forged"), "rw-0123456789abcdef"))
            .await
            .expect_err("nothing was stored");
        assert_eq!(got.code(), tonic::Code::NotFound);
    }
    let text = scrape(&metrics_addr);
    assert!(
        sum(
            &text,
            "cache_requests_refused_total",
            &[("reason", "not_member")]
        ) >= 2.0,
        "{text}"
    );
    assert!(
        sum(&text, "cache_tls_handshakes_total", &[]) >= 3.0,
        "{text}"
    );
    drop((a, b));
}

/// Gossip from processes without the secret (none, or another one) is dropped and counted,
/// and changes nothing in the member list.
#[tokio::test]
async fn gossip_without_a_valid_tag_is_dropped() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let a = Node::start(&[
        ("CLUSTER_SECRET", "the members' secret"),
        ("METRICS_ADDR", &metrics_addr),
    ])
    .await;
    let _unsigned = Node::start(&[("PEERS", &a.addr)]).await;
    let _other = Node::start(&[
        ("PEERS", &a.addr),
        ("CLUSTER_SECRET", "another cluster's secret"),
    ])
    .await;
    // A datagram of noise too.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(b"not gossip at all", &a.addr).unwrap();

    wait_until(Duration::from_secs(15), "unsigned gossip counted", || {
        let metrics_addr = metrics_addr.clone();
        async move {
            sum(
                &scrape(&metrics_addr),
                "cache_gossip_refused_total",
                &[("reason", "bad_tag")],
            ) >= 5.0
        }
    })
    .await;
    let members = crate::cluster::members(&a).await;
    assert_eq!(members.len(), 1, "only A itself: {members:?}");
}

/// Certificates and tokens change on SIGHUP while clients keep writing, on open
/// connections and new ones: no request fails; the new token and certificate work once
/// the node says so; a broken file later leaves what was in force.
#[tokio::test]
async fn certificates_and_tokens_reload_on_sighup_under_load() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let leaf = pki.leaf(&ca, "node", &["127.0.0.1"], false);
    let tokens = pki.write("tokens", "rw-0123456789abcdef read-write\n");
    let access = Access {
        ca_pem: Some(ca.pem()),
        identity: None,
        token: Some("rw-0123456789abcdef".into()),
    };
    let node = Node::start_secured(
        &[
            ("TLS_CERT_FILE", &leaf.cert_path),
            ("TLS_KEY_FILE", &leaf.key_path),
            ("AUTH_TOKENS_FILE", &tokens),
        ],
        access.clone(),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        let (addr, access) = (node.addr.clone(), access.clone());
        writers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                // A new connection every 50 requests: handshakes before and after the reload.
                let Ok(channel) = tls_channel(&addr, &access).await else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let mut c = CacheServiceClient::new(channel);
                for _ in 0..50 {
                    i += 1;
                    let req = with_token(set(&format!("w{w}-{i}"), "v"), "rw-0123456789abcdef");
                    match c.set(req).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        }));
    }
    wait_until(Duration::from_secs(10), "load under way", || {
        let done = done.clone();
        async move { done.load(Ordering::Relaxed) >= 200 }
    })
    .await;

    // A new certificate (one more name) and one more token, in place.
    let renewed = pki.leaf(&ca, "renewed", &["127.0.0.1", "renewed.test"], false);
    std::fs::copy(&renewed.cert_path, &leaf.cert_path).unwrap();
    std::fs::copy(&renewed.key_path, &leaf.key_path).unwrap();
    std::fs::write(
        &tokens,
        "rw-0123456789abcdef read-write\nnew-0123456789abcdef read-write\n",
    )
    .unwrap();
    node.signal(libc::SIGHUP);
    let host_named = |name: &'static str| {
        let (addr, ca) = (node.addr.clone(), ca.pem());
        async move {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name(name);
            let channel = tonic::transport::Channel::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await;
            match channel {
                Ok(ch) => CacheServiceClient::new(ch)
                    .set(with_token(set("renewed", "v"), "new-0123456789abcdef"))
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        }
    };
    wait_until(
        Duration::from_secs(10),
        "the renewed certificate and token",
        || host_named("renewed.test"),
    )
    .await;
    let before = done.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(10), "load after the reload", || {
        let done = done.clone();
        async move { done.load(Ordering::Relaxed) >= before + 200 }
    })
    .await;

    // A broken token file: refused, and what was in force stays.
    std::fs::write(&tokens, "short read-write\n").unwrap();
    node.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(10), "the refused reload logged", || {
        let log = node.log();
        async move { log.contains("reload refused") }
    })
    .await;
    assert!(
        host_named("renewed.test").await,
        "the tokens in force changed"
    );

    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed across the reloads"
    );
    assert!(done.load(Ordering::Relaxed) >= 400);
}

#[test]
fn bad_security_files_stop_the_node_with_one_line() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let a = pki.leaf(&ca, "a", &["127.0.0.1"], false);
    let b = pki.leaf(&ca, "b", &["127.0.0.1"], false);
    let missing = pki
        .dir
        .path()
        .join("missing.pem")
        .to_string_lossy()
        .into_owned();
    let bad_tokens = pki.write("tokens", "rw-0123456789abcdef admin\n");
    // (variables, the variable the error names, what else it names)
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![("TLS_CERT_FILE", &missing), ("TLS_KEY_FILE", &a.key_path)],
            "TLS_CERT_FILE",
            &missing,
        ),
        (
            vec![("TLS_CERT_FILE", &a.cert_path), ("TLS_KEY_FILE", &missing)],
            "TLS_KEY_FILE",
            &missing,
        ),
        (
            vec![
                ("TLS_CERT_FILE", &a.cert_path),
                ("TLS_KEY_FILE", &b.key_path),
            ],
            "TLS_KEY_FILE",
            &b.key_path,
        ),
        (
            vec![
                ("TLS_CERT_FILE", &a.cert_path),
                ("TLS_KEY_FILE", &a.key_path),
                ("TLS_CLIENT_CA_FILE", &missing),
            ],
            "TLS_CLIENT_CA_FILE",
            &missing,
        ),
        (
            vec![("AUTH_TOKENS_FILE", &missing)],
            "AUTH_TOKENS_FILE",
            &missing,
        ),
        (
            vec![("AUTH_TOKENS_FILE", &bad_tokens)],
            "AUTH_TOKENS_FILE",
            &bad_tokens,
        ),
        (
            vec![("CLUSTER_SECRET", "short")],
            "CLUSTER_SECRET",
            "16 bytes",
        ),
        (
            vec![("TLS_CLIENT_CA_FILE", &ca.path)],
            "TLS_CLIENT_CA_FILE",
            "TLS_CERT_FILE",
        ),
    ];
    for (env, var, named) in cases {
        let (status, stderr) = run_expecting_failure(&env);
        assert_eq!(status.code(), Some(2), "{env:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{env:?}: {stderr}");
        assert!(
            stderr.contains(var) && stderr.contains(named),
            "{env:?}: {stderr}"
        );
        assert!(!stderr.contains("short\""), "a secret was echoed: {stderr}");
    }
}
