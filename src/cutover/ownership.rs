//! Which side writes a service's aggregates: the service's share (a percentage of buckets, see
//! `route`) and an epoch that grows on every change, kept in ficus's store (`<store.db>.ownership`,
//! one document per service) and followed by every running process.
//!
//! Ownership is a function of time, on each side's own clock: every change is recorded with the
//! cluster time of the monolith and of the service database at the moment it took effect, so a
//! change is judged by the ownership in force when it was committed, not when ficus read it. A
//! service write made while the service owned its key reaches the monolith even if the read
//! happens after a rollback; a version from one cluster's clock is never compared with one from
//! the other's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bson::{DateTime, Document, Timestamp, doc};
use futures::TryStreamExt;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::mongo;

/// The collection in the store.
pub const OWNERSHIP: &str = "ownership";
/// How many past changes each service's record keeps (enough to judge anything still in flight).
const HISTORY: usize = 50;

/// Whose clock a time is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    Monolith,
    Service,
}

/// One change of ownership.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub epoch: i64,
    pub percent: u8,
    /// The monolith's cluster time when the change took effect: monolith changes after it are
    /// judged by this step.
    pub at_monolith: Timestamp,
    /// The same moment on the service database's clock.
    pub at_service: Timestamp,
    pub set_at: DateTime,
    /// Set with `--force` (no fencing, draining or verification).
    pub forced: bool,
}

/// A service's ownership and its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ownership {
    #[serde(rename = "_id")]
    pub service: String,
    pub epoch: i64,
    /// The share of buckets the service owns now (0: the monolith owns everything).
    pub percent: u8,
    /// Past changes, oldest first.
    pub history: Vec<Step>,
    pub updated: DateTime,
}

impl Ownership {
    /// The service's share for a change committed at `ts` on `clock`.
    pub fn percent_at(&self, clock: Clock, ts: Timestamp) -> u8 {
        self.history
            .iter()
            .rev()
            .find(|s| match clock {
                Clock::Monolith => s.at_monolith < ts,
                Clock::Service => s.at_service < ts,
            })
            .map_or(0, |s| s.percent)
    }

    /// Whether the service has ever owned anything (its writes may still be on their way back).
    pub fn ever_owned(&self) -> bool {
        self.history.iter().any(|s| s.percent > 0)
    }
}

/// Every service's ownership, as last read.
pub type Ownerships = Arc<BTreeMap<String, Ownership>>;

/// Errors of the ownership store.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("ownership store: {}", mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
    #[error("the ownership record of {service} is unreadable: {reason}")]
    Corrupt { service: String, reason: String },
}

/// The ownership records in ficus's store.
#[derive(Clone)]
pub struct OwnershipStore {
    coll: Collection<Document>,
}

impl OwnershipStore {
    pub fn new(db: &Database) -> Self {
        OwnershipStore { coll: db.collection(OWNERSHIP) }
    }

    /// Every service's record.
    pub async fn all(&self) -> Result<BTreeMap<String, Ownership>, OwnershipError> {
        let docs: Vec<Document> = self.coll.find(doc! {}).await?.try_collect().await?;
        docs.into_iter()
            .map(|d| {
                let service = d.get_str("_id").unwrap_or("?").to_string();
                bson::deserialize_from_document::<Ownership>(d)
                    .map(|o| (service.clone(), o))
                    .map_err(|e| OwnershipError::Corrupt { service, reason: e.to_string() })
            })
            .collect()
    }

    /// One service's record.
    pub async fn get(&self, service: &str) -> Result<Option<Ownership>, OwnershipError> {
        let Some(d) = self.coll.find_one(doc! { "_id": service }).await? else { return Ok(None) };
        bson::deserialize_from_document(d)
            .map(Some)
            .map_err(|e| OwnershipError::Corrupt { service: service.to_string(), reason: e.to_string() })
    }

