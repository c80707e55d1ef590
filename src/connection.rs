//! The Redis connection: one multiplexed connection taken from the pool, shared by
//! every call, replaced when it breaks.
//!
//! Why not `pool.get()` per call: deadpool-redis recycles a connection on every
//! checkout with an `UNWATCH` + `PING` round trip, which would double the cost of a
//! keepalive. A multiplexed connection already serves concurrent callers.

use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::{Pool, PoolError};
use redis::aio::MultiplexedConnection;
use redis::{
    Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, FromRedisValue, IntoConnectionInfo, Pipeline,
    ServerErrorKind, TlsCertificates,
};

use crate::error::{Error, Result};
use crate::scripts::Call;

/// Where to connect: a `redis://` or `rediss://` URL, and for TLS the CA certificates
/// (PEM) to trust instead of the system's roots.
///
/// TLS is rustls with its `ring` provider. When the process has no default rustls
/// `CryptoProvider` yet, `ring`'s is installed, so that a build that also enables
/// another provider's feature (which makes rustls unable to pick one) still connects.
pub(crate) fn connection_info(url: &str, root_cert: Option<&[u8]>) -> Result<ConnectionInfo> {
    let info = url.into_connection_info().map_err(|source| Error::Redis {
        context: "reading the redis url",
        source,
    })?;
    let ConnectionAddr::TcpTls { insecure, .. } = info.addr() else {
        if root_cert.is_some() {
            return Err(Error::Config(
                "tls_root_cert needs a rediss:// url (TLS); this one is not".into(),
            ));
        }
        return Ok(info);
    };
    if *insecure {
        return Err(Error::Config(
            "rediss:// with #insecure (no certificate checks) is not supported; \
             trust the server's CA with tls_root_cert instead"
                .into(),
        ));
    }
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err means another thread installed one meanwhile: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let Some(pem) = root_cert else {
        return Ok(info);
    };
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    if !pem.windows(BEGIN.len()).any(|w| w == BEGIN) {
        return Err(Error::Config(
            "tls_root_cert holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let certificates = TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    };
    let client = Client::build_with_tls(info, certificates)
        .map_err(|e| Error::Config(format!("tls_root_cert cannot be read: {e}")))?;
    Ok(client.get_connection_info().clone())
}

pub(crate) struct Redis {
    pool: Pool,
    current: Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
}

impl Redis {
    pub(crate) fn new(pool: Pool, timeout: Duration) -> Self {
        Redis {
            pool,
            current: Mutex::new(None),
            timeout,
        }
    }

    async fn connection(&self, context: &'static str) -> Result<MultiplexedConnection> {
        if let Some(conn) = self.lock().as_ref() {
            return Ok(conn.clone());
        }
        let object = match tokio::time::timeout(self.timeout, self.pool.get()).await {
            Ok(Ok(object)) => object,
            // A connect or handshake that timed out (TLS to a plain port: the server
            // waits for a command that never comes) is a timeout, as elsewhere.
            Ok(Err(PoolError::Backend(source))) if source.is_timeout() => {
                return Err(Error::Timeout {
                    context,
                    after: self.timeout,
                })
            }
            Ok(Err(PoolError::Backend(source))) => return Err(Error::Redis { context, source }),
            Ok(Err(source)) => return Err(Error::Pool { context, source }),
            Err(_) => {
                return Err(Error::Timeout {
                    context,
                    after: self.timeout,
                })
            }
        };
        let conn = deadpool_redis::Connection::take(object);
        *self.lock() = Some(conn.clone());
        Ok(conn)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        // A poisoned lock only means another thread panicked while swapping a
        // connection handle; the handle inside is still usable.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one request; a broken connection is replaced and the request sent once more.
    ///
    /// A request lost in flight with its connection may have run: every script is
    /// written so that running it again is harmless or reports why it did nothing.
    async fn run<T, F, Fut>(&self, context: &'static str, send: F) -> Result<T>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut reconnects = 0;
        loop {
            let conn = self.connection(context).await?;
            let err = match tokio::time::timeout(self.timeout, send(conn)).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(source)) if source.is_timeout() => Error::Timeout {
                    context,
                    after: self.timeout,
                },
                Ok(Err(source)) => Error::Redis { context, source },
                Err(_) => Error::Timeout {
                    context,
                    after: self.timeout,
                },
            };
            if err.is_connection_error() {
                *self.lock() = None;
                // A request that timed out may have run: it is not sent again.
                if reconnects < 1 && !matches!(err, Error::Timeout { .. }) {
                    reconnects += 1;
                    tracing::debug!(%err, "redis connection lost; retrying once on a new one");
                    continue;
                }
            }
            return Err(err);
        }
    }

    /// EVALSHA of a prepared script (a NOSCRIPT reply loads it and retries).
    pub(crate) async fn eval<T: FromRedisValue>(&self, context: &'static str, call: &Call<'_>) -> Result<T> {
        self.run(context, |mut conn| async move {
            match call.invocation.invoke_async(&mut conn).await {
                // The redis crate reloaded the script once and it was flushed again in
                // between: EVAL runs it and caches it in one step.
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    call.eval_cmd().query_async(&mut conn).await
                }
                other => other,
            }
        })
        .await
    }

    /// One plain command.
    pub(crate) async fn query<T: FromRedisValue>(&self, context: &'static str, cmd: &Cmd) -> Result<T> {
        self.run(
            context,
            |mut conn| async move { cmd.query_async(&mut conn).await },
        )
        .await
    }

    /// A pipeline, in one round trip.
    pub(crate) async fn pipeline<T: FromRedisValue>(
        &self,
        context: &'static str,
        pipe: &Pipeline,
    ) -> Result<T> {
        self.run(
            context,
            |mut conn| async move { pipe.query_async(&mut conn).await },
        )
        .await
    }
}
