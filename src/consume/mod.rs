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

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::bus::{BusError, DeadLetters, GroupConsumer};
use crate::config::{ConsumeConfig, KafkaConfig, Membership};
use crate::mongo::ErrorClass;
use crate::ops::presence::{InstanceConflict, PresenceError, Slot};
use crate::ops::{Health, RoleId};
use crate::retry::with_backoff;
use crate::sink::{Sink, SinkError};
use crate::transform::ServiceTransforms;

mod apply;
mod redrive;

pub use apply::{Applied, Applier, Item, Path, Prepared, Rejects, prepare};
pub use redrive::{RedriveReport, redrive_dead_letters};

/// Errors of the consume role.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Presence(#[from] PresenceError),
}

impl ConsumeError {
    pub fn is_transient(&self) -> bool {
        match self {
            ConsumeError::Bus(e) => e.is_transient(),
            ConsumeError::Sink(e) => e.class() == ErrorClass::Transient,
            ConsumeError::Presence(e) => e.is_transient(),
        }
    }

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

/// The consume role for one service.
pub struct ServiceConsumer<S> {
    pub transforms: Arc<ServiceTransforms>,
    pub health: Health,
    /// ficus's store (the registry of group members).
    pub store: mongodb::Database,
    pub sink: S,
    pub kafka: KafkaConfig,
    pub settings: ConsumeConfig,
}

impl<S: Sink> ServiceConsumer<S> {
    /// Runs until shutdown (finishing the batch at hand and committing) or a fatal error.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ConsumeError> {
        let role = RoleId::Consume(self.transforms.service().to_string());
        let attempt = || async {
            let r = self.attempt(&shutdown).await;
            if r.is_err() {
                self.health.disconnected(&role);
            }
            r
        };
        with_backoff(&role.to_string(), &shutdown, attempt, ConsumeError::is_transient).await
    }

    async fn attempt(&self, shutdown: &CancellationToken) -> Result<(), ConsumeError> {
        let service = self.transforms.service();
        let group = group_id(service);
        let role = RoleId::Consume(service.to_string());
        let topics: Vec<String> = self.transforms.topics().into_iter().collect();
        // Claim this process's slot in the group before joining it (see `presence`).
        let Some(slot) = claim_slot(&self.store, &self.kafka, &group, shutdown).await? else { return Ok(()) };
        let consumer = GroupConsumer::join(&self.kafka, &group, &topics, &format!("ficus-consume-{service}"))?;
        let dlq = DeadLetters::new(&self.kafka, service)?;
        info!(service, %group, topics = ?topics, "consuming");

        let watching = shutdown.child_token();
        let keeper = tokio::spawn(crate::ops::presence::keep(
            slot.clone(),
            consumer.clone(),
            role.clone(),
            self.health.clone(),
            watching.clone(),
        ));
        let result = tokio::select! {
            r = self.consume_loop(&consumer, &dlq, &role, shutdown) => r,
            kept = keeper_ended(&watching, keeper) => kept,
        };
        watching.cancel();
        // Commit whatever was stored, whether stopping cleanly or on an error.
        consumer.close();
        if shutdown.is_cancelled() {
            slot.release().await;
        }
        result
    }

    async fn consume_loop(
        &self,
        consumer: &GroupConsumer,
        dlq: &DeadLetters,
        role: &RoleId,
        shutdown: &CancellationToken,
    ) -> Result<(), ConsumeError> {
        let idle = |up| if up { self.health.beat(role) } else { self.health.disconnected(role) };
        let applier = Applier {
            transforms: &self.transforms,
            sink: &self.sink,
            rejects: Rejects::DeadLetter(dlq),
            path: Path::Live,
        };
        while let Some(batch) =
            consumer.next_batch(self.settings.batch_max, self.settings.batch_wait, shutdown, idle).await?
        {
            let items: Vec<Item> = batch.iter().cloned().map(Item::delivered).collect();
            applier.apply(&items, shutdown).await?;
            consumer.store_offsets(&batch)?;
        }
        Ok(())
    }
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

/// Waits for the member's keeper: it only ends early when another process took the slot.
pub(crate) async fn keeper_ended<E: From<PresenceError>>(
    watching: &CancellationToken,
    keeper: tokio::task::JoinHandle<Result<(), InstanceConflict>>,
) -> Result<(), E> {
    let _ = watching;
    match keeper.await {
        Ok(Err(conflict)) => Err(PresenceError::from(conflict).into()),
        // Stopped by the token, or the task panicked: either way the loop decides.
        _ => std::future::pending().await,
    }
}