    /// Sets a service's share at once (the next epoch), effective at the given times on each
    /// side's clock. Concurrent changes are serialised on the epoch.
    pub async fn set(
        &self,
        service: &str,
        percent: u8,
        at: (Timestamp, Timestamp),
        forced: bool,
    ) -> Result<Ownership, OwnershipError> {
        loop {
            let current = self.get(service).await?;
            let epoch = current.as_ref().map_or(0, |o| o.epoch);
            let mut history = current.map(|o| o.history).unwrap_or_default();
            let now = DateTime::now();
            history.push(Step {
                epoch: epoch + 1,
                percent,
                at_monolith: at.0,
                at_service: at.1,
                set_at: now,
                forced,
            });
            let skip = history.len().saturating_sub(HISTORY);
            history.drain(..skip);
            let next = Ownership { service: service.to_string(), epoch: epoch + 1, percent, history, updated: now };
            let d = bson::serialize_to_document(&next)
                .map_err(|e| OwnershipError::Corrupt { service: service.to_string(), reason: e.to_string() })?;
            let filter = if epoch == 0 { doc! { "_id": service } } else { doc! { "_id": service, "epoch": epoch } };
            match self.coll.replace_one(filter, d).upsert(epoch == 0).await {
                Ok(r) if r.matched_count == 1 || r.upserted_id.is_some() => return Ok(next),
                Ok(_) => continue, // someone else moved the epoch meanwhile
                Err(e) if mongo::error_code(&e) == Some(11000) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Follows the store's ownership records: re-read every `every`, handed to whoever watches,
/// until `shutdown`. A record that cannot be read keeps the last good view (and says so).
pub fn watch(store: OwnershipStore, every: Duration, shutdown: CancellationToken) -> watch::Receiver<Ownerships> {
    let (tx, rx) = watch::channel(Ownerships::default());
    tokio::spawn(async move {
        loop {
            match store.all().await {
                Ok(all) => {
                    if **tx.borrow() != all {
                        for (service, o) in &all {
                            if tx.borrow().get(service).is_none_or(|was| was.epoch != o.epoch) {
                                tracing::info!(%service, percent = o.percent, epoch = o.epoch, "ownership");
                                metrics::gauge!("ficus_cutover_percent", "service" => service.clone()).set(f64::from(o.percent));
                                metrics::gauge!("ficus_cutover_epoch", "service" => service.clone()).set(o.epoch as f64);
                            }
                        }
                        let _ = tx.send(Arc::new(all));
                    }
                }
                Err(e) => tracing::warn!("reading ownership: {e}"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(increment: u32) -> Timestamp {
        Timestamp { time: 100, increment }
    }

    #[test]
    fn a_change_is_judged_by_the_ownership_of_its_own_moment() {
        let step = |epoch, percent, m, s| Step {
            epoch,
            percent,
            at_monolith: ts(m),
            at_service: ts(s),
            set_at: DateTime::from_millis(0),
            forced: true,
        };
        let o = Ownership {
            service: "customers_db".into(),
            epoch: 2,
            percent: 0,
            history: vec![step(1, 50, 10, 500), step(2, 0, 20, 600)],
            updated: DateTime::from_millis(0),
        };
        // Before any cutover the monolith owns everything.
        assert_eq!(o.percent_at(Clock::Monolith, ts(5)), 0);
        assert_eq!(o.percent_at(Clock::Monolith, ts(10)), 0, "committed at the moment of the change: before it");
        assert_eq!(o.percent_at(Clock::Monolith, ts(15)), 50);
        assert_eq!(o.percent_at(Clock::Monolith, ts(25)), 0);
        // The service's clock is another clock: its own boundaries.
        assert_eq!(o.percent_at(Clock::Service, ts(25)), 0);
        assert_eq!(o.percent_at(Clock::Service, ts(550)), 50, "a service write made while it owned");
        assert_eq!(o.percent_at(Clock::Service, ts(601)), 0);
        assert!(o.ever_owned());
    }
}
