//! The consume role: Kafka → transforms → one service database, at least once, idempotently.
//!
//! One consumer group per service (`ficus.<service>`), subscribed to the topics its transforms
//! read. Messages are taken in batches; each is decoded, transformed (pure) and written through
//! the [`Sink`], and only then are their offsets stored for commit, so an offset never passes a
//! write that is not durable. Processing happens between polls, and rebalance callbacks only
//! run inside a poll, so no work is ever in flight when partitions are released: the revoke
//! callback commits what was stored, and any message collected for a partition that was taken
//! away is dropped unprocessed (its new owner reads it from the committed offset).
//!
//! A message that cannot be decoded or transformed, or whose write fails permanently, goes to
//! the topic's dead-letter topic (`<topic>.dlq`) with the error, and the consumer moves on.
//! Transient failures (target down, network) retry with backoff and never skip.
//!
//! The same role runs the reverse direction (reverse sync): the group `ficus.<service>.reverse`
//! reads `<service>.changes` and writes back into the monolith ([`direction`]). Every batch, in
//! either direction, of a service that can write back is one transaction with an apply marker
//! (see `tail::echo`); conflicts recorded by a batch are relayed to `<service>.conflicts` after
//! it ([`relay`]).
//!
//! - [`apply`]: the one apply path;
//! - [`direction`]: what a message becomes, forward and backward;
//! - [`redrive`]: dead letters through the same path;
//! - [`relay`]: the conflicts outbox onto Kafka, and [`repair`]: the losing side of each
//!   conflict repaired with the owner's value.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::{BusError, ConflictReports, DeadLetters, GroupConsumer};
use crate::config::{ConsumeConfig, KafkaConfig, Membership};
use crate::cutover::feed::{Judging, OwnershipFeed};
use crate::cutover::ownership::{Ownership, OwnershipError, Side};
use crate::event::Origin;
use crate::mongo::ErrorClass;
use crate::ops::presence::{PresenceError, Slot};
use crate::ops::{Health, RoleId};
use crate::retry::Classify;
use crate::retry::with_backoff;
use crate::sink::conflicts::Outbox;
use crate::sink::{JudgedBy, Judgement, Sink, SinkError};
use crate::transform::ServiceTransforms;

mod apply;
pub mod direction;
mod redrive;
mod relay;
mod repair;

pub use apply::{Applied, Applier, Item, Path, Prepared, Rejects, prepare};
pub use direction::{Backward, Forward, MadeBy, Transformer};
pub use redrive::{Redrive, RedriveReport, redrive_dead_letters};
pub use relay::relay_conflicts;
pub use repair::Repairs;

/// Errors of the consume role.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Presence(#[from] PresenceError),
    #[error("the conflicts outbox: {}", crate::mongo::describe(.0))]
    Outbox(#[from] mongodb::error::Error),
    #[error(transparent)]
    Ownership(#[from] OwnershipError),
    /// A batch judged by ownership too long before its commit (see `sink::Marker::still_judged`);
    /// the consume loop judges it again.
    #[error("a batch's judgement of ownership went stale before it committed")]
    StaleJudgement,
}

impl Classify for ConsumeError {
    fn class(&self) -> ErrorClass {
        match self {
            ConsumeError::Bus(e) => e.class(),
            ConsumeError::Sink(e) => e.class(),
            ConsumeError::Presence(e) => e.class(),
            ConsumeError::Outbox(e) => e.class(),
            ConsumeError::Ownership(e) => e.class(),
            ConsumeError::StaleJudgement => ErrorClass::Transient,
        }
    }
}

impl ConsumeError {
    /// See [`BusError::is_misconfiguration`]: two processes with one instance id.
    pub fn is_misconfiguration(&self) -> bool {
        match self {
            ConsumeError::Bus(e) => e.is_misconfiguration(),
            ConsumeError::Presence(PresenceError::Conflict(_)) => true,
            _ => false,
        }
    }
}

/// The consumer group of a service.
pub fn group_id(service: &str) -> String {
    format!("ficus.{service}")
}

/// The consumer group that writes a service's changes back into the monolith.
pub fn reverse_group_id(service: &str) -> String {
    format!("ficus.{service}.reverse")
}

/// Which way a consumer applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Monolith events into the service database.
    Forward,
    /// The service's own changes back into the monolith.
    Reverse,
}

