//! The parent side of a chaos run: a private redis-server it may kill, replica
//! processes it may kill or freeze, the fault schedule, inspections, the drain, and
//! the check of the merged history.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use task_semaphore::{Backend, BoxError, Scheduler, SlotConfig, SlotStatus};

use crate::checker::{self, Params, Report};
use crate::common;
use crate::history::{self, History, Tail};
use crate::replica::{ReplicaConfig, Rng};

// ------------------------------------------------------------------- the scenarios

/// What is done to the system while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of a replica every few seconds; a fresh one replaces it.
    KillReplica,
    /// `kill -9` of a replica between a claim and its `start_callback`.
    KillInStartWindow,
    /// `SIGSTOP` a replica for longer than the slot timeout, then `SIGCONT`.
    Freeze,
    /// `kill -9` of redis-server (`appendonly yes`, `appendfsync always`), restart.
    RedisRestartAof,
    /// `kill -9` of redis-server without persistence, restart empty (data loss).
    RedisRestartEmpty,
    /// `FLUSHALL` (data loss).
    FlushAll,
    /// `SCRIPT FLUSH` every few hundred ms.
    ScriptFlush,
    /// `CLIENT PAUSE 2000 WRITE` every few seconds.
    ClientPause,
    /// Replicas under `faketime -f '+1h'` (not Redis).
    Faketime,
    /// Hand edits of one slot each: wrong type, missing field, garbage number.
    Corrupt,
}

