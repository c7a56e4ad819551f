//! The reverse tail: a service database's own changes → `<service>.changes`, for reverse sync.
//!
//! The same [`Tailer`] as the monolith's, with the sides swapped: its source is the service
//! database (the collections written back, never ficus's bookkeeping), it copies nothing and
//! starts where the service began to own keys, it drops ficus's own forward writes (their
//! echoes: the monolith sent them), and it publishes every change that names its routing key
//! ([`Routed`]): the write-back consumer judges each by ownership, so a write to a key the
//! service did not own is merged rather than lost.
//!
//! [`ReverseTailRole`] runs it while it is needed: from the moment the service owns anything,
//! and, once the service is back at 0%, until the tail has read past that moment (a marker
//! written into the service database after it shows when), so that every write the service
//! made while it owned its keys is handed on.

use std::sync::Arc;
use std::time::Duration;

use bson::{Timestamp, doc};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::checkpoint::{CheckpointStore, MongoCheckpoints, TailPhase};
use super::role::with_lease;
use super::{Admission, Echoes, TailError, TailStart, Tailer};
use crate::bus::KafkaPublisher;
use crate::config::Config;
use crate::config::topics::Topics;
use crate::cutover::feed::OwnershipFeed;
use crate::cutover::ownership::Ownership;
use crate::event::mapping::ChangeRecord;
use crate::ops::{Health, RoleId};
use crate::source::MongoSource;
use crate::transform::ServiceTransforms;

/// Admits the service's changes that can be routed (every change of a collection written back
/// whose document names its routing key): the write-back consumer judges each by ownership
/// (`cutover::rules`), so a write the service made to a key it did not own (an application on an
/// old view, a fence violation) is merged into the monolith rather than lost.
pub struct Routed {
    pub transforms: Arc<ServiceTransforms>,
}

impl Routed {
    fn admits(&self, record: &ChangeRecord) -> bool {
        let service = self.transforms.service();
        let Some(reverse) = self.transforms.reverse_for(&record.collection) else { return false };
        let id_only = doc! { "_id": record.document_id.clone() };
        let image = record.after.as_ref().or(record.before.as_ref()).unwrap_or(&id_only);
        if reverse.route_value(image).is_some() {
            return true;
        }
        warn!(service, collection = %record.collection, id = %record.document_id, op = %record.op,
            "a service change without its routing key (a delete without a pre-image?): not written back; \
             `ficus topics apply` turns pre-images on for the service's collections");
        metrics::counter!("ficus_reverse_unrouted_total", "service" => service.to_string()).increment(1);
        false
    }
}

impl Admission for Routed {
    fn admit<'a>(&'a self, record: &'a ChangeRecord) -> BoxFuture<'a, Result<bool, TailError>> {
        let admitted = self.admits(record);
        async move { Ok(admitted) }.boxed()
    }
}

/// Where the reverse tail starts, given the service's ownership and its checkpoint's time:
/// `None` resumes from the checkpoint; `Some(t)` starts afresh at `t`, where the latest period
/// of ownership began (no checkpoint yet, or one that read past the end of the period before,
/// so the gap between holds no write of the service's).
pub fn start_at(o: &Ownership, checkpoint: Option<Timestamp>) -> Option<Timestamp> {
    let periods = o.periods();
    let (start, _) = *periods.last()?;
    match checkpoint {
        None => Some(start),
        Some(c) => {
            let previous_end = periods.len().checked_sub(2).and_then(|i| periods[i].1);
            previous_end.is_some_and(|end| c >= end && c < start).then_some(start)
        }
    }
}

/// Whether the reverse tail is needed: the service owns keys, or it gave them all back and the
/// tail has not read `margin_secs` past that moment (`drained_to`: the checkpoint's time). The
/// margin is the longest an application may act on an old view (`cutover.view_max_age_secs`):
/// one still writing to the service on a view from before the release is written back too.
pub fn needed(o: &Ownership, drained_to: Option<Timestamp>, margin_secs: u32) -> bool {
    match o.periods().last() {
        None => false,
        Some((_, None)) => true,
        Some((_, Some(end))) => {
            let past = Timestamp { time: end.time.saturating_add(margin_secs), increment: end.increment };
            drained_to.is_none_or(|c| c < past)
        }
    }
}

