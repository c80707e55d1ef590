//! One scheduler replica, run as its own OS process (the test binary re-executed with
//! `CHAOS_ROLE=replica`). It ticks a `Scheduler` over a shared backlog and simulates
//! every task it starts as a tokio task that sends keepalives and stops (or hangs).
//! Every step goes to the shared history.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::json;
use task_semaphore::{Backend, BoxError, Callback, Error, Scheduler, SlotConfig};

use crate::history::History;

/// Every setting of a replica, passed by the parent as `CHAOS_*` environment variables.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub redis_url: String,
    pub backlog_url: String,
    pub backlog_key: String,
    pub name: String,
    pub slots: usize,
    pub timeout_ms: u64,
    pub tick_ms: u64,
    pub history: PathBuf,
    /// Test-only pause at the top of `start_callback`, after the claim: widens the
    /// window in which a `kill -9` leaves a claimed slot whose start never ran.
    pub start_delay_ms: u64,
    /// Test-only pause in `stop_callback` and `timeout_callback`: widens the window
    /// between a sweep and its free, where a `kill -9` leaves stopping slots that
    /// another replica must reclaim.
    pub callback_delay_ms: u64,
    pub seed: u64,
    pub spawn: u64,
    /// Whether the backend provides `poll_many` (the head of the backlog).
    pub poll_many: bool,
    /// The builder's `claim_chunk` and `sweep_chunk`; 0 leaves the library's default.
    pub claim_chunk: usize,
    pub sweep_chunk: usize,
}

impl ReplicaConfig {
    pub fn to_env(&self) -> Vec<(String, String)> {
        [
            ("CHAOS_ROLE", "replica".to_owned()),
            ("CHAOS_REDIS_URL", self.redis_url.clone()),
            ("CHAOS_BACKLOG_URL", self.backlog_url.clone()),
            ("CHAOS_BACKLOG_KEY", self.backlog_key.clone()),
            ("CHAOS_NAME", self.name.clone()),
            ("CHAOS_SLOTS", self.slots.to_string()),
            ("CHAOS_TIMEOUT_MS", self.timeout_ms.to_string()),
            ("CHAOS_TICK_MS", self.tick_ms.to_string()),
            ("CHAOS_HISTORY", self.history.display().to_string()),
            ("CHAOS_START_DELAY_MS", self.start_delay_ms.to_string()),
            ("CHAOS_CALLBACK_DELAY_MS", self.callback_delay_ms.to_string()),
            ("CHAOS_SEED", self.seed.to_string()),
            ("CHAOS_SPAWN", self.spawn.to_string()),
            ("CHAOS_POLL_MANY", u8::from(self.poll_many).to_string()),
            ("CHAOS_CLAIM_CHUNK", self.claim_chunk.to_string()),
            ("CHAOS_SWEEP_CHUNK", self.sweep_chunk.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("replica: {k} is not set"));
        let num = |k: &str| -> u64 {
            var(k)
                .parse()
                .unwrap_or_else(|_| panic!("replica: {k} is not a number"))
        };
        ReplicaConfig {
            redis_url: var("CHAOS_REDIS_URL"),
            backlog_url: var("CHAOS_BACKLOG_URL"),
            backlog_key: var("CHAOS_BACKLOG_KEY"),
            name: var("CHAOS_NAME"),
            slots: num("CHAOS_SLOTS") as usize,
            timeout_ms: num("CHAOS_TIMEOUT_MS"),
            tick_ms: num("CHAOS_TICK_MS"),
            history: PathBuf::from(var("CHAOS_HISTORY")),
            start_delay_ms: num("CHAOS_START_DELAY_MS"),
            callback_delay_ms: num("CHAOS_CALLBACK_DELAY_MS"),
            seed: num("CHAOS_SEED"),
            spawn: num("CHAOS_SPAWN"),
            poll_many: num("CHAOS_POLL_MANY") == 1,
            claim_chunk: num("CHAOS_CLAIM_CHUNK") as usize,
            sweep_chunk: num("CHAOS_SWEEP_CHUNK") as usize,
        }
    }
}

/// splitmix64: small, seedable, good enough to pick delays.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

// ------------------------------------------------------------------ lease-checked calls
//
// The only place that calls keepalive/stop: with the lease the task got at start
// (`start_with_lease`), so an old lease is refused with `Error::LeaseLost`.

/// Sends a keepalive for `task_id` under `lease`.
async fn keepalive(s: &Scheduler, task_id: &str, lease: Option<u64>) -> Result<(), Error> {
    match lease {
        Some(lease) => s.keepalive_with_lease(task_id, lease).await,
        None => s.keepalive(task_id).await,
    }
}

/// Stops `task_id` under `lease`.
async fn stop(s: &Scheduler, task_id: &str, lease: Option<u64>) -> Result<(), Error> {
    match lease {
        Some(lease) => s.stop_with_lease(task_id, lease).await,
        None => s.stop(task_id).await,
    }
}

/// How a keepalive or stop ended, as the history and the checker name it. `ok`;
/// a refusal saying the task lost its hold (`wrong_task`, `expired`, `lease_lost`);
/// anything else is `error` (Redis down, paused, corrupt slot): the task may retry.
fn outcome(result: &Result<(), Error>) -> (&'static str, Option<String>) {
    match result {
        Ok(()) => ("ok", None),
        Err(Error::WrongTaskId(_)) => ("wrong_task", None),
        Err(Error::Expired { .. }) => ("expired", None),
        Err(Error::LeaseLost { .. }) => ("lease_lost", None),
        Err(e) => ("error", Some(e.to_string())),
    }
}

fn refused(what: &str) -> bool {
    matches!(what, "wrong_task" | "expired" | "lease_lost")
}

// ------------------------------------------------------------------------ the backend

/// A Redis connection made on first use and dropped after an error, so that the
/// next call reconnects (Redis restarted); every request is bounded.
struct Conn {
    url: String,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    limit: Duration,
}

impl Conn {
    fn new(url: &str, limit: Duration) -> Self {
        Conn {
            url: url.to_owned(),
            conn: tokio::sync::Mutex::new(None),
            limit,
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BoxError> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            let client = redis::Client::open(self.url.as_str())?;
            let conn = tokio::time::timeout(self.limit, client.get_multiplexed_async_connection())
                .await
                .map_err(|_| "connect timed out")??;
            *guard = Some(conn);
        }
        let mut conn = guard.clone().ok_or("no connection")?;
        drop(guard);
        match tokio::time::timeout(self.limit, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                *self.conn.lock().await = None;
                Err(e.into())
            }
            Err(_) => {
                *self.conn.lock().await = None;
                Err("request timed out".into())
            }
        }
    }
}

