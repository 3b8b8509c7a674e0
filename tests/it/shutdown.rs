//! SIGTERM under load: in-flight requests complete, the node exits 0.

use crate::support::Node;
use distributed_cache::pb::{set_request, GetRequest, SetRequest};
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_exits_zero() {
    let mut node = Node::start(&[("CAPACITY", "100000")]).await;
    let ok = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = node.client().await.unwrap();
        let ok = Arc::clone(&ok);
        writers.push(tokio::spawn(async move {
            // Bounded: at most 100k requests per writer; stops at the first refusal.
            for i in 0..100_000u64 {
                let r = c
                    .set(SetRequest {
                        key: format!("w{w}-{i}"),
                        payload: Some(set_request::Payload::Value("v".into())),
                        ttl_seconds: None,
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => return Some(status),
                }
            }
            None
        }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ok.load(Ordering::Relaxed) < 2000 {
        assert!(std::time::Instant::now() < deadline, "load never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.signal(libc::SIGTERM);
    let status = node.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "log: {}", node.log());
    for w in writers {
        let ended = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("writer ended")
            .unwrap();
        // Once the node says GOAWAY, new requests are refused: UNAVAILABLE; or, for one the
        // client sent as the connection closed, a transport-level cancel; or, for a stream
        // the client opened past the GOAWAY's last stream id, h2's GoAway(NO_ERROR) error,
        // which tonic reports as INTERNAL although the server never saw the request (gRPC
        // calls such a request safe to retry); or a connection reset (seen as a reset, or as a
        // broken pipe when the client writes first), which the kernel sends only for bytes the
        // node never read: it closes a connection once it has answered every stream it
        // accepted and its lingering read is over, and a connection the client re-opened into
        // a listener's backlog just before that listener closed is reset unread (rare: about
        // 1 run in 30 under load). A request the server accepted is answered, never cut off.
        if let Some(status) = ended {
            let text = format!("{status:?}");
            let refused = status.code() == Code::Unavailable
                || (status.code() == Code::Cancelled && text.contains("connection closed"))
                || (status.code() == Code::Internal
                    && text.contains("GoAway")
                    && text.contains("NO_ERROR")
                    && text.contains("Remote"))
                || (status.code() == Code::Unknown
                    && (text.contains("ConnectionReset") || text.contains("BrokenPipe")));
            assert!(refused, "{status:?}");
        }
    }
    assert!(node.log().contains("stopped"), "{}", node.log());
}

#[tokio::test]
async fn sigint_exits_zero_and_health_is_served_before() {
    let mut node = Node::start(&[]).await;
    let mut c = node.client().await.unwrap();
    assert_eq!(
        c.get(GetRequest {
            key: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    node.signal(libc::SIGINT);
    let status = node.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
}
