//! The Lua scripts of `lua/`, built once, and one typed wrapper per script: the
//! only Rust place that knows each script's KEYS and ARGV order.

use std::sync::LazyLock;

use include_dir::{include_dir, Dir};
use redis::{Script, ScriptInvocation, ToRedisArgs, Value};

use crate::connection::Redis;
use crate::error::{Error, Result};
use crate::keys::Keys;

static LUA: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/lua");

/// One script: built once (SHA1 computed once), with its full source for the EVAL
/// fallback and for loading it up front.
pub(crate) struct Lua {
    script: Script,
    source: String,
}

/// Every script, with `common.lua` in front.
pub(crate) struct Scripts {
    register: Lua,
    tick: Lua,
    sweep: Lua,
    claim: Lua,
    keepalive: Lua,
    release: Lua,
    free: Lua,
    epoch: Lua,
    timeout_done: Lua,
}

static SCRIPTS: LazyLock<std::result::Result<Scripts, String>> = LazyLock::new(|| {
    let file = |name: &str| {
        LUA.get_file(name)
            .and_then(|f| f.contents_utf8())
            .ok_or_else(|| format!("lua/{name} is missing from the build"))
    };
    let common = file("common.lua")?;
    let lua = |name: &str| {
        file(name).map(|body| {
            let source = format!("{common}\n{body}");
            Lua {
                script: Script::new(&source),
                source,
            }
        })
    };
    Ok(Scripts {
        register: lua("register.lua")?,
        tick: lua("tick.lua")?,
        sweep: lua("sweep.lua")?,
        claim: lua("claim.lua")?,
        keepalive: lua("keepalive.lua")?,
        release: lua("release.lua")?,
        free: lua("free.lua")?,
        epoch: lua("epoch.lua")?,
        timeout_done: lua("timeout_done.lua")?,
    })
});

impl Scripts {
    fn all(&self) -> [&Lua; 9] {
        [
            &self.register,
            &self.tick,
            &self.sweep,
            &self.claim,
            &self.keepalive,
            &self.release,
            &self.free,
            &self.epoch,
            &self.timeout_done,
        ]
    }
}

impl Lua {
    fn call(&self) -> Call<'_> {
        Call {
            invocation: self.script.prepare_invoke(),
            source: &self.source,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// A script call being built: EVALSHA through `invoke_async` (which loads the
/// script on NOSCRIPT), with its keys and arguments kept for an EVAL fallback.
pub(crate) struct Call<'a> {
    pub(crate) invocation: ScriptInvocation<'a>,
    source: &'a str,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Call<'_> {
    fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        for part in key.to_redis_args() {
            self.invocation.key(part.as_slice());
            self.keys.push(part);
        }
        self
    }

    fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        for part in arg.to_redis_args() {
            self.invocation.arg(part.as_slice());
            self.args.push(part);
        }
        self
    }

    /// The same call as one EVAL: runs the script and caches it in one step, so a
    /// script cache flushed again and again cannot keep it from running.
    pub(crate) fn eval_cmd(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(self.source)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }
}

fn scripts() -> Result<&'static Scripts> {
    SCRIPTS.as_ref().map_err(|e| Error::Config(e.clone()))
}

/// Turns a script's `CORRUPT <key> <why>` error into [`Error::CorruptState`],
/// finding the key among those the script was given.
fn corrupt_or(err: Error, keys: &[&str]) -> Error {
    let Error::Redis { source, .. } = &err else {
        return err;
    };
    if source.code() != Some("CORRUPT") {
        return err;
    }
    let detail = source.detail().unwrap_or_default();
    // Redis appends " script: <sha>, on @user_script:<line>." to errors raised in Lua.
    let detail = detail.split(" script: ").next().unwrap_or(detail);
    let key = keys
        .iter()
        .filter(|k| detail.starts_with(&format!("{k} ")))
        .max_by_key(|k| k.len());
    match key {
        Some(key) => Error::CorruptState {
            key: (*key).to_owned(),
            detail: detail[key.len() + 1..].to_owned(),
        },
        None => Error::CorruptState {
            key: "?".into(),
            detail: detail.to_owned(),
        },
    }
}

