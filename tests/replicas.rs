//! Several replicas of one scheduler racing on the same Redis and backlog.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{builder, holders, tasks, unique_name, Fake};
use task_semaphore::{Callback, Scheduler};

const LONG: Duration = Duration::from_secs(3600);

/// `n` replicas of scheduler `name`: each its own `Scheduler` and its own copy of the
/// backend, all copies sharing one ledger (one backlog, one record of callbacks).
async fn replicas(name: &str, fake: &Fake, n: usize, slots: usize, timeout: Duration) -> Vec<Scheduler> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(builder(name, fake, slots, timeout).build().await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
/// Replicas racing over a backlog (with slow polls, so results go stale) never run
/// more than N tasks, start every task exactly once and stop each once.
async fn racing_replicas_keep_the_cap_and_start_each_task_once() {
    race(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
/// The same race with `poll_many`: batched claims keep the same guarantees.
async fn racing_replicas_with_poll_many_keep_the_cap() {
    race(true).await;
}

async fn race(batch: bool) {
    let name = unique_name("race");
    let total = 150;
    let slots = 5;
    let mut fake = Fake::with_tasks("Jobs", tasks("t", total));
    fake.poll_delay = Some(Duration::from_millis(2));
    fake.batch = batch;
    let reps = replicas(&name, &fake, 4, slots, LONG).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::new();
    for s in reps.clone() {
        let done = done.clone();
        handles.push(tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                s.schedule().await.unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
    }
    // Workers: stop running tasks through any replica, as tasks finishing would.
    let mut turn = 0;
    loop {
        let (running, stopped) = {
            let l = fake.ledger();
            let stopped = l.events.iter().filter(|(e, _)| e == "stop").count();
            (l.running.iter().cloned().collect::<Vec<_>>(), stopped)
        };
        if stopped == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backlog not done: {stopped}/{total} stopped"
        );
        for task in running {
            turn += 1;
            let s = &reps[turn % reps.len()];
            // Another replica may have stopped it already: WrongTaskId is fine then.
            let _ = s.stop(&task).await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    let l = fake.ledger();
    assert!(l.max_running <= slots, "max running {} > {slots}", l.max_running);
    assert_eq!(l.starts.len(), total);
    for (task, starts) in &l.starts {
        assert_eq!(*starts, 1, "{task} started {starts} times");
        assert_eq!(
            l.count("stop", task),
            1,
            "{task} stopped {} times",
            l.count("stop", task)
        );
    }
    assert_eq!(l.events.iter().filter(|(e, _)| e == "timeout").count(), 0);
}

#[tokio::test]
/// A poll that predates a task's start and end does not start it again: replica B
/// polls T and stalls; A starts and stops T; B's claim of T is refused.
async fn stale_poll_does_not_restart_a_finished_task() {
    let name = unique_name("stale");
    let a = Fake::with_tasks("Jobs", ["T"]);
    let mut b = a.clone();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    b.poll_gate = Some(gate.clone());
    let ra = builder(&name, &a, 2, LONG).build().await.unwrap();
    let rb = builder(&name, &b, 2, LONG).build().await.unwrap();

    // B polls T, then waits at the gate before claiming.
    let stalled = tokio::spawn(async move { rb.schedule().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Meanwhile A starts T and T finishes.
    assert_eq!(ra.schedule().await.unwrap().started.len(), 1);
    ra.stop("T").await.unwrap();
    // B goes on with its stale poll result (and polls again for slot 2).
    gate.add_permits(100);
    let report = stalled.await.unwrap();
    assert!(report.started.is_empty(), "{:?}", report.started);
    assert_eq!(a.ledger().starts["T"], 1);
    assert!(holders(&ra).await.values().all(Option::is_none));

    // A fresh poll after the end may start it again (the task was re-queued).
    tokio::time::sleep(Duration::from_millis(5)).await;
    a.push(["T"]);
    assert_eq!(ra.schedule().await.unwrap().started.len(), 1);
    assert_eq!(a.ledger().starts["T"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
/// One timeout seen by three replicas at once: timeout_callback and stop_callback
/// fire once, one replica reports it, and the slot is refilled once.
async fn one_timeout_three_replicas_callbacks_once() {
    for round in 0..5 {
        let name = unique_name("timeout3");
        let fake = Fake::with_tasks("Jobs", ["a", "b", "c"]);
        let reps = replicas(&name, &fake, 3, 1, Duration::from_millis(150)).await;
        reps[0].schedule().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let reports = futures::future::join_all(reps.iter().map(|s| s.schedule())).await;
        let reports: Vec<_> = reports.into_iter().map(Result::unwrap).collect();
        let l = fake.ledger();
        assert_eq!(l.count("timeout", "a"), 1, "round {round}: {:?}", l.events);
        assert_eq!(l.count("stop", "a"), 1, "round {round}: {:?}", l.events);
        assert_eq!(reports.iter().map(|r| r.timed_out.len()).sum::<usize>(), 1);
        assert_eq!(reports.iter().map(|r| r.started.len()).sum::<usize>(), 1);
        assert_eq!(l.starts.get("b"), Some(&1));
        assert!(!l.starts.contains_key("c"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
/// `stop` racing the sweep of the same expired task ends the hold once:
/// stop_callback exactly once, timeout_callback at most once.
async fn stop_racing_the_sweep_ends_the_hold_once() {
    for round in 0..8 {
        let name = unique_name("stoprace");
        let fake = Fake::with_tasks("Jobs", ["a"]);
        let reps = replicas(&name, &fake, 2, 1, Duration::from_millis(100)).await;
        reps[0].schedule().await.unwrap();
        tokio::time::sleep(Duration::from_millis(95 + round)).await;
        let (stop, tick) = tokio::join!(reps[0].stop("a"), reps[1].schedule());
        tick.unwrap();
        let l = fake.ledger();
        assert_eq!(l.count("stop", "a"), 1, "round {round}: {:?} {stop:?}", l.events);
        assert!(l.count("timeout", "a") <= 1);
        // Whoever won, the other saw the task gone.
        if l.count("timeout", "a") == 1 {
            assert!(
                stop.is_err(),
                "round {round}: stop succeeded after the sweep took it"
            );
        } else {
            stop.unwrap();
        }
    }
}

#[tokio::test]
/// keepalive and stop work from any replica, and a replica's stale hint of where a
/// task is (it moved to another slot) is corrected, never acted on.
async fn keepalive_and_stop_from_any_replica() {
    let name = unique_name("anyreplica");
    let fake = Fake::with_tasks("Jobs", ["T"]);
    let reps = replicas(&name, &fake, 2, 2, LONG).await;
    // A starts T in slot 1 and remembers where it is.
    assert_eq!(reps[0].schedule().await.unwrap().started[0].slot_id, "1");
    // B (no hint) stops it; T is re-queued and B restarts it... in slot 1 again, so
    // occupy slot 1 first with another task to move T to slot 2.
    reps[1].keepalive("T").await.unwrap();
    fake.push(["U"]);
    reps[1].stop("T").await.unwrap(); // refills slot 1 with U
    tokio::time::sleep(Duration::from_millis(5)).await;
    fake.push(["T"]);
    let started = reps[1].schedule().await.unwrap().started;
    assert_eq!(
        (started[0].slot_id.as_str(), started[0].task_id.as_str()),
        ("2", "T")
    );
    // A's hint says slot 1 (now U's): the script refuses the hint, A finds slot 2.
    reps[0].keepalive("T").await.unwrap();
    reps[0].stop("T").await.unwrap();
    let h = holders(&reps[0]).await;
    assert_eq!(h["1"].as_deref(), Some("U"));
    assert_eq!(h["2"], None);
    let l = fake.ledger();
    assert_eq!(l.count("stop", "U"), 0);
    assert_eq!(l.count("stop", "T"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
/// A slot is not claimed by another replica while the callbacks of its previous
/// task (timeout_callback, stop_callback) are still running.
async fn slot_is_not_reused_before_callbacks_return() {
    for timed_out in [true, false] {
        let name = unique_name("reuse");
        let mut slow = Fake::with_tasks("Jobs", ["a", "b"]);
        // Callbacks must return within the slot timeout (400 ms), or the slot is reclaimed.
        slow.callback_delay = Some(Duration::from_millis(150));
        let fast = Fake {
            callback_delay: None,
            ..slow.clone()
        };
        let ra = builder(&name, &slow, 1, Duration::from_millis(400))
            .build()
            .await
            .unwrap();
        let rb = builder(&name, &fast, 1, Duration::from_millis(400))
            .build()
            .await
            .unwrap();
        ra.schedule().await.unwrap();
        let ending = if timed_out {
            tokio::time::sleep(Duration::from_millis(450)).await;
            tokio::spawn(async move { ra.schedule().await.map(drop) })
        } else {
            tokio::spawn(async move { ra.stop("a").await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A's callbacks are still running: B must not start b in that slot.
        let r = rb.schedule().await.unwrap();
        assert!(r.started.is_empty(), "timed_out={timed_out}: {:?}", r.started);
        ending.await.unwrap().unwrap();
        let l = slow.ledger();
        assert_eq!(l.max_running, 1, "timed_out={timed_out}: {:?}", l.events);
        assert_eq!(
            l.starts["b"], 1,
            "timed_out={timed_out}: refilled once callbacks returned"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
/// A replica whose stop_callback outlasts the reclaim time cannot free the slot
/// from under the task that got it next: free is checked against the lease.
async fn late_free_does_not_touch_the_next_holder() {
    let name = unique_name("latefree");
    let mut slow = Fake::with_tasks("Jobs", ["a"]);
    slow.callback_delay = Some(Duration::from_millis(500));
    let fast = Fake {
        callback_delay: None,
        ..slow.clone()
    };
    let ra = builder(&name, &slow, 1, Duration::from_millis(150))
        .build()
        .await
        .unwrap();
    let rb = builder(&name, &fast, 1, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    ra.schedule().await.unwrap();
    let stopping = {
        let ra = ra.clone();
        tokio::spawn(async move { ra.stop("a").await })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    fast.push(["b"]);
    let r = rb.schedule().await.unwrap();
    assert_eq!(r.reclaimed.len(), 1, "{r:?}");
    assert_eq!(r.started[0].task_id, "b");
    stopping.await.unwrap().unwrap();
    // a's late free found another lease in the slot and left it alone.
    assert_eq!(holders(&rb).await["1"].as_deref(), Some("b"));
    rb.keepalive("b").await.unwrap();
}

#[tokio::test]
/// A stop through a stale hint (the task moved to another slot since this replica
/// started it) frees the slot the task held, and refills that one, not the hinted one.
async fn stop_after_a_move_refills_the_slot_it_freed() {
    let name = unique_name("movedstop");
    let fake = Fake::with_tasks("Jobs", ["t"]);
    let r1 = builder(&name, &fake, 2, Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let r2 = builder(&name, &fake, 2, Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    r1.schedule().await.unwrap(); // t in slot 1; r1 remembers t -> 1
    r2.stop("t").await.unwrap();
    fake.push(["x"]);
    r2.schedule().await.unwrap(); // x in slot 1
    tokio::time::sleep(Duration::from_millis(5)).await;
    fake.push(["t"]);
    r2.schedule().await.unwrap(); // t again, in slot 2
    assert_eq!(holders(&r1).await["2"].as_deref(), Some("t"));
    fake.push(["next"]);
    r1.stop("t").await.unwrap(); // r1's hint says slot 1: MOVED to 2
    let h = holders(&r1).await;
    assert_eq!(h["1"].as_deref(), Some("x"), "{h:?}");
    assert_eq!(
        h["2"].as_deref(),
        Some("next"),
        "the freed slot was not refilled: {h:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A task id whose stop is still running its callbacks holds its slot until free:
/// re-queued meanwhile (a retry), it is not started in another slot by another
/// replica (it would run twice, its first stop_callback landing on the second run).
/// Once the first hold is freed (here by its reclaim), it starts again.
async fn a_stopping_task_is_not_started_again_before_its_free() {
    let name = unique_name("stoppingtask");
    let timeout = Duration::from_millis(400);
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let s1 = builder(&name, &fake, 2, timeout).build().await.unwrap();
    let s2 = builder(&name, &fake, 2, timeout).build().await.unwrap();
    s1.schedule().await.unwrap();
    fake.ledger().hang.insert((Callback::Stop, "a".into()));
    let stopping = {
        let s1 = s1.clone();
        tokio::spawn(async move { s1.stop("a").await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    fake.push(["a"]); // re-queued while its stop_callback runs
    let r = s2.schedule().await.unwrap();
    assert!(r.started.is_empty(), "started again while stopping: {r:?}");
    let h = holders(&s2).await;
    assert_eq!(
        h.values().filter(|t| t.as_deref() == Some("a")).count(),
        1,
        "{h:?}"
    );
    assert_eq!(fake.ledger().count("start", "a"), 1);

    // The stopping replica died in its callback: at the reclaim time the slot is
    // reclaimed (stop_callback once more), freed, and the task starts again.
    stopping.abort();
    fake.ledger().hang.clear();
    tokio::time::sleep(timeout + Duration::from_millis(100)).await;
    let r = s2.schedule().await.unwrap();
    assert_eq!(r.reclaimed.len(), 1, "{r:?}");
    assert_eq!(r.started.len(), 1, "{r:?}");
    assert_eq!(fake.ledger().events_of("a"), ["start", "stop", "start"]);
}
