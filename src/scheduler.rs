//! The scheduler: its builder, the tick, keepalive, stop, inspect and run.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_redis::{Manager, Pool, Runtime};
use redis::{AsyncConnectionConfig, Value};

use crate::backend::{Backend, BoxError, Callback, DynBackend};
use crate::config::{self, SlotConfig};
use crate::connection::{self, Redis};
use crate::error::{Error, Result};
use crate::keys::{self, Keys};
use crate::pipelined::Pipelined;
use crate::report::{Inspection, ScheduleReport, SlotTask, Stage, TickError};
use crate::scripts::{
    self, Claim, ClaimArgs, EpochVerdict, Held, RegisterSlot, ReleaseMode, SweepChunk, Swept, ToFree,
};
use crate::slot::{from_ms, strict_u64, SlotState, SlotStatus};

/// The longest task id accepted, in bytes (64 KiB).
pub const MAX_TASK_ID_LEN: usize = 64 * 1024;

/// The key prefix when none is set.
pub const DEFAULT_KEY_PREFIX: &str = "task_semaphore";

/// Slots per register script call (at build, not on the tick path).
const REGISTER_CHUNK: usize = 500;

/// Slots per sweep (and free) script call by default ([`SchedulerBuilder::sweep_chunk`]):
/// 10–25 µs each inside Redis (more at 100,000 slots, where a call of 200 took up to
/// 8.5 ms), so that no call blocks Redis for more than a few milliseconds (`make
/// bench` measures it). A group of the deadline index with more due slots is split
/// across calls: a call of thousands of slots would hold Redis for tens of
/// milliseconds, and past about 4,000 it fails (Lua's `unpack` takes at most 8,000
/// values).
const SWEEP_CHUNK: usize = 100;

/// The largest `claim_chunk` and `sweep_chunk` the builder takes: a call of 1,000
/// holds Redis for about 10–20 ms on this project's VM (2026-11-30, SLOWLOG: a claim
/// call 8–12 ms, a sweep call 18, a free call 10), and stays far from Lua's `unpack`
/// limit (about 8,000 values).
pub const MAX_CHUNK: usize = 1_000;

/// Due groups of the deadline index one tick reads at a time (each of 16–32 slots
/// when all are busy); more are read by a further tick call (each round starts with a
/// sweep call that nothing overlaps). The round reads the groups' times with one
/// pipeline of `HGETALL`s: 1,000 groups are about 25,000 entries.
const MAX_DUE: usize = 1_000;

/// Idle slots the tick script lists itself; beyond that the scheduler pages through
/// the idle set with SSCAN, so that no script call builds a huge reply.
const IDLE_LISTED: usize = 1000;

/// Claims per claim script call when filling in batches (`poll_many`), by default
/// ([`SchedulerBuilder::claim_chunk`]): each call stays around a millisecond of Redis
/// time.
const CLAIM_CHUNK: usize = 200;

/// Entries of a hash that Redis keeps as a small listpack (its default
/// `hash-max-listpack-entries`): the most slots a task bucket or deadline group should
/// hold.
const LISTPACK_ENTRIES: usize = 128;

/// `Inner::batching`: the backend returned `None` from `poll_many` (polls one by one).
const NO_BATCH: u8 = 2;

/// Builds a [`Scheduler`]: name, Redis, backends and slots. Errors surface at
/// [`build`](SchedulerBuilder::build).
#[must_use]
pub struct SchedulerBuilder {
    name: String,
    prefix: String,
    redis_url: Option<String>,
    tls_root_cert: Option<Vec<u8>>,
    pool: Option<Pool>,
    backends: Vec<Arc<dyn DynBackend>>,
    slots: Vec<SlotConfig>,
    errors: Vec<Error>,
    redis_timeout: Duration,
    stale_poll_after: Duration,
    quarantine_on_data_loss: bool,
    claim_chunk: usize,
    sweep_chunk: usize,
}

