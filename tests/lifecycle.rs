//! The life of a slot in one replica: fill, keepalive, stop, timeout, callbacks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{builder, holders, key, raw, tasks, unique_name, Fake};
use task_semaphore::{Callback, Error, Scheduler, SlotConfig, SlotStatus, Stage};

const LONG: Duration = Duration::from_secs(3600);

#[tokio::test]
/// A tick fills every idle slot, in slot order, and never more than N tasks.
async fn tick_fills_idle_slots_up_to_the_cap() {
    let name = unique_name("fill");
    let fake = Fake::with_tasks("Jobs", tasks("t", 5));
    let s = builder(&name, &fake, 3, LONG).build().await.unwrap();
    let report = s.schedule().await.unwrap();
    let started: Vec<_> = report
        .started
        .iter()
        .map(|t| (t.slot_id.as_str(), t.task_id.as_str()))
        .collect();
    assert_eq!(started, [("1", "t0"), ("2", "t1"), ("3", "t2")]);
    assert_eq!(fake.ledger().running.len(), 3);
    // Leases are strictly increasing.
    let leases: Vec<u64> = report.started.iter().map(|t| t.lease).collect();
    assert!(leases.windows(2).all(|w| w[0] < w[1]), "{leases:?}");
    // A second tick has nothing to do: every slot is busy.
    let again = s.schedule().await.unwrap();
    assert!(again.started.is_empty());
    assert_eq!(fake.ledger().pending, ["t3", "t4"]);
}

#[tokio::test]
/// A slot polls its backends in order: the first `Some` wins.
async fn backends_are_polled_in_order() {
    let name = unique_name("order");
    let a = Fake::new("A");
    let b = Fake::with_tasks("B", ["b1", "b2"]);
    let s = Scheduler::builder(&name)
        .redis_url(common::redis_url())
        .backend(a.clone())
        .backend(b.clone())
        .load_json(r#"[{"slot_id": 1, "backends": ["A", "B"]}, {"slot_id": 2, "backends": ["A", "B"]}]"#)
        .build()
        .await
        .unwrap();
    let r = s.schedule().await.unwrap();
    assert_eq!(
        r.started.iter().map(|t| t.backend.as_str()).collect::<Vec<_>>(),
        ["B", "B"]
    );
    a.push(["a1"]);
    s.stop("b1").await.unwrap();
    // The freed slot 1 is refilled by stop itself, from A first.
    let h = holders(&s).await;
    assert_eq!(h["1"].as_deref(), Some("a1"));
}

#[tokio::test]
/// `stop` fires stop_callback once, frees the slot and refills it at once.
async fn stop_frees_and_refills() {
    let name = unique_name("stop");
    let fake = Fake::with_tasks("Jobs", ["a", "b"]);
    let s = builder(&name, &fake, 1, LONG).build().await.unwrap();
    s.schedule().await.unwrap();
    s.stop("a").await.unwrap();
    assert_eq!(fake.ledger().events_of("a"), ["start", "stop"]);
    assert_eq!(holders(&s).await["1"].as_deref(), Some("b"));
    // Stopping again is an error and touches nothing.
    assert!(matches!(s.stop("a").await, Err(Error::WrongTaskId(t)) if t == "a"));
    assert_eq!(holders(&s).await["1"].as_deref(), Some("b"));
}

#[tokio::test]
/// `stop_and_report` says what the stop did: the refill's start, the slot left idle,
/// a failing stop_callback, a failing refill poll; the lease variant refuses an old
/// lease.
async fn stop_and_report_names_the_refill_and_its_errors() {
    let name = unique_name("stoprep");
    let fake = Fake::with_tasks("Jobs", ["a", "b"]);
    let s = builder(&name, &fake, 1, LONG).build().await.unwrap();
    let first = s.schedule().await.unwrap().started[0].lease;

    let r = s.stop_and_report("a").await.unwrap();
    let started: Vec<_> = r
        .started
        .iter()
        .map(|t| (t.slot_id.as_str(), t.task_id.as_str()))
        .collect();
    assert_eq!(started, [("1", "b")]);
    assert!(r.started[0].lease > first);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.idle, 0);

    // Nothing to refill with: the slot stays idle.
    let r = s
        .stop_with_lease_and_report("b", r.started[0].lease)
        .await
        .unwrap();
    assert!(r.started.is_empty() && r.errors.is_empty(), "{r:?}");
    assert_eq!(r.idle, 1);

    // A failing stop_callback whose error callback frees the slot, then a refill whose
    // poll fails: both in the report.
    fake.push(["c"]);
    s.schedule().await.unwrap();
    fake.ledger().fail.insert((Callback::Stop, "c".into()));
    fake.ledger().error_answer = Some(true);
    fake.ledger().poll_fails = true;
    let r = s.stop_and_report("c").await.unwrap();
    let stages: Vec<_> = r.errors.iter().map(|e| e.stage).collect();
    assert_eq!(
        stages,
        [Stage::Callback(Callback::Stop), Stage::Poll],
        "{:?}",
        r.errors
    );
    assert!(r.started.is_empty());
    assert_eq!(r.idle, 1);

    // A failing stop_callback that keeps the slot: no refill, no idle slot.
    fake.ledger().poll_fails = false;
    fake.push(["d"]);
    let lease = s.schedule().await.unwrap().started[0].lease;
    fake.ledger().fail.insert((Callback::Stop, "d".into()));
    fake.ledger().error_answer = Some(false);
    assert!(matches!(
        s.stop_with_lease_and_report("d", lease - 1).await,
        Err(Error::LeaseLost { .. })
    ));
    let r = s.stop_with_lease_and_report("d", lease).await.unwrap();
    assert!(r.started.is_empty(), "{r:?}");
    assert_eq!(r.idle, 0);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(s.inspect().await.unwrap().slots[0].status, SlotStatus::Stopping);
}