/// A reply of unexpected shape: only a mismatch between this build and its scripts.
fn bad_reply(script: &'static str, value: &Value) -> Error {
    Error::Redis {
        context: script,
        source: redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected script reply",
            format!("{value:?}"),
        )),
    }
}

/// Small readers for script replies.
/// A packed reply: one bulk string of tokens `<byte length>:<bytes>` (`put` in
/// lua/common.lua), for replies with many values.
struct Packed<'a> {
    rest: &'a [u8],
}

impl<'a> Packed<'a> {
    fn of(v: &'a Value) -> Option<Self> {
        match v {
            Value::BulkString(b) => Some(Packed { rest: b }),
            _ => None,
        }
    }

    /// The next token's bytes; `None` at the end or on a malformed token.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let colon = self.rest.iter().position(|&b| b == b':')?;
        let len: usize = std::str::from_utf8(&self.rest[..colon]).ok()?.parse().ok()?;
        let start = colon + 1;
        let token = self.rest.get(start..start.checked_add(len)?)?;
        self.rest = &self.rest[start + len..];
        Some(token)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn text(&mut self) -> Option<String> {
        self.str().map(str::to_owned)
    }

    fn int(&mut self) -> Option<u64> {
        self.str()?.parse().ok()
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// `bytes`, read from `key`, as text. No replica writes a slot id or epoch id that is
/// not UTF-8: one is foreign data, reported naming the key (`what`: "a member").
pub(crate) fn utf8_in(key: &str, what: &str, bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::CorruptState {
        key: key.to_owned(),
        detail: format!(
            "holds {what} that is not UTF-8: {:?}",
            String::from_utf8_lossy(bytes)
        ),
    })
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}
fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(_) | Value::SimpleString(_) => text(v).and_then(|t| t.parse().ok()),
        _ => None,
    }
}
fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}
fn texts(v: &Value) -> Option<Vec<String>> {
    array(v)?.iter().map(text).collect()
}

/// Loads every script in one round trip, so that no later call pays for a NOSCRIPT
/// reply. (EVALSHA still reloads a script the server lost, e.g. after SCRIPT FLUSH.)
pub(crate) async fn load_all(redis: &Redis) -> Result<()> {
    let mut pipe = redis::pipe();
    for lua in scripts()?.all() {
        pipe.cmd("SCRIPT").arg("LOAD").arg(&lua.source).ignore();
    }
    redis.pipeline::<()>("loading scripts", &pipe).await
}

// ---------------------------------------------------------------- register.lua

/// One slot to register: its id, backends (JSON list) and timeout.
pub(crate) struct RegisterSlot<'a> {
    pub(crate) slot_id: &'a str,
    pub(crate) backends_json: &'a str,
    pub(crate) timeout_ms: u64,
}

/// Creates missing slots, refreshes config fields. Returns one status per slot:
/// `created`, `ok`, or `corrupt <why>`.
pub(crate) async fn register(
    redis: &Redis,
    keys: &Keys,
    buckets: u32,
    slots: &[RegisterSlot<'_>],
) -> Result<Vec<String>> {
    let script = &scripts()?.register;
    let mut inv = script.call();
    inv.key(&keys.idle).key(&keys.deadlines);
    let slot_keys: Vec<String> = slots.iter().map(|s| keys.slot(s.slot_id)).collect();
    let groups: Vec<(u64, String)> = slots.iter().map(|s| keys.group(s.slot_id, buckets)).collect();
    for ((slot, key), (group, group_key)) in slots.iter().zip(&slot_keys).zip(&groups) {
        inv.key(key)
            .key(group_key)
            .arg(slot.slot_id)
            .arg(slot.backends_json)
            .arg(slot.timeout_ms)
            .arg(group);
    }
    let value: Value = redis.eval("registering slots", &inv).await.map_err(|e| {
        let mut all = vec![keys.idle.as_str(), &keys.deadlines];
        all.extend(slot_keys.iter().map(String::as_str));
        all.extend(groups.iter().map(|(_, k)| k.as_str()));
        corrupt_or(e, &all)
    })?;
    texts(&value)
        .filter(|t| t.len() == slots.len())
        .ok_or_else(|| bad_reply("register", &value))
}

// ---------------------------------------------------------------- epoch.lua

/// What `epoch.lua` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EpochVerdict {
    /// No epoch, and this replica had seen none: a new scheduler.
    New,
    /// The epoch this replica saw.
    Same,
    /// This replica saw another epoch: the state was lost.
    Lost,
}

