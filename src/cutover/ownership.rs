//! Which side writes a service's aggregates: the service's share (a percentage of buckets, see
//! `route`) and an epoch that grows on every change, kept in ficus's store (`<store.db>.ownership`,
//! one document per service) and followed by every running process.
//!
//! Ownership is a function of time, on each side's own clock: every change is recorded with the
//! cluster time of the monolith and of the service databases at the moment it took effect, so a
//! change is judged by the ownership in force when it was committed, not when ficus read it. A
//! service write made while the service owned its key reaches the monolith even if the read
//! happens after a rollback; a time from one cluster's clock is never compared with one from
//! the other's.
//!
//! Judging must never use a view older than the change judged. So a change of ownership is
//! written in two steps: first **pending** (no times), then its times, read from both clusters
//! after the pending step was stored; and every view of the records remembers the cluster times
//! read just *before* the records were ([`View::valid_to`]). A change committed at or before
//! that time, on that clock, is judged exactly by the view: a step the view lacks was stored
//! after the view was read, so its times are later. A newer change, or any while a step is
//! pending, waits for a fresher view ([`OwnershipFeed::fresh`]).

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
    /// Stored, but its times not yet read: nothing after it can be judged until they are.
    #[serde(default)]
    pub pending: bool,
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
    /// Buckets a safe cutover is moving, from its fence to its flip: applications hold writes
    /// for their keys (see `ficus cutover` and the README's application contract).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<Fence>,
}

/// A range of buckets being moved: `[from, to)`, fenced at `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub from: u8,
    pub to: u8,
    pub epoch: i64,
}

impl Fence {
    /// Whether a key's bucket is fenced.
    pub fn holds(&self, bucket: u8) -> bool {
        (self.from..self.to).contains(&bucket)
    }
}

impl Ownership {
    /// The service's share for a change committed at `ts` on `clock` (pending steps aside).
    pub fn percent_at(&self, clock: Clock, ts: Timestamp) -> u8 {
        self.history
            .iter()
            .rev()
            .filter(|s| !s.pending)
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

    /// Whether a change is stored but not yet timed.
    pub fn pending(&self) -> bool {
        self.history.iter().any(|s| s.pending)
    }

    /// The periods the service owned keys, on its own clock: from a step above 0% after 0% to
    /// the next step back at 0% (`None`: still owning), oldest first.
    pub fn periods(&self) -> Vec<(Timestamp, Option<Timestamp>)> {
        let mut out: Vec<(Timestamp, Option<Timestamp>)> = Vec::new();
        for s in self.history.iter().filter(|s| !s.pending) {
            let owning = out.last().is_some_and(|p| p.1.is_none());
            if s.percent > 0 && !owning {
                out.push((s.at_service, None));
            } else if s.percent == 0
                && owning
                && let Some(p) = out.last_mut()
            {
                p.1 = Some(s.at_service);
            }
        }
        out
    }
}

/// What a view says about a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// The service's share when the change was committed.
    Percent(u8),
    /// The view may lack a step that applies: read a fresher one.
    Stale,
}

/// The ownership records as read at one moment, with the cluster times read just before them.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub records: BTreeMap<String, Ownership>,
    /// Changes committed at or before these times (monolith, service databases) are judged
    /// exactly by this view.
    pub valid_to: (Timestamp, Timestamp),
}

impl Default for View {
    /// No records, judging nothing (every time is after it).
    fn default() -> Self {
        let zero = Timestamp { time: 0, increment: 0 };
        View { records: BTreeMap::new(), valid_to: (zero, zero) }
    }
}

impl View {
    pub fn get(&self, service: &str) -> Option<&Ownership> {
        self.records.get(service)
    }

    /// The service's share for a change committed at `ts` on `clock`, if this view can tell.
    pub fn judge(&self, service: &str, clock: Clock, ts: Timestamp) -> Judgement {
        let valid_to = match clock {
            Clock::Monolith => self.valid_to.0,
            Clock::Service => self.valid_to.1,
        };
        match self.records.get(service) {
            Some(o) if o.pending() => Judgement::Stale,
            _ if ts > valid_to => Judgement::Stale,
            Some(o) => Judgement::Percent(o.percent_at(clock, ts)),
            None => Judgement::Percent(0),
        }
    }
}

