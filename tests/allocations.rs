//! Heap allocations per operation, counted exactly by a counting global allocator
//! (`stats_alloc`, in this test binary only): keepalive, stop and a steady tick
//! allocate the same whatever the slot count (about 44, 192 and 38 times in a debug
//! build), so no operation allocates per slot.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::alloc::System;
use std::time::Duration;

use common::{builder, tasks, unique_name, Fake};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

// Counts every allocation of the process. This binary holds one test, and its
// current-thread runtime runs the scheduler and its connection's driver on one
// thread: the counts are the operations' own.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations (and reallocations) made while `op` runs `ops` times, per run.
async fn per_op<F: std::future::Future<Output = ()>>(ops: usize, mut op: impl FnMut(usize) -> F) -> f64 {
    let region = Region::new(GLOBAL);
    for i in 0..ops {
        op(i).await;
    }
    let change = region.change();
    (change.allocations + change.reallocations) as f64 / ops as f64
}

/// Allocations per keepalive, per stop (with its refill) and per steady tick, on a
/// scheduler of `n` busy slots, averaged over `ops` operations each.
async fn per_operation(n: usize, ops: usize) -> (f64, f64, f64) {
    let name = unique_name("alloc");
    let mut fake = Fake::with_tasks("Jobs", tasks("t", n + ops));
    fake.batch = true;
    let s = builder(&name, &fake, n, Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    assert_eq!(s.schedule().await.unwrap().started.len(), n);
    let ids: Vec<String> = tasks("t", n);
    // Warm: the first calls of each kind load what later ones reuse.
    s.keepalive(&ids[0]).await.unwrap();
    s.schedule().await.unwrap();

    let keepalive = per_op(ops, |i| {
        let (s, id) = (&s, &ids[i % n]);
        async move { s.keepalive(id).await.unwrap() }
    })
    .await;
    let tick = per_op(ops, |_| {
        let s = &s;
        async move { assert!(s.schedule().await.unwrap().started.is_empty()) }
    })
    .await;
    let stop = per_op(ops, |i| {
        let (s, id) = (&s, &ids[i]);
        async move { s.stop(id).await.unwrap() }
    })
    .await;
    assert_eq!(fake.ledger().running.len(), n);
    (keepalive, stop, tick)
}

#[tokio::test]
/// A keepalive, a stop and a steady tick allocate as often with 1,000 busy slots as
/// with 10 (nothing per slot), and a keepalive at most 100 times.
async fn allocations_per_operation_do_not_grow_with_the_slot_count() {
    let small = per_operation(10, 10).await;
    let big = per_operation(1000, 200).await;
    println!("allocations per keepalive, stop, steady tick: 10 slots {small:?}, 1,000 slots {big:?}");
    // The same at both sizes, to within a few (a hash map that grows, a longer id).
    for (what, a, b) in [
        ("keepalive", small.0, big.0),
        ("stop", small.1, big.1),
        ("tick", small.2, big.2),
    ] {
        assert!(
            (a - b).abs() <= 5.0,
            "{what}: {a} allocations with 10 slots, {b} with 1,000"
        );
    }
    assert!(big.0 <= 100.0, "a keepalive allocates {} times", big.0);
}
