//! Each Lua script, called directly out of turn, refuses what it must refuse: the
//! checks that protect against races too narrow to hit from the public API.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{builder, key, raw, unique_name, Fake};
use redis::Value;

/// A script as the crate runs it: `common.lua` in front of the file.
fn script(file: &str) -> redis::Script {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/lua/");
    let common = std::fs::read_to_string(format!("{dir}common.lua")).unwrap();
    let body = std::fs::read_to_string(format!("{dir}{file}")).unwrap();
    redis::Script::new(&format!("{common}\n{body}"))
}

async fn slot(conn: &mut redis::aio::MultiplexedConnection, name: &str, id: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(key(name, &format!("slot:{id}")))
        .query_async(conn)
        .await
        .unwrap()
}

/// A slot hash's state, derived as the scripts derive it (there is no state field):
/// no task is idle, a stopping reason is stopping, else busy.
fn state(slot: &HashMap<String, String>) -> &'static str {
    match (slot.contains_key("task"), slot.contains_key("stopping")) {
        (false, _) => "idle",
        (true, true) => "stopping",
        (true, false) => "busy",
    }
}

fn texts(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
                Value::Int(n) => n.to_string(),
                Value::SimpleString(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .collect(),
        // A packed reply: tokens "<byte length>:<bytes>" (lua/common.lua, `put`).
        Value::BulkString(b) => {
            let mut rest = b.as_slice();
            let mut out = Vec::new();
            while !rest.is_empty() {
                let colon = rest.iter().position(|&c| c == b':').unwrap();
                let len: usize = std::str::from_utf8(&rest[..colon]).unwrap().parse().unwrap();
                out.push(String::from_utf8(rest[colon + 1..colon + 1 + len].to_vec()).unwrap());
                rest = &rest[colon + 1 + len..];
            }
            out
        }
        other => panic!("not an array: {other:?}"),
    }
}

/// The task index's one bucket: a scheduler of 2 slots has one (`task_buckets` 1).
fn bucket(name: &str) -> String {
    key(name, "tasks:0")
}

/// The deadline index's one group, for the same reason.
fn group(name: &str) -> String {
    key(name, "due:0")
}

