//! Following ownership: views of every service's record read from the store with the clusters'
//! times read just before them (see `ownership` for why), re-read by every running process, and
//! the acknowledgements a process gives of the epochs it has adopted (see `views`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::Timestamp;
use mongodb::Database;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ownership::{Judgement, OwnershipError, OwnershipStore, Ownerships, Side, View};
use super::views::{Viewer, Views};
use crate::mongo;

/// Reads views: the clusters' times first, then the records.
#[derive(Clone)]
pub struct OwnershipSource {
    pub store: OwnershipStore,
    /// ficus's store (the registry of views).
    pub store_db: Database,
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
        let read_at = std::time::Instant::now();
        let valid_to = self.clocks().await?;
        Ok(View { records: self.store.all().await?, valid_to, read_at })
    }
}

/// Follows the store's records for a process: re-read every `every`, and on demand when a
/// change is newer than the view ([`Self::fresh`]).
#[derive(Clone)]
pub struct OwnershipFeed {
    source: OwnershipSource,
    tx: Arc<watch::Sender<Ownerships>>,
    /// How often it is read again; a view older than this is read again before it judges.
    every: Duration,
    /// Batches being written under a view: per service, the record's revision each was judged by.
    judging: Arc<Mutex<Vec<(u64, String, i64)>>>,
}

/// A batch being written under a view of a service's ownership: until it is dropped, the
/// process acknowledges no revision of that service's record newer than the view's (see
/// `views`), and the batch may commit only while [`Judging::still_current`].
pub struct Judging {
    id: u64,
    judging: Arc<Mutex<Vec<(u64, String, i64)>>>,
    tx: Arc<watch::Sender<Ownerships>>,
    service: String,
    revision: i64,
    max_age: Duration,
}

impl Judging {
    /// Whether the view the batch was judged by still holds: the process's latest view shows the
    /// same revision of the record and is younger than `max_age` (the consume settings'
    /// `judgement_max_age`, half the servers' transaction lifetime). A healthy process reads a
    /// view every polling interval, so only a change of ownership, or a process paused for a
    /// while (its views stopped), ends it; a batch of any length otherwise commits. Why this is
    /// enough: a forced switch waits for this process's acknowledgement (never given while the
    /// batch runs) or for the transaction lifetime plus `max_age` plus a margin; a batch that
    /// passes this check has a view read before the switch's pending step and at most `max_age`
    /// old, and its transaction, begun before the check, commits within the lifetime or is
    /// aborted by the server: either way before the switch takes effect.
    pub fn still_current(&self) -> Result<(), String> {
        let view = self.tx.borrow().clone();
        let revision = view.get(&self.service).map_or(0, |o| o.revision);
        if revision != self.revision {
            return Err(format!("{}'s ownership changed (revision {} → {revision})", self.service, self.revision));
        }
        let age = view.read_at.elapsed();
        if age > self.max_age {
            return Err(format!("the latest view of ownership is {}s old", age.as_secs()));
        }
        Ok(())
    }
}

impl Drop for Judging {
    fn drop(&mut self) {
        let mut j = self.judging.lock().unwrap_or_else(|e| e.into_inner());
        j.retain(|(id, _, _)| *id != self.id);
    }
}

/// Per service the process judges, the revision of its record the process can acknowledge: its
/// view's (0 while the service has no record), or the oldest a batch still being written was
/// judged by (pure).
pub fn acknowledged(view: &View, services: &[String], judging: &[(u64, String, i64)]) -> Vec<(String, i64)> {
    services
        .iter()
        .map(|service| {
            let now = view.get(service).map_or(0, |o| o.revision);
            let oldest = judging.iter().filter(|(_, s, _)| s == service).map(|(_, _, r)| *r).min();
            (service.clone(), oldest.map_or(now, |r| r.min(now)))
        })
        .collect()
}

