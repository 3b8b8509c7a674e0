//! The HTTP/2 conformance and hardening suite (tests/h2/conformance.py): an independent HTTP/2
//! implementation (Python's hyperframe and hpack, from the `h2` package that .ci/run installs)
//! drives the real node with raw frames, section by section of RFC 9113 and RFC 7541, and
//! with the resource attacks the node must bound (Rapid Reset, unread replies, silent
//! connections, floods). Then the node's counters show each bound was hit.

use crate::metrics::{scrape, sum};
use crate::support::{free_port, Node};
use std::process::Command;

#[tokio::test]
async fn hostile_and_malformed_http2_gets_the_rfc_answers_and_bounded_resources() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let node = Node::start(&[
        ("CAPACITY", "100000"),
        ("HTTP2_HANDSHAKE_TIMEOUT", "1"),
        ("HTTP2_IDLE_TIMEOUT", "2"),
        ("MAX_CONNECTIONS", "64"),
        ("METRICS_ADDR", metrics.as_str()),
        ("RUST_LOG", "warn"),
    ])
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/h2/conformance.py");
    let out = tokio::task::spawn_blocking({
        let (addr, pid) = (node.addr.clone(), node.pid().to_string());
        move || {
            Command::new("python3")
                .args([script, &addr, &pid])
                .output()
                .expect("python3 runs (.ci/run installs the h2 package)")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "conformance suite failed:\n{stdout}\n{stderr}\nnode log:\n{}",
        node.log()
    );
    assert!(stdout.contains("0 failed"), "{stdout}");
    let m = scrape(&metrics);
    for event in [
        "reset_flood",
        "control_flood",
        "reply_refused",
        "stream_refused",
        "handshake_timeout",
        "idle_timeout",
        "protocol_error",
    ] {
        assert!(
            sum(&m, "cache_http2_events_total", &[("event", event)]) > 0.0,
            "{event} not counted:\n{m}"
        );
    }
    assert!(sum(&m, "cache_connections_shed_total", &[]) >= 6.0, "{m}");
}
