//! Redis commands each operation sends, counted exactly with `MONITOR` on a private
//! server (no other client), with 1,000 slots. The README's cost table
//! comes from here: `cargo test --test commands -- --nocapture` prints it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{tasks, unique_name, Fake, PrivateRedis};
use task_semaphore::{Scheduler, SlotConfig};

const N: usize = 1000;

/// Every command clients send to a server, seen through `MONITOR` (commands run
/// inside scripts show as `[0 lua]` there and are left out: they cost no round trip).
struct Monitor {
    lines: Arc<Mutex<Vec<String>>>,
    conn: redis::aio::MultiplexedConnection,
    marks: usize,
}

impl Monitor {
    async fn start(port: u16, url: &str) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(b"MONITOR\r\n").unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                sink.lock().unwrap().push(line);
            }
        });
        let mut m = Monitor {
            lines,
            conn: common::raw(url).await,
            marks: 0,
        };
        m.mark().await; // MONITOR is on once its first mark shows
        m
    }

    /// Sends a marker and waits until MONITOR has shown it; returns its position.
    async fn mark(&mut self) -> usize {
        self.marks += 1;
        let mark = format!("mark-{}", self.marks);
        let _: String = redis::cmd("ECHO")
            .arg(&mark)
            .query_async(&mut self.conn)
            .await
            .unwrap();
        for _ in 0..500 {
            if let Some(i) = self.lines.lock().unwrap().iter().position(|l| l.contains(&mark)) {
                return i;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("MONITOR never showed {mark}");
    }

    /// Runs `op`; returns it and every line MONITOR showed meanwhile.
    async fn lines<F: std::future::Future>(&mut self, op: F) -> (F::Output, Vec<String>) {
        let begin = self.mark().await;
        let out = op.await;
        let end = self.mark().await;
        let lines = self.lines.lock().unwrap();
        (out, lines[begin + 1..end].to_vec())
    }

    /// Runs `op`; returns what it sent, as command name -> count, with the number of
    /// commands its scripts ran inside Redis under the name `(in scripts)`.
    async fn count<F: std::future::Future>(&mut self, op: F) -> (F::Output, BTreeMap<String, u64>) {
        let begin = self.mark().await;
        let out = op.await;
        let end = self.mark().await;
        let lines = self.lines.lock().unwrap();
        let mut counts = BTreeMap::new();
        for line in &lines[begin + 1..end] {
            let Some((source, command)) = line.split_once("] ") else {
                continue;
            };
            let name = if source.ends_with(" lua") {
                INSIDE.to_owned()
            } else {
                command.split('"').nth(1).unwrap_or("?").to_lowercase()
            };
            *counts.entry(name).or_default() += 1;
        }
        (out, counts)
    }
}

const INSIDE: &str = "(in scripts)";

/// Commands sent by the client: each costs a round trip unless pipelined.
fn total(c: &BTreeMap<String, u64>) -> u64 {
    c.iter().filter(|(k, _)| *k != INSIDE).map(|(_, v)| v).sum()
}

async fn build(url: &str, name: &str, fake: &Fake, timeout: Duration) -> Scheduler {
    let mut b = Scheduler::builder(name).redis_url(url).backend(fake.clone());
    for i in 1..=N {
        b = b.slot(SlotConfig::new(i.to_string(), ["Jobs"]).timeout(timeout));
    }
    b.build().await.unwrap()
}

#[tokio::test]
/// Exact command counts per operation with 1,000 slots; a steady tick is one call.
async fn commands_per_operation_with_1000_slots() {
    let Some(server) = PrivateRedis::start(&[]) else {
        eprintln!("skipped: no redis-server binary for a private server");
        return;
    };
    let url = server.url();
    let mut m = Monitor::start(server.port, &url).await;
    let name = unique_name("cost");
    let fake = Fake::with_tasks("Jobs", tasks("t", N + 1));

    let (s, build_cost) = m
        .count(build(&url, &name, &fake, Duration::from_secs(3600)))
        .await;
    let (r, fill) = m.count(s.schedule()).await;
    assert_eq!(r.unwrap().started.len(), N);
    let (_, steady) = m.count(s.schedule()).await;
    let (r, keepalive) = m.count(s.keepalive("t7")).await;
    r.unwrap();
    // Another replica, which has no hint of where the task is.
    let other = build(&url, &name, &fake, Duration::from_secs(3600)).await;
    let (r, keepalive_other) = m.count(other.keepalive("t8")).await;
    r.unwrap();
    let (r, stop_refill) = m.count(s.stop("t9")).await;
    r.unwrap();
    let (r, stop_empty) = m.count(s.stop("t10")).await;
    r.unwrap();
    let (r, inspect) = m.count(s.inspect()).await;
    assert_eq!(r.unwrap().slots.len(), N);

    // Sweep: a second scheduler whose 1,000 tasks all expire.
    let name2 = unique_name("cost-sweep");
    let fake2 = Fake::with_tasks("Jobs", tasks("u", 2 * N));
    let s2 = build(&url, &name2, &fake2, Duration::from_millis(1500)).await;
    s2.schedule().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (r, sweep) = m.count(s2.schedule()).await;
    let r = r.unwrap();
    assert_eq!((r.timed_out.len(), r.started.len()), (N, N));

    // The same fill and sweep with poll_many: claims in chunks of 200.
    let name3 = unique_name("cost-batch");
    let mut fake3 = Fake::with_tasks("Jobs", tasks("v", 2 * N));
    fake3.batch = true;
    let s3 = build(&url, &name3, &fake3, Duration::from_millis(1500)).await;
    let (r, fill_batch) = m.count(s3.schedule()).await;
    assert_eq!(r.unwrap().started.len(), N);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (r, sweep_batch) = m.count(s3.schedule()).await;
    let r = r.unwrap();
    assert_eq!((r.timed_out.len(), r.started.len()), (N, N));

    let rows = [
        ("build (register 1,000 slots)", &build_cost),
        ("fill 1,000 idle slots", &fill),
        ("steady tick", &steady),
        ("keepalive (hint: this replica started it)", &keepalive),
        ("keepalive (another replica)", &keepalive_other),
        ("stop + refill the slot", &stop_refill),
        ("stop, nothing to refill with", &stop_empty),
        ("inspect", &inspect),
        ("sweep 1,000 expired + refill them", &sweep),
        ("fill 1,000 idle slots with poll_many", &fill_batch),
        ("sweep 1,000 expired + refill them with poll_many", &sweep_batch),
    ];
    println!("| operation | commands sent | of which | run inside scripts |");
    for (what, c) in rows {
        let sent: Vec<String> = c
            .iter()
            .filter(|(k, _)| *k != INSIDE)
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        let inside = c.get(INSIDE).copied().unwrap_or(0);
        println!("| {what} | {} | {} | {inside} |", total(c), sent.join(", "));
    }

    let evalsha = |c: &BTreeMap<String, u64>| c.get("evalsha").copied().unwrap_or(0);
    assert_eq!(total(&steady), 1, "{steady:?}");
    assert_eq!(evalsha(&steady), 1);
    // 1 tick + 1 claim per slot.
    assert_eq!(evalsha(&fill), 1 + N as u64, "{fill:?}");
    assert_eq!(total(&fill), 1 + N as u64, "{fill:?}");
    assert_eq!(total(&keepalive), 1, "{keepalive:?}");
    assert_eq!(total(&keepalive_other), 2, "{keepalive_other:?}"); // HGET + EVALSHA
    assert_eq!(total(&stop_refill), 3, "{stop_refill:?}"); // release, free, claim
    assert_eq!(total(&stop_empty), 2, "{stop_empty:?}"); // release, free
                                                         // TIME, GET lease, HMGET epoch, N x HGETALL: one round trip.
    assert_eq!(total(&inspect), 3 + N as u64, "{inspect:?}");
    // tick + 1 pipeline of HGETALLs of the 32 due groups of the deadline index (1,000
    // slots in 32 groups) + 10 sweep chunks (100 slots each) + 10 free chunks + N
    // claims.
    assert_eq!(sweep.get("hgetall"), Some(&32), "{sweep:?}");
    assert_eq!(total(&sweep), 1 + 32 + 10 + 10 + N as u64, "{sweep:?}");
    // 1 tick + 5 claim chunks; the refill after a sweep the same.
    assert_eq!(total(&fill_batch), 1 + 5, "{fill_batch:?}");
    // tick + 32 HGETALLs + 10 sweep chunks + 10 free chunks + 5 claim chunks (200
    // slots each).
    assert_eq!(total(&sweep_batch), 1 + 32 + 10 + 10 + 5, "{sweep_batch:?}");
    drop(server);
}

#[tokio::test]
/// A group of the deadline index with more due slots than one sweep call takes (here
/// every slot is in one group: the state was created by a replica with 2 slots) is
/// swept in calls of at most 100 slots; the last settles its bound.
async fn a_big_group_is_swept_in_calls_of_at_most_100_slots() {
    let Some(server) = PrivateRedis::start(&[]) else {
        eprintln!("skipped: no redis-server binary for a private server");
        return;
    };
    let url = server.url();
    let n = 250;
    let name = unique_name("biggroup");
    let fake = Fake::with_tasks("Jobs", tasks("t", n));
    let timeout = Duration::from_millis(1500);
    let small = Scheduler::builder(&name)
        .redis_url(&url)
        .backend(fake.clone())
        .slot(SlotConfig::new("1", ["Jobs"]).timeout(timeout))
        .slot(SlotConfig::new("2", ["Jobs"]).timeout(timeout))
        .build()
        .await
        .unwrap();
    drop(small);
    let mut b = Scheduler::builder(&name).redis_url(&url).backend(fake.clone());
    for i in 1..=n {
        b = b.slot(SlotConfig::new(i.to_string(), ["Jobs"]).timeout(timeout));
    }
    let s = b.build().await.unwrap();
    let group = s.deadline_group_key("1");
    assert!((1..=n).all(|i| s.deadline_group_key(&i.to_string()) == group));
    assert_eq!(s.schedule().await.unwrap().started.len(), n);
    tokio::time::sleep(timeout + Duration::from_millis(100)).await;

    let mut m = Monitor::start(server.port, &url).await;
    let (r, lines) = m.lines(s.schedule()).await;
    let r = r.unwrap();
    assert_eq!(r.timed_out.len(), n, "{:?}", r.errors);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let per_call = slots_per_call(&lines, "sweep.lua");
    assert_eq!(per_call.iter().sum::<usize>(), n, "{per_call:?}");
    assert!(per_call.iter().all(|&k| k <= 100), "{per_call:?}");
    // Every slot is idle again and its entry gone from the group; the last call
    // settled the group's bound at the slots' reclaim time (the free leaves a bound as
    // it is): later than now, where an unsettled one would still be their past deadline.
    let mut conn = common::raw(&url).await;
    let left: usize = redis::cmd("HLEN")
        .arg(&group)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0);
    let bound: f64 = redis::cmd("ZSCORE")
        .arg(common::key(&name, "deadlines"))
        .arg(group.rsplit(':').next().unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    assert!(bound > (secs * 1000 + micros / 1000) as f64, "bound {bound}");
}

/// The number of slot keys in each call of the script `file` (after common.lua), in
/// the order MONITOR showed them.
fn slots_per_call(lines: &[String], file: &str) -> Vec<usize> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/lua/");
    let read = |file: &str| std::fs::read_to_string(format!("{dir}{file}")).unwrap();
    let script = redis::Script::new(&format!("{}\n{}", read("common.lua"), read(file)));
    lines
        .iter()
        .filter(|l| !l.contains(" lua]") && l.contains(&format!("\"{}\"", script.get_hash())))
        .map(|l| l.matches("}:slot:").count())
        .collect()
}