pub(crate) struct Epoch {
    pub(crate) verdict: EpochVerdict,
    pub(crate) id: String,
    pub(crate) quarantine_until_ms: u64,
    /// How many buckets the task index has in this epoch.
    pub(crate) task_buckets: u32,
}

/// Checks (and creates when missing, with `new_buckets` task buckets) the epoch; on a
/// loss, starts the quarantine and raises the lease counter to `max_lease`.
pub(crate) async fn epoch(
    redis: &Redis,
    keys: &Keys,
    seen: &str,
    new_id: &str,
    quarantine_ms: u64,
    max_lease: u64,
    new_buckets: u32,
) -> Result<Epoch> {
    let script = &scripts()?.epoch;
    let mut inv = script.call();
    inv.key(&keys.epoch).key(&keys.lease);
    inv.arg(seen)
        .arg(new_id)
        .arg(quarantine_ms)
        .arg(max_lease)
        .arg(new_buckets);
    let value: Value = redis
        .eval("checking the epoch", &inv)
        .await
        .map_err(|e| corrupt_or(e, &[&keys.epoch, &keys.lease]))?;
    let parsed = array(&value).and_then(|a| match a {
        [verdict, id, until, buckets] => Some(Epoch {
            verdict: match text(verdict)?.as_str() {
                "NEW" => EpochVerdict::New,
                "SAME" => EpochVerdict::Same,
                "LOST" => EpochVerdict::Lost,
                _ => return None,
            },
            id: text(id)?,
            quarantine_until_ms: int(until)?,
            task_buckets: u32::try_from(int(buckets)?).ok()?,
        }),
        _ => None,
    });
    parsed.ok_or_else(|| bad_reply("epoch", &value))
}

// ---------------------------------------------------------------- tick.lua

/// What a steady tick reads: Redis time, due slots, idle slots.
pub(crate) struct Tick {
    pub(crate) now_ms: u64,
    pub(crate) due: Vec<String>,
    pub(crate) idle: Vec<String>,
    /// The epoch id in Redis ("" when there is none).
    pub(crate) epoch: String,
    /// No claim before this Redis time (0: none).
    pub(crate) quarantine_until_ms: u64,
    /// How many slots are idle: more than `idle` lists when the set was too large to
    /// list inside the script (the caller pages through it with SSCAN).
    pub(crate) idle_count: usize,
}

