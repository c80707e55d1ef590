//! What the library logs through `tracing` for an operator to see.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{builder, unique_name, Fake, PrivateRedis};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// A subscriber that keeps the text of every WARN-or-worse event.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

struct Text<'a>(&'a mut String);

impl Visit for Text<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={value:?} ", field.name()));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
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
