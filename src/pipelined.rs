//! Script calls kept in flight while their results are handled: the one place that
//! decides how far the chunked sweep and claim calls run ahead.
//!
//! Redis runs one command at a time, so a chunked job is fastest when Redis always
//! has a call queued: with one call ahead that went out only once the previous
//! result was handled, Redis sat idle for a round trip (and the client's parsing) at
//! every chunk.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

// Tokio's clock, which the tests pause.
use tokio::time::Instant;

/// How many calls are in Redis's queue at once (sent, no reply yet). Two cover the
/// round trip between a reply and the next request.
const IN_FLIGHT: usize = 2;
/// How many more results may wait for their turn while the results are handled
/// quickly (see [`SEND_WHILE`]).
const WAITING: usize = 2;

/// How long the handling of a result may take and still count as quick. A call sent
/// ahead claims slots or marks them stopping, so their clocks (deadline, `reclaim`)
/// start before their callbacks run: with slow callbacks (a sweep chunk's
/// `stop_callback`s taking seconds), calls sent far ahead would start them long
/// before (and a stopping slot is reclaimed by another replica once its `reclaim`
/// passes). So new calls go out during a handling only in its first `SEND_WHILE`,
/// and [`WAITING`] more results may wait only after a quick handling: once the
/// handling is slow, at most [`IN_FLIGHT`] calls run ahead of it.
const SEND_WHILE: Duration = Duration::from_millis(10);

/// A call in flight, or its result once it came.
enum InFlight<F: Future> {
    Running(Pin<Box<F>>),
    Done(Option<F::Output>),
}

/// The calls of a chunked job, sent in order and taken in order: `next` gives each
/// item with its call's result, and `alongside` runs the caller's handling of it while the calls
/// keep going (and the next ones go out).
pub(crate) struct Pipelined<'a, I, F: Future, C> {
    items: &'a [I],
    call: C,
    sent: usize,
    /// Results taken so far (the item of the front call is `items[taken]`).
    taken: usize,
    calls: VecDeque<InFlight<F>>,
    /// Whether the last handling was quick (none was yet: not).
    quick: bool,
}

