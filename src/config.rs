//! Slot configuration: the JSON format of the predecessor, and its checks.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// A slot's timeout when the configuration gives none: 8 hours, as in the predecessor.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(8 * 3600);

/// The longest timeout accepted: ten years.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The longest slot id, scheduler name or key prefix accepted, in bytes.
const MAX_NAME_LEN: usize = 256;

/// One slot: its id, the backends it polls in order, and its timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotConfig {
    /// The slot's id, unique within the scheduler; part of the slot's Redis key.
    pub slot_id: String,
    /// Names of the backends the slot polls, in order.
    pub backends: Vec<String>,
    /// How long a task may hold the slot without a keepalive.
    pub timeout: Duration,
}

impl SlotConfig {
    /// A slot polling `backends` in order, with the [`DEFAULT_TIMEOUT`].
    pub fn new<S: Into<String>>(slot_id: impl Into<String>, backends: impl IntoIterator<Item = S>) -> Self {
        SlotConfig {
            slot_id: slot_id.into(),
            backends: backends.into_iter().map(Into::into).collect(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same slot with another timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The timeout in whole milliseconds, as the scripts store it.
    pub(crate) fn timeout_ms(&self) -> u64 {
        u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// Checks what the JSON parser and the builder cannot: id and timeout.
    pub(crate) fn validate(&self) -> Result<()> {
        validate_name("slot id", &self.slot_id)?;
        if self.backends.is_empty() {
            return Err(Error::Config(format!("slot {:?} has no backends", self.slot_id)));
        }
        if self.timeout < Duration::from_millis(1) || self.timeout > MAX_TIMEOUT {
            return Err(Error::Config(format!(
                "slot {:?} has timeout {:?}; it must be between 1ms and 10 years",
                self.slot_id, self.timeout
            )));
        }
        Ok(())
    }
}

/// A slot as the JSON gives it. Unknown fields are errors: a typo must not pass silently.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlot {
    slot_id: Value,
    backends: Vec<String>,
    #[serde(default)]
    slot_cls: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    slot_kwargs: Option<serde_json::Map<String, Value>>,
}

/// Parses a JSON list of slots, as the predecessor's `Scheduler.load` took it.
pub(crate) fn parse_json(json: &str) -> Result<Vec<SlotConfig>> {
    let raw: Vec<RawSlot> =
        serde_json::from_str(json).map_err(|e| Error::Config(format!("slot list is not valid: {e}")))?;
    raw.into_iter()
        .enumerate()
        .map(|(i, raw)| parse_slot(i, raw))
        .collect()
}

fn parse_slot(index: usize, raw: RawSlot) -> Result<SlotConfig> {
    let slot_id = match raw.slot_id {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        other => {
            return Err(Error::Config(format!(
                "slot #{index}: slot_id must be a number or a string, not {other}"
            )))
        }
    };
    let what = |msg: String| Error::Config(format!("slot {slot_id:?}: {msg}"));
    if let Some(cls) = &raw.slot_cls {
        if cls != "RedisSlot" {
            return Err(what(format!(
                "slot_cls {cls:?} is not supported; the only slot class is \"RedisSlot\""
            )));
        }
    }
    let mut timeout = None;
    if let Some(text) = &raw.timeout {
        let parsed = humantime::parse_duration(text)
            .map_err(|e| what(format!("timeout {text:?} is not a duration like \"90s\": {e}")))?;
        timeout = Some(parsed);
    }
    for (key, value) in raw.slot_kwargs.iter().flatten() {
        if key != "timeout_after" {
            return Err(what(format!(
                "slot_kwargs.{key} is not supported; only timeout_after (minutes) is"
            )));
        }
        let minutes = value
            .as_f64()
            .filter(|m| m.is_finite() && *m > 0.0 && *m <= MAX_TIMEOUT.as_secs_f64() / 60.0)
            .ok_or_else(|| {
                what(format!(
                    "slot_kwargs.timeout_after must be a positive number of minutes, not {value}"
                ))
            })?;
        if timeout.is_some() {
            return Err(what("give timeout or slot_kwargs.timeout_after, not both".into()));
        }
        timeout = Some(Duration::from_millis((minutes * 60_000.0).round() as u64));
    }
    let slot = SlotConfig {
        slot_id,
        backends: raw.backends,
        timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
    };
    slot.validate()?;
    Ok(slot)
}

/// Checks a name that becomes part of Redis keys: not empty, not too long, no
/// control characters, and (for scheduler names and prefixes) no glob or
/// hash-tag characters that would change which keys a pattern or a cluster slot covers.
pub(crate) fn validate_name(what: &str, name: &str) -> Result<()> {
    let bad = |msg: &str| Err(Error::Config(format!("{what} {name:?} {msg}")));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad(&format!("is longer than {MAX_NAME_LEN} bytes"));
    }
    if name.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    if what != "slot id" && name.contains(['{', '}', '*', '?', '[', ']', '\\']) {
        return bad("contains one of { } * ? [ ] \\, which Redis treats specially in key names");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    /// The predecessor's configuration loads as-is, numbers kept as strings.
    fn seed_shape_loads() {
        let slots = parse_json(
            r#"[{"slot_id": 1, "backends": ["MyBackend"], "slot_cls": "RedisSlot"},
                {"slot_id": "eu-2", "backends": ["A", "B"], "timeout": "90s"},
                {"slot_id": "x", "backends": ["A"], "slot_kwargs": {"timeout_after": 0.5}}]"#,
        )
        .unwrap();
        assert_eq!(slots[0].slot_id, "1");
        assert_eq!(slots[0].timeout, DEFAULT_TIMEOUT);
        assert_eq!(slots[1].backends, ["A", "B"]);
        assert_eq!(slots[1].timeout, Duration::from_secs(90));
        assert_eq!(slots[2].timeout, Duration::from_secs(30));
    }

    #[test]
    /// Each kind of bad slot is an error that says what is wrong and where.
    fn bad_slots_are_named() {
        let cases = [
            (
                r#"[{"slot_id": 1, "backends": ["A"], "slot_cls": "Other"}]"#,
                "slot_cls",
            ),
            (
                r#"[{"slot_id": 1, "backends": ["A"], "timeout": "soon"}]"#,
                "timeout",
            ),
            (
                r#"[{"slot_id": 1, "backends": ["A"], "timeout": "0s"}]"#,
                "between",
            ),
            (
                r#"[{"slot_id": 1, "backends": ["A"], "slot_kwargs": {"timeout_after": -1}}]"#,
                "positive",
            ),
            (
                r#"[{"slot_id": 1, "backends": ["A"], "slot_kwargs": {"x": 1}}]"#,
                "slot_kwargs.x",
            ),
            (
                r#"[{"slot_id": 1, "backends": ["A"], "timeout": "1s", "slot_kwargs": {"timeout_after": 1}}]"#,
                "not both",
            ),
            (r#"[{"slot_id": [1], "backends": ["A"]}]"#, "number or a string"),
            (r#"[{"slot_id": "", "backends": ["A"]}]"#, "empty"),
            (r#"[{"slot_id": 1, "backends": []}]"#, "no backends"),
            (r#"[{"slot_id": 1, "backend": ["A"]}]"#, "unknown field"),
            (r#"{"slot_id": 1}"#, "not valid"),
            ("", "not valid"),
        ];
        for (json, needle) in cases {
            let err = parse_json(json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    /// Names that would change key patterns or hash tags are refused.
    fn names_with_special_characters_are_refused() {
        for name in ["", "a{b", "a}b", "a*", "a?", "a[b]", "a\\b", "a\nb"] {
            assert!(validate_name("scheduler name", name).is_err(), "{name:?}");
        }
        assert!(validate_name("scheduler name", "jobs-eu:1").is_ok());
        assert!(validate_name("slot id", "{odd}*").is_ok());
    }
}
