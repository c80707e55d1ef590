//! `Backend::poll_many`: filling many idle slots in batches keeps every rule of the
//! slot-by-slot fill.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{builder, holders, raw, redis_url, tasks, unique_name, Fake, PrivateRedis};
use task_semaphore::{Scheduler, SlotConfig, Stage};

const LONG: Duration = Duration::from_secs(3600);

fn batching(name: &str, pending: impl IntoIterator<Item = impl Into<String>>) -> Fake {
    let mut fake = Fake::with_tasks(name, pending);
    fake.batch = true;
    fake
}

#[tokio::test]
/// One poll_many call fills every idle slot, in config order.
async fn one_poll_many_fills_all_idle_slots() {
    let name = unique_name("batchfill");
    let fake = batching("Jobs", tasks("t", 450));
    let s = builder(&name, &fake, 300, LONG).build().await.unwrap();
    let r = s.schedule().await.unwrap();
    assert_eq!(r.started.len(), 300);
    assert_eq!(r.idle, 0);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    for (i, t) in r.started.iter().enumerate() {
        assert_eq!(
            (t.slot_id.as_str(), t.task_id.as_str()),
            (&*(i + 1).to_string(), &*format!("t{i}"))
        );
    }
    assert_eq!(fake.ledger().poll_many_calls, [300]);
    // Leases strictly increasing.
    assert!(r.started.windows(2).all(|w| w[0].lease < w[1].lease));
    // Nothing idle: the next tick asks for nothing.
    s.schedule().await.unwrap();
    assert_eq!(fake.ledger().poll_many_calls, [300]);
}

#[tokio::test]
/// Duplicates and invalid ids are skipped (invalid ones reported), a short answer
/// leaves slots to the next backend, and the slot-by-slot backend fills the rest.
async fn short_and_odd_batches_fall_through_to_the_next_backend() {
    let name = unique_name("batchodd");
    let batch = batching("Batch", ["a", "a", "", "b"]);
    let single = Fake::with_tasks("Single", ["s1", "s2", "s3"]);
    let mut b = Scheduler::builder(&name)
        .redis_url(redis_url())
        .backend(batch.clone())
        .backend(single.clone());
    for i in 1..=4 {
        b = b.slot(SlotConfig::new(i.to_string(), ["Batch", "Single"]).timeout(LONG));
    }
    let s = b.build().await.unwrap();
    let r = s.schedule().await.unwrap();
    let h = holders(&s).await;
    let held: Vec<_> = h.values().map(|t| t.clone().unwrap()).collect();
    assert_eq!(held, ["a", "b", "s1", "s2"], "{r:?}");
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(r.errors[0].stage, Stage::Poll);
    assert!(r.errors[0].message.contains("empty"), "{:?}", r.errors);
}

#[tokio::test]
/// A batched id that another replica started already is not started again; its
/// slot goes on to the next backend.
async fn batched_task_held_elsewhere_is_not_started_twice() {
    let name = unique_name("batchbusy");
    let first = Fake::with_tasks("Jobs", ["x"]);
    let s1 = builder(&name, &first, 1, LONG).build().await.unwrap();
    s1.schedule().await.unwrap();
    // A second replica with more slots whose backend still offers x (stale view).
    let stale = batching("Jobs", ["x", "y"]);
    let mut b = Scheduler::builder(&name)
        .redis_url(redis_url())
        .backend(stale.clone());
    for i in 1..=3 {
        b = b.slot(SlotConfig::new(i.to_string(), ["Jobs"]).timeout(LONG));
    }
    let s2 = b.build().await.unwrap();
    let r = s2.schedule().await.unwrap();
    let started: Vec<_> = r.started.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(started, ["y"], "{r:?}");
    assert_eq!(stale.ledger().starts.get("x"), None);
    assert_eq!(holders(&s2).await["1"].as_deref(), Some("x"));
}

#[tokio::test]
/// A failing poll_many is a Poll error; the slots go on to their next backend.
async fn failing_poll_many_is_reported_and_skipped() {
    let name = unique_name("batchfail");
    let batch = batching("Batch", ["a"]);
    batch.ledger().poll_fails = true;
    let single = Fake::with_tasks("Single", ["s1"]);
    let s = Scheduler::builder(&name)
        .redis_url(redis_url())
        .backend(batch.clone())
        .backend(single.clone())
        .slot(SlotConfig::new("1", ["Batch", "Single"]).timeout(LONG))
        .build()
        .await
        .unwrap();
    let r = s.schedule().await.unwrap();
    assert_eq!(r.started[0].task_id, "s1");
    assert_eq!(r.errors[0].stage, Stage::Poll);
    assert_eq!(r.errors[0].backend.as_deref(), Some("Batch"));
}