/// A service's pipeline in one direction: the consumer group that applies it and the topics it
/// reads (each with its dead letters, `<topic>.dlq`). Built here, once; the consumer, the
/// re-drive, `ficus status` and the cutover's drain all take it from here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    pub group: String,
    pub topics: Vec<String>,
}

impl Pipeline {
    pub fn of(transforms: &ServiceTransforms, direction: Direction) -> Pipeline {
        let service = transforms.service();
        match direction {
            Direction::Forward => {
                Pipeline { group: group_id(service), topics: transforms.topics().into_iter().collect() }
            }
            Direction::Reverse => Pipeline {
                group: reverse_group_id(service),
                topics: vec![crate::config::topics::changes_topic(service)],
            },
        }
    }
}

/// The consume role for one service, in one direction.
/// Its direction follows from the writes its sink takes ([`direction::MadeBy`]).
pub struct ServiceConsumer<S> {
    pub transforms: Arc<ServiceTransforms>,
    pub health: Health,
    /// ficus's store (the registry of group members).
    pub store: mongodb::Database,
    pub sink: S,
    pub kafka: KafkaConfig,
    pub settings: ConsumeConfig,
    /// Ownership as this process follows it (forward writes into owned documents merge; see
    /// [`direction`]); `None` for a service that never writes back.
    pub ownership: Option<OwnershipFeed>,
    /// The outbox of the database the sink writes, relayed to `<service>.conflicts`.
    pub outbox: Option<Outbox>,
    /// What repairs the other side of the conflicts relayed.
    pub repairs: Option<Repairs>,
}