/// The backlog: a Redis ZSET of task ids (score = order). `poll` reads one of the
/// first few (no side effect); `start_callback` removes it (marks it taken) and
/// launches the simulated task.
#[derive(Clone)]
struct Chaos {
    history: Arc<History>,
    backlog: Arc<Conn>,
    key: String,
    /// The scheduler's own Redis, read (never written) to learn a start's lease.
    state: Arc<Conn>,
    name: String,
    scheduler: Arc<OnceLock<Scheduler>>,
    drain: Arc<AtomicBool>,
    rng: Arc<Mutex<Rng>>,
    start_delay: Duration,
    callback_delay: Duration,
    keepalive_every: Duration,
    /// Whether `poll_many` is provided.
    batch: bool,
}

impl Chaos {
    async fn backlog<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BoxError> {
        self.backlog.query(cmd).await
    }

    /// The slot and lease of the hold `task_id` is being started under. Until the
    /// lease-aware start hook lands, read from the keys the README documents (the
    /// slot is ours until `start_callback` returns, so the read is not racy); `None`
    /// if Redis does not answer.
    async fn hold_of(&self, task_id: &str) -> Option<(String, u64)> {
        let tasks = self.scheduler.get()?.task_index_key(task_id);
        let slot: Option<String> = self
            .state
            .query(redis::cmd("HGET").arg(tasks).arg(task_id))
            .await
            .ok()?;
        let slot = slot?;
        let key = format!("task_semaphore:{{{}}}:slot:{slot}", self.name);
        let fields: Vec<Option<String>> = self
            .state
            .query(redis::cmd("HMGET").arg(key).arg("task").arg("lease"))
            .await
            .ok()?;
        match fields.as_slice() {
            [Some(t), Some(lease)] if t == task_id => Some((slot, lease.parse().ok()?)),
            _ => None,
        }
    }