#[tokio::test]
/// A failed start in a batch frees that slot only; the others start.
async fn failed_start_in_a_batch_frees_only_its_slot() {
    let name = unique_name("batchstart");
    let fake = batching("Jobs", ["a", "b", "c"]);
    {
        let mut l = fake.ledger();
        l.fail.insert((task_semaphore::Callback::Start, "b".into()));
        l.error_answer = Some(false);
    }
    let s = builder(&name, &fake, 3, LONG).build().await.unwrap();
    let r = s.schedule().await.unwrap();
    let started: Vec<_> = r.started.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(started, ["a", "c"]);
    assert_eq!(r.idle, 1);
    let h = holders(&s).await;
    assert_eq!(h["2"], None);
    // b is still pending (its start failed): the next tick starts it. (Its release
    // dated its end; a poll in that very millisecond would be refused as stale.)
    fake.ledger().fail.clear();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = s.schedule().await.unwrap();
    assert_eq!(r.started[0].task_id, "b");
}

#[tokio::test]
/// More idle slots than the tick script lists itself (1,000): the scheduler pages
/// through the idle set, and one schedule() still fills every slot once.
async fn more_idle_slots_than_the_tick_lists_are_all_filled() {
    let name = unique_name("manyidle");
    let fake = batching("Jobs", tasks("t", 1600));
    let s = builder(&name, &fake, 1500, LONG).build().await.unwrap();
    let r = s.schedule().await.unwrap();
    assert_eq!(r.started.len(), 1500, "{:?}", r.errors);
    assert_eq!(r.idle, 0);
    let slots: std::collections::BTreeSet<_> = r.started.iter().map(|t| t.slot_id.clone()).collect();
    assert_eq!(slots.len(), 1500);
    assert_eq!(fake.ledger().poll_many_calls, [1500]);
}

