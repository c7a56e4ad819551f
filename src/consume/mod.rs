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
use crate::config::{ConsumeConfig, KafkaConfig};
use crate::cutover::feed::{Judging, OwnershipFeed};
use crate::cutover::ownership::{Ownership, OwnershipError, Side};
use crate::event::Origin;
use crate::mongo::ErrorClass;
use crate::ops::membership::{Ended, Life, claim_slot, run_members};
use crate::ops::presence::PresenceError;
use crate::ops::{Health, RoleId};
use crate::retry::Classify;
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
    /// Relaying the conflicts outbox did not finish in time (a connection that hangs: the
    /// MongoDB driver has no socket timeout); the member starts again and relays it then.
    #[error("relaying the conflicts outbox did not finish within {}s; trying again", .0.as_secs())]
    RelayTimedOut(std::time::Duration),
}

impl Classify for ConsumeError {
    fn class(&self) -> ErrorClass {
        match self {
            ConsumeError::Bus(e) => e.class(),
            ConsumeError::Sink(e) => e.class(),
            ConsumeError::Presence(e) => e.class(),
            ConsumeError::Outbox(e) => e.class(),
            ConsumeError::Ownership(e) => e.class(),
            ConsumeError::StaleJudgement | ConsumeError::RelayTimedOut(_) => ErrorClass::Transient,
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
        run_members(&self.role(), &self.health, &shutdown, |rejoins| self.attempt(&shutdown, rejoins)).await
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
                // Bounded like a batch's write: a relay waiting on a dead connection held the
                // consumer (and its drain on SIGTERM) for good under network faults.
                let relay = relay_conflicts(outbox, reports, self.transforms.service(), self.repairs.as_ref());
                tokio::time::timeout(apply::WRITE_TIMEOUT, relay)
                    .await
                    .map_err(|_| ConsumeError::RelayTimedOut(apply::WRITE_TIMEOUT))??;
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

/// A batch's view of ownership holds while the process's feed still shows the revision it was
/// judged by in a view young enough (see `cutover::feed::Judging`).
impl Judgement for Judging {
    fn still_holds(&self) -> Result<(), String> {
        self.still_current()
    }
}