impl<S: Sink> ServiceConsumer<S>
where
    S::Op: MadeBy,
{
    const DIRECTION: Direction = <S::Op as MadeBy>::DIRECTION;

    fn role(&self) -> RoleId {
        let service = self.transforms.service().to_string();
        match Self::DIRECTION {
            Direction::Forward => RoleId::Consume(service),
            Direction::Reverse => RoleId::WriteBack(service),
        }
    }

    fn group(&self) -> String {
        Pipeline::of(&self.transforms, Self::DIRECTION).group
    }

    fn topics(&self) -> Vec<String> {
        Pipeline::of(&self.transforms, Self::DIRECTION).topics
    }

    /// The origin the batches' apply markers name: the service, for a service that can write
    /// back (its own writes must be told from the service's); none for one that cannot.
    fn origin(&self) -> Option<Origin> {
        let writes_back = Self::DIRECTION == Direction::Reverse || !self.transforms.written_back().is_empty();
        writes_back.then(|| Origin { service: self.transforms.service().to_string(), collection: None })
    }

    /// Runs until shutdown (finishing the batch at hand and committing) or a fatal error. A
    /// member the keeper finds stuck outside its group's work is replaced by a fresh one
    /// ([`crate::ops::presence::Rejoin`]).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ConsumeError> {
        let role = self.role();
        let mut rejoins = 0;
        loop {
            let attempt = || async {
                let r = self.attempt(&shutdown, rejoins).await;
                if r.is_err() {
                    self.health.disconnected(&role);
                }
                r
            };
            match with_backoff(&role.to_string(), &shutdown, attempt, ConsumeError::is_transient).await? {
                Ended::Stopped => return Ok(()),
                Ended::Rejoin { held } => rejoins = if held { 0 } else { rejoins + 1 },
            }
        }
    }

    async fn attempt(&self, shutdown: &CancellationToken, rejoins: u32) -> Result<Ended, ConsumeError> {
        let service = self.transforms.service();
        let group = self.group();
        let role = self.role();
        let topics = self.topics();
        // Claim this process's slot in the group before joining it (see `presence`).
        let Some(slot) = claim_slot(&self.store, &self.kafka, &group, shutdown).await? else {
            return Ok(Ended::Stopped);
        };
        let consumer = GroupConsumer::join(&self.kafka, &group, &topics, &format!("ficus-{role}"))?;
        let dlq = DeadLetters::new(&self.kafka, service)?;
        let reports = match self.outbox {
            Some(_) => Some(ConflictReports::new(&self.kafka, service)?),
            None => None,
        };
        info!(service, %group, topics = ?topics, direction = ?Self::DIRECTION, "consuming");
        let life = Life { slot: &slot, consumer: &consumer, role: &role, health: &self.health, rejoins };
        let (consumer, dlq, reports, role) = (&consumer, &dlq, reports.as_ref(), &role);
        let body = move |member: CancellationToken| async move {
            self.consume_loop(consumer, dlq, reports, role, &member).await
        };
        life.run(shutdown, body).await
    }

    async fn consume_loop(
        &self,
        consumer: &GroupConsumer,
        dlq: &DeadLetters,
        reports: Option<&ConflictReports>,
        role: &RoleId,
        shutdown: &CancellationToken,
    ) -> Result<(), ConsumeError> {
        let idle = |up| if up { self.health.beat(role) } else { self.health.disconnected(role) };
        while let Some(batch) =
            consumer.next_batch(self.settings.batch_max, self.settings.batch_wait, shutdown, idle).await?
        {
            let items: Vec<Item> = batch.iter().cloned().map(Item::delivered).collect();
            // A batch whose judgement of ownership went stale before it committed (this process
            // was paused mid-batch) is judged again; nothing of it committed.
            loop {
                match self.apply_batch(&items, dlq, shutdown).await {
                    Err(ConsumeError::StaleJudgement) => {
                        warn!(role = %role, "judging a batch again: its view of ownership went stale while it was being written")
                    }
                    done => {
                        done?;
                        break;
                    }
                };
            }
            consumer.store_offsets(&batch)?;
            if let (Some(outbox), Some(reports)) = (&self.outbox, reports) {
                relay_conflicts(outbox, reports, self.transforms.service(), self.repairs.as_ref()).await?;
            }
        }
        Ok(())
    }

    /// Judges and applies one batch. Each change is judged by the ownership of its own commit
    /// time and of now, from a view that has seen every change of ownership up to the batch's
    /// newest change; the process acknowledges no newer epoch until the batch is written.
    async fn apply_batch(
        &self,
        items: &[Item],
        dlq: &DeadLetters,
        shutdown: &CancellationToken,
    ) -> Result<Applied, ConsumeError> {
        let (ownership, judging) = self.ownership_for(items).await?;
        let judged = judging.map(|j| JudgedBy(Arc::new(j) as Arc<dyn Judgement>));
        let transforms = self.transforms.clone();
        let transformer = <S::Op as MadeBy>::transformer(transforms, ownership);
        let (sink, rejects, path, origin) = (&self.sink, Rejects::DeadLetter(dlq), Path::Live, self.origin());
        let applier = Applier { transformer: &transformer, sink, rejects, path, origin, judged };
        applier.apply(items, shutdown).await
    }

    /// The service's ownership record from a view that can judge every change of the batch
    /// (on the clock of the side this direction reads) and is fresh enough to say who owns a key
    /// now, with the mark that the batch is being written under it; `None` for a service that
    /// never writes back.
    async fn ownership_for(&self, items: &[Item]) -> Result<(Option<Ownership>, Option<Judging>), ConsumeError> {
        let (Some(feed), Some(ts)) = (&self.ownership, newest_change(items)) else { return Ok((None, None)) };
        let side = match Self::DIRECTION {
            Direction::Forward => Side::Monolith,
            Direction::Reverse => Side::Service,
        };
        let service = self.transforms.service();
        let view = feed.fresh(service, side, ts).await?;
        let record = view.get(service).cloned();
        let revision = record.as_ref().map_or(0, |o| o.revision);
        let judging = feed.judging(service, revision, self.settings.judgement_max_age);
        Ok((record, Some(judging)))
    }
}

