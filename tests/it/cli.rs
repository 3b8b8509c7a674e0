//! The operator subcommands against a real node, and against a closed port.

use crate::support::{free_port, Node, BIN};
use std::process::Command;

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("running the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn subcommands_against_a_node() {
    let node = Node::start(&[]).await;
    let a = node.addr.as_str();
    let (code, out, err) = cli(&["set", "greeting", "hello world", "--addr", a]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("OK version"), "{out}");
    let (code, out, _) = cli(&["get", "greeting", "--addr", a]);
    assert_eq!((code, out.as_str()), (0, "hello world\n"));
    let (code, out, _) = cli(&["get", "greeting", "--consistency", "one", "--addr", a]);
    assert_eq!((code, out.as_str()), (0, "hello world\n"));
    let (code, _, err) = cli(&["get", "greeting", "--consistency", "most", "--addr", a]);
    assert_eq!(code, 2, "{err}");
    let (code, out, _) = cli(&["set", "short", "x", "--ttl", "100", "--addr", a]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = cli(&["health", "--addr", a]);
    assert_eq!((code, out.as_str()), (0, "SERVING\n"));
    let (code, out, _) = cli(&["stats", "--addr", a]);
    assert_eq!(code, 0);
    assert!(
        out.contains("core") && out.contains("entries") && out.lines().count() >= 4,
        "{out}"
    );
    let (code, out, _) = cli(&["members", "--addr", a]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("{a} (self)")) && out.contains("ALIVE"),
        "{out}"
    );
    let (code, out, _) = cli(&["del", "greeting", "--addr", a]);
    assert_eq!((code, out.as_str()), (0, "deleted\n"));
    let (code, _, err) = cli(&["get", "greeting", "--addr", a]);
    assert_eq!(code, 1);
    assert!(
        err.contains("NotFound") && err.contains("greeting"),
        "{err}"
    );
    for sub in ["health", "get", "set", "del", "stats", "members"] {
        let (code, out, _) = cli(&[sub, "--help"]);
        assert_eq!(code, 0, "{sub} --help");
        assert!(out.contains("--addr"), "{sub} --help: {out}");
    }
}

#[test]
fn subcommands_against_a_closed_port() {
    let closed = format!("127.0.0.1:{}", free_port());
    for args in [
        vec!["health"],
        vec!["get", "k"],
        vec!["set", "k", "v"],
        vec!["del", "k"],
        vec!["stats"],
        vec!["members"],
    ] {
        let mut full = args.clone();
        full.extend(["--addr", &closed, "--timeout", "2"]);
        let (code, _, err) = cli(&full);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains("cannot reach") && err.contains(&closed),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
