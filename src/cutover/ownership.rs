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

use bson::{Bson, DateTime, Document, Timestamp, doc};
use futures::TryStreamExt;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use crate::mongo;
use crate::retry::{Classify, ErrorClass};

/// The collection in the store.
pub const OWNERSHIP: &str = "ownership";
/// How many past changes each service's record keeps (enough to judge anything still in flight).
const HISTORY: usize = 50;

/// One of the two sides of a service's migration: the side a change was made on, the side that
/// owns a key, gains or loses buckets; and whose clock a time is on (each side's cluster has
/// its own, never compared with the other's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Monolith,
    Service,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Monolith => Side::Service,
            Side::Service => Side::Monolith,
        }
    }

    /// Its name in records, metrics and JSON: `monolith`, `service`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Monolith => "monolith",
            Side::Service => "service",
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Monolith => "the monolith",
            Side::Service => "the service",
        })
    }
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
    /// The fence this step lifted, with its drain point: writes on the losing side to its
    /// buckets between the drain point and this step were fence violations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifted: Option<Drained>,
}

/// A fence that was drained and then lifted by a flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drained {
    pub from: u8,
    pub to: u8,
    /// The side that lost the buckets.
    pub losing: Side,
    /// The drain point, on the losing side's clock.
    pub at: Timestamp,
}

impl Drained {
    pub fn holds(&self, bucket: u8) -> bool {
        (self.from..self.to).contains(&bucket)
    }
}

/// A service's ownership and its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ownership {
    #[serde(rename = "_id")]
    pub service: String,
    /// Grows when what applications must do changes: a fence goes up or down, a share takes
    /// effect.
    pub epoch: i64,
    /// Grows with every write of the record (the epoch, and a pending step, a drain point):
    /// writes are compared on it, and ficus's processes acknowledge it (see `views`).
    #[serde(default)]
    pub revision: i64,
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
    /// The side losing the buckets (its writes to them after the drain point are fence
    /// violations). Records from before it was kept: the monolith.
    #[serde(default = "monolith")]
    pub losing: Side,
    /// Where the losing side's drain stands.
    #[serde(default)]
    pub drain: Drain,
    /// When the fence went up (the longest allowed view age is counted from it).
    #[serde(default = "long_ago")]
    pub set_at: DateTime,
}

fn long_ago() -> DateTime {
    DateTime::from_millis(0)
}

fn monolith() -> Side {
    Side::Monolith
}

/// The drain point of a fence: the losing side's cluster time after which its writes to the
/// fenced buckets are fence violations (applications were told to hold them, and every one
/// seen had acknowledged the fence, or the longest allowed view age had passed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "at")]
pub enum Drain {
    /// Not drained yet: every write so far is drained before the flip.
    #[default]
    NotYet,
    /// Being set: the point is being read; nothing in the fenced buckets can be judged until
    /// it is stored.
    Pending,
    /// Writes on the losing side after this time are violations.
    At(Timestamp),
}

impl Fence {
    /// Whether a key's bucket is fenced.
    pub fn holds(&self, bucket: u8) -> bool {
        (self.from..self.to).contains(&bucket)
    }
}

