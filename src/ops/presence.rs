//! Which live process holds which consumer-group slot: one record per (group, instance id) in
//! ficus's store, renewed while the member runs.
//!
//! Static group membership (`kafka.instance_id`) lets a process that restarts in place take its
//! partitions straight back, but it makes two live processes configured with the same instance
//! id a hazard: each join fences the other, and under a supervisor they would take turns for
//! ever. So before a consumer joins its group it claims the slot here; a slot renewed by another
//! live process is a configuration error, reported naming `kafka.instance_id` (exit 2, which
//! the systemd unit does not restart), and the newcomer never joins, so the running member is
//! left alone. A slot whose holder died (SIGKILL) is taken over: at once when the holder was
//! this host's process and is gone, otherwise once the record stops being renewed.
//!
//! The records also tell `ficus status` what each member holds (partitions, whether its group
//! is stalled), which a broker without group description (Tansu) cannot.

use std::time::{Duration, Instant};

use bson::{DateTime, Document, doc};
use mongodb::{Collection, Database};
use tokio_util::sync::CancellationToken;

use crate::mongo;
use crate::retry::{Classify, ErrorClass};

/// The collection in the store.
pub const CONSUMERS: &str = "consumers";
const DUPLICATE_KEY: i32 = 11000;

/// How long a record lives unrenewed; members renew every third of it.
pub const TTL: Duration = Duration::from_secs(15);

/// Another live process holds this group slot.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "another live ficus process ({holder}) is a member of consumer group {group} as kafka.instance_id `{instance_id}`: \
     two processes must not share an instance id. Give each process slot its own kafka.instance_id \
     (FICUS_KAFKA_INSTANCE_ID; the default is the host name), or stop the other one"
)]
pub struct InstanceConflict {
    pub group: String,
    pub instance_id: String,
    pub holder: String,
}

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error(transparent)]
    Conflict(#[from] InstanceConflict),
    #[error("consumer registry: {}", mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
}

impl Classify for PresenceError {
    fn class(&self) -> ErrorClass {
        match self {
            PresenceError::Conflict(_) => ErrorClass::Fatal,
            PresenceError::Mongo(e) => e.class(),
        }
    }
}

/// What a member reports about itself on every renewal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberState {
    /// Partitions assigned to it now.
    pub partitions: usize,
    /// Set while its group is stalled: it holds nothing while messages wait (see
    /// `consume::StallWatch`).
    pub stalled: Option<String>,
}

/// This process's claim on one group slot.
#[derive(Clone)]
pub struct Slot {
    coll: Collection<Document>,
    id: String,
    group: String,
    instance_id: String,
    host: String,
    pid: u32,
    nonce: String,
}