/// `with_idle`: whether to list the idle slots (a sweep's later rounds need not).
pub(crate) async fn tick(
    redis: &Redis,
    keys: &Keys,
    max_due: usize,
    ended_memory_ms: u64,
    with_idle: bool,
    max_idle_listed: usize,
) -> Result<Tick> {
    let script = &scripts()?.tick;
    let mut inv = script.call();
    inv.key(&keys.deadlines)
        .key(&keys.idle)
        .key(&keys.ended)
        .key(&keys.epoch);
    inv.arg(max_due)
        .arg(ended_memory_ms)
        .arg(if with_idle { "1" } else { "0" })
        .arg(max_idle_listed);
    let value: Value = redis
        .eval("reading due and idle slots", &inv)
        .await
        .map_err(|e| corrupt_or(e, &[&keys.deadlines, &keys.idle, &keys.ended, &keys.epoch]))?;
    // Slot ids and the epoch id as bytes first: one that is not UTF-8 is foreign data
    // in that key (no replica writes one), reported naming the key.
    struct Raw<'v> {
        now_ms: u64,
        epoch: &'v [u8],
        quarantine_until_ms: u64,
        idle_count: usize,
        due: Vec<&'v [u8]>,
        idle: Vec<&'v [u8]>,
    }
    let parse = || -> Option<Raw<'_>> {
        let mut p = Packed::of(&value)?;
        let now_ms = p.int()?;
        let epoch = p.bytes()?;
        let quarantine_until_ms = p.int()?;
        let idle_count = usize::try_from(p.int()?).ok()?;
        let due_count = usize::try_from(p.int()?).ok()?;
        let mut due = Vec::with_capacity(due_count.min(max_due));
        for _ in 0..due_count {
            due.push(p.bytes()?);
        }
        let mut idle = Vec::new();
        while !p.is_empty() {
            idle.push(p.bytes()?);
        }
        Some(Raw {
            now_ms,
            epoch,
            quarantine_until_ms,
            idle_count,
            due,
            idle,
        })
    };
    let raw = parse().ok_or_else(|| bad_reply("tick", &value))?;
    let ids = |key: &str, list: Vec<&[u8]>| -> Result<Vec<String>> {
        list.into_iter().map(|b| utf8_in(key, "a member", b)).collect()
    };
    Ok(Tick {
        now_ms: raw.now_ms,
        due: ids(&keys.deadlines, raw.due)?,
        idle: ids(&keys.idle, raw.idle)?,
        epoch: utf8_in(&keys.epoch, "an id", raw.epoch)?,
        quarantine_until_ms: raw.quarantine_until_ms,
        idle_count: raw.idle_count,
    })
}

// ---------------------------------------------------------------- sweep.lua

/// What the sweep did to one due slot.
pub(crate) enum Swept {
    /// The task passed its deadline; the slot is stopping until `free`.
    TimedOut {
        slot_id: String,
        task_id: String,
        backend: String,
        lease: u64,
    },
    /// A stopping slot whose callbacks never finished (its replica died, or they
    /// failed and the slot was kept): the caller runs them again, then frees it.
    Reclaimed {
        slot_id: String,
        task_id: String,
        backend: String,
        lease: u64,
        /// It timed out and its `timeout_callback` had not returned (reason `timeout`,
        /// not `timeout_done`), so that runs again too.
        timed_out: bool,
    },
    /// The slot's hash is unreadable; left alone.
    Corrupt { slot_id: String, why: String },
}

/// One sweep call's work: due groups of the deadline index, and their due slots.
#[derive(Debug, Default)]
pub(crate) struct SweepChunk {
    /// Group ids, each settled by the call (its bound set to its earliest time) but
    /// the last when `continues`.
    pub(crate) groups: Vec<u64>,
    /// Due slots: the slot id, and its group's index in `groups`.
    pub(crate) slots: Vec<(String, usize)>,
    /// The last group has more due slots, in the next call, which settles it.
    pub(crate) continues: bool,
}

