//! The `task-semaphore` binary against the test Redis: `workload` (what `make
//! script-cost` runs) does the work it names, and `demo` (what `make demo` runs)
//! keeps its promises.
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

#[test]
/// `demo` runs every task once within the cap, and the keys it tells the operator to
/// read are the README's (a slot, its deadline group, `deadlines`, a task bucket).
fn demo_runs_its_backlog_and_names_the_documented_keys() {
    let out = Command::new(env!("CARGO_BIN_EXE_task-semaphore"))
        .args(["demo", "--slots", "2", "--tasks", "5"])
        .env("REDIS_URL", common::redis_url())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("All 5 tasks ran once each, never more than 2 at a time."),
        "{text}"
    );
    assert!(text.contains("  starts            5, one lease each"), "{text}");
    let name = text
        .split("Scheduler \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap();
    // Two slots: one bucket of the task index and one group of the deadline index.
    for part in ["slot:1", "due:0", "deadlines", "tasks:0"] {
        let key = common::key(name, part);
        assert!(text.contains(&format!("'{key}'")), "{key} not in\n{text}");
    }
}
