//! A slot's state as read back from its Redis hash.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where a slot is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotStatus {
    /// Free: the next tick (or a `stop` in it) fills it.
    Idle,
    /// Held by a task until its deadline.
    Busy,
    /// Its task stopped or timed out and the callbacks are running; claimable again
    /// once they return, or at `reclaim_at` if the replica running them died.
    Stopping,
    /// No hash in Redis: the slot was never registered by a replica with this config.
    Missing,
    /// The hash holds data this crate did not write; the slot is never handed out.
    Corrupt(String),
}

/// One slot as [`Scheduler::inspect`](crate::Scheduler::inspect) shows it. Times
/// are Redis server times.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotState {
    /// The slot's id.
    pub slot_id: String,
    /// The backends it polls, in order.
    pub backends: Vec<String>,
    /// Idle, busy, stopping, missing or corrupt.
    pub status: SlotStatus,
    /// The task holding the slot (busy or stopping).
    pub task_id: Option<String>,
    /// The backend that task came from.
    pub backend: Option<String>,
    /// The lease number of the current hold.
    pub lease: Option<u64>,
    /// When the slot was claimed for the task.
    pub started_at: Option<SystemTime>,
    /// The last keepalive (the claim time if none came yet).
    pub last_keepalive_at: Option<SystemTime>,
    /// When the task times out unless it sends a keepalive.
    pub deadline: Option<SystemTime>,
    /// The slot's timeout, as stored in Redis.
    pub timeout: Option<Duration>,
    /// Why a stopping slot stopped: `stop`, `timeout` or `error`.
    pub stopping_reason: Option<String>,
    /// When a stopping slot becomes free even if its callbacks never return.
    pub reclaim_at: Option<SystemTime>,
}

/// Milliseconds since the Unix epoch (Redis `TIME`) as a `SystemTime`.
pub(crate) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The same strict number rule as the scripts: 1 to 15 digits, nothing else.
pub(crate) fn strict_u64(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 15 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl SlotState {
    /// A slot with nothing known yet but its id and backends.
    pub(crate) fn new(slot_id: String, backends: Vec<String>, status: SlotStatus) -> Self {
        SlotState {
            slot_id,
            backends,
            status,
            task_id: None,
            backend: None,
            lease: None,
            started_at: None,
            last_keepalive_at: None,
            deadline: None,
            timeout: None,
            stopping_reason: None,
            reclaim_at: None,
        }
    }

    /// Reads a slot from its hash fields, checking them as the scripts do.
    /// `backends` comes from the caller's config; `None` takes the hash's own list.
    pub(crate) fn from_fields(
        slot_id: String,
        backends: Option<Vec<String>>,
        mut fields: HashMap<String, String>,
    ) -> Self {
        let stored_backends = fields
            .get("backends")
            .and_then(|b| serde_json::from_str::<Vec<String>>(b).ok());
        let backends = backends.or(stored_backends).unwrap_or_default();
        let corrupt =
            |why: String| SlotState::new(slot_id.clone(), backends.clone(), SlotStatus::Corrupt(why));
        if fields.is_empty() {
            return SlotState::new(slot_id, backends, SlotStatus::Missing);
        }
        // No state field: it follows from the fields, as in lua/common.lua (read_slot).
        let timeout = fields.get("timeout").and_then(|t| strict_u64(t));
        // As lua/common.lua (read_slot) and the claim's idle check: other stray holder
        // fields on an idle slot are overwritten by its next claim.
        let holder = ["stopping", "lease"];
        let status = match (fields.get("task"), fields.contains_key("stopping")) {
            (None, _) if holder.iter().any(|f| fields.contains_key(*f)) => {
                return corrupt("has holder fields but no task".into())
            }
            (None, _) => SlotStatus::Idle,
            (Some(_), false) => SlotStatus::Busy,
            (Some(_), true) => SlotStatus::Stopping,
        };
        let Some(timeout) = timeout else {
            return corrupt("bad or missing field timeout".into());
        };
        let mut slot = SlotState::new(slot_id.clone(), backends.clone(), status.clone());
        slot.timeout = Some(Duration::from_millis(timeout));
        if status == SlotStatus::Idle {
            return slot;
        }
        let number = |field: &str| -> Result<u64, String> {
            fields
                .get(field)
                .and_then(|v| strict_u64(v))
                .ok_or_else(|| format!("bad or missing field {field}"))
        };
        let parsed = (|| -> Result<(), String> {
            slot.lease = Some(number("lease")?);
            slot.started_at = Some(from_ms(number("start")?));
            let due = number("due")?;
            slot.deadline = Some(from_ms(due));
            // A keepalive sets due = now + timeout, as the claim does with its start.
            slot.last_keepalive_at = Some(from_ms(due.saturating_sub(timeout)));
            if status == SlotStatus::Stopping {
                slot.reclaim_at = Some(from_ms(number("reclaim")?));
            }
            Ok(())
        })();
        if let Err(why) = parsed {
            return corrupt(why);
        }
        slot.task_id = fields.remove("task").filter(|t| !t.is_empty());
        slot.backend = fields.remove("backend");
        slot.stopping_reason = fields.remove("stopping");
        if slot.task_id.is_none() || slot.backend.is_none() {
            return corrupt("no task or backend".into());
        }
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    /// Numbers are read strictly, as the scripts read them.
    fn strict_numbers() {
        assert_eq!(strict_u64("12"), Some(12));
        for bad in ["", "12abc", "nan", "-1", "1e3", " 1", "1234567890123456"] {
            assert_eq!(strict_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    /// A busy slot with a garbage number is corrupt, not busy.
    fn garbage_is_corrupt() {
        let busy = [
            ("backends", r#"["B"]"#),
            ("timeout", "1000"),
            ("task", "t"),
            ("backend", "B"),
            ("lease", "3"),
            ("start", "1000"),
            ("due", "2500"),
        ];
        let ok = SlotState::from_fields("1".into(), None, fields(&busy));
        assert_eq!(ok.status, SlotStatus::Busy);
        assert_eq!(ok.lease, Some(3));
        assert_eq!(ok.backends, ["B"]);
        assert_eq!(ok.last_keepalive_at, Some(from_ms(1500)));
        let mut bad = busy;
        bad[4] = ("lease", "12abc");
        let slot = SlotState::from_fields("1".into(), None, fields(&bad));
        assert!(matches!(slot.status, SlotStatus::Corrupt(ref why) if why.contains("lease")));
        let idle = SlotState::from_fields("1".into(), None, fields(&busy[..2]));
        assert_eq!(idle.status, SlotStatus::Idle);
        for junk in [
            &[("weird", "1")][..],
            &[("timeout", "1000"), ("stopping", "stop")][..],
        ] {
            let slot = SlotState::from_fields("1".into(), None, fields(junk));
            assert!(matches!(slot.status, SlotStatus::Corrupt(_)), "{junk:?}");
        }
        let slot = SlotState::from_fields("1".into(), None, HashMap::new());
        assert_eq!(slot.status, SlotStatus::Missing);
    }
}