impl Ownership {
    /// The service's share for a change committed at `ts` on `clock` (pending steps aside).
    pub fn percent_at(&self, clock: Side, ts: Timestamp) -> u8 {
        self.history
            .iter()
            .rev()
            .filter(|s| !s.pending)
            .find(|s| match clock {
                Side::Monolith => s.at_monolith < ts,
                Side::Service => s.at_service < ts,
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
    /// When it was read (its age tells whether it can still say who owns a key *now*).
    pub read_at: std::time::Instant,
}

impl Default for View {
    /// No records, judging nothing (every time is after it).
    fn default() -> Self {
        let zero = Timestamp { time: 0, increment: 0 };
        View { records: BTreeMap::new(), valid_to: (zero, zero), read_at: std::time::Instant::now() }
    }
}

impl View {
    pub fn get(&self, service: &str) -> Option<&Ownership> {
        self.records.get(service)
    }

    /// The service's share for a change committed at `ts` on `clock`, if this view can tell.
    pub fn judge(&self, service: &str, clock: Side, ts: Timestamp) -> Judgement {
        let valid_to = match clock {
            Side::Monolith => self.valid_to.0,
            Side::Service => self.valid_to.1,
        };
        match self.records.get(service) {
            Some(o) if o.pending() || o.fenced.is_some_and(|f| f.drain == Drain::Pending) => Judgement::Stale,
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
    /// Reading the records did not finish in time (a connection that hangs: the MongoDB driver
    /// has no socket timeout); read again.
    #[error("reading the ownership records did not finish within {}s; reading again", .0.as_secs())]
    TimedOut(std::time::Duration),
}

impl Classify for OwnershipError {
    fn class(&self) -> ErrorClass {
        match self {
            OwnershipError::Mongo(e) => e.class(),
            OwnershipError::TimedOut(_) => ErrorClass::Transient,
            _ => ErrorClass::Fatal,
        }
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

    /// Changes a service's record with `change` (a pure function of the record as it is, `None`
    /// when there is none; it returns the next record, or `None` to leave it as it is), stored
    /// only if nobody changed the record meanwhile (compared on the revision, which every
    /// change moves on); else read again and retried. Returns the record as stored.
    async fn update(
        &self,
        service: &str,
        mut change: impl FnMut(Option<&Ownership>) -> Option<Ownership>,
    ) -> Result<Option<Ownership>, OwnershipError> {
        loop {
            let current = self.get(service).await?;
            let Some(next) = change(current.as_ref()) else { return Ok(current) };
            if self.replace_at(current.as_ref().map(|o| o.revision), &next).await? {
                return Ok(Some(next));
            }
        }
    }

    /// Stores a change of a service's share as pending (see [`begin`]); [`Self::resolve`] gives
    /// it its times and makes it the share.
    pub async fn begin(&self, service: &str, percent: u8, forced: bool) -> Result<Ownership, OwnershipError> {
        let now = DateTime::now();
        let stored = self.update(service, |o| Some(begin(service, o, percent, forced, now))).await?;
        stored.ok_or_else(|| vanished(service))
    }

    /// Stores `next` if the record is still at `revision` (`None`: there is none yet); `false`
    /// when someone else changed it meanwhile (read again and retry).
    async fn replace_at(&self, revision: Option<i64>, next: &Ownership) -> Result<bool, OwnershipError> {
        let service = next.service.as_str();
        let d = bson::serialize_to_document(next)
            .map_err(|e| OwnershipError::Corrupt { service: service.to_string(), reason: e.to_string() })?;
        let filter = match revision {
            None => doc! { "_id": service },
            // Records from before revisions were kept have none: 0.
            Some(0) => doc! { "_id": service, "revision": { "$in": [0_i64, Bson::Null] } },
            Some(r) => doc! { "_id": service, "revision": r },
        };
        match self.coll.replace_one(filter, d).upsert(revision.is_none()).await {
            Ok(r) => Ok(r.matched_count == 1 || r.upserted_id.is_some()),
            Err(e) if mongo::error_code(&e) == Some(11000) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Fences `buckets`, lost by `losing` (or, with `None`, lifts the fence) at the next epoch;
    /// the share is unchanged. Idempotent: a record already so is returned as it is.
    pub async fn set_fence(
        &self,
        service: &str,
        buckets: Option<(std::ops::Range<u8>, Side)>,
    ) -> Result<Ownership, OwnershipError> {
        let now = DateTime::now();
        let stored = self.update(service, |o| set_fence(service, o, buckets.clone(), now)).await?;
        stored.ok_or_else(|| vanished(service))
    }

    /// Sets the fence's drain point (see [`Drain`]), at the next revision; `None` when no fence is
    /// up (an abort got there first).
    pub async fn set_drain(&self, service: &str, drain: Drain) -> Result<Option<Ownership>, OwnershipError> {
        let now = DateTime::now();
        let stored = self.update(service, |o| set_drain(o?, drain, now)).await?;
        Ok(stored.filter(|o| o.fenced.is_some_and(|f| f.drain == drain)))
    }

    /// Gives every pending step of a service the times `at` (monolith, service), read after it
    /// was stored, and makes the newest the share: the fence (if any) is lifted in the same
    /// write, so nobody ever sees the new share fenced or the old one unfenced.
    pub async fn resolve(
        &self,
        service: &str,
        at: (Timestamp, Timestamp),
    ) -> Result<Option<Ownership>, OwnershipError> {
        let now = DateTime::now();
        self.update(service, |o| resolve(o?, at, now)).await
    }

    /// Takes back a step that is pending (a flip cut short and then aborted): the record is as
    /// before it (at the next revision).
    pub async fn undo_pending(&self, service: &str) -> Result<Option<Ownership>, OwnershipError> {
        let now = DateTime::now();
        self.update(service, |o| undo_pending(o?, now)).await
    }
}

fn vanished(service: &str) -> OwnershipError {
    OwnershipError::Corrupt { service: service.into(), reason: "vanished while being changed".into() }
}

/// A record's next state with a change of share stored as **pending**: in the history, without
/// times, while the share, any fence and the epoch stay as they are, so applications keep acting
/// on the old state (fenced keys held) and every judge of a change waits for the times
/// ([`View::judge`]).
pub fn begin(service: &str, current: Option<&Ownership>, percent: u8, forced: bool, now: DateTime) -> Ownership {
    let zero = Timestamp { time: 0, increment: 0 };
    let mut next = current.cloned().unwrap_or_else(|| Ownership {
        service: service.to_string(),
        epoch: 0,
        revision: 0,
        percent: 0,
        history: Vec::new(),
        updated: now,
        fenced: None,
    });
    next.history.retain(|s| !s.pending);
    next.history.push(Step {
        epoch: next.epoch + 1,
        percent,
        at_monolith: zero,
        at_service: zero,
        set_at: now,
        forced,
        pending: true,
        lifted: None,
    });
    let skip = next.history.len().saturating_sub(HISTORY);
    next.history.drain(..skip);
    next.revision += 1;
    next.updated = now;
    next
}

/// A record's next state with its pending step timed and in force, the fence lifted; `None`
/// when nothing is pending.
pub fn resolve(current: &Ownership, at: (Timestamp, Timestamp), now: DateTime) -> Option<Ownership> {
    if !current.pending() {
        return None;
    }
    let mut next = current.clone();
    let lifted = current.fenced.and_then(|f| match f.drain {
        Drain::At(t) => Some(Drained { from: f.from, to: f.to, losing: f.losing, at: t }),
        _ => None,
    });
    for s in next.history.iter_mut().filter(|s| s.pending) {
        s.at_monolith = at.0;
        s.at_service = at.1;
        s.pending = false;
        s.lifted = lifted;
    }
    next.percent = next.history.last().map_or(next.percent, |s| s.percent);
    next.fenced = None;
    next.epoch += 1;
    next.revision += 1;
    next.updated = now;
    Some(next)
}

/// A record's next state without its pending step; `None` when nothing is pending.
pub fn undo_pending(current: &Ownership, now: DateTime) -> Option<Ownership> {
    if !current.pending() {
        return None;
    }
    let mut next = current.clone();
    next.history.retain(|s| !s.pending);
    next.revision += 1;
    next.updated = now;
    Some(next)
}

/// A record's next state with `buckets` fenced, lost by the given side (`None`: the fence
/// lifted); `None` when it is so already.
pub fn set_fence(
    service: &str,
    current: Option<&Ownership>,
    buckets: Option<(std::ops::Range<u8>, Side)>,
    now: DateTime,
) -> Option<Ownership> {
    let was = current.and_then(|o| o.fenced).map(|f| (f.from..f.to, f.losing));
    if current.is_some() && was == buckets {
        return None;
    }
    let mut next = current.cloned().unwrap_or(Ownership {
        service: service.to_string(),
        epoch: 0,
        revision: 0,
        percent: 0,
        history: Vec::new(),
        updated: now,
        fenced: None,
    });
    next.epoch += 1;
    next.revision += 1;
    next.updated = now;
    next.fenced = buckets.map(|(b, losing)| Fence {
        from: b.start,
        to: b.end,
        epoch: next.epoch,
        losing,
        drain: Drain::NotYet,
        set_at: now,
    });
    Some(next)
}

/// A record's next state with the fence's drain point set; `None` without a fence, or when it
/// is so already.
pub fn set_drain(current: &Ownership, drain: Drain, now: DateTime) -> Option<Ownership> {
    let fence = current.fenced?;
    if fence.drain == drain {
        return None;
    }
    let mut next = current.clone();
    next.revision += 1;
    next.updated = now;
    next.fenced = Some(Fence { drain, ..fence });
    Some(next)
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
            lifted: None,
        };
        let o = Ownership {
            service: "customers_db".into(),
            epoch: 2,
            revision: 0,
            percent: 0,
            history: vec![step(1, 50, 10, 500), step(2, 0, 20, 600)],
            updated: DateTime::from_millis(0),
            fenced: None,
        };
        // Before any cutover the monolith owns everything.
        assert_eq!(o.percent_at(Side::Monolith, ts(5)), 0);
        assert_eq!(o.percent_at(Side::Monolith, ts(10)), 0, "committed at the moment of the change: before it");
        assert_eq!(o.percent_at(Side::Monolith, ts(15)), 50);
        assert_eq!(o.percent_at(Side::Monolith, ts(25)), 0);
        // The service's clock is another clock: its own boundaries.
        assert_eq!(o.percent_at(Side::Service, ts(25)), 0);
        assert_eq!(o.percent_at(Side::Service, ts(550)), 50, "a service write made while it owned");
        assert_eq!(o.percent_at(Side::Service, ts(601)), 0);
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
            lifted: None,
        };
        let o = |steps: Vec<Step>| Ownership {
            service: "s".into(),
            epoch: 1,
            revision: 0,
            percent: 50,
            history: steps,
            updated: DateTime::from_millis(0),
            fenced: None,
        };
        let view = |records: Vec<Ownership>| View {
            records: records.into_iter().map(|o| (o.service.clone(), o)).collect(),
            valid_to: (ts(100), ts(100)),
            read_at: std::time::Instant::now(),
        };
        let v = view(vec![o(vec![step(50, 10, false)])]);
        assert_eq!(v.judge("s", Side::Monolith, ts(50)), Judgement::Percent(50));
        assert_eq!(v.judge("s", Side::Service, ts(5)), Judgement::Percent(0));
        // Newer than the view: a step stored since could apply.
        assert_eq!(v.judge("s", Side::Monolith, ts(101)), Judgement::Stale);
        assert_eq!(v.judge("other", Side::Monolith, ts(50)), Judgement::Percent(0));
        assert_eq!(v.judge("other", Side::Monolith, ts(101)), Judgement::Stale);
        // A pending step: nothing can be judged until it has its times.
        let v = view(vec![o(vec![step(50, 10, false), step(100, 0, true)])]);
        assert_eq!(v.judge("s", Side::Monolith, ts(50)), Judgement::Stale);
        assert_eq!(v.get("s").unwrap().percent_at(Side::Monolith, ts(50)), 50, "pending steps aside");
    }

    #[test]
    fn a_flip_is_one_write_applications_see_old_and_fenced_or_new_and_unfenced() {
        let now = DateTime::from_millis(0);
        let t = |time| Timestamp { time, increment: 0 };
        // 0 → 50: fence (the monolith loses 0..50), drain point, pending flip, flip.
        let fenced = set_fence("s", None, Some((0..50, Side::Monolith)), now).unwrap();
        assert_eq!((fenced.epoch, fenced.revision), (1, 1));
        assert_eq!((fenced.percent, fenced.fenced.map(|f| (f.from, f.to))), (0, Some((0, 50))));
        assert_eq!(set_fence("s", Some(&fenced), Some((0..50, Side::Monolith)), now), None, "idempotent");
        let pending_drain = set_drain(&fenced, Drain::Pending, now).unwrap();
        let v = View {
            records: [("s".to_string(), pending_drain.clone())].into(),
            valid_to: (t(100), t(100)),
            read_at: std::time::Instant::now(),
        };
        assert_eq!(v.judge("s", Side::Monolith, t(50)), Judgement::Stale, "the drain point is being set");
        let drained = set_drain(&pending_drain, Drain::At(t(300)), now).unwrap();
        let pending = begin("s", Some(&drained), 50, false, now);
        // Pending: what applications read is as before (share, fence and epoch), at a new
        // revision; the flip is the next epoch.
        assert_eq!((pending.epoch, pending.revision), (1, 4));
        assert_eq!((pending.percent, pending.fenced.is_some(), pending.pending()), (0, true, true));
        let flipped = resolve(&pending, (t(400), t(4000)), now).unwrap();
        assert_eq!((flipped.epoch, flipped.revision), (2, 5), "a move is a fence and a flip: two epochs");
        assert_eq!((flipped.percent, flipped.fenced, flipped.pending()), (50, None, false));
        let step = flipped.history.last().unwrap();
        assert_eq!((step.at_monolith, step.at_service), (t(400), t(4000)));
        assert_eq!(step.lifted, Some(Drained { from: 0, to: 50, losing: Side::Monolith, at: t(300) }));
        assert_eq!(resolve(&flipped, (t(500), t(5000)), now), None, "nothing pending: a resume changes nothing");
        // A pending flip undone: as before it.
        let undone = undo_pending(&pending, now).unwrap();
        assert_eq!((undone.epoch, undone.revision, undone.percent, undone.pending()), (1, 5, 0, false));
        assert_eq!(undone.history, drained.history);
        assert_eq!(undone.fenced, drained.fenced, "the fence is the abort's to lift");
        // A second begin replaces a pending step rather than stacking one.
        let again = begin("s", Some(&pending), 30, true, now);
        assert_eq!(again.history.iter().filter(|s| s.pending).count(), 1);
        assert_eq!(resolve(&again, (t(1), t(1)), now).unwrap().percent, 30);
    }
}
