//! The conflicts topic of a service (`<service>.conflicts`): JSON reports, one per document
//! and change that met the owner's, keyed by the report's identity, awaited until durable.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{BusError, ClientRole, client_config};
use crate::config::KafkaConfig;
use crate::config::topics::conflicts_topic;

/// Publishes a service's conflict reports.
pub struct ConflictReports {
    producer: FutureProducer,
    topic: String,
}

impl ConflictReports {
    pub fn new(cfg: &KafkaConfig, service: &str) -> Result<Self, BusError> {
        let producer = client_config(cfg, ClientRole::Producer, &format!("ficus-conflicts-{service}")).create()?;
        Ok(ConflictReports { producer, topic: conflicts_topic(service) })
    }

    /// Sends one report and waits until it is durable.
    pub async fn send(&self, key: &str, report: &serde_json::Value) -> Result<(), BusError> {
        let payload = serde_json::to_vec(report).expect("JSON values serialise");
        let record = FutureRecord::to(&self.topic).key(key).payload(&payload);
        match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => Ok(()),
            Err((error, _)) => {
                Err(BusError::Delivery { id: key.to_string(), topic: self.topic.clone(), error: Box::new(error) })
            }
        }
    }
}