impl<'a, I, F: Future, C: Fn(&'a I) -> F> Pipelined<'a, I, F, C> {
    /// `call(item)` for every item, in order; nothing is sent before the first `next`.
    pub(crate) fn new(items: &'a [I], call: C) -> Self {
        Pipelined {
            items,
            call,
            sent: 0,
            taken: 0,
            calls: VecDeque::with_capacity(IN_FLIGHT + WAITING),
            quick: false,
        }
    }

    /// The next item and its call's result, in item order, once it came; None after
    /// the last.
    pub(crate) async fn next(&mut self) -> Option<(&'a I, F::Output)> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Runs `work` (the handling of a result) while the calls go on; the next calls
    /// go out meanwhile during its first [`SEND_WHILE`] only.
    pub(crate) async fn alongside<T>(&mut self, work: impl Future<Output = T>) -> T {
        let mut work = pin!(work);
        let since = Instant::now();
        let out = poll_fn(|cx| {
            self.pump(cx, since.elapsed() < SEND_WHILE);
            work.as_mut().poll(cx)
        })
        .await;
        self.quick = since.elapsed() < SEND_WHILE;
        out
    }

    /// Drives every call, and (if `send`) sends the next ones while fewer than
    /// [`IN_FLIGHT`] wait for a reply, and fewer than [`IN_FLIGHT`] (+ [`WAITING`]
    /// after a quick handling) for their turn.
    fn pump(&mut self, cx: &mut Context<'_>, send: bool) {
        let mut running = 0;
        for c in self.calls.iter_mut() {
            if let InFlight::Running(f) = c {
                match f.as_mut().poll(cx) {
                    Poll::Ready(out) => *c = InFlight::Done(Some(out)),
                    Poll::Pending => running += 1,
                }
            }
        }
        let room = if self.quick {
            IN_FLIGHT + WAITING
        } else {
            IN_FLIGHT
        };
        while send && running < IN_FLIGHT && self.calls.len() < room && self.sent < self.items.len() {
            let mut f = Box::pin((self.call)(&self.items[self.sent]));
            self.sent += 1;
            // Polled at once, so that its request goes out now.
            match f.as_mut().poll(cx) {
                Poll::Ready(out) => self.calls.push_back(InFlight::Done(Some(out))),
                Poll::Pending => {
                    self.calls.push_back(InFlight::Running(f));
                    running += 1;
                }
            }
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<(&'a I, F::Output)>> {
        self.pump(cx, true);
        match self.calls.front_mut() {
            None => Poll::Ready(None),
            Some(InFlight::Running(_)) => Poll::Pending,
            Some(InFlight::Done(out)) => {
                let out = out.take();
                self.calls.pop_front();
                let item = &self.items[self.taken];
                self.taken += 1;
                // Its place is free: the next call goes out at once.
                self.pump(cx, true);
                Poll::Ready(out.map(|out| (item, out)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the calls sent and the calls waiting for their reply.
    #[derive(Default)]
    struct Calls {
        sent: AtomicUsize,
        running: AtomicUsize,
        most_running: AtomicUsize,
    }

    impl Calls {
        /// A call that gives `item * 10` after `took` (a moment when zero); item 13
        /// fails.
        async fn call(&self, item: &usize, took: Duration) -> Result<usize, String> {
            self.sent.fetch_add(1, Ordering::SeqCst);
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_running.fetch_max(now, Ordering::SeqCst);
            if took.is_zero() {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(took).await;
            }
            self.running.fetch_sub(1, Ordering::SeqCst);
            if *item == 13 {
                return Err("call 13 failed".into());
            }
            Ok(item * 10)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn results_come_in_order_with_a_few_calls_in_flight() {
        let calls = Calls::default();
        let items: Vec<usize> = (0..12).collect();
        let mut p = Pipelined::new(&items, |i| calls.call(i, Duration::from_millis(2)));
        let mut got = Vec::new();
        while let Some((item, r)) = p.next().await {
            let r = r.unwrap();
            // Each result comes with its own item.
            assert_eq!(r, item * 10);
            got.push(r);
        }
        assert_eq!(got, (0..12).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(calls.most_running.load(Ordering::SeqCst), IN_FLIGHT);
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_calls_go_out_while_a_result_is_handled() {
        let calls = Calls::default();
        let items: Vec<usize> = (0..20).collect();
        let mut p = Pipelined::new(&items, |i| calls.call(i, Duration::ZERO));
        assert_eq!(p.next().await.map(|(_, r)| r), Some(Ok(0)));
        p.alongside(async {}).await;
        assert_eq!(p.next().await.map(|(_, r)| r), Some(Ok(10)));
        // After a quick handling, while item 1 is handled the calls go on: each that
        // returns makes room for the next, up to IN_FLIGHT + WAITING results not yet
        // taken, all sent in the handling's first SEND_WHILE.
        let seen = p
            .alongside(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                calls.sent.load(Ordering::SeqCst)
            })
            .await;
        assert_eq!(seen, 2 + IN_FLIGHT + WAITING);
        for want in 2..2 + IN_FLIGHT + WAITING {
            assert_eq!(p.next().await.map(|(_, r)| r), Some(Ok(want * 10)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slow_handling_sends_no_more_calls() {
        let calls = Calls::default();
        let items: Vec<usize> = (0..20).collect();
        // Item 0 at once, the others after 30 ms (paused time: exactly).
        let took = |i: &usize| Duration::from_millis(if *i == 0 { 0 } else { 30 });
        let mut p = Pipelined::new(&items, |i| calls.call(i, took(i)));
        assert_eq!(p.next().await.map(|(_, r)| r), Some(Ok(0)));
        p.alongside(async {}).await;
        // Items 1 and 2 return at 30 ms; 3 and 4 go out then, and return at 60 ms.
        assert_eq!(p.next().await.map(|(_, r)| r), Some(Ok(10)));
        assert_eq!(calls.sent.load(Ordering::SeqCst), 5);
        // A slow handling: 3 and 4 return during it, past its first SEND_WHILE, so
        // nothing more goes out.
        p.alongside(tokio::time::sleep(Duration::from_millis(100))).await;
        assert_eq!(calls.sent.load(Ordering::SeqCst), 5);
        // After it, only IN_FLIGHT run ahead of the handling: 2 is taken, 3 and 4
        // wait, and no call goes out.
        assert_eq!(p.next().await.map(|(_, r)| r), Some(Ok(20)));
        assert_eq!(calls.sent.load(Ordering::SeqCst), 5);
        assert_eq!(p.next().await.map(|(_, r)| r), Some(Ok(30)));
        assert_eq!(calls.sent.load(Ordering::SeqCst), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_handling_from_the_start_has_only_in_flight_calls_ahead() {
        let calls = Calls::default();
        let items: Vec<usize> = (0..20).collect();
        let mut p = Pipelined::new(&items, |i| calls.call(i, Duration::ZERO));
        assert_eq!(p.next().await.map(|(_, r)| r), Some(Ok(0)));
        p.alongside(tokio::time::sleep(Duration::from_millis(50))).await;
        assert_eq!(calls.sent.load(Ordering::SeqCst), 1 + IN_FLIGHT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_call_is_given_in_its_turn() {
        let calls = Calls::default();
        let items: Vec<usize> = (10..20).collect();
        let mut p = Pipelined::new(&items, |i| calls.call(i, Duration::from_millis(2)));
        let mut got = Vec::new();
        while let Some((_, r)) = p.next().await {
            match r {
                Ok(v) => got.push(v),
                Err(e) => {
                    assert_eq!(e, "call 13 failed");
                    break;
                }
            }
        }
        assert_eq!(got, [100, 110, 120]);
        // Nothing is sent past the window (the caller stops at the error).
        assert!(calls.sent.load(Ordering::SeqCst) <= 4 + IN_FLIGHT + WAITING);
    }
}
