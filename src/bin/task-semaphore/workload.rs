//! `task-semaphore workload`: one fixed piece of scheduler work against a Redis, for
//! counting what the scripts cost inside Redis (`make script-cost` runs it against a
//! redis-server under callgrind, where instruction counts repeat within about 1%).

use std::time::{Duration, Instant};

use task_semaphore::{Scheduler, SlotConfig};

use crate::bench::Endless;
use crate::redis_server::ThrowawayRedis;
use crate::{error_chain, number, parse_flags};

/// Reads `--slots N [--poll-many] [--keepalive] [--stop] [--sweep]`, then: build a
/// scheduler of N slots, fill them (slot by slot, or with `poll_many`), with
/// `--keepalive` send one keepalive per task, with `--stop` stop each task (each stop
/// refills its slot), and with `--sweep` let every slot expire and run the tick that
/// sweeps and refills them. Prints each step's time.
pub(crate) async fn workload(args: &[String]) -> Result<(), String> {
    let flags = parse_flags(args, &["poll-many", "keepalive", "stop", "sweep"])?;
    if let Some(unknown) = flags
        .keys()
        .find(|k| !["slots", "poll-many", "keepalive", "stop", "sweep"].contains(&k.as_str()))
    {
        return Err(format!("workload has no option --{unknown}"));
    }
    let n = number(&flags, "slots", 1000, 1_000_000)?;
    let batch = flags.contains_key("poll-many");
    let (url, _own) = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let server = ThrowawayRedis::start().await?;
            (server.url(), Some(server))
        }
    };
    let fail = |e: task_semaphore::Error| error_chain(&e);
    // Short enough to wait for with --sweep; without it, long enough for the
    // keepalives to come before the deadlines even under callgrind.
    let timeout = if flags.contains_key("sweep") {
        Duration::from_secs(1) + Duration::from_micros(200 * n as u64)
    } else {
        Duration::from_secs(3600)
    };
    let name = format!("workload-{}", std::process::id());
    // The bench's endless backlog: a new task id at every poll.
    let feed = if batch {
        Endless::batching("Feed".to_owned())
    } else {
        Endless::new("Feed".to_owned()).0
    };
    let mut builder = Scheduler::builder(name).redis_url(url).backend(feed);
    for i in 1..=n {
        builder = builder.slot(SlotConfig::new(i.to_string(), ["Feed"]).timeout(timeout));
    }
    let t = Instant::now();
    let scheduler = builder.build().await.map_err(fail)?;
    println!("build of {n} slots: {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);
    let t = Instant::now();
    let filled = scheduler.schedule().await.map_err(fail)?;
    println!(
        "fill ({}): {} started, {:.1} ms",
        if batch { "poll_many" } else { "slot by slot" },
        filled.started.len(),
        t.elapsed().as_secs_f64() * 1000.0
    );
    if flags.contains_key("keepalive") {
        let t = Instant::now();
        for held in &filled.started {
            scheduler.keepalive(&held.task_id).await.map_err(fail)?;
        }
        println!(
            "keepalive: {} tasks one by one, {:.1} ms",
            filled.started.len(),
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
    if flags.contains_key("stop") {
        let t = Instant::now();
        let mut refilled = 0;
        for held in &filled.started {
            let report = scheduler.stop_and_report(&held.task_id).await.map_err(fail)?;
            refilled += report.started.len();
        }
        println!(
            "stop: {} tasks one by one, {refilled} slots refilled, {:.1} ms",
            filled.started.len(),
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
    if flags.contains_key("sweep") {
        tokio::time::sleep(timeout + Duration::from_millis(100)).await;
        let t = Instant::now();
        let swept = scheduler.schedule().await.map_err(fail)?;
        println!(
            "sweep + refill: {} timed out, {} started, {:.1} ms",
            swept.timed_out.len(),
            swept.started.len(),
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
    Ok(())
}