#[tokio::test]
/// Unknown task ids are `WrongTaskId` for stop and keepalive, and change nothing.
async fn unknown_task_ids_are_refused() {
    let name = unique_name("unknown");
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let s = builder(&name, &fake, 2, LONG).build().await.unwrap();
    s.schedule().await.unwrap();
    let before = s.inspect().await.unwrap().slots;
    assert!(matches!(s.stop("nope").await, Err(Error::WrongTaskId(_))));
    assert!(matches!(s.keepalive("nope").await, Err(Error::WrongTaskId(_))));
    assert!(matches!(s.stop("").await, Err(Error::InvalidTaskId(_))));
    let huge = "x".repeat(task_semaphore::MAX_TASK_ID_LEN + 1);
    assert!(matches!(s.keepalive(&huge).await, Err(Error::InvalidTaskId(_))));
    assert_eq!(s.inspect().await.unwrap().slots, before);
}

#[tokio::test]
/// keepalive pushes the deadline by the slot's timeout and fires keepalive_callback.
async fn keepalive_extends_the_deadline() {
    let name = unique_name("keepalive");
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let s = builder(&name, &fake, 1, Duration::from_millis(600))
        .build()
        .await
        .unwrap();
    s.schedule().await.unwrap();
    let first = s.inspect().await.unwrap().slots[0].clone();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.keepalive("a").await.unwrap();
        assert!(s.schedule().await.unwrap().timed_out.is_empty());
    }
    let later = s.inspect().await.unwrap().slots[0].clone();
    assert!(later.deadline > first.deadline);
    assert!(later.last_keepalive_at > first.last_keepalive_at);
    assert_eq!(
        later
            .deadline
            .unwrap()
            .duration_since(later.last_keepalive_at.unwrap())
            .unwrap(),
        Duration::from_millis(600)
    );
    assert_eq!(later.lease, first.lease);
    assert_eq!(fake.ledger().count("keepalive", "a"), 4);
}

