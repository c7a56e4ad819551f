//! One active tailer per source: a lease in ficus's MongoDB store.
//!
//! A tailer may only read the change stream while it holds the source's lease
//! (`<store.db>.leases`, one document per source: holder, expiry, epoch). It renews the lease
//! every third of its time to live; a standby polls and takes the lease over once it expires,
//! so a holder killed with SIGKILL is replaced within one TTL. Every acquisition increments the
//! epoch, and checkpoints are fenced by it (see `checkpoint`): a paused former holder that wakes
//! up after losing the lease cannot overwrite the new holder's checkpoint. It may re-publish a
//! few events, absorbed downstream (each with the same id where it reads the same again).

use std::time::Duration;

use bson::{DateTime, Document, doc};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::mongo;
use crate::ops::Health;

const DUPLICATE_KEY: i32 = 11000;

/// The collection of leases in ficus's store.
const LEASES: &str = "leases";

/// A lease as seen from outside (`ficus status`, a command asking who holds a lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// Who took it last (`host:pid`).
    pub holder: String,
    /// Whether it is still in force (not expired, not released).
    pub live: bool,
}

/// Who holds the lease `name`, if anyone ever took it.
pub async fn holding(db: &Database, name: &str) -> Result<Option<Holding>, mongodb::error::Error> {
    let lease = db.collection::<Document>(LEASES).find_one(doc! { "_id": name }).await?;
    Ok(lease.map(|l| Holding {
        holder: l.get_str("holder").unwrap_or("?").to_string(),
        live: l.get_datetime("expires").is_ok_and(|e| *e > DateTime::now()),
    }))
}

/// A lease on one source, for one would-be holder.
#[derive(Clone)]
pub struct Lease {
    coll: Collection<Document>,
    source: String,
    holder: String,
    ttl: Duration,
}

impl Lease {
    pub fn new(db: &Database, source: &str, holder: &str, ttl: Duration) -> Self {
        Lease { coll: db.collection(LEASES), source: source.to_string(), holder: holder.to_string(), ttl }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn expiry(&self) -> DateTime {
        DateTime::from_millis(DateTime::now().timestamp_millis() + self.ttl.as_millis() as i64)
    }

    /// Takes the lease if it is free or expired; returns the new epoch, or `None` if someone
    /// else holds it.
    pub async fn try_acquire(&self) -> Result<Option<i64>, mongodb::error::Error> {
        let filter = doc! { "_id": &self.source, "$or": [ { "expires": { "$lt": DateTime::now() } }, { "holder": &self.holder } ] };
        let update = doc! { "$set": { "holder": &self.holder, "expires": self.expiry() }, "$inc": { "epoch": 1_i64 } };
        match self.coll.find_one_and_update(filter, update).upsert(true).return_document(ReturnDocument::After).await {
            Ok(Some(d)) => Ok(d.get_i64("epoch").ok()),
            Ok(None) => Ok(None),
            // The document exists and is held by someone else: the upsert's insert collided.
            Err(e) if mongo::error_code(&e) == Some(DUPLICATE_KEY) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits until the lease is ours (`Some(epoch)`) or shutdown (`None`). A standby is a
    /// healthy tailer: it keeps beating while it waits.
    pub async fn acquire(
        &self,
        shutdown: &CancellationToken,
        health: &Health,
    ) -> Result<Option<i64>, mongodb::error::Error> {
        let mut said = false;
        loop {
            health.beat(&crate::ops::RoleId::Tail);
            if let Some(epoch) = self.try_acquire().await? {
                info!(source = %self.source, holder = %self.holder, epoch, "lease acquired: this tailer is active");
                metrics::gauge!("ficus_lease_held", "source" => self.source.clone()).set(1.0);
                return Ok(Some(epoch));
            }
            if !said {
                let current = self.coll.find_one(doc! { "_id": &self.source }).await?;
                let by = current.as_ref().and_then(|d| d.get_str("holder").ok()).unwrap_or("?");
                info!(source = %self.source, held_by = by, "standby: another tailer holds the lease; waiting");
                said = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(self.ttl / 3) => {}
            }
        }
    }

    /// Takes the lease from `holder` (seen holding it, and known to be gone), expired or not;
    /// `None` if someone else has it by now.
    pub async fn take_over(&self, holder: &str) -> Result<Option<i64>, mongodb::error::Error> {
        let filter = doc! { "_id": &self.source, "holder": holder };
        let update = doc! { "$set": { "holder": &self.holder, "expires": self.expiry() }, "$inc": { "epoch": 1_i64 } };
        let taken = self.coll.find_one_and_update(filter, update).return_document(ReturnDocument::After).await?;
        Ok(taken.and_then(|d| d.get_i64("epoch").ok()))
    }

    /// Extends the lease; `false` if it was lost (taken over after expiring).
    pub async fn renew(&self, epoch: i64) -> Result<bool, mongodb::error::Error> {
        let r = self
            .coll
            .update_one(
                doc! { "_id": &self.source, "holder": &self.holder, "epoch": epoch },
                doc! { "$set": { "expires": self.expiry() } },
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Gives the lease up (on a clean stop) so a standby takes over at once.
    pub async fn release(&self, epoch: i64) -> Result<(), mongodb::error::Error> {
        self.coll
            .update_one(
                doc! { "_id": &self.source, "holder": &self.holder, "epoch": epoch },
                doc! { "$set": { "expires": DateTime::from_millis(0) } },
            )
            .await?;
        metrics::gauge!("ficus_lease_held", "source" => self.source.clone()).set(0.0);
        Ok(())
    }
}
