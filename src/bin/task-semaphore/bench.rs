//! `task-semaphore bench`: what keepalive, stop and a tick cost, measured against a
//! real Redis.
//!
//! - keepalive and stop + refill throughput and latency with 1 and 32 callers, each
//!   beside a raw comparator (the same Lua scripts through `redis::Script` on a plain
//!   multiplexed connection), the two interleaved phase by phase;
//! - for each N slots: build, fill, steady tick, sweep of N expired slots, the
//!   EVALSHA calls each took, and Redis memory per busy slot;
//! - the bench process's peak RSS.
//!
//! Every figure is the median over the runs.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, Script, Value};
use task_semaphore::{Backend, BoxError, Scheduler, SlotConfig, DEFAULT_KEY_PREFIX};

use crate::redis_server::ThrowawayRedis;
use crate::{error_chain, number, parse_flags};

/// The scripts the raw comparators run, read from the crate's `lua/` folder and
/// built as the crate builds them: `common.lua`, a newline, then the script.
const COMMON_LUA: &str = include_str!("../../../lua/common.lua");
const KEEPALIVE_LUA: &str = include_str!("../../../lua/keepalive.lua");
const RELEASE_LUA: &str = include_str!("../../../lua/release.lua");
const FREE_LUA: &str = include_str!("../../../lua/free.lua");
const CLAIM_LUA: &str = include_str!("../../../lua/claim.lua");

/// Every script the library runs, by name: the slowest script call is named by its
/// SHA1 (the library builds each as the raw comparators do, see `crate_script`).
const SCRIPTS: [(&str, &str); 9] = [
    ("claim", CLAIM_LUA),
    ("epoch", include_str!("../../../lua/epoch.lua")),
    ("free", FREE_LUA),
    ("keepalive", KEEPALIVE_LUA),
    ("register", include_str!("../../../lua/register.lua")),
    ("release", RELEASE_LUA),
    ("sweep", include_str!("../../../lua/sweep.lua")),
    ("tick", include_str!("../../../lua/tick.lua")),
    ("timeout_done", include_str!("../../../lua/timeout_done.lua")),
];

/// Concurrent callers of the throughput phases.
const CALLERS: [usize; 2] = [1, 32];
/// Slots of the keepalive and stop schedulers: one per caller at most.
const FLEET: usize = 32;
/// Timeout of those slots: nothing expires during the throughput phases.
const FLEET_TIMEOUT: Duration = Duration::from_secs(3600);
/// The library's default `stale_poll_after`, which the raw claim passes too.
const STALE_AFTER_MS: u64 = 60_000;
/// Most operations one caller runs in one phase (the phase's time ends it first).
const MAX_OPS_PER_CALLER: usize = 1_000_000;
/// Library operations run one by one to count EVALSHA per operation.
const COUNTED_OPS: usize = 1000;
/// Keepalives sent one by one before and after the slot-by-slot fill to measure one
/// round trip.
const ROUND_TRIPS: usize = 1000;
/// Steady ticks timed at each size, after as many untimed ones: right after a large
/// fill, every command (even TIME on another connection) is slower for ~20 ms.
const STEADY_TICKS: usize = 20;
/// First guess of one slot's fill time, to pick a slot timeout that outlasts the
/// fill and the steady ticks; each run replaces it with what it measured.
const FIRST_FILL_GUESS: Duration = Duration::from_micros(200);
/// Runs at sizes of 100,000 slots and more, at most: one takes over a minute.
const MAX_RUNS_AT_100K: usize = 3;
/// Attempts of one run whose slot timeout proved too short (each doubles it).
const ATTEMPTS: usize = 3;
/// Script calls at least this slow are kept by the throwaway server's SLOWLOG.
/// Not 0: commands run inside scripts are logged too (about 17 per claim), which
/// would overflow the log at 100,000 slots and slow the sweep being measured.
const SLOWLOG_THRESHOLD_US: u64 = 100;
/// The longest the SLOWLOG is kept.
const SLOWLOG_MAX_LEN: u64 = 200_000;
/// Reads the slowest EVALSHA in the SLOWLOG inside Redis: {µs, SHA1} ({0, ""} when
/// none), so that a long log never travels to the bench.
const SLOWEST_EVALSHA_LUA: &str = "\
local most, sha = 0, ''
for _, e in ipairs(redis.call('SLOWLOG', 'GET', -1)) do
  if string.lower(tostring(e[4][1])) == 'evalsha' and e[3] > most then
    most, sha = e[3], tostring(e[4][2])
  end
end
return {most, sha}";

/// The slowest script call of a phase: how long it ran inside Redis, and which script.
#[derive(Debug, Clone, Copy)]
struct Slowest {
    ms: f64,
    script: &'static str,
}

/// The slowest of several phases' slowest calls.
fn slowest_of(calls: impl Iterator<Item = Option<Slowest>>) -> Option<Slowest> {
    calls.flatten().reduce(|a, b| if b.ms > a.ms { b } else { a })
}

/// The name of the library's script whose SHA1 is `sha`, or "?".
fn script_named(sha: &str) -> &'static str {
    SCRIPTS
        .iter()
        .find(|(_, body)| crate_script(body).get_hash().eq_ignore_ascii_case(sha))
        .map_or("?", |(name, _)| name)
}

/// What to run, from the command line.
struct Settings {
    runs: usize,
    sizes: Vec<usize>,
    /// Length of one throughput phase.
    phase: Duration,
    /// Length of the untimed phases before the first timed one.
    warmup: Duration,
    json: bool,
}