pub(crate) async fn sweep(redis: &Redis, keys: &Keys, chunk: &SweepChunk) -> Result<(u64, Vec<Swept>)> {
    let script = &scripts()?.sweep;
    let mut inv = script.call();
    inv.key(&keys.deadlines).key(&keys.idle).key(&keys.ended);
    inv.arg(chunk.slots.len());
    for (id, group) in &chunk.slots {
        inv.key(keys.slot(id)).arg(id).arg(group + 1);
    }
    let group_keys: Vec<String> = chunk.groups.iter().map(|g| keys.group_key(*g)).collect();
    for (key, id) in group_keys.iter().zip(&chunk.groups) {
        inv.key(key).arg(id);
    }
    inv.arg(if chunk.continues { "1" } else { "0" });
    let value: Value = redis.eval("sweeping expired slots", &inv).await.map_err(|e| {
        let mut all = vec![keys.deadlines.as_str(), &keys.idle, &keys.ended];
        all.extend(group_keys.iter().map(String::as_str));
        corrupt_or(e, &all)
    })?;
    let parse = || -> Option<(u64, Vec<Swept>)> {
        let mut p = Packed::of(&value)?;
        let now = p.int()?;
        let mut swept = Vec::with_capacity(chunk.slots.len());
        for (id, _) in &chunk.slots {
            match p.str()? {
                "-" => {}
                "C" => swept.push(Swept::Corrupt {
                    slot_id: id.clone(),
                    why: p.text()?,
                }),
                kind @ ("T" | "R") => {
                    let (task, backend, lease) = (p.bytes()?, p.bytes()?, p.int()?);
                    let timed_out = kind == "R" && p.bytes()? == b"timeout";
                    // No replica writes a task id or backend name that is not UTF-8:
                    // that slot alone is reported (it stays stopping), not the chunk.
                    let (Ok(task_id), Ok(backend)) =
                        (std::str::from_utf8(task), std::str::from_utf8(backend))
                    else {
                        swept.push(Swept::Corrupt {
                            slot_id: id.clone(),
                            why: "has a task or backend that is not UTF-8".into(),
                        });
                        continue;
                    };
                    let (slot_id, task_id, backend) = (id.clone(), task_id.to_owned(), backend.to_owned());
                    swept.push(if kind == "T" {
                        Swept::TimedOut {
                            slot_id,
                            task_id,
                            backend,
                            lease,
                        }
                    } else {
                        Swept::Reclaimed {
                            slot_id,
                            task_id,
                            backend,
                            lease,
                            timed_out,
                        }
                    });
                }
                _ => return None,
            }
        }
        p.is_empty().then_some((now, swept))
    };
    parse().ok_or_else(|| bad_reply("sweep", &value))
}

// ---------------------------------------------------------------- claim.lua

/// A claim request for one slot.
pub(crate) struct ClaimArgs<'a> {
    pub(crate) slot_id: &'a str,
    pub(crate) task_id: &'a str,
    pub(crate) backend: &'a str,
    pub(crate) timeout_ms: u64,
    /// Redis time of a reply received before the poll began.
    pub(crate) polled_at_ms: u64,
}

/// One claim's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    Ok {
        lease: u64,
    },
    SlotBusy,
    TaskBusy,
    Stale,
    /// State was lost; no claim before the quarantine ends.
    Quarantine,
    /// The slot's hash is unreadable (why).
    Corrupt(String),
    /// The task's bucket of the index holds foreign data (why); the task is not claimed.
    Index(String),
    /// The slot's group of the deadline index holds foreign data (why); not claimed.
    Group(String),
}

