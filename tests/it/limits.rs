//! Message size and rate limits: refused with RESOURCE_EXHAUSTED, nothing else disturbed.

use crate::support::Node;
use distributed_cache::pb::{get_response, set_request, GetRequest, SetRequest};
use tonic::Code;

fn set(key: &str, value: String) -> SetRequest {
    SetRequest {
        key: key.into(),
        payload: Some(set_request::Payload::Value(value)),
        ttl_seconds: None,
        ..Default::default()
    }
}

#[tokio::test]
async fn oversized_request_is_resource_exhausted_and_harmless() {
    let node = Node::start(&[("MAX_RECV_MSG_SIZE", "1024")]).await;
    let mut c = node.client().await.unwrap();
    c.set(set("small", "ok".into())).await.unwrap();
    let err = c.set(set("big", "x".repeat(4096))).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let got = c
        .get(GetRequest {
            key: "small".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.payload, Some(get_response::Payload::Value("ok".into())));
    assert_eq!(
        c.get(GetRequest {
            key: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn oversized_response_is_resource_exhausted() {
    let node = Node::start(&[("MAX_SEND_MSG_SIZE", "1024")]).await;
    let mut c = node.client().await.unwrap();
    c.set(set("big", "x".repeat(4096))).await.unwrap();
    let err = c
        .get(GetRequest {
            key: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
}

#[tokio::test]
async fn rate_limit_refuses_over_the_bucket() {
    let node = Node::start(&[("RATE_LIMIT", "5"), ("RATE_LIMIT_BURST", "5")]).await;
    let mut c = node.client().await.unwrap();
    let started = std::time::Instant::now();
    let (mut ok, mut limited) = (0u32, 0u32);
    for i in 0..40 {
        match c.set(set(&format!("k{i}"), "v".into())).await {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                limited += 1;
            }
        }
    }
    // The readiness probe took one token. Burst 5 plus 5/s for the time the loop took.
    let allowed = 5 + (started.elapsed().as_secs_f64() * 5.0).ceil() as u32;
    assert!(ok <= allowed, "{ok} succeeded, at most {allowed} allowed");
    assert!(limited >= 40 - allowed, "{limited} limited");
    assert!(ok >= 1);
}

#[tokio::test]
async fn no_rate_limit_by_default() {
    let node = Node::start(&[]).await;
    let mut c = node.client().await.unwrap();
    for i in 0..500 {
        c.set(set(&format!("k{i}"), "v".into())).await.unwrap();
    }
}
