//! The `Backend` trait users implement, and its object-safe twin used inside.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The error type backends return: any error that can cross threads.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Which backend callback failed, as passed to [`Backend::backend_error_callback`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Callback {
    /// [`Backend::start_callback`].
    Start,
    /// [`Backend::stop_callback`].
    Stop,
    /// [`Backend::timeout_callback`].
    Timeout,
    /// [`Backend::keepalive_callback`].
    Keepalive,
}

impl Callback {
    /// The callback's name, as in logs: `start_callback`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Callback::Start => "start_callback",
            Callback::Stop => "stop_callback",
            Callback::Timeout => "timeout_callback",
            Callback::Keepalive => "keepalive_callback",
        }
    }
}

impl fmt::Display for Callback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A source of tasks, and what to do when one starts, stops or times out.
///
/// Implement it with plain `async fn`s; only [`poll`](Backend::poll) and
/// [`start_callback`](Backend::start_callback) are required. Several scheduler
/// replicas may call the same backend concurrently, so methods take `&self`.
///
/// ```
/// use task_semaphore::{Backend, BoxError};
///
/// struct Reports;
///
/// impl Backend for Reports {
///     async fn poll(&self) -> Result<Option<String>, BoxError> {
///         Ok(Some("report-42".to_owned())) // the next pending task, without side effects
///     }
///     async fn start_callback(&self, task_id: &str) -> Result<(), BoxError> {
///         println!("launching {task_id}"); // mark it taken, launch it, do not wait for it
///         Ok(())
///     }
/// }
/// assert_eq!(task_semaphore::Backend::name(&Reports), "Reports");
/// ```
pub trait Backend: Send + Sync + 'static {
    /// The name slots refer to in the configuration; by default the type's name
    /// without its module path (`MyBackend`).
    fn name(&self) -> &str {
        short_type_name(std::any::type_name::<Self>())
    }

    /// The id of a task to start, or `None` when there is nothing to do.
    ///
    /// Must have no side effect: several replicas may poll the same task, and only
    /// the one whose claim succeeds starts it. Ids must be non-empty and at most
    /// [`MAX_TASK_ID_LEN`](crate::MAX_TASK_ID_LEN) bytes.
    fn poll(&self) -> impl Future<Output = Result<Option<String>, BoxError>> + Send;

    /// Up to `n` distinct task ids to start, for filling many idle slots at once;
    /// `Ok(None)` (the default) means "not provided": the scheduler then calls
    /// [`poll`](Backend::poll) slot by slot.
    ///
    /// The same rules as `poll`: no side effect, ids non-empty and at most
    /// [`MAX_TASK_ID_LEN`](crate::MAX_TASK_ID_LEN) bytes. The scheduler claims the
    /// ids for the idle slots whose next backend this is, in config order, in one
    /// script call per 200 slots, then runs `start_callback` for each claimed one.
    /// Fewer ids than `n` is fine; duplicates and invalid ids are skipped (invalid
    /// ones reported as poll errors).
    fn poll_many(&self, n: usize) -> impl Future<Output = Result<Option<Vec<String>>, BoxError>> + Send {
        let _ = n;
        async { Ok(None) }
    }

    /// Launches the task, after its slot was claimed. Mark the task taken here (so
    /// `poll` stops returning it) and return without waiting for the task to end.
    ///
    /// An error frees the slot (without `stop_callback`), after
    /// [`backend_error_callback`](Backend::backend_error_callback) was told.
    fn start_callback(&self, task_id: &str) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// [`start_callback`](Backend::start_callback) with the lease of the claim: the
    /// scheduler calls this one, and by default it calls `start_callback`.
    ///
    /// Override it to hand the lease to the task, which passes it to
    /// [`Scheduler::keepalive_with_lease`](crate::Scheduler::keepalive_with_lease) /
    /// [`stop_with_lease`](crate::Scheduler::stop_with_lease) and to whatever it
    /// writes to (a fencing token), so that a task that lost its slot cannot act as
    /// its newer holder. `start_callback` must still be written; it is not called
    /// when this is overridden.
    fn start_with_lease(
        &self,
        task_id: &str,
        lease: u64,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = lease;
        self.start_callback(task_id)
    }

    /// The task left its slot: it stopped, or timed out (after `timeout_callback`).
    /// Fires once per started task. The slot is not reused before this returns.
    ///
    /// If the replica running it dies first, the callback runs again when another
    /// replica reclaims the slot (at least once; see
    /// [`stop_with_lease`](Backend::stop_with_lease) for a dedupe key).
    fn stop_callback(&self, task_id: &str) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = task_id;
        async { Ok(()) }
    }

    /// The task passed its deadline; runs before `stop_callback`, and before the slot
    /// can be reused, so it is the place to kill a zombie.
    fn timeout_callback(&self, task_id: &str) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = task_id;
        async { Ok(()) }
    }

    /// [`stop_callback`](Backend::stop_callback) with the lease that ended: the
    /// scheduler calls this one, and by default it calls `stop_callback`. The lease
    /// is the key to deduplicate a callback run again after a replica crash.
    fn stop_with_lease(
        &self,
        task_id: &str,
        lease: u64,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = lease;
        self.stop_callback(task_id)
    }

    /// [`timeout_callback`](Backend::timeout_callback) with the lease that timed
    /// out: the scheduler calls this one, and by default it calls `timeout_callback`.
    fn timeout_with_lease(
        &self,
        task_id: &str,
        lease: u64,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = lease;
        self.timeout_callback(task_id)
    }

    /// The task sent a keepalive and its deadline was pushed back.
    fn keepalive_callback(&self, task_id: &str) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = task_id;
        async { Ok(()) }
    }

    /// A callback of this backend failed. Return `Ok(true)` to free the slot.
    ///
    /// The slot is freed anyway when `callback` is [`Callback::Start`] or when this
    /// method itself fails; otherwise `Ok(false)` (the default) keeps it held (see
    /// the README for what "held" means after each callback).
    fn backend_error_callback(
        &self,
        task_id: &str,
        error: &BoxError,
        callback: Callback,
    ) -> impl Future<Output = Result<bool, BoxError>> + Send {
        let _ = (task_id, error, callback);
        async { Ok(false) }
    }

    /// Whatever the backend wants to show in [`Scheduler::inspect`](crate::Scheduler::inspect).
    fn inspect(&self) -> impl Future<Output = serde_json::Value> + Send {
        async { serde_json::Value::Object(serde_json::Map::new()) }
    }
}