/// Claims slots in one script call, in order. Returns Redis time and one outcome per
/// claim.
pub(crate) async fn claim(
    redis: &Redis,
    keys: &Keys,
    task_buckets: u32,
    stale_after_ms: u64,
    claims: &[ClaimArgs<'_>],
) -> Result<(u64, Vec<Claim>)> {
    let script = &scripts()?.claim;
    let mut inv = script.call();
    inv.key(&keys.deadlines)
        .key(&keys.idle)
        .key(&keys.ended)
        .key(&keys.lease)
        .key(&keys.epoch);
    inv.arg(stale_after_ms).arg(task_buckets);
    for c in claims {
        let (group, group_key) = keys.group(c.slot_id, task_buckets);
        inv.key(keys.slot(c.slot_id))
            .key(keys.task_bucket(c.task_id, task_buckets))
            .key(group_key)
            .arg(c.slot_id)
            .arg(c.task_id)
            .arg(c.backend)
            .arg(c.timeout_ms)
            .arg(c.polled_at_ms)
            .arg(group);
    }
    // A foreign bucket or group is a status of its claim, not an error of the call.
    let value: Value = redis.eval("claiming slots", &inv).await.map_err(|e| {
        corrupt_or(
            e,
            &[&keys.deadlines, &keys.idle, &keys.ended, &keys.lease, &keys.epoch],
        )
    })?;
    let parse = || -> Option<(u64, Vec<Claim>)> {
        let mut p = Packed::of(&value)?;
        let now = p.int()?;
        let mut outcomes = Vec::with_capacity(claims.len());
        for _ in claims {
            let status = p.str()?;
            let lease = p.int()?;
            outcomes.push(match status {
                "OK" => Claim::Ok { lease },
                "SLOT_BUSY" => Claim::SlotBusy,
                "TASK_BUSY" => Claim::TaskBusy,
                "STALE" => Claim::Stale,
                "QUARANTINE" => Claim::Quarantine,
                other => {
                    if let Some(why) = other.strip_prefix("INDEX ") {
                        Claim::Index(why.to_owned())
                    } else if let Some(why) = other.strip_prefix("GROUP ") {
                        Claim::Group(why.to_owned())
                    } else {
                        Claim::Corrupt(other.strip_prefix("CORRUPT ")?.to_owned())
                    }
                }
            });
        }
        p.is_empty().then_some((now, outcomes))
    };
    parse().ok_or_else(|| bad_reply("claim", &value))
}

// ---------------------------------------------------------------- keepalive.lua / release.lua

/// Outcomes shared by the scripts that find a task through the index.
pub(crate) enum Held<T> {
    Ok(T),
    /// The task holds no slot.
    WrongTask,
    /// The task holds another slot than the caller thought.
    Moved(String),
    /// (keepalive) the deadline has passed.
    Expired,
    /// The task holds its slot under another lease than the caller's (the lease now
    /// in the slot).
    LeaseLost(u64),
}

/// A successful keepalive.
pub(crate) struct KeptAlive {
    pub(crate) lease: u64,
    pub(crate) backend: String,
}

fn held<T>(value: &Value, script: &'static str, ok: impl Fn(&[Value]) -> Option<T>) -> Result<Held<T>> {
    let parsed = array(value).and_then(|a| {
        Some(match text(a.first()?)?.as_str() {
            "OK" => Held::Ok(ok(a)?),
            "WRONG_TASK" => Held::WrongTask,
            "MOVED" => Held::Moved(text(a.get(1)?)?),
            "EXPIRED" => Held::Expired,
            "LEASE_LOST" => Held::LeaseLost(int(a.get(1)?)?),
            _ => return None,
        })
    });
    parsed.ok_or_else(|| bad_reply(script, value))
}

pub(crate) async fn keepalive(
    redis: &Redis,
    keys: &Keys,
    task_buckets: u32,
    task_id: &str,
    slot_id: &str,
    lease: Option<u64>,
) -> Result<Held<KeptAlive>> {
    let script = &scripts()?.keepalive;
    let slot_key = keys.slot(slot_id);
    let bucket = keys.task_bucket(task_id, task_buckets);
    let (_, group_key) = keys.group(slot_id, task_buckets);
    let mut inv = script.call();
    inv.key(&bucket)
        .key(&slot_key)
        .key(&group_key)
        .arg(task_id)
        .arg(slot_id)
        .arg(lease.map(|l| l.to_string()).unwrap_or_default());
    let value: Value = redis
        .eval("extending a deadline", &inv)
        .await
        .map_err(|e| corrupt_or(e, &[&bucket, &slot_key, &group_key]))?;
    held(&value, "keepalive", |a| {
        Some(KeptAlive {
            lease: int(a.get(2)?)?,
            backend: text(a.get(4)?)?,
        })
    })
}

/// How a release leaves the slot.
#[derive(Clone, Copy)]
pub(crate) enum ReleaseMode {
    /// Unclaimable until `free` (callbacks to run first).
    Stopping,
    /// Idle at once (a failed start: no callbacks).
    Idle,
}

/// A successful release.
pub(crate) struct Released {
    pub(crate) now_ms: u64,
    pub(crate) lease: u64,
    pub(crate) backend: String,
}

/// Ends a task's hold on its slot. `lease` (when given) must be the slot's lease.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn release(
    redis: &Redis,
    keys: &Keys,
    task_buckets: u32,
    task_id: &str,
    slot_id: &str,
    reason: &str,
    mode: ReleaseMode,
    lease: Option<u64>,
) -> Result<Held<Released>> {
    let script = &scripts()?.release;
    let slot_key = keys.slot(slot_id);
    let bucket = keys.task_bucket(task_id, task_buckets);
    let (_, group_key) = keys.group(slot_id, task_buckets);
    let mut inv = script.call();
    inv.key(&bucket)
        .key(&slot_key)
        .key(&group_key)
        .key(&keys.ended)
        .key(&keys.idle);
    let mode = match mode {
        ReleaseMode::Stopping => "stopping",
        ReleaseMode::Idle => "idle",
    };
    inv.arg(task_id)
        .arg(slot_id)
        .arg(reason)
        .arg(mode)
        .arg(lease.map(|l| l.to_string()).unwrap_or_default());
    let value: Value = redis
        .eval("releasing a slot", &inv)
        .await
        .map_err(|e| corrupt_or(e, &[&bucket, &slot_key, &group_key, &keys.ended, &keys.idle]))?;
    held(&value, "release", |a| {
        Some(Released {
            now_ms: int(a.get(1)?)?,
            lease: int(a.get(2)?)?,
            backend: text(a.get(3)?)?,
        })
    })
}

