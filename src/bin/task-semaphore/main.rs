//! `task-semaphore`: the demo of the crate, and an operator's view of a scheduler.
//!
//! ```text
//! task-semaphore demo [--slots N] [--tasks N]
//! task-semaphore inspect --name NAME [--redis-url URL] [--prefix P] [--json]
//! task-semaphore bench [--quick] [--json] [--runs R] [--sizes 1000,10000,100000]
//! task-semaphore workload [--slots N] [--poll-many] [--keepalive] [--stop] [--sweep]
//! ```

mod bench;
mod redis_server;
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis_server::ThrowawayRedis;
use task_semaphore::{
    inspect_redis, Backend, BoxError, Inspection, Scheduler, SlotConfig, SlotStatus, DEFAULT_KEY_PREFIX,
};

const USAGE: &str = "\
usage:
  task-semaphore demo [--slots N] [--tasks N]
      Runs a scheduler over a simulated backlog and shows what happens.
      Uses REDIS_URL if set, else starts a throwaway redis-server.
  task-semaphore inspect --name NAME [--redis-url URL] [--prefix P] [--json]
      Shows the slots of scheduler NAME (default URL: REDIS_URL or redis://127.0.0.1:6379).
  task-semaphore bench [--quick] [--json] [--runs R] [--sizes 1000,10000,100000]
      Measures throughput, latency, tick cost and memory: the median of R runs
      (default 5; at most 3 at 100,000 slots and more). --quick: one run, 1,000 slots,
      shorter phases. Uses REDIS_URL if set, else a throwaway redis-server.
  task-semaphore workload [--slots N] [--poll-many] [--keepalive] [--stop] [--sweep]
      One fixed piece of work: build N slots (default 1,000), fill them (slot by slot,
      or with poll_many), with --keepalive send one keepalive per task, with --stop
      stop each task (its slot is refilled), and with --sweep let them expire and
      sweep and refill them.
      For counting script costs (make script-cost). Uses REDIS_URL if set, else a
      throwaway redis-server.";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(&args[1..]).await,
        Some("inspect") => inspect(&args[1..]).await,
        Some("bench") => bench::bench(&args[1..]).await,
        Some("workload") => workload::workload(&args[1..]).await,
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("unknown or missing command\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("task-semaphore: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--flag value` pairs and bare `--switch`es.
fn parse_flags(args: &[String], switches: &[&str]) -> Result<HashMap<String, String>, String> {
    let mut flags = HashMap::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(name) = arg.strip_prefix("--") else {
            return Err(format!("unexpected argument {arg:?}\n{USAGE}"));
        };
        if switches.contains(&name) {
            flags.insert(name.to_owned(), String::new());
        } else {
            let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
            flags.insert(name.to_owned(), value.clone());
        }
    }
    Ok(flags)
}

fn number(flags: &HashMap<String, String>, name: &str, default: usize, max: usize) -> Result<usize, String> {
    match flags.get(name) {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(format!("--{name} must be a number from 1 to {max}, not {v:?}")),
        },
    }
}

// ------------------------------------------------------------------ inspect

async fn inspect(args: &[String]) -> Result<(), String> {
    let flags = parse_flags(args, &["json"])?;
    let name = flags.get("name").ok_or("inspect needs --name NAME")?;
    let url = flags
        .get("redis-url")
        .cloned()
        .or_else(|| std::env::var("REDIS_URL").ok())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    let prefix = flags
        .get("prefix")
        .map(String::as_str)
        .unwrap_or(DEFAULT_KEY_PREFIX);
    let inspection = inspect_redis(&url, prefix, name)
        .await
        .map_err(|e| error_chain(&e))?;
    if flags.contains_key("json") {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&inspection)).map_err(|e| e.to_string())?
        );
    } else if inspection.slots.is_empty() {
        println!(
            "scheduler {name:?} has no slots under prefix {prefix:?} at {}",
            redacted(&url)
        );
    } else {
        print!("{}", table(&inspection));
    }
    Ok(())
}

/// The URL with its password replaced by `***`, for printing (`user:pw@` or `:pw@`).
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn ms(t: Option<SystemTime>) -> Option<u64> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
}

fn status_text(status: &SlotStatus) -> String {
    match status {
        SlotStatus::Idle => "idle".into(),
        SlotStatus::Busy => "busy".into(),
        SlotStatus::Stopping => "stopping".into(),
        SlotStatus::Missing => "missing".into(),
        SlotStatus::Corrupt(why) => format!("corrupt: {why}"),
        other => format!("{other:?}"),
    }
}

fn to_json(i: &Inspection) -> serde_json::Value {
    let slots: Vec<_> = i
        .slots
        .iter()
        .map(|s| {
            serde_json::json!({
                "slot_id": s.slot_id,
                "status": status_text(&s.status),
                "backends": s.backends,
                "task_id": s.task_id,
                "backend": s.backend,
                "lease": s.lease,
                "started_at_ms": ms(s.started_at),
                "last_keepalive_at_ms": ms(s.last_keepalive_at),
                "deadline_ms": ms(s.deadline),
                "timeout_ms": s.timeout.map(|t| t.as_millis() as u64),
                "stopping_reason": s.stopping_reason,
                "reclaim_at_ms": ms(s.reclaim_at),
            })
        })
        .collect();
    serde_json::json!({ "name": i.name, "now_ms": ms(Some(i.now)), "last_lease": i.last_lease, "slots": slots })
}

/// Seconds between two Redis times, signed, for "age" and "deadline in".
fn secs(from: SystemTime, to: Option<SystemTime>) -> String {
    match to {
        None => "-".into(),
        Some(to) => match to.duration_since(from) {
            Ok(d) => format!("{:.1}s", d.as_secs_f64()),
            Err(e) => format!("-{:.1}s", e.duration().as_secs_f64()),
        },
    }
}

/// Shows a task id on one line: control characters escaped, long ids cut.
fn short(text: &str, max: usize) -> String {
    let escaped: String = text.escape_debug().collect();
    if escaped.chars().count() <= max {
        escaped
    } else {
        let head: String = escaped.chars().take(max - 1).collect();
        format!("{head}…")
    }
}

fn table(i: &Inspection) -> String {
    let header = ["SLOT", "STATUS", "TASK", "BACKEND", "LEASE", "AGE", "DEADLINE IN"];
    let mut rows = vec![header.map(String::from).to_vec()];
    for s in &i.slots {
        let age = match s.started_at {
            Some(start) => secs(start, Some(i.now)),
            None => "-".into(),
        };
        rows.push(vec![
            short(&s.slot_id, 20),
            short(&status_text(&s.status), 40),
            s.task_id
                .as_deref()
                .map(|t| short(t, 32))
                .unwrap_or_else(|| "-".into()),
            s.backend.clone().unwrap_or_else(|| "-".into()),
            s.lease.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            age,
            if s.status == SlotStatus::Busy {
                secs(i.now, s.deadline)
            } else {
                "-".into()
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

// ------------------------------------------------------------------ demo

/// How a simulated task behaves once started.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    /// Works a little, sending keepalives, then stops.
    Finishes,
    /// Works longer than the slot timeout, but keeps itself alive, then stops.
    Long,
    /// Never sends a keepalive nor stops: the sweep times it out.
    Hangs,
}

fn kind_of(n: usize) -> Kind {
    match n % 7 {
        3 => Kind::Hangs,
        5 => Kind::Long,
        _ => Kind::Finishes,
    }
}

#[derive(Default)]
struct DemoState {
    pending: Vec<(String, Kind)>,
    running: BTreeMap<String, Kind>,
    max_running: usize,
    starts: HashMap<String, usize>,
    finished: usize,
    timed_out: usize,
    keepalives: usize,
}

/// The demo's backend: a backlog in memory; started tasks run as tokio tasks that
/// call the scheduler's keepalive and stop like real workers would.
struct Backlog {
    state: Arc<Mutex<DemoState>>,
    scheduler: Arc<OnceLock<Scheduler>>,
    timeout: Duration,
}

impl Backlog {
    fn state(&self) -> std::sync::MutexGuard<'_, DemoState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for Backlog {
    async fn poll(&self) -> Result<Option<String>, BoxError> {
        Ok(self.state().pending.first().map(|(id, _)| id.clone()))
    }

    async fn start_callback(&self, task_id: &str) -> Result<(), BoxError> {
        let kind = {
            let mut s = self.state();
            let index = s
                .pending
                .iter()
                .position(|(id, _)| id == task_id)
                .ok_or("task not pending")?;
            let (_, kind) = s.pending.remove(index);
            s.running.insert(task_id.to_owned(), kind);
            s.max_running = s.max_running.max(s.running.len());
            *s.starts.entry(task_id.to_owned()).or_default() += 1;
            kind
        };
        println!("  ▶ {task_id} starts ({kind:?})");
        let scheduler = self.scheduler.get().cloned().ok_or("scheduler not ready")?;
        let (task, state, timeout) = (task_id.to_owned(), self.state.clone(), self.timeout);
        // The task runs on its own: start_callback must not wait for it.
        tokio::spawn(async move {
            let work = match kind {
                Kind::Finishes => timeout / 2,
                Kind::Long => timeout * 2,
                Kind::Hangs => return,
            };
            let started = Instant::now();
            while started.elapsed() < work {
                tokio::time::sleep(timeout / 3).await;
                if scheduler.keepalive(&task).await.is_ok() {
                    state.lock().unwrap_or_else(|p| p.into_inner()).keepalives += 1;
                }
            }
            if let Err(e) = scheduler.stop(&task).await {
                eprintln!("  ! stop of {task} failed: {e}");
            }
        });
        Ok(())
    }

    async fn stop_callback(&self, task_id: &str) -> Result<(), BoxError> {
        let mut s = self.state();
        if s.running.remove(task_id) != Some(Kind::Hangs) {
            s.finished += 1;
        }
        Ok(())
    }

    async fn timeout_callback(&self, task_id: &str) -> Result<(), BoxError> {
        // Where a real backend would kill the zombie before its slot is reused.
        self.state().timed_out += 1;
        println!("  ✗ {task_id} timed out: timeout_callback kills it, then stop_callback");
        Ok(())
    }

    async fn inspect(&self) -> serde_json::Value {
        let s = self.state();
        serde_json::json!({ "pending": s.pending.len(), "running": s.running.len() })
    }
}

async fn demo(args: &[String]) -> Result<(), String> {
    let flags = parse_flags(args, &[])?;
    let slots = number(&flags, "slots", 4, 1000)?;
    let total = number(&flags, "tasks", 21, 100_000)?;
    let timeout = Duration::from_millis(1500);

    let (url, server, cli) = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => (url.clone(), None, format!("redis-cli -u {}", redacted(&url))),
        _ => {
            let server = ThrowawayRedis::start().await?;
            let port = server.port;
            println!("Started a throwaway redis-server on 127.0.0.1:{port} (stopped at the end).");
            (
                format!("redis://127.0.0.1:{port}"),
                Some(server),
                format!("redis-cli -p {port}"),
            )
        }
    };
    let name = format!("demo-{}", std::process::id());
    let state = Arc::new(Mutex::new(DemoState {
        pending: (0..total).map(|n| (format!("job-{n:03}"), kind_of(n))).collect(),
        ..DemoState::default()
    }));
    let cell = Arc::new(OnceLock::new());
    let backlog = Backlog {
        state: state.clone(),
        scheduler: cell.clone(),
        timeout,
    };
    let mut builder = Scheduler::builder(&name).redis_url(&url).backend(backlog);
    for i in 1..=slots {
        builder = builder.slot(SlotConfig::new(i.to_string(), ["Backlog"]).timeout(timeout));
    }
    let scheduler = builder.build().await.map_err(|e| error_chain(&e))?;
    let _ = cell.set(scheduler.clone());

    let count = |k: Kind| (0..total).filter(|&n| kind_of(n) == k).count();
    println!(
        "Scheduler {name:?}: {slots} slots, timeout {timeout:?}; backlog of {total} tasks \
         ({} finish, {} run long with keepalives, {} hang and must time out).",
        count(Kind::Finishes),
        count(Kind::Long),
        count(Kind::Hangs)
    );
    println!("Look at the live keys while it runs:");
    println!("  {cli} --scan --pattern '{}'", scheduler.key_pattern());
    println!("  {cli} HGETALL '{}'", scheduler.slot_key("1"));
    println!("  {cli} HGETALL '{}'", scheduler.deadline_group_key("1"));
    println!("  {cli} ZRANGE '{}' 0 -1 WITHSCORES", scheduler.deadlines_key());
    println!("  {cli} HGETALL '{}'", scheduler.task_index_key("job-000"));
    println!(
        "  task-semaphore inspect --redis-url {} --name {name}",
        redacted(&url)
    );
    println!();

    let started_at = Instant::now();
    let deadline = Duration::from_secs(30 + total as u64);
    let mut shown_table = false;
    let mut tick_errors = 0;
    loop {
        let report = scheduler.schedule().await.map_err(|e| error_chain(&e))?;
        tick_errors += report.errors.len();
        for e in &report.errors {
            println!("  ! {:?} in slot {:?}: {}", e.stage, e.slot_id, e.message);
        }
        let (pending, running, finished, timed_out) = {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            (s.pending.len(), s.running.len(), s.finished, s.timed_out)
        };
        println!(
            "[{:>5.1}s] busy {running}/{slots} | pending {pending} | finished {finished} | timed out {timed_out}",
            started_at.elapsed().as_secs_f64()
        );
        if !shown_table && running == slots.min(total) {
            shown_table = true;
            let view = scheduler.inspect().await.map_err(|e| error_chain(&e))?;
            println!("\nWhat `task-semaphore inspect` shows now:\n{}", table(&view));
        }
        if finished + timed_out >= total || started_at.elapsed() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Read Redis before taking the lock: the backend's inspect takes it too.
    let last_lease = scheduler.inspect().await.map_err(|e| error_chain(&e))?.last_lease;
    let (finished, timed_out, keepalives, max_running, starts, most_starts) = {
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        let most_starts = s.starts.values().copied().max().unwrap_or(0);
        let starts: usize = s.starts.values().sum();
        (
            s.finished,
            s.timed_out,
            s.keepalives,
            s.max_running,
            starts,
            most_starts,
        )
    };
    println!("\nSummary after {:.1}s:", started_at.elapsed().as_secs_f64());
    println!("  tasks             {total}");
    println!("  finished          {finished}");
    println!("  timed out         {timed_out}");
    println!("  keepalives sent   {keepalives}");
    // Lease numbers are at least Redis time in ms x 100 (README, "Redis keys"), so the
    // last one is no count: the starts are.
    println!("  starts            {starts}, one lease each (the last: {last_lease})");
    println!("  most running      {max_running} (cap {slots})");
    println!("  most starts/task  {most_starts}");
    println!("  tick errors       {tick_errors}");
    if server.is_none() {
        cleanup(&url, &scheduler.key_pattern()).await;
    }
    if max_running > slots || most_starts > 1 || finished + timed_out != total {
        return Err("the demo saw a broken guarantee (see the summary)".into());
    }
    println!("All {total} tasks ran once each, never more than {slots} at a time.");
    Ok(())
}

/// Deletes the demo's keys from a Redis the user owns.
async fn cleanup(url: &str, pattern: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let mut cursor: u64 = 0;
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    println!("  (removed the demo's keys from {})", redacted(url));
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    /// Printed URLs never show a password; everything else stays readable.
    fn redacted_hides_only_the_password() {
        assert_eq!(
            redacted("redis://ts-reports:s3cret@host:6379/0"),
            "redis://ts-reports:***@host:6379/0"
        );
        assert_eq!(redacted("rediss://:s3cret@host"), "rediss://:***@host");
        assert_eq!(redacted("redis://host:6379"), "redis://host:6379");
        assert_eq!(redacted("redis://user@host"), "redis://user@host");
        assert_eq!(redacted("redis://u:p@ss@host/1"), "redis://u:***@host/1");
        assert_eq!(redacted("not a url"), "not a url");
    }
}