/// Reads `[--quick] [--json] [--runs R] [--sizes 1000,10000,100000]`.
fn settings(args: &[String]) -> Result<Settings, String> {
    let flags = parse_flags(args, &["quick", "json"])?;
    if let Some(unknown) = flags
        .keys()
        .find(|k| !["quick", "json", "runs", "sizes"].contains(&k.as_str()))
    {
        return Err(format!("bench has no option --{unknown}"));
    }
    let quick = flags.contains_key("quick");
    let runs = number(&flags, "runs", if quick { 1 } else { 5 }, 100)?;
    let sizes = match flags.get("sizes") {
        None if quick => vec![1000],
        None => vec![1000, 10_000, 100_000],
        Some(list) => list
            .split(',')
            .map(|n| match n.trim().parse::<usize>() {
                Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
                _ => Err(format!("--sizes takes numbers from 1 to 1000000, not {n:?}")),
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(Settings {
        runs,
        sizes,
        phase: Duration::from_millis(if quick { 300 } else { 1000 }),
        warmup: Duration::from_millis(if quick { 100 } else { 200 }),
        json: flags.contains_key("json"),
    })
}

/// Locks a mutex, ignoring poisoning (the data is plain values).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ------------------------------------------------------------------ the server

/// The Redis under test, and the bench's own connection to it.
struct Server {
    url: String,
    /// Our own redis-server when `REDIS_URL` is not set.
    own: Option<ThrowawayRedis>,
    conn: MultiplexedConnection,
}

impl Server {
    /// `REDIS_URL`, else a throwaway redis-server whose SLOWLOG keeps slow script calls.
    async fn start() -> Result<Self, String> {
        let (url, own) = match std::env::var("REDIS_URL") {
            Ok(url) if !url.is_empty() => (url, None),
            _ => {
                let server = ThrowawayRedis::start().await?;
                (server.url(), Some(server))
            }
        };
        let conn = connect(&url).await?;
        let server = Server { url, own, conn };
        if server.own.is_some() {
            let mut config = redis::cmd("CONFIG");
            config
                .arg("SET")
                .arg("slowlog-log-slower-than")
                .arg(SLOWLOG_THRESHOLD_US)
                .arg("slowlog-max-len")
                .arg(SLOWLOG_MAX_LEN);
            server.query::<()>("configuring the slowlog", &config).await?;
        }
        Ok(server)
    }

    /// Runs one command on the bench's connection.
    async fn query<T: FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Result<T, String> {
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn)
            .await
            .map_err(|e| format!("{what}: {e}"))
    }

    /// One section of `INFO`.
    async fn info(&self, section: &str) -> Result<String, String> {
        self.query("reading INFO", redis::cmd("INFO").arg(section)).await
    }

    /// `used_memory` of `INFO memory`, in bytes, after emptying the throwaway server's
    /// SLOWLOG: its entries (up to 128 calls, with their arguments) are counted in
    /// `used_memory`, and how many calls pass its threshold depends on the VM's pace
    /// (on a slow VM they added up to 130 bytes per slot at 10,000 slots).
    async fn used_memory(&self) -> Result<u64, String> {
        self.reset_slowlog().await?;
        let info = self.info("memory").await?;
        info_field(&info, "used_memory")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| "INFO memory has no used_memory".to_owned())
    }

    /// EVALSHA calls the server has counted so far (`INFO commandstats`).
    async fn evalsha_calls(&self) -> Result<u64, String> {
        Ok(self.evalsha_stats().await?.0)
    }

    /// EVALSHA calls so far and the microseconds Redis spent running them.
    async fn evalsha_stats(&self) -> Result<(u64, u64), String> {
        let info = self.info("commandstats").await?;
        let Some(stats) = info_field(&info, "cmdstat_evalsha") else {
            return Ok((0, 0)); // none yet
        };
        let field = |name: &str| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("cannot read cmdstat_evalsha:{stats}"))
        };
        Ok((field("calls=")?, field("usec=")?))
    }

    /// Redis server time, in ms since the Unix epoch.
    async fn now_ms(&self) -> Result<u64, String> {
        let (secs, micros): (u64, u64) = self.query("reading TIME", &redis::cmd("TIME")).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Waits until Redis time reaches `target_ms` (at most `limit`).
    async fn wait_until(&self, target_ms: u64, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        for _ in 0..100_000 {
            let now = self.now_ms().await?;
            if now >= target_ms {
                return Ok(());
            }
            if started.elapsed() > limit {
                break;
            }
            tokio::time::sleep(Duration::from_millis((target_ms - now).min(500))).await;
        }
        Err(format!("Redis time did not reach {target_ms} within {limit:?}"))
    }

    /// Empties the throwaway server's SLOWLOG (a server of `REDIS_URL` is left alone).
    async fn reset_slowlog(&self) -> Result<(), String> {
        if self.own.is_some() {
            self.query::<()>("resetting the slowlog", redis::cmd("SLOWLOG").arg("RESET"))
                .await?;
        }
        Ok(())
    }

    /// The slowest EVALSHA in the slowlog since the last reset (own server only).
    async fn slowest_evalsha(&self) -> Result<Option<Slowest>, String> {
        if self.own.is_none() {
            return Ok(None);
        }
        let (us, sha): (u64, String) = self
            .query(
                "reading the slowlog",
                redis::cmd("EVAL").arg(SLOWEST_EVALSHA_LUA).arg(0),
            )
            .await?;
        Ok(Some(Slowest {
            ms: us as f64 / 1000.0,
            script: if sha.is_empty() { "-" } else { script_named(&sha) },
        }))
    }

    /// Deletes every key matching `pattern` with `command` (DEL or UNLINK); returns how many.
    async fn delete_keys(&self, pattern: &str, command: &str) -> Result<usize, String> {
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        // SCAN ends when the cursor is back to 0; the bound only guards against a
        // server that never says so.
        for _ in 0..1_000_000 {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000);
            let (next, keys): (u64, Vec<String>) = self.query("scanning keys", &scan).await?;
            if !keys.is_empty() {
                let n: usize = self
                    .query("deleting keys", redis::cmd(command).arg(&keys))
                    .await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
        Err(format!("SCAN of {pattern} did not end"))
    }
}

/// Opens a multiplexed connection.
async fn connect(url: &str) -> Result<MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| format!("bad redis url: {e}"))?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot connect to redis: {e}"))
}

/// The value of `field:value` in an INFO reply.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(field)?.strip_prefix(':'))
}

/// A unique scheduler name for one measurement: `bench-<pid>-<n>`.
fn fresh_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "bench-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The key pattern of every scheduler this process made.
fn all_bench_keys() -> String {
    format!("{DEFAULT_KEY_PREFIX}:{{bench-{}-*", std::process::id())
}

// ------------------------------------------------------------------ backends

/// A backend with an endless backlog: every poll offers a new task id, and the id
/// it last started is kept in `started`.
pub(crate) struct Endless {
    name: String,
    next: AtomicU64,
    started: Arc<Mutex<String>>,
    /// Whether `poll_many` is provided.
    batch: bool,
    /// While set, the backlog is empty: polls offer nothing.
    dry: Arc<AtomicBool>,
}

impl Endless {
    /// A backend named `name`; returns it with its "last started" cell.
    pub(crate) fn new(name: String) -> (Self, Arc<Mutex<String>>) {
        let started = Arc::new(Mutex::new(String::new()));
        let backend = Endless {
            name,
            next: AtomicU64::new(0),
            started: started.clone(),
            batch: false,
            dry: Arc::new(AtomicBool::new(false)),
        };
        (backend, started)
    }

    /// A backend named `name` that provides `poll_many`.
    pub(crate) fn batching(name: String) -> Self {
        Endless {
            batch: true,
            ..Endless::new(name).0
        }
    }
}

impl Backend for Endless {
    /// The name given at creation.
    fn name(&self) -> &str {
        &self.name
    }

    /// A new id every time (none while dry).
    async fn poll(&self) -> Result<Option<String>, BoxError> {
        if self.dry.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Ok(Some(format!("{}-{n}", self.name)))
    }

    /// `n` new ids, when batching (none while dry).
    async fn poll_many(&self, n: usize) -> Result<Option<Vec<String>>, BoxError> {
        if !self.batch {
            return Ok(None);
        }
        if self.dry.load(Ordering::Relaxed) {
            return Ok(Some(Vec::new()));
        }
        let first = self.next.fetch_add(n as u64, Ordering::Relaxed);
        Ok(Some(
            (first..first + n as u64)
                .map(|i| format!("{}-{i}", self.name))
                .collect(),
        ))
    }

    /// Remembers the id as the one running.
    async fn start_callback(&self, task_id: &str) -> Result<(), BoxError> {
        task_id.clone_into(&mut lock(&self.started));
        Ok(())
    }
}

/// A scheduler of 32 slots, slot i fed only by its own backend `Bi`, all filled:
/// caller i works on slot i+1 and its task.
struct Fleet {
    scheduler: Scheduler,
    /// Every key of the scheduler starts with this.
    base: String,
    /// The task running in each slot, index i for slot i+1.
    current: Vec<Arc<Mutex<String>>>,
    /// The epoch's `task_buckets`, which claim.lua checks.
    buckets: u32,
}

impl Fleet {
    /// Builds and fills the fleet under a fresh name.
    async fn start(url: &str) -> Result<Self, String> {
        let mut builder = Scheduler::builder(fresh_name()).redis_url(url);
        let mut current = Vec::new();
        for i in 1..=FLEET {
            let (backend, started) = Endless::new(format!("B{i}"));
            builder = builder
                .backend(backend)
                .slot(SlotConfig::new(i.to_string(), [format!("B{i}")]).timeout(FLEET_TIMEOUT));
            current.push(started);
        }
        let scheduler = builder.build().await.map_err(|e| error_chain(&e))?;
        let report = scheduler.schedule().await.map_err(|e| error_chain(&e))?;
        if report.started.len() != FLEET {
            return Err(format!(
                "the first tick started {} of {FLEET} tasks",
                report.started.len()
            ));
        }
        let base = scheduler.key_pattern().trim_end_matches('*').to_owned();
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let buckets: u32 = redis::cmd("HGET")
            .arg(format!("{base}epoch"))
            .arg("task_buckets")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("reading task_buckets: {e}"))?;
        Ok(Fleet {
            scheduler,
            base,
            current,
            buckets,
        })
    }

    /// A shared key of the scheduler, e.g. `tasks`.
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.base)
    }

    /// The task caller `i` holds now.
    fn task(&self, i: usize) -> String {
        lock(&self.current[i]).clone()
    }
}