#[tokio::test]
/// A task past its deadline is timed out: timeout_callback, then stop_callback,
/// then the slot is refilled in the same tick; a late keepalive is refused.
async fn timeout_sweeps_then_refills_in_the_same_tick() {
    let name = unique_name("timeout");
    let fake = Fake::with_tasks("Jobs", ["a", "b"]);
    let s = builder(&name, &fake, 1, Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    s.schedule().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(s.keepalive("a").await, Err(Error::Expired { .. })));
    let r = s.schedule().await.unwrap();
    assert_eq!(r.timed_out.len(), 1);
    assert_eq!(r.timed_out[0].task_id, "a");
    assert_eq!(r.started.len(), 1);
    assert_eq!(r.started[0].task_id, "b");
    assert!(r.started[0].lease > r.timed_out[0].lease);
    assert_eq!(fake.ledger().events_of("a"), ["start", "timeout", "stop"]);
    assert!(matches!(s.keepalive("a").await, Err(Error::WrongTaskId(_))));
}

#[tokio::test]
/// A failing start frees the slot without stop_callback, after the error callback,
/// and that slot is not polled again in the same tick.
async fn failed_start_frees_the_slot() {
    let name = unique_name("startfail");
    let fake = Fake::with_tasks("Jobs", ["bad", "good"]);
    fake.ledger().fail.insert((Callback::Start, "bad".into()));
    fake.ledger().error_answer = Some(false); // ignored: a failed start always frees
    let s = builder(&name, &fake, 1, LONG).build().await.unwrap();
    let r = s.schedule().await.unwrap();
    assert!(r.started.is_empty());
    assert_eq!(r.errors[0].stage, Stage::Callback(Callback::Start));
    assert_eq!(fake.ledger().events_of("bad"), ["error:start_callback"]);
    assert_eq!(holders(&s).await["1"], None);
    // A later tick polls it again (a poll in the very millisecond the failed start
    // ended is refused as possibly stale, hence the pause); now let it succeed.
    fake.ledger().fail.clear();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = s.schedule().await.unwrap();
    assert_eq!(r.started[0].task_id, "bad");
}

#[tokio::test]
/// A failing poll is reported and does not keep other slots from filling.
async fn poll_error_does_not_stop_other_slots() {
    let name = unique_name("pollfail");
    let broken = Fake::new("Broken");
    broken.ledger().poll_fails = true;
    let ok = Fake::with_tasks("Ok", ["x"]);
    let s = Scheduler::builder(&name)
        .redis_url(common::redis_url())
        .backend(broken.clone())
        .backend(ok.clone())
        .slot(SlotConfig::new("a", ["Broken"]))
        .slot(SlotConfig::new("b", ["Broken", "Ok"]))
        .build()
        .await
        .unwrap();
    let r = s.schedule().await.unwrap();
    assert_eq!(r.started.len(), 1);
    assert_eq!(r.started[0].slot_id, "b");
    assert_eq!(r.errors.iter().filter(|e| e.stage == Stage::Poll).count(), 2);
    assert_eq!(r.idle, 1);
}

#[tokio::test]
/// A failing keepalive_callback keeps the slot when the error callback says so,
/// and frees it (with stop_callback) when it says true or fails itself.
async fn keepalive_callback_errors() {
    for (answer, freed) in [(Some(false), false), (Some(true), true), (None, true)] {
        let name = unique_name("kaerr");
        let fake = Fake::with_tasks("Jobs", ["a"]);
        fake.ledger().fail.insert((Callback::Keepalive, "a".into()));
        fake.ledger().error_answer = answer;
        let s = builder(&name, &fake, 1, LONG).build().await.unwrap();
        s.schedule().await.unwrap();
        s.keepalive("a").await.unwrap();
        let held = holders(&s).await["1"].clone();
        assert_eq!(held.is_none(), freed, "answer {answer:?}");
        let expected: &[&str] = if freed {
            &["start", "keepalive", "error:keepalive_callback", "stop"]
        } else {
            &["start", "keepalive", "error:keepalive_callback"]
        };
        assert_eq!(fake.ledger().events_of("a"), expected, "answer {answer:?}");
    }
}

