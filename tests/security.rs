//! Security (issue 3, part 6): `rediss://` against a redis-server with a certificate
//! the test makes itself, and the README's least-privilege ACL users (the scheduler's
//! and the read-only operator's) run verbatim on private servers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tls::{TestPki, TlsRedis};
use common::{builder, holders, key, raw, unique_name, Fake, PrivateRedis};
use redis::aio::MultiplexedConnection;
use redis::Value;
use task_semaphore::{inspect_redis, Error, Scheduler, SchedulerBuilder, SlotConfig, DEFAULT_KEY_PREFIX};

const LONG: Duration = Duration::from_secs(3600);

/// An error and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Asserts that Redis refused `res` for lack of permission.
#[track_caller]
fn assert_noperm<T: std::fmt::Debug>(res: redis::RedisResult<T>, what: &str) {
    match res {
        // A command refused inside a script is a script error with its own wording.
        Err(e)
            if ["NOPERM", "no permissions", "user executing the script can't"]
                .iter()
                .any(|m| e.to_string().contains(m)) => {}
        other => panic!("{what}: expected NOPERM, got {other:?}"),
    }
}

/// A scheduler builder that only names slots "1".."n" over `fake`; the caller adds Redis.
fn slots_only(name: &str, fake: &Fake, n: usize, timeout: Duration) -> SchedulerBuilder {
    let mut b = Scheduler::builder(name).backend(fake.clone());
    for i in 1..=n {
        b = b.slot(SlotConfig::new(i.to_string(), [fake.name.clone()]).timeout(timeout));
    }
    b
}

// ---------------------------------------------------------------- TLS

#[tokio::test]
/// Over `rediss://` with the test's own CA: build, schedule, keepalive, stop (and its
/// refill), inspect, and the operator's CLI trusting the CA through `SSL_CERT_FILE`.
async fn tls_scheduler_runs_its_full_life() {
    let pki = TestPki::new();
    let Some(redis) = TlsRedis::start(&pki, &[]) else {
        return;
    };
    let name = unique_name("tls-life");
    let fake = Fake::with_tasks("Jobs", common::tasks("tls-", 3));
    // Both names the certificate carries: a host name and an IP address.
    for (host, replica) in [("localhost", "a"), ("127.0.0.1", "b")] {
        let s = slots_only(&name, &fake, 2, LONG)
            .redis_url(redis.tls_url(host))
            .tls_root_cert(pki.ca_pem.as_bytes())
            .build()
            .await
            .unwrap_or_else(|e| panic!("build over {host} (replica {replica}): {}", chain(&e)));
        if replica == "a" {
            let report = s.schedule().await.unwrap();
            assert_eq!(report.started.len(), 2, "{report:?}");
            s.keepalive("tls-0").await.unwrap();
            s.stop("tls-0").await.unwrap();
        } else {
            // A second replica: keepalive through the index, then inspect.
            s.keepalive("tls-2").await.unwrap();
            let held: BTreeSet<_> = holders(&s).await.into_values().flatten().collect();
            assert_eq!(held, BTreeSet::from(["tls-1".to_owned(), "tls-2".to_owned()]));
        }
    }
    assert_eq!(fake.ledger().count("stop", "tls-0"), 1);

    // The operator's CLI over TLS: no flag needed, the system trust store honours
    // SSL_CERT_FILE.
    let out = Command::new(env!("CARGO_BIN_EXE_task-semaphore"))
        .args(["inspect", "--json", "--name", &name, "--redis-url"])
        .arg(redis.tls_url("localhost"))
        .env("SSL_CERT_FILE", pki.dir.join("ca.crt"))
        .env_remove("SSL_CERT_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tasks: BTreeSet<_> = json["slots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["task_id"].as_str())
        .collect();
    assert_eq!(tasks, BTreeSet::from(["tls-1", "tls-2"]));
}