    /// Now and then a slow poll: its answer may be stale by the claim (the task
    /// started and even finished meanwhile), which the claim must refuse. Returns
    /// false when a drain came during the stall: the poll must then answer nothing,
    /// since the parent's drain waits well under the longest stall for the slots to
    /// stay idle.
    async fn maybe_stall(&self, tasks: &[String]) -> bool {
        let stall = {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            (rng.range(0, 99) < 25).then(|| rng.range(300, 1500))
        };
        if let Some(ms) = stall {
            self.history.log(
                "poll_stall",
                json!({ "task": tasks.first(), "tasks": tasks.len(), "ms": ms }),
            );
            tokio::time::sleep(Duration::from_millis(ms)).await;
            return !self.drain.load(Ordering::Relaxed);
        }
        true
    }

    fn plan(&self) -> Plan {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let roll = rng.range(0, 99);
        if roll < 12 {
            Plan::Finish {
                run_ms: rng.range(5, 80),
            }
        } else if roll < 80 {
            Plan::Finish {
                run_ms: rng.range(30, 1200),
            }
        } else if roll < 92 {
            Plan::Hang {
                for_ms: rng.range(0, 1000),
            }
        } else {
            Plan::Silent
        }
    }
}

impl Backend for Chaos {
    fn name(&self) -> &str {
        "Chaos"
    }

    async fn poll(&self) -> Result<Option<String>, BoxError> {
        if self.drain.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let first: Vec<String> = self
            .backlog(redis::cmd("ZRANGE").arg(&self.key).arg(0).arg(7))
            .await?;
        if first.is_empty() {
            return Ok(None);
        }
        let pick = {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            // Often the head of the backlog, so that replicas race for one task.
            if rng.range(0, 1) == 0 {
                0
            } else {
                rng.range(0, first.len() as u64 - 1) as usize
            }
        };
        let Some(task) = first.get(pick).cloned() else {
            return Ok(None);
        };
        if !self.maybe_stall(std::slice::from_ref(&task)).await {
            return Ok(None);
        }
        Ok(Some(task))
    }

    async fn poll_many(&self, n: usize) -> Result<Option<Vec<String>>, BoxError> {
        if !self.batch {
            return Ok(None);
        }
        if self.drain.load(Ordering::Relaxed) || n == 0 {
            return Ok(Some(Vec::new()));
        }
        // The head of the backlog, from a small random offset: replicas race for the
        // same tasks, in batches.
        let skip = {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            rng.range(0, 3)
        };
        let tasks: Vec<String> = self
            .backlog(
                redis::cmd("ZRANGE")
                    .arg(&self.key)
                    .arg(skip)
                    .arg(skip + n as u64 - 1),
            )
            .await?;
        if !self.maybe_stall(&tasks).await {
            return Ok(Some(Vec::new()));
        }
        Ok(Some(tasks))
    }

    async fn start_callback(&self, task_id: &str) -> Result<(), BoxError> {
        // The scheduler calls start_with_lease; this is only the required fallback.
        self.start(task_id, None).await
    }

    async fn start_with_lease(&self, task_id: &str, lease: u64) -> Result<(), BoxError> {
        self.start(task_id, Some(lease)).await
    }

    async fn stop_with_lease(&self, task_id: &str, lease: u64) -> Result<(), BoxError> {
        tokio::time::sleep(self.callback_delay).await;
        self.history
            .log("stop_callback", json!({ "task": task_id, "lease": lease }));
        Ok(())
    }

    async fn timeout_with_lease(&self, task_id: &str, lease: u64) -> Result<(), BoxError> {
        tokio::time::sleep(self.callback_delay).await;
        self.history
            .log("timeout_callback", json!({ "task": task_id, "lease": lease }));
        Ok(())
    }

    async fn stop_callback(&self, task_id: &str) -> Result<(), BoxError> {
        self.history.log("stop_callback", json!({ "task": task_id }));
        Ok(())
    }

    async fn timeout_callback(&self, task_id: &str) -> Result<(), BoxError> {
        self.history.log("timeout_callback", json!({ "task": task_id }));
        Ok(())
    }