#[tokio::test]
/// A failing stop_callback keeps the slot stopping (unclaimable) when the error
/// callback says false, and frees it when it says true.
async fn stop_callback_errors() {
    for (answer, freed) in [(Some(false), false), (Some(true), true), (None, true)] {
        let name = unique_name("stoperr");
        let fake = Fake::with_tasks("Jobs", ["a", "b"]);
        fake.ledger().fail.insert((Callback::Stop, "a".into()));
        fake.ledger().error_answer = answer;
        let s = builder(&name, &fake, 1, LONG).build().await.unwrap();
        s.schedule().await.unwrap();
        s.stop("a").await.unwrap();
        let slot = s.inspect().await.unwrap().slots[0].clone();
        if freed {
            assert_eq!(slot.task_id.as_deref(), Some("b"), "answer {answer:?}");
        } else {
            assert_eq!(slot.status, SlotStatus::Stopping);
            assert_eq!(slot.stopping_reason.as_deref(), Some("stop"));
            assert!(s.schedule().await.unwrap().started.is_empty());
        }
    }
}

#[tokio::test]
/// A failing timeout_callback: Ok(false) keeps the slot held (no stop_callback);
/// Ok(true) goes on to stop_callback and frees it.
async fn timeout_callback_errors() {
    for (answer, freed) in [(Some(false), false), (Some(true), true)] {
        let name = unique_name("toerr");
        let fake = Fake::with_tasks("Jobs", ["a"]);
        fake.ledger().fail.insert((Callback::Timeout, "a".into()));
        fake.ledger().error_answer = answer;
        let s = builder(&name, &fake, 1, Duration::from_millis(100))
            .build()
            .await
            .unwrap();
        s.schedule().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = s.schedule().await.unwrap();
        assert_eq!(r.timed_out.len(), 1);
        let events = fake.ledger().events_of("a");
        assert_eq!(events.contains(&"stop".to_owned()), freed, "{events:?}");
        let status = s.inspect().await.unwrap().slots[0].status.clone();
        assert_eq!(status == SlotStatus::Idle, freed, "{status:?}");
    }
}

#[tokio::test]
/// inspect shows every slot with its holder, lease and times, and backends' own views.
async fn inspect_shows_slots_and_backends() {
    let name = unique_name("inspect");
    let fake = Fake::with_tasks("Jobs", ["a", "b", "c"]);
    let s = builder(&name, &fake, 2, Duration::from_secs(90))
        .build()
        .await
        .unwrap();
    s.schedule().await.unwrap();
    let i = s.inspect().await.unwrap();
    assert_eq!(i.slots.len(), 2);
    let slot = &i.slots[0];
    assert_eq!(slot.status, SlotStatus::Busy);
    assert_eq!(slot.task_id.as_deref(), Some("a"));
    assert_eq!(slot.backend.as_deref(), Some("Jobs"));
    assert_eq!(slot.backends, ["Jobs"]);
    assert_eq!(slot.timeout, Some(Duration::from_secs(90)));
    assert_eq!(
        slot.deadline
            .unwrap()
            .duration_since(slot.started_at.unwrap())
            .unwrap(),
        Duration::from_secs(90)
    );
    assert_eq!(i.last_lease, i.slots[1].lease.unwrap());
    assert_eq!(i.backends["Jobs"], serde_json::json!({"pending": 1}));
    // Operators' view without the config: same slots.
    let by_name = task_semaphore::inspect_redis(&common::redis_url(), "task_semaphore", &name)
        .await
        .unwrap();
    assert_eq!(by_name.slots, i.slots);
}