#[tokio::test]
/// `claim_chunk` and `sweep_chunk` set how many slots go in one claim call of a
/// batched fill and in one sweep (and free) call; every slot is still filled and swept
/// in one tick, whatever the sizes.
async fn chunk_sizes_set_the_slots_per_claim_and_sweep_call() {
    let Some(server) = PrivateRedis::start(&[]) else {
        eprintln!("skipped: no redis-server binary for a private server");
        return;
    };
    let url = server.url();
    let n = 10;
    let mut fake = Fake::with_tasks("Jobs", tasks("t", n));
    fake.batch = true;
    let timeout = Duration::from_millis(800);
    let mut b = Scheduler::builder(unique_name("chunks"))
        .redis_url(&url)
        .backend(fake.clone())
        .claim_chunk(4)
        .sweep_chunk(3);
    for i in 1..=n {
        b = b.slot(SlotConfig::new(i.to_string(), ["Jobs"]).timeout(timeout));
    }
    let s = b.build().await.unwrap();
    let mut m = Monitor::start(server.port, &url).await;

    let (r, lines) = m.lines(s.schedule()).await;
    let r = r.unwrap();
    assert_eq!(r.started.len(), n, "{:?}", r.errors);
    assert_eq!(slots_per_call(&lines, "claim.lua"), [4, 4, 2]);

    tokio::time::sleep(timeout + Duration::from_millis(100)).await;
    let (r, lines) = m.lines(s.schedule()).await;
    let r = r.unwrap();
    assert_eq!(r.timed_out.len(), n, "{:?}", r.errors);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(slots_per_call(&lines, "sweep.lua"), [3, 3, 3, 1]);
    assert_eq!(slots_per_call(&lines, "free.lua"), [3, 3, 3, 1]);
    assert_eq!(
        s.inspect()
            .await
            .unwrap()
            .slots
            .iter()
            .filter(|s| s.task_id.is_none())
            .count(),
        n
    );
}

