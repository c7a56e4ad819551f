//! The Kafka adapter: everything rdkafka-specific lives under this folder, and nothing outside
//! it speaks librdkafka.
//!
//! - [`client_config`] builds every client's configuration, one [`ClientRole`] at a time;
//! - [`Publisher`] / [`KafkaPublisher`]: events and control messages onto topics, acknowledged;
//! - [`GroupConsumer`]: a member of a consumer group, offsets stored after the write;
//! - [`Reader`]: partitions read to their current end, group offsets read from outside;
//! - [`DeadLetters`]: what could not be applied, on `<topic>.dlq`;
//! - [`ConflictReports`]: what a service and the monolith both changed, on `<service>.conflicts`;
//! - [`TopicAdmin`]: topics created and checked against their definitions.

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode as Code;

use crate::config::{KafkaConfig, Membership};
use crate::retry::{Classify, ErrorClass};

mod admin;
mod conflicts;
mod consumer;
mod dead_letter;
mod publisher;
mod reader;

pub use admin::{TopicAdmin, TopicReport, TopicState};
pub use conflicts::ConflictReports;
pub use consumer::{Delivery, GroupConsumer, Standing};
pub use dead_letter::{DeadLetter, DeadLetters, Stage};
pub use publisher::{Ack, KafkaPublisher, Publisher};
pub use reader::{GroupLag, PartitionPosition, ReadFrom, ReadOutcome, Reader};

/// Errors from the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("delivery of event {id} to {topic} failed: {error}")]
    Delivery { id: String, topic: String, error: Box<KafkaError> },
    #[error("delivery of event {id} to {topic} was cancelled (producer closed)")]
    Cancelled { id: String, topic: String },
    #[error("topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    #[error(
        "fenced out of consumer group {group}: another process joined it with the same group.instance.id `{instance}` \
         ({reason}). Two processes must not share kafka.instance_id: give each process slot its own \
         (FICUS_KAFKA_INSTANCE_ID; the default is the host name)"
    )]
    Fenced { group: String, instance: String, reason: String },
}

impl BusError {
    /// Whether retrying later can help (broker down, timeouts) as opposed to a configuration or
    /// authorisation problem that needs a person.
    fn transient(&self) -> bool {
        let code = match self {
            BusError::Kafka(e) => e.rdkafka_error_code(),
            BusError::Delivery { error, .. } => error.rdkafka_error_code(),
            BusError::Cancelled { .. } => return true,
            BusError::Topic { .. } | BusError::Fenced { .. } => return false,
        };
        !matches!(
            code,
            Some(
                Code::TopicAuthorizationFailed
                    | Code::ClusterAuthorizationFailed
                    | Code::SaslAuthenticationFailed
                    | Code::Authentication
                    | Code::UnknownTopicOrPartition
                    | Code::UnknownTopic
                    | Code::MessageSizeTooLarge
                    | Code::InvalidConfig
                    | Code::Fatal
            )
        )
    }
}

impl Classify for BusError {
    fn class(&self) -> ErrorClass {
        if self.transient() { ErrorClass::Transient } else { ErrorClass::Fatal }
    }
}

impl BusError {
    /// A problem in how ficus is configured or deployed, not in the data or the servers: the
    /// process should stop with exit 2 and not be restarted as is.
    pub fn is_misconfiguration(&self) -> bool {
        matches!(self, BusError::Fenced { .. })
    }
}

/// Which kind of client a configuration is for. Each role gets every setting it needs and
/// none it must undo, so no caller edits a configuration after it is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole<'a> {
    /// The idempotent producer (acks=all).
    Producer,
    /// A member of a consumer group that subscribes and has partitions assigned: offsets are
    /// stored by ficus after the write and committed by librdkafka; with static membership the
    /// member is `group.instance.id = <kafka.instance_id>/<group>`.
    GroupMember {
        group: &'a str,
    },
    /// A reader that assigns partitions itself (no group membership) to read them to an end,
    /// or only looks at a group's committed offsets. With a group, offsets it stores are
    /// committed only when it says so.
    Reader {
        group: Option<&'a str>,
    },
    Admin,
}