// ------------------------------------------------------------------ operations

/// An operation the throughput phases time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Keepalive,
    StopRefill,
}

impl Op {
    /// Its name in the output.
    fn label(self) -> &'static str {
        match self {
            Op::Keepalive => "keepalive",
            Op::StopRefill => "stop + refill",
        }
    }
}

/// Through the crate, or its scripts invoked raw.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Library,
    Raw,
}

/// What the throughput phases work on.
struct Targets {
    /// keepalive, by the library and raw alike.
    keepalive: Fleet,
    /// stop + refill through the library.
    stop: Fleet,
    /// stop + refill raw: release, free, claim on slots of their own.
    stop_raw: Fleet,
    /// The raw comparators' connection, like the library's one multiplexed connection.
    conn: MultiplexedConnection,
    keepalive_lua: Script,
    release_lua: Script,
    free_lua: Script,
    claim_lua: Script,
    /// Numbers the raw comparator's new task ids.
    next_raw: AtomicU64,
}

/// A script as the crate builds it: common.lua, a newline, the script.
fn crate_script(body: &str) -> Script {
    Script::new(&format!("{COMMON_LUA}\n{body}"))
}

/// The items of a script reply that starts with "OK"; an error otherwise.
fn ok_reply<'a>(value: &'a Value, what: &str) -> Result<&'a [Value], String> {
    match value {
        Value::Array(items) if items.first().and_then(text).as_deref() == Some("OK") => Ok(items),
        other => Err(format!("{what} replied {other:?}")),
    }
}

/// A reply item as text.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

impl Targets {
    /// Builds the three fleets and the raw comparators' connection.
    async fn start(url: &str) -> Result<Self, String> {
        Ok(Targets {
            keepalive: Fleet::start(url).await?,
            stop: Fleet::start(url).await?,
            stop_raw: Fleet::start(url).await?,
            conn: connect(url).await?,
            keepalive_lua: crate_script(KEEPALIVE_LUA),
            release_lua: crate_script(RELEASE_LUA),
            free_lua: crate_script(FREE_LUA),
            claim_lua: crate_script(CLAIM_LUA),
            next_raw: AtomicU64::new(0),
        })
    }

    /// Runs `op` once as caller `i`.
    async fn once(&self, op: Op, via: Via, i: usize) -> Result<(), String> {
        match (op, via) {
            (Op::Keepalive, Via::Library) => {
                let task = self.keepalive.task(i);
                let scheduler = &self.keepalive.scheduler;
                scheduler.keepalive(&task).await.map_err(|e| error_chain(&e))
            }
            (Op::Keepalive, Via::Raw) => self.raw_keepalive(i).await,
            (Op::StopRefill, Via::Library) => {
                let task = self.stop.task(i);
                self.stop
                    .scheduler
                    .stop(&task)
                    .await
                    .map_err(|e| error_chain(&e))?;
                if self.stop.task(i) == task {
                    return Err(format!("stop of {task} started no new task"));
                }
                Ok(())
            }
            (Op::StopRefill, Via::Raw) => self.raw_stop(i).await,
        }
    }

    /// keepalive.lua with the KEYS and ARGV the library passes.
    async fn raw_keepalive(&self, i: usize) -> Result<(), String> {
        let fleet = &self.keepalive;
        let task = fleet.task(i);
        let slot_id = (i + 1).to_string();
        let mut call = self.keepalive_lua.prepare_invoke();
        call.key(fleet.scheduler.task_index_key(&task))
            .key(fleet.key(&format!("slot:{slot_id}")))
            .key(fleet.scheduler.deadline_group_key(&slot_id))
            .arg(&task)
            .arg(&slot_id)
            .arg("");
        let mut conn = self.conn.clone();
        let reply: Value = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| format!("raw keepalive: {e}"))?;
        ok_reply(&reply, "raw keepalive").map(|_| ())
    }

    /// What `stop` sends: release.lua, free.lua, then claim.lua of a new task.
    async fn raw_stop(&self, i: usize) -> Result<(), String> {
        let fleet = &self.stop_raw;
        let task = fleet.task(i);
        let slot_id = (i + 1).to_string();
        let slot_key = fleet.key(&format!("slot:{slot_id}"));
        let mut conn = self.conn.clone();

        let mut release = self.release_lua.prepare_invoke();
        let bucket = fleet.scheduler.task_index_key(&task);
        let group = fleet.scheduler.deadline_group_key(&slot_id);
        let group_id = group.rsplit(':').next().unwrap_or_default().to_owned();
        release
            .key(&bucket)
            .key(&slot_key)
            .key(&group)
            .key(fleet.key("ended"))
            .key(fleet.key("idle"))
            .arg(&task)
            .arg(&slot_id)
            .arg("stop")
            .arg("stopping")
            .arg("");
        let released: Value = release
            .invoke_async(&mut conn)
            .await
            .map_err(|e| format!("raw release: {e}"))?;
        let items = ok_reply(&released, "raw release")?;
        let field = |n: usize| items.get(n).and_then(text).ok_or("raw release: short reply");
        let (now_ms, lease, backend) = (field(1)?, field(2)?, field(3)?);

        let mut free = self.free_lua.prepare_invoke();
        free.key(fleet.key("idle"))
            .key(&slot_key)
            .key(&bucket)
            .key(&group)
            .arg(&slot_id)
            .arg(&lease)
            .arg(&task);
        let freed: String = free
            .invoke_async(&mut conn)
            .await
            .map_err(|e| format!("raw free: {e}"))?;
        if freed != "1" {
            return Err(format!("raw free replied {freed:?}"));
        }

        let new_task = format!("raw-{}", self.next_raw.fetch_add(1, Ordering::Relaxed));
        let mut claim = self.claim_lua.prepare_invoke();
        claim
            .key(fleet.key("deadlines"))
            .key(fleet.key("idle"))
            .key(fleet.key("ended"))
            .key(fleet.key("lease"))
            .key(fleet.key("epoch"))
            .key(&slot_key)
            .key(fleet.scheduler.task_index_key(&new_task))
            .key(&group)
            .arg(STALE_AFTER_MS)
            .arg(fleet.buckets)
            .arg(&slot_id)
            .arg(&new_task)
            .arg(&backend)
            .arg(FLEET_TIMEOUT.as_millis() as u64)
            .arg(&now_ms)
            .arg(&group_id);
        let claimed: Value = claim
            .invoke_async(&mut conn)
            .await
            .map_err(|e| format!("raw claim: {e}"))?;
        // Packed tokens: now, status, lease (lua/common.lua, `put`).
        match &claimed {
            Value::BulkString(b) if packed_tokens(b).get(1) == Some(&&b"OK"[..]) => {}
            other => return Err(format!("raw claim replied {other:?}")),
        }
        *lock(&fleet.current[i]) = new_task;
        Ok(())
    }
}

/// The tokens `<byte length>:<bytes>` of a packed reply (lua/common.lua, `put`); stops
/// at the first malformed one.
fn packed_tokens(mut rest: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some(colon) = rest.iter().position(|&c| c == b':') {
        let Some(len) = std::str::from_utf8(&rest[..colon])
            .ok()
            .and_then(|l| l.parse::<usize>().ok())
        else {
            break;
        };
        let Some(token) = rest.get(colon + 1..colon + 1 + len) else {
            break;
        };
        out.push(token);
        rest = &rest[colon + 1 + len..];
    }
    out
}