/// The newest commit time of a batch's events.
fn newest_change(items: &[Item]) -> Option<bson::Timestamp> {
    items
        .iter()
        .filter_map(|i| match &i.message {
            Ok(crate::event::Message::Event(ev)) => Some(ev.position.cluster_time),
            _ => None,
        })
        .max()
}

/// Claims this process's slot in `group` in the store's registry (see `presence`): the slot
/// `kafka.instance_id` with static membership, a per-process one with dynamic membership.
/// `None` when shutdown came first.
pub(crate) async fn claim_slot(
    store: &mongodb::Database,
    kafka: &KafkaConfig,
    group: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Slot>, PresenceError> {
    let instance = match kafka.membership {
        Membership::Static => kafka.instance_id.clone(),
        Membership::Dynamic => format!("{}#{}", kafka.instance_id, std::process::id()),
    };
    Slot::claim(store, group, &instance, shutdown).await
}

/// How one member's life in its group ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Shutdown: the role is done.
    Stopped,
    /// Its keeper called for a fresh member; `held`: whether this one ever held partitions.
    Rejoin { held: bool },
}

/// One member of a group at work: its keeper beside the work, and the close after it.
pub(crate) struct Life<'a> {
    pub slot: &'a Slot,
    pub consumer: &'a GroupConsumer,
    pub role: &'a RoleId,
    pub health: &'a Health,
    /// Fresh members in a row before this one (each waits longer before giving way).
    pub rejoins: u32,
}

impl Life<'_> {
    /// Runs `work` with a token that ends it (at its next batch) on shutdown or when the keeper
    /// calls for a fresh member; then commits what was stored and leaves, saying so when the
    /// commit could not be made (nothing is lost: the next member applies those messages again).
    /// Another process taking the slot ends the work at once.
    pub(crate) async fn run<E, F, Fut>(self, shutdown: &CancellationToken, work: F) -> Result<Ended, E>
    where
        E: From<PresenceError>,
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let member = shutdown.child_token();
        let limits = crate::ops::presence::LIMITS.after(self.rejoins);
        let (slot, consumer, role, health) =
            (self.slot.clone(), self.consumer.clone(), self.role.clone(), self.health.clone());
        let mut keeper = tokio::spawn(crate::ops::presence::keep(slot, consumer, role, health, limits, member.clone()));
        let work = work(member.clone());
        tokio::pin!(work);
        let (mut end, mut kept) = (None, false);
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                k = &mut keeper, if !kept => {
                    kept = true;
                    match k {
                        Ok(Err(conflict)) => break Err(PresenceError::from(conflict).into()),
                        // A fresh member called for (the work ends at its next batch), or shutdown.
                        Ok(Ok(e)) => end = Some(e),
                        // The keeper panicked: the work decides.
                        Err(_) => {}
                    }
                }
            }
        };
        if !kept {
            keeper.abort();
        }
        member.cancel();
        // Commit whatever was stored, whether stopping cleanly, for a fresh member, or on an error.
        let committed = self.consumer.close().await;
        if !committed {
            tracing::warn!(
                group = %self.consumer.group(),
                "the offsets of its last batches could not be committed; the group's next member applies those \
                 messages again (a no-op by version)"
            );
        }
        if shutdown.is_cancelled() {
            self.slot.release().await;
        }
        result?;
        match end.and_then(|e| e.rejoin.map(|_| e.held)) {
            Some(held) if !shutdown.is_cancelled() => Ok(Ended::Rejoin { held }),
            _ => Ok(Ended::Stopped),
        }
    }
}

/// A batch's view of ownership holds while the process's feed still shows the revision it was
/// judged by in a view young enough (see `cutover::feed::Judging`).
impl Judgement for Judging {
    fn still_holds(&self) -> Result<(), String> {
        self.still_current()
    }
}