    async fn backend_error_callback(
        &self,
        task_id: &str,
        error: &BoxError,
        callback: Callback,
    ) -> Result<bool, BoxError> {
        self.history.log(
            "backend_error",
            json!({ "task": task_id, "callback": callback.to_string(), "msg": error.to_string() }),
        );
        Ok(true)
    }
}

impl Chaos {
    /// Takes the task off the backlog and launches it under `lease` (the slot is
    /// read from the index, for the history).
    async fn start(&self, task_id: &str, given: Option<u64>) -> Result<(), BoxError> {
        if !self.start_delay.is_zero() {
            self.history.log("start_pending", json!({ "task": task_id }));
            tokio::time::sleep(self.start_delay).await;
        }
        let removed: Result<u64, BoxError> =
            self.backlog(redis::cmd("ZREM").arg(&self.key).arg(task_id)).await;
        match removed {
            Ok(n) => {
                let hold = self.hold_of(task_id).await;
                let slot = hold.as_ref().map(|h| h.0.clone());
                let lease = given.or(hold.map(|h| h.1));
                self.history.log(
                    "start_callback",
                    json!({ "task": task_id, "taken": n == 1, "lease": lease, "slot": slot }),
                );
                if let Some(s) = self.scheduler.get() {
                    tokio::spawn(run_task(
                        s.clone(),
                        self.history.clone(),
                        task_id.to_owned(),
                        lease,
                        self.plan(),
                        self.keepalive_every,
                    ));
                }
                Ok(())
            }
            Err(e) => {
                self.history
                    .log("start_failed", json!({ "task": task_id, "msg": e.to_string() }));
                Err(e)
            }
        }
    }
}

// ------------------------------------------------------------------- simulated tasks

/// What a started task does.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Works `run_ms` with keepalives, then stops.
    Finish { run_ms: u64 },
    /// Sends keepalives for `for_ms`, then hangs: never stops, so it times out.
    Hang { for_ms: u64 },
    /// Never sends anything: times out.
    Silent,
}

async fn send_keepalive(s: &Scheduler, h: &History, task: &str, lease: Option<u64>) -> &'static str {
    h.log("keepalive_sent", json!({ "task": task, "lease": lease }));
    let result = keepalive(s, task, lease).await;
    let (what, msg) = outcome(&result);
    h.log(
        "keepalive_result",
        json!({ "task": task, "lease": lease, "result": what, "msg": msg }),
    );
    what
}

