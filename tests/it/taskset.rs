//! `taskset -c 1`: the node sizes itself to its affinity mask and no thread leaves it.

use crate::support::Node;
use distributed_cache::pb::{set_request, GetRequest, SetRequest};

fn allowed_cpus_of_task(pid: i32, tid: &str) -> String {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The CPU a thread last ran on: field 39 of /proc/PID/task/TID/stat.
fn last_cpu_of_task(pid: i32, tid: &str) -> Option<usize> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    after_comm.split_whitespace().nth(36)?.parse().ok()
}

#[tokio::test]
async fn taskset_core_1_serves_and_every_thread_stays_on_it() {
    let Some(cpus) = core_affinity::get_core_ids() else {
        panic!("no affinity mask")
    };
    if !cpus.iter().any(|c| c.id == 1) {
        // CI and the development machine have CPU 1; a one-CPU runner cannot run this.
        eprintln!("skipped: CPU 1 is not in this process's affinity mask");
        return;
    }
    let node = Node::start_with(Some(&["taskset", "-c", "1"]), &[]).await;
    let mut c = node.client().await.unwrap();
    for i in 0..200 {
        c.set(SetRequest {
            key: format!("k{i}"),
            payload: Some(set_request::Payload::Value("v".into())),
            ttl_seconds: None,
            ..Default::default()
        })
        .await
        .unwrap();
        c.get(GetRequest {
            key: format!("k{i}"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(node.log().contains("cores=[1]"), "{}", node.log());
    let pid = node.pid();
    let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(tids.len() >= 2, "main thread and at least one core");
    for tid in &tids {
        assert_eq!(
            allowed_cpus_of_task(pid, tid),
            "1",
            "thread {tid} may leave CPU 1"
        );
        assert_eq!(
            last_cpu_of_task(pid, tid),
            Some(1),
            "thread {tid} ran elsewhere"
        );
    }
}
