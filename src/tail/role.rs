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
use crate::source::MongoSource;

/// The tail role: waits for the source's lease, tails while holding it, and stands by again if
/// it loses it (a paused process whose lease expired); releases it on a clean stop so a standby
/// takes over at once.
pub struct TailRole {
    pub cfg: Config,
    pub topics: Arc<Topics>,
    pub resnapshot: bool,
    pub health: Health,
}

impl TailRole {
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), TailError> {
        let cfg = &self.cfg;
        let store_client = crate::mongo::connect(&cfg.store.uri, "tail").await?;
        let store = store_client.database(&cfg.store.db);
        let lease = Lease::new(&store, &cfg.source.name, &holder_id(), cfg.tail.lease_ttl);
        let collections: Vec<String> = self.topics.collections().map(String::from).collect();
        let source = MongoSource::connect(&cfg.source.uri, &cfg.source.db, collections).await?;
        loop {
            // The store may not be reachable yet: waiting for it is what a tailer should do.
            let transient =
                |e: &mongodb::error::Error| crate::mongo::classify(e) == crate::mongo::ErrorClass::Transient;
            let acquired =
                crate::retry::with_backoff("tail", &shutdown, || lease.acquire(&shutdown, &self.health), transient);
            let Some(epoch) = acquired.await? else { return Ok(()) };
            let active = shutdown.child_token();
            let renewal = tokio::spawn(keep_lease(lease.clone(), epoch, active.clone()));
            let publisher = Arc::new(KafkaPublisher::new(&cfg.kafka, &format!("ficus-tail-{}", cfg.source.name))?);
            let tailer = Tailer {
                source_name: cfg.source.name.clone(),
                topics: self.topics.clone(),
                source: source.clone(),
                publisher: publisher.clone(),
                checkpoints: MongoCheckpoints::new(&store),
                tail: cfg.tail.clone(),
                snapshot: cfg.snapshot.clone(),
                epoch: Some(epoch),
                health: self.health.clone(),
                role: RoleId::Tail,
                start: TailStart::Snapshot,
                echoes: Echoes::Publish,
                admit: None,
            };
            let result = tailer.run(active.clone(), std::mem::take(&mut self.resnapshot)).await;
            renewal.abort();
            // Everything handed to Kafka was awaited by the tailer; flush is a last guard.
            let _ = tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(10))).await;
            match result {
                Ok(()) if shutdown.is_cancelled() => {
                    let _ = lease.release(epoch).await;
                    return Ok(());
                }
                // Lost the lease (or the store while holding it): stand by and try again.
                Ok(()) | Err(TailError::Checkpoint(CheckpointError::Fenced { .. })) => {
                    warn!(source = %cfg.source.name, "lost the lease; standing by");
                    metrics::gauge!("ficus_lease_held", "source" => cfg.source.name.clone()).set(0.0);
                }
                Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                    warn!(source = %cfg.source.name, error = %e, "tailer stopped on a transient error after losing its lease; standing by");
                }
                Err(e) => {
                    let _ = lease.release(epoch).await;
                    return Err(e);
                }
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