/// Slots "1" and "2" of a fresh scheduler, with "a" busy in slot 1 (timeout 1 h).
async fn setup(
    test: &str,
) -> (
    String,
    redis::aio::MultiplexedConnection,
    task_semaphore::Scheduler,
) {
    let name = unique_name(test);
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let s = builder(&name, &fake, 2, Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    s.schedule().await.unwrap();
    (name, raw(&common::redis_url()).await, s)
}

/// One claim of `task` in `slot_id` through claim.lua, as the crate calls it.
async fn claim_one(
    conn: &mut redis::aio::MultiplexedConnection,
    name: &str,
    slot_id: &str,
    task: &str,
    polled_at_ms: u64,
) -> Vec<String> {
    texts(
        &try_claim_one(conn, name, slot_id, task, polled_at_ms)
            .await
            .unwrap(),
    )
}

/// claim_one, with the script's error as it is.
async fn try_claim_one(
    conn: &mut redis::aio::MultiplexedConnection,
    name: &str,
    slot_id: &str,
    task: &str,
    polled_at_ms: u64,
) -> redis::RedisResult<Value> {
    let claim = script("claim.lua");
    let mut inv = claim.prepare_invoke();
    for k in ["deadlines", "idle", "ended", "lease", "epoch"] {
        inv.key(key(name, k));
    }
    inv.key(key(name, &format!("slot:{slot_id}")))
        .key(bucket(name))
        .key(group(name));
    inv.arg(60_000)
        .arg(1)
        .arg(slot_id)
        .arg(task)
        .arg("Jobs")
        .arg(1000)
        .arg(polled_at_ms)
        .arg(0);
    inv.invoke_async(conn).await
}

/// The idle set's members, sorted.
async fn idle(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> Vec<String> {
    let mut ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(key(name, "idle"))
        .query_async(conn)
        .await
        .unwrap();
    ids.sort();
    ids
}

/// The bound of group 0 (the one group of a 2-slot scheduler) in `deadlines`, ms.
async fn bound(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> u64 {
    let b: Option<u64> = redis::cmd("ZSCORE")
        .arg(key(name, "deadlines"))
        .arg("0")
        .query_async(conn)
        .await
        .unwrap();
    b.unwrap()
}

/// Redis time in ms.
async fn now_ms(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let now: (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    now.0 * 1000 + now.1 / 1000
}

#[tokio::test]
/// claim.lua type-checks deadlines, idle, ended and epoch: a foreign one fails the claim
/// naming it, with nothing written (no deadline left behind, slot 2 still idle and in
/// the idle set, no index entry, the lease counter as it was). The idle set and
/// `deadlines` are checked by the claim's first writes, undone when the second fails.
async fn claim_with_a_foreign_deadlines_or_idle_writes_nothing() {
    for which in ["deadlines", "idle", "ended", "epoch"] {
        let (name, mut conn, _s) = setup(&format!("claimtype-{which}")).await;
        let foreign = key(&name, which);
        let _: () = redis::cmd("SET")
            .arg(&foreign)
            .arg("foreign data")
            .query_async(&mut conn)
            .await
            .unwrap();
        let deadlines_before: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(key(&name, "deadlines"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let slot_before = slot(&mut conn, &name, "2").await;
        let idle_before = if which == "idle" {
            None
        } else {
            Some(idle(&mut conn, &name).await)
        };
        let lease_before: Option<String> = redis::cmd("GET")
            .arg(key(&name, "lease"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let now = now_ms(&mut conn).await;
        let err = try_claim_one(&mut conn, &name, "2", "b", now)
            .await
            .expect_err(which);
        assert!(err.to_string().contains("CORRUPT"), "{which}: {err}");
        assert!(err.to_string().contains(&foreign), "{which}: {err}");
        let deadlines_after: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(key(&name, "deadlines"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(deadlines_after, deadlines_before, "{which}: deadlines changed");
        assert_eq!(slot(&mut conn, &name, "2").await, slot_before, "{which}");
        if let Some(idle_before) = idle_before {
            assert_eq!(idle_before, ["2"], "{which}");
            assert_eq!(
                idle(&mut conn, &name).await,
                idle_before,
                "{which}: idle set changed"
            );
        }
        let owner: Option<String> = redis::cmd("HGET")
            .arg(bucket(&name))
            .arg("b")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(owner, None, "{which}");
        let lease_after: Option<String> = redis::cmd("GET")
            .arg(key(&name, "lease"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(lease_after, lease_before, "{which}");
    }
}

#[tokio::test]
/// claim.lua refuses a busy slot, and a task that already holds another slot.
async fn claim_refuses_busy_slots_and_held_tasks() {
    let (name, mut conn, _s) = setup("claim").await;
    let before = slot(&mut conn, &name, "1").await;
    let now: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = now.0 * 1000 + now.1 / 1000;

    assert_eq!(
        claim_one(&mut conn, &name, "1", "b", now_ms).await[1],
        "SLOT_BUSY"
    );
    assert_eq!(slot(&mut conn, &name, "1").await, before);

    assert_eq!(
        claim_one(&mut conn, &name, "2", "a", now_ms).await[1],
        "TASK_BUSY"
    );
    assert_eq!(state(&slot(&mut conn, &name, "2").await), "idle");
    // Slot 2 left the idle set for the claim (its first write), and is back in it.
    assert_eq!(idle(&mut conn, &name).await, ["2"]);
}

#[tokio::test]
/// A claim refused after its first writes (the task holds a slot already) leaves its
/// group's bound in `deadlines` lowered: harmless, the sweep that finds the group due
/// with nothing due in it settles the bound back to the group's earliest time.
async fn a_bound_lowered_by_a_refused_claim_is_settled_by_the_sweep() {
    let (name, mut conn, s) = setup("lowered").await;
    let due: u64 = slot(&mut conn, &name, "1").await["due"].parse().unwrap();
    assert_eq!(bound(&mut conn, &name).await, due);
    let now = now_ms(&mut conn).await;
    // claim_one's timeout is 1 s: the bound drops to about now + 1 s.
    assert_eq!(claim_one(&mut conn, &name, "2", "a", now).await[1], "TASK_BUSY");
    let lowered = bound(&mut conn, &name).await;
    assert!(lowered < due && lowered >= now + 1000, "{lowered} vs {due}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = s.schedule().await.unwrap();
    assert!(r.timed_out.is_empty() && r.errors.is_empty(), "{r:?}");
    assert_eq!(bound(&mut conn, &name).await, due, "the bound is settled back");
    assert_eq!(slot(&mut conn, &name, "1").await["due"], due.to_string());
    s.keepalive("a").await.unwrap();
}

#[tokio::test]
/// sweep.lua leaves a slot alone when it is not due (stopped and refilled between
/// the tick that saw it due and the sweep).
async fn sweep_leaves_slots_that_are_not_due() {
    let (name, mut conn, _s) = setup("sweep").await;
    let before = slot(&mut conn, &name, "1").await;
    let sweep = script("sweep.lua");
    let mut inv = sweep.prepare_invoke();
    inv.key(key(&name, "deadlines"))
        .key(key(&name, "idle"))
        .key(key(&name, "ended"))
        .key(key(&name, "slot:1"))
        .key(group(&name))
        .arg(1)
        .arg("1")
        .arg(1)
        .arg(0)
        .arg("0");
    let out: Value = inv.invoke_async(&mut conn).await.unwrap();
    assert_eq!(
        texts(&out)[1..],
        ["-"],
        "the time, then slot 1 left alone: {out:?}"
    );
    assert_eq!(slot(&mut conn, &name, "1").await, before);
}

#[tokio::test]
/// A group split across sweep calls: a call that does not take its last due slots
/// (flagged open) leaves its bound as it is, since it does not read the group's other
/// times; the call with the last ones settles it.
async fn sweep_settles_a_split_group_only_in_its_last_call() {
    let name = unique_name("sweepsplit");
    let fake = Fake::with_tasks("Jobs", ["a", "b"]);
    let s = builder(&name, &fake, 2, Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    assert_eq!(s.schedule().await.unwrap().started.len(), 2);
    let mut conn = raw(&common::redis_url()).await;
    // Both due in the past; the bound is slot 1's.
    let d1 = now_ms(&mut conn).await - 10_000;
    let d2 = d1 + 10;
    for (id, due) in [("1", d1), ("2", d2)] {
        let _: () = redis::pipe()
            .hset(key(&name, &format!("slot:{id}")), "due", due)
            .hset(group(&name), id, due)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("ZADD")
        .arg(key(&name, "deadlines"))
        .arg(d1)
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let sweep = script("sweep.lua");
    let call = |id: &str, open: &str| {
        let mut inv = sweep.prepare_invoke();
        inv.key(key(&name, "deadlines"))
            .key(key(&name, "idle"))
            .key(key(&name, "ended"))
            .key(key(&name, &format!("slot:{id}")))
            .key(group(&name))
            .arg(1)
            .arg(id)
            .arg(1)
            .arg(0)
            .arg(open);
        inv
    };
    let out: Value = call("2", "1").invoke_async(&mut conn).await.unwrap();
    assert_eq!(texts(&out)[1], "T", "{out:?}");
    assert_eq!(state(&slot(&mut conn, &name, "2").await), "stopping");
    assert_eq!(
        bound(&mut conn, &name).await,
        d1,
        "left as it was: slot 1 is still due"
    );
    let out: Value = call("1", "0").invoke_async(&mut conn).await.unwrap();
    assert_eq!(texts(&out)[1], "T", "{out:?}");
    let reclaims: Vec<u64> = redis::cmd("HMGET")
        .arg(group(&name))
        .arg("1")
        .arg("2")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        bound(&mut conn, &name).await,
        reclaims.into_iter().min().unwrap(),
        "settled at the earliest reclaim"
    );
    // A flag other than "0" or "1" is refused, before any write.
    let err = call("1", "2").invoke_async::<Value>(&mut conn).await.unwrap_err();
    assert!(err.to_string().contains("bad arguments"), "{err}");
    // An open group of another type is refused before any write, though it is not
    // read: slot 1, due for its reclaim, is left as it is.
    let _: () = redis::cmd("HSET")
        .arg(key(&name, "slot:1"))
        .arg("reclaim")
        .arg(d1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let before = slot(&mut conn, &name, "1").await;
    let _: () = redis::pipe()
        .del(group(&name))
        .set(group(&name), "foreign data")
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = call("1", "1").invoke_async::<Value>(&mut conn).await.unwrap_err();
    assert!(err.to_string().contains(&group(&name)), "{err}");
    assert_eq!(slot(&mut conn, &name, "1").await, before);
}

#[tokio::test]
/// free.lua frees a stopping slot only for the lease that stopped in it.
async fn free_checks_the_lease() {
    let (name, mut conn, _s) = setup("free").await;
    let lease = slot(&mut conn, &name, "1").await["lease"].clone();
    // Stop "a" but keep the slot stopping, as during its callbacks.
    let release = script("release.lua");
    let mut inv = release.prepare_invoke();
    inv.key(bucket(&name))
        .key(key(&name, "slot:1"))
        .key(group(&name))
        .key(key(&name, "ended"))
        .key(key(&name, "idle"))
        .arg("a")
        .arg("1")
        .arg("stop")
        .arg("stopping")
        .arg("");
    let out: Value = inv.invoke_async(&mut conn).await.unwrap();
    assert_eq!(texts(&out)[0], "OK");
    let free = script("free.lua");
    let call = |lease: String| {
        let mut inv = free.prepare_invoke();
        inv.key(key(&name, "idle"))
            .key(key(&name, "slot:1"))
            .key(bucket(&name))
            .key(group(&name));
        inv.arg("1").arg(lease).arg("a");
        inv
    };
    let wrong = (lease.parse::<u64>().unwrap() + 1).to_string();
    let out: String = call(wrong).invoke_async(&mut conn).await.unwrap();
    assert_eq!(out, "0");
    assert_eq!(state(&slot(&mut conn, &name, "1").await), "stopping");
    let owner: Option<String> = redis::cmd("HGET")
        .arg(bucket(&name))
        .arg("a")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(owner.as_deref(), Some("1"), "the index keeps a stopping task");
    let out: String = call(lease).invoke_async(&mut conn).await.unwrap();
    assert_eq!(out, "1");
    assert_eq!(state(&slot(&mut conn, &name, "1").await), "idle");
    let owner: Option<String> = redis::cmd("HGET")
        .arg(bucket(&name))
        .arg("a")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(owner, None, "free drops the index entry");
}

#[tokio::test]
/// claim.lua refuses a caller whose task_buckets is not the epoch's (it would write
/// the index where other replicas do not look), before any write.
async fn claim_refuses_other_task_buckets() {
    let (name, mut conn, _s) = setup("claimbuckets").await;
    let before = slot(&mut conn, &name, "2").await;
    let claim = script("claim.lua");
    let mut inv = claim.prepare_invoke();
    for k in ["deadlines", "idle", "ended", "lease", "epoch"] {
        inv.key(key(&name, k));
    }
    inv.key(key(&name, "slot:2"))
        .key(key(&name, "tasks:1"))
        .key(key(&name, "due:1"));
    let now = now_ms(&mut conn).await;
    inv.arg(60_000)
        .arg(2)
        .arg("2")
        .arg("b")
        .arg("Jobs")
        .arg(1000)
        .arg(now)
        .arg(1);
    let err = inv
        .invoke_async::<Value>(&mut conn)
        .await
        .expect_err("task_buckets 2 against the epoch's 1");
    assert!(err.to_string().contains("task_buckets is 1, not 2"), "{err}");
    assert_eq!(slot(&mut conn, &name, "2").await, before);
    let exists: bool = redis::cmd("EXISTS")
        .arg(key(&name, "tasks:1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists);
}

#[tokio::test]
/// keepalive.lua and release.lua act only on the slot the index names.
async fn keepalive_and_release_follow_the_index() {
    let (name, mut conn, _s) = setup("index").await;
    for file in ["keepalive.lua", "release.lua"] {
        let source = script(file);
        let mut inv = source.prepare_invoke();
        inv.key(bucket(&name)).key(key(&name, "slot:2")).key(group(&name));
        if file == "release.lua" {
            inv.key(key(&name, "ended")).key(key(&name, "idle"));
        }
        inv.arg("a").arg("2");
        if file == "release.lua" {
            inv.arg("stop").arg("stopping").arg("");
        }
        let out: Value = inv.invoke_async(&mut conn).await.unwrap();
        assert_eq!(texts(&out), ["MOVED", "1"], "{file}");
    }
    assert_eq!(state(&slot(&mut conn, &name, "1").await), "busy");
    assert_eq!(state(&slot(&mut conn, &name, "2").await), "idle");
}
