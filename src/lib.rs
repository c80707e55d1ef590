#![doc = include_str!("../README.md")]

mod backend;
mod config;
mod connection;
mod error;
mod keys;
mod pipelined;
mod report;
mod scheduler;
mod scripts;
mod slot;

pub use backend::{Backend, BoxError, Callback};
pub use config::{SlotConfig, DEFAULT_TIMEOUT};
pub use error::{Error, Result};
pub use report::{Inspection, ScheduleReport, SlotTask, Stage, TickError};
pub use scheduler::{
    inspect_redis, Scheduler, SchedulerBuilder, DEFAULT_KEY_PREFIX, MAX_CHUNK, MAX_TASK_ID_LEN,
};
pub use slot::{SlotState, SlotStatus};

/// The `deadpool-redis` crate this one is built with, for [`SchedulerBuilder::redis_pool`].
pub use deadpool_redis;
