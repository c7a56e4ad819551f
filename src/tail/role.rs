//! The tail role as `ficus run` runs it: waits for the source's lease, tails while holding it,
//! and stands by again if it loses it (a paused process whose lease expired); releases the
//! lease on a clean stop so a standby takes over at once.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::checkpoint::{CheckpointError, MongoCheckpoints};
use super::lease::Lease;
use super::{Echoes, TailError, TailStart, Tailer};
use crate::bus::{KafkaPublisher, Publisher};
use crate::config::Config;
use crate::config::topics::Topics;
use crate::ops::{Health, RoleId};
use crate::retry::Classify;
use crate::source::MongoSource;

/// The tail role: waits for the source's lease, tails while holding it, and stands by again if
/// it loses it (a paused process whose lease expired); releases it on a clean stop so a standby
/// takes over at once.
pub struct TailRole {
    pub cfg: Config,
    pub clients: crate::clients::Clients,
    pub topics: Arc<Topics>,
    pub resnapshot: bool,
    pub health: Health,
}

impl TailRole {
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), TailError> {
        let cfg = &self.cfg;
        let store = self.clients.store();
        let collections: Vec<String> = self.topics.collections().map(String::from).collect();
        let source = MongoSource::new(self.clients.source.clone(), &cfg.source.db, collections);
        let mut resnapshot = std::mem::take(&mut self.resnapshot);
        let (health, topics) = (self.health.clone(), self.topics.clone());
        with_lease(&store, &cfg.source.name, cfg.tail.lease_ttl, &self.health, &shutdown, |epoch, active| {
            let tailer = Tailer {
                source_name: cfg.source.name.clone(),
                topics: topics.clone(),
                source: source.clone(),
                publisher: Arc::new(KafkaPublisher::new(&cfg.kafka, &format!("ficus-tail-{}", cfg.source.name))?),
                checkpoints: MongoCheckpoints::new(&store),
                tail: cfg.tail.clone(),
                snapshot: cfg.snapshot.clone(),
                epoch: Some(epoch),
                health: health.clone(),
                role: RoleId::Tail,
                start: TailStart::Snapshot,
                echoes: Echoes::Publish,
                admit: None,
            };
            let fresh = std::mem::take(&mut resnapshot);
            Ok(async move { tailer.run_then_flush(active, fresh).await })
        })
        .await
    }
}

impl<S: crate::source::Source, P: Publisher + 'static, C: super::checkpoint::CheckpointStore> Tailer<S, P, C> {
    /// Runs, then flushes the publisher (everything handed over was awaited; a last guard).
    pub(super) async fn run_then_flush(self, active: CancellationToken, resnapshot: bool) -> Result<(), TailError> {
        let result = self.run(active, resnapshot).await;
        let publisher = self.publisher.clone();
        let _ = tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(10))).await;
        result
    }
}

/// Holds the lease on `name` and runs what `tail` makes with it: waits for the lease (the
/// store may not be reachable yet: waiting is what a tailer should do), runs while holding it,
/// stands by again if it is lost (a paused process whose lease expired), and releases it on a
/// clean stop so a standby takes over at once. `tail` gets the lease epoch and a token that is
/// cancelled on `shutdown` (then the lease is released and this returns) or when the lease is
/// lost.
pub(super) async fn with_lease<F, Fut>(
    store: &mongodb::Database,
    name: &str,
    ttl: Duration,
    health: &Health,
    shutdown: &CancellationToken,
    mut tail: F,
) -> Result<(), TailError>
where
    F: FnMut(i64, CancellationToken) -> Result<Fut, TailError>,
    Fut: std::future::Future<Output = Result<(), TailError>>,
{
    let lease = Lease::new(store, name, &holder_id(), ttl);
    loop {
        let transient = |e: &mongodb::error::Error| e.is_transient();
        let acquired = crate::retry::with_backoff("tail", shutdown, || lease.acquire(shutdown, health), transient);
        let Some(epoch) = acquired.await? else { return Ok(()) };
        let active = shutdown.child_token();
        let renewal = tokio::spawn(keep_lease(lease.clone(), epoch, active.clone()));
        let result = match tail(epoch, active.clone()) {
            Ok(run) => run.await,
            Err(e) => Err(e),
        };
        renewal.abort();
        match result {
            Ok(()) if shutdown.is_cancelled() => {
                let _ = lease.release(epoch).await;
                return Ok(());
            }
            // Lost the lease (or the store while holding it): stand by and try again.
            Ok(()) | Err(TailError::Checkpoint(CheckpointError::Fenced { .. })) => {
                warn!(source = %name, "lost the lease; standing by");
                metrics::gauge!("ficus_lease_held", "source" => name.to_string()).set(0.0);
            }
            Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                warn!(source = %name, error = %e, "tailer stopped on a transient error after losing its lease; standing by");
            }
            Err(e) => {
                let _ = lease.release(epoch).await;
                return Err(e);
            }
        }
    }
}

/// Renews the lease every third of its life; cancels `active` if it is lost or cannot be
/// renewed before it would expire.
async fn keep_lease(lease: Lease, epoch: i64, active: CancellationToken) {
    let mut renewed = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = active.cancelled() => return,
            _ = tokio::time::sleep(lease.ttl() / 3) => {}
        }
        match lease.renew(epoch).await {
            Ok(true) => renewed = std::time::Instant::now(),
            Ok(false) => {
                error!("the tail lease was taken over; stopping this tailer");
                active.cancel();
                return;
            }
            Err(e) if renewed.elapsed() >= lease.ttl() => {
                error!("the tail lease could not be renewed before it expired ({e}); stopping this tailer");
                active.cancel();
                return;
            }
            Err(e) => warn!("lease renewal failed, retrying: {e}"),
        }
    }
}

/// Identifies this process in the lease: host name and process id.
fn holder_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}
