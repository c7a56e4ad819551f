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

use std::time::Duration;

use bson::{DateTime, Document, doc};
use mongodb::{Collection, Database};
use tokio_util::sync::CancellationToken;

use crate::mongo;

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

impl PresenceError {
    pub fn is_transient(&self) -> bool {
        match self {
            PresenceError::Conflict(_) => false,
            PresenceError::Mongo(e) => mongo::classify(e) == mongo::ErrorClass::Transient,
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

/// Tells a stalled group from an idle member: a member that holds no partitions is normal
/// (more members than partitions, a rebalance in progress), but when it has held none for a
/// while, the group has unconsumed messages and nobody's committed offsets move, the group is
/// stalled (say, a dead member the coordinator never evicts) and this member is not ready.
#[derive(Debug, Clone)]
pub struct StallWatch {
    grace: Duration,
    empty_since: Option<std::time::Instant>,
    /// The group's committed offsets when last looked at, and since when they have not moved.
    committed: Option<(i64, std::time::Instant)>,
}

impl StallWatch {
    /// `grace`: how long holding nothing is unremarkable (longer than a session timeout, so a
    /// rebalance can finish).
    pub fn new(grace: Duration) -> Self {
        StallWatch { grace, empty_since: None, committed: None }
    }

    /// Whether [`Self::observe`] needs the group's progress now (it costs a few requests).
    pub fn wants_progress(&self, now: std::time::Instant, partitions: usize) -> bool {
        partitions == 0 && self.empty_since.is_some_and(|t| now.duration_since(t) >= self.grace)
    }

    /// Records what the member holds and, when asked for, the group's progress; returns why the
    /// member is stalled, or `None`.
    pub fn observe(
        &mut self,
        now: std::time::Instant,
        partitions: usize,
        progress: Option<crate::bus::GroupLag>,
    ) -> Option<String> {
        if partitions > 0 {
            self.empty_since = None;
            self.committed = None;
            return None;
        }
        let empty_since = *self.empty_since.get_or_insert(now);
        if now.duration_since(empty_since) < self.grace {
            return None;
        }
        let p = progress?;
        let since = match self.committed {
            Some((c, since)) if c == p.committed_sum => since,
            _ => {
                self.committed = Some((p.committed_sum, now));
                now
            }
        };
        (p.lag > 0 && now.duration_since(since) >= self.grace).then(|| format!("no partitions assigned, lag {}", p.lag))
    }
}

/// Keeps a group member's slot and readiness up to date until `stop`: every third of the
/// [`TTL`] it renews the slot with the partitions held and, while the member holds none,
/// watches for a stalled group ([`StallWatch`]), which makes the role not ready. Returns
/// [`InstanceConflict`] if another process took the slot (this one was paused past the TTL).
pub async fn keep(
    slot: Slot,
    member: crate::bus::GroupConsumer,
    role: crate::ops::RoleId,
    health: crate::ops::Health,
    stop: CancellationToken,
) -> Result<(), InstanceConflict> {
    // A session timeout, plus time for the rebalance that follows.
    let mut watch = StallWatch::new(Duration::from_secs(20));
    loop {
        let now = std::time::Instant::now();
        let partitions = member.partitions();
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
        let stalled = watch.observe(now, partitions, progress);
        if let Some(why) = &stalled {
            tracing::warn!(%role, group = %slot.group, "stalled: {why}");
        }
        health.set_stalled(&role, stalled.clone());
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
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(TTL / 3) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::GroupLag;
    use std::time::Instant;

    #[test]
    fn an_idle_member_is_not_stalled_but_a_stuck_group_is() {
        let grace = Duration::from_secs(20);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = StallWatch::new(grace);
        // Holding partitions: never stalled, and no progress asked for.
        assert!(!w.wants_progress(at(0), 3));
        assert_eq!(w.observe(at(0), 3, None), None);
        // Holding none: fine during the grace period.
        assert_eq!(w.observe(at(1), 0, None), None);
        assert!(!w.wants_progress(at(10), 0));
        assert!(w.wants_progress(at(21), 0));
        // Lag, but the group's offsets move: another member is consuming.
        assert_eq!(w.observe(at(21), 0, Some(GroupLag { lag: 50, committed_sum: 100, ..Default::default() })), None);
        assert_eq!(w.observe(at(35), 0, Some(GroupLag { lag: 40, committed_sum: 110, ..Default::default() })), None);
        assert_eq!(w.observe(at(50), 0, Some(GroupLag { lag: 40, committed_sum: 120, ..Default::default() })), None);
        // The offsets stop moving while messages wait: stalled once that lasts the grace.
        assert_eq!(w.observe(at(60), 0, Some(GroupLag { lag: 45, committed_sum: 120, ..Default::default() })), None);
        assert_eq!(
            w.observe(at(71), 0, Some(GroupLag { lag: 45, committed_sum: 120, ..Default::default() })).as_deref(),
            Some("no partitions assigned, lag 45")
        );
        // Nothing waiting: an idle member, not a stall.
        assert_eq!(w.observe(at(72), 0, Some(GroupLag { lag: 0, committed_sum: 120, ..Default::default() })), None);
        // Partitions come back: healthy at once.
        assert_eq!(w.observe(at(73), 2, None), None);
        assert!(!w.wants_progress(at(80), 0), "the grace starts again");
    }
}