impl OwnershipFeed {
    /// Starts following; the first read is awaited (so nothing is judged by an empty view).
    /// Starts following; the first read is awaited (so nothing is judged by an empty view).
    /// After every read the process acknowledges, as `instance` in the store's registry of
    /// views, the revisions of the records of `services` (those it judges) it has adopted
    /// ([`acknowledged`]).
    pub async fn start(
        source: OwnershipSource,
        every: Duration,
        (instance, services): (String, Vec<String>),
        shutdown: CancellationToken,
    ) -> Result<OwnershipFeed, OwnershipError> {
        let first = source.read().await?;
        let (tx, _) = watch::channel(Arc::new(first));
        let feed = OwnershipFeed { source, tx: Arc::new(tx), every, judging: Arc::default() };
        log_changes(&View::default(), &feed.current());
        let polling = feed.clone();
        let views = Views::new(&feed.source.store_db);
        tokio::spawn(async move {
            loop {
                let view = polling.current();
                let epochs = {
                    let judging = polling.judging.lock().unwrap_or_else(|e| e.into_inner());
                    acknowledged(&view, &services, &judging)
                };
                if let Err(e) = views.saw(Viewer::Ficus, &instance, &epochs).await {
                    tracing::warn!("acknowledging ownership: {e}");
                }
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

    /// A feed that is read only when a change needs a fresher view (tests, and commands run
    /// once); it acknowledges nothing.
    pub fn fixed(source: OwnershipSource, view: View) -> OwnershipFeed {
        let (tx, _) = watch::channel(Arc::new(view));
        OwnershipFeed { source, tx: Arc::new(tx), every: Duration::MAX, judging: Arc::default() }
    }

    /// Marks a batch of `service` as being written under a view of its record at `revision`,
    /// which holds while the process's views show it and are younger than `max_age` (see
    /// [`Judging`]).
    pub fn judging(&self, service: &str, revision: i64, max_age: Duration) -> Judging {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.judging.lock().unwrap_or_else(|e| e.into_inner()).push((id, service.to_string(), revision));
        let (judging, tx) = (self.judging.clone(), self.tx.clone());
        Judging { id, judging, tx, service: service.to_string(), revision, max_age }
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
        // Bounded: a read on a connection the network dropped silently waits for good, and a
        // consumer judging a batch waits on it (under network faults one held its consumer, and
        // its drain on SIGTERM, for good).
        const READ_TIMEOUT: Duration = Duration::from_secs(30);
        let read = tokio::time::timeout(READ_TIMEOUT, self.source.read()).await;
        let view = Arc::new(read.map_err(|_| OwnershipError::TimedOut(READ_TIMEOUT))??);
        let was = self.current();
        if view.records != was.records {
            log_changes(&was, &view);
        }
        self.tx.send_replace(view.clone());
        Ok(view)
    }

    /// A view that can judge a change of `service` committed at `ts` on `clock`, and say who
    /// owns its key now: the latest if it can and is younger than the polling interval (a
    /// process paused for a while must not take an old view for the present), else fresh ones
    /// until one can (a pending step is waited out).
    pub async fn fresh(&self, service: &str, clock: Side, ts: Timestamp) -> Result<Ownerships, OwnershipError> {
        let mut view = self.current();
        if view.read_at.elapsed() > self.every {
            view = self.refresh().await?;
        }
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
    use crate::cutover::ownership::Ownership;

    #[test]
    fn a_process_acknowledges_no_revision_newer_than_a_batch_in_flight_judged_by() {
        let record = |revision| Ownership {
            service: "s".into(),
            epoch: 1,
            revision,
            percent: 0,
            history: Vec::new(),
            updated: bson::DateTime::from_millis(0),
            fenced: None,
        };
        let view = View { records: [("s".to_string(), record(7))].into(), ..View::default() };
        let services = vec!["s".to_string(), "new".to_string()];
        assert_eq!(acknowledged(&view, &services, &[]), [("s".to_string(), 7), ("new".to_string(), 0)]);
        let judging = [(1, "s".to_string(), 6), (2, "s".to_string(), 7), (3, "other".to_string(), 1)];
        assert_eq!(acknowledged(&view, &services, &judging)[0], ("s".to_string(), 6), "a batch judged at 6 still runs");
    }
}
