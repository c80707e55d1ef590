//! The measuring tools of the `task-semaphore` binary: `workload` (what `make
//! script-cost` runs) does the work it names, against the test Redis.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

/// Runs `task-semaphore workload` with `args` against the test Redis.
fn workload(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_task-semaphore"))
        .arg("workload")
        .args(args)
        .env("REDIS_URL", common::redis_url())
        .output()
        .unwrap()
}

/// What a successful `workload` run printed.
fn workload_ok(args: &[&str]) -> String {
    let out = workload(args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
/// Each step prints what it did: the fill started every slot, every task got its
/// keepalive, every stop refilled its slot, the sweep timed out and refilled every slot.
fn workload_does_each_step_it_names() {
    let text = workload_ok(&["--slots", "40", "--poll-many", "--keepalive", "--stop"]);
    assert!(text.contains("fill (poll_many): 40 started"), "{text}");
    assert!(text.contains("keepalive: 40 tasks one by one"), "{text}");
    assert!(
        text.contains("stop: 40 tasks one by one, 40 slots refilled"),
        "{text}"
    );

    let text = workload_ok(&["--slots", "30", "--sweep"]);
    assert!(text.contains("fill (slot by slot): 30 started"), "{text}");
    assert!(
        text.contains("sweep + refill: 30 timed out, 30 started"),
        "{text}"
    );
}

#[test]
/// An option it does not know is an error, not ignored.
fn workload_refuses_unknown_options() {
    let out = workload(&["--slots", "5", "--keep-alive"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--keep-alive"), "{err}");
}