// ------------------------------------------------------------------ throughput

/// One timed phase: its rate and latency percentiles.
struct Phase {
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Runs `op` from `callers` concurrent callers for `limit`.
async fn phase(
    targets: &Arc<Targets>,
    op: Op,
    via: Via,
    callers: usize,
    limit: Duration,
) -> Result<Phase, String> {
    let started = Instant::now();
    let mut handles = Vec::with_capacity(callers);
    for i in 0..callers {
        let targets = targets.clone();
        handles.push(tokio::spawn(async move {
            let mut nanos = Vec::new();
            for _ in 0..MAX_OPS_PER_CALLER {
                if started.elapsed() >= limit {
                    break;
                }
                let t = Instant::now();
                targets.once(op, via, i).await?;
                nanos.push(t.elapsed().as_nanos() as u64);
            }
            Ok::<_, String>(nanos)
        }));
    }
    let mut nanos = Vec::new();
    for handle in handles {
        nanos.extend(handle.await.map_err(|e| format!("a caller died: {e}"))??);
    }
    let secs = started.elapsed().as_secs_f64();
    nanos.sort_unstable();
    Ok(Phase {
        ops_per_sec: nanos.len() as f64 / secs,
        p50_us: percentile(&nanos, 0.50) / 1000.0,
        p99_us: percentile(&nanos, 0.99) / 1000.0,
    })
}

/// The `q` quantile of sorted samples (nearest rank); 0 when there are none.
fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64
}

/// The median; 0 for no values.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Throughput and latency of one operation at one concurrency, medians of the runs.
struct ThroughputRow {
    op: Op,
    callers: usize,
    library: f64,
    raw: f64,
    /// library / raw, of the medians.
    ratio: f64,
    p50_us: f64,
    p99_us: f64,
    raw_p50_us: f64,
    raw_p99_us: f64,
}

/// Library and raw phases, alternating (which goes first alternates too), per
/// operation and concurrency; then EVALSHA per operation, counted one caller at a time.
async fn throughput(server: &Server, s: &Settings) -> Result<(Vec<ThroughputRow>, Vec<(Op, f64)>), String> {
    let targets = Arc::new(Targets::start(&server.url).await?);
    let mut rows = Vec::new();
    let mut evalsha = Vec::new();
    for op in [Op::Keepalive, Op::StopRefill] {
        for via in [Via::Library, Via::Raw] {
            phase(&targets, op, via, FLEET, s.warmup).await?;
        }
        for callers in CALLERS {
            eprintln!(
                "bench: {} with {callers} caller(s), {} run(s)",
                op.label(),
                s.runs
            );
            let (mut lib, mut raw) = (Vec::new(), Vec::new());
            for run in 0..s.runs {
                if run % 2 == 0 {
                    lib.push(phase(&targets, op, Via::Library, callers, s.phase).await?);
                    raw.push(phase(&targets, op, Via::Raw, callers, s.phase).await?);
                } else {
                    raw.push(phase(&targets, op, Via::Raw, callers, s.phase).await?);
                    lib.push(phase(&targets, op, Via::Library, callers, s.phase).await?);
                }
            }
            let of = |phases: &[Phase], f: fn(&Phase) -> f64| median(phases.iter().map(f).collect());
            let (library, raw_rate) = (of(&lib, |p| p.ops_per_sec), of(&raw, |p| p.ops_per_sec));
            // The ratio of each run's two phases, back to back, then their median: a
            // VM whose speed drifts from one second to the next skews a pair less
            // than it skews the ratio of the two medians.
            let ratio = median(
                lib.iter()
                    .zip(&raw)
                    .map(|(l, r)| l.ops_per_sec / r.ops_per_sec)
                    .collect(),
            );
            rows.push(ThroughputRow {
                op,
                callers,
                library,
                raw: raw_rate,
                ratio,
                p50_us: of(&lib, |p| p.p50_us),
                p99_us: of(&lib, |p| p.p99_us),
                raw_p50_us: of(&raw, |p| p.p50_us),
                raw_p99_us: of(&raw, |p| p.p99_us),
            });
        }
        let before = server.evalsha_calls().await?;
        for _ in 0..COUNTED_OPS {
            targets.once(op, Via::Library, 0).await?;
        }
        let calls = server.evalsha_calls().await?.saturating_sub(before);
        evalsha.push((op, calls as f64 / COUNTED_OPS as f64));
    }
    for fleet in [&targets.keepalive, &targets.stop, &targets.stop_raw] {
        server.delete_keys(&fleet.scheduler.key_pattern(), "DEL").await?;
    }
    Ok((rows, evalsha))
}

// ------------------------------------------------------------------ sizes

/// One run at one size.
#[derive(Clone, Copy)]
struct SizeRun {
    build_ms: f64,
    fill_ms: f64,
    /// One round trip, the fill's unit: the mean of the median latency of keepalives
    /// sent one by one just before the slot-by-slot fill (on a probe scheduler) and
    /// just after it (on its tasks).
    keepalive_rt_us: f64,
    /// The fill's time per slot over that round trip, in this run.
    fill_ratio: f64,
    /// The fill's time per slot over the mean of the same keepalives (a mean counts the
    /// VM's stalls, as the fill's time does; the median leaves them out).
    fill_ratio_mean: f64,
    fill_evalsha: f64,
    tick_ms: f64,
    tick_evalsha: f64,
    /// Redis memory after the fill minus before the build, per slot.
    bytes_per_slot: f64,
    /// Redis memory after the fill minus before it, per slot.
    fill_bytes_per_slot: f64,
    /// The fill of N idle slots with `poll_many`.
    batch_fill_ms: f64,
    batch_fill_evalsha: f64,
    /// Slowest EVALSHA during the batched fill, when the server is our own.
    batch_fill_slowest: Option<Slowest>,
    /// Time Redis spent in the batched fill's scripts.
    batch_fill_redis_ms: f64,
    /// The sweep of N expired slots with nothing to refill them with: callbacks
    /// and free only.
    bare_sweep_ms: f64,
    bare_sweep_redis_ms: f64,
    bare_sweep_evalsha: f64,
    bare_slowest: Option<Slowest>,
    /// Time Redis spent in the sweep's scripts.
    sweep_redis_ms: f64,
    /// The sweep of N expired slots, refilled with `poll_many`.
    sweep_ms: f64,
    sweep_evalsha: f64,
    /// Slowest EVALSHA during the sweep tick, when the server is our own.
    slowest: Option<Slowest>,
    swept: f64,
    refilled: f64,
}

/// Milliseconds of a duration.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median and mean latency, in µs, of keepalives of `tasks` sent one by one. `None`
/// when a task had passed its deadline: the slot timeout was too short for this VM's pace.
async fn round_trip_us<'a>(
    scheduler: &Scheduler,
    tasks: impl Iterator<Item = &'a str>,
) -> Result<Option<(f64, f64)>, String> {
    let mut latencies = Vec::with_capacity(ROUND_TRIPS);
    for task in tasks {
        let t = Instant::now();
        match scheduler.keepalive(task).await {
            Ok(()) => latencies.push(t.elapsed().as_secs_f64() * 1e6),
            Err(task_semaphore::Error::Expired { .. }) => return Ok(None),
            Err(e) => return Err(error_chain(&e)),
        }
    }
    let mean = latencies.iter().sum::<f64>() / latencies.len().max(1) as f64;
    Ok(Some((median(latencies), mean)))
}