#[tokio::test]
/// The largest chunks the builder takes (`MAX_CHUNK`) work: 1,000 slots filled in one
/// claim call, then swept in one sweep call and freed in one free call.
async fn the_largest_chunks_take_max_chunk_slots_per_call() {
    let Some(server) = PrivateRedis::start(&[]) else {
        eprintln!("skipped: no redis-server binary for a private server");
        return;
    };
    let url = server.url();
    let n = task_semaphore::MAX_CHUNK;
    let mut fake = Fake::with_tasks("Jobs", tasks("t", n));
    fake.batch = true;
    let timeout = Duration::from_millis(1500);
    let mut b = Scheduler::builder(unique_name("maxchunk"))
        .redis_url(&url)
        .backend(fake.clone())
        .claim_chunk(n)
        .sweep_chunk(n);
    for i in 1..=n {
        b = b.slot(SlotConfig::new(i.to_string(), ["Jobs"]).timeout(timeout));
    }
    let s = b.build().await.unwrap();
    let mut m = Monitor::start(server.port, &url).await;

    let (r, lines) = m.lines(s.schedule()).await;
    assert_eq!(r.unwrap().started.len(), n);
    assert_eq!(slots_per_call(&lines, "claim.lua"), [n]);

    tokio::time::sleep(timeout + Duration::from_millis(100)).await;
    let (r, lines) = m.lines(s.schedule()).await;
    let r = r.unwrap();
    assert_eq!(r.timed_out.len(), n, "{:?}", r.errors);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(slots_per_call(&lines, "sweep.lua"), [n]);
    assert_eq!(slots_per_call(&lines, "free.lua"), [n]);
}

