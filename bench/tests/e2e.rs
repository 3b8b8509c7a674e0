//! cache-bench end to end: a short run against a real node, and its argument checks.
//! Needs the node binary beside cache-bench, which `cargo test --workspace` builds.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const BENCH: &str = env!("CARGO_BIN_EXE_cache-bench");

fn free_addr() -> String {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// A node process, killed and reaped on drop; its log goes to a file so that a failure can
/// show it.
struct Reaped {
    child: Child,
    log: std::path::PathBuf,
}

impl Reaped {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Starts a node and waits until it answers a gRPC health check: a bare TCP connect can
/// succeed before every core serves.
fn start_node(addr: &str) -> Reaped {
    let bin = std::path::Path::new(BENCH).with_file_name("distributed-cache");
    assert!(
        bin.exists(),
        "{} missing: run the workspace tests (cargo test --workspace)",
        bin.display()
    );
    let log = tempfile_path(&format!("node-{}.log", addr.replace(':', "_")));
    let child = Command::new(&bin)
        .env("ADDR", addr)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut node = Reaped { child, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let health = Command::new(&bin)
            .args(["health", "--addr", addr, "--timeout", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if health.success() {
            return node;
        }
        if let Some(exit) = node.child.try_wait().unwrap() {
            panic!("node exited with {exit} before serving: {}", node.log());
        }
        assert!(
            Instant::now() < deadline,
            "node not serving within 20 s: {}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn short_run_against_a_real_node() {
    let addr = free_addr();
    let node = start_node(&addr);
    let json = tempfile_path("run.json");
    let out = Command::new(BENCH)
        .args([
            "run",
            "--target",
            &addr,
            "--connections",
            "2",
            "--concurrency",
            "2",
            "--keys",
            "100",
        ])
        .args([
            "--prepopulate",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--read-ratio",
            "0.8",
            "--delete-ratio",
            "0.05",
        ])
        .args(["--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\nnode log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("throughput") && stdout.contains("p99"),
        "{stdout}"
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(doc["report"]["ok"].as_u64().unwrap() > 0, "{doc}");
    assert_eq!(
        doc["report"]["errors"].as_object().unwrap().len(),
        0,
        "{doc}"
    );
    assert!(doc["report"]["hit_ratio"].as_f64().is_some());
    assert_eq!(doc["settings"]["load"]["connections"], 2);
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cache-bench-{}-{name}", std::process::id()))
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    for args in [
        vec!["run", "--target", "nohostport"],
        vec!["run", "--target", "127.0.0.1:1", "--read-ratio", "1.5"],
        vec!["run", "--target", "127.0.0.1:1", "--concurrency", "0"],
        vec!["run", "--target", "127.0.0.1:1", "--dist", "pareto"],
    ] {
        let out = Command::new(BENCH).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
}

#[test]
fn unreachable_target_is_reported_within_the_timeout() {
    let closed = free_addr();
    let started = Instant::now();
    let out = Command::new(BENCH)
        .args([
            "run",
            "--target",
            &closed,
            "--rpc-timeout",
            "1",
            "--duration",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unreachable") && err.contains(&closed),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