/// Build, fill, steady ticks, then the sweep of all N slots once they expired.
/// `None` when slots expired during the fill or the steady ticks: the timeout was too short.
async fn size_run(server: &Server, n: usize, timeout: Duration) -> Result<Option<SizeRun>, String> {
    let fail = |e: task_semaphore::Error| error_chain(&e);
    let before_build = server.used_memory().await?;
    let (backend, _) = Endless::new("Feed".to_owned());
    let mut builder = Scheduler::builder(fresh_name())
        .redis_url(&server.url)
        .backend(backend);
    for i in 1..=n {
        builder = builder.slot(SlotConfig::new(i.to_string(), ["Feed"]).timeout(timeout));
    }
    let t = Instant::now();
    let scheduler = builder.build().await.map_err(fail)?;
    let build_ms = ms(t.elapsed());
    let after_build = server.used_memory().await?;

    // One round trip just before the fill: keepalives one by one of the one task of a
    // probe scheduler (this one has no task yet).
    let (probe_backend, _) = Endless::new("Probe".to_owned());
    let probe = Scheduler::builder(fresh_name())
        .redis_url(&server.url)
        .backend(probe_backend)
        .slot(SlotConfig::new("1", ["Probe"]).timeout(timeout))
        .build()
        .await
        .map_err(fail)?;
    let probe_task = probe
        .schedule()
        .await
        .map_err(fail)?
        .started
        .pop()
        .ok_or("the probe scheduler started no task")?
        .task_id;
    let before = round_trip_us(&probe, std::iter::repeat_n(probe_task.as_str(), ROUND_TRIPS))
        .await?
        .ok_or("the probe's task passed its deadline")?;
    server.delete_keys(&probe.key_pattern(), "DEL").await?;
    drop(probe);

    let calls = server.evalsha_calls().await?;
    let t = Instant::now();
    let fill = scheduler.schedule().await.map_err(fail)?;
    let fill_ms = ms(t.elapsed());
    let fill_evalsha = server.evalsha_calls().await?.saturating_sub(calls);
    if fill.started.len() != n {
        return Err(format!(
            "the fill of {n} slots started {} tasks",
            fill.started.len()
        ));
    }
    let after_fill = server.used_memory().await?;
    // And just after it, on this scheduler's tasks: the fill is compared with the mean
    // of the two, so a VM whose speed drifts during the fill skews it less.
    let tasks = fill.started.iter().take(ROUND_TRIPS).map(|t| t.task_id.as_str());
    let Some(after) = round_trip_us(&scheduler, tasks).await? else {
        // The fill outlasted the slot timeout: run again with a longer one.
        server.delete_keys(&scheduler.key_pattern(), "DEL").await?;
        return Ok(None);
    };
    let keepalive_rt_us = (before.0 + after.0) / 2.0;
    let fill_ratio = fill_ms * 1000.0 / n as f64 / keepalive_rt_us;
    let fill_ratio_mean = fill_ms * 1000.0 / n as f64 / ((before.1 + after.1) / 2.0);
    // Every deadline is a claim's Redis time plus the timeout.
    drop(fill); // so that the bench's peak RSS is mostly the scheduler's

    let calls = server.evalsha_calls().await?;
    let mut ticks = Vec::with_capacity(2 * STEADY_TICKS);
    for _ in 0..2 * STEADY_TICKS {
        let t = Instant::now();
        let report = scheduler.schedule().await.map_err(fail)?;
        ticks.push(ms(t.elapsed()));
        if !report.started.is_empty() || !report.timed_out.is_empty() {
            server.delete_keys(&scheduler.key_pattern(), "DEL").await?;
            return Ok(None);
        }
    }
    let tick_evalsha = server.evalsha_calls().await?.saturating_sub(calls) as f64 / ticks.len() as f64;

    server.delete_keys(&scheduler.key_pattern(), "DEL").await?;
    drop(scheduler);

    // The same N slots fed by a backend with poll_many: batched fill; the sweep of all
    // of them once expired, with nothing to refill them with; a fill again; and the
    // sweep once they expired, refilled in batches too.
    let feed = Endless::batching("Feed".to_owned());
    let dry = feed.dry.clone();
    let mut builder = Scheduler::builder(fresh_name())
        .redis_url(&server.url)
        .backend(feed);
    let batch_timeout = Duration::from_secs(2) + Duration::from_micros(30 * n as u64);
    for i in 1..=n {
        builder = builder.slot(SlotConfig::new(i.to_string(), ["Feed"]).timeout(batch_timeout));
    }
    let scheduler = builder.build().await.map_err(fail)?;
    server.reset_slowlog().await?;
    let (calls, usec) = server.evalsha_stats().await?;
    let t = Instant::now();
    let fill = scheduler.schedule().await.map_err(fail)?;
    let batch_fill_ms = ms(t.elapsed());
    let (calls_after, usec_after) = server.evalsha_stats().await?;
    let batch_fill_evalsha = calls_after.saturating_sub(calls);
    let batch_fill_redis_ms = usec_after.saturating_sub(usec) as f64 / 1000.0;
    let batch_fill_slowest = server.slowest_evalsha().await?;
    if fill.started.len() != n {
        return Err(format!(
            "the batched fill of {n} slots started {} tasks",
            fill.started.len()
        ));
    }
    server
        .wait_until(
            last_claim_ms(&fill) + batch_timeout.as_millis() as u64,
            batch_timeout + Duration::from_secs(60),
        )
        .await?;
    drop(fill);

    dry.store(true, Ordering::Relaxed);
    let bare = measured_tick(server, &scheduler).await?;
    dry.store(false, Ordering::Relaxed);
    if bare.report.timed_out.len() != n || !bare.report.started.is_empty() {
        return Err(format!(
            "the sweep of {n} slots with nothing to refill timed out {} and started {}",
            bare.report.timed_out.len(),
            bare.report.started.len()
        ));
    }
    let fill = scheduler.schedule().await.map_err(fail)?;
    server
        .wait_until(
            last_claim_ms(&fill) + batch_timeout.as_millis() as u64,
            batch_timeout + Duration::from_secs(60),
        )
        .await?;
    drop(fill);

    let sweep = measured_tick(server, &scheduler).await?;
    server.delete_keys(&scheduler.key_pattern(), "DEL").await?;
    Ok(Some(SizeRun {
        build_ms,
        fill_ms,
        keepalive_rt_us,
        fill_ratio,
        fill_ratio_mean,
        fill_evalsha: fill_evalsha as f64,
        tick_ms: median(ticks.split_off(STEADY_TICKS)),
        tick_evalsha,
        bytes_per_slot: after_fill.saturating_sub(before_build) as f64 / n as f64,
        fill_bytes_per_slot: after_fill.saturating_sub(after_build) as f64 / n as f64,
        batch_fill_ms,
        batch_fill_evalsha: batch_fill_evalsha as f64,
        batch_fill_slowest,
        batch_fill_redis_ms,
        bare_sweep_ms: bare.ms,
        bare_sweep_redis_ms: bare.redis_ms,
        bare_sweep_evalsha: bare.evalsha as f64,
        bare_slowest: bare.slowest,
        sweep_ms: sweep.ms,
        sweep_redis_ms: sweep.redis_ms,
        sweep_evalsha: sweep.evalsha as f64,
        slowest: sweep.slowest,
        swept: sweep.report.timed_out.len() as f64,
        refilled: sweep.report.started.len() as f64,
    }))
}