#[tokio::test]
/// A client that does not trust the server's certificate, or speaks the wrong
/// protocol, fails at build with an error that says so, in well under redis_timeout.
async fn tls_untrusted_or_mismatched_connections_fail_fast_and_clearly() {
    let pki = TestPki::new();
    // Also on 127.0.0.2, a name the certificate does not carry.
    let Some(redis) = TlsRedis::start(&pki, &["--bind", "127.0.0.1", "127.0.0.2"]) else {
        return;
    };
    let other_ca = TestPki::new();
    let fake = Fake::new("Jobs");
    let timeout = Duration::from_secs(5);
    let plain_to_tls = format!("redis://127.0.0.1:{}", redis.tls_port);
    let cases = [
        (
            "another CA",
            redis.tls_url("localhost"),
            Some(&other_ca.ca_pem),
            "BadSignature",
        ),
        (
            "system roots only",
            redis.tls_url("localhost"),
            None,
            "UnknownIssuer",
        ),
        (
            "a name the certificate does not carry",
            redis.tls_url("127.0.0.2"),
            Some(&pki.ca_pem),
            "not valid for name",
        ),
        ("plain redis:// to the TLS port", plain_to_tls, None, "reset"),
    ];
    for (what, url, ca, must_say) in cases {
        let mut b = slots_only(&unique_name("tls-bad"), &fake, 1, LONG)
            .redis_timeout(timeout)
            .redis_url(url);
        if let Some(ca) = ca {
            b = b.tls_root_cert(ca.as_bytes());
        }
        let started = Instant::now();
        let err = b.build().await.expect_err(what);
        let text = chain(&err);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{what}: took {:?}: {text}",
            started.elapsed()
        );
        assert!(!matches!(err, Error::Timeout { .. }), "{what}: {text}");
        assert!(text.contains(must_say), "{what}: {text}");
        eprintln!("{what}: {text}");
    }

    // TLS to the plain port: the server waits for a command line that never comes, so
    // this one is bounded by redis_timeout, not quick.
    let started = Instant::now();
    let err = slots_only(&unique_name("tls-bad"), &fake, 1, LONG)
        .redis_timeout(Duration::from_millis(500))
        .redis_url(format!("rediss://127.0.0.1:{}", redis.server.port))
        .tls_root_cert(pki.ca_pem.clone())
        .build()
        .await
        .expect_err("rediss:// to the plain port");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    eprintln!("rediss:// to the plain port: {}", chain(&err));
    assert!(matches!(err, Error::Timeout { .. }), "{}", chain(&err));

    // Mistakes in the TLS settings are configuration errors, before any connection.
    let url = redis.tls_url("localhost");
    for (what, b) in [
        (
            "a CA with a redis:// url",
            Scheduler::builder("x")
                .redis_url(redis.server.url())
                .tls_root_cert(pki.ca_pem.clone()),
        ),
        (
            "not PEM",
            Scheduler::builder("x")
                .redis_url(url.clone())
                .tls_root_cert("not a certificate"),
        ),
        (
            "a broken certificate",
            Scheduler::builder("x").redis_url(url.clone()).tls_root_cert(
                "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
            ),
        ),
        (
            "#insecure",
            Scheduler::builder("x").redis_url(format!("{url}/#insecure")),
        ),
        (
            "a CA with redis_pool",
            Scheduler::builder("x")
                .redis_pool(
                    task_semaphore::deadpool_redis::Config::from_url(url.clone())
                        .create_pool(Some(task_semaphore::deadpool_redis::Runtime::Tokio1))
                        .unwrap(),
                )
                .tls_root_cert(pki.ca_pem.clone()),
        ),
    ] {
        let b = b.backend(fake.clone()).slot(SlotConfig::new("1", ["Jobs"]));
        match b.build().await {
            Err(Error::Config(msg)) => eprintln!("{what}: {msg}"),
            other => panic!("{what}: expected Error::Config, got {other:?}"),
        }
    }
}

