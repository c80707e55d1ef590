//! The one error type of the crate.

use std::time::Duration;

/// What went wrong in a [`Scheduler`](crate::Scheduler) call.
///
/// Messages are lowercase without a trailing period; the underlying error, when
/// there is one, is the [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `stop` or `keepalive` named a task that holds no slot (it never started,
    /// already stopped, or was timed out and swept).
    #[error("task {0:?} holds no slot")]
    WrongTaskId(String),

    /// `keepalive` came after the task's deadline: the task has lost its slot and
    /// the next sweep times it out.
    #[error("task {task_id:?} passed its deadline in slot {slot_id:?} and is being timed out")]
    Expired {
        /// The task that asked for more time.
        task_id: String,
        /// The slot it held.
        slot_id: String,
    },

    /// A lease-checked call ([`keepalive_with_lease`](crate::Scheduler::keepalive_with_lease),
    /// [`stop_with_lease`](crate::Scheduler::stop_with_lease)) named a lease that no
    /// longer holds the task: it was stopped or timed out, and maybe the task id was
    /// started again under a newer lease. Nothing was extended or freed; a task that
    /// gets this error should stop its work.
    #[error("lease {lease} of task {task_id:?} has ended{}", now_held(*.current))]
    LeaseLost {
        /// The task id of the call.
        task_id: String,
        /// The lease the caller holds.
        lease: u64,
        /// The lease that holds the task id now, if it holds a slot at all.
        current: Option<u64>,
    },

    /// A task id that cannot be stored: empty, or longer than
    /// [`MAX_TASK_ID_LEN`](crate::MAX_TASK_ID_LEN) bytes.
    #[error("invalid task id: {0}")]
    InvalidTaskId(String),

    /// The configuration (JSON, builder calls, scheduler name or key prefix) is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A key of the scheduler holds data this crate did not write: wrong type,
    /// missing fields, garbage numbers. Other slots are not affected.
    #[error("corrupt state in redis key {key}: {detail}")]
    CorruptState {
        /// The full name of the key.
        key: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A Redis command failed.
    #[error("redis error while {context}")]
    Redis {
        /// What the scheduler was doing.
        context: &'static str,
        /// The error from the `redis` crate.
        #[source]
        source: redis::RedisError,
    },

    /// No connection could be taken from the pool.
    #[error("no redis connection while {context}")]
    Pool {
        /// What the scheduler was doing.
        context: &'static str,
        /// The error from `deadpool-redis`.
        #[source]
        source: deadpool_redis::PoolError,
    },

    /// Redis did not answer in time (see
    /// [`SchedulerBuilder::redis_timeout`](crate::SchedulerBuilder::redis_timeout)).
    #[error("redis did not answer within {after:?} while {context}")]
    Timeout {
        /// What the scheduler was doing.
        context: &'static str,
        /// How long it waited.
        after: Duration,
    },
}

fn now_held(current: Option<u64>) -> String {
    match current {
        Some(lease) => format!(" (the task id is held under lease {lease} now)"),
        None => String::new(),
    }
}

impl Error {
    /// Whether the error says the connection itself is gone, so that a fresh
    /// connection may succeed where this one failed.
    pub(crate) fn is_connection_error(&self) -> bool {
        match self {
            Error::Redis { source, .. } => {
                source.is_io_error()
                    || source.is_connection_dropped()
                    || source.is_unrecoverable_error()
                    || source.is_connection_refusal()
            }
            Error::Pool { .. } | Error::Timeout { .. } => true,
            _ => false,
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
