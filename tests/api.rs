//! The public API as the design brief writes it, used the way a downstream crate
//! would: a backend of plain `async fn`s, every listed method, every listed field.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use task_semaphore::{
    deadpool_redis, Backend, BoxError, Callback, Error, Inspection, ScheduleReport, Scheduler,
    SchedulerBuilder, SlotState, SlotTask,
};

/// Only the two required methods, with the default name.
struct MinimalBackend;

impl Backend for MinimalBackend {
    async fn poll(&self) -> Result<Option<String>, BoxError> {
        Ok(Some("only-task".into()))
    }
    async fn start_callback(&self, _task_id: &str) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Every method overridden, as plain `async fn`s.
struct FullBackend;

impl Backend for FullBackend {
    fn name(&self) -> &str {
        "Full"
    }
    async fn poll(&self) -> Result<Option<String>, BoxError> {
        Ok(None)
    }
    async fn start_callback(&self, _task_id: &str) -> Result<(), BoxError> {
        Ok(())
    }
    async fn stop_callback(&self, _task_id: &str) -> Result<(), BoxError> {
        Ok(())
    }
    async fn timeout_callback(&self, _task_id: &str) -> Result<(), BoxError> {
        Ok(())
    }
    async fn keepalive_callback(&self, _task_id: &str) -> Result<(), BoxError> {
        Ok(())
    }
    async fn backend_error_callback(
        &self,
        _task_id: &str,
        _error: &BoxError,
        callback: Callback,
    ) -> Result<bool, BoxError> {
        Ok(match callback {
            Callback::Start | Callback::Stop | Callback::Timeout | Callback::Keepalive => false,
        })
    }
    async fn inspect(&self) -> serde_json::Value {
        serde_json::json!({"kind": "full"})
    }
}

#[tokio::test]
/// Every method of the contract compiles and works from outside the crate.
async fn contract_as_written() {
    let name = common::unique_name("api");
    let pool = deadpool_redis::Config::from_url(common::redis_url())
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let builder: SchedulerBuilder = Scheduler::builder(name.clone())
        .redis_pool(pool)
        .backend(MinimalBackend)
        .backend(FullBackend)
        .load_json(r#"[{"slot_id": 1, "backends": ["Full", "MinimalBackend"], "slot_cls": "RedisSlot"}]"#);
    let scheduler: Scheduler = builder.build().await.unwrap();

    let report: ScheduleReport = scheduler.schedule().await.unwrap();
    let started: &SlotTask = &report.started[0];
    let (_slot, task, backend, lease): (&String, &String, &String, u64) = (
        &started.slot_id,
        &started.task_id,
        &started.backend,
        started.lease,
    );
    assert_eq!((task.as_str(), backend.as_str()), ("only-task", "MinimalBackend"));
    assert!(lease >= 1);
    assert!(report.timed_out.is_empty());

    scheduler.keepalive("only-task").await.unwrap();
    let inspection: Inspection = scheduler.inspect().await.unwrap();
    let slot: &SlotState = &inspection.slots[0];
    let _: (
        &String,
        &Vec<String>,
        &Option<String>,
        &Option<String>,
        Option<u64>,
    ) = (
        &slot.slot_id,
        &slot.backends,
        &slot.task_id,
        &slot.backend,
        slot.lease,
    );
    let _: (Option<SystemTime>, Option<SystemTime>, Option<SystemTime>) =
        (slot.started_at, slot.last_keepalive_at, slot.deadline);
    let backends: &BTreeMap<String, serde_json::Value> = &inspection.backends;
    assert_eq!(backends["Full"], serde_json::json!({"kind": "full"}));
    assert_eq!(backends["MinimalBackend"], serde_json::json!({}));

    scheduler.stop("only-task").await.unwrap();
    let err: Error = scheduler.stop("never-started").await.unwrap_err();
    assert!(matches!(err, Error::WrongTaskId(..)));
    let as_std: &dyn std::error::Error = &err;
    assert_eq!(as_std.to_string(), "task \"never-started\" holds no slot");

    scheduler.run(Duration::from_millis(10), async {}).await.unwrap();
}
