//! What the library logs through `tracing` for an operator to see.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{builder, unique_name, Fake, PrivateRedis};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// A subscriber that keeps the text of every WARN-or-worse event (of every event down
/// to DEBUG when `debug`).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>, bool);

struct Text<'a>(&'a mut String);

impl Visit for Text<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={value:?} ", field.name()));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let floor = if self.1 {
            tracing::Level::DEBUG
        } else {
            tracing::Level::WARN
        };
        *metadata.level() <= floor
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut text = String::new();
        event.record(&mut Text(&mut text));
        self.0.lock().unwrap().push(text);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[tokio::test]
/// build() warns when Redis may evict slot keys (an allkeys-* policy), and only then.
async fn eviction_policy_that_can_drop_slot_keys_is_warned_about() {
    for (policy, warned) in [
        ("allkeys-lru", true),
        ("noeviction", false),
        ("volatile-lru", false),
    ] {
        let Some(server) = PrivateRedis::start(&["--maxmemory-policy", policy]) else {
            return;
        };
        let capture = Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        let fake = Fake::new("Jobs");
        let name = unique_name("evict");
        let mut b = builder(&name, &fake, 1, Duration::from_secs(60));
        b = b.redis_url(server.url());
        b.build().await.unwrap();
        let logs = capture.0.lock().unwrap().join("\n");
        assert_eq!(
            logs.contains(&format!("maxmemory-policy {policy}")),
            warned,
            "{policy}: {logs}"
        );
    }
}

#[tokio::test]
/// A corrupt slot is in every tick's errors, but logged once (no flood), naming its key.
async fn corrupt_slot_is_logged_once_per_problem() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let name = unique_name("corruptlog");
    let s = builder(&name, &fake, 2, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    s.schedule().await.unwrap();
    let slot2 = common::key(&name, "slot:2");
    let mut conn = common::raw(&common::redis_url()).await;
    let _: () = redis::cmd("SET")
        .arg(&slot2)
        .arg("garbage")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SADD")
        .arg(common::key(&name, "idle"))
        .arg("2")
        .query_async(&mut conn)
        .await
        .unwrap();
    for _ in 0..3 {
        fake.push(["b"]);
        let r = s.schedule().await.unwrap();
        assert!(
            r.errors.iter().any(|e| e.message.contains(&slot2)),
            "{:?}",
            r.errors
        );
    }
    let logs = capture.0.lock().unwrap().clone();
    let about: Vec<_> = logs.iter().filter(|l| l.contains(&slot2)).collect();
    assert_eq!(about.len(), 1, "{logs:#?}");
}

#[tokio::test]
/// Lost state is logged as an error an operator cannot miss.
async fn lost_state_is_logged_loudly() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let name = unique_name("lostlog");
    let s = builder(&name, &fake, 1, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    s.schedule().await.unwrap();
    let mut conn = common::raw(&common::redis_url()).await;
    let _: () = redis::cmd("DEL")
        .arg(common::key(&name, "epoch"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(s.schedule().await.unwrap().state_lost);
    let logs = capture.0.lock().unwrap().join("\n");
    assert!(logs.contains("LOST THE STATE"), "{logs}");
    assert!(logs.contains(&common::key(&name, "epoch")), "{logs}");
}

#[tokio::test]
/// Every start is logged at debug level with its slot, task and lease: the start of
/// `stop()`'s refill too, which no report carries.
async fn the_start_of_a_stop_refill_is_logged_at_debug_level() {
    let capture = Capture(Arc::default(), true);
    let _guard = tracing::subscriber::set_default(capture.clone());
    let fake = Fake::with_tasks("Jobs", ["a"]);
    let name = unique_name("startlog");
    let s = builder(&name, &fake, 1, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    s.schedule().await.unwrap();
    fake.push(["b"]);
    s.stop("a").await.unwrap();
    let lease = s.inspect().await.unwrap().slots[0].lease.unwrap();
    let logs = capture.0.lock().unwrap().clone();
    let started: Vec<_> = logs
        .iter()
        .filter(|l| l.contains("started") && l.contains("task_id=\"b\""))
        .collect();
    assert_eq!(started.len(), 1, "{logs:#?}");
    assert!(
        started[0].contains("slot_id=\"1\"") && started[0].contains(&format!("lease={lease}")),
        "{started:?}"
    );
}

#[tokio::test]
/// build() warns when the state's bucket count, set by the replica that created it,
/// is too small for this config (more than 128 slots a bucket), and only then.
async fn a_config_that_outgrew_the_bucket_count_is_warned_about() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let fake = Fake::new("Jobs");
    let warned = |capture: &Capture| {
        let logs = capture.0.lock().unwrap().join("\n");
        logs.contains("task_buckets =")
    };
    // Created by a 2-slot config: one bucket.
    let name = unique_name("outgrown");
    builder(&name, &fake, 2, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    builder(&name, &fake, 128, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    assert!(!warned(&capture), "128 slots fit one bucket");
    builder(&name, &fake, 300, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let logs = capture.0.lock().unwrap().join("\n");
    assert!(
        logs.contains("has task_buckets = 1,") && logs.contains("this config has 300"),
        "{logs}"
    );
    // A state created by the 300-slot config itself: no warning.
    capture.0.lock().unwrap().clear();
    builder(&unique_name("sized"), &fake, 300, Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    assert!(!warned(&capture), "{:?}", capture.0.lock().unwrap());
}
