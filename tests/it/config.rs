//! Bad configuration stops the node before it starts, with one line naming the variable.

use crate::support::{run_expecting_failure, run_expecting_failure_with};
use std::os::unix::process::CommandExt;

#[test]
fn invalid_variables_are_refused_with_one_line() {
    let cases = [
        ("NUM_SHARDS", "0"),
        ("CAPACITY", "abc"),
        ("TTL", "-5"),
        ("ADDR", "localhost"),
        ("RATE_LIMIT", "lots"),
        ("MAX_RECV_MSG_SIZE", "big"),
        ("RPC_TIMEOUT", "-1"),
        ("MAX_MEMORY", "lots"),
        ("MAX_MEMORY", "1mb"),
        ("EVICTION", "lru"),
    ];
    for (var, value) in cases {
        let (status, stderr) = run_expecting_failure(&[(var, value)]);
        assert!(!status.success(), "{var}={value} started");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{var}={value}: expected one line, got {stderr:?}"
        );
        assert!(
            lines[0].contains(var) && lines[0].contains(value),
            "{}",
            lines[0]
        );
    }
}

#[test]
fn port_in_use_is_one_line() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let (status, stderr) =
        run_expecting_failure(&[("ADDR", &addr), ("LOG_FORMAT", "text"), ("RUST_LOG", "off")]);
    assert!(!status.success());
    assert!(
        stderr.contains("cannot listen on") && stderr.contains(&addr),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// Each shard's log reserves address space for the node's whole budget (touched only as it
/// fills). A process not allowed that much (here 4 GiB of address space against 64 shards of a
/// 1 GiB budget) stops at start with one line naming MAX_MEMORY, not a panic on every core.
#[test]
fn address_space_the_shards_cannot_reserve_is_one_line() {
    let (status, stderr) =
        run_expecting_failure_with(&[("NUM_SHARDS", "64"), ("MAX_MEMORY", "1gb")], |cmd| {
            // SAFETY: setrlimit is async-signal-safe, and the closure allocates nothing.
            unsafe {
                cmd.pre_exec(|| {
                    let limit = libc::rlimit {
                        rlim_cur: 4 << 30,
                        rlim_max: 4 << 30,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                })
            };
        });
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("MAX_MEMORY=1073741824") && stderr.contains("64 shards"),
        "{stderr}"
    );
}