/// The reverse tail of one service, as `ficus run` runs it.
pub struct ReverseTailRole {
    pub cfg: Config,
    pub clients: crate::clients::Clients,
    pub transforms: Arc<ServiceTransforms>,
    pub health: Health,
    pub ownership: OwnershipFeed,
}

impl ReverseTailRole {
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), TailError> {
        let service = self.transforms.service().to_string();
        let role = RoleId::ReverseTail(service.clone());
        let store = self.clients.store();
        let checkpoints = MongoCheckpoints::new(&store);
        let collections: Vec<String> = self.transforms.written_back().into_iter().map(String::from).collect();
        let topics = Arc::new(Topics::reverse(&service, collections.iter().map(String::as_str), &self.cfg.reverse));
        let source = MongoSource::new(self.clients.target.clone(), self.transforms.database(), collections);
        let mut changes = self.ownership.subscribe();
        let margin = self.cfg.cutover.view_max_age.as_secs().min(u64::from(u32::MAX)) as u32;
        loop {
            // Wait until the tail is needed.
            let ownership = loop {
                let drained_to = checkpoint_time(&checkpoints, &service).await?;
                match self.ownership.current().get(&service) {
                    Some(o) if needed(o, drained_to, margin) => break o.clone(),
                    _ => {}
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(self.cfg.reverse.ownership_poll) => {}
                }
            };
            if let Some(at) = start_at(&ownership, checkpoint_time(&checkpoints, &service).await?) {
                info!(%service, from = ?at, "reverse sync: the service owns keys; following its database from where that began");
                checkpoints.clear(&service, None).await?;
                // The start is recorded before anything is read, so a restart begins there too.
                self.begin_at(&checkpoints, &service, at).await?;
            }
            let active = shutdown.child_token();
            let watcher = tokio::spawn(stop_when_drained(
                self.ownership.clone(),
                checkpoints.clone(),
                source.clone(),
                service.clone(),
                (self.cfg.reverse.ownership_poll, margin),
                active.clone(),
            ));
            let (cfg, health, transforms) = (&self.cfg, self.health.clone(), self.transforms.clone());
            let ttl = cfg.tail.lease_ttl;
            let result = with_lease(&store, &service, ttl, &self.health, &active, |epoch, token| {
                let tailer = Tailer {
                    source_name: service.clone(),
                    topics: topics.clone(),
                    source: source.clone(),
                    publisher: Arc::new(KafkaPublisher::new(&cfg.kafka, &format!("ficus-reverse-tail-{service}"))?),
                    checkpoints: MongoCheckpoints::new(&store),
                    tail: cfg.tail.clone(),
                    snapshot: cfg.snapshot.clone(),
                    epoch: Some(epoch),
                    health: health.clone(),
                    role: role.clone(),
                    // A checkpoint is always there by now; this is the fallback.
                    start: TailStart::At(
                        ownership.periods().last().map_or(Timestamp { time: 0, increment: 0 }, |p| p.0),
                    ),
                    echoes: Echoes::Drop,
                    admit: Some(Arc::new(Routed { transforms: transforms.clone() })),
                };
                Ok(async move { tailer.run_then_flush(token, false).await })
            })
            .await;
            watcher.abort();
            result?;
            if shutdown.is_cancelled() {
                return Ok(());
            }
            info!(%service, "reverse sync: read past the service's return to 0%; stopping its tail");
            self.health.forget(&role);
        }
    }

    /// Records a checkpoint that starts the stream at `at`.
    async fn begin_at(&self, checkpoints: &MongoCheckpoints, service: &str, at: Timestamp) -> Result<(), TailError> {
        let state = super::checkpoint::TailState {
            source: service.to_string(),
            phase: TailPhase::Stream(super::checkpoint::StreamPosition {
                resume_token: None,
                cluster_time: at,
                index: 0,
            }),
            updated_at: bson::DateTime::now(),
            last_event_time: None,
            token_time: None,
            epoch: None,
        };
        checkpoints.save(&state).await?;
        Ok(())
    }
}