#[tokio::test]
/// The slot hash is plain text, as the README documents it.
async fn slot_hash_is_readable_as_documented() {
    let name = unique_name("hash");
    let fake = Fake::with_tasks("Jobs", ["task:{1} é"]);
    let s = builder(&name, &fake, 1, Duration::from_secs(90))
        .build()
        .await
        .unwrap();
    let lease = s.schedule().await.unwrap().started[0].lease;
    // The key names the scheduler gives operators are the documented ones.
    assert_eq!(s.slot_key("1"), key(&name, "slot:1"));
    assert_eq!(s.deadlines_key(), key(&name, "deadlines"));
    assert_eq!(s.deadline_group_key("1"), key(&name, "due:0"));
    let mut r = raw(&common::redis_url()).await;
    let h: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(key(&name, "slot:1"))
        .query_async(&mut r)
        .await
        .unwrap();
    // Exactly the fields the README lists for a busy slot.
    let mut fields: Vec<&str> = h.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["backend", "backends", "due", "lease", "start", "task", "timeout"]
    );
    assert_eq!(h["task"], "task:{1} é");
    assert_eq!(h["backend"], "Jobs");
    assert_eq!(h["lease"], lease.to_string());
    assert_eq!(h["timeout"], "90000");
    assert_eq!(h["backends"], r#"["Jobs"]"#);
    let deadline: u64 = h["due"].parse().unwrap();
    let started: u64 = h["start"].parse().unwrap();
    assert_eq!(deadline - started, 90_000);
    // One slot: the task index has one bucket, `tasks:0`.
    assert_eq!(s.task_index_key("task:{1} é"), key(&name, "tasks:0"));
    let owner: String = redis::cmd("HGET")
        .arg(key(&name, "tasks:0"))
        .arg("task:{1} é")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(owner, "1");
    // One slot: the deadline index has one group, `due:0`, and its bound in
    // `deadlines` is the slot's deadline.
    let at: u64 = redis::cmd("HGET")
        .arg(key(&name, "due:0"))
        .arg("1")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(at, deadline);
    let score: u64 = redis::cmd("ZSCORE")
        .arg(key(&name, "deadlines"))
        .arg("0")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(score, deadline);
    let last: u64 = redis::cmd("GET")
        .arg(key(&name, "lease"))
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(last, lease);
    // No key name contains the task id.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("task_semaphore:{{{name}}}:*"))
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(keys.iter().all(|k| !k.contains("task:{1}")), "{keys:?}");
}

#[tokio::test]
/// run() ticks until shutdown, then returns.
async fn run_ticks_until_shutdown() {
    let name = unique_name("run");
    let fake = Fake::with_tasks("Jobs", ["a", "b"]);
    let s = builder(&name, &fake, 1, LONG).build().await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let s = s.clone();
        tokio::spawn(async move {
            s.run(Duration::from_millis(20), async { rx.await.unwrap_or(()) })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.ledger().count("start", "a"), 1);
    // Free the slot behind the scheduler's back of `stop`'s refill: the loop fills it.
    s.stop("a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.ledger().count("start", "b"), 1);
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), runner)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A backend that panics in poll for one slot's turn and in start_callback.
struct Panicky {
    polls: std::sync::atomic::AtomicUsize,
}

impl task_semaphore::Backend for Panicky {
    async fn poll(&self) -> Result<Option<String>, task_semaphore::BoxError> {
        if self.polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            panic!("poll blew up");
        }
        Ok(Some("p".into()))
    }
    async fn start_callback(&self, _task_id: &str) -> Result<(), task_semaphore::BoxError> {
        panic!("start blew up");
    }
}

#[tokio::test]
/// A panicking poll or callback is an error of the tick, not a crash: the tick goes
/// on, and a panicking start frees its slot like a failing one.
async fn panicking_backend_is_an_error_not_a_crash() {
    let name = unique_name("panic");
    let s = Scheduler::builder(&name)
        .redis_url(common::redis_url())
        .backend(Panicky {
            polls: Default::default(),
        })
        .slot(SlotConfig::new("1", ["Panicky"]))
        .slot(SlotConfig::new("2", ["Panicky"]))
        .build()
        .await
        .unwrap();
    let r = s.schedule().await.unwrap();
    assert!(r.started.is_empty());
    assert_eq!(r.errors[0].stage, Stage::Poll);
    assert!(
        r.errors[0].message.contains("poll panicked: poll blew up"),
        "{:?}",
        r.errors
    );
    assert_eq!(r.errors[1].stage, Stage::Callback(Callback::Start));
    assert!(
        r.errors[1].message.contains("start_callback panicked"),
        "{:?}",
        r.errors
    );
    assert!(holders(&s).await.values().all(Option::is_none));
}