/// Every service's ownership, as last read.
pub type Ownerships = Arc<View>;

/// Errors of the ownership store.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("ownership store: {}", mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
    #[error("the ownership record of {service} is unreadable: {reason}")]
    Corrupt { service: String, reason: String },
    #[error("{0} reports no cluster time: is it a replica set?")]
    NoClusterTime(&'static str),
}

impl OwnershipError {
    pub fn is_transient(&self) -> bool {
        matches!(self, OwnershipError::Mongo(e) if mongo::classify(e) == mongo::ErrorClass::Transient)
    }
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

    /// Stores a change of a service's share as pending (the next epoch); [`Self::resolve`] gives
    /// it its times. Concurrent changes are serialised on the epoch.
    pub async fn begin(&self, service: &str, percent: u8, forced: bool) -> Result<Ownership, OwnershipError> {
        loop {
            let current = self.get(service).await?;
            let epoch = current.as_ref().map_or(0, |o| o.epoch);
            let mut history = current.map(|o| o.history).unwrap_or_default();
            let now = DateTime::now();
            let zero = Timestamp { time: 0, increment: 0 };
            history.push(Step {
                epoch: epoch + 1,
                percent,
                at_monolith: zero,
                at_service: zero,
                set_at: now,
                forced,
                pending: true,
            });
            let skip = history.len().saturating_sub(HISTORY);
            history.drain(..skip);
            // A change of share ends any fence: the flip of a safe cutover, or a forced switch.
            let next = Ownership {
                service: service.to_string(),
                epoch: epoch + 1,
                percent,
                history,
                updated: now,
                fenced: None,
            };
            if self.replace_at(epoch, &next).await? {
                return Ok(next);
            }
        }
    }