/// The time the reverse tail's checkpoint has read to.
async fn checkpoint_time(checkpoints: &MongoCheckpoints, service: &str) -> Result<Option<Timestamp>, TailError> {
    Ok(checkpoints.load(service).await?.and_then(|s| match s.phase {
        TailPhase::Stream(p) => Some(p.cluster_time),
        TailPhase::Snapshot(_) => None,
    }))
}

/// Cancels `active` once the service is back at 0% and the tail has read the margin past that
/// moment: markers written into the service database meanwhile give the stream something to
/// read there.
async fn stop_when_drained(
    ownership: OwnershipFeed,
    checkpoints: MongoCheckpoints,
    source: MongoSource,
    service: String,
    (every, margin): (Duration, u32),
    active: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = active.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Some(o) = ownership.current().get(&service).cloned() else { continue };
        if o.percent > 0 {
            continue;
        }
        let (id, marker) = crate::markers::released(&service, o.epoch);
        let markers = source.database().collection::<bson::Document>(crate::markers::COLLECTION);
        if let Err(e) = markers.update_one(doc! { "_id": &id }, marker).upsert(true).await {
            warn!(%service, "writing the release marker: {e}");
        }
        match checkpoint_time(&checkpoints, &service).await {
            Ok(to) if !needed(&o, to, margin) => {
                active.cancel();
                return;
            }
            Ok(_) => {}
            Err(e) => warn!(%service, "reading the reverse tail's checkpoint: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cutover::ownership::Step;

    fn ts(t: u32) -> Timestamp {
        Timestamp { time: t, increment: 0 }
    }

    fn ownership(steps: &[(u8, u32)]) -> Ownership {
        let history: Vec<Step> = steps
            .iter()
            .enumerate()
            .map(|(i, &(percent, at))| Step {
                epoch: i as i64 + 1,
                percent,
                at_monolith: ts(at),
                at_service: ts(at),
                set_at: bson::DateTime::now(),
                forced: true,
                pending: false,
                lifted: None,
            })
            .collect();
        Ownership {
            service: "s".into(),
            epoch: history.len() as i64,
            revision: 0,
            percent: history.last().map_or(0, |s| s.percent),
            history,
            updated: bson::DateTime::now(),
            fenced: None,
        }
    }

    #[test]
    fn the_reverse_tail_starts_where_ownership_began_and_never_skips_an_unread_period() {
        let o = ownership(&[(10, 100), (50, 200)]);
        assert_eq!(start_at(&o, None), Some(ts(100)), "from the first step above 0%");
        assert_eq!(start_at(&o, Some(ts(150))), None, "resumes");
        // Back to 0% at 300 and up again at 500: a checkpoint past 300 skips the gap...
        let o = ownership(&[(10, 100), (0, 300), (50, 500)]);
        assert_eq!(start_at(&o, Some(ts(350))), Some(ts(500)));
        // ...but one that never read to 300 resumes, to hand on what the service wrote before it.
        assert_eq!(start_at(&o, Some(ts(250))), None);
        assert_eq!(start_at(&ownership(&[(0, 300)]), None), None);
        // Owned and given back before the tail ever ran: it reads that period.
        assert_eq!(start_at(&ownership(&[(50, 100), (0, 200)]), None), Some(ts(100)));
    }

    #[test]
    fn the_reverse_tail_runs_while_the_service_owns_and_until_it_read_past_the_release() {
        let owning = ownership(&[(10, 100)]);
        assert!(needed(&owning, None, 10) && needed(&owning, Some(ts(1000)), 10));
        let released = ownership(&[(10, 100), (0, 300)]);
        assert!(needed(&released, Some(ts(299)), 0));
        assert!(needed(&released, None, 0), "never read: the period's writes are still to hand on");
        assert!(!needed(&released, Some(ts(300)), 0), "read to the release: drained");
        assert!(needed(&released, Some(ts(305)), 10), "an application on a view up to 10 s old may still write");
        assert!(!needed(&released, Some(ts(310)), 10), "read the longest view age past the release");
        assert!(!needed(&ownership(&[(0, 300)]), None, 10), "never owned: nothing to hand on");
    }
}