#[tokio::test]
/// A timed-out task whose timeout_callback succeeded but whose stop_callback failed
/// (and backend_error_callback kept the slot) gets only stop_callback again at the
/// reclaim: timeout_callback runs once per lease.
async fn a_kept_timeout_reruns_only_stop_callback() {
    let name = unique_name("keptto");
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let s = builder(&name, &fake, 1, Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    s.schedule().await.unwrap();
    {
        let mut l = fake.ledger();
        l.fail.insert((Callback::Stop, "a".into()));
        l.error_answer = Some(false);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = s.schedule().await.unwrap();
    assert_eq!(r.timed_out.len(), 1, "{r:?}");
    let slot = &s.inspect().await.unwrap().slots[0];
    assert_eq!(slot.status, SlotStatus::Stopping, "{slot:?}");
    assert_eq!(slot.stopping_reason.as_deref(), Some("timeout_done"), "{slot:?}");

    fake.ledger().fail.clear();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = s.schedule().await.unwrap();
    assert_eq!(r.reclaimed.len(), 1, "{r:?}");
    let events = fake.ledger().events_of("a");
    assert_eq!(
        events,
        ["start", "timeout", "error:stop_callback", "stop"],
        "timeout_callback must run once"
    );
    assert_eq!(s.inspect().await.unwrap().slots[0].status, SlotStatus::Idle);
}

#[tokio::test]
/// A keepalive moves the slot's time in its group of the deadline index, not the
/// group's bound in `deadlines`: when that stale bound passes, a tick finds nothing
/// due (no callback runs) and settles the bound to the slot's deadline.
async fn a_stale_group_bound_is_settled_without_callbacks() {
    let name = unique_name("settle");
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let s = builder(&name, &fake, 1, Duration::from_millis(400))
        .build()
        .await
        .unwrap();
    s.schedule().await.unwrap();
    let mut r = raw(&common::redis_url()).await;
    let bound = |r: &mut redis::aio::MultiplexedConnection| {
        let mut r = r.clone();
        let name = name.clone();
        async move {
            let b: Option<u64> = redis::cmd("ZSCORE")
                .arg(key(&name, "deadlines"))
                .arg("0")
                .query_async(&mut r)
                .await
                .unwrap();
            b
        }
    };
    let first = bound(&mut r).await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.keepalive("a").await.unwrap();
    }
    assert_eq!(
        bound(&mut r).await,
        Some(first),
        "a keepalive left the bound alone"
    );
    let report = s.schedule().await.unwrap();
    assert!(report.timed_out.is_empty(), "{report:?}");
    assert_eq!(
        fake.ledger().events_of("a"),
        ["start", "keepalive", "keepalive", "keepalive", "keepalive"]
    );
    let due: u64 = redis::cmd("HGET")
        .arg(key(&name, "slot:1"))
        .arg("due")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(bound(&mut r).await, Some(due), "the tick settled the bound");
    assert!(due > first);
}

#[tokio::test]
/// A sweep settles its group's bound at the group's earliest time: a kept slot (its
/// stop_callback failed) is reclaimed at its own reclaim time, not at the deadline of
/// a long-running slot of the same group.
async fn a_kept_slot_is_reclaimed_on_time_beside_a_long_slot_of_its_group() {
    let name = unique_name("groupbound");
    let fake = Fake::with_tasks("Jobs", ["a", "b"]);
    let s = Scheduler::builder(&name)
        .redis_url(common::redis_url())
        .backend(fake.clone())
        .slot(SlotConfig::new("1", ["Jobs"]).timeout(Duration::from_millis(200)))
        .slot(SlotConfig::new("2", ["Jobs"]).timeout(Duration::from_secs(3600)))
        .build()
        .await
        .unwrap();
    assert_eq!(s.deadline_group_key("1"), s.deadline_group_key("2"));
    assert_eq!(s.schedule().await.unwrap().started.len(), 2);
    {
        let mut l = fake.ledger();
        l.fail.insert((Callback::Stop, "a".into()));
        l.error_answer = Some(false);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = s.schedule().await.unwrap();
    assert_eq!(r.timed_out.len(), 1, "{r:?}");
    fake.ledger().fail.clear();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = s.schedule().await.unwrap();
    assert_eq!(r.reclaimed.len(), 1, "{r:?}");
    assert_eq!(
        fake.ledger().events_of("a"),
        ["start", "timeout", "error:stop_callback", "stop"]
    );
}
