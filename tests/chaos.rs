//! The chaos suite: scheduler replicas as separate OS processes over one backlog,
//! faults injected while they run, and a checker over the merged history of every
//! start, keepalive, stop and timeout (with its lease).
//!
//! Each scenario is one test. `make test` runs each briefly; `make chaos` runs them
//! longer (`CHAOS_SECONDS`, release build) and prints a table. A replica is this test
//! binary re-executed with `CHAOS_ROLE=replica`, running `chaos_replica` alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)]

mod common;

#[path = "chaos/checker.rs"]
mod checker;
#[path = "chaos/harness.rs"]
mod harness;
#[path = "chaos/history.rs"]
mod history;
#[path = "chaos/replica.rs"]
mod replica;

use harness::{run_scenario, Fault, Scenario};

/// The replica process's entry point; a no-op in a normal test run.
#[test]
fn chaos_replica() {
    if std::env::var("CHAOS_ROLE").as_deref() == Ok("replica") {
        replica::main();
    }
}

/// Re-checks a kept history: `CHAOS_CHECK=target/tmp/chaos/<run>/history.jsonl
/// cargo test --test chaos chaos_check_history -- --nocapture`. A no-op otherwise.
#[test]
fn chaos_check_history() {
    if let Ok(path) = std::env::var("CHAOS_CHECK") {
        let report = harness::check_file(std::path::Path::new(&path));
        println!("{}", report.render(40));
        assert!(report.violations.is_empty());
    }
}

/// The checker flags a start report that names no slot or no lease (a broken report
/// would otherwise hide the hold it belongs to), and not the same report whole.
#[test]
fn chaos_checker_flags_a_start_report_without_slot_or_lease() {
    let params = checker::Params {
        slots: 1,
        timeout_ms: 60_000,
        margin_ms: 2500,
    };
    let history = |start: &str| {
        let text = [
            r#"{"ev":"run_begin","slots":1,"timeout_ms":60000,"pid":1,"ms":1000}"#,
            r#"{"ev":"replica_boot","pid":2,"ms":1001}"#,
            r#"{"ev":"tick","pid":2,"ms":1002}"#,
            r#"{"ev":"start_callback","task":"a","pid":2,"ms":1003}"#,
            start,
        ]
        .join("\n");
        let (lines, torn) = history::parse(&text, 0);
        checker::check(&params, &lines, &torn)
    };
    let kinds = |r: &checker::Report| r.violations.iter().map(|v| v.kind).collect::<Vec<_>>();
    // (A history this short breaks other rules: the run never ends.)
    let whole = history(r#"{"ev":"start","task":"a","lease":7,"slot":"1","pid":2,"ms":1004}"#);
    assert!(
        !kinds(&whole).contains(&"start report without lease or slot"),
        "{:?}",
        whole.violations
    );
    for broken in [
        r#"{"ev":"start","task":"a","lease":7,"pid":2,"ms":1004}"#,
        r#"{"ev":"start","task":"a","slot":"1","pid":2,"ms":1004}"#,
    ] {
        let r = history(broken);
        assert!(
            kinds(&r).contains(&"start report without lease or slot"),
            "{broken}: {:?}",
            r.violations
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `kill -9` of a random replica every few seconds; a fresh one takes its place.
async fn chaos_kill_replica() {
    run_scenario(Scenario::new("kill_replica", Fault::KillReplica)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `kill -9` of a replica after a claim and before its `start_callback` ran.
async fn chaos_kill_between_claim_and_start() {
    run_scenario(Scenario::new("kill_in_start", Fault::KillInStartWindow)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `kill -9` of a random replica every few seconds, as `chaos_kill_replica`, with
/// batched claims (`poll_many`) and tiny chunks: 24 slots, all in one group of the
/// deadline index, claimed 4 per call and swept 3 per call, so fills and sweeps run
/// in many pipelined calls and every sweep of more than 3 slots splits the group.
/// The stop and timeout callbacks take 30 ms each, so that a kill often lands
/// between a sweep and its free: another replica must reclaim those slots.
async fn chaos_chunked_kill_replica() {
    run_scenario(Scenario {
        slots: 24,
        poll_many: true,
        claim_chunk: 4,
        sweep_chunk: 3,
        callback_delay_ms: 30,
        ..Scenario::new("chunked_kill", Fault::KillReplica)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A replica frozen (SIGSTOP) past the slot timeout; thawed, its tasks send
/// keepalive and stop for holds that ended: all refused.
async fn chaos_frozen_replica() {
    run_scenario(Scenario::new("freeze_replica", Fault::Freeze)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Redis `kill -9` and restart with appendonly yes + appendfsync always: nothing lost.
async fn chaos_redis_restart_with_aof() {
    run_scenario(Scenario::new("redis_restart_aof", Fault::RedisRestartAof)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `SCRIPT FLUSH` every few hundred milliseconds.
async fn chaos_script_flush() {
    run_scenario(Scenario::new("script_flush", Fault::ScriptFlush)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `CLIENT PAUSE 2000 WRITE` every few seconds (longer than the replicas' redis_timeout).
async fn chaos_client_pause_write() {
    run_scenario(Scenario::new("client_pause", Fault::ClientPause)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Half the replicas under `faketime -f '+1h'`: Redis time rules, not theirs.
async fn chaos_skewed_replica_clocks() {
    run_scenario(Scenario::new("faketime", Fault::Faketime)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Hand edits of three slots (garbage number, missing field, wrong type): each is
/// reported corrupt and never handed out; the other slots keep working.
async fn chaos_hand_edited_slots() {
    run_scenario(Scenario::new("corrupt_slots", Fault::Corrupt)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Redis `kill -9` and restart without persistence: the state is lost and must be
/// detected (a tick reports `state_lost`), no second generation of tasks starts
/// beside the first before its tasks knew or the quarantine ended, no lease is reused,
/// and work resumes.
async fn chaos_redis_restart_without_persistence() {
    run_scenario(Scenario::new("redis_restart_empty", Fault::RedisRestartEmpty)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `FLUSHALL`: as a restart without persistence (the backlog, in another Redis, survives).
async fn chaos_flushall() {
    run_scenario(Scenario::new("flushall", Fault::FlushAll)).await;
}
