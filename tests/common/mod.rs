//! Test harness: a real Redis for every test binary, unique scheduler names, and a
//! scriptable fake backend.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    unreachable_pub
)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use task_semaphore::{Backend, BoxError, Callback, Scheduler, SchedulerBuilder, SlotConfig};

pub mod tls;

/// The Redis every test of this binary shares (each under its own scheduler name):
/// `REDIS_URL`, else a `redis-server` from PATH on a free port, else a container
/// through testcontainers where a Docker engine answers.
pub fn redis_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("REDIS_URL") {
            if !url.is_empty() {
                return url;
            }
        }
        if has_redis_server() {
            let port = free_port();
            // A watchdog shell stops the server once this test process is gone; it
            // outlives this process on purpose, so it is not waited for.
            let script = format!(
                "redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no \
                 --loglevel warning >/dev/null 2>&1 & r=$!; \
                 while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; kill $r",
                pid = std::process::id()
            );
            #[allow(clippy::zombie_processes)]
            Command::new("sh")
                .arg("-c")
                .arg(script)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let url = format!("redis://127.0.0.1:{port}");
            wait_for(&url);
            return url;
        }
        container_url()
    })
    .clone()
}

fn container_url() -> String {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::SyncRunner;
    use testcontainers::{Container, GenericImage};
    static CONTAINER: OnceLock<Container<GenericImage>> = OnceLock::new();
    let docker_ok = Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        docker_ok,
        "no Redis for the tests: set REDIS_URL, install redis-server, or run a Docker engine"
    );
    let container = CONTAINER.get_or_init(|| {
        GenericImage::new("redis", "7")
            .with_exposed_port(6379.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
            .start()
            .expect("start a redis container")
    });
    let port = container.get_host_port_ipv4(6379.tcp()).expect("container port");
    format!("redis://127.0.0.1:{port}")
}