/// Stops the task, retrying errors that may be transient (Redis down or paused).
async fn send_stop(s: &Scheduler, h: &History, task: &str, lease: Option<u64>) {
    for _ in 0..4 {
        h.log("stop_sent", json!({ "task": task, "lease": lease }));
        let result = stop(s, task, lease).await;
        let (what, msg) = outcome(&result);
        h.log(
            "stop_result",
            json!({ "task": task, "lease": lease, "result": what, "msg": msg }),
        );
        if what != "error" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn run_task(
    s: Scheduler,
    h: Arc<History>,
    task: String,
    lease: Option<u64>,
    plan: Plan,
    every: Duration,
) {
    let keepalive_for = match plan {
        Plan::Finish { run_ms } | Plan::Hang { for_ms: run_ms } => Duration::from_millis(run_ms),
        Plan::Silent => return,
    };
    let began = tokio::time::Instant::now();
    loop {
        let left = keepalive_for.saturating_sub(began.elapsed());
        if left.is_zero() {
            break;
        }
        let nap = left.min(every);
        let napped = tokio::time::Instant::now();
        tokio::time::sleep(nap).await;
        // A task that slept far longer than it meant to (its process was frozen)
        // checks that it still holds its slot before it goes on, even if its work
        // is done: the fencing pattern.
        let overslept = napped.elapsed() > nap + every;
        if began.elapsed() >= keepalive_for && !overslept {
            break;
        }
        if refused(send_keepalive(&s, &h, &task, lease).await) {
            // The task learns it lost its hold; a zombie stops itself (and tries to
            // release with its old lease on the way out, which must be refused too).
            send_stop(&s, &h, &task, lease).await;
            return;
        }
    }
    if let Plan::Finish { .. } = plan {
        send_stop(&s, &h, &task, lease).await;
    }
}

// ------------------------------------------------------------------------ the process

/// The replica process: never returns (exits when its stdin closes).
pub fn main() {
    let config = ReplicaConfig::from_env();
    let history = Arc::new(History::open(&config.history));
    history.log(
        "replica_boot",
        json!({ "spawn": config.spawn, "seed": config.seed }),
    );
    let drain = Arc::new(AtomicBool::new(false));
    {
        // The parent talks through stdin: "drain" stops new starts; EOF (the parent
        // closed it, or died) ends the process.
        let drain = drain.clone();
        let history = history.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                match line.as_deref() {
                    Ok("drain") => {
                        drain.store(true, Ordering::Relaxed);
                        history.log("replica_drain", json!({}));
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            std::process::exit(0);
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("replica runtime: {e}"));
    runtime.block_on(replica(config, history, drain));
    std::process::exit(0);
}

async fn replica(config: ReplicaConfig, history: Arc<History>, drain: Arc<AtomicBool>) {
    let rng = Arc::new(Mutex::new(Rng::new(config.seed)));
    let limit = Duration::from_millis(1000);
    let backend = Chaos {
        history: history.clone(),
        backlog: Arc::new(Conn::new(&config.backlog_url, limit)),
        key: config.backlog_key.clone(),
        state: Arc::new(Conn::new(&config.redis_url, limit)),
        name: config.name.clone(),
        scheduler: Arc::default(),
        drain: drain.clone(),
        rng: rng.clone(),
        start_delay: Duration::from_millis(config.start_delay_ms),
        callback_delay: Duration::from_millis(config.callback_delay_ms),
        keepalive_every: Duration::from_millis((config.timeout_ms / 4).max(50)),
        batch: config.poll_many,
    };
    let timeout = Duration::from_millis(config.timeout_ms);
    let scheduler = loop {
        let mut b = Scheduler::builder(config.name.as_str())
            .redis_url(config.redis_url.as_str())
            .redis_timeout(Duration::from_millis(1000))
            .backend(backend.clone());
        if config.claim_chunk > 0 {
            b = b.claim_chunk(config.claim_chunk);
        }
        if config.sweep_chunk > 0 {
            b = b.sweep_chunk(config.sweep_chunk);
        }
        for i in 1..=config.slots {
            b = b.slot(SlotConfig::new(i.to_string(), ["Chaos"]).timeout(timeout));
        }
        match b.build().await {
            Ok(s) => break s,
            Err(e) => {
                history.log("build_failed", json!({ "msg": e.to_string() }));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let _ = backend.scheduler.set(scheduler.clone());
    history.log("replica_up", json!({ "spawn": config.spawn }));
    // The quarantine this replica last reported, to log only its changes.
    let mut quarantine: Option<u64> = None;
    loop {
        history.log("tick", json!({}));
        match scheduler.schedule().await {
            Ok(report) => {
                // Lost state: the tick that detected it, and the quarantine (Redis
                // time, ms) whenever it changes (another replica's detection extends it).
                let until_ms = report.quarantined_until.map(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64)
                });
                if report.state_lost {
                    history.log("state_lost", json!({ "until_ms": until_ms }));
                } else if until_ms != quarantine {
                    history.log("quarantine", json!({ "until_ms": until_ms }));
                }
                quarantine = until_ms;
                for t in &report.started {
                    history.log(
                        "start",
                        json!({ "task": t.task_id, "lease": t.lease, "slot": t.slot_id }),
                    );
                }
                for t in &report.timed_out {
                    history.log(
                        "timed_out",
                        json!({ "task": t.task_id, "lease": t.lease, "slot": t.slot_id }),
                    );
                }
                for t in &report.reclaimed {
                    history.log(
                        "reclaimed",
                        json!({ "task": t.task_id, "lease": t.lease, "slot": t.slot_id }),
                    );
                }
                for e in &report.errors {
                    history.log(
                        "tick_error",
                        json!({ "stage": format!("{:?}", e.stage), "slot": e.slot_id,
                                "task": e.task_id, "msg": e.message }),
                    );
                }
            }
            Err(e) => history.log("tick_failed", json!({ "msg": e.to_string() })),
        }
        let pause = {
            let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
            rng.range(config.tick_ms / 2, config.tick_ms * 3 / 2)
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}