#[tokio::test]
/// A stale poll refuses only its own task in a batch: replica B polls [T, F] and
/// stalls; A starts and stops T meanwhile; B's batched claim refuses T and starts F.
async fn stale_task_in_a_batch_does_not_refuse_the_others() {
    let name = unique_name("batchstale");
    let a = Fake::with_tasks("Jobs", ["T"]);
    let mut b = batching("Jobs", ["T", "F"]);
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    b.poll_gate = Some(gate.clone());
    let ra = builder(&name, &a, 1, LONG).build().await.unwrap();
    let rb = builder(&name, &b, 2, LONG).build().await.unwrap();

    // B asks for 2 tasks, gets [T, F], then waits at the gate before claiming.
    let stalled = tokio::spawn(async move { rb.schedule().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Meanwhile A starts T in slot 1 and T finishes (A has nothing to refill with).
    assert_eq!(ra.schedule().await.unwrap().started.len(), 1);
    ra.stop("T").await.unwrap();
    gate.add_permits(100);
    let report = stalled.await.unwrap();
    let started: Vec<&str> = report.started.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(started, ["F"], "{:?}", report.errors);
    assert_eq!(b.ledger().poll_many_calls, [2]);
    assert_eq!(a.ledger().starts["T"], 1);
    assert_eq!(b.ledger().starts.get("T"), None);
}

#[tokio::test]
/// Many chunks in flight at once (claims of 200, sweeps of 100 slots or more): every
/// claim's outcome goes to its own task, and the sweep times out each hold once, the
/// one Redis has, with its callbacks, then refills every slot.
async fn many_chunks_in_flight_keep_each_hold_whole() {
    const N: usize = 900;
    let name = unique_name("manychunks");
    let fake = batching("Jobs", tasks("t", 2 * N));
    let s = builder(&name, &fake, N, Duration::from_millis(1500))
        .build()
        .await
        .unwrap();
    let filled = s.schedule().await.unwrap();
    assert!(filled.errors.is_empty(), "{:?}", filled.errors);
    // (slot, task, lease) of each hold in a report's list.
    let holds = |list: &[task_semaphore::SlotTask]| -> Vec<(String, String, u64)> {
        list.iter()
            .map(|t| (t.slot_id.clone(), t.task_id.clone(), t.lease))
            .collect()
    };
    let mut started = holds(&filled.started);
    // Slot i (config order) got the i-th task polled, under strictly rising leases.
    for (i, (slot, task, _)) in started.iter().enumerate() {
        assert_eq!(
            (slot.as_str(), task.as_str()),
            (&*(i + 1).to_string(), &*format!("t{i}"))
        );
    }
    assert!(filled.started.windows(2).all(|w| w[0].lease < w[1].lease));
    // Redis agrees, lease by lease.
    let mut in_redis: Vec<_> = s
        .inspect()
        .await
        .unwrap()
        .slots
        .into_iter()
        .map(|i| {
            (
                i.slot_id,
                i.task_id.unwrap_or_default(),
                i.lease.unwrap_or_default(),
            )
        })
        .collect();
    in_redis.sort();
    started.sort();
    assert_eq!(in_redis, started);

    tokio::time::sleep(Duration::from_millis(1700)).await;
    let swept = s.schedule().await.unwrap();
    assert!(swept.errors.is_empty(), "{:?}", swept.errors);
    let mut timed_out = holds(&swept.timed_out);
    timed_out.sort();
    assert_eq!(timed_out, started);
    assert_eq!(swept.started.len(), N);
    assert_swept_and_refilled_once(&fake, N);
}

/// Tasks t0..t{n-1} started, timed out and stopped once each, and t{n}..t{2n-1} (their
/// refills) started once each.
fn assert_swept_and_refilled_once(fake: &Fake, n: usize) {
    let ledger = fake.ledger();
    for i in 0..n {
        assert_eq!(
            ledger.events_of(&format!("t{i}")),
            ["start", "timeout", "stop"],
            "t{i}"
        );
        assert_eq!(ledger.events_of(&format!("t{}", n + i)), ["start"], "t{}", n + i);
    }
}

/// `errorstat_NOSCRIPT` of `INFO errorstats`: how many calls the server has answered
/// NOSCRIPT so far.
async fn noscript_replies(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    common::info_number(conn, "errorstats", "errorstat_NOSCRIPT:count=").await
}

async fn flush_scripts(conn: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(conn).await.unwrap();
}

#[tokio::test]
/// A script cache flushed before a chunked fill and before a chunked sweep (calls in
/// flight at once, answered NOSCRIPT), and again and again during the sweep: every
/// call reloads its script, and each hold starts, times out and is refilled once.
async fn noscript_in_chunked_calls_in_flight_is_recovered() {
    const N: usize = 120;
    // A private server when there is one: a flush storm on the shared server would
    // slow the other tests (they would recover all the same).
    let private = PrivateRedis::start(&[]);
    let url = private.as_ref().map_or_else(redis_url, PrivateRedis::url);
    let name = unique_name("noscriptchunks");
    let fake = batching("Jobs", tasks("t", 2 * N));
    let s = builder(&name, &fake, N, Duration::from_millis(800))
        .redis_url(url.clone())
        .claim_chunk(10)
        .sweep_chunk(10)
        .build()
        .await
        .unwrap();
    let mut conn = raw(&url).await;

    // 12 claim calls, the first ones sent together into an empty script cache.
    let before = noscript_replies(&mut conn).await;
    flush_scripts(&mut conn).await;
    let filled = s.schedule().await.unwrap();
    assert!(filled.errors.is_empty(), "{:?}", filled.errors);
    assert_eq!(filled.started.len(), N);
    // The tick's call and at least the first claim call were answered NOSCRIPT.
    let after_fill = noscript_replies(&mut conn).await;
    assert!(
        after_fill >= before + 2,
        "NOSCRIPT replies: {before} -> {after_fill}"
    );

    // 12 sweep and 12 free calls, then 12 claim calls, under a flush storm when the
    // server is this test's own.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    flush_scripts(&mut conn).await;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let storm = private.is_some().then(|| {
        let mut conn = conn.clone();
        tokio::spawn(async move {
            while stopped.try_recv().is_err() {
                flush_scripts(&mut conn).await;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        })
    });
    let swept = s.schedule().await.unwrap();
    stop.send(()).unwrap();
    if let Some(storm) = storm {
        storm.await.unwrap();
    }
    assert!(swept.errors.is_empty(), "{:?}", swept.errors);
    assert_eq!(swept.timed_out.len(), N);
    assert_eq!(swept.started.len(), N);
    let after_sweep = noscript_replies(&mut conn).await;
    assert!(
        after_sweep > after_fill,
        "NOSCRIPT replies: {after_fill} -> {after_sweep}"
    );
    assert_swept_and_refilled_once(&fake, N);
    // Redis agrees: every slot holds one of the refills.
    let held: std::collections::BTreeSet<_> = holders(&s).await.into_values().flatten().collect();
    assert_eq!(held, (N..2 * N).map(|i| format!("t{i}")).collect());
}
