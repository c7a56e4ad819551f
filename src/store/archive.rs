//! The archive role: every message on ficus's topics into the event store, once, in the
//! consumer group `ficus.archive`.
//!
//! Offsets are stored only after the insert is durable, so the archive is at-least-once like
//! everything else and idempotent by message id; per partition, everything below the group's
//! committed offset is in the store, which is what a replay relies on to move from the archive
//! to the live topic with no gap.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ARCHIVE_GROUP, Archived, EventStore, StoreError};
use crate::bus::GroupConsumer;
use crate::config::KafkaConfig;
use crate::event::Message;
use crate::ops::membership::{Ended, Life, claim_slot, run_members};
use crate::ops::{Health, RoleId};

/// The archive role.
pub struct Archiver {
    pub store: EventStore,
    /// ficus's store database (the registry of group members).
    pub db: mongodb::Database,
    pub kafka: KafkaConfig,
    pub topics: Vec<String>,
    pub batch_max: usize,
    pub batch_wait: Duration,
    pub health: Health,
}

impl Archiver {
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), StoreError> {
        run_members(&RoleId::Archive, &self.health, &shutdown, |rejoins| self.attempt(&shutdown, rejoins)).await
    }

    async fn attempt(&self, shutdown: &CancellationToken, rejoins: u32) -> Result<Ended, StoreError> {
        let Some(slot) = claim_slot(&self.db, &self.kafka, ARCHIVE_GROUP, shutdown).await? else {
            return Ok(Ended::Stopped);
        };
        let consumer = GroupConsumer::join(&self.kafka, ARCHIVE_GROUP, &self.topics, "ficus-archive")?;
        info!(group = ARCHIVE_GROUP, topics = ?self.topics, "archiving");
        let life = Life { slot: &slot, consumer: &consumer, role: &RoleId::Archive, health: &self.health, rejoins };
        let consumer = &consumer;
        life.run(shutdown, move |member| async move { self.archive_loop(consumer, &member).await }).await
    }

    async fn archive_loop(&self, consumer: &GroupConsumer, shutdown: &CancellationToken) -> Result<(), StoreError> {
        let idle =
            |up| if up { self.health.beat(&RoleId::Archive) } else { self.health.disconnected(&RoleId::Archive) };
        while let Some(raw) = consumer.next_batch(self.batch_max, self.batch_wait, shutdown, idle).await? {
            let mut batch = Vec::with_capacity(raw.len());
            for d in &raw {
                match Message::decode(&d.payload) {
                    Ok(message) => batch.push(Archived {
                        topic: d.topic.clone(),
                        partition: d.partition,
                        offset: d.offset,
                        message,
                    }),
                    // Not a canonical event: the consumers dead-letter it; the archive keeps events only.
                    Err(e) => {
                        warn!(topic = %d.topic, partition = d.partition, offset = d.offset, "not archived, not a canonical event: {e}")
                    }
                }
            }
            let inserted = self.store.append(&batch).await?;
            metrics::counter!("ficus_events_archived_total").increment(inserted);
            consumer.store_offsets(&raw)?;
        }
        Ok(())
    }
}