/// The `group.instance.id` of this process in `group`: stable across restarts of the same
/// process slot, unique per group.
pub fn group_instance_id(cfg: &KafkaConfig, group: &str) -> String {
    format!("{}/{group}", cfg.instance_id)
}

/// Builds the librdkafka configuration for one client. Order: ficus's defaults, then the user's
/// `kafka.properties`, then the role's own overrides, then the settings ficus's guarantees rest
/// on (idempotence and acks=all for the producer; manual offset storage for consumers; the
/// group and instance ids), which no file can turn off.
pub fn client_config(cfg: &KafkaConfig, role: ClientRole<'_>, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    c.set("client.id", client_id);
    let consumer = matches!(role, ClientRole::GroupMember { .. } | ClientRole::Reader { .. });
    match role {
        ClientRole::Producer => {
            c.set("linger.ms", "5");
            c.set("compression.type", "lz4");
            c.set("message.timeout.ms", "300000");
            c.set("queue.buffering.max.messages", "200000");
        }
        ClientRole::GroupMember { .. } | ClientRole::Reader { .. } => {
            c.set("auto.offset.reset", "earliest");
            // How long the broker may hold a fetch while no data is there. Real Kafka answers
            // as soon as data arrives, so this bounds only the idle polling rate; Tansu 0.6.0
            // sleeps through it on every fetch, data or not (half of it from 250 ms up), so
            // there it also sets the consumer's latency (benches/README.md).
            c.set("fetch.wait.max.ms", "100");
        }
        ClientRole::Admin => {}
    }
    if let ClientRole::GroupMember { .. } = role {
        // Feeds ficus_consumer_lag (see consume::DrainContext).
        c.set("statistics.interval.ms", "5000");
        // A consumer that dies holds its partitions this long before the group moves them.
        // A static member is meant to come back as itself (a restart takes its partitions
        // straight back), so it gets Kafka's own default of 45 s (KIP-735): a restart or a
        // broker hiccup shorter than that moves nothing. It also keeps Tansu 0.6.0 calm, whose
        // coordinator keeps a stale entry of every static member that rejoins and rebalances
        // the group when that entry's session runs out: one needless rebalance per session
        // timeout, which under load at 6 s lost assignments for good (README, caveats).
        let session = if cfg.membership == Membership::Static { "45000" } else { "10000" };
        c.set("session.timeout.ms", session);
        c.set("heartbeat.interval.ms", "2000");
        c.set("partition.assignment.strategy", "cooperative-sticky");
    }
    let overrides: &BTreeMap<String, String> = match role {
        ClientRole::Producer => &cfg.producer,
        ClientRole::GroupMember { .. } | ClientRole::Reader { .. } => &cfg.consumer,
        ClientRole::Admin => &BTreeMap::new(),
    };
    for (k, v) in cfg.properties.iter().chain(overrides) {
        c.set(k, v);
    }
    match role {
        ClientRole::Producer => {
            c.set("enable.idempotence", "true");
            c.set("acks", "all");
        }
        ClientRole::GroupMember { group } => {
            c.set("group.id", group);
            if cfg.membership == Membership::Static {
                c.set("group.instance.id", group_instance_id(cfg, group));
            }
            c.set("enable.auto.commit", "true");
            c.set("enable.auto.offset.store", "false");
        }
        ClientRole::Reader { group } => {
            // A reader never joins a group; librdkafka still wants a group id to fetch or
            // commit offsets, and one of its own otherwise.
            c.set("group.id", group.map_or_else(|| format!("{client_id}.reader"), str::to_string));
            c.set("enable.auto.commit", "false");
            c.set("enable.auto.offset.store", "false");
        }
        ClientRole::Admin => {}
    }
    debug_assert!(consumer == c.get("group.id").is_some());
    c
}