/// The latest claim time of a fill's tasks, in ms.
fn last_claim_ms(fill: &task_semaphore::ScheduleReport) -> u64 {
    fill.started
        .iter()
        .filter_map(|task| task.at.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .max()
        .unwrap_or(0)
}

/// One tick, with its time, its EVALSHA calls, the time Redis spent in them, and
/// the slowest of them (when the server is our own).
struct MeasuredTick {
    report: task_semaphore::ScheduleReport,
    ms: f64,
    evalsha: u64,
    redis_ms: f64,
    slowest: Option<Slowest>,
}

async fn measured_tick(server: &Server, scheduler: &Scheduler) -> Result<MeasuredTick, String> {
    server.reset_slowlog().await?;
    let (calls, usec) = server.evalsha_stats().await?;
    let t = Instant::now();
    let report = scheduler.schedule().await.map_err(|e| error_chain(&e))?;
    let ms = ms(t.elapsed());
    let (calls_after, usec_after) = server.evalsha_stats().await?;
    Ok(MeasuredTick {
        report,
        ms,
        evalsha: calls_after.saturating_sub(calls),
        redis_ms: usec_after.saturating_sub(usec) as f64 / 1000.0,
        slowest: server.slowest_evalsha().await?,
    })
}

/// The medians of one size's runs.
struct SizeRow {
    n: usize,
    runs: usize,
    median: SizeRun,
    /// The bench process's peak RSS once this size was done.
    peak_rss_kib: Option<u64>,
}

/// Every size, `runs` times each (at most 3 from 100,000 slots). The slot timeout
/// is 1 s + 1.5 x the fill time the last run predicts; a run whose slots expired
/// too early is run again with a longer one.
async fn sizes(server: &Server, s: &Settings) -> Result<Vec<SizeRow>, String> {
    let mut per_slot = FIRST_FILL_GUESS;
    let mut rows = Vec::new();
    for &n in &s.sizes {
        let runs_here = if n >= 100_000 {
            s.runs.min(MAX_RUNS_AT_100K)
        } else {
            s.runs
        };
        let mut runs = Vec::with_capacity(runs_here);
        for run in 0..runs_here {
            let mut done = None;
            for _ in 0..ATTEMPTS {
                let timeout = Duration::from_secs(1) + per_slot.mul_f64(1.5 * n as f64);
                eprintln!(
                    "bench: {n} slots, run {}/{runs_here}, slot timeout {timeout:.1?}",
                    run + 1
                );
                done = size_run(server, n, timeout).await?;
                match &done {
                    Some(r) => {
                        per_slot = Duration::from_secs_f64(r.fill_ms / 1000.0 / n as f64);
                        break;
                    }
                    None => per_slot *= 2,
                }
            }
            runs.push(done.ok_or_else(|| {
                format!("slots of N = {n} kept expiring during the fill or the steady ticks")
            })?);
        }
        let med = |f: fn(&SizeRun) -> f64| median(runs.iter().map(f).collect());
        let median = SizeRun {
            build_ms: med(|r| r.build_ms),
            fill_ms: med(|r| r.fill_ms),
            keepalive_rt_us: med(|r| r.keepalive_rt_us),
            fill_ratio: med(|r| r.fill_ratio),
            fill_ratio_mean: med(|r| r.fill_ratio_mean),
            fill_evalsha: med(|r| r.fill_evalsha),
            tick_ms: med(|r| r.tick_ms),
            tick_evalsha: med(|r| r.tick_evalsha),
            bytes_per_slot: med(|r| r.bytes_per_slot),
            fill_bytes_per_slot: med(|r| r.fill_bytes_per_slot),
            batch_fill_ms: med(|r| r.batch_fill_ms),
            batch_fill_evalsha: med(|r| r.batch_fill_evalsha),
            batch_fill_slowest: slowest_of(runs.iter().map(|r| r.batch_fill_slowest)),
            batch_fill_redis_ms: med(|r| r.batch_fill_redis_ms),
            bare_sweep_ms: med(|r| r.bare_sweep_ms),
            bare_sweep_redis_ms: med(|r| r.bare_sweep_redis_ms),
            bare_sweep_evalsha: med(|r| r.bare_sweep_evalsha),
            bare_slowest: slowest_of(runs.iter().map(|r| r.bare_slowest)),
            sweep_redis_ms: med(|r| r.sweep_redis_ms),
            sweep_ms: med(|r| r.sweep_ms),
            sweep_evalsha: med(|r| r.sweep_evalsha),
            slowest: slowest_of(runs.iter().map(|r| r.slowest)),
            swept: med(|r| r.swept),
            refilled: med(|r| r.refilled),
        };
        rows.push(SizeRow {
            n,
            runs: runs_here,
            median,
            peak_rss_kib: peak_rss_kib(),
        });
    }
    Ok(rows)
}

// ------------------------------------------------------------------ output

/// Everything one bench run measured.
struct Report {
    cores: usize,
    redis_version: String,
    /// "throwaway redis-server" or "REDIS_URL".
    server: &'static str,
    profile: &'static str,
    date: String,
    runs: usize,
    phase_secs: f64,
    throughput: Vec<ThroughputRow>,
    evalsha: Vec<(Op, f64)>,
    sizes: Vec<SizeRow>,
    peak_rss_kib: Option<u64>,
    /// The VM's stalls at the start and at the end of the run.
    stalls: [Stalls; 2],
}

/// Gaps longer than this in a thread that reads the clock in a loop are stalls.
const STALL_GAP: Duration = Duration::from_micros(50);
/// How long the stall meter spins.
const STALL_SPIN: Duration = Duration::from_secs(1);

/// What a thread reading the clock in a loop lost to gaps over [`STALL_GAP`]: on a
/// VM, mostly time the hypervisor gave to others, which no CPU counter of the guest
/// shows (steal time stays near 0 here) and which slows every figure of the run.
/// With it, how long two fixed pieces of work took: a VM whose host is busy runs
/// them slower even without gaps.
#[derive(Clone, Copy, Debug)]
struct Stalls {
    /// The share of the spin's time lost in those gaps, 0 to 1.
    lost: f64,
    /// The longest gap.
    longest: Duration,
    /// FNV-1a over [`HASHED_BYTES`] (a 1 MiB buffer again and again): the CPU.
    hashing: Duration,
    /// One step of a random walk over [`CACHED_BYTES`]: the shared cache, which
    /// other guests of the host may be using too (Redis's data at 10,000 slots is
    /// about that size).
    cached_step: Duration,
    /// One step of a random walk over [`WALKED_BYTES`], which misses the caches at
    /// every step: the memory.
    step: Duration,
}

/// Bytes the CPU probe hashes.
const HASHED_BYTES: usize = 64 << 20;
/// Size of the memory probe's walk (beyond the caches).
const WALKED_BYTES: usize = 64 << 20;
/// Size of the cache probe's walk.
const CACHED_BYTES: usize = 4 << 20;
/// Steps of the memory probe's walk.
const WALK_STEPS: usize = 2_000_000;

/// How long FNV-1a of [`HASHED_BYTES`] takes.
fn time_hashing() -> Duration {
    let buffer: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let start = Instant::now();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for _ in 0..HASHED_BYTES / buffer.len() {
        for &byte in std::hint::black_box(&buffer) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    std::hint::black_box(hash);
    start.elapsed()
}

/// How long one step of a random walk over `bytes` takes: a single cycle through
/// every entry (Sattolo's shuffle, with a fixed xorshift sequence), so each step
/// depends on the last and lands far from it.
fn time_walk_step(bytes: usize) -> Duration {
    let n = bytes / std::mem::size_of::<u32>();
    let mut next: Vec<u32> = (0..n as u32).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        next.swap(i, (x % i as u64) as usize);
    }
    let start = Instant::now();
    let mut at = 0u32;
    for _ in 0..WALK_STEPS {
        at = next[at as usize];
    }
    std::hint::black_box(at);
    start.elapsed() / WALK_STEPS as u32
}

/// Spins for `spin` (blocking this thread): the share of it lost in gaps over
/// [`STALL_GAP`], and the longest gap.
fn spin_gaps(spin: Duration) -> (f64, Duration) {
    let start = Instant::now();
    let (mut last, mut lost, mut longest) = (start, Duration::ZERO, Duration::ZERO);
    while last - start < spin {
        let now = Instant::now();
        let gap = now - last;
        if gap > STALL_GAP {
            lost += gap;
            longest = longest.max(gap);
        }
        last = now;
    }
    let share = lost.as_secs_f64() / (last - start).as_secs_f64().max(f64::MIN_POSITIVE);
    (share, longest)
}

/// The VM's stalls and speed now, measured on a blocking thread. The memory probe's
/// 64 MiB are given back and left out of the peak RSS that the bench reports (the
/// peak is reset to the RSS of the moment: `/proc/self/clear_refs`).
async fn stalls() -> Result<Stalls, String> {
    tokio::task::spawn_blocking(|| {
        let (lost, longest) = spin_gaps(STALL_SPIN);
        let stalls = Stalls {
            lost,
            longest,
            hashing: time_hashing(),
            cached_step: time_walk_step(CACHED_BYTES),
            step: time_walk_step(WALKED_BYTES),
        };
        if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
            eprintln!("bench: could not reset the peak RSS after the memory probe: {e}");
        }
        stalls
    })
    .await
    .map_err(|e| format!("the stall meter failed: {e}"))
}