/// Connections the server has accepted (`INFO stats`).
async fn connections_received(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    common::info_number(conn, "stats", "total_connections_received:").await
}

#[tokio::test]
/// A scheduler and its clones send every request over one connection, shared by
/// concurrent callers: a build, a fill of 1,000 slots, 1,000 keepalives and 200 stops
/// from 32 callers at once, and 10 ticks open exactly one connection to Redis.
async fn one_connection_serves_every_call() {
    let Some(server) = PrivateRedis::start(&[]) else {
        return;
    };
    let url = server.url();
    let mut conn = common::raw(&url).await;
    let before = connections_received(&mut conn).await;
    let name = unique_name("oneconn");
    let mut fake = Fake::with_tasks("Jobs", tasks("t", N + 200));
    fake.batch = true;
    let s = build(&url, &name, &fake, Duration::from_secs(3600)).await;
    assert_eq!(s.schedule().await.unwrap().started.len(), N);
    // 32 callers at once, each over its share of the tasks; each stop refills its slot.
    let callers = (0..32).map(|w| {
        let s = s.clone();
        async move {
            for i in (w..N).step_by(32) {
                s.keepalive(&format!("t{i}")).await.unwrap();
            }
            for i in (w..200).step_by(32) {
                s.stop(&format!("t{i}")).await.unwrap();
            }
        }
    });
    futures::future::join_all(callers).await;
    for _ in 0..10 {
        assert!(s.schedule().await.unwrap().errors.is_empty());
    }
    assert_eq!(fake.ledger().running.len(), N);
    let after = connections_received(&mut conn).await;
    assert_eq!(after - before, 1, "connections opened by the scheduler");
}
