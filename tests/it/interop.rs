//! Interop with HTTP/2 and gRPC clients nobody here wrote, beside grpcurl (grpc-go, in
//! grpcurl.rs) and tonic (everywhere): gRPC's C core through Python grpcio, and nghttp2's
//! h2load. .ci/run installs both.

use crate::support::Node;
use std::process::Command;

async fn run(cmd: &'static str, args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(cmd)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("{cmd} runs (.ci/run installs it): {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn grpc_c_core_client_sets_gets_deletes_and_sees_the_right_statuses() {
    let node = Node::start(&[("CAPACITY", "10000")]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/h2/interop_grpcio.py");
    let (ok, out) = run("python3", vec![script.into(), node.addr.clone()]).await;
    assert!(ok && out.contains("grpcio interop: ok"), "{out}");
}

#[tokio::test]
async fn h2load_gets_every_answer() {
    let node = Node::start(&[("CAPACITY", "10000")]).await;
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("get.bin");
    // pb.GetRequest{key: "k"}, gRPC-framed: NOT_FOUND answers, a full gRPC exchange each.
    std::fs::write(&body, [0, 0, 0, 0, 3, 0x0a, 1, b'k']).unwrap();
    let (ok, out) = run(
        "h2load",
        vec![
            "-n".into(),
            "2000".into(),
            "-c".into(),
            "4".into(),
            "-m".into(),
            "16".into(),
            "-d".into(),
            body.display().to_string(),
            "-H".into(),
            "content-type: application/grpc".into(),
            "-H".into(),
            "te: trailers".into(),
            format!("{}/pb.CacheService/Get", node.url()),
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("2000 total") && out.contains("2000 succeeded, 0 failed, 0 errored"),
        "{out}"
    );
}