#[tokio::test]
/// Mutual TLS, as the README shows it: a pool from `Client::build_with_tls` with a
/// client certificate, given to `redis_pool`. Without the certificate the server
/// refuses the connection.
async fn tls_client_certificate_through_redis_pool() {
    use task_semaphore::deadpool_redis::{Manager, Pool};
    let pki = TestPki::new();
    let Some(redis) = TlsRedis::start(&pki, &["--tls-auth-clients", "yes"]) else {
        return;
    };
    let fake = Fake::with_tasks("Jobs", ["mtls-0"]);
    let pool = |client_tls: Option<redis::ClientTlsConfig>| {
        let certificates = redis::TlsCertificates {
            client_tls,
            root_cert: Some(pki.ca_pem.clone().into_bytes()),
        };
        let client = redis::Client::build_with_tls(redis.tls_url("localhost"), certificates).unwrap();
        Pool::builder(Manager::new(client.get_connection_info().clone()).unwrap())
            .build()
            .unwrap()
    };

    let started = Instant::now();
    let err = slots_only(&unique_name("mtls-none"), &fake, 1, LONG)
        .redis_pool(pool(None))
        .build()
        .await
        .expect_err("no client certificate");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    eprintln!("no client certificate: {}", chain(&err));

    let s = slots_only(&unique_name("mtls"), &fake, 1, LONG)
        .redis_pool(pool(Some(redis::ClientTlsConfig {
            client_cert: pki.client_cert_pem.clone().into_bytes(),
            client_key: pki.client_key_pem.clone().into_bytes(),
        })))
        .build()
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(s.schedule().await.unwrap().started.len(), 1);
    s.stop("mtls-0").await.unwrap();
}

// ---------------------------------------------------------------- ACL