/// The date and time now, UTC, as `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (hour, minute) = (secs % 86_400 / 3600, secs % 3600 / 60);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02} UTC")
}

/// Peak resident memory of this process (VmHWM), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// KiB as MiB with one decimal, or n/a.
fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "n/a".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
}

/// A whole number with thousands separators: 12,345.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Rows as aligned columns: the first left-aligned, the others right-aligned.
fn columns(rows: &[Vec<String>]) -> String {
    let width = |c: usize| {
        rows.iter()
            .filter_map(|r| r.get(c))
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len)).map(width).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, &w))| {
                if c == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// A row from a label and cells.
fn row(label: &str, cells: impl IntoIterator<Item = String>) -> Vec<String> {
    std::iter::once(label.to_owned()).chain(cells).collect()
}

impl Report {
    /// The readable tables.
    fn text(&self) -> String {
        let [first, last] = self.stalls;
        let mut out = format!(
            "task-semaphore bench: {} cores, Redis {} ({}), {} build, {}\n\
             {} run(s), each figure the median; throughput phases of {:.1} s, library and raw interleaved\n\
             VM stalls (a thread reading the clock for 1 s, at the start / at the end): \
             {:.1}% / {:.1}% of the time lost in gaps over 50 µs, the longest {:.2} / {:.2} ms\n\
             VM speed (at the start / at the end): FNV-1a of 64 MiB {:.1} / {:.1} ms, \
             a random walk over 4 MiB {:.1} / {:.1} ns a step, over 64 MiB {:.1} / {:.1} ns\n\n",
            self.cores,
            self.redis_version,
            self.server,
            self.profile,
            self.date,
            self.runs,
            self.phase_secs,
            first.lost * 100.0,
            last.lost * 100.0,
            first.longest.as_secs_f64() * 1000.0,
            last.longest.as_secs_f64() * 1000.0,
            first.hashing.as_secs_f64() * 1000.0,
            last.hashing.as_secs_f64() * 1000.0,
            first.cached_step.as_secs_f64() * 1e9,
            last.cached_step.as_secs_f64() * 1e9,
            first.step.as_secs_f64() * 1e9,
            last.step.as_secs_f64() * 1e9,
        );
        let mut t = vec![row(
            "throughput (ops/s)",
            ["callers", "library", "raw EVALSHA", "library/raw"].map(String::from),
        )];
        for r in &self.throughput {
            t.push(row(
                r.op.label(),
                [
                    r.callers.to_string(),
                    thousands(r.library),
                    thousands(r.raw),
                    format!("{:.2}", r.ratio),
                ],
            ));
        }
        out.push_str(&columns(&t));
        out.push('\n');

        let mut t = vec![row(
            "latency (µs)",
            ["callers", "p50", "p99", "raw p50", "raw p99"].map(String::from),
        )];
        for r in &self.throughput {
            let us = |v: f64| format!("{v:.0}");
            t.push(row(
                r.op.label(),
                [
                    r.callers.to_string(),
                    us(r.p50_us),
                    us(r.p99_us),
                    us(r.raw_p50_us),
                    us(r.raw_p99_us),
                ],
            ));
        }
        out.push_str(&columns(&t));
        out.push('\n');

        let mut t = vec![row("Redis calls per operation", ["EVALSHA".to_owned()])];
        for (op, calls) in &self.evalsha {
            t.push(row(op.label(), [format!("{calls:.2}")]));
        }
        out.push_str(&columns(&t));
        out.push('\n');

        if !self.sizes.is_empty() {
            let cells = |f: &dyn Fn(&SizeRow) -> String| self.sizes.iter().map(f).collect::<Vec<_>>();
            let cell = |f: &dyn Fn(&SizeRun) -> String| cells(&|size| f(&size.median));
            let slowest = |v: Option<Slowest>| match v {
                None => "n/a".to_owned(),
                Some(v) if v.ms < SLOWLOG_THRESHOLD_US as f64 / 1000.0 => {
                    format!("< {:.1}", SLOWLOG_THRESHOLD_US as f64 / 1000.0)
                }
                Some(v) => format!("{} {:.2}", v.script, v.ms),
            };
            let t = vec![
                row("slots (N)", cells(&|size| thousands(size.n as f64))),
                row("runs", cells(&|size| size.runs.to_string())),
                row(
                    "build (register N slots), ms",
                    cell(&|r| format!("{:.1}", r.build_ms)),
                ),
                row(
                    "fill N idle slots, poll slot by slot, ms",
                    cell(&|r| format!("{:.1}", r.fill_ms)),
                ),
                row(
                    "  per slot, µs",
                    cells(&|size| format!("{:.1}", size.median.fill_ms * 1000.0 / size.n as f64)),
                ),
                row(
                    "  one keepalive round trip beside it, µs",
                    cell(&|r| format!("{:.1}", r.keepalive_rt_us)),
                ),
                row(
                    "  per slot / that round trip",
                    cell(&|r| format!("{:.2}", r.fill_ratio)),
                ),
                row(
                    "  per slot / mean keepalive (stalls in both)",
                    cell(&|r| format!("{:.2}", r.fill_ratio_mean)),
                ),
                row("  EVALSHA", cell(&|r| thousands(r.fill_evalsha))),
                row(
                    "steady tick (median of 20), ms",
                    cell(&|r| format!("{:.3}", r.tick_ms)),
                ),
                row("  EVALSHA", cell(&|r| format!("{:.2}", r.tick_evalsha))),
                row(
                    "fill N idle slots with poll_many, ms",
                    cell(&|r| format!("{:.1}", r.batch_fill_ms)),
                ),
                row(
                    "  of which inside Redis, ms",
                    cell(&|r| format!("{:.1}", r.batch_fill_redis_ms)),
                ),
                row(
                    "  slowest script call (all runs), ms",
                    cell(&|r| slowest(r.batch_fill_slowest)),
                ),
                row("  EVALSHA", cell(&|r| thousands(r.batch_fill_evalsha))),
                row(
                    "sweep N expired, nothing to refill, ms",
                    cell(&|r| format!("{:.1}", r.bare_sweep_ms)),
                ),
                row(
                    "  of which inside Redis, ms",
                    cell(&|r| format!("{:.1}", r.bare_sweep_redis_ms)),
                ),
                row(
                    "  slowest script call (all runs), ms",
                    cell(&|r| slowest(r.bare_slowest)),
                ),
                row("  EVALSHA", cell(&|r| thousands(r.bare_sweep_evalsha))),
                row(
                    "sweep N expired + refill (poll_many), ms",
                    cell(&|r| format!("{:.1}", r.sweep_ms)),
                ),
                row(
                    "  of which inside Redis, ms",
                    cell(&|r| format!("{:.1}", r.sweep_redis_ms)),
                ),
                row(
                    "  slowest script call (all runs), ms",
                    cell(&|r| slowest(r.slowest)),
                ),
                row("  EVALSHA", cell(&|r| thousands(r.sweep_evalsha))),
                row(
                    "  slots swept / refilled",
                    cell(&|r| format!("{} / {}", thousands(r.swept), thousands(r.refilled))),
                ),
                row(
                    "Redis memory per busy slot, bytes",
                    cell(&|r| format!("{:.0}", r.bytes_per_slot)),
                ),
                row(
                    "  of which added by the fill",
                    cell(&|r| format!("{:.0}", r.fill_bytes_per_slot)),
                ),
                row(
                    "peak RSS of the bench so far, MiB",
                    cells(&|size| mib(size.peak_rss_kib)),
                ),
            ];
            out.push_str(&columns(&t));
            out.push('\n');
        }
        out.push_str(&format!(
            "peak RSS of the bench process: {} MiB\n",
            mib(self.peak_rss_kib)
        ));
        out
    }

    /// The same figures as JSON.
    fn json(&self) -> serde_json::Value {
        let throughput: Vec<_> = self
            .throughput
            .iter()
            .map(|r| {
                serde_json::json!({
                    "op": r.op.label(), "callers": r.callers,
                    "library_ops_per_sec": r.library, "raw_ops_per_sec": r.raw, "library_to_raw": r.ratio,
                    "p50_us": r.p50_us, "p99_us": r.p99_us, "raw_p50_us": r.raw_p50_us, "raw_p99_us": r.raw_p99_us,
                })
            })
            .collect();
        let evalsha: serde_json::Map<_, _> = self
            .evalsha
            .iter()
            .map(|(op, calls)| (op.label().to_owned(), serde_json::json!(calls)))
            .collect();
        let sizes: Vec<_> = self
            .sizes
            .iter()
            .map(|size| {
                let r = &size.median;
                serde_json::json!({
                    "slots": size.n, "runs": size.runs, "peak_rss_kib_so_far": size.peak_rss_kib,
                    "build_ms": r.build_ms,
                    "fill_ms": r.fill_ms, "fill_evalsha": r.fill_evalsha,
                    "keepalive_round_trip_us": r.keepalive_rt_us,
                    "fill_per_slot_to_round_trip": r.fill_ratio,
                    "fill_per_slot_to_mean_keepalive": r.fill_ratio_mean,
                    "steady_tick_ms": r.tick_ms, "steady_tick_evalsha": r.tick_evalsha,
                    "fill_poll_many_ms": r.batch_fill_ms, "fill_poll_many_evalsha": r.batch_fill_evalsha,
                    "fill_poll_many_slowest_script_ms": r.batch_fill_slowest.map(|v| v.ms),
                    "fill_poll_many_slowest_script": r.batch_fill_slowest.map(|v| v.script),
                    "fill_poll_many_redis_ms": r.batch_fill_redis_ms, "sweep_redis_ms": r.sweep_redis_ms,
                    "sweep_no_refill_ms": r.bare_sweep_ms, "sweep_no_refill_redis_ms": r.bare_sweep_redis_ms,
                    "sweep_no_refill_evalsha": r.bare_sweep_evalsha,
                    "sweep_no_refill_slowest_script_ms": r.bare_slowest.map(|v| v.ms),
                    "sweep_no_refill_slowest_script": r.bare_slowest.map(|v| v.script),
                    "sweep_ms": r.sweep_ms, "sweep_evalsha": r.sweep_evalsha,
                    "sweep_slowest_script_ms": r.slowest.map(|v| v.ms),
                    "sweep_slowest_script": r.slowest.map(|v| v.script),
                    "swept": r.swept, "refilled": r.refilled,
                    "redis_bytes_per_busy_slot": r.bytes_per_slot,
                    "redis_bytes_per_slot_added_by_fill": r.fill_bytes_per_slot,
                })
            })
            .collect();
        serde_json::json!({
            "cores": self.cores, "redis_version": self.redis_version, "server": self.server,
            "profile": self.profile, "date": self.date, "runs": self.runs, "phase_secs": self.phase_secs,
            "slowlog_threshold_ms": SLOWLOG_THRESHOLD_US as f64 / 1000.0,
            "throughput": throughput, "evalsha_per_op": evalsha, "sizes": sizes,
            "peak_rss_kib": self.peak_rss_kib,
            "stalls": self.stalls.map(|s| serde_json::json!({
                "lost_pct": s.lost * 100.0,
                "longest_ms": s.longest.as_secs_f64() * 1000.0,
                "fnv1a_64mib_ms": s.hashing.as_secs_f64() * 1000.0,
                "walk_4mib_step_ns": s.cached_step.as_secs_f64() * 1e9,
                "walk_step_ns": s.step.as_secs_f64() * 1e9,
            })),
        })
    }
}

/// `task-semaphore bench`: measures, prints the tables (or JSON), and on a
/// `REDIS_URL` server removes every key it made.
pub(crate) async fn bench(args: &[String]) -> Result<(), String> {
    let settings = settings(args)?;
    let server = Server::start().await?;
    let result = measure(&server, &settings).await;
    if server.own.is_none() {
        let removed = server.delete_keys(&all_bench_keys(), "UNLINK").await;
        if let Err(e) = removed {
            eprintln!("bench: could not remove its keys: {e}");
        }
    }
    let report = result?;
    if settings.json {
        let json = serde_json::to_string_pretty(&report.json()).map_err(|e| e.to_string())?;
        println!("{json}");
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

/// Runs every measurement.
async fn measure(server: &Server, s: &Settings) -> Result<Report, String> {
    let info = server.info("server").await?;
    let redis_version = info_field(&info, "redis_version").unwrap_or("?").to_owned();
    let first = stalls().await?;
    let (throughput, evalsha) = throughput(server, s).await?;
    let sizes = sizes(server, s).await?;
    let peak_rss_kib = peak_rss_kib();
    let last = stalls().await?;
    Ok(Report {
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        redis_version,
        server: if server.own.is_some() {
            "throwaway redis-server"
        } else {
            "REDIS_URL"
        },
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        date: utc_now(),
        runs: s.runs,
        phase_secs: s.phase.as_secs_f64(),
        throughput,
        evalsha,
        sizes,
        peak_rss_kib,
        stalls: [first, last],
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    /// Every script in lua/ (but common.lua, which comes in front of each) has a name
    /// for the slowest call, found by its SHA1; an unknown SHA1 is "?".
    fn every_script_is_named_by_its_sha() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/lua");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f != "common.lua")
            .collect();
        files.sort();
        let names: Vec<String> = SCRIPTS.iter().map(|(name, _)| format!("{name}.lua")).collect();
        assert_eq!(files, names);
        for (name, body) in SCRIPTS {
            let sha = crate_script(body).get_hash().to_uppercase();
            assert_eq!(script_named(&sha), name);
        }
        assert_eq!(script_named("0000"), "?");
    }

    #[test]
    /// The stall meter spins for the time asked, and what it reports lost fits in it.
    fn the_stall_meter_reports_a_share_of_its_spin() {
        let spin = Duration::from_millis(30);
        let t = Instant::now();
        let (lost, longest) = spin_gaps(spin);
        let took = t.elapsed();
        assert!(took >= spin, "{took:?}");
        assert!((0.0..=1.0).contains(&lost), "{lost}");
        assert!(longest <= took, "{longest:?}");
        assert!(longest.is_zero() == (lost == 0.0), "{lost} {longest:?}");
    }
}
