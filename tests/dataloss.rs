//! Lost state (a restart without persistence, FLUSHALL) is detected through the
//! epoch, starts a quarantine, and never lets lease numbers repeat.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime};

use common::{builder, key, raw, redis_url, unique_name, Fake, PrivateRedis};
use task_semaphore::{Scheduler, SlotConfig, SlotStatus};

/// Deletes every key of scheduler `name`: FLUSHALL for that scheduler only, so the
/// shared test server keeps other tests' keys.
async fn lose_state(name: &str) {
    let mut conn = raw(&redis_url()).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(key(name, "*").replace('{', "\\{").replace('}', "\\}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
}

#[tokio::test]
/// After the state is lost, no replica grants a slot for the longest slot timeout
/// (not even one built after the loss, nor a stop's refill); then work resumes,
/// with leases above every lease seen before.
async fn lost_state_quarantines_every_replica() {
    let name = unique_name("quarantine");
    let timeout = Duration::from_millis(600);
    let fake = Fake::with_tasks("Jobs", ["a", "b"]);
    let s = builder(&name, &fake, 2, timeout).build().await.unwrap();
    let first = s.schedule().await.unwrap();
    let max_before = first.started.iter().map(|t| t.lease).max().unwrap();
    let epoch_before = s.inspect().await.unwrap().epoch.unwrap();

    lose_state(&name).await;
    fake.push(["c", "d"]);
    let r = s.schedule().await.unwrap();
    assert!(r.state_lost, "{r:?}");
    assert!(r.started.is_empty(), "{r:?}");
    let until = r.quarantined_until.expect("quarantine");
    let i = s.inspect().await.unwrap();
    assert_eq!(i.quarantined_until, Some(until));
    assert_ne!(i.epoch.as_deref(), Some(epoch_before.as_str()));
    assert!(
        until > i.now + timeout - Duration::from_millis(200),
        "{until:?} vs {:?}",
        i.now
    );
    assert!(
        i.slots.iter().all(|slot| slot.status == SlotStatus::Idle),
        "{i:?}"
    );
    // The old generation's tasks learn they lost their slots.
    assert!(s.keepalive("a").await.is_err());

    // A replica built after the loss honours the quarantine it finds in Redis.
    let other = Fake::with_tasks("Jobs", ["c", "d"]);
    let s2 = builder(&name, &other, 2, timeout).build().await.unwrap();
    let r2 = s2.schedule().await.unwrap();
    assert!(r2.started.is_empty() && !r2.state_lost, "{r2:?}");
    assert_eq!(r2.quarantined_until, Some(until));
    assert!(other.ledger().events.is_empty());

    tokio::time::sleep(
        until.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(50),
    )
    .await;
    let r = s.schedule().await.unwrap();
    assert_eq!(r.started.len(), 2, "{r:?}");
    assert!(r.quarantined_until.is_none() && !r.state_lost, "{r:?}");
    assert!(
        r.started.iter().all(|t| t.lease > max_before),
        "leases repeated: before {max_before}, after {:?}",
        r.started
    );
}

#[tokio::test]
/// With the quarantine turned off the loss is still detected and reported, and
/// work goes on at once.
async fn quarantine_can_be_turned_off() {
    let name = unique_name("noquarantine");
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let s = builder(&name, &fake, 1, Duration::from_secs(3600))
        .quarantine_on_data_loss(false)
        .build()
        .await
        .unwrap();
    s.schedule().await.unwrap();
    lose_state(&name).await;
    fake.push(["b"]);
    let r = s.schedule().await.unwrap();
    assert!(r.state_lost && r.quarantined_until.is_none(), "{r:?}");
    assert_eq!(r.started[0].task_id, "b");
}

#[tokio::test]
/// Lease numbers never repeat, even when no replica saw the old state: a missing
/// counter starts from Redis time (ms x 100), above any earlier lease.
async fn leases_do_not_repeat_when_nobody_noticed() {
    let name = unique_name("leasefloor");
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let s = builder(&name, &fake, 1, Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let old = s.schedule().await.unwrap().started[0].lease;
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(old > (now_ms - 60_000) * 100, "lease {old} is not time-based");
    drop(s);
    lose_state(&name).await;
    // A brand-new replica: it cannot know the state was lost.
    let fresh = Fake::with_tasks("Jobs", ["a"]);
    let s = builder(&name, &fresh, 1, Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    let new = s.schedule().await.unwrap().started[0].lease;
    assert!(new > old, "lease {new} after the loss, {old} before");
}

#[tokio::test]
/// A real restart without persistence: the replica detects it on its next tick.
async fn restart_without_persistence_is_detected() {
    let Some(mut server) = PrivateRedis::start(&[]) else {
        return;
    };
    let name = unique_name("restartloss");
    let fake = Fake::with_tasks("Jobs", ["a", "b"]);
    let s = Scheduler::builder(&name)
        .redis_url(server.url())
        .backend(fake.clone())
        .slot(SlotConfig::new("1", ["Jobs"]).timeout(Duration::from_secs(3600)))
        .build()
        .await
        .unwrap();
    let old = s.schedule().await.unwrap().started[0].lease;
    server.restart();
    let r = s.schedule().await.unwrap();
    assert!(r.state_lost && r.started.is_empty(), "{r:?}");
    assert!(r.quarantined_until.is_some());
    let i = s.inspect().await.unwrap();
    assert!(
        i.last_lease >= old,
        "counter {} below the lease {old} seen",
        i.last_lease
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A claim racing the detection (its tick read no quarantine, its poll was slow)
/// is refused by the claim script itself.
async fn claim_in_flight_is_refused_by_the_quarantine() {
    let name = unique_name("quarantinerace");
    let timeout = Duration::from_secs(3600);
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let s = builder(&name, &fake, 1, timeout).build().await.unwrap();
    s.schedule().await.unwrap();
    s.stop("a").await.unwrap();
    let mut slow = Fake::with_tasks("Jobs", ["x"]);
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    slow.poll_gate = Some(gate.clone());
    let s2 = builder(&name, &slow, 1, timeout).build().await.unwrap();
    let in_flight = tokio::spawn(async move { s2.schedule().await });
    tokio::time::sleep(Duration::from_millis(100)).await;

    lose_state(&name).await;
    let r = s.schedule().await.unwrap();
    assert!(r.state_lost && r.quarantined_until.is_some(), "{r:?}");
    gate.add_permits(10);
    let r2 = in_flight.await.unwrap().unwrap();
    assert!(r2.started.is_empty(), "claimed during the quarantine: {r2:?}");
    assert!(slow.ledger().events.is_empty());
}

/// Replicas `a` and `b` each start a task, `b` after the lease counter was pushed
/// `ahead` past `a`'s lease; the state is lost and only `a`, which never saw `b`'s
/// lease, ticks: its first lease once the quarantine is over must be above `b`'s.
async fn assert_no_lease_repeats_after_loss(test: &str, ahead: u64) {
    let name = unique_name(test);
    let (fa, fb) = (Fake::with_tasks("Jobs", ["a"]), Fake::with_tasks("Jobs", ["b"]));
    let timeout = Duration::from_millis(600);
    let a = builder(&name, &fa, 2, timeout).build().await.unwrap();
    let b = builder(&name, &fb, 2, timeout).build().await.unwrap();
    let la = a.schedule().await.unwrap().started[0].lease;
    if ahead > 0 {
        let mut conn = raw(&redis_url()).await;
        let _: () = redis::cmd("SET")
            .arg(key(&name, "lease"))
            .arg(la + ahead)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let lb = b.schedule().await.unwrap().started[0].lease;
    assert!(lb > la + ahead);
    lose_state(&name).await;
    // Only `a` ticks: it detects the loss and recreates the counter.
    let r = a.schedule().await.unwrap();
    assert!(r.state_lost && r.started.is_empty(), "{r:?}");
    tokio::time::sleep(timeout + Duration::from_millis(50)).await;
    fa.push(["c"]);
    let lc = a.schedule().await.unwrap().started[0].lease;
    assert!(lc > lb, "lease {lc} after the loss repeats one of before ({lb})");
}

#[tokio::test]
/// The replica that detects the loss may not have seen the highest leases (another
/// replica handed them out): the leases it grants after the quarantine are still
/// above them, even when all of it happens within one millisecond.
async fn leases_do_not_repeat_when_the_detector_saw_fewer() {
    assert_no_lease_repeats_after_loss("leasedetect", 0).await;
}

#[tokio::test]
/// The lost generation's leases ran ahead of Redis time x 100 (a burst of claims, more
/// than 100 a millisecond, as a batched fill makes; here the counter is pushed 20,000
/// ahead), and the replica that detects the loss never saw them: the first lease after
/// the quarantine is still above them, because a claim's lease never lags the clock.
async fn leases_after_the_quarantine_are_above_a_lost_burst() {
    assert_no_lease_repeats_after_loss("leaseburst", 20_000).await;
}

#[tokio::test]
/// The quarantine runs from the new epoch's creation: a replica that notices the loss
/// later (it was cut off from Redis meanwhile) reports it, but neither extends the
/// quarantine nor starts a new one once it is over. Every lease of the lost
/// generation was granted before that epoch existed.
async fn a_late_detector_does_not_restart_the_quarantine() {
    let name = unique_name("latedetect");
    let timeout = Duration::from_millis(800);
    let (fa, fb, fc) = (
        Fake::with_tasks("Jobs", ["a"]),
        Fake::with_tasks("Jobs", ["b"]),
        Fake::with_tasks("Jobs", ["c"]),
    );
    let a = builder(&name, &fa, 3, timeout).build().await.unwrap();
    let b = builder(&name, &fb, 3, timeout).build().await.unwrap();
    let c = builder(&name, &fc, 3, timeout).build().await.unwrap();
    for s in [&a, &b, &c] {
        assert_eq!(s.schedule().await.unwrap().started.len(), 1);
    }
    lose_state(&name).await;
    let ra = a.schedule().await.unwrap();
    let until = ra.quarantined_until.expect("quarantine");
    assert!(ra.state_lost, "{ra:?}");

    // Within the quarantine: b detects too, and the end stays where a put it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rb = b.schedule().await.unwrap();
    assert!(rb.state_lost && rb.started.is_empty(), "{rb:?}");
    assert_eq!(rb.quarantined_until, Some(until), "b moved the quarantine");

    // After it: c detects, and starts its task at once.
    tokio::time::sleep(
        until.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(50),
    )
    .await;
    fc.push(["c2"]);
    let rc = c.schedule().await.unwrap();
    assert!(rc.state_lost, "{rc:?}");
    assert!(
        rc.quarantined_until.is_none(),
        "c started a new quarantine: {rc:?}"
    );
    assert!(rc.started.iter().any(|t| t.task_id == "c2"), "{rc:?}");
}

#[tokio::test]
/// A replica that only serves keepalive and stop (it never ticks) follows a new
/// epoch's task buckets: after a loss, a replica with more slots recreates the state
/// with more buckets, and the old replica still finds the tasks it starts.
async fn a_replica_that_never_ticks_follows_new_task_buckets() {
    let name = unique_name("buckets");
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let api_only = builder(&name, &fake, 1, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    assert_eq!(api_only.task_index_key("x"), key(&name, "tasks:0"));

    lose_state(&name).await;
    let tasks: Vec<String> = (0..64).map(|i| format!("t{i}")).collect();
    let big = Fake::with_tasks("Jobs", tasks.clone());
    let ticker = builder(&name, &big, 64, Duration::from_secs(60))
        .quarantine_on_data_loss(false)
        .build()
        .await
        .unwrap();
    assert_eq!(ticker.schedule().await.unwrap().started.len(), 64);
    let moved = tasks
        .iter()
        .find(|t| ticker.task_index_key(t) == key(&name, "tasks:1"))
        .expect("a task in the second bucket");
    api_only.keepalive(moved).await.unwrap();
    assert_eq!(api_only.task_index_key(moved), key(&name, "tasks:1"));
    api_only.stop(moved).await.unwrap();
    assert!(ticker.keepalive(moved).await.is_err(), "{moved} was stopped");
}