// ---------------------------------------------------------------- free.lua

/// A stopping slot to free: its id, and the lease and task that stopped in it.
pub(crate) struct ToFree {
    pub(crate) slot_id: String,
    pub(crate) lease: u64,
    pub(crate) task_id: String,
}

/// Makes stopping slots idle once their callbacks returned. Returns, per slot, whether
/// it was freed (false: someone reclaimed it first).
pub(crate) async fn free(
    redis: &Redis,
    keys: &Keys,
    task_buckets: u32,
    slots: &[ToFree],
) -> Result<Vec<bool>> {
    let script = &scripts()?.free;
    let mut inv = script.call();
    inv.key(&keys.idle);
    for f in slots {
        inv.key(keys.slot(&f.slot_id))
            .key(keys.task_bucket(&f.task_id, task_buckets))
            .key(keys.group(&f.slot_id, task_buckets).1)
            .arg(&f.slot_id)
            .arg(f.lease)
            .arg(&f.task_id);
    }
    let value: Value = redis
        .eval("freeing slots", &inv)
        .await
        .map_err(|e| corrupt_or(e, &[&keys.idle]))?;
    let flags = match &value {
        Value::BulkString(b) if b.len() == slots.len() => b
            .iter()
            .map(|c| match c {
                b'1' => Some(true),
                b'0' => Some(false),
                _ => None,
            })
            .collect::<Option<Vec<_>>>(),
        _ => None,
    };
    flags.ok_or_else(|| bad_reply("free", &value))
}

// ---------------------------------------------------------------- timeout_done.lua

/// Records that the timeout callback of `lease` in `slot_id` returned, on a slot kept
/// `stopping` because its stop callback failed: its reclaim then runs
/// `stop_callback` only. Returns whether the slot was still in that state.
pub(crate) async fn timeout_done(redis: &Redis, keys: &Keys, slot_id: &str, lease: u64) -> Result<bool> {
    let script = &scripts()?.timeout_done;
    let mut inv = script.call();
    inv.key(keys.slot(slot_id)).arg(lease);
    let done: i64 = redis.eval("recording a timeout callback", &inv).await?;
    Ok(done == 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    fn packed(bytes: &[u8]) -> Value {
        Value::BulkString(bytes.to_vec())
    }

    #[test]
    /// Tokens carry any bytes (colons, newlines, digits); a malformed or cut token is
    /// None, never a panic.
    fn packed_tokens() {
        let v = packed("3:a:b0:5:\n{é}13:1795875336489".as_bytes());
        let mut p = Packed::of(&v).expect("a bulk string");
        assert_eq!(p.str(), Some("a:b"));
        assert_eq!(p.str(), Some(""));
        assert_eq!(p.text().as_deref(), Some("\n{é}"));
        assert_eq!(p.int(), Some(1_795_875_336_489));
        assert!(p.is_empty());
        assert_eq!(p.bytes(), None);
        for bad in [
            &b"4:abc"[..],
            b"x:a",
            b"3",
            b":abc",
            b"99999999999999999999999:a",
            b"-1:a",
        ] {
            let v = packed(bad);
            assert_eq!(Packed::of(&v).and_then(|mut p| p.bytes()), None, "{bad:?}");
        }
        assert!(Packed::of(&Value::Int(1)).is_none());
    }
}