impl fmt::Debug for SchedulerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchedulerBuilder")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .field(
                "backends",
                &self.backends.iter().map(|b| b.name()).collect::<Vec<_>>(),
            )
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl SchedulerBuilder {
    /// Where Redis is, as a `redis://` URL, or `rediss://` for TLS (see
    /// [`tls_root_cert`](Self::tls_root_cert)). The scheduler makes its own pool.
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// For a `rediss://` [`redis_url`](Self::redis_url): the CA certificates (PEM) that
    /// sign the server's certificate, trusted instead of the system's roots, e.g. for a
    /// self-signed CA. Without it the system's roots are used (`SSL_CERT_FILE` and
    /// `SSL_CERT_DIR` are honoured). Build a [`redis_pool`](Self::redis_pool) for
    /// client certificates (mutual TLS).
    pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_cert = Some(pem.into());
        self
    }

    /// A pool the caller owns. The scheduler takes one connection from it and keeps
    /// it (a multiplexed connection serves all concurrent calls), taking another
    /// when that one breaks.
    pub fn redis_pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Registers a backend under [`Backend::name`].
    pub fn backend(mut self, backend: impl Backend) -> Self {
        self.backends.push(Arc::new(backend));
        self
    }

    /// Adds the slots of a JSON list, in the predecessor's format (see the README).
    /// Can be called more than once.
    pub fn load_json(mut self, json: &str) -> Self {
        match config::parse_json(json) {
            Ok(slots) => self.slots.extend(slots),
            Err(e) => self.errors.push(e),
        }
        self
    }

    /// Adds one slot.
    pub fn slot(mut self, slot: SlotConfig) -> Self {
        self.slots.push(slot);
        self
    }

    /// The start of every key (default `task_semaphore`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one Redis request may take before it fails with
    /// [`Error::Timeout`] (default 5 s). Bounds every call when Redis is unreachable.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.redis_timeout = timeout;
        self
    }

    /// How old a poll may be when its claim reaches Redis (default 60 s); an older
    /// one is dropped and the slot polls again on the next tick. It is also how long
    /// Redis remembers ended tasks to refuse stale polls of them.
    pub fn stale_poll_after(mut self, window: Duration) -> Self {
        self.stale_poll_after = window;
        self
    }

    /// Whether a replica that finds the scheduler's state lost in Redis (a restart
    /// without persistence, `FLUSHALL`, a failover that lost writes) grants no slot
    /// for the longest slot timeout of its config, counted from when the state was
    /// found lost (the new epoch's creation), so that tasks of the lost generation
    /// finish or time out before a new generation starts beside them. Default `true`.
    /// The loss is detected and logged either way.
    pub fn quarantine_on_data_loss(mut self, on: bool) -> Self {
        self.quarantine_on_data_loss = on;
        self
    }

    /// Claims per script call when a backend's [`poll_many`](crate::Backend::poll_many)
    /// fills many slots (default 200, at most [`MAX_CHUNK`]). Calls are pipelined: up
    /// to four chunks are claimed ahead of the `start_callback`s that run for them,
    /// and a claimed slot's deadline runs from its claim. Smaller chunks hold Redis
    /// for less time per call and start fewer deadlines ahead of slow
    /// `start_callback`s; larger ones take fewer round trips.
    pub fn claim_chunk(mut self, slots: usize) -> Self {
        self.claim_chunk = slots;
        self
    }

    /// Expired slots per sweep (and free) script call (default 100, at most
    /// [`MAX_CHUNK`]). Like the claims, sweep calls are pipelined ahead of the
    /// `timeout_callback`s and `stop_callback`s, and a swept slot's `reclaim` time runs
    /// from its sweep: with slow callbacks and short timeouts, take smaller chunks.
    pub fn sweep_chunk(mut self, slots: usize) -> Self {
        self.sweep_chunk = slots;
        self
    }

    /// Checks the configuration, connects, and registers the slots in Redis
    /// (creating missing ones as idle; busy ones are left as they are).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid name, prefix, slot list, unknown or
    /// duplicate backend or slot, chunk size out of range, or no Redis given; [`Error::Redis`],
    /// [`Error::Timeout`] or [`Error::Pool`] when Redis cannot be reached;
    /// [`Error::CorruptState`] when a shared key of the scheduler holds foreign data.
    pub async fn build(self) -> Result<Scheduler> {
        if let Some(first) = self.errors.into_iter().next() {
            return Err(first);
        }
        config::validate_name("scheduler name", &self.name)?;
        config::validate_name("key prefix", &self.prefix)?;
        let stale_after_ms = u64::try_from(self.stale_poll_after.as_millis()).unwrap_or(u64::MAX);
        if stale_after_ms == 0 || self.redis_timeout.is_zero() {
            return Err(Error::Config(
                "stale_poll_after and redis_timeout must be positive".into(),
            ));
        }
        // The scripts read numbers of at most 15 digits (ms): ten years is far inside.
        if self.stale_poll_after > config::MAX_TIMEOUT {
            return Err(Error::Config(format!(
                "stale_poll_after is {:?}; it must be at most 10 years",
                self.stale_poll_after
            )));
        }
        for (what, slots) in [
            ("claim_chunk", self.claim_chunk),
            ("sweep_chunk", self.sweep_chunk),
        ] {
            if !(1..=MAX_CHUNK).contains(&slots) {
                return Err(Error::Config(format!(
                    "{what} is {slots}; it must be from 1 to {MAX_CHUNK}"
                )));
            }
        }
        let mut backend_index = HashMap::new();
        for (i, b) in self.backends.iter().enumerate() {
            if b.name().is_empty() {
                return Err(Error::Config("a backend has an empty name".into()));
            }
            if backend_index.insert(b.name().to_owned(), i).is_some() {
                return Err(Error::Config(format!(
                    "backend {:?} is registered twice",
                    b.name()
                )));
            }
        }
        if self.slots.is_empty() {
            return Err(Error::Config(
                "no slots: load_json or slot must add at least one".into(),
            ));
        }
        let mut slot_index = HashMap::new();
        let mut slots = Vec::with_capacity(self.slots.len());
        for (i, config) in self.slots.into_iter().enumerate() {
            config.validate()?;
            if slot_index.insert(config.slot_id.clone(), i).is_some() {
                return Err(Error::Config(format!(
                    "slot id {:?} appears twice",
                    config.slot_id
                )));
            }
            let backends = config
                .backends
                .iter()
                .map(|name| {
                    backend_index.get(name).copied().ok_or_else(|| {
                        Error::Config(format!(
                            "slot {:?} names backend {name:?}, which is not registered",
                            config.slot_id
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let backends_json = serde_json::to_string(&config.backends)
                .map_err(|e| Error::Config(format!("slot {:?}: {e}", config.slot_id)))?;
            slots.push(SlotDef {
                config,
                backends,
                backends_json,
            });
        }
        let pool = match (self.pool, self.redis_url) {
            (Some(_), None) if self.tls_root_cert.is_some() => {
                return Err(Error::Config(
                    "tls_root_cert goes with redis_url, not redis_pool".into(),
                ))
            }
            (Some(pool), None) => pool,
            (None, Some(url)) => make_pool(&url, self.tls_root_cert.as_deref(), self.redis_timeout)?,
            (None, None) => return Err(Error::Config("give redis_url or redis_pool".into())),
            (Some(_), Some(_)) => return Err(Error::Config("give redis_url or redis_pool, not both".into())),
        };
        let quarantine_ms = if self.quarantine_on_data_loss {
            slots.iter().map(|s| s.config.timeout_ms()).max().unwrap_or(0)
        } else {
            0
        };
        let batching = self.backends.iter().map(|_| AtomicU8::new(0)).collect();
        let inner = Inner {
            keys: Keys::new(&self.prefix, &self.name),
            name: self.name,
            redis: Redis::new(pool, self.redis_timeout),
            slots,
            slot_index,
            backends: self.backends,
            backend_index,
            stale_after_ms,
            quarantine_ms,
            claim_chunk: self.claim_chunk,
            sweep_chunk: self.sweep_chunk,
            located: Mutex::new(HashMap::new()),
            epoch: Mutex::new(String::new()),
            task_buckets: AtomicU32::new(1),
            max_lease: AtomicU64::new(0),
            batching,
            corrupt_logged: Mutex::new(HashMap::new()),
        };
        let scheduler = Scheduler {
            inner: Arc::new(inner),
        };
        scheduler.register().await?;
        Ok(scheduler)
    }
}

fn make_pool(url: &str, tls_root_cert: Option<&[u8]>, timeout: Duration) -> Result<Pool> {
    // Only the connect has the redis crate's own timeout: every request is bounded by
    // `Redis::run`, so that an unanswered one is `Error::Timeout`, never retried.
    let connection = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(None);
    let info = connection::connection_info(url, tls_root_cert)?;
    let manager = Manager::new_with_config(info, connection).map_err(|source| Error::Redis {
        context: "reading the redis url",
        source,
    })?;
    Pool::builder(manager)
        .max_size(4)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .map_err(|e| Error::Config(format!("cannot build the redis pool: {e}")))
}

/// A slot of this replica's configuration.
struct SlotDef {
    config: SlotConfig,
    /// Indexes into `Inner::backends`, in polling order.
    backends: Vec<usize>,
    backends_json: String,
}

struct Inner {
    name: String,
    keys: Keys,
    redis: Redis,
    slots: Vec<SlotDef>,
    slot_index: HashMap<String, usize>,
    backends: Vec<Arc<dyn DynBackend>>,
    backend_index: HashMap<String, usize>,
    stale_after_ms: u64,
    /// How long no slot is granted after lost state (the longest slot timeout, or 0).
    quarantine_ms: u64,
    /// Claims per claim call of a batched fill.
    claim_chunk: usize,
    /// Slots per sweep (and free) call.
    sweep_chunk: usize,
    /// The epoch id this replica saw last.
    epoch: Mutex<String>,
    /// The task index's bucket count in that epoch (`task_buckets` of the epoch hash).
    task_buckets: AtomicU32,
    /// The highest lease this replica has seen, to keep leases from repeating.
    max_lease: AtomicU64,
    /// Per backend: 0 not known yet, [`NO_BATCH`] when it has no `poll_many`.
    batching: Vec<AtomicU8>,
    /// The last problem logged per corrupt key: a slot hash or a group of the deadline
    /// index (see `record_once`).
    corrupt_logged: Mutex<HashMap<String, String>>,
    /// Task id -> slot id, a hint that saves the index lookup of a keepalive or stop;
    /// the scripts check it, so a stale hint costs one retry, never a wrong write.
    located: Mutex<HashMap<String, String>>,
}

/// Caps how many tasks run at once: N slots in Redis, filled from backends.
///
/// Cheap to clone (an `Arc` inside); every method takes `&self`, so one value can
/// serve a tick loop and the keepalive/stop calls of many tasks at once. Several
/// processes with the same name and config may run against one Redis.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("name", &self.inner.name)
            .field("slots", &self.inner.slots.len())
            .field(
                "backends",
                &self.inner.backends.iter().map(|b| b.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The last Redis time seen, and when (local monotonic clock) it was seen.
struct Clock {
    redis_ms: u64,
    seen: Instant,
}

impl Clock {
    fn new(redis_ms: u64) -> Self {
        Clock {
            redis_ms,
            seen: Instant::now(),
        }
    }
    fn saw(&mut self, redis_ms: u64) {
        *self = Clock::new(redis_ms);
    }
}

/// What the callbacks of an ending hold decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finished {
    /// Free the slot.
    Free,
    /// Keep it `stopping` until its reclaim time.
    Keep,
    /// Keep it, after a timeout whose `timeout_callback` succeeded but whose
    /// `stop_callback` failed: its reclaim runs `stop_callback` only.
    KeepTimeoutDone,
}

/// A fresh epoch id: unique enough across processes and time (no rand crate needed).
fn new_epoch_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    format!("{nanos:x}-{:016x}", h.finish())
}

/// The error for a task that holds no slot (under the caller's lease, if given).
fn not_held(task_id: &str, lease: Option<u64>, current: Option<u64>) -> Error {
    match lease {
        Some(lease) => Error::LeaseLost {
            task_id: task_id.to_owned(),
            lease,
            current,
        },
        None => Error::WrongTaskId(task_id.to_owned()),
    }
}

/// Checks a task id before it goes to Redis.
fn check_task_id(task_id: &str) -> Result<()> {
    if task_id.is_empty() {
        return Err(Error::InvalidTaskId("it is empty".into()));
    }
    if task_id.len() > MAX_TASK_ID_LEN {
        return Err(Error::InvalidTaskId(format!(
            "it is {} bytes long; the limit is {MAX_TASK_ID_LEN}",
            task_id.len()
        )));
    }
    Ok(())
}

fn record(
    sink: &mut Vec<TickError>,
    stage: Stage,
    slot_id: &str,
    backend: Option<&str>,
    task_id: Option<&str>,
    message: impl fmt::Display,
) {
    let message = message.to_string();
    tracing::warn!(?stage, slot_id, backend, task_id, "{message}");
    sink.push(TickError {
        stage,
        slot_id: Some(slot_id.to_owned()),
        backend: backend.map(str::to_owned),
        task_id: task_id.map(str::to_owned),
        message,
    });
}

impl Scheduler {
    /// Starts building a scheduler; `name` is its Redis namespace.
    pub fn builder(name: impl Into<String>) -> SchedulerBuilder {
        SchedulerBuilder {
            name: name.into(),
            prefix: DEFAULT_KEY_PREFIX.to_owned(),
            redis_url: None,
            tls_root_cert: None,
            pool: None,
            backends: Vec::new(),
            slots: Vec::new(),
            errors: Vec::new(),
            redis_timeout: Duration::from_secs(5),
            stale_poll_after: Duration::from_secs(60),
            quarantine_on_data_loss: true,
            claim_chunk: CLAIM_CHUNK,
            sweep_chunk: SWEEP_CHUNK,
        }
    }

    /// The scheduler's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The slots of this replica's configuration, in order.
    pub fn slots(&self) -> impl Iterator<Item = &SlotConfig> {
        self.inner.slots.iter().map(|s| &s.config)
    }

    /// The glob pattern of every Redis key of this scheduler, for `redis-cli --scan --pattern`.
    pub fn key_pattern(&self) -> String {
        self.inner.keys.pattern()
    }

    async fn register(&self) -> Result<()> {
        let inner = &self.inner;
        scripts::load_all(&inner.redis).await?;
        self.warn_if_evicting().await;
        self.check_epoch().await?;
        self.register_slots().await
    }

    /// Compares the epoch in Redis with the one this replica saw (creating it when
    /// missing). Returns whether the state was lost; logs it loudly when so.
    async fn check_epoch(&self) -> Result<bool> {
        let inner = &self.inner;
        let seen = inner.epoch.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let epoch = scripts::epoch(
            &inner.redis,
            &inner.keys,
            &seen,
            &new_epoch_id(),
            inner.quarantine_ms,
            inner.max_lease.load(Ordering::Relaxed),
            keys::buckets_for(inner.slots.len()),
        )
        .await?;
        let lost = epoch.verdict == EpochVerdict::Lost;
        if lost {
            tracing::error!(
                scheduler = inner.name,
                key = inner.keys.epoch,
                seen_epoch = seen,
                epoch = epoch.id,
                quarantine_until_ms = epoch.quarantine_until_ms,
                "REDIS LOST THE STATE OF THIS SCHEDULER (restart without persistence, FLUSHALL or \
                 a failover that lost writes): tasks started before may still run; no slot is \
                 granted until the quarantine ends"
            );
        }
        inner.task_buckets.store(epoch.task_buckets, Ordering::Relaxed);
        *inner.epoch.lock().unwrap_or_else(|p| p.into_inner()) = epoch.id;
        self.warn_if_outgrown(epoch.task_buckets);
        Ok(lost)
    }

    /// Warns when this config has more slots than the state's bucket count keeps in
    /// small hashes: past [`LISTPACK_ENTRIES`] slots a bucket, the task buckets and
    /// deadline groups of a busy scheduler become big hashes in Redis (README, Limits).
    fn warn_if_outgrown(&self, buckets: u32) {
        let inner = &self.inner;
        let slots = inner.slots.len();
        if slots <= LISTPACK_ENTRIES * buckets as usize {
            return;
        }
        tracing::warn!(
            scheduler = inner.name,
            slots,
            task_buckets = buckets,
            "the state of scheduler {:?} in Redis has task_buckets = {buckets}, sized for \
             about {} slots; this config has {slots}, about {} a bucket and a deadline group: past \
             {LISTPACK_ENTRIES}, each is a big hash in Redis (about 135 more bytes a busy slot) \
             and a due group is read whole. The count is set when the state is created: to \
             size it for this config, delete the scheduler's keys while no task runs (README, \
             Limits)",
            inner.name,
            32 * buckets as usize,
            slots.div_ceil(buckets as usize),
        );
    }

    /// The key of slot `slot_id`'s hash: its config and holder as plain-text fields,
    /// which `redis-cli HGETALL <key>` shows (see the README, "Redis keys").
    pub fn slot_key(&self, slot_id: &str) -> String {
        self.inner.keys.slot(slot_id)
    }

    /// The key of the `deadlines` sorted set: each group of the deadline index with a
    /// bound (ms) no later than any time in it, which `redis-cli ZRANGE <key> 0 -1
    /// WITHSCORES` shows.
    pub fn deadlines_key(&self) -> String {
        self.inner.keys.deadlines.clone()
    }

    /// The key of the task index's bucket that holds `task_id`'s entry: a HASH task
    /// id → slot id, which `redis-cli HGET <key> <task id>` reads (see the README,
    /// "Redis keys"). The bucket count is the epoch's, as this replica last saw it.
    pub fn task_index_key(&self, task_id: &str) -> String {
        self.inner.keys.task_bucket(task_id, self.buckets())
    }

    /// The key of the deadline index's group that holds `slot_id`'s time: a HASH slot
    /// id → deadline (busy) or reclaim time (stopping), in ms, read by `redis-cli HGET
    /// <key> <slot id>`. The group's id, the key's last part, is its member in
    /// `deadlines` (see the README, "Redis keys").
    pub fn deadline_group_key(&self, slot_id: &str) -> String {
        self.inner.keys.group(slot_id, self.buckets()).1
    }

    /// The task index's bucket count this replica uses.
    fn buckets(&self) -> u32 {
        self.inner.task_buckets.load(Ordering::Relaxed)
    }

    /// After a task was not found in the index: rereads the epoch's bucket count, in
    /// case the epoch changed since this replica last looked (it may only serve
    /// keepalive and stop, and never tick). Returns whether it changed, so the caller
    /// looks again.
    async fn buckets_changed(&self) -> Result<bool> {
        let inner = &self.inner;
        let stored: Option<String> = inner
            .redis
            .query(
                "reading the task buckets",
                redis::cmd("HGET").arg(&inner.keys.epoch).arg("task_buckets"),
            )
            .await?;
        let Some(buckets) = stored
            .and_then(|b| b.parse::<u32>().ok())
            .filter(|b| b.is_power_of_two() && *b <= keys::MAX_BUCKETS)
        else {
            return Ok(false);
        };
        Ok(inner.task_buckets.swap(buckets, Ordering::Relaxed) != buckets)
    }

    fn saw_lease(&self, lease: u64) {
        self.inner.max_lease.fetch_max(lease, Ordering::Relaxed);
    }

    async fn register_slots(&self) -> Result<()> {
        let inner = &self.inner;
        for chunk in inner.slots.chunks(REGISTER_CHUNK) {
            let args: Vec<RegisterSlot<'_>> = chunk
                .iter()
                .map(|s| RegisterSlot {
                    slot_id: &s.config.slot_id,
                    backends_json: &s.backends_json,
                    timeout_ms: s.config.timeout_ms(),
                })
                .collect();
            let statuses = scripts::register(&inner.redis, &inner.keys, self.buckets(), &args).await?;
            for (slot, status) in chunk.iter().zip(statuses) {
                if let Some(why) = status.strip_prefix("corrupt ") {
                    tracing::error!(
                        key = inner.keys.slot(&slot.config.slot_id),
                        "slot {:?} is corrupt and will not be used: {why}",
                        slot.config.slot_id
                    );
                }
            }
        }
        Ok(())
    }

    /// Slot keys carry no TTL, but an `allkeys-*` eviction policy may still drop
    /// them under memory pressure, and a dropped slot loses its holder: say so.
    /// (`CONFIG` may be denied to this user or renamed; then nothing is said.)
    async fn warn_if_evicting(&self) {
        let reply: Result<Vec<String>> = self
            .inner
            .redis
            .query(
                "reading maxmemory-policy",
                redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"),
            )
            .await;
        match reply {
            Ok(pair) => {
                if let Some(policy) = pair.get(1).filter(|p| p.starts_with("allkeys-")) {
                    tracing::warn!(
                        policy,
                        "redis maxmemory-policy {policy} may evict the slot keys of scheduler {:?}; \
                         use noeviction or a volatile-* policy",
                        self.inner.name
                    );
                }
            }
            Err(e) => tracing::debug!("could not read maxmemory-policy (not checked): {e}"),
        }
    }

    fn backend(&self, name: &str) -> Option<&Arc<dyn DynBackend>> {
        self.inner
            .backend_index
            .get(name)
            .map(|&i| &self.inner.backends[i])
    }

    fn remember(&self, task_id: &str, slot_id: &str) {
        let mut located = self.inner.located.lock().unwrap_or_else(|p| p.into_inner());
        // A hint cache, bounded: clearing it only costs lookups.
        if located.len() > 4 * self.inner.slots.len() + 1024 {
            located.clear();
        }
        located.insert(task_id.to_owned(), slot_id.to_owned());
    }

    fn forget(&self, task_id: &str) {
        let mut located = self.inner.located.lock().unwrap_or_else(|p| p.into_inner());
        located.remove(task_id);
    }

    /// Which slot holds the task: the local hint, else the index in Redis.
    /// Returns the slot id, and whether it came from the local hint.
    async fn locate(&self, task_id: &str) -> Result<(String, bool)> {
        let hint = {
            let located = self.inner.located.lock().unwrap_or_else(|p| p.into_inner());
            located.get(task_id).cloned()
        };
        if let Some(slot_id) = hint {
            return Ok((slot_id, true));
        }
        for _ in 0..2 {
            let bucket = self.inner.keys.task_bucket(task_id, self.buckets());
            let found: Option<String> = self
                .inner
                .redis
                .query("looking up a task", redis::cmd("HGET").arg(&bucket).arg(task_id))
                .await
                .map_err(|e| match e {
                    Error::Redis { ref source, .. } if source.code() == Some("WRONGTYPE") => {
                        Error::CorruptState {
                            key: bucket.clone(),
                            detail: "is not a hash".into(),
                        }
                    }
                    other => other,
                })?;
            if let Some(slot_id) = found {
                return Ok((slot_id, false));
            }
            if !self.buckets_changed().await? {
                break;
            }
        }
        Err(Error::WrongTaskId(task_id.to_owned()))
    }

    /// Asks the backend what to do after `error` in `callback`; true frees the slot.
    async fn tell_error(
        &self,
        backend: &Arc<dyn DynBackend>,
        slot_id: &str,
        task_id: &str,
        error: &BoxError,
        callback: Callback,
        sink: &mut Vec<TickError>,
    ) -> bool {
        record(
            sink,
            Stage::Callback(callback),
            slot_id,
            Some(backend.name()),
            Some(task_id),
            error,
        );
        match backend.on_error(task_id, error, callback).await {
            Ok(free) => free,
            Err(e) => {
                let stage = Stage::ErrorCallback(callback);
                record(sink, stage, slot_id, Some(backend.name()), Some(task_id), e);
                true
            }
        }
    }

    /// Runs the callbacks of a hold that ended (timeout_callback first when it timed
    /// out, then stop_callback). Returns whether the slot may be freed now.
    async fn finish(
        &self,
        slot_id: &str,
        task_id: &str,
        backend_name: &str,
        lease: u64,
        timed_out: bool,
        sink: &mut Vec<TickError>,
    ) -> Finished {
        let Some(backend) = self.backend(backend_name) else {
            let msg = format!(
                "backend {backend_name:?} is not registered in this replica; the slot is freed without callbacks"
            );
            record(
                sink,
                Stage::UnknownBackend,
                slot_id,
                Some(backend_name),
                Some(task_id),
                msg,
            );
            return Finished::Free;
        };
        if timed_out {
            if let Err(e) = backend.call(Callback::Timeout, task_id, lease).await {
                if !self
                    .tell_error(backend, slot_id, task_id, &e, Callback::Timeout, sink)
                    .await
                {
                    return Finished::Keep;
                }
            }
        }
        let free = match backend.call(Callback::Stop, task_id, lease).await {
            Ok(()) => true,
            Err(e) => {
                self.tell_error(backend, slot_id, task_id, &e, Callback::Stop, sink)
                    .await
            }
        };
        match (free, timed_out) {
            (true, _) => Finished::Free,
            (false, true) => Finished::KeepTimeoutDone,
            (false, false) => Finished::Keep,
        }
    }

    /// Refreshes the clock from Redis when it is too old to date a poll.
    async fn fresh_clock(&self, clock: &mut Clock) -> Result<()> {
        if clock.seen.elapsed().as_millis() < u128::from(self.inner.stale_after_ms / 2) {
            return Ok(());
        }
        let (secs, micros): (u64, u64) = self
            .inner
            .redis
            .query("reading redis time", &redis::cmd("TIME"))
            .await?;
        clock.saw(secs * 1000 + micros / 1000);
        Ok(())
    }

    /// Polls the backends of one idle slot in order, from the `from`-th on, and
    /// starts the first task whose claim succeeds. Returns whether the slot was filled.
    async fn fill_slot(
        &self,
        index: usize,
        from: usize,
        clock: &mut Clock,
        report: &mut ScheduleReport,
    ) -> Result<bool> {
        let inner = &self.inner;
        let slot = &inner.slots[index];
        let slot_id = slot.config.slot_id.as_str();
        for &b in slot.backends.iter().skip(from) {
            let backend = &inner.backends[b];
            let name = backend.name();
            self.fresh_clock(clock).await?;
            // Redis time of a reply that came before this poll began: the claim uses it
            // to refuse a task that ended after it (a stale poll).
            let polled_at_ms = clock.redis_ms;
            let task_id = match backend.poll().await {
                Ok(Some(task_id)) => task_id,
                Ok(None) => continue,
                Err(e) => {
                    record(&mut report.errors, Stage::Poll, slot_id, Some(name), None, e);
                    continue;
                }
            };
            if let Err(e) = check_task_id(&task_id) {
                record(&mut report.errors, Stage::Poll, slot_id, Some(name), None, e);
                continue;
            }
            let args = ClaimArgs {
                slot_id,
                task_id: &task_id,
                backend: name,
                timeout_ms: slot.config.timeout_ms(),
                polled_at_ms,
            };
            let (now_ms, outcomes) = scripts::claim(
                &inner.redis,
                &inner.keys,
                self.buckets(),
                inner.stale_after_ms,
                &[args],
            )
            .await?;
            clock.saw(now_ms);
            match outcomes.into_iter().next() {
                Some(Claim::Ok { lease }) => {
                    return Ok(self.start_claimed(index, b, task_id, lease, clock, report).await);
                }
                Some(Claim::TaskBusy | Claim::Stale) => continue,
                Some(Claim::Index(why)) => {
                    let key = self.task_index_key(&task_id);
                    self.refused_claim(key, slot_id, name, &task_id, why, report);
                    continue;
                }
                Some(Claim::Group(why)) => {
                    let key = self.deadline_group_key(slot_id);
                    self.refused_claim(key, slot_id, name, &task_id, why, report);
                    return Ok(false);
                }
                Some(Claim::Corrupt(why)) => {
                    self.corrupt_claim(slot_id, name, &task_id, why, report);
                    return Ok(false);
                }
                Some(Claim::SlotBusy | Claim::Quarantine) | None => return Ok(false),
            }
        }
        Ok(false)
    }

    /// A claim found the slot's own hash unreadable: the slot is skipped.
    fn corrupt_claim(
        &self,
        slot_id: &str,
        backend: &str,
        task_id: &str,
        why: String,
        report: &mut ScheduleReport,
    ) {
        let e = Error::CorruptState {
            key: self.inner.keys.slot(slot_id),
            detail: why,
        };
        self.record_corrupt(&mut report.errors, slot_id, Some(backend), Some(task_id), e);
    }

    /// A claim refused because a split index's key holds foreign data: the task's
    /// bucket (the slot is fine, and may take another task) or the slot's deadline
    /// group (no task can take the slot until it is repaired). An error naming `key`.
    fn refused_claim(
        &self,
        key: String,
        slot_id: &str,
        backend: &str,
        task_id: &str,
        why: String,
        report: &mut ScheduleReport,
    ) {
        let e = Error::CorruptState { key, detail: why };
        record(
            &mut report.errors,
            Stage::Redis,
            slot_id,
            Some(backend),
            Some(task_id),
            e,
        );
    }

    /// Every member of the idle set, by SSCAN pages (each a short command).
    async fn list_idle(&self) -> Result<Vec<String>> {
        let inner = &self.inner;
        let mut ids = HashSet::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<Vec<u8>>) = inner
                .redis
                .query(
                    "listing idle slots",
                    redis::cmd("SSCAN")
                        .arg(&inner.keys.idle)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(IDLE_LISTED),
                )
                .await?;
            for member in page {
                ids.insert(scripts::utf8_in(&inner.keys.idle, "a member", &member)?);
            }
            cursor = next;
            if cursor == 0 {
                return Ok(ids.into_iter().collect());
            }
        }
    }

    /// Reports a corrupt slot in the tick's errors, logged once per distinct problem
    /// (see `record_once`).
    fn record_corrupt(
        &self,
        sink: &mut Vec<TickError>,
        slot_id: &str,
        backend: Option<&str>,
        task_id: Option<&str>,
        message: impl fmt::Display,
    ) {
        let e = TickError {
            stage: Stage::CorruptSlot,
            slot_id: Some(slot_id.to_owned()),
            backend: backend.map(str::to_owned),
            task_id: task_id.map(str::to_owned),
            message: message.to_string(),
        };
        self.record_once(sink, self.inner.keys.slot(slot_id), e);
    }

    /// Reports a group of the deadline index that holds foreign data (another type, or
    /// a field that is not UTF-8, which is left out of the sweep): the tick goes on
    /// with the rest. Logged like a corrupt slot.
    fn record_corrupt_group(&self, sink: &mut Vec<TickError>, key: String, detail: String) {
        let e = TickError {
            stage: Stage::Redis,
            slot_id: None,
            backend: None,
            task_id: None,
            message: Error::CorruptState {
                key: key.clone(),
                detail,
            }
            .to_string(),
        };
        self.record_once(sink, key, e);
    }

    /// Pushes `e` to the tick's errors every time, but logs it (a warning) only when
    /// it is news for `key`, the corrupt key it is about: at its first report, and
    /// again when the problem changes. A corrupt key is seen again by every tick, and
    /// would flood the logs.
    fn record_once(&self, sink: &mut Vec<TickError>, key: String, e: TickError) {
        let first = {
            let mut logged = self
                .inner
                .corrupt_logged
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            logged.insert(key, e.message.clone()).as_ref() != Some(&e.message)
        };
        let (stage, message) = (e.stage, &e.message);
        let (slot_id, backend, task_id) = (e.slot_id.as_deref(), e.backend.as_deref(), e.task_id.as_deref());
        if first {
            tracing::warn!(?stage, slot_id, backend, task_id, "{message}");
        } else {
            tracing::debug!(?stage, slot_id, backend, task_id, "{message}");
        }
        sink.push(e);
    }

    /// Runs `start_callback` for a task just claimed in slot `index` under `lease`.
    /// A failed start frees the slot at once. Returns whether the task started.
    async fn start_claimed(
        &self,
        index: usize,
        b: usize,
        task_id: String,
        lease: u64,
        clock: &mut Clock,
        report: &mut ScheduleReport,
    ) -> bool {
        let inner = &self.inner;
        let slot_id = inner.slots[index].config.slot_id.as_str();
        let backend = &inner.backends[b];
        let name = backend.name();
        self.saw_lease(lease);
        self.remember(&task_id, slot_id);
        match backend.call(Callback::Start, &task_id, lease).await {
            Ok(()) => {
                // The trace of a start by `stop()`'s refill, whose report only
                // `stop_and_report` returns.
                tracing::debug!(slot_id, task_id, backend = name, lease, "started");
                report.started.push(SlotTask {
                    slot_id: slot_id.to_owned(),
                    task_id,
                    backend: name.to_owned(),
                    lease,
                    at: from_ms(clock.redis_ms),
                });
                true
            }
            Err(e) => {
                // The slot is freed whatever the error callback says.
                self.tell_error(
                    backend,
                    slot_id,
                    &task_id,
                    &e,
                    Callback::Start,
                    &mut report.errors,
                )
                .await;
                self.forget(&task_id);
                let released = scripts::release(
                    &inner.redis,
                    &inner.keys,
                    self.buckets(),
                    &task_id,
                    slot_id,
                    "start_failed",
                    ReleaseMode::Idle,
                    Some(lease),
                )
                .await;
                match released {
                    Ok(Held::Ok(r)) => clock.saw(r.now_ms),
                    Ok(_) => {} // already gone: swept or reclaimed meanwhile
                    Err(e) => record(
                        &mut report.errors,
                        Stage::Redis,
                        slot_id,
                        Some(name),
                        Some(&task_id),
                        e,
                    ),
                }
                // A slot whose start failed is not polled again in this tick.
                false
            }
        }
    }

    /// One claim call for a chunk of (slot index, backend position, task id) of the
    /// backend `name`, polled at `polled_at_ms`.
    async fn claim_chunk(
        &self,
        chunk: &[(usize, usize, String)],
        name: &str,
        polled_at_ms: u64,
    ) -> Result<(u64, Vec<Claim>)> {
        let inner = &self.inner;
        let args: Vec<ClaimArgs<'_>> = chunk
            .iter()
            .map(|(index, _, id)| {
                let slot = &inner.slots[*index];
                ClaimArgs {
                    slot_id: &slot.config.slot_id,
                    task_id: id,
                    backend: name,
                    timeout_ms: slot.config.timeout_ms(),
                    polled_at_ms,
                }
            })
            .collect();
        scripts::claim(
            &inner.redis,
            &inner.keys,
            self.buckets(),
            inner.stale_after_ms,
            &args,
        )
        .await
    }

    /// Fills idle slots. Slots whose next backend provides `poll_many` are served in
    /// batches: one `poll_many` per backend and one claim script call per
    /// `claim_chunk` slots; the others poll slot by slot, in config order.
    /// A slot whose batched claim fails for its task (held elsewhere, stale) moves on
    /// to its next backend in the next round. Returns how many slots stay idle.
    async fn fill(&self, idle: Vec<usize>, clock: &mut Clock, report: &mut ScheduleReport) -> Result<usize> {
        let inner = &self.inner;
        let mut left = 0;
        // (slot index, position of the backend to poll next)
        let mut todo: Vec<(usize, usize)> = idle.into_iter().map(|i| (i, 0)).collect();
        while !todo.is_empty() {
            // How many slots wait on each backend that may batch.
            let mut wanted: BTreeMap<usize, usize> = BTreeMap::new();
            for &(index, pos) in &todo {
                if let Some(&b) = inner.slots[index].backends.get(pos) {
                    if inner.batching[b].load(Ordering::Relaxed) != NO_BATCH {
                        *wanted.entry(b).or_default() += 1;
                    }
                }
            }
            // One poll_many per such backend: Some(ids), or None when the poll failed.
            let mut polled: BTreeMap<usize, (u64, Option<std::vec::IntoIter<String>>)> = BTreeMap::new();
            for (b, n) in wanted {
                let backend = &inner.backends[b];
                self.fresh_clock(clock).await?;
                let polled_at_ms = clock.redis_ms;
                match backend.poll_many(n).await {
                    Ok(Some(ids)) => {
                        polled.insert(b, (polled_at_ms, Some(ids.into_iter())));
                    }
                    // No poll_many: this backend polls slot by slot from now on.
                    Ok(None) => inner.batching[b].store(NO_BATCH, Ordering::Relaxed),
                    Err(e) => {
                        let first = todo
                            .iter()
                            .find(|(i, p)| inner.slots[*i].backends.get(*p) == Some(&b))
                            .map_or("", |(i, _)| inner.slots[*i].config.slot_id.as_str());
                        record(
                            &mut report.errors,
                            Stage::Poll,
                            first,
                            Some(backend.name()),
                            None,
                            e,
                        );
                        polled.insert(b, (polled_at_ms, None));
                    }
                }
            }
            // In config order: slot by slot for backends without poll_many; the ids of
            // a batch go to its slots in order.
            let mut claims: BTreeMap<usize, Vec<(usize, usize, String)>> = BTreeMap::new();
            let mut seen = HashSet::new();
            for (index, pos) in std::mem::take(&mut todo) {
                let slot_id = inner.slots[index].config.slot_id.as_str();
                let Some(&b) = inner.slots[index].backends.get(pos) else {
                    left += 1;
                    continue;
                };
                let Some((_, ids)) = polled.get_mut(&b) else {
                    if !self.fill_slot(index, pos, clock, report).await? {
                        left += 1;
                    }
                    continue;
                };
                let name = inner.backends[b].name();
                // The next valid id not given to another slot of this round.
                let id = ids.as_mut().and_then(|ids| {
                    ids.find(|id| match check_task_id(id) {
                        Ok(()) => seen.insert(id.clone()),
                        Err(e) => {
                            record(&mut report.errors, Stage::Poll, slot_id, Some(name), None, e);
                            false
                        }
                    })
                });
                match id {
                    Some(id) => claims.entry(b).or_default().push((index, pos, id)),
                    None => todo.push((index, pos + 1)),
                }
            }
            for (b, claims) in claims {
                let name = inner.backends[b].name();
                let polled_at_ms = polled.get(&b).map_or(0, |(at, _)| *at);
                // Pipelined: the next chunks' claim calls run in Redis while this
                // chunk's start callbacks run here (both cores busy, not one in turn).
                let chunks: Vec<&[(usize, usize, String)]> = claims.chunks(inner.claim_chunk).collect();
                let mut claimed =
                    Pipelined::new(&chunks, |chunk| self.claim_chunk(chunk, name, polled_at_ms));
                while let Some((chunk, result)) = claimed.next().await {
                    let (now_ms, outcomes) = result?;
                    clock.saw(now_ms);
                    claimed
                        .alongside(async {
                            for ((index, pos, id), outcome) in chunk.iter().zip(outcomes) {
                                match outcome {
                                    Claim::Ok { lease } => {
                                        if !self
                                            .start_claimed(*index, b, id.clone(), lease, clock, report)
                                            .await
                                        {
                                            left += 1;
                                        }
                                    }
                                    Claim::TaskBusy | Claim::Stale => todo.push((*index, pos + 1)),
                                    Claim::Index(why) => {
                                        let slot_id = inner.slots[*index].config.slot_id.as_str();
                                        let key = self.task_index_key(id);
                                        self.refused_claim(key, slot_id, name, id, why, report);
                                        todo.push((*index, pos + 1));
                                    }
                                    Claim::Group(why) => {
                                        let slot_id = inner.slots[*index].config.slot_id.as_str();
                                        let key = self.deadline_group_key(slot_id);
                                        self.refused_claim(key, slot_id, name, id, why, report);
                                        left += 1;
                                    }
                                    Claim::Corrupt(why) => {
                                        let slot_id = inner.slots[*index].config.slot_id.as_str();
                                        self.corrupt_claim(slot_id, name, id, why, report);
                                        left += 1;
                                    }
                                    Claim::SlotBusy | Claim::Quarantine => left += 1,
                                }
                            }
                        })
                        .await;
                }
            }
            todo.sort_unstable();
        }
        Ok(left)
    }

    /// One tick: sweeps expired slots (`timeout_callback`, then `stop_callback`,
    /// then the slot is free), then fills every idle slot of this replica's config,
    /// in config order, each polling its backends in order.
    ///
    /// Errors of a single slot (a failing poll or callback, a corrupt slot) do not
    /// stop the tick; they are in [`ScheduleReport::errors`] and logged.
    ///
    /// # Errors
    /// [`Error::Redis`], [`Error::Timeout`], [`Error::Pool`] when Redis fails;
    /// [`Error::CorruptState`] when a shared key of the scheduler holds foreign data.
    pub async fn schedule(&self) -> Result<ScheduleReport> {
        let inner = &self.inner;
        let ended_memory_ms = inner.stale_after_ms.saturating_mul(2);
        let read_tick = |with_idle| {
            scripts::tick(
                &inner.redis,
                &inner.keys,
                MAX_DUE,
                ended_memory_ms,
                with_idle,
                IDLE_LISTED,
            )
        };
        let mut report = ScheduleReport::default();
        let mut tick = read_tick(true).await?;
        let known = inner.epoch.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if tick.epoch != known {
            report.state_lost = self.check_epoch().await?;
            self.register_slots().await?;
            tick = read_tick(true).await?;
        }
        let quarantined = tick.now_ms < tick.quarantine_until_ms;
        if quarantined {
            report.quarantined_until = Some(from_ms(tick.quarantine_until_ms));
        }
        let mut clock = Clock::new(tick.now_ms);
        let mut idle: BTreeSet<usize> = BTreeSet::new();
        if tick.idle_count > tick.idle.len() {
            // Too many to list inside the tick script: page through the set.
            tick.idle = self.list_idle().await?;
        }
        // Bounded, so that slots due again and again (corrupt ones) cannot loop forever.
        let rounds = inner.slots.len() / MAX_DUE + 2;
        for round in 0..rounds {
            idle.extend(
                tick.idle
                    .iter()
                    .filter_map(|id| inner.slot_index.get(id).copied()),
            );
            // Pipelined: the next chunks' sweep calls run in Redis while the callbacks
            // of this one run here. (If this chunk's free fails, the next chunks'
            // slots wait for their reclaim, as after a crash.)
            let chunks = self
                .sweep_chunks(&tick.due, tick.now_ms, &mut report.errors)
                .await?;
            let mut sweeps =
                Pipelined::new(&chunks, |chunk| scripts::sweep(&inner.redis, &inner.keys, chunk));
            while let Some((_, swept)) = sweeps.next().await {
                let (now_ms, items) = swept?;
                clock.saw(now_ms);
                let freed = sweeps
                    .alongside(async {
                        let to_free = self.finish_swept(now_ms, items, &mut report).await;
                        if to_free.is_empty() {
                            return Ok(Vec::new());
                        }
                        let freed =
                            scripts::free(&inner.redis, &inner.keys, self.buckets(), &to_free).await?;
                        Ok::<_, Error>(
                            to_free
                                .into_iter()
                                .zip(freed)
                                .filter_map(|(f, freed)| freed.then_some(f.slot_id))
                                .collect::<Vec<_>>(),
                        )
                    })
                    .await?;
                for slot_id in freed {
                    idle.extend(inner.slot_index.get(&slot_id).copied());
                }
            }
            if tick.due.len() < MAX_DUE || round + 1 == rounds {
                break;
            }
            // More due slots: the idle ones are known already (from the first call and
            // from what this sweep freed), so they are not listed again.
            tick = read_tick(false).await?;
            clock.saw(tick.now_ms);
        }
        if quarantined {
            report.idle = idle.len();
            return Ok(report);
        }
        report.idle = self
            .fill(idle.into_iter().collect(), &mut clock, &mut report)
            .await?;
        Ok(report)
    }

    /// The due slots of the due groups of the deadline index (one pipeline of
    /// `HGETALL`s), in sweep calls of at most `sweep_chunk` slots, each call with the
    /// groups of its slots. A group with no due slot left (its bound was stale: a
    /// keepalive or a free came since) goes in a call too, which settles its bound.
    /// A group that holds foreign data is left out, and reported in `errors`.
    async fn sweep_chunks(
        &self,
        due_groups: &[String],
        now_ms: u64,
        errors: &mut Vec<TickError>,
    ) -> Result<Vec<SweepChunk>> {
        let inner = &self.inner;
        if due_groups.is_empty() {
            return Ok(Vec::new());
        }
        let mut groups = Vec::with_capacity(due_groups.len());
        for g in due_groups {
            groups.push(strict_u64(g).ok_or_else(|| Error::CorruptState {
                key: inner.keys.deadlines.clone(),
                detail: format!("has a member {g:?} that is not a group number"),
            })?);
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for g in &groups {
            pipe.hgetall(inner.keys.group_key(*g));
        }
        let replies: Vec<redis::RedisResult<Value>> =
            inner.redis.pipeline("reading due groups", &pipe).await?;
        let mut chunks = vec![SweepChunk::default()];
        for (g, reply) in groups.into_iter().zip(replies) {
            // Made only to name a group that holds foreign data.
            let key = || inner.keys.group_key(g);
            let entries: Vec<(Vec<u8>, Vec<u8>)> = match reply.map(redis::from_redis_value) {
                Ok(Ok(entries)) => entries,
                Ok(Err(_)) | Err(_) => {
                    let detail = "is not a hash: its slots are not swept until it is repaired";
                    self.record_corrupt_group(errors, key(), detail.into());
                    continue;
                }
            };
            let (mut due, mut bad) = (Vec::new(), Vec::new());
            for (slot, at) in entries {
                // A time that is not a number is the script's to report (naming the group).
                let is_due = std::str::from_utf8(&at)
                    .ok()
                    .and_then(strict_u64)
                    .is_none_or(|at| at <= now_ms);
                if !is_due {
                    continue;
                }
                match String::from_utf8(slot) {
                    Ok(slot) => due.push(slot),
                    Err(e) => bad.push(String::from_utf8_lossy(e.as_bytes()).into_owned()),
                }
            }
            if !bad.is_empty() {
                // Not slot ids: left alone (the group stays due, so they are reported
                // again) while the group's other slots are swept.
                let detail = format!("holds fields that are not UTF-8, left alone: {bad:?}");
                self.record_corrupt_group(errors, key(), detail);
            }
            // Into the calls, `sweep_chunk` slots each: a group with more due slots than
            // a call has room for continues in the next call, which settles its bound.
            // (A group with none left still goes in a call, to settle its bound.)
            let mut due = due.into_iter().peekable();
            while let Some(chunk) = chunks.last_mut() {
                let index = chunk.groups.len();
                chunk.groups.push(g);
                let room = inner.sweep_chunk.saturating_sub(chunk.slots.len());
                chunk
                    .slots
                    .extend(due.by_ref().take(room).map(|slot| (slot, index)));
                let continues = due.peek().is_some();
                chunk.continues = continues;
                if chunk.slots.len() >= inner.sweep_chunk {
                    chunks.push(SweepChunk::default());
                }
                if !continues {
                    break;
                }
            }
        }
        chunks.retain(|c| !c.groups.is_empty());
        Ok(chunks)
    }

    /// Runs the callbacks of what one sweep call took (`timeout_callback` then
    /// `stop_callback` of each timed-out hold; both again for a reclaimed one), and
    /// records it in `report`. Returns the (slot, lease) pairs to free.
    async fn finish_swept(&self, now_ms: u64, swept: Vec<Swept>, report: &mut ScheduleReport) -> Vec<ToFree> {
        let inner = &self.inner;
        let hold = |slot_id, task_id, backend, lease| SlotTask {
            slot_id,
            task_id,
            backend,
            lease,
            at: from_ms(now_ms),
        };
        let mut to_free = Vec::new();
        for item in swept {
            match item {
                Swept::TimedOut {
                    slot_id,
                    task_id,
                    backend,
                    lease,
                } => {
                    self.forget(&task_id);
                    self.saw_lease(lease);
                    match self
                        .finish(&slot_id, &task_id, &backend, lease, true, &mut report.errors)
                        .await
                    {
                        Finished::Free => to_free.push(ToFree {
                            slot_id: slot_id.clone(),
                            lease,
                            task_id: task_id.clone(),
                        }),
                        Finished::Keep => {}
                        // Kept for its stop_callback only: a reclaim must not run
                        // timeout_callback again (if this fails, it may).
                        Finished::KeepTimeoutDone => {
                            if let Err(e) =
                                scripts::timeout_done(&inner.redis, &inner.keys, &slot_id, lease).await
                            {
                                tracing::warn!(
                                    slot_id,
                                    task_id,
                                    lease,
                                    "could not record that timeout_callback ran; a reclaim may run it again: {e}"
                                );
                            }
                        }
                    }
                    report.timed_out.push(hold(slot_id, task_id, backend, lease));
                }
                Swept::Reclaimed {
                    slot_id,
                    task_id,
                    backend,
                    lease,
                    timed_out,
                } => {
                    tracing::warn!(
                        slot_id,
                        task_id,
                        lease,
                        "reclaiming a slot whose callbacks never finished: running them again"
                    );
                    // At least once: the callbacks run again here (the lease is
                    // their dedupe key), and the slot is freed whatever they say.
                    self.finish(&slot_id, &task_id, &backend, lease, timed_out, &mut report.errors)
                        .await;
                    to_free.push(ToFree {
                        slot_id: slot_id.clone(),
                        lease,
                        task_id: task_id.clone(),
                    });
                    report.reclaimed.push(hold(slot_id, task_id, backend, lease));
                }
                Swept::Corrupt { slot_id, why } => {
                    let msg = format!("key {} {why}", inner.keys.slot(&slot_id));
                    self.record_corrupt(&mut report.errors, &slot_id, None, None, msg);
                }
            }
        }
        to_free
    }

    /// Pushes the task's deadline to now + its slot's timeout (Redis time), then
    /// runs the backend's `keepalive_callback`.
    ///
    /// A failing `keepalive_callback` goes to `backend_error_callback`; when that
    /// returns `Ok(true)` or fails, the task's hold ends as by [`stop`](Self::stop).
    ///
    /// # Errors
    /// [`Error::WrongTaskId`] when the task holds no slot; [`Error::Expired`] when
    /// its deadline has already passed (it is about to be timed out);
    /// [`Error::InvalidTaskId`]; Redis errors as for [`schedule`](Self::schedule).
    pub async fn keepalive(&self, task_id: &str) -> Result<()> {
        self.keep(task_id, None).await
    }

    /// [`keepalive`](Self::keepalive) for the hold under `lease` only (the lease the
    /// task got at start, see [`Backend::start_with_lease`](crate::Backend::start_with_lease)).
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when that lease no longer holds the task (it was stopped
    /// or timed out; the task id may even hold a slot again under a newer lease,
    /// which this call never touches); [`Error::Expired`] when its deadline has
    /// passed; otherwise as for [`keepalive`](Self::keepalive).
    pub async fn keepalive_with_lease(&self, task_id: &str, lease: u64) -> Result<()> {
        self.keep(task_id, Some(lease)).await
    }

    async fn keep(&self, task_id: &str, lease: Option<u64>) -> Result<()> {
        check_task_id(task_id)?;
        let inner = &self.inner;
        for _ in 0..3 {
            let (slot_id, hinted) = match self.locate(task_id).await {
                Err(Error::WrongTaskId(_)) => return Err(not_held(task_id, lease, None)),
                other => other?,
            };
            match scripts::keepalive(
                &inner.redis,
                &inner.keys,
                self.buckets(),
                task_id,
                &slot_id,
                lease,
            )
            .await?
            {
                Held::Ok(kept) => {
                    if !hinted {
                        self.remember(task_id, &slot_id);
                    }
                    self.saw_lease(kept.lease);
                    let Some(backend) = self.backend(&kept.backend) else {
                        tracing::warn!(
                            backend = kept.backend,
                            "keepalive of a task whose backend is not registered here"
                        );
                        return Ok(());
                    };
                    if let Err(e) = backend.call(Callback::Keepalive, task_id, kept.lease).await {
                        let mut errors = Vec::new();
                        if self
                            .tell_error(backend, &slot_id, task_id, &e, Callback::Keepalive, &mut errors)
                            .await
                        {
                            self.end(task_id, &slot_id, "error", Some(kept.lease), &mut errors)
                                .await?;
                        }
                    }
                    return Ok(());
                }
                Held::WrongTask => {
                    self.forget(task_id);
                    if !self.buckets_changed().await? {
                        return Err(not_held(task_id, lease, None));
                    }
                }
                Held::LeaseLost(current) => return Err(not_held(task_id, lease, Some(current))),
                Held::Moved(owner) => self.remember(task_id, &owner),
                Held::Expired => {
                    self.forget(task_id);
                    return Err(Error::Expired {
                        task_id: task_id.to_owned(),
                        slot_id,
                    });
                }
            }
        }
        Err(not_held(task_id, lease, None))
    }

    /// Ends the task's hold on `slot_id` (or on the slot a MOVED reply names), runs
    /// `stop_callback`, frees the slot. Returns the slot freed and the Redis time of
    /// the release, when it was freed.
    async fn end(
        &self,
        task_id: &str,
        slot_id: &str,
        reason: &str,
        lease: Option<u64>,
        errors: &mut Vec<TickError>,
    ) -> Result<Option<(String, u64)>> {
        let inner = &self.inner;
        let mut slot_id = slot_id.to_owned();
        for _ in 0..3 {
            let released = scripts::release(
                &inner.redis,
                &inner.keys,
                self.buckets(),
                task_id,
                &slot_id,
                reason,
                ReleaseMode::Stopping,
                lease,
            )
            .await?;
            match released {
                Held::Ok(r) => {
                    self.forget(task_id);
                    if self
                        .finish(&slot_id, task_id, &r.backend, r.lease, false, errors)
                        .await
                        != Finished::Free
                    {
                        return Ok(None);
                    }
                    let to_free = ToFree {
                        slot_id: slot_id.clone(),
                        lease: r.lease,
                        task_id: task_id.to_owned(),
                    };
                    let freed = scripts::free(&inner.redis, &inner.keys, self.buckets(), &[to_free]).await?;
                    return Ok(freed
                        .first()
                        .copied()
                        .unwrap_or(false)
                        .then_some((slot_id, r.now_ms)));
                }
                Held::Moved(owner) => {
                    self.remember(task_id, &owner);
                    slot_id = owner;
                }
                Held::LeaseLost(current) => return Err(not_held(task_id, lease, Some(current))),
                Held::WrongTask if self.buckets_changed().await? => {}
                Held::WrongTask | Held::Expired => break,
            }
        }
        self.forget(task_id);
        Err(not_held(task_id, lease, None))
    }

    /// Frees the task's slot: runs `stop_callback`, makes the slot idle, and at
    /// once polls that slot's backends to start the next task in it (when the slot
    /// is in this replica's config). Errors of that refill are logged, not returned.
    ///
    /// # Errors
    /// [`Error::WrongTaskId`] when the task holds no slot; [`Error::InvalidTaskId`];
    /// Redis errors as for [`schedule`](Self::schedule).
    pub async fn stop(&self, task_id: &str) -> Result<()> {
        self.stop_hold(task_id, None).await.map(drop)
    }

    /// [`stop`](Self::stop), with a report of what it did: the start of the refill
    /// in `started` (empty when the slot's backends had nothing, or the slot is not
    /// in this replica's config); in `errors`, a failing `stop_callback` (and its
    /// `backend_error_callback`) and whatever failed in the refill (a poll, a
    /// `start_callback`, or Redis, which `stop` only logs); in `idle`, 1 when the
    /// freed slot stayed idle. A stop whose callbacks leave the slot held reports
    /// nothing started and no idle slot.
    ///
    /// # Errors
    /// As for [`stop`](Self::stop).
    pub async fn stop_and_report(&self, task_id: &str) -> Result<ScheduleReport> {
        self.stop_hold(task_id, None).await
    }

    /// [`stop`](Self::stop) for the hold under `lease` only.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when that lease no longer holds the task (nothing is
    /// stopped or freed, even when the task id holds a slot under a newer lease);
    /// otherwise as for [`stop`](Self::stop).
    pub async fn stop_with_lease(&self, task_id: &str, lease: u64) -> Result<()> {
        self.stop_hold(task_id, Some(lease)).await.map(drop)
    }

    /// [`stop_with_lease`](Self::stop_with_lease), with the report of
    /// [`stop_and_report`](Self::stop_and_report).
    ///
    /// # Errors
    /// As for [`stop_with_lease`](Self::stop_with_lease).
    pub async fn stop_with_lease_and_report(&self, task_id: &str, lease: u64) -> Result<ScheduleReport> {
        self.stop_hold(task_id, Some(lease)).await
    }

    async fn stop_hold(&self, task_id: &str, lease: Option<u64>) -> Result<ScheduleReport> {
        check_task_id(task_id)?;
        let (slot_id, _) = match self.locate(task_id).await {
            Err(Error::WrongTaskId(_)) => return Err(not_held(task_id, lease, None)),
            other => other?,
        };
        let mut report = ScheduleReport::default();
        // The slot freed, which is not the hinted one when the task had moved.
        let freed = self
            .end(task_id, &slot_id, "stop", lease, &mut report.errors)
            .await?;
        if let Some((slot_id, now_ms)) = freed {
            let Some(&index) = self.inner.slot_index.get(&slot_id) else {
                return Ok(report);
            };
            let mut clock = Clock::new(now_ms);
            match self.fill_slot(index, 0, &mut clock, &mut report).await {
                Ok(true) => {}
                Ok(false) => report.idle = 1,
                Err(e) => {
                    let message = format!("refilling the slot after a stop failed: {e}");
                    record(&mut report.errors, Stage::Redis, &slot_id, None, None, message);
                    report.idle = 1;
                }
            }
        }
        Ok(report)
    }

    /// Every slot of this replica's config as Redis has it (one pipelined round
    /// trip), and each backend's own `inspect`.
    ///
    /// # Errors
    /// Redis errors as for [`schedule`](Self::schedule); [`Error::CorruptState`]
    /// when the lease counter is not a number. A corrupt slot is not an error: it
    /// shows as [`SlotStatus::Corrupt`].
    pub async fn inspect(&self) -> Result<Inspection> {
        let inner = &self.inner;
        let slots: Vec<(String, Option<Vec<String>>)> = inner
            .slots
            .iter()
            .map(|s| (s.config.slot_id.clone(), Some(s.config.backends.clone())))
            .collect();
        let mut inspection = read_state(&inner.redis, &inner.keys, &inner.name, slots).await?;
        self.saw_lease(inspection.last_lease);
        for backend in &inner.backends {
            inspection
                .backends
                .insert(backend.name().to_owned(), backend.inspect().await);
        }
        Ok(inspection)
    }

    /// Calls [`schedule`](Self::schedule) every `every` until `shutdown` completes.
    /// A tick in progress is finished first, so no slot is left half-released.
    /// A failing tick is logged (`tracing`) and the loop goes on: Redis coming back
    /// is picked up by the next tick.
    ///
    /// # Errors
    /// None today; the `Result` leaves room for fatal conditions later.
    pub async fn run(&self, every: Duration, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        loop {
            match self.schedule().await {
                Ok(report) => tracing::debug!(
                    started = report.started.len(),
                    timed_out = report.timed_out.len(),
                    errors = report.errors.len(),
                    "tick"
                ),
                Err(e) => tracing::error!("tick of scheduler {:?} failed: {e}", self.inner.name),
            }
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// Reads the state of a scheduler without its config or backends: every slot hash
/// in Redis (found by `SCAN`), for operators' tools (`task-semaphore inspect`).
///
/// # Errors
/// As for [`Scheduler::inspect`], plus [`Error::Config`] for an invalid name or prefix.
pub async fn inspect_redis(redis_url: &str, key_prefix: &str, name: &str) -> Result<Inspection> {
    config::validate_name("scheduler name", name)?;
    config::validate_name("key prefix", key_prefix)?;
    let timeout = Duration::from_secs(5);
    let redis = Redis::new(make_pool(redis_url, None, timeout)?, timeout);
    let keys = Keys::new(key_prefix, name);
    // The slot hashes are the registry: SCAN finds them (an operator's tool, so
    // a pass over the keyspace is fine; nothing on the scheduler's path does this).
    let mut ids: Vec<String> = Vec::new();
    let pattern = keys.slot_pattern();
    let mut cursor = 0u64;
    loop {
        let (next, found): (u64, Vec<String>) = redis
            .query(
                "listing slots",
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000),
            )
            .await?;
        ids.extend(found.iter().filter_map(|k| keys.slot_id_of(k)).map(str::to_owned));
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // Numbers in numeric order, then the rest by text; SCAN may return a key twice.
    ids.sort_by(|a, b| match (strict_u64(a), strict_u64(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.cmp(b),
    });
    ids.dedup();
    read_state(
        &redis,
        &keys,
        name,
        ids.into_iter().map(|id| (id, None)).collect(),
    )
    .await
}

/// One pipeline: Redis time, the lease counter, and every slot's hash.
async fn read_state(
    redis: &Redis,
    keys: &Keys,
    name: &str,
    slots: Vec<(String, Option<Vec<String>>)>,
) -> Result<Inspection> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    pipe.cmd("TIME")
        .get(&keys.lease)
        .cmd("HMGET")
        .arg(&keys.epoch)
        .arg("id")
        .arg("quarantine_until_ms");
    for (id, _) in &slots {
        pipe.hgetall(keys.slot(id));
    }
    let mut replies: Vec<redis::RedisResult<Value>> = redis.pipeline("reading slots", &pipe).await?;
    let mut replies = replies.drain(..);
    let now = match replies.next() {
        Some(Ok(v)) => redis::from_redis_value::<(u64, u64)>(v).ok(),
        _ => None,
    };
    let now = now.map(|(s, us)| from_ms(s * 1000 + us / 1000));
    let lease = match replies.next() {
        Some(Ok(v)) => redis::from_redis_value::<Option<String>>(v).ok().flatten(),
        _ => Some("not a string".to_owned()),
    };
    let last_lease = match lease {
        None => 0,
        Some(text) => strict_u64(&text).ok_or_else(|| Error::CorruptState {
            key: keys.lease.clone(),
            detail: format!("holds {text:?}, not a lease number"),
        })?,
    };
    let (epoch, quarantine) = match replies.next() {
        Some(Ok(v)) => redis::from_redis_value::<(Option<String>, Option<String>)>(v).unwrap_or_default(),
        _ => (None, None),
    };
    let quarantined_until = quarantine
        .as_deref()
        .and_then(strict_u64)
        .map(from_ms)
        .filter(|until| now.is_some_and(|now| now < *until));
    let mut states = Vec::with_capacity(slots.len());
    for ((id, backends), reply) in slots.into_iter().zip(replies) {
        let state = match reply.map(redis::from_redis_value::<HashMap<String, String>>) {
            Ok(Ok(fields)) => SlotState::from_fields(id, backends, fields),
            Ok(Err(e)) => SlotState::new(
                id,
                backends.unwrap_or_default(),
                SlotStatus::Corrupt(e.to_string()),
            ),
            Err(e) => SlotState::new(
                id,
                backends.unwrap_or_default(),
                SlotStatus::Corrupt(e.to_string()),
            ),
        };
        states.push(state);
    }
    Ok(Inspection {
        name: name.to_owned(),
        now: now.unwrap_or_else(std::time::SystemTime::now),
        last_lease,
        epoch,
        quarantined_until,
        slots: states,
        backends: BTreeMap::new(),
    })
}