impl Fault {
    fn private_redis(self) -> Option<Vec<String>> {
        match self {
            Fault::RedisRestartAof => Some(vec![
                "--appendonly".into(),
                "yes".into(),
                "--appendfsync".into(),
                "always".into(),
            ]),
            Fault::RedisRestartEmpty | Fault::FlushAll | Fault::ScriptFlush | Fault::ClientPause => {
                Some(vec![])
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub fault: Fault,
    pub replicas: usize,
    pub slots: usize,
    pub timeout_ms: u64,
    pub tick_ms: u64,
    pub start_delay_ms: u64,
    /// A pause in the replicas' stop and timeout callbacks (see `ReplicaConfig`).
    pub callback_delay_ms: u64,
    /// Whether the backend provides `poll_many` (batched claims).
    pub poll_many: bool,
    /// The replicas' `claim_chunk` and `sweep_chunk`; 0 leaves the library's default.
    pub claim_chunk: usize,
    pub sweep_chunk: usize,
}

impl Scenario {
    pub fn new(name: &'static str, fault: Fault) -> Self {
        Scenario {
            name,
            fault,
            replicas: 3,
            slots: 6,
            timeout_ms: 1500,
            tick_ms: 30,
            start_delay_ms: if fault == Fault::KillInStartWindow { 150 } else { 0 },
            callback_delay_ms: 0,
            poll_many: false,
            claim_chunk: 0,
            sweep_chunk: 0,
        }
    }
}

/// Totals over the runs of one scenario: a row of the `make chaos` table.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub runs: usize,
    pub replicas: usize,
    pub started: usize,
    pub faults: usize,
    pub violations: usize,
    pub timeouts: usize,
    pub stale_refused: usize,
    pub orphan_ends: usize,
    pub reclaims: usize,
    pub seconds: f64,
}

/// How long the suite runs: `make test` runs each scenario once, briefly (7 s);
/// `CHAOS_SECONDS` (`make chaos`) gives the whole suite about that many seconds,
/// shared by its scenarios, each repeating runs of `CHAOS_RUN_SECONDS` (default 12)
/// while its share lasts.
pub struct Budget {
    pub run_secs: f64,
    pub scenario_secs: f64,
    pub long: bool,
}

/// Scenarios `make chaos` runs (the ignored ones excluded).
pub const ACTIVE_SCENARIOS: f64 = 11.0;

pub fn budget() -> Budget {
    let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok());
    match num("CHAOS_SECONDS") {
        Some(total) => Budget {
            run_secs: num("CHAOS_RUN_SECONDS").unwrap_or(12.0),
            scenario_secs: total / ACTIVE_SCENARIOS,
            long: true,
        },
        None => Budget {
            run_secs: num("CHAOS_RUN_SECONDS").unwrap_or(7.0),
            scenario_secs: 0.0,
            long: false,
        },
    }
}

/// At most two scenarios at a time (each runs several processes; this machine has
/// two cores), whatever the test harness's thread count.
struct Gate {
    busy: Mutex<usize>,
    cv: Condvar,
}

static GATE: Gate = Gate {
    busy: Mutex::new(0),
    cv: Condvar::new(),
};

struct GateTicket;

impl GateTicket {
    fn take(max: usize) -> Self {
        let mut busy = GATE.busy.lock().unwrap_or_else(|p| p.into_inner());
        while *busy >= max {
            busy = GATE.cv.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        *busy += 1;
        GateTicket
    }
}

impl Drop for GateTicket {
    fn drop(&mut self) {
        let mut busy = GATE.busy.lock().unwrap_or_else(|p| p.into_inner());
        *busy -= 1;
        GATE.cv.notify_all();
    }
}

/// Runs a scenario (once, or for its share of `CHAOS_SECONDS`), prints its row and
/// the violations, and fails the test on any violation.
pub async fn run_scenario(sc: Scenario) {
    if !common::has_redis_server()
        && (sc.fault.private_redis().is_some() || std::env::var("REDIS_URL").is_err())
    {
        println!("chaos {}: SKIPPED, no redis-server on PATH", sc.name);
        return;
    }
    if sc.fault == Fault::Faketime && !has_faketime() {
        println!(
            "chaos {}: SKIPPED, faketime is not installed (apt-get install faketime; `make test` installs it)",
            sc.name
        );
        return;
    }
    let budget = budget();
    let _ticket = GateTicket::take(if budget.long { 1 } else { 2 });
    let began = Instant::now();
    let mut totals = Totals::default();
    let mut failures = Vec::new();
    loop {
        let run_began = Instant::now();
        let (report, dir) = run_once(&sc, budget.run_secs, totals.runs as u64).await;
        let last_run = run_began.elapsed().as_secs_f64();
        totals.runs += 1;
        let s = &report.stats;
        totals.replicas += s.replicas;
        totals.started += s.holds;
        totals.faults += s.faults;
        totals.violations += report.violations.len();
        totals.timeouts += s.timeouts;
        totals.stale_refused += s.stale_refused;
        totals.orphan_ends += s.orphan_ends;
        totals.reclaims += s.reclaims;
        println!(
            "chaos {} run {}: {} replicas, {} starts, {} stops, {} timeouts, {} reclaims, {} claims never started, \
             {} stale calls refused, {} faults, {} lost holds ({} learned it), {} inspections, max live {}/{}, \
             {} lines -> {} violation(s)",
            sc.name,
            totals.runs,
            s.replicas,
            s.holds,
            s.stops,
            s.timeouts,
            s.reclaims,
            s.orphan_ends,
            s.stale_refused,
            s.faults,
            s.lost_holds,
            s.lost_learned,
            s.inspections,
            s.max_live,
            sc.slots,
            s.lines,
            report.violations.len()
        );
        if report.violations.is_empty() {
            if std::env::var_os("CHAOS_KEEP").is_none() {
                let _ = std::fs::remove_dir_all(&dir);
            }
        } else {
            println!("{}", report.render(25));
            println!("history kept in {}", dir.display());
            failures.push(dir);
        }
        // Another run if it ends within the share (give or take a tenth).
        if !budget.long || began.elapsed().as_secs_f64() + last_run > budget.scenario_secs * 1.1 {
            break;
        }
    }
    totals.seconds = began.elapsed().as_secs_f64();
    if let Ok(path) = std::env::var("CHAOS_TABLE") {
        // One tab-separated row per scenario; `make chaos` prints them as a table.
        let row = format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{:.0}\n",
            sc.name,
            totals.runs,
            totals.replicas,
            totals.started,
            totals.faults,
            totals.violations,
            totals.timeouts,
            totals.stale_refused,
            totals.orphan_ends,
            totals.reclaims,
            totals.seconds
        );
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(row.as_bytes());
        }
    }
    assert!(
        failures.is_empty(),
        "chaos {}: {} invariant violation(s); histories in {failures:?}",
        sc.name,
        totals.violations
    );
}