pub fn has_redis_server() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(url: &str) {
    let client = redis::Client::open(url).unwrap();
    let start = Instant::now();
    loop {
        if let Ok(mut c) = client.get_connection() {
            if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "redis at {url} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A redis-server of one test's own, for tests that restart it or count its
/// commands. `None` when no redis-server binary is on PATH.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    args: Vec<String>,
}

impl PrivateRedis {
    pub fn start(extra: &[&str]) -> Option<Self> {
        if !has_redis_server() {
            return None;
        }
        let mut server = PrivateRedis {
            port: free_port(),
            child: None,
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        Some(server)
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
                "--appendonly",
                "no",
            ])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        wait_for(&self.url());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scheduler name no other test uses.
pub fn unique_name(test: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{test}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A plain connection to the test Redis, for reading and tampering with keys.
pub async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The number after `prefix` on a line of `INFO <section>` (0 when no line has it:
/// Redis leaves out counters that are still 0, such as `errorstat_NOSCRIPT:count=`).
pub async fn info_number(conn: &mut redis::aio::MultiplexedConnection, section: &str, prefix: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg(section).query_async(conn).await.unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// The key names the README documents, for tests that look at Redis directly.
pub fn key(name: &str, rest: &str) -> String {
    format!("task_semaphore:{{{name}}}:{rest}")
}

/// What a fake backend saw, shared by every replica's copy of it.
#[derive(Default)]
pub struct Ledger {
    /// Tasks waiting to be started, in order.
    pub pending: Vec<String>,
    /// Events as they happened: ("start" | "stop" | "timeout" | "keepalive" | "error:<cb>", task).
    pub events: Vec<(String, String)>,
    pub starts: HashMap<String, usize>,
    pub running: BTreeSet<String>,
    pub max_running: usize,
    /// Tasks whose callbacks fail: (callback, task).
    pub fail: std::collections::HashSet<(Callback, String)>,
    pub poll_fails: bool,
    /// What backend_error_callback answers: Ok(b) or Err.
    pub error_answer: Option<bool>,
    /// Callbacks that never return, per task.
    pub hang: std::collections::HashSet<(Callback, String)>,
    /// The lease each start/stop/timeout callback was called with: (event, task, lease).
    pub leases: Vec<(String, String, u64)>,
    /// The `n` of every poll_many call (batching fakes only).
    pub poll_many_calls: Vec<usize>,
}

impl Ledger {
    pub fn count(&self, event: &str, task: &str) -> usize {
        self.events
            .iter()
            .filter(|(e, t)| e == event && t == task)
            .count()
    }
    pub fn events_of(&self, task: &str) -> Vec<String> {
        self.events
            .iter()
            .filter(|(_, t)| t == task)
            .map(|(e, _)| e.clone())
            .collect()
    }
}

/// A fake backend over a shared [`Ledger`]. `poll` returns the first pending task
/// and has no side effect; `start_callback` takes it off the pending list.
#[derive(Clone)]
pub struct Fake {
    pub name: String,
    pub ledger: Arc<Mutex<Ledger>>,
    /// Optional pause inside poll, after the task was chosen (to widen races).
    pub poll_delay: Option<Duration>,
    /// Optional gate: poll returns its answer only once this is notified.
    pub poll_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// Optional pause at the start of timeout_callback and stop_callback.
    pub callback_delay: Option<Duration>,
    /// Whether poll_many is provided (the first n pending tasks).
    pub batch: bool,
}

impl Fake {
    pub fn new(name: &str) -> Self {
        Fake {
            name: name.to_owned(),
            ledger: Arc::default(),
            poll_delay: None,
            poll_gate: None,
            callback_delay: None,
            batch: false,
        }
    }
    pub fn with_tasks(name: &str, tasks: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let fake = Fake::new(name);
        fake.push(tasks);
        fake
    }
    pub fn push(&self, tasks: impl IntoIterator<Item = impl Into<String>>) {
        self.ledger().pending.extend(tasks.into_iter().map(Into::into));
    }
    pub fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap()
    }
    fn event(&self, what: &str, task: &str) {
        self.ledger().events.push((what.to_owned(), task.to_owned()));
    }
    async fn maybe_fail(&self, cb: Callback, task: &str) -> Result<(), BoxError> {
        if let (Some(delay), Callback::Stop | Callback::Timeout) = (self.callback_delay, cb) {
            tokio::time::sleep(delay).await;
        }
        let (fail, hang) = {
            let l = self.ledger();
            (
                l.fail.contains(&(cb, task.to_owned())),
                l.hang.contains(&(cb, task.to_owned())),
            )
        };
        if hang {
            std::future::pending::<()>().await;
        }
        if fail {
            return Err(format!("{cb} failed on purpose for {task}").into());
        }
        Ok(())
    }
}

impl Backend for Fake {
    fn name(&self) -> &str {
        &self.name
    }

    async fn poll(&self) -> Result<Option<String>, BoxError> {
        let (fails, next) = {
            let l = self.ledger();
            (l.poll_fails, l.pending.first().cloned())
        };
        if fails {
            return Err("poll failed on purpose".into());
        }
        if let Some(gate) = &self.poll_gate {
            gate.acquire().await.unwrap().forget();
        }
        if let Some(delay) = self.poll_delay {
            tokio::time::sleep(delay).await;
        }
        Ok(next)
    }

    async fn poll_many(&self, n: usize) -> Result<Option<Vec<String>>, BoxError> {
        if !self.batch {
            return Ok(None);
        }
        let (fails, next) = {
            let mut l = self.ledger();
            l.poll_many_calls.push(n);
            (
                l.poll_fails,
                l.pending.iter().take(n).cloned().collect::<Vec<_>>(),
            )
        };
        if fails {
            return Err("poll_many failed on purpose".into());
        }
        if let Some(gate) = &self.poll_gate {
            gate.acquire().await.unwrap().forget();
        }
        if let Some(delay) = self.poll_delay {
            tokio::time::sleep(delay).await;
        }
        Ok(Some(next))
    }

    async fn start_callback(&self, task_id: &str) -> Result<(), BoxError> {
        self.maybe_fail(Callback::Start, task_id).await?;
        let mut l = self.ledger();
        l.pending.retain(|t| t != task_id);
        l.events.push(("start".into(), task_id.to_owned()));
        *l.starts.entry(task_id.to_owned()).or_default() += 1;
        l.running.insert(task_id.to_owned());
        l.max_running = l.max_running.max(l.running.len());
        Ok(())
    }

    async fn stop_callback(&self, task_id: &str) -> Result<(), BoxError> {
        self.maybe_fail(Callback::Stop, task_id).await?;
        let mut l = self.ledger();
        l.running.remove(task_id);
        l.events.push(("stop".into(), task_id.to_owned()));
        Ok(())
    }

    async fn timeout_callback(&self, task_id: &str) -> Result<(), BoxError> {
        self.event("timeout", task_id);
        self.maybe_fail(Callback::Timeout, task_id).await
    }

    async fn start_with_lease(&self, task_id: &str, lease: u64) -> Result<(), BoxError> {
        self.start_callback(task_id).await?;
        self.ledger().leases.push(("start".into(), task_id.into(), lease));
        Ok(())
    }

    async fn stop_with_lease(&self, task_id: &str, lease: u64) -> Result<(), BoxError> {
        self.ledger().leases.push(("stop".into(), task_id.into(), lease));
        self.stop_callback(task_id).await
    }

    async fn timeout_with_lease(&self, task_id: &str, lease: u64) -> Result<(), BoxError> {
        self.ledger()
            .leases
            .push(("timeout".into(), task_id.into(), lease));
        self.timeout_callback(task_id).await
    }

    async fn keepalive_callback(&self, task_id: &str) -> Result<(), BoxError> {
        self.event("keepalive", task_id);
        self.maybe_fail(Callback::Keepalive, task_id).await
    }

    async fn backend_error_callback(
        &self,
        task_id: &str,
        _error: &BoxError,
        callback: Callback,
    ) -> Result<bool, BoxError> {
        self.event(&format!("error:{callback}"), task_id);
        match self.ledger().error_answer {
            Some(free) => Ok(free),
            None => Err("error callback failed on purpose".into()),
        }
    }

    async fn inspect(&self) -> serde_json::Value {
        serde_json::json!({ "pending": self.ledger().pending.len() })
    }
}

/// A builder for scheduler `name` on the test Redis with `n` slots ("1".."n")
/// polling `backend` with `timeout`.
pub fn builder(name: &str, backend: &Fake, n: usize, timeout: Duration) -> SchedulerBuilder {
    let mut b = Scheduler::builder(name)
        .redis_url(redis_url())
        .backend(backend.clone());
    for i in 1..=n {
        b = b.slot(SlotConfig::new(i.to_string(), [backend.name.clone()]).timeout(timeout));
    }
    b
}

/// Holders per slot id, from `inspect`.
pub async fn holders(s: &Scheduler) -> BTreeMap<String, Option<String>> {
    s.inspect()
        .await
        .unwrap()
        .slots
        .into_iter()
        .map(|slot| (slot.slot_id, slot.task_id))
        .collect()
}

pub fn tasks(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}