    /// Stores `next` if the record is still at `epoch` (0: there is none yet); `false` when
    /// someone else moved the epoch meanwhile (read again and retry).
    async fn replace_at(&self, epoch: i64, next: &Ownership) -> Result<bool, OwnershipError> {
        let service = next.service.as_str();
        let d = bson::serialize_to_document(next)
            .map_err(|e| OwnershipError::Corrupt { service: service.to_string(), reason: e.to_string() })?;
        let filter = if epoch == 0 {
            doc! { "_id": service }
        } else {
            doc! { "_id": service, "epoch": epoch }
        };
        match self.coll.replace_one(filter, d).upsert(epoch == 0).await {
            Ok(r) => Ok(r.matched_count == 1 || r.upserted_id.is_some()),
            Err(e) if mongo::error_code(&e) == Some(11000) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Fences `buckets` (or, with `None`, lifts the fence) at the next epoch; the share is
    /// unchanged. Returns the record as stored. Idempotent: a record already so is returned as
    /// it is.
    pub async fn set_fence(
        &self,
        service: &str,
        buckets: Option<std::ops::Range<u8>>,
    ) -> Result<Ownership, OwnershipError> {
        loop {
            let current = self.get(service).await?;
            let epoch = current.as_ref().map_or(0, |o| o.epoch);
            let was = current.as_ref().and_then(|o| o.fenced);
            if was.map(|f| f.from..f.to) == buckets
                && let Some(o) = current.clone()
            {
                return Ok(o);
            }
            let now = DateTime::now();
            let mut next = current.unwrap_or(Ownership {
                service: service.to_string(),
                epoch: 0,
                percent: 0,
                history: Vec::new(),
                updated: now,
                fenced: None,
            });
            next.epoch = epoch + 1;
            next.updated = now;
            next.fenced = buckets.clone().map(|b| Fence { from: b.start, to: b.end, epoch: epoch + 1 });
            if self.replace_at(epoch, &next).await? {
                return Ok(next);
            }
        }
    }

    /// Gives every pending step of a service the times `at` (monolith, service), read after it
    /// was stored.
    pub async fn resolve(
        &self,
        service: &str,
        at: (Timestamp, Timestamp),
    ) -> Result<Option<Ownership>, OwnershipError> {
        loop {
            let Some(mut o) = self.get(service).await? else { return Ok(None) };
            if !o.pending() {
                return Ok(Some(o));
            }
            for s in o.history.iter_mut().filter(|s| s.pending) {
                s.at_monolith = at.0;
                s.at_service = at.1;
                s.pending = false;
            }
            o.updated = DateTime::now();
            let d = bson::serialize_to_document(&o)
                .map_err(|e| OwnershipError::Corrupt { service: service.to_string(), reason: e.to_string() })?;
            let r = self.coll.replace_one(doc! { "_id": service, "epoch": o.epoch }, d).await?;
            if r.matched_count == 1 {
                return Ok(Some(o));
            }
        }
    }
}

/// Reads views: the clusters' times first, then the records.
#[derive(Clone)]
pub struct OwnershipSource {
    pub store: OwnershipStore,
    /// The monolith's database and one on the service databases' cluster (for their clocks).
    pub monolith: Database,
    pub services: Database,
}

impl OwnershipSource {
    /// The clusters' times now: (monolith, service databases).
    pub async fn clocks(&self) -> Result<(Timestamp, Timestamp), OwnershipError> {
        let m = mongo::cluster_time(&self.monolith).await?.ok_or(OwnershipError::NoClusterTime("the monolith"))?;
        let s =
            mongo::cluster_time(&self.services).await?.ok_or(OwnershipError::NoClusterTime("the service databases"))?;
        Ok((m, s))
    }

    /// A view of the records now.
    pub async fn read(&self) -> Result<View, OwnershipError> {
        let valid_to = self.clocks().await?;
        Ok(View { records: self.store.all().await?, valid_to })
    }

    /// Sets a service's share at once, the two steps together (see the module header).
    pub async fn set(&self, service: &str, percent: u8, forced: bool) -> Result<Ownership, OwnershipError> {
        self.store.begin(service, percent, forced).await?;
        let at = self.clocks().await?;
        let o = self.store.resolve(service, at).await?;
        o.ok_or_else(|| OwnershipError::Corrupt { service: service.into(), reason: "vanished while being set".into() })
    }
}

/// Follows the store's records for a process: re-read every `every`, and on demand when a
/// change is newer than the view ([`Self::fresh`]).
#[derive(Clone)]
pub struct OwnershipFeed {
    source: OwnershipSource,
    tx: Arc<watch::Sender<Ownerships>>,
}

impl OwnershipFeed {
    /// Starts following; the first read is awaited (so nothing is judged by an empty view).
    pub async fn start(
        source: OwnershipSource,
        every: Duration,
        shutdown: CancellationToken,
    ) -> Result<OwnershipFeed, OwnershipError> {
        let first = source.read().await?;
        let (tx, _) = watch::channel(Arc::new(first));
        let feed = OwnershipFeed { source, tx: Arc::new(tx) };
        log_changes(&View::default(), &feed.current());
        let polling = feed.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                if let Err(e) = polling.refresh().await {
                    tracing::warn!("reading ownership: {e}");
                }
            }
        });
        Ok(feed)
    }

    /// A feed that never changes (tests, and commands run once).
    pub fn fixed(source: OwnershipSource, view: View) -> OwnershipFeed {
        let (tx, _) = watch::channel(Arc::new(view));
        OwnershipFeed { source, tx: Arc::new(tx) }
    }

    /// The latest view.
    pub fn current(&self) -> Ownerships {
        self.tx.borrow().clone()
    }

    /// Notified on every change of a view's records.
    pub fn subscribe(&self) -> watch::Receiver<Ownerships> {
        self.tx.subscribe()
    }

    /// Reads a new view and hands it on.
    pub async fn refresh(&self) -> Result<Ownerships, OwnershipError> {
        let view = Arc::new(self.source.read().await?);
        let was = self.current();
        if view.records != was.records {
            log_changes(&was, &view);
        }
        self.tx.send_replace(view.clone());
        Ok(view)
    }

    /// A view that can judge a change of `service` committed at `ts` on `clock`: the latest if
    /// it can, else fresh ones until one can (a pending step is waited out).
    pub async fn fresh(&self, service: &str, clock: Clock, ts: Timestamp) -> Result<Ownerships, OwnershipError> {
        let mut view = self.current();
        let mut waited = 0u32;
        while view.judge(service, clock, ts) == Judgement::Stale {
            if waited > 0 {
                tokio::time::sleep(Duration::from_millis(20 * u64::from(waited.min(25)))).await;
            }
            view = self.refresh().await?;
            waited += 1;
            if waited.is_multiple_of(100) {
                tracing::warn!(
                    service,
                    "a change of ownership has been pending for a while (an interrupted `ficus cutover`? run it again)"
                );
            }
        }
        Ok(view)
    }
}