impl Slot {
    /// Claims `(group, instance_id)` for this process, waiting up to one [`TTL`] for a record
    /// left by a holder that is gone. Returns [`InstanceConflict`] when the record keeps being
    /// renewed by someone else.
    pub async fn claim(
        db: &Database,
        group: &str,
        instance_id: &str,
        shutdown: &CancellationToken,
    ) -> Result<Option<Slot>, PresenceError> {
        let slot = Slot {
            coll: db.collection(CONSUMERS),
            id: format!("{group}/{instance_id}"),
            group: group.to_string(),
            instance_id: instance_id.to_string(),
            host: crate::config::host_name(),
            pid: std::process::id(),
            nonce: incarnation(),
        };
        let mut first_seen: Option<(DateTime, std::time::Instant)> = None;
        loop {
            if slot.try_take().await? {
                return Ok(Some(slot));
            }
            let Some(held) = slot.coll.find_one(doc! { "_id": &slot.id }).await? else { continue };
            let holder = describe_holder(&held);
            // This host's process that is gone (SIGKILL, a crash): its slot is ours at once.
            let same_host = held.get_str("host").is_ok_and(|h| h == slot.host);
            let pid = held.get_i64("pid").ok().and_then(|p| u32::try_from(p).ok());
            if same_host && pid.is_some_and(|p| !process_alive(p)) && slot.take_over(&held).await? {
                tracing::info!(group, instance_id, previous = %holder, "took over the group slot of a process that is gone");
                return Ok(Some(slot));
            }
            let expires = held.get_datetime("expires").copied().unwrap_or(DateTime::from_millis(0));
            match first_seen {
                None => {
                    tracing::warn!(group, instance_id, holder = %holder, "group slot held by another process; waiting to see whether it is alive");
                    first_seen = Some((expires, std::time::Instant::now()));
                }
                // Renewed while we watched: a live process holds it.
                Some((was, _)) if expires > was => {
                    return Err(InstanceConflict {
                        group: group.to_string(),
                        instance_id: instance_id.to_string(),
                        holder,
                    }
                    .into());
                }
                Some((_, since)) if since.elapsed() > TTL * 2 => {
                    return Err(InstanceConflict {
                        group: group.to_string(),
                        instance_id: instance_id.to_string(),
                        holder,
                    }
                    .into());
                }
                Some(_) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    fn record(&self, state: &MemberState) -> Document {
        doc! {
            "group": &self.group,
            "instance": &self.instance_id,
            "host": &self.host,
            "pid": i64::from(self.pid),
            "nonce": &self.nonce,
            "partitions": state.partitions as i64,
            "stalled": state.stalled.clone(),
            "updated": DateTime::now(),
            "expires": DateTime::from_millis(DateTime::now().timestamp_millis() + TTL.as_millis() as i64),
        }
    }

    /// Takes the slot if it is free, expired, or already ours.
    async fn try_take(&self) -> Result<bool, mongodb::error::Error> {
        let filter = doc! { "_id": &self.id, "$or": [
            { "expires": { "$lt": DateTime::now() } },
            { "nonce": &self.nonce },
            // The same process slot restarted in a fresh PID namespace (a container restart).
            { "host": &self.host, "pid": i64::from(self.pid) },
        ] };
        let set = self.record(&MemberState::default());
        match self.coll.update_one(filter, doc! { "$set": set }).upsert(true).await {
            Ok(_) => Ok(true),
            Err(e) if mongo::error_code(&e) == Some(DUPLICATE_KEY) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Takes over from exactly the record seen (a dead holder's), unless it changed meanwhile.
    async fn take_over(&self, seen: &Document) -> Result<bool, mongodb::error::Error> {
        let nonce = seen.get_str("nonce").unwrap_or_default();
        let r = self
            .coll
            .update_one(doc! { "_id": &self.id, "nonce": nonce }, doc! { "$set": self.record(&MemberState::default()) })
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Renews the claim with the member's state. `Ok(false)` if another process took the slot
    /// (this one was paused past the TTL).
    pub async fn renew(&self, state: &MemberState) -> Result<bool, mongodb::error::Error> {
        let r = self
            .coll
            .update_one(doc! { "_id": &self.id, "nonce": &self.nonce }, doc! { "$set": self.record(state) })
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Gives the slot up on a clean stop, so the same instance id elsewhere need not wait.
    pub async fn release(&self) {
        let expired = doc! { "$set": { "expires": DateTime::from_millis(0), "partitions": 0_i64 } };
        if let Err(e) = self.coll.update_one(doc! { "_id": &self.id, "nonce": &self.nonce }, expired).await {
            tracing::debug!(group = %self.group, "releasing the group slot: {e}");
        }
    }
}

/// The live members of a group as the registry has them: (instance id, state).
pub async fn live_members(db: &Database, group: &str) -> Result<Vec<(String, MemberState)>, mongodb::error::Error> {
    use futures::TryStreamExt;
    let docs: Vec<Document> = db
        .collection::<Document>(CONSUMERS)
        .find(doc! { "group": group, "expires": { "$gt": DateTime::now() } })
        .await?
        .try_collect()
        .await?;
    Ok(docs
        .into_iter()
        .map(|d| {
            let state = MemberState {
                partitions: d.get_i64("partitions").unwrap_or(0).max(0) as usize,
                stalled: d.get_str("stalled").ok().map(str::to_string),
            };
            (d.get_str("instance").unwrap_or("?").to_string(), state)
        })
        .collect())
}

fn describe_holder(d: &Document) -> String {
    let host = d.get_str("host").unwrap_or("?");
    let pid = d.get_i64("pid").map(|p| p.to_string()).unwrap_or_else(|_| "?".into());
    format!("pid {pid} on {host}")
}

/// Whether a process with this id runs on this host (Linux `/proc`).
pub(crate) fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Tells this incarnation of the process apart from an earlier one with the same host and pid.
fn incarnation() -> String {
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{}-{}", std::process::id(), started.as_nanos())
}

/// Why a member is replaced by a fresh one (the `reason` of `ficus_consumer_rejoins_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejoin {
    /// It has held no partitions while its group has messages waiting and nobody's committed
    /// offsets move: the group's assignment left it out, or handed its share to nobody.
    IdleBesideLag,
    /// Its group has not admitted it (joined and synced) for long, although a broker answers:
    /// its joins keep timing out.
    JoinTimedOut,
}

impl Rejoin {
    pub fn label(self) -> &'static str {
        match self {
            Rejoin::IdleBesideLag => "idle_beside_lag",
            Rejoin::JoinTimedOut => "join_timed_out",
        }
    }
}

/// What a member looks like at one moment: the partitions it holds, how it stands with its
/// group, and, when [`MemberWatch::wants_progress`] asked for it, the group's progress.
#[derive(Debug, Clone, Default)]
pub struct Sighting {
    pub partitions: usize,
    /// Whether any broker answers.
    pub connected: bool,
    /// Whether the group has admitted it; `None` while unknown.
    pub admitted: Option<bool>,
    /// When the group last handed it an assignment (an empty one too): a join that completed.
    pub assigned: Option<Instant>,
    pub progress: Option<crate::bus::GroupLag>,
}

/// What the watch makes of a member: whether it is stalled (not ready, and why) and whether it
/// should be replaced by a fresh member now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    pub stalled: Option<String>,
    pub rejoin: Option<Rejoin>,
}

/// How long each condition may last before the watch acts on it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Holding nothing, or waiting to be admitted, is unremarkable this long (a rebalance
    /// finishing); past it the member is stalled (not ready) if the condition holds.
    pub grace: Duration,
    /// A member stalled beside lag this long is replaced.
    pub idle_rejoin: Duration,
    /// A member not admitted this long, with a broker answering, is replaced.
    pub join_rejoin: Duration,
}

impl Limits {
    /// The limits for a member that is the `rejoins`-th fresh one in a row: each wait doubles,
    /// up to eight times the first, so a group that no fresh member helps is not churned.
    pub fn after(self, rejoins: u32) -> Limits {
        let k = 1u32 << rejoins.min(3);
        Limits { grace: self.grace, idle_rejoin: self.idle_rejoin * k, join_rejoin: self.join_rejoin * k }
    }
}

/// The limits `ficus run` uses. The grace is a session timeout and the rebalance after it. A
/// member is replaced after a minute stalled beside lag (it was stalled only once the group's
/// offsets had not moved for the grace, so about 100 s after it last held anything), or after
/// two minutes not admitted: longer than the Tansu stall a new static member's first join can
/// meet (seen for 100 s) and than an orderly rebalance takes on Kafka, shorter than a supervisor
/// would wait.
pub const LIMITS: Limits = Limits {
    grace: Duration::from_secs(20),
    idle_rejoin: Duration::from_secs(60),
    join_rejoin: Duration::from_secs(120),
};

/// Tells a stalled group from an idle member, and decides when a member should give way to a
/// fresh one. A member that holds no partitions is normal (more members than partitions, a
/// rebalance in progress), but when it has held none for a while, the group has unconsumed
/// messages and nobody's committed offsets move, the group is stalled (a dead member the
/// coordinator never evicts, an assignment that left partitions to nobody) and this member is
/// not ready; so is one whose group has not admitted it for a while although a broker answers.
/// Either, lasting, calls for a fresh member ([`Rejoin`]). A member with no broker at all is
/// neither: librdkafka reconnects and rejoins by itself, and a fresh member then would leave
/// the old one behind in the group (its leave cannot be sent).
#[derive(Debug, Clone)]
pub struct MemberWatch {
    limits: Limits,
    empty_since: Option<Instant>,
    /// The group's committed offsets when last looked at, and since when they have not moved.
    committed: Option<(i64, Instant)>,
    /// Since when it has been stalled beside lag.
    stalled_since: Option<Instant>,
    /// Since when it has been connected but not admitted.
    outside_since: Option<Instant>,
    /// Whether it ever held partitions.
    held: bool,
}

impl MemberWatch {
    pub fn new(limits: Limits) -> Self {
        MemberWatch {
            limits,
            empty_since: None,
            committed: None,
            stalled_since: None,
            outside_since: None,
            held: false,
        }
    }

    /// Whether the member ever held partitions (a fresh member that did helped).
    pub fn held(&self) -> bool {
        self.held
    }

    /// Whether [`Self::observe`] needs the group's progress now (it costs a few requests).
    pub fn wants_progress(&self, now: Instant, partitions: usize) -> bool {
        partitions == 0 && self.empty_since.is_some_and(|t| now.duration_since(t) >= self.limits.grace)
    }

    /// Records a sighting; returns whether the member is stalled and whether to replace it.
    pub fn observe(&mut self, now: Instant, seen: Sighting) -> Verdict {
        let grace = self.limits.grace;
        let lasted = |since: Option<Instant>, limit: Duration| since.is_some_and(|t| now.duration_since(t) >= limit);
        // Holding partitions: healthy, whatever its group is doing (a rebalance under way, a
        // coordinator that is slow to answer: its partitions are read all the same).
        if seen.partitions > 0 {
            self.held = true;
            self.empty_since = None;
            self.committed = None;
            self.stalled_since = None;
            self.outside_since = None;
            return Verdict::default();
        }
        // Admission: only judged while a broker answers, and counted from the last join that
        // completed (a group that keeps rebalancing still admits its members each time).
        match (seen.connected, seen.admitted) {
            (true, Some(false)) => {
                let since = self.outside_since.get_or_insert(now);
                if let Some(a) = seen.assigned.filter(|a| *a > *since) {
                    *since = a;
                }
            }
            (true, None) => {}
            _ => self.outside_since = None,
        }
        let outside = lasted(self.outside_since, grace).then(|| {
            let secs = self.outside_since.map_or(0, |t| now.duration_since(t).as_secs());
            let rejoin = lasted(self.outside_since, self.limits.join_rejoin).then_some(Rejoin::JoinTimedOut);
            (format!("not admitted to its group for {secs}s"), rejoin)
        });
        // Idle beside lag says more than "not admitted" (it names the lag): it comes first.
        let idle = self.idle(now, seen.progress);
        match (idle, outside) {
            (Verdict { stalled: Some(why), rejoin }, outside) => {
                Verdict { stalled: Some(why), rejoin: rejoin.or(outside.and_then(|o| o.1)) }
            }
            (_, Some((why, rejoin))) => Verdict { stalled: Some(why), rejoin },
            (idle, None) => idle,
        }
    }

    /// The judgement of a member that holds no partitions, by its group's lag and progress.
    fn idle(&mut self, now: Instant, progress: Option<crate::bus::GroupLag>) -> Verdict {
        let grace = self.limits.grace;
        let empty_since = *self.empty_since.get_or_insert(now);
        if now.duration_since(empty_since) < grace {
            return Verdict::default();
        }
        let Some(p) = progress else {
            // Nothing new to judge by: the last judgement stands.
            return self.stalled_verdict(now, None);
        };
        let since = match self.committed {
            Some((c, since)) if c == p.committed_sum => since,
            _ => {
                self.committed = Some((p.committed_sum, now));
                now
            }
        };
        if p.lag > 0 && now.duration_since(since) >= grace {
            self.stalled_since.get_or_insert(now);
            self.stalled_verdict(now, Some(p.lag))
        } else {
            self.stalled_since = None;
            Verdict::default()
        }
    }

    fn stalled_verdict(&self, now: Instant, lag: Option<i64>) -> Verdict {
        let Some(since) = self.stalled_since else { return Verdict::default() };
        let why = match lag {
            Some(lag) => format!("no partitions assigned, lag {lag}"),
            None => "no partitions assigned, lag unknown".to_string(),
        };
        let rejoin = (now.duration_since(since) >= self.limits.idle_rejoin).then_some(Rejoin::IdleBesideLag);
        Verdict { stalled: Some(why), rejoin }
    }
}

/// How a member's keeper ended: with a call for a fresh member, and whether it ever held
/// partitions (so whether the run of fresh members is over).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeeperEnd {
    pub rejoin: Option<Rejoin>,
    pub held: bool,
}

/// Keeps a group member's slot and readiness up to date until `stop`: every third of the
/// [`TTL`] it renews the slot with the partitions held and watches the member ([`MemberWatch`]),
/// which makes the role not ready while it is stalled. When the watch calls for a fresh member,
/// it says so (log, `ficus_consumer_rejoins_total{group,reason}`), cancels `member` (the role
/// ends this member at its next batch and joins again) and returns the reason. Returns
/// [`InstanceConflict`] if another process took the slot (this one was paused past the TTL).
pub async fn keep(
    slot: Slot,
    member: crate::bus::GroupConsumer,
    role: crate::ops::RoleId,
    health: crate::ops::Health,
    limits: Limits,
    stop: CancellationToken,
) -> Result<KeeperEnd, InstanceConflict> {
    let mut watch = MemberWatch::new(limits);
    loop {
        let now = Instant::now();
        let partitions = member.partitions();
        let standing = member.standing();
        let progress = if watch.wants_progress(now, partitions) {
            let m = member.clone();
            match tokio::task::spawn_blocking(move || m.progress()).await {
                Ok(Ok(p)) => Some(p),
                Ok(Err(e)) => {
                    tracing::debug!(%role, "group progress: {e}");
                    None
                }
                Err(_) => None,
            }
        } else {
            None
        };
        let seen = Sighting {
            partitions,
            connected: standing.connected,
            admitted: standing.admitted,
            assigned: standing.assigned,
            progress,
        };
        let Verdict { stalled, rejoin } = watch.observe(now, seen);
        if let Some(why) = &stalled {
            tracing::warn!(%role, group = %slot.group, "stalled: {why}");
        }
        health.set_stalled(&role, stalled.clone());
        if let Some(reason) = rejoin {
            tracing::warn!(
                %role, group = %slot.group, reason = reason.label(),
                "replacing this group member with a fresh one ({}): {}",
                reason.label(),
                stalled.as_deref().unwrap_or_default()
            );
            metrics::counter!("ficus_consumer_rejoins_total", "group" => slot.group.clone(), "reason" => reason.label())
                .increment(1);
            stop.cancel();
            return Ok(KeeperEnd { rejoin: Some(reason), held: watch.held() });
        }
        match slot.renew(&MemberState { partitions, stalled }).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(InstanceConflict {
                    group: slot.group.clone(),
                    instance_id: slot.instance_id.clone(),
                    holder: "another process that took the slot while this one was paused".into(),
                });
            }
            Err(e) => tracing::debug!(%role, "renewing the group slot: {e}"),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(KeeperEnd { rejoin: None, held: watch.held() }),
            _ = tokio::time::sleep(TTL / 3) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::GroupLag;

    const L: Limits = Limits {
        grace: Duration::from_secs(20),
        idle_rejoin: Duration::from_secs(60),
        join_rejoin: Duration::from_secs(120),
    };

    fn seen(partitions: usize, progress: Option<(i64, i64)>) -> Sighting {
        Sighting {
            partitions,
            connected: true,
            admitted: Some(true),
            assigned: None,
            progress: progress.map(|(lag, committed_sum)| GroupLag { lag, committed_sum, ..Default::default() }),
        }
    }

    fn stalled(v: &Verdict) -> Option<&str> {
        v.stalled.as_deref()
    }

    #[test]
    fn an_idle_member_is_not_stalled_but_a_stuck_group_is() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = MemberWatch::new(L);
        // Holding partitions: never stalled, and no progress asked for.
        assert!(!w.wants_progress(at(0), 3));
        assert_eq!(w.observe(at(0), seen(3, None)), Verdict::default());
        // Holding none: fine during the grace period.
        assert_eq!(w.observe(at(1), seen(0, None)), Verdict::default());
        assert!(!w.wants_progress(at(10), 0));
        assert!(w.wants_progress(at(21), 0));
        // Lag, but the group's offsets move: another member is consuming.
        assert_eq!(w.observe(at(21), seen(0, Some((50, 100)))), Verdict::default());
        assert_eq!(w.observe(at(35), seen(0, Some((40, 110)))), Verdict::default());
        assert_eq!(w.observe(at(50), seen(0, Some((40, 120)))), Verdict::default());
        // The offsets stop moving while messages wait: stalled once that lasts the grace.
        assert_eq!(w.observe(at(60), seen(0, Some((45, 120)))), Verdict::default());
        assert_eq!(stalled(&w.observe(at(71), seen(0, Some((45, 120))))), Some("no partitions assigned, lag 45"));
        // Nothing waiting: an idle member, not a stall.
        assert_eq!(w.observe(at(72), seen(0, Some((0, 120)))), Verdict::default());
        // Partitions come back: healthy at once.
        assert_eq!(w.observe(at(73), seen(2, None)), Verdict::default());
        assert!(!w.wants_progress(at(80), 0), "the grace starts again");
        assert!(w.held());
    }

    #[test]
    fn a_member_idle_beside_lag_for_long_is_replaced() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = MemberWatch::new(L);
        assert_eq!(w.observe(at(0), seen(0, None)), Verdict::default());
        assert_eq!(w.observe(at(20), seen(0, Some((30, 7)))), Verdict::default());
        let v = w.observe(at(40), seen(0, Some((30, 7))));
        assert_eq!((stalled(&v), v.rejoin), (Some("no partitions assigned, lag 30"), None));
        // Between looks at the group, the judgement stands.
        assert_eq!(w.observe(at(45), seen(0, None)).rejoin, None);
        assert_eq!(stalled(&w.observe(at(45), seen(0, None))), Some("no partitions assigned, lag unknown"));
        // A minute stalled: a fresh member.
        assert_eq!(w.observe(at(99), seen(0, Some((30, 7)))).rejoin, None);
        assert_eq!(w.observe(at(100), seen(0, Some((31, 7)))).rejoin, Some(Rejoin::IdleBesideLag));
        assert!(!w.held(), "it never held anything");
        // The stall ends the moment the offsets move, and its clock with it.
        let mut w = MemberWatch::new(L);
        w.observe(at(0), seen(0, None));
        w.observe(at(20), seen(0, Some((30, 7))));
        w.observe(at(40), seen(0, Some((30, 7))));
        assert_eq!(w.observe(at(60), seen(0, Some((30, 9)))), Verdict::default(), "someone consumes");
        assert_eq!(w.observe(at(80), seen(0, Some((30, 9)))).rejoin, None);
        assert_eq!(w.observe(at(139), seen(0, Some((30, 9)))).rejoin, None);
        assert_eq!(w.observe(at(140), seen(0, Some((30, 9)))).rejoin, Some(Rejoin::IdleBesideLag));
    }

    #[test]
    fn a_member_whose_joins_keep_timing_out_is_replaced_but_not_without_a_broker() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let outside = |connected| Sighting { partitions: 0, connected, admitted: Some(false), ..Default::default() };
        let mut w = MemberWatch::new(L);
        assert_eq!(w.observe(at(0), outside(true)), Verdict::default());
        assert_eq!(w.observe(at(19), outside(true)), Verdict::default(), "a join takes a while");
        let v = w.observe(at(20), outside(true));
        assert_eq!((stalled(&v), v.rejoin), (Some("not admitted to its group for 20s"), None));
        assert_eq!(w.observe(at(119), outside(true)).rejoin, None);
        assert_eq!(w.observe(at(120), outside(true)).rejoin, Some(Rejoin::JoinTimedOut));
        // No broker at all: librdkafka's to recover, not a fresh member's; the clock restarts.
        let mut w = MemberWatch::new(L);
        w.observe(at(0), outside(true));
        assert_eq!(w.observe(at(100), outside(false)), Verdict::default());
        assert_eq!(w.observe(at(130), outside(true)), Verdict::default());
        assert_eq!(w.observe(at(249), outside(true)).rejoin, None);
        assert_eq!(w.observe(at(250), outside(true)).rejoin, Some(Rejoin::JoinTimedOut));
        // Admitted again: fine at once. Unknown standing (no statistics yet) changes nothing.
        let mut w = MemberWatch::new(L);
        w.observe(at(0), outside(true));
        assert_eq!(w.observe(at(30), seen(1, None)), Verdict::default());
        // Outside a rebalance that takes its time, but holding partitions: it reads them.
        let rebalancing = Sighting { partitions: 2, ..outside(true) };
        assert_eq!(w.observe(at(40), rebalancing.clone()), Verdict::default());
        assert_eq!(w.observe(at(400), rebalancing), Verdict::default());
        // A group that keeps rebalancing, handing it an empty assignment each time: admitted
        // each time, so never "not admitted" for long (its idleness is judged by the lag).
        let mut r = MemberWatch::new(L);
        for s in (0..300).step_by(5) {
            let seen = Sighting { assigned: Some(at(s.max(1) - 1)), ..outside(true) };
            assert_eq!(r.observe(at(s), seen).rejoin, None, "at {s}s");
        }
        assert_eq!(r.observe(at(300), Sighting { assigned: Some(at(295)), ..outside(true) }).stalled, None);
        // Not admitted and idle beside lag: the lag is named, and either clock calls for a fresh one.
        let mut b = MemberWatch::new(L);
        let both = |lag| Sighting {
            progress: Some(GroupLag { lag, committed_sum: 3, ..Default::default() }),
            ..outside(true)
        };
        b.observe(at(0), outside(true));
        b.observe(at(20), both(6));
        let v = b.observe(at(40), both(6));
        assert_eq!((stalled(&v), v.rejoin), (Some("no partitions assigned, lag 6"), None));
        assert_eq!(b.observe(at(100), both(6)).rejoin, Some(Rejoin::IdleBesideLag));
        let unknown = Sighting { admitted: None, ..seen(0, None) };
        assert_eq!(w.observe(at(31), unknown.clone()), Verdict::default());
        assert_eq!(w.observe(at(200), unknown), Verdict::default(), "no partitions, but no lag known either");
    }

    #[test]
    fn fresh_members_in_a_row_wait_longer_each_time() {
        assert_eq!(L.after(0).idle_rejoin, Duration::from_secs(60));
        assert_eq!(L.after(1).join_rejoin, Duration::from_secs(240));
        assert_eq!(L.after(3).idle_rejoin, Duration::from_secs(480));
        assert_eq!(L.after(9).idle_rejoin, Duration::from_secs(480), "capped");
        assert_eq!(L.after(9).grace, L.grace);
    }
}
