//! Topic provisioning (`ficus topics apply/check`): creates missing topics from their definitions,
//! and the dead-letter topic beside each, and reports drift in existing ones without changing
//! them (repartitioning reorders keys and is an operator's decision).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::types::RDKafkaErrorCode as Code;

use super::{BusError, ClientRole, client_config};
use crate::config::KafkaConfig;
use crate::config::topics::TopicDef;

/// How an existing topic differs from its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicState {
    Missing,
    Ok,
    /// One line per difference.
    Drift(Vec<String>),
}

/// The outcome for one topic of `apply` or `check`.
#[derive(Debug, Clone)]
pub struct TopicReport {
    pub topic: String,
    pub state: TopicState,
    /// Set by `apply` when it created the topic.
    pub created: bool,
}

/// Provisions and inspects topics through the admin API.
pub struct TopicAdmin {
    admin: AdminClient<DefaultClientContext>,
    timeout: Duration,
}

impl TopicAdmin {
    pub fn new(cfg: &KafkaConfig) -> Result<Self, BusError> {
        let admin = client_config(cfg, ClientRole::Admin, "ficus-admin").create()?;
        Ok(TopicAdmin { admin, timeout: Duration::from_secs(30) })
    }

    /// Compares one topic with its definition: partition count, replication factor, configs.
    pub async fn inspect(&self, def: &TopicDef) -> Result<TopicState, BusError> {
        self.inspect_named(&def.topic, def.partitions, def.replication_factor, &def.config).await
    }

    /// [`TopicAdmin::inspect`] for a topic without a definition of its own (dead letters).
    async fn inspect_named(
        &self,
        topic: &str,
        partitions: i32,
        replication: i32,
        config: &BTreeMap<String, String>,
    ) -> Result<TopicState, BusError> {
        let md = {
            let admin = &self.admin;
            let topic = topic.to_string();
            let timeout = self.timeout;
            // Metadata calls block; keep them off the runtime's worker threads.
            tokio::task::block_in_place(|| admin.inner().fetch_metadata(Some(&topic), timeout))?
        };
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            return Ok(TopicState::Missing);
        };
        if let Some(err) = t.error()
            && matches!(RDKafkaErrorCode::from(err), Code::UnknownTopicOrPartition | Code::UnknownTopic)
        {
            return Ok(TopicState::Missing);
        }
        if t.partitions().is_empty() {
            return Ok(TopicState::Missing);
        }
        let mut drift = Vec::new();
        let have = t.partitions().len() as i32;
        if have != partitions {
            drift.push(format!("partitions: defined {partitions}, found {have}"));
        }
        let rf = t.partitions().iter().map(|p| p.replicas().len() as i32).min().unwrap_or(0);
        if rf != replication {
            drift.push(format!("replication_factor: defined {replication}, found {rf}"));
        }
        if !config.is_empty() {
            let opts = AdminOptions::new().request_timeout(Some(self.timeout));
            match self.admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &opts).await {
                Ok(results) => match results.into_iter().next() {
                    Some(Ok(res)) => {
                        let entries = res.entry_map();
                        for (k, want) in config {
                            match entries.get(k.as_str()).and_then(|e| e.value.as_deref()) {
                                Some(v) if v == want => {}
                                Some(v) => drift.push(format!("config {k}: defined {want}, found {v}")),
                                None => drift.push(format!("config {k}: defined {want}, not reported by the broker")),
                            }
                        }
                    }
                    Some(Err(code)) => drift.push(format!("configs could not be described: {code:?}")),
                    None => drift.push("configs could not be described: empty answer".into()),
                },
                Err(e) => drift.push(format!("configs could not be described: {e}")),
            }
        }
        Ok(if drift.is_empty() { TopicState::Ok } else { TopicState::Drift(drift) })
    }

    /// Creates the topic if missing; reports drift otherwise (never alters an existing topic:
    /// repartitioning reorders keys and is an operator's decision).
    pub async fn apply(&self, def: &TopicDef) -> Result<TopicReport, BusError> {
        self.apply_named(&def.topic, def.partitions, def.replication_factor, &def.config).await
    }

    /// Creates the dead-letter topic of `def` if missing: one partition (order does not
    /// matter there), kept a month so an operator can inspect and re-drive.
    pub async fn apply_dead_letters(&self, def: &TopicDef) -> Result<TopicReport, BusError> {
        let (partitions, config) = dead_letter_layout();
        self.apply_named(&crate::config::topics::dlq_topic(&def.topic), partitions, def.replication_factor, &config)
            .await
    }

    /// [`TopicAdmin::inspect`] for the dead-letter topic of `def`.
    pub async fn inspect_dead_letters(&self, def: &TopicDef) -> Result<TopicState, BusError> {
        let (partitions, config) = dead_letter_layout();
        self.inspect_named(&crate::config::topics::dlq_topic(&def.topic), partitions, def.replication_factor, &config)
            .await
    }

    /// Creates a service's conflicts topic (`<service>.conflicts`) if missing: laid out and
    /// kept like dead letters (one partition, a month), for an operator to read.
    pub async fn apply_conflicts(&self, service: &str, replication: i32) -> Result<TopicReport, BusError> {
        let (partitions, config) = dead_letter_layout();
        self.apply_named(&crate::config::topics::conflicts_topic(service), partitions, replication, &config).await
    }

    /// [`TopicAdmin::inspect`] for a service's conflicts topic.
    pub async fn inspect_conflicts(&self, service: &str, replication: i32) -> Result<TopicState, BusError> {
        let (partitions, config) = dead_letter_layout();
        self.inspect_named(&crate::config::topics::conflicts_topic(service), partitions, replication, &config).await
    }

    /// [`TopicAdmin::apply`] for a topic that has no definition of its own (dead letters, a
    /// benchmark's scratch topic).
    pub async fn apply_named(
        &self,
        topic: &str,
        partitions: i32,
        replication: i32,
        config: &BTreeMap<String, String>,
    ) -> Result<TopicReport, BusError> {
        let state = self.inspect_named(topic, partitions, replication, config).await?;
        if state != TopicState::Missing {
            return Ok(TopicReport { topic: topic.to_string(), state, created: false });
        }
        let mut nt = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
        for (k, v) in config {
            nt = nt.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(self.timeout)).request_timeout(Some(self.timeout));
        let results = self.admin.create_topics([&nt], &opts).await?;
        for r in results {
            if let Err((name, code)) = r
                && code != Code::TopicAlreadyExists
            {
                return Err(BusError::Topic { topic: name, reason: format!("create failed: {code}") });
            }
        }
        // Creation is asynchronous in Kafka: wait until the metadata shows every partition.
        let state = self.wait_visible(topic, partitions, replication, config).await?;
        Ok(TopicReport { topic: topic.to_string(), state, created: true })
    }

    async fn wait_visible(
        &self,
        topic: &str,
        partitions: i32,
        replication: i32,
        config: &BTreeMap<String, String>,
    ) -> Result<TopicState, BusError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let state = self.inspect_named(topic, partitions, replication, config).await?;
            if state != TopicState::Missing || tokio::time::Instant::now() > deadline {
                return Ok(state);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Dead-letter and conflicts topics: one partition, deleted after 30 days.
fn dead_letter_layout() -> (i32, BTreeMap<String, String>) {
    let config =
        [("cleanup.policy".to_string(), "delete".to_string()), ("retention.ms".to_string(), "2592000000".to_string())];
    (1, config.into())
}