pub fn has_faketime() -> bool {
    Command::new("faketime")
        .args(["-f", "+1h", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

// ------------------------------------------------------------------- processes

/// Kills `pid` (SIGKILL) if this test process dies first. Exits once `pid` is gone.
fn watchdog(pid: u32) -> Option<Child> {
    let me = std::process::id();
    let script = format!(
        "while kill -0 {me} 2>/dev/null && kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
         kill -0 {me} 2>/dev/null || kill -9 {pid} 2>/dev/null"
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .process_group(0) // its own group, so that ending it ends its `sleep` too
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Ends a watchdog and its `sleep` (its whole process group).
fn end_watchdog(watchdog: &mut Option<Child>) {
    if let Some(w) = watchdog.as_ref() {
        signal_group(w.id(), "KILL");
    }
    reap(watchdog);
}

fn signal_group(pgid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn reap(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A redis-server of this run's own, which the run may kill and restart (same port,
/// same directory, so an append-only file survives).
pub struct ChaosRedis {
    pub port: u16,
    args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
    watchdog: Option<Child>,
}

impl ChaosRedis {
    pub fn start(args: Vec<String>, dir: &Path) -> Self {
        let mut r = ChaosRedis {
            port: common::free_port(),
            args,
            dir: dir.to_owned(),
            child: None,
            watchdog: None,
        };
        r.spawn();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.watchdog = watchdog(child.id());
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("redis url");
        let began = Instant::now();
        loop {
            if let Ok(mut c) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(
                began.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        reap(&mut self.child);
        end_watchdog(&mut self.watchdog);
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for ChaosRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One replica process.
struct ReplicaProc {
    spawn: u64,
    /// The direct child: the test binary, or the faketime wrapper around it.
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// The replica's own pid (from its `replica_boot` line).
    pid: Option<u32>,
    watchdog: Option<Child>,
    frozen: bool,
}

impl ReplicaProc {
    /// `kill -9` (if still running), then reaps it.
    fn kill(&mut self) {
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if let (true, Some(pid)) = (running, self.pid) {
            signal(pid, "KILL");
        }
        self.stdin = None;
        reap(&mut self.child);
        end_watchdog(&mut self.watchdog);
        self.frozen = false;
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for ReplicaProc {
    fn drop(&mut self) {
        self.kill();
    }
}

// ------------------------------------------------------------------------- a run

/// A backend that never offers a task: lets the parent build a `Scheduler` of the
/// same config for `inspect()`.
struct Nothing;

impl Backend for Nothing {
    fn name(&self) -> &str {
        "Chaos"
    }
    async fn poll(&self) -> Result<Option<String>, BoxError> {
        Ok(None)
    }
    async fn start_callback(&self, _task_id: &str) -> Result<(), BoxError> {
        Err("the parent never starts tasks".into())
    }
}

struct Run<'a> {
    sc: &'a Scenario,
    dir: PathBuf,
    history: History,
    tail: Tail,
    config: ReplicaConfig,
    replicas: Vec<ReplicaProc>,
    next_spawn: u64,
    redis: Option<ChaosRedis>,
    inspector: Option<Scheduler>,
    rng: Rng,
    began: Instant,
    inspections: u64,
    /// spawn -> pid, from replica_boot lines.
    booted: HashMap<u64, u32>,
    /// Claims waiting in start_callback's test delay: (pid, task).
    pending: BTreeSet<(u32, String)>,
    /// start_callback lines per pid since the last freeze.
    starts_by_pid: HashMap<u32, usize>,
    corrupted: BTreeSet<String>,
    faults: usize,
    // fault schedule
    next_fault: f64,
    undo_at: Option<Instant>,
    respawn_at: Option<Instant>,
    corrupt_kinds: Vec<&'static str>,
    run_no: u64,
    /// The backlog's size when filled, and the tasks started (or being started) so
    /// far: what a re-seed puts back if a fault wiped the backlog.
    backlog_len: usize,
    taken: BTreeSet<String>,
}

fn unique_dir(name: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos");
    let dir = base.join(common::unique_name(name));
    std::fs::create_dir_all(&dir).expect("create run dir");
    dir
}

async fn run_once(sc: &Scenario, seconds: f64, run_no: u64) -> (Report, PathBuf) {
    let dir = unique_dir(sc.name);
    let name = common::unique_name(&format!("chaos-{}", sc.name));
    let redis = sc.fault.private_redis().map(|args| ChaosRedis::start(args, &dir));
    let redis_url = redis.as_ref().map_or_else(common::redis_url, ChaosRedis::url);
    let backlog_url = common::redis_url();
    let backlog_key = format!("chaos-backlog:{name}");
    let history_path = dir.join("history.jsonl");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ run_no;
    // About ten tasks a second per slot (at least 60 a second), more than the
    // replicas can start.
    let backlog_len = (seconds * 10.0 * sc.slots.max(6) as f64) as usize + 300;
    fill_backlog(&backlog_url, &backlog_key, 0..backlog_len, &BTreeSet::new()).await;
    let config = ReplicaConfig {
        redis_url: redis_url.clone(),
        backlog_url: backlog_url.clone(),
        backlog_key: backlog_key.clone(),
        name: name.clone(),
        slots: sc.slots,
        timeout_ms: sc.timeout_ms,
        tick_ms: sc.tick_ms,
        history: history_path.clone(),
        start_delay_ms: sc.start_delay_ms,
        callback_delay_ms: sc.callback_delay_ms,
        seed,
        spawn: 0,
        poll_many: sc.poll_many,
        claim_chunk: sc.claim_chunk,
        sweep_chunk: sc.sweep_chunk,
    };
    let history = History::open(&history_path);
    history.log(
        "run_begin",
        json!({ "scenario": sc.name, "name": name, "slots": sc.slots, "timeout_ms": sc.timeout_ms,
                "replicas": sc.replicas, "seconds": seconds, "seed": seed, "redis": redis_url }),
    );
    let mut run = Run {
        sc,
        dir: dir.clone(),
        tail: Tail::new(&history_path),
        history,
        config,
        replicas: Vec::new(),
        next_spawn: 0,
        redis,
        inspector: None,
        rng: Rng::new(seed),
        began: Instant::now(),
        inspections: 0,
        booted: HashMap::new(),
        pending: BTreeSet::new(),
        starts_by_pid: HashMap::new(),
        corrupted: BTreeSet::new(),
        faults: 0,
        next_fault: first_fault_at(sc.fault),
        undo_at: None,
        respawn_at: None,
        corrupt_kinds: vec!["garbage_number", "missing_field", "wrong_type"],
        run_no,
        backlog_len,
        taken: BTreeSet::new(),
    };
    run.inspector = Some(run.build_inspector().await);
    for _ in 0..sc.replicas {
        run.spawn_replica();
    }
    run.main_loop(seconds).await;
    run.drain().await;
    run.stop_replicas();
    drop(run.redis.take());
    let _ = del(&backlog_url, &backlog_key).await;
    (check_file(&history_path), dir)
}

/// Checks a history file, with the slot count and timeout of its `run_begin` line.
pub fn check_file(path: &Path) -> Report {
    let (lines, torn) = history::read(path);
    let begin = lines.iter().find(|l| l.ev() == "run_begin");
    let params = Params {
        slots: begin.and_then(|l| l.u64("slots")).unwrap_or(0) as usize,
        timeout_ms: begin.and_then(|l| l.u64("timeout_ms")).unwrap_or(0),
        margin_ms: 2500,
    };
    checker::check(&params, &lines, &torn)
}

fn first_fault_at(fault: Fault) -> f64 {
    match fault {
        Fault::ScriptFlush => 1.0,
        Fault::Freeze => 1.5,
        Fault::Corrupt => 1.5,
        _ => 2.0,
    }
}

/// Task ids, some of them odd (spaces, colons, braces, unicode).
fn task_id(i: usize) -> String {
    if i % 10 == 7 {
        format!("odd {{task}}:{i} ✓")
    } else {
        format!("t{i}")
    }
}

/// Adds tasks `ids` to the backlog, but those in `skip`. Returns how many it added.
async fn fill_backlog(url: &str, key: &str, ids: std::ops::Range<usize>, skip: &BTreeSet<String>) -> usize {
    let mut conn = common::raw(url).await;
    let ids: Vec<usize> = ids.filter(|&i| !skip.contains(&task_id(i))).collect();
    for chunk in ids.chunks(500) {
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(key);
        for &i in chunk {
            cmd.arg(i).arg(task_id(i));
        }
        let _: () = cmd.query_async(&mut conn).await.expect("fill the backlog");
    }
    ids.len()
}

/// What Redis held at the moment it lost the state: its time (ms) and the lease
/// counter. For `FLUSHALL` both are read in the transaction that flushes; before a
/// `kill -9`, writes are paused first (`CLIENT PAUSE WRITE` holds every script) so
/// that no claim lands between the read and the kill.
async fn snapshot_at_loss(url: &str, lease_key: &str, flush: bool) -> (Option<u64>, Option<u64>) {
    let Ok(client) = redis::Client::open(url) else {
        return (None, None);
    };
    let Ok(Ok(mut c)) =
        tokio::time::timeout(Duration::from_secs(2), client.get_multiplexed_async_connection()).await
    else {
        return (None, None);
    };
    let mut pipe = redis::pipe();
    if flush {
        pipe.atomic();
    } else {
        let _: redis::RedisResult<()> = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(10_000)
            .arg("WRITE")
            .query_async(&mut c)
            .await;
    }
    pipe.cmd("TIME").cmd("GET").arg(lease_key);
    if flush {
        pipe.cmd("FLUSHALL").ignore();
    }
    let got: redis::RedisResult<((u64, u64), Option<u64>)> = pipe.query_async(&mut c).await;
    match got {
        Ok(((secs, micros), lease)) => (Some(secs * 1000 + micros / 1000), lease),
        Err(_) => (None, None),
    }
}

async fn del(url: &str, key: &str) -> redis::RedisResult<()> {
    let mut conn = common::raw(url).await;
    redis::cmd("DEL").arg(key).query_async(&mut conn).await
}

fn status_name(s: &SlotStatus) -> &'static str {
    match s {
        SlotStatus::Idle => "idle",
        SlotStatus::Busy => "busy",
        SlotStatus::Stopping => "stopping",
        SlotStatus::Missing => "missing",
        SlotStatus::Corrupt(_) => "corrupt",
        _ => "other",
    }
}

impl Run<'_> {
    fn elapsed(&self) -> f64 {
        self.began.elapsed().as_secs_f64()
    }

    async fn build_inspector(&self) -> Scheduler {
        let mut b = Scheduler::builder(self.config.name.as_str())
            .redis_url(self.config.redis_url.as_str())
            .redis_timeout(Duration::from_millis(1500))
            .backend(Nothing);
        for i in 1..=self.sc.slots {
            b = b.slot(
                SlotConfig::new(i.to_string(), ["Chaos"]).timeout(Duration::from_millis(self.sc.timeout_ms)),
            );
        }
        b.build().await.expect("build the inspecting scheduler")
    }

    fn fault(&mut self, kind: &str, detail: serde_json::Value) {
        self.faults += 1;
        let mut fields = match detail {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        fields.insert("kind".into(), json!(kind));
        fields.insert("t".into(), json!(self.elapsed()));
        self.history.log("fault", serde_json::Value::Object(fields));
    }

    fn spawn_replica(&mut self) {
        let spawn = self.next_spawn;
        self.next_spawn += 1;
        let mut config = self.config.clone();
        config.spawn = spawn;
        config.seed = self.config.seed.wrapping_mul(31).wrapping_add(spawn);
        let exe = std::env::current_exe().expect("current_exe");
        let faked = self.sc.fault == Fault::Faketime && spawn.is_multiple_of(2);
        let mut cmd = if faked {
            let mut c = Command::new("faketime");
            c.args(["-f", "+1h"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        let log = std::fs::File::create(self.dir.join(format!("replica-{spawn}.log"))).expect("replica log");
        let child = cmd
            .args(["chaos_replica", "--exact", "--nocapture", "--test-threads=1"])
            .envs(config.to_env())
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("replica log"))
            .stderr(log)
            .spawn()
            .expect("spawn a replica");
        let mut proc = ReplicaProc {
            spawn,
            pid: (!faked).then(|| child.id()),
            watchdog: None,
            child: Some(child),
            stdin: None,
            frozen: false,
        };
        proc.stdin = proc.child.as_mut().and_then(|c| c.stdin.take());
        if let Some(pid) = proc.pid {
            proc.watchdog = watchdog(pid);
        }
        self.history.log(
            "replica_spawn",
            json!({ "spawn": spawn, "faketime": faked.then_some("+1h") }),
        );
        self.replicas.push(proc);
    }

    /// Reads new history lines: replica pids, claims pending in start_callback.
    fn follow(&mut self) {
        for l in self.tail.poll() {
            let pid = l.pid() as u32;
            match l.ev() {
                "replica_boot" => {
                    let spawn = l.u64("spawn").unwrap_or(u64::MAX);
                    self.booted.insert(spawn, pid);
                    if let Some(r) = self.replicas.iter_mut().find(|r| r.spawn == spawn) {
                        if r.pid.is_none() {
                            r.pid = Some(pid);
                            r.watchdog = watchdog(pid);
                        }
                    }
                }
                "start_pending" => {
                    self.pending.insert((pid, l.task().to_owned()));
                    self.taken.insert(l.task().to_owned());
                }
                "start_callback" | "start_failed" => {
                    self.pending.remove(&(pid, l.task().to_owned()));
                    self.taken.insert(l.task().to_owned());
                    if l.ev() == "start_callback" {
                        *self.starts_by_pid.entry(pid).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
    }

    async fn inspect(&mut self) -> Option<Vec<(String, &'static str)>> {
        let k = self.inspections;
        self.inspections += 1;
        let inspector = self.inspector.as_ref()?;
        self.history.log("inspect_begin", json!({ "k": k }));
        let got = tokio::time::timeout(Duration::from_secs(3), inspector.inspect()).await;
        match got {
            Ok(Ok(inspection)) => {
                let slots: Vec<serde_json::Value> = inspection
                    .slots
                    .iter()
                    .map(|s| {
                        json!({ "slot": s.slot_id, "status": status_name(&s.status),
                                "task": s.task_id, "lease": s.lease })
                    })
                    .collect();
                self.history.log("inspect", json!({ "k": k, "slots": slots }));
                Some(
                    inspection
                        .slots
                        .iter()
                        .map(|s| (s.slot_id.clone(), status_name(&s.status)))
                        .collect(),
                )
            }
            Ok(Err(e)) => {
                self.history
                    .log("inspect_failed", json!({ "k": k, "msg": e.to_string() }));
                None
            }
            Err(_) => {
                self.history
                    .log("inspect_failed", json!({ "k": k, "msg": "timed out" }));
                None
            }
        }
    }

    async fn main_loop(&mut self, seconds: f64) {
        let mut next_inspect = 0.5;
        while self.elapsed() < seconds {
            self.follow();
            if self.elapsed() >= next_inspect {
                next_inspect += 0.5;
                self.inspect().await;
            }
            self.fault_step(seconds).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn live_pids(&self) -> Vec<u32> {
        self.replicas
            .iter()
            .filter(|r| r.alive() && !r.frozen)
            .filter_map(|r| r.pid)
            .collect()
    }

    fn kill_pid(&mut self, pid: u32, why: &str) {
        if let Some(r) = self.replicas.iter_mut().find(|r| r.pid == Some(pid)) {
            r.kill();
            self.fault("kill", json!({ "target": pid, "why": why }));
            self.respawn_at = Some(Instant::now() + Duration::from_millis(300));
        }
    }

    async fn fault_step(&mut self, seconds: f64) {
        let now = Instant::now();
        if self.respawn_at.is_some_and(|t| now >= t) {
            self.respawn_at = None;
            self.replicas.retain(ReplicaProc::alive);
            self.spawn_replica();
        }
        if let Some(t) = self.undo_at {
            if now < t {
                return;
            }
            self.undo_at = None;
            self.undo();
        }
        let t = self.elapsed();
        if t < self.next_fault {
            return;
        }
        let timeout_s = self.sc.timeout_ms as f64 / 1000.0;
        match self.sc.fault {
            Fault::KillReplica => {
                if t < seconds - 1.5 && self.respawn_at.is_none() {
                    let pids = self.live_pids();
                    if !pids.is_empty() {
                        let pid = pids[self.rng.range(0, pids.len() as u64 - 1) as usize];
                        self.kill_pid(pid, "random");
                    }
                }
                self.next_fault = t + 2.5;
            }
            Fault::KillInStartWindow => {
                if t < seconds - 1.5 && self.respawn_at.is_none() {
                    let live = self.live_pids();
                    let target = self.pending.iter().find(|(pid, _)| live.contains(pid)).cloned();
                    if let Some((pid, task)) = target {
                        self.history
                            .log("kill_target", json!({ "target": pid, "task": task }));
                        self.kill_pid(pid, "claimed, start_callback pending");
                        self.next_fault = t + 2.0;
                    }
                    // else: look again at the next step
                } else {
                    self.next_fault = t + 0.5;
                }
            }
            Fault::Freeze => {
                let freeze_for = timeout_s + 1.0;
                if t < seconds - freeze_for - 0.5 {
                    // The replica that started the most tasks lately: it holds some.
                    let live = self.live_pids();
                    let busiest = live
                        .iter()
                        .copied()
                        .max_by_key(|p| self.starts_by_pid.get(p).copied().unwrap_or(0));
                    if let Some(pid) = busiest {
                        signal(pid, "STOP");
                        if let Some(r) = self.replicas.iter_mut().find(|r| r.pid == Some(pid)) {
                            r.frozen = true;
                        }
                        self.fault(
                            "freeze",
                            json!({ "target": pid, "for_ms": (freeze_for * 1000.0) as u64 }),
                        );
                        self.undo_at = Some(now + Duration::from_secs_f64(freeze_for));
                        self.starts_by_pid.clear();
                    }
                }
                self.next_fault = t + freeze_for + 2.0;
            }
            Fault::RedisRestartAof => {
                if t < seconds - 2.0 {
                    if let Some(r) = self.redis.as_mut() {
                        r.kill();
                        self.fault("redis_kill", json!({ "persistence": true }));
                        let down = self.rng.range(300, 800);
                        self.undo_at = Some(now + Duration::from_millis(down));
                    }
                }
                self.next_fault = t + 4.0;
            }
            // Data loss: room is left after the fault for the quarantine (one slot
            // timeout after the detection) and for work to resume before the drain.
            Fault::RedisRestartEmpty => {
                if t < seconds - timeout_s - 2.5 {
                    if let Some(url) = self.redis.as_ref().map(ChaosRedis::url) {
                        let lease_key = common::key(&self.config.name, "lease");
                        let (loss_ms, lease) = snapshot_at_loss(&url, &lease_key, false).await;
                        if let Some(r) = self.redis.as_mut() {
                            r.kill();
                        }
                        self.fault(
                            "redis_kill",
                            json!({ "persistence": false, "loss_ms": loss_ms, "lease_at_loss": lease }),
                        );
                        let down = self.rng.range(300, 800);
                        self.undo_at = Some(now + Duration::from_millis(down));
                        self.check_backlog().await;
                    }
                }
                self.next_fault = t + 4.0;
            }
            Fault::FlushAll => {
                if t < seconds - timeout_s - 2.5 {
                    if let Some(url) = self.redis.as_ref().map(ChaosRedis::url) {
                        let lease_key = common::key(&self.config.name, "lease");
                        let (loss_ms, lease) = snapshot_at_loss(&url, &lease_key, true).await;
                        if loss_ms.is_some() {
                            self.fault("flushall", json!({ "loss_ms": loss_ms, "lease_at_loss": lease }));
                            self.check_backlog().await;
                        }
                    }
                }
                self.next_fault = t + 4.0;
            }
            Fault::ScriptFlush => {
                if t < seconds - 1.0 {
                    if let Some(r) = &self.redis {
                        let mut c = common::raw(&r.url()).await;
                        let _: redis::RedisResult<()> =
                            redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await;
                        self.fault("script_flush", json!({}));
                    }
                }
                self.next_fault = t + self.rng.range(150, 450) as f64 / 1000.0;
            }
            Fault::ClientPause => {
                if t < seconds - 2.5 {
                    if let Some(r) = &self.redis {
                        let mut c = common::raw(&r.url()).await;
                        let _: redis::RedisResult<()> = redis::cmd("CLIENT")
                            .arg("PAUSE")
                            .arg(2000)
                            .arg("WRITE")
                            .query_async(&mut c)
                            .await;
                        self.fault("client_pause", json!({ "ms": 2000, "mode": "WRITE" }));
                    }
                }
                self.next_fault = t + 4.5;
            }
            Fault::Faketime => {
                if self.faults == 0 {
                    let faked = self.replicas.len().div_ceil(2);
                    for _ in 0..faked {
                        self.fault("faketime", json!({ "offset": "+1h" }));
                    }
                }
                self.next_fault = f64::MAX;
            }
            Fault::Corrupt => {
                if self.corrupt_kinds.is_empty() || t > seconds - 1.5 {
                    self.next_fault = f64::MAX;
                    return;
                }
                let how = self.corrupt_kinds[0];
                if self.corrupt_one(how).await {
                    self.corrupt_kinds.remove(0);
                    self.next_fault = t + (seconds - 3.0) / 3.0;
                } else {
                    self.next_fault = t + 0.05;
                }
            }
        }
    }

    /// Ends a freeze or a Redis outage.
    fn undo(&mut self) {
        match self.sc.fault {
            Fault::Freeze => {
                for r in self.replicas.iter_mut().filter(|r| r.frozen) {
                    if let Some(pid) = r.pid {
                        signal(pid, "CONT");
                        r.frozen = false;
                        self.history.log("thaw", json!({ "target": pid }));
                    }
                }
            }
            Fault::RedisRestartAof | Fault::RedisRestartEmpty => {
                if let Some(r) = self.redis.as_mut() {
                    r.restart();
                    self.history.log("redis_restarted", json!({}));
                }
            }
            _ => {}
        }
    }

    /// After a data-loss fault: the backlog must have survived it. It lives in the
    /// tests' shared Redis (`backlog_url`), not in this run's private one, so a
    /// `FLUSHALL` or an empty restart of the latter leaves it alone; should it ever
    /// share the flushed server, it is re-seeded with every task not started yet (a
    /// task started before the loss must not be offered again: it still runs).
    async fn check_backlog(&mut self) {
        let (url, key) = (self.config.backlog_url.clone(), self.config.backlog_key.clone());
        let Ok(client) = redis::Client::open(url.as_str()) else {
            return;
        };
        let Ok(mut c) = client.get_multiplexed_async_connection().await else {
            self.history.log("backlog_unreachable", json!({}));
            return;
        };
        let size: redis::RedisResult<u64> = redis::cmd("ZCARD").arg(&key).query_async(&mut c).await;
        let size = size.unwrap_or(0);
        let shared = url == self.config.redis_url;
        self.history
            .log("backlog", json!({ "size": size, "same_redis": shared }));
        if size == 0 {
            self.follow();
            let added = fill_backlog(&url, &key, 0..self.backlog_len, &self.taken).await;
            self.history.log("backlog_reseeded", json!({ "added": added }));
        }
    }

    /// The garbage number of this run's edit: first one Lua's `tonumber` would take
    /// but the strict parser must refuse, then plain garbage, one per run.
    fn garbage(&self) -> &'static str {
        const GARBAGE: [&str; 5] = ["1e18", "12abc", "0x1F", "99999999999999999999", " 42"];
        GARBAGE[self.run_no as usize % GARBAGE.len()]
    }

    /// Hand-edits one slot, as an operator with redis-cli would (WATCH/MULTI/EXEC so
    /// that the slot's state is known when the edit lands). Garbage numbers and
    /// missing fields go into a busy slot (an idle slot ignores holder fields);
    /// wrong type into any slot. Returns whether an edit landed.
    async fn corrupt_one(&mut self, how: &str) -> bool {
        let url = self.config.redis_url.clone();
        let name = self.config.name.clone();
        let mut ids: Vec<String> = (1..=self.sc.slots).map(|i| i.to_string()).collect();
        ids.retain(|s| !self.corrupted.contains(s));
        let Ok(client) = redis::Client::open(url.as_str()) else {
            return false;
        };
        let Ok(mut conn) = client.get_connection() else {
            return false;
        };
        for slot in ids {
            let key = common::key(&name, &format!("slot:{slot}"));
            let _: redis::RedisResult<()> = redis::cmd("WATCH").arg(&key).query(&mut conn);
            let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
                .arg(&key)
                .query(&mut conn)
                .unwrap_or_default();
            let busy = fields.contains_key("task") && !fields.contains_key("stopping");
            if how != "wrong_type" && !busy {
                let _: redis::RedisResult<()> = redis::cmd("UNWATCH").query(&mut conn);
                continue;
            }
            let mut tx = redis::pipe();
            tx.atomic();
            match how {
                "garbage_number" => {
                    tx.cmd("HSET").arg(&key).arg("due").arg(self.garbage());
                }
                "missing_field" => {
                    tx.cmd("HDEL").arg(&key).arg("start");
                }
                _ => {
                    tx.cmd("DEL").arg(&key).cmd("RPUSH").arg(&key).arg("hand-edited");
                }
            }
            let done: redis::RedisResult<Option<redis::Value>> = tx.query(&mut conn);
            if let Ok(Some(_)) = done {
                let lease = fields.get("lease").and_then(|l| l.parse::<u64>().ok());
                let task = fields.get("task").cloned();
                self.corrupted.insert(slot.clone());
                let value = (how == "garbage_number").then(|| self.garbage());
                self.fault(
                    "corrupt",
                    json!({ "slot": slot, "how": how, "value": value, "state": if busy { "busy" } else { "other" }, "task": task, "lease": lease }),
                );
                return true;
            }
            return false; // the slot changed meanwhile: try again at the next step
        }
        false
    }

    /// Ends the run: no fault pending, replicas stop starting tasks, and every slot
    /// goes idle as its task stops or times out. Then the final inspection.
    async fn drain(&mut self) {
        if self.undo_at.take().is_some() {
            self.undo();
        }
        if self.respawn_at.take().is_some() {
            self.replicas.retain(ReplicaProc::alive);
            self.spawn_replica();
        }
        if self.redis.as_ref().is_some_and(|r| !r.is_up()) {
            self.undo();
        }
        self.history.log("drain", json!({}));
        for r in &mut self.replicas {
            if let Some(stdin) = r.stdin.as_mut() {
                let _ = stdin.write_all(b"drain\n");
                let _ = stdin.flush();
            }
        }
        let deadline = Instant::now() + Duration::from_millis(2 * self.sc.timeout_ms + 6000);
        let mut quiet = 0;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(400)).await;
            self.follow();
            let Some(slots) = self.inspect().await else {
                continue;
            };
            let idle = slots
                .iter()
                .all(|(slot, status)| *status == "idle" || self.corrupted.contains(slot));
            quiet = if idle { quiet + 1 } else { 0 };
            if quiet >= 2 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let k = self.inspections;
        if let Some(slots) = self.inspect().await {
            let slots: Vec<serde_json::Value> = slots
                .iter()
                .map(|(slot, status)| json!({ "slot": slot, "status": status }))
                .collect();
            self.history.log("final", json!({ "k": k, "slots": slots }));
        }
    }

    fn stop_replicas(&mut self) {
        for r in &mut self.replicas {
            r.stdin = None; // EOF: the replica exits
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for r in &mut self.replicas {
            while let Some(c) = r.child.as_mut() {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => {
                        r.child = None;
                    }
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    Ok(None) => break,
                }
            }
            r.kill();
        }
        self.replicas.clear();
    }
}
