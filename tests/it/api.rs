//! The CacheService contract against a running node.

use crate::support::{wait_until, Node};
use distributed_cache::pb::{
    cache_service_client::CacheServiceClient, get_response, set_request, DeleteRequest, GetRequest,
    GetResponse, SetRequest,
};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

/// Get of `key` with the default consistency.
async fn get_key(
    c: &mut CacheServiceClient<Channel>,
    key: impl Into<String>,
) -> Result<tonic::Response<GetResponse>, tonic::Status> {
    c.get(GetRequest {
        key: key.into(),
        ..Default::default()
    })
    .await
}

fn set_str(key: &str, value: &str) -> SetRequest {
    SetRequest {
        key: key.into(),
        payload: Some(set_request::Payload::Value(value.into())),
        ttl_seconds: None,
        ..Default::default()
    }
}

#[tokio::test]
async fn set_get_delete_round_trip() {
    let node = Node::start(&[]).await;
    let mut c = node.client().await.unwrap();
    let v1 = c
        .set(set_str("foo", "bar"))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    let got = get_key(&mut c, "foo").await.unwrap().into_inner();
    assert_eq!(
        got.payload,
        Some(get_response::Payload::Value("bar".into()))
    );
    assert_eq!(
        got.version.unwrap(),
        v1,
        "Get returns the version Set issued"
    );

    let v2 = c
        .set(set_str("foo", "baz"))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert!(v2.hlc > v1.hlc, "versions increase: {v1:?} then {v2:?}");

    assert!(
        c.delete(DeleteRequest {
            key: "foo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deleted
    );
    let err = get_key(&mut c, "foo").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("foo"), "{}", err.message());
    assert!(
        !c.delete(DeleteRequest {
            key: "foo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deleted
    );
}

#[tokio::test]
async fn missing_key_and_empty_key() {
    let node = Node::start(&[]).await;
    let mut c = node.client().await.unwrap();
    let err = get_key(&mut c, "never-set").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("never-set"));
    for status in [
        c.get(GetRequest {
            key: "".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.set(set_str("", "x")).await.unwrap_err(),
        c.delete(DeleteRequest {
            key: "".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
}

#[tokio::test]
async fn binary_values_are_returned_byte_for_byte() {
    let node = Node::start(&[]).await;
    let mut c = node.client().await.unwrap();
    let value: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, 0x00, 0xc3]).collect();
    assert!(std::str::from_utf8(&value).is_err());
    c.set(SetRequest {
        key: "bin".into(),
        payload: Some(set_request::Payload::ValueBytes(value.clone())),
        ttl_seconds: None,
        ..Default::default()
    })
    .await
    .unwrap();
    let got = get_key(&mut c, "bin").await.unwrap().into_inner();
    assert_eq!(got.payload, Some(get_response::Payload::ValueBytes(value)));
    // Bytes that happen to be UTF-8 still come back in the form they were set in.
    c.set(SetRequest {
        key: "bin2".into(),
        payload: Some(set_request::Payload::ValueBytes(b"plain".to_vec())),
        ttl_seconds: None,
        ..Default::default()
    })
    .await
    .unwrap();
    let got = get_key(&mut c, "bin2").await.unwrap().into_inner();
    assert_eq!(
        got.payload,
        Some(get_response::Payload::ValueBytes(b"plain".to_vec()))
    );
}

/// Keys land on every core; each is set over one connection and read over others.
#[tokio::test]
async fn keys_on_every_core_are_served_from_any_connection() {
    let node = Node::start(&[("NUM_SHARDS", "8"), ("CAPACITY", "10000")]).await;
    let mut writer = node.client().await.unwrap();
    for i in 0..300 {
        writer
            .set(set_str(&format!("key-{i}"), &format!("value-{i}")))
            .await
            .unwrap();
    }
    for _ in 0..4 {
        let mut reader = node.client().await.unwrap();
        for i in 0..300 {
            let got = reader
                .get(GetRequest {
                    key: format!("key-{i}"),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                got.payload,
                Some(get_response::Payload::Value(format!("value-{i}")))
            );
        }
    }
}

#[tokio::test]
async fn ttl_expiry_per_request_and_default() {
    let node = Node::start(&[("TTL", "2")]).await;
    let mut c = node.client().await.unwrap();
    c.set(SetRequest {
        key: "short".into(),
        payload: Some(set_request::Payload::Value("x".into())),
        ttl_seconds: Some(1),
        ..Default::default()
    })
    .await
    .unwrap();
    c.set(set_str("default", "y")).await.unwrap();
    c.set(SetRequest {
        key: "forever".into(),
        payload: Some(set_request::Payload::Value("z".into())),
        ttl_seconds: Some(0),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        c.get(GetRequest {
            key: "short".into(),
            ..Default::default()
        })
        .await
        .is_ok(),
        "alive right after Set"
    );
    let started = std::time::Instant::now();
    wait_until(Duration::from_secs(5), "short to expire", || {
        let mut c = c.clone();
        async move {
            c.get(GetRequest {
                key: "short".into(),
                ..Default::default()
            })
            .await
            .err()
            .map(|e| e.code())
                == Some(Code::NotFound)
        }
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "expired early: {:?}",
        started.elapsed()
    );
    wait_until(
        Duration::from_secs(6),
        "the node's TTL to expire default",
        || {
            let mut c = c.clone();
            async move {
                c.get(GetRequest {
                    key: "default".into(),
                    ..Default::default()
                })
                .await
                .err()
                .map(|e| e.code())
                    == Some(Code::NotFound)
            }
        },
    )
    .await;
    assert!(
        c.get(GetRequest {
            key: "forever".into(),
            ..Default::default()
        })
        .await
        .is_ok(),
        "ttl_seconds=0 never expires"
    );
}

#[tokio::test]
async fn capacity_holds_across_more_shards_than_cores() {
    let node = Node::start(&[("NUM_SHARDS", "4"), ("CAPACITY", "100")]).await;
    let mut c = node.client().await.unwrap();
    for i in 0..1000 {
        c.set(set_str(&format!("k{i}"), "v")).await.unwrap();
    }
    let mut present = 0;
    for i in 0..1000 {
        match c
            .get(GetRequest {
                key: format!("k{i}"),
                ..Default::default()
            })
            .await
        {
            Ok(_) => present += 1,
            Err(e) => assert_eq!(e.code(), Code::NotFound),
        }
    }
    // CAPACITY is node-wide: the cores' and shards' shares follow where the keys land, so the
    // node is full to within 1% (a share moved in the last round may not be filled yet) and
    // never over.
    assert!((99..=100).contains(&present), "{present} of CAPACITY 100");
    assert!(
        c.get(GetRequest {
            key: "k999".into(),
            ..Default::default()
        })
        .await
        .is_ok(),
        "the newest key survives"
    );
}

#[tokio::test]
async fn keys_in_use_survive_a_stream_of_new_keys() {
    // 2 shards of 100 entries; 2,000 new keys push every one of them through eviction ten
    // times over, while ten keys are read between every ten Sets.
    let node = Node::start(&[("NUM_SHARDS", "2"), ("CAPACITY", "200")]).await;
    let mut c = node.client().await.unwrap();
    let get = |key: String| GetRequest {
        key,
        ..Default::default()
    };
    for h in 0..10 {
        c.set(set_str(&format!("hot{h}"), "v")).await.unwrap();
    }
    for i in 0..2000 {
        c.set(set_str(&format!("cold{i}"), "v")).await.unwrap();
        if i % 10 == 9 {
            for h in 0..10 {
                c.get(get(format!("hot{h}")))
                    .await
                    .unwrap_or_else(|e| panic!("hot{h} evicted after {i} new keys: {e}"));
            }
        }
    }
    let mut cold_left = 0;
    for i in 0..2000 {
        match c.get(get(format!("cold{i}"))).await {
            Ok(_) => cold_left += 1,
            Err(e) => assert_eq!(e.code(), Code::NotFound),
        }
    }
    assert!(
        cold_left <= 190,
        "capacity 200 holds the 10 hot keys: {cold_left} cold"
    );
}

/// The gRPC framing of one uncompressed message.
fn grpc_framed(msg: &[u8]) -> Vec<u8> {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(msg);
    framed
}

/// Sends one gRPC call with a raw HTTP/2 client, its body in the given DATA frames, so that
/// nothing on the client side shapes or checks what the server gets. Returns the grpc-status.
async fn raw_call(
    addr: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: Vec<Vec<u8>>,
) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::post(format!("http://{addr}/pb.CacheService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let frames = body.into_iter().map(|chunk| {
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(chunk)))
    });
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let resp = sender.send_request(req.body(body).unwrap()).await.unwrap();
    // An error answer is trailers-only: the status is in the headers.
    if let Some(status) = resp.headers().get("grpc-status") {
        return status.to_str().unwrap().to_string();
    }
    let collected = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();
    let trailers = collected
        .trailers()
        .expect("a unary answer ends with trailers");
    trailers["grpc-status"].to_str().unwrap().to_string()
}

async fn raw_set_with_timeout(addr: &str, key: &str, grpc_timeout: &str) -> String {
    use prost::Message;
    let framed = grpc_framed(&set_str(key, "v").encode_to_vec());
    raw_call(addr, "Set", &[("grpc-timeout", grpc_timeout)], vec![framed]).await
}

#[tokio::test]
async fn a_message_split_over_frames_is_served_and_bad_ones_refused() {
    use prost::Message;
    let node = Node::start(&[]).await;
    let framed = grpc_framed(&set_str("split", "over many frames").encode_to_vec());
    let bytes: Vec<Vec<u8>> = framed.iter().map(|&b| vec![b]).collect();
    assert_eq!(raw_call(&node.addr, "Set", &[], bytes).await, "0");
    let garbage = grpc_framed(&[0xff, 0xff, 0xff]);
    assert_eq!(
        raw_call(&node.addr, "Set", &[], vec![garbage]).await,
        "3",
        "INVALID_ARGUMENT"
    );
    assert_eq!(
        raw_call(&node.addr, "Set", &[], vec![]).await,
        "13",
        "INTERNAL"
    );
    let mut compressed = framed.clone();
    compressed[0] = 1;
    assert_eq!(
        raw_call(&node.addr, "Set", &[], vec![compressed]).await,
        "12",
        "UNIMPLEMENTED"
    );
    let gzip = [("grpc-encoding", "gzip")];
    assert_eq!(raw_call(&node.addr, "Set", &gzip, vec![framed]).await, "12");
    let mut c = node.client().await.unwrap();
    let got = get_key(&mut c, "split").await.unwrap().into_inner();
    assert_eq!(
        got.payload,
        Some(get_response::Payload::Value("over many frames".into()))
    );
}

#[tokio::test]
async fn expired_deadline_is_refused_and_not_executed() {
    let node = Node::start(&[]).await;
    // 1 ns: expired by the time the server looks at it.
    assert_eq!(
        raw_set_with_timeout(&node.addr, "late", "1n").await,
        "4",
        "DEADLINE_EXCEEDED"
    );
    let mut c = node.client().await.unwrap();
    let err = get_key(&mut c, "late").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "the late Set was not executed");
    // The same request with time to spare is executed.
    assert_eq!(raw_set_with_timeout(&node.addr, "timely", "5S").await, "0");
    assert!(get_key(&mut c, "timely").await.is_ok());
}