/// The `ACL SETUSER` lines of the README's Security section, for scheduler `name`.
fn readme_acl_lines(name: &str) -> (Vec<String>, Vec<String>) {
    let readme = include_str!("../README.md");
    let section = readme
        .split("\n## Security\n")
        .nth(1)
        .expect("README has a Security section")
        .split("\n## ")
        .next()
        .unwrap();
    let lines: Vec<&str> = section
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("ACL SETUSER "))
        .collect();
    let find = |user: &str| -> Vec<String> {
        let line = lines
            .iter()
            .find(|l| l.split_whitespace().nth(2) == Some(user))
            .unwrap_or_else(|| panic!("README has no ACL SETUSER line for {user}"));
        line.replace("{reports}", &format!("{{{name}}}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    (find("ts-reports"), find("ts-operator"))
}

async fn run_words(conn: &mut MultiplexedConnection, words: &[String]) {
    let mut cmd = redis::cmd(&words[0]);
    for w in &words[1..] {
        cmd.arg(w);
    }
    let () = cmd.query_async(conn).await.unwrap();
}

fn user_url(server: &PrivateRedis, user: &str) -> String {
    format!("redis://{user}:CHANGE-ME@127.0.0.1:{}", server.port)
}

/// What a user had refused, from the admin's `ACL LOG`: the command (or key) names.
async fn acl_denials(admin: &mut MultiplexedConnection, user: &str) -> BTreeSet<String> {
    let entries: Vec<Value> = redis::cmd("ACL")
        .arg("LOG")
        .arg(1000)
        .query_async(admin)
        .await
        .unwrap();
    let mut denied = BTreeSet::new();
    for entry in entries {
        let fields: std::collections::HashMap<String, Value> = redis::from_redis_value(entry).unwrap();
        let text = |k: &str| redis::from_redis_value::<String>(fields[k].clone()).unwrap();
        if text("username") == user {
            denied.insert(format!("{} {}", text("reason"), text("object")));
        }
    }
    denied
}

/// Counts events at ERROR level (the only level an operator must act on).
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Errors {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() == tracing::Level::ERROR
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::Id {
        tracing::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::Id, _: &tracing::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        self.0.lock().unwrap().push(format!("{event:?}"));
    }
    fn enter(&self, _: &tracing::Id) {}
    fn exit(&self, _: &tracing::Id) {}
}

#[tokio::test]
/// The README's scheduler user (its keys and the commands the library needs, nothing
/// else) runs the whole life, including recovery after the admin flushes the script
/// cache, and is refused any other command and any other scheduler's keys.
async fn acl_least_privilege_scheduler_user_runs_the_full_life() {
    let Some(server) = PrivateRedis::start(&[]) else {
        return;
    };
    let mut admin = raw(&server.url()).await;
    let name = unique_name("acl");
    let (scheduler_user, _) = readme_acl_lines(&name);
    run_words(&mut admin, &scheduler_user).await;
    let url = user_url(&server, "ts-reports");

    let fake = Fake::with_tasks("Jobs", common::tasks("t", 6));
    // Slot 1 never times out here; slot 2 does, to run the sweep.
    let config = |b: SchedulerBuilder| {
        b.backend(fake.clone())
            .slot(SlotConfig::new("1", ["Jobs"]).timeout(LONG))
            .slot(SlotConfig::new("2", ["Jobs"]).timeout(Duration::from_millis(300)))
            .redis_url(url.clone())
    };
    // CONFIG GET (the eviction check at build) is denied: build goes on, and says
    // nothing at ERROR level.
    let errors = Errors::default();
    let a = {
        let _guard = tracing::subscriber::set_default(errors.clone());
        config(Scheduler::builder(&name)).build().await.unwrap()
    };
    assert!(
        errors.0.lock().unwrap().is_empty(),
        "{:?}",
        errors.0.lock().unwrap()
    );
    let b = config(Scheduler::builder(&name)).build().await.unwrap();

    let report = a.schedule().await.unwrap();
    assert_eq!(report.started.len(), 2, "{report:?}");
    a.keepalive("t0").await.unwrap(); // the replica that started it
    b.keepalive("t0").await.unwrap(); // another replica: through the tasks index
    a.stop("t0").await.unwrap(); // refills slot 1 with t2
    assert_eq!(
        holders(&a).await.get("1").cloned().flatten().as_deref(),
        Some("t2")
    );

    // The admin flushes the script cache: EVALSHA gets NOSCRIPT, SCRIPT LOAD reloads.
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    b.keepalive("t2").await.unwrap();
    b.stop("t2").await.unwrap(); // refills slot 1 with t3
    tokio::time::sleep(Duration::from_millis(400)).await; // t1 in slot 2 expires
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    let report = a.schedule().await.unwrap();
    let timed_out: Vec<_> = report.timed_out.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(timed_out, ["t1"], "{report:?}");
    assert_eq!(report.started.len(), 1, "{report:?}"); // t4 in slot 2
    assert!(report.errors.is_empty(), "{report:?}");
    let inspection = inspect_redis(&url, DEFAULT_KEY_PREFIX, &name).await.unwrap();
    let held: BTreeSet<_> = inspection
        .slots
        .iter()
        .filter_map(|s| s.task_id.clone())
        .collect();
    assert_eq!(held, BTreeSet::from(["t3".to_owned(), "t4".to_owned()]));
    {
        let l = fake.ledger();
        assert_eq!((l.count("stop", "t0"), l.count("stop", "t2")), (1, 1));
        assert_eq!((l.count("timeout", "t1"), l.count("stop", "t1")), (1, 1));
    }

    // All the user was refused in that whole life: the optional eviction check.
    let denied = acl_denials(&mut admin, "ts-reports").await;
    assert_eq!(
        denied,
        BTreeSet::from(["command config|get".to_owned()]),
        "{denied:?}"
    );

    // Anything else is refused.
    let mut user = raw(&url).await;
    let own = key(&name, "lease");
    let foreign = key(&format!("{name}-other"), "lease");
    for (what, cmd) in [
        ("a command outside the list", redis::cmd("DEL").arg(&own).clone()),
        ("FLUSHALL", redis::cmd("FLUSHALL").clone()),
        ("KEYS", redis::cmd("KEYS").arg("*").clone()),
        ("another scheduler's key", redis::cmd("GET").arg(&foreign).clone()),
        (
            "a key outside the prefix",
            redis::cmd("GET").arg("some:other:key").clone(),
        ),
        (
            "a script calling a command outside the list",
            redis::cmd("EVAL")
                .arg("return redis.call('DEL', KEYS[1])")
                .arg(1)
                .arg(&own)
                .clone(),
        ),
        (
            "a script touching another scheduler's key",
            redis::cmd("EVAL")
                .arg("return redis.call('GET', KEYS[1])")
                .arg(1)
                .arg(&foreign)
                .clone(),
        ),
        ("SCRIPT FLUSH", redis::cmd("SCRIPT").arg("FLUSH").clone()),
    ] {
        assert_noperm(cmd.query_async::<Value>(&mut user).await, what);
    }
    // A scheduler of another name cannot even register its slots.
    let err = slots_only(&format!("{name}-other"), &fake, 1, LONG)
        .redis_url(url.clone())
        .build()
        .await
        .expect_err("another scheduler's keys");
    assert!(chain(&err).contains("no permissions"), "{}", chain(&err));
}

#[tokio::test]
/// The README's operator user reads every scheduler's keys (redis-cli, inspect_redis,
/// the CLI) and cannot write anything.
async fn acl_read_only_operator_inspects_and_cannot_write() {
    let Some(server) = PrivateRedis::start(&[]) else {
        return;
    };
    let mut admin = raw(&server.url()).await;
    let name = unique_name("operator");
    let fake = Fake::with_tasks("Jobs", ["job-a", "job-b"]);
    let s = builder(&name, &fake, 3, LONG)
        .redis_url(server.url())
        .build()
        .await
        .unwrap();
    s.schedule().await.unwrap();
    let (_, operator) = readme_acl_lines(&name);
    run_words(&mut admin, &operator).await;
    let url = user_url(&server, "ts-operator");

    let inspection = inspect_redis(&url, DEFAULT_KEY_PREFIX, &name).await.unwrap();
    let held: BTreeSet<_> = inspection
        .slots
        .iter()
        .filter_map(|s| s.task_id.clone())
        .collect();
    assert_eq!(held, BTreeSet::from(["job-a".to_owned(), "job-b".to_owned()]));
    assert_eq!(inspection.slots.len(), 3);
    assert!(inspection.last_lease >= 2);

    let out = Command::new(env!("CARGO_BIN_EXE_task-semaphore"))
        .args(["inspect", "--name", &name, "--redis-url", &url])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("job-a") && table.contains("job-b"), "{table}");

    // What the README's operator types.
    let mut op = raw(&url).await;
    let (_, keys): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(key(&name, "*"))
        .arg("COUNT")
        .arg(1000)
        .query_async(&mut op)
        .await
        .unwrap();
    assert!(keys.contains(&key(&name, "slot:1")), "{keys:?}");
    let slot: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(key(&name, "slot:1"))
        .query_async(&mut op)
        .await
        .unwrap();
    assert!(slot.contains_key("task"), "{slot:?}");
    let _: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(key(&name, "deadlines"))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut op)
        .await
        .unwrap();
    let at: Option<String> = redis::cmd("HGET")
        .arg(s.task_index_key("job-a"))
        .arg("job-a")
        .query_async(&mut op)
        .await
        .unwrap();
    assert!(at.is_some());
    let idle: Vec<String> = redis::cmd("SMEMBERS")
        .arg(key(&name, "idle"))
        .query_async(&mut op)
        .await
        .unwrap();
    assert_eq!(idle, ["3"]);

    // Every write is refused, and so is running the scheduler as this user.
    let before = inspect_redis(&server.url(), DEFAULT_KEY_PREFIX, &name)
        .await
        .unwrap();
    for (what, cmd) in [
        (
            "HSET",
            redis::cmd("HSET")
                .arg(key(&name, "slot:1"))
                .arg("task")
                .arg("other")
                .clone(),
        ),
        ("DEL", redis::cmd("DEL").arg(s.task_index_key("job-a")).clone()),
        ("SET", redis::cmd("SET").arg(key(&name, "lease")).arg(0).clone()),
        ("EVAL", redis::cmd("EVAL").arg("return 1").arg(0).clone()),
        (
            "SCRIPT LOAD",
            redis::cmd("SCRIPT").arg("LOAD").arg("return 1").clone(),
        ),
        ("SCRIPT FLUSH", redis::cmd("SCRIPT").arg("FLUSH").clone()),
        ("FLUSHALL", redis::cmd("FLUSHALL").clone()),
        (
            "CONFIG SET",
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("appendonly")
                .arg("no")
                .clone(),
        ),
        ("KEYS", redis::cmd("KEYS").arg("*").clone()),
        (
            "a key outside the prefix",
            redis::cmd("GET").arg("some:other:key").clone(),
        ),
    ] {
        assert_noperm(cmd.query_async::<Value>(&mut op).await, what);
    }
    let err = builder(&name, &fake, 3, LONG)
        .redis_url(url.clone())
        .build()
        .await
        .expect_err("a scheduler as the operator");
    assert!(chain(&err).contains("no permissions"), "{}", chain(&err));
    let after = inspect_redis(&server.url(), DEFAULT_KEY_PREFIX, &name)
        .await
        .unwrap();
    assert_eq!(before.slots, after.slots);
    assert_eq!(before.last_lease, after.last_lease);
}
