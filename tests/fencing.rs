//! Leases as fencing tokens: the lease reaches the task at start, lease-checked
//! keepalive and stop refuse an old lease without touching the newer holder, and
//! callbacks cut short by a dying replica run again (at least once, same lease).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{builder, holders, unique_name, Fake};
use task_semaphore::{Callback, Error, SlotStatus};

#[tokio::test]
/// start/stop/timeout callbacks get the lease the report shows; the plain
/// callbacks still run (the defaults delegate).
async fn callbacks_get_the_lease() {
    let name = unique_name("leasecb");
    let fake = Fake::with_tasks("Jobs", ["a", "b"]);
    let s = builder(&name, &fake, 2, Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let r = s.schedule().await.unwrap();
    let lease_of = |t: &str| r.started.iter().find(|x| x.task_id == t).unwrap().lease;
    let (la, lb) = (lease_of("a"), lease_of("b"));
    s.stop_with_lease("a", la).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let r2 = s.schedule().await.unwrap();
    assert_eq!(r2.timed_out[0].lease, lb);
    let l = fake.ledger();
    let mut got = l.leases.clone();
    got.sort();
    assert_eq!(
        got,
        [
            ("start".to_owned(), "a".to_owned(), la),
            ("start".into(), "b".into(), lb),
            ("stop".into(), "a".into(), la),
            ("stop".into(), "b".into(), lb),
            ("timeout".into(), "b".into(), lb),
        ]
    );
    assert_eq!(l.events_of("b"), ["start", "timeout", "stop"]);
}

#[tokio::test]
/// A task id started again under a newer lease: the old lease's keepalive and stop
/// get LeaseLost naming the newer lease, and the newer hold is untouched.
async fn old_lease_never_touches_the_newer_holder() {
    let name = unique_name("fence");
    let fake = Fake::with_tasks("Jobs", ["t"]);
    let s = builder(&name, &fake, 1, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let old = s.schedule().await.unwrap().started[0].lease;
    s.keepalive_with_lease("t", old).await.unwrap();
    s.stop("t").await.unwrap();
    // Same task id queued again (after the stale-poll window of the ended task).
    tokio::time::sleep(Duration::from_millis(5)).await;
    fake.push(["t"]);
    let new = s.schedule().await.unwrap().started[0].lease;
    assert!(new > old);
    let before = s.inspect().await.unwrap().slots[0].clone();
    tokio::time::sleep(Duration::from_millis(5)).await;

    match s.keepalive_with_lease("t", old).await {
        Err(Error::LeaseLost {
            task_id,
            lease,
            current,
        }) => assert_eq!((task_id.as_str(), lease, current), ("t", old, Some(new))),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    let err = s.stop_with_lease("t", old).await.unwrap_err();
    assert!(
        matches!(err, Error::LeaseLost { current: Some(c), .. } if c == new),
        "{err}"
    );
    assert!(err.to_string().contains("lease"), "{err}");
    let after = s.inspect().await.unwrap().slots[0].clone();
    assert_eq!(after.status, SlotStatus::Busy);
    assert_eq!(after.lease, Some(new));
    assert_eq!(
        after.deadline, before.deadline,
        "the old lease extended the new hold"
    );
    assert_eq!(fake.ledger().count("stop", "t"), 1);

    // The current lease works.
    s.keepalive_with_lease("t", new).await.unwrap();
    s.stop_with_lease("t", new).await.unwrap();
    assert_eq!(holders(&s).await["1"], None);
    assert!(matches!(
        s.stop_with_lease("t", new).await,
        Err(Error::LeaseLost { current: None, .. })
    ));
}

#[tokio::test]
/// A zombie (a task past its deadline) learns it lost its slot: Expired before
/// the sweep, LeaseLost after; its stop frees nothing.
async fn zombie_learns_it_lost_the_slot() {
    let name = unique_name("zombie");
    let fake = Fake::with_tasks("Jobs", ["z", "next"]);
    let s = builder(&name, &fake, 1, Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let lease = s.schedule().await.unwrap().started[0].lease;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(matches!(
        s.keepalive_with_lease("z", lease).await,
        Err(Error::Expired { .. })
    ));
    let r = s.schedule().await.unwrap();
    assert_eq!(r.timed_out[0].lease, lease);
    assert_eq!(r.started[0].task_id, "next");
    assert!(matches!(
        s.keepalive_with_lease("z", lease).await,
        Err(Error::LeaseLost { current: None, .. })
    ));
    assert!(matches!(
        s.stop_with_lease("z", lease).await,
        Err(Error::LeaseLost { current: None, .. })
    ));
    // The plain forms keep their errors.
    assert!(matches!(s.keepalive("z").await, Err(Error::WrongTaskId(_))));
    assert_eq!(holders(&s).await["1"].as_deref(), Some("next"));
}

#[tokio::test]
/// A replica that dies inside timeout_callback (after its sweep took the slot):
/// once the slot's reclaim time passes, another replica runs timeout_callback and
/// stop_callback again with the same lease, and only then reuses the slot.
async fn callbacks_cut_short_by_a_crash_run_again() {
    let name = unique_name("crashcb");
    let timeout = Duration::from_millis(200);
    let dying = Fake::with_tasks("Jobs", ["a"]);
    dying.ledger().hang.insert((Callback::Timeout, "a".into()));
    let s1 = builder(&name, &dying, 1, timeout).build().await.unwrap();
    let lease = s1.schedule().await.unwrap().started[0].lease;
    tokio::time::sleep(Duration::from_millis(250)).await;
    // The sweep takes the slot, then hangs in timeout_callback: the replica "dies".
    assert!(tokio::time::timeout(Duration::from_millis(100), s1.schedule())
        .await
        .is_err());
    drop(s1);

    let other = Fake::with_tasks("Jobs", ["b"]);
    let s2 = builder(&name, &other, 1, timeout).build().await.unwrap();
    let r = s2.schedule().await.unwrap();
    assert!(r.started.is_empty() && r.reclaimed.is_empty(), "{r:?}");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let r = s2.schedule().await.unwrap();
    assert_eq!(r.reclaimed.len(), 1, "{r:?}");
    assert_eq!(r.reclaimed[0].lease, lease);
    assert_eq!(r.started[0].task_id, "b");
    let l = other.ledger();
    assert_eq!(
        l.leases[..2],
        [
            ("timeout".to_owned(), "a".to_owned(), lease),
            ("stop".into(), "a".into(), lease)
        ]
    );
    let events: Vec<_> = l.events.iter().map(|(e, t)| format!("{e} {t}")).collect();
    assert_eq!(events, ["timeout a", "stop a", "start b"]);
}

#[tokio::test]
/// A reclaimed slot is freed after its callbacks ran again, even when they fail
/// again and the error callback asks to keep it: no slot leaks for ever.
async fn reclaim_frees_even_when_callbacks_fail_again() {
    let name = unique_name("refail");
    let timeout = Duration::from_millis(150);
    let fake = Fake::with_tasks("Jobs", ["a", "b"]);
    {
        let mut l = fake.ledger();
        l.fail.insert((Callback::Stop, "a".into()));
        l.error_answer = Some(false); // keep the slot held
    }
    let s = builder(&name, &fake, 1, timeout).build().await.unwrap();
    s.schedule().await.unwrap();
    s.stop("a").await.unwrap();
    assert_eq!(s.inspect().await.unwrap().slots[0].status, SlotStatus::Stopping);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = s.schedule().await.unwrap();
    assert_eq!(r.reclaimed.len(), 1, "{r:?}");
    assert_eq!(r.started[0].task_id, "b");
    assert_eq!(fake.ledger().count(&format!("error:{}", Callback::Stop), "a"), 2);
}
