//! The shared history: one JSON object per line, appended by every process of a run.
//!
//! The file is opened with `O_APPEND` and each line goes out in one `write()` call, so
//! lines of concurrent processes interleave but never tear, and the file order is a
//! real-time order: a line whose write returned before another line's write began
//! comes first. The checker relies on exactly that.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// Wall-clock milliseconds of this process (skewed under faketime; only the
/// parent's are used to measure time).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An appender to the history file.
pub struct History {
    file: File,
    pid: u32,
}

impl History {
    pub fn open(path: &Path) -> Self {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open history {}: {e}", path.display()));
        History {
            file,
            pid: std::process::id(),
        }
    }

    /// Appends one event: `ev` plus `fields` (a JSON object), with this process's pid
    /// and wall clock. One `write()` call; a short write is reported (it would tear).
    pub fn log(&self, ev: &str, fields: Value) {
        let mut line = match fields {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => {
                let mut m = Map::new();
                m.insert("value".into(), other);
                m
            }
        };
        line.insert("ev".into(), json!(ev));
        line.insert("pid".into(), json!(self.pid));
        line.insert("ms".into(), json!(wall_ms()));
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        match (&self.file).write(text.as_bytes()) {
            Ok(n) if n == text.len() => {}
            Ok(n) => eprintln!("chaos history: short write {n}/{} bytes", text.len()),
            Err(e) => eprintln!("chaos history: write failed: {e}"),
        }
    }
}

/// One parsed line.
#[derive(Debug, Clone)]
pub struct Line {
    /// Position in the file (0-based), the log order.
    pub idx: usize,
    pub raw: String,
    pub v: Value,
}

impl Line {
    pub fn ev(&self) -> &str {
        self.v.get("ev").and_then(Value::as_str).unwrap_or("")
    }
    pub fn pid(&self) -> u64 {
        self.v.get("pid").and_then(Value::as_u64).unwrap_or(0)
    }
    pub fn ms(&self) -> u64 {
        self.v.get("ms").and_then(Value::as_u64).unwrap_or(0)
    }
    pub fn str(&self, field: &str) -> Option<&str> {
        self.v.get(field).and_then(Value::as_str)
    }
    pub fn u64(&self, field: &str) -> Option<u64> {
        self.v.get(field).and_then(Value::as_u64)
    }
    pub fn task(&self) -> &str {
        self.str("task").unwrap_or("")
    }
    pub fn lease(&self) -> Option<u64> {
        self.u64("lease")
    }
}

/// Reads a history: parsed lines, and the lines that are not JSON objects (torn).
pub fn read(path: &Path) -> (Vec<Line>, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    parse(&text, 0)
}

/// Parses `text` (whole lines), numbering them from `first_idx`.
pub fn parse(text: &str, first_idx: usize) -> (Vec<Line>, Vec<String>) {
    let mut lines = Vec::new();
    let mut torn = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        match serde_json::from_str::<Value>(raw) {
            Ok(v) if v.is_object() => lines.push(Line {
                idx: first_idx + i,
                raw: raw.to_owned(),
                v,
            }),
            _ => torn.push(raw.to_owned()),
        }
    }
    (lines, torn)
}

/// Follows a history file as it grows: each call returns the complete lines added
/// since the last call.
pub struct Tail {
    path: PathBuf,
    offset: usize,
    next_idx: usize,
}

impl Tail {
    pub fn new(path: &Path) -> Self {
        Tail {
            path: path.to_owned(),
            offset: 0,
            next_idx: 0,
        }
    }

    pub fn poll(&mut self) -> Vec<Line> {
        let Ok(bytes) = std::fs::read(&self.path) else {
            return Vec::new();
        };
        let Some(rest) = bytes.get(self.offset..) else {
            return Vec::new();
        };
        let Some(end) = rest.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let chunk = String::from_utf8_lossy(&rest[..=end]).into_owned();
        self.offset += end + 1;
        let count = chunk.lines().count();
        let (lines, _) = parse(&chunk, self.next_idx);
        self.next_idx += count;
        lines
    }
}