fn log_changes(was: &View, now: &View) {
    for (service, o) in &now.records {
        if was.get(service).is_none_or(|w| w.epoch != o.epoch || w.pending() != o.pending()) {
            tracing::info!(%service, percent = o.percent, epoch = o.epoch, pending = o.pending(), "ownership");
            metrics::gauge!("ficus_cutover_percent", "service" => service.clone()).set(f64::from(o.percent));
            metrics::gauge!("ficus_cutover_epoch", "service" => service.clone()).set(o.epoch as f64);
        }
    }
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
            pending: false,
        };
        let o = Ownership {
            service: "customers_db".into(),
            epoch: 2,
            percent: 0,
            history: vec![step(1, 50, 10, 500), step(2, 0, 20, 600)],
            updated: DateTime::from_millis(0),
            fenced: None,
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
        assert_eq!(o.periods(), [(ts(500), Some(ts(600)))]);
        let mut back = o.clone();
        back.history.push(step(3, 10, 30, 700));
        back.history.push(step(4, 50, 40, 800));
        back.percent = 50;
        assert_eq!(back.periods(), [(ts(500), Some(ts(600))), (ts(700), None)], "the current period began at 10%");
    }

    #[test]
    fn a_view_judges_only_what_it_can_see() {
        let step = |percent, at, pending| Step {
            epoch: 1,
            percent,
            at_monolith: ts(at),
            at_service: ts(at),
            set_at: DateTime::from_millis(0),
            forced: true,
            pending,
        };
        let o = |steps: Vec<Step>| Ownership {
            service: "s".into(),
            epoch: 1,
            percent: 50,
            history: steps,
            updated: DateTime::from_millis(0),
            fenced: None,
        };
        let view = |records: Vec<Ownership>| View {
            records: records.into_iter().map(|o| (o.service.clone(), o)).collect(),
            valid_to: (ts(100), ts(100)),
        };
        let v = view(vec![o(vec![step(50, 10, false)])]);
        assert_eq!(v.judge("s", Clock::Monolith, ts(50)), Judgement::Percent(50));
        assert_eq!(v.judge("s", Clock::Service, ts(5)), Judgement::Percent(0));
        // Newer than the view: a step stored since could apply.
        assert_eq!(v.judge("s", Clock::Monolith, ts(101)), Judgement::Stale);
        assert_eq!(v.judge("other", Clock::Monolith, ts(50)), Judgement::Percent(0));
        assert_eq!(v.judge("other", Clock::Monolith, ts(101)), Judgement::Stale);
        // A pending step: nothing can be judged until it has its times.
        let v = view(vec![o(vec![step(50, 10, false), step(100, 0, true)])]);
        assert_eq!(v.judge("s", Clock::Monolith, ts(50)), Judgement::Stale);
        assert_eq!(v.get("s").unwrap().percent_at(Clock::Monolith, ts(50)), 50, "pending steps aside");
    }
}
