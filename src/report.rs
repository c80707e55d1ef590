//! What a tick did, and what `inspect` sees.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::backend::Callback;
use crate::slot::SlotState;

/// A task in a slot under one lease: started, timed out or reclaimed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotTask {
    /// The slot.
    pub slot_id: String,
    /// The task.
    pub task_id: String,
    /// The backend the task came from.
    pub backend: String,
    /// The lease number of this hold: strictly increasing per scheduler.
    pub lease: u64,
    /// Redis server time of the event (claim, timeout or reclaim).
    pub at: SystemTime,
}

/// Which step of a tick an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// A backend's `poll`.
    Poll,
    /// A backend callback (already passed to `backend_error_callback`).
    Callback(Callback),
    /// A backend's `backend_error_callback` itself.
    ErrorCallback(Callback),
    /// Claiming, sweeping or freeing a slot in Redis; or a key of the split indexes
    /// (a task bucket, a deadline group) that holds foreign data, named in the message.
    Redis,
    /// A slot whose Redis hash is unreadable; it is left alone.
    CorruptSlot,
    /// The slot's backend is not registered in this replica.
    UnknownBackend,
}

/// An error met during a tick that did not stop the tick.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TickError {
    /// Where it happened.
    pub stage: Stage,
    /// The slot concerned, if any.
    pub slot_id: Option<String>,
    /// The backend concerned, if any.
    pub backend: Option<String>,
    /// The task concerned, if any.
    pub task_id: Option<String>,
    /// The error, as text.
    pub message: String,
}

/// What one [`Scheduler::schedule`](crate::Scheduler::schedule) tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScheduleReport {
    /// Tasks claimed and started, in slot order.
    pub started: Vec<SlotTask>,
    /// Tasks whose deadline passed, taken by this replica's sweep.
    pub timed_out: Vec<SlotTask>,
    /// Stopping slots whose callbacks never finished (their replica died), made
    /// idle again at their reclaim time.
    pub reclaimed: Vec<SlotTask>,
    /// Errors that did not stop the tick: a failing poll or callback, a corrupt slot.
    pub errors: Vec<TickError>,
    /// Slots of this replica's config still idle after the tick.
    pub idle: usize,
    /// This tick found that Redis lost the scheduler's state (a restart without
    /// persistence, `FLUSHALL`, a failover that lost writes): the slots were
    /// registered again and the quarantine started (or, when another replica noticed
    /// first, the quarantine it started holds). Also logged as an error.
    pub state_lost: bool,
    /// When a quarantine after lost state is in force: no slot is granted before
    /// this Redis time, so tasks of the lost generation can finish or time out.
    pub quarantined_until: Option<SystemTime>,
}

/// A scheduler's state: every slot of this replica's config and what each backend
/// reports of itself.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Inspection {
    /// The scheduler's name.
    pub name: String,
    /// Redis server time when the slots were read.
    pub now: SystemTime,
    /// The last lease number handed out (0 before the first claim).
    pub last_lease: u64,
    /// The id of the current epoch: one unbroken life of the state in Redis.
    pub epoch: Option<String>,
    /// A quarantine after lost state, while it lasts.
    pub quarantined_until: Option<SystemTime>,
    /// The slots, in configuration order.
    pub slots: Vec<SlotState>,
    /// Each backend's [`Backend::inspect`](crate::Backend::inspect), by name.
    pub backends: BTreeMap<String, serde_json::Value>,
}
