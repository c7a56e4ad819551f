//! Retrying transient failures: exponential backoff with jitter (backon), cut short by shutdown.
//!
//! Every long-running role wraps its work in [`with_backoff`]; an attempt that fails with a
//! transient error starts again from its last durable checkpoint, a fatal one ends the role.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio_util::sync::CancellationToken;

/// What an error means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Network trouble, failover, shutdown in progress: back off and try again.
    Transient,
    /// The change stream cannot resume from the token any more (the oplog moved on).
    HistoryLost,
    /// Anything else: a person has to look (authentication, bad configuration, a bug).
    Fatal,
}

/// The one way every layer's error says what it calls for: each error enum (and the MongoDB
/// driver's error, in `mongo`) implements [`Classify::class`], and "is it transient" is asked
/// only through it.
pub trait Classify {
    fn class(&self) -> ErrorClass;

    /// Whether backing off and trying again can help.
    fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }
}

/// The backoff policy: 200 ms doubling to 10 s, with jitter, forever (only shutdown or a fatal
/// error stops it). The cap bounds how long a role idles after its cause is gone: a broker back
/// up, or the server aborting a killed predecessor's open transaction (a write conflict until
/// `transactionLifetimeLimitSeconds`), which a 30 s cap with jitter turned into a minute more.
pub fn policy() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
}

/// Runs `attempt` until it succeeds, fails with an error `transient` rejects, or fails while
/// `shutdown` is cancelled (a backoff sleep also ends early then). Roles return `Ok` from an
/// attempt that sees the cancelled token, so a clean stop is still a success.
pub async fn with_backoff<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: F,
    transient: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    let token = shutdown.clone();
    let sleeper = move |d: Duration| {
        let token = token.clone();
        async move {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = token.cancelled() => {}
            }
        }
    };
    attempt
        .retry(policy())
        .sleep(sleeper)
        .when(|e| transient(e) && !shutdown.is_cancelled())
        .notify(|e, d| {
            metrics::counter!("ficus_errors_total", "stage" => what.to_string(), "kind" => "transient").increment(1);
            tracing::warn!(stage = what, error = %e, "transient failure; retrying in {:.1}s", d.as_secs_f64());
        })
        .await
}
