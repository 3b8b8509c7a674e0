//! The `http2` crate's client, with the node's gRPC layer on top, against servers nobody here
//! wrote (tonic's) and against ours: unary calls to a real node (Set, Get, NOT_FOUND, many
//! at once on one connection, a deadline) and to tonic's server (grpc.health.v1 from
//! tonic-health on tokio), from a glommio executor as the node's cores would make them.

use crate::support::{free_port, on_glommio, Node};
use distributed_cache::cluster::peer::unary::{unary, RECURRING};
use distributed_cache::pb::{
    get_response, set_request, GetRequest, GetResponse, SetRequest, SetResponse,
};
use http2::client::Client;
use std::time::Duration;
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse,
};

const T: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn unary_calls_reach_the_node_and_tonics_server() {
    let node = Node::start(&[]).await;
    let node_addr: std::net::SocketAddr = node.addr.parse().unwrap();

    let tonic_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve(tonic_addr),
    );
    // The tonic server listens once its accept loop runs.
    crate::support::wait_until(Duration::from_secs(10), "tonic to listen", || async move {
        tokio::net::TcpStream::connect(tonic_addr).await.is_ok()
    })
    .await;

    let answers = tokio::task::spawn_blocking(move || {
        on_glommio(move || async move {
            let authority = node_addr.to_string();
            let c = Client::connect(node_addr, &RECURRING)
                .await
                .expect("connects");
            let set = SetRequest {
                key: "k".into(),
                payload: Some(set_request::Payload::Value("v".into())),
                ..Default::default()
            };
            let stored: SetResponse =
                unary(&c, &authority, "/pb.CacheService/Set", &set, T, 1 << 20)
                    .await
                    .expect("Set");
            let get = |key: &str| GetRequest {
                key: key.into(),
                ..Default::default()
            };
            let got: GetResponse = unary(
                &c,
                &authority,
                "/pb.CacheService/Get",
                &get("k"),
                T,
                1 << 20,
            )
            .await
            .expect("Get");
            let missing = unary::<_, GetResponse>(
                &c,
                &authority,
                "/pb.CacheService/Get",
                &get("nope"),
                T,
                1 << 20,
            )
            .await
            .unwrap_err();
            // Many calls at once share the connection (one stream each).
            let k = get("k");
            let calls = (0..300).map(|_| {
                unary::<_, GetResponse>(&c, &authority, "/pb.CacheService/Get", &k, T, 1 << 20)
            });
            let ok = futures_util::future::join_all(calls)
                .await
                .iter()
                .filter(|r| r.is_ok())
                .count();
            let too_small =
                unary::<_, GetResponse>(&c, &authority, "/pb.CacheService/Get", &get("k"), T, 2)
                    .await
                    .unwrap_err();
            let still_open = !c.is_closed();

            let h = Client::connect(tonic_addr, &RECURRING)
                .await
                .expect("connects to tonic");
            let health: HealthCheckResponse = unary(
                &h,
                &tonic_addr.to_string(),
                "/grpc.health.v1.Health/Check",
                &HealthCheckRequest {
                    service: String::new(),
                },
                T,
                1 << 20,
            )
            .await
            .expect("tonic answers");
            let unknown = unary::<_, HealthCheckResponse>(
                &h,
                &tonic_addr.to_string(),
                "/grpc.health.v1.Health/Check",
                &HealthCheckRequest {
                    service: "no.such.Service".into(),
                },
                T,
                1 << 20,
            )
            .await
            .unwrap_err();
            (
                stored, got, missing, ok, too_small, still_open, health, unknown,
            )
        })
    })
    .await
    .unwrap();
    let (stored, got, missing, ok, too_small, still_open, health, unknown) = answers;
    assert!(stored.version.is_some());
    assert_eq!(got.payload, Some(get_response::Payload::Value("v".into())));
    assert_eq!(got.version, stored.version);
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("\"nope\""), "{missing:?}");
    assert_eq!(ok, 300);
    assert_eq!(too_small.code(), Code::ResourceExhausted);
    assert!(still_open, "a cancelled stream leaves the connection open");
    assert_eq!(health.status, ServingStatus::Serving as i32);
    assert_eq!(unknown.code(), Code::NotFound);
    server.abort();
}
