//! /metrics of a real node: exact counts after known traffic, accepted by promtool, and every
//! metric the Grafana dashboard queries is present.

use crate::support::{free_port, Node};
use distributed_cache::pb::{set_request, DeleteRequest, GetRequest, SetRequest};
use std::{
    io::{Read, Write},
    process::{Command, Stdio},
};

pub fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint reachable");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

/// Sum of the samples of `name` whose labels include every `want` pair.
pub fn sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let ok = want
                .iter()
                .all(|(k, v)| labels.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

async fn node_with_metrics() -> (Node, String) {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let node = Node::start(&[("METRICS_ADDR", &metrics_addr)]).await;
    (node, metrics_addr)
}

#[tokio::test]
async fn counters_match_the_traffic_exactly() {
    let (node, metrics_addr) = node_with_metrics().await;
    let mut c = node.client().await.unwrap();
    for i in 0..10 {
        c.set(SetRequest {
            key: format!("m{i}"),
            payload: Some(set_request::Payload::Value("v".into())),
            ttl_seconds: None,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for i in 0..7 {
        c.get(GetRequest {
            key: format!("m{i}"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for i in 0..3 {
        c.get(GetRequest {
            key: format!("absent{i}"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    }
    for i in 0..2 {
        c.delete(DeleteRequest {
            key: format!("m{i}"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let text = scrape(&metrics_addr);
    // The readiness probe of the test support is one more Get of a missing key.
    assert_eq!(
        sum(
            &text,
            "cache_requests_total",
            &[("command", "set"), ("code", "OK")]
        ),
        10.0,
        "{text}"
    );
    assert_eq!(
        sum(
            &text,
            "cache_requests_total",
            &[("command", "get"), ("code", "OK")]
        ),
        7.0
    );
    assert_eq!(
        sum(
            &text,
            "cache_requests_total",
            &[("command", "get"), ("code", "NOT_FOUND")]
        ),
        4.0
    );
    assert_eq!(
        sum(
            &text,
            "cache_requests_total",
            &[("command", "delete"), ("code", "OK")]
        ),
        2.0
    );
    assert_eq!(sum(&text, "cache_get_hits_total", &[]), 7.0);
    assert_eq!(sum(&text, "cache_get_misses_total", &[]), 4.0);
    assert_eq!(sum(&text, "cache_entries", &[]), 8.0);
    assert_eq!(
        sum(
            &text,
            "cache_request_duration_seconds_count",
            &[("command", "set")]
        ),
        10.0
    );
    assert_eq!(
        sum(
            &text,
            "cache_request_duration_seconds_bucket",
            &[("command", "get"), ("le", "+Inf")]
        ),
        11.0
    );
    assert!(sum(&text, "process_resident_memory_bytes", &[]) > 1e6);
    // Both cores report, each with its own label.
    assert!(
        text.contains("cache_entries{core=\"0\"}") && text.contains("cache_entries{core=\"1\"}"),
        "{text}"
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (.ci/run installs Debian's prometheus package)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejected the scrape: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn every_dashboard_metric_exists_in_a_scrape() {
    let (node, metrics_addr) = node_with_metrics().await;
    let mut c = node.client().await.unwrap();
    c.set(SetRequest {
        key: "k".into(),
        payload: Some(set_request::Payload::Value("v".into())),
        ttl_seconds: None,
        ..Default::default()
    })
    .await
    .unwrap();
    let text = scrape(&metrics_addr);
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/dashboard.json"
        ))
        .unwrap(),
    )
    .expect("dashboard.json parses");
    let mut names = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if token.starts_with("cache_") || token.starts_with("process_") {
                    names.push(token.to_string());
                }
            }
        }
    }
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        // A sample, or (for a family with no samples yet on a lone node, such as replica
        // calls) its TYPE line.
        let present = text.lines().any(|l| {
            (!l.starts_with('#')
                && (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))))
                || l.starts_with(&format!("# TYPE {name} "))
        });
        assert!(
            present,
            "dashboard queries {name}, absent from the scrape:\n{text}"
        );
    }
}