/// `a::b::Name<c::D>` -> `Name`.
fn short_type_name(full: &str) -> &str {
    let head = full.split('<').next().unwrap_or(full);
    head.rsplit("::").next().unwrap_or(head)
}

/// A boxed, sendable future.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs a backend future, turning a panic inside it into an error, so that one
/// panicking callback cannot abort a tick halfway (leaving slots to be reclaimed)
/// or kill a `run` loop.
struct CatchPanic<'a, T> {
    inner: BoxFuture<'a, Result<T, BoxError>>,
    what: &'static str,
}

impl<T> Future for CatchPanic<'_, T> {
    type Output = Result<T, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let what = self.what;
        let inner = &mut self.inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                Poll::Ready(Err(format!("{what} panicked: {message}").into()))
            }
        }
    }
}

fn guarded<'a, T: 'a>(
    what: &'static str,
    inner: impl Future<Output = Result<T, BoxError>> + Send + 'a,
) -> BoxFuture<'a, Result<T, BoxError>> {
    Box::pin(CatchPanic {
        inner: Box::pin(inner),
        what,
    })
}

/// [`Backend`] with boxed futures, so the scheduler can hold `dyn` backends.
pub(crate) trait DynBackend: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn poll(&self) -> BoxFuture<'_, Result<Option<String>, BoxError>>;
    fn poll_many(&self, n: usize) -> BoxFuture<'_, Result<Option<Vec<String>>, BoxError>>;
    fn call<'a>(
        &'a self,
        which: Callback,
        task_id: &'a str,
        lease: u64,
    ) -> BoxFuture<'a, Result<(), BoxError>>;
    fn on_error<'a>(
        &'a self,
        task_id: &'a str,
        error: &'a BoxError,
        callback: Callback,
    ) -> BoxFuture<'a, Result<bool, BoxError>>;
    fn inspect(&self) -> BoxFuture<'_, serde_json::Value>;
}

impl<B: Backend> DynBackend for B {
    fn name(&self) -> &str {
        Backend::name(self)
    }
    fn poll(&self) -> BoxFuture<'_, Result<Option<String>, BoxError>> {
        guarded("poll", Backend::poll(self))
    }
    fn poll_many(&self, n: usize) -> BoxFuture<'_, Result<Option<Vec<String>>, BoxError>> {
        guarded("poll_many", Backend::poll_many(self, n))
    }
    fn call<'a>(
        &'a self,
        which: Callback,
        task_id: &'a str,
        lease: u64,
    ) -> BoxFuture<'a, Result<(), BoxError>> {
        match which {
            Callback::Start => guarded(which.as_str(), self.start_with_lease(task_id, lease)),
            Callback::Stop => guarded(which.as_str(), self.stop_with_lease(task_id, lease)),
            Callback::Timeout => guarded(which.as_str(), self.timeout_with_lease(task_id, lease)),
            Callback::Keepalive => guarded(which.as_str(), self.keepalive_callback(task_id)),
        }
    }
    fn on_error<'a>(
        &'a self,
        task_id: &'a str,
        error: &'a BoxError,
        callback: Callback,
    ) -> BoxFuture<'a, Result<bool, BoxError>> {
        guarded(
            "backend_error_callback",
            self.backend_error_callback(task_id, error, callback),
        )
    }
    fn inspect(&self) -> BoxFuture<'_, serde_json::Value> {
        let inspect = guarded("inspect", async { Ok(Backend::inspect(self).await) });
        Box::pin(async move {
            inspect
                .await
                .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::short_type_name;

    #[test]
    /// The default backend name is the bare type name.
    fn short_names() {
        assert_eq!(short_type_name("my_crate::jobs::MyBackend"), "MyBackend");
        assert_eq!(short_type_name("a::Wrap<b::Inner>"), "Wrap");
        assert_eq!(short_type_name("Plain"), "Plain");
    }
}
