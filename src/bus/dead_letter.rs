//! Dead letters: what could not be applied, kept on `<topic>.dlq` with why, for an operator to
//! inspect (kcat) and re-drive (`ficus dlq replay`) once the cause is fixed.
//!
//! Every stage writes the same body: the service, the [`Stage`] that failed, the error naming
//! file and field, the Kafka position of the original, and the original message itself. A dead
//! letter is sent and awaited before the original's offset is stored, so nothing is skipped
//! silently.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use tracing::warn;

use super::{BusError, ClientRole, Delivery, client_config};
use crate::config::KafkaConfig;
use crate::config::topics::dlq_topic;
use crate::event::CanonicalEvent;

/// Where a message failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Not a ficus message (someone else's producer, a truncated record).
    Decode,
    /// A transform rejected the event (a value it cannot cast, say).
    Transform,
    /// The target refused the write for good.
    Write,
    /// The tail could not publish the event (too large for the broker).
    Publish,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Transform => "transform",
            Stage::Write => "write",
            Stage::Publish => "publish",
        }
    }

    fn parse(s: &str) -> Option<Stage> {
        [Stage::Decode, Stage::Transform, Stage::Write, Stage::Publish].into_iter().find(|st| st.as_str() == s)
    }
}

/// One dead letter as it sits on `<topic>.dlq`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub service: String,
    pub stage: Stage,
    pub error: String,
    /// Where the original was (-1 where it never reached Kafka).
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The original message: its JSON, or its bytes as text when it was not JSON.
    pub original: Value,
}

impl DeadLetter {
    fn to_json(&self) -> Value {
        serde_json::json!({
            "service": self.service,
            "stage": self.stage.as_str(),
            "error": self.error,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "failedAt": bson::DateTime::now().try_to_rfc3339_string().unwrap_or_default(),
            "event": self.original,
        })
    }

    /// Reads a dead letter's body; `None` when it is not one.
    pub fn from_json(v: &Value) -> Option<DeadLetter> {
        Some(DeadLetter {
            service: v.get("service")?.as_str()?.to_string(),
            stage: Stage::parse(v.get("stage")?.as_str()?)?,
            error: v.get("error").and_then(Value::as_str).unwrap_or_default().to_string(),
            topic: v.get("topic")?.as_str()?.to_string(),
            partition: v.get("partition").and_then(Value::as_i64).unwrap_or(-1) as i32,
            offset: v.get("offset").and_then(Value::as_i64).unwrap_or(-1),
            original: v.get("event").cloned().unwrap_or(Value::Null),
        })
    }

    /// The original message, as it was delivered (for a re-drive).
    pub fn original(&self, key: Option<Vec<u8>>) -> Delivery {
        Delivery {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            key,
            payload: match &self.original {
                Value::String(s) => s.clone().into_bytes(),
                Value::Null => Vec::new(),
                v => serde_json::to_vec(v).expect("JSON values serialise"),
            },
        }
    }
}

/// Publishes a service's dead letters, awaiting the broker's acknowledgement.
pub struct DeadLetters {
    producer: FutureProducer,
    service: String,
}

impl DeadLetters {
    pub fn new(cfg: &KafkaConfig, service: &str) -> Result<Self, BusError> {
        let producer = client_config(cfg, ClientRole::Producer, &format!("ficus-dlq-{service}")).create()?;
        Ok(DeadLetters { producer, service: service.to_string() })
    }

    /// Sends one failed delivery to `<topic>.dlq` and waits until it is durable.
    pub async fn send(&self, d: &Delivery, stage: Stage, error: &str) -> Result<(), BusError> {
        let original = match serde_json::from_slice::<Value>(&d.payload) {
            Ok(v) => v,
            Err(_) => Value::String(String::from_utf8_lossy(&d.payload).into_owned()),
        };
        let letter = DeadLetter {
            service: self.service.clone(),
            stage,
            error: error.to_string(),
            topic: d.topic.clone(),
            partition: d.partition,
            offset: d.offset,
            original,
        };
        let headers = OwnedHeaders::new()
            .insert(Header { key: "ficus_service", value: Some(self.service.as_str()) })
            .insert(Header { key: "ficus_error", value: Some(error) });
        let id = format!("{}@{}:{}", d.topic, d.partition, d.offset);
        send(&self.producer, &letter, d.key.as_deref(), Some(headers), &id).await?;
        let event_id = letter.original.get("id").and_then(Value::as_str).unwrap_or("");
        let aggregate = letter.original.get("subject").and_then(Value::as_str).unwrap_or("");
        warn!(service = %self.service, topic = %d.topic, partition = d.partition, offset = d.offset, event_id, aggregate, stage = stage.as_str(), error, "dead-lettered");
        Ok(())
    }
}

async fn send(
    producer: &FutureProducer,
    letter: &DeadLetter,
    key: Option<&[u8]>,
    headers: Option<OwnedHeaders>,
    id: &str,
) -> Result<(), BusError> {
    let payload = serde_json::to_vec(&letter.to_json()).expect("JSON values serialise");
    let dlq = dlq_topic(&letter.topic);
    let mut record = FutureRecord::to(&dlq).payload(&payload);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(h) = headers {
        record = record.headers(h);
    }
    match producer.send(record, Duration::from_secs(30)).await {
        Ok(_) => {
            metrics::counter!("ficus_events_dead_lettered_total", "service" => letter.service.clone(), "topic" => letter.topic.clone(), "stage" => letter.stage.as_str()).increment(1);
            Ok(())
        }
        Err((error, _)) => Err(BusError::Delivery { id: id.to_string(), topic: dlq, error: Box::new(error) }),
    }
}

/// An event too large for the broker (or the producer's `message.max.bytes`). Stopping on it
/// would stop the tail for good, since a restart meets the same change again; so its envelope,
/// without the document images, goes to `<topic>.dlq` with the error and the remedy, loudly,
/// and the tail moves on. The service documents it would have changed are then stale until the
/// document changes again or is re-snapshotted, which `ficus verify` shows.
pub(super) async fn oversized(
    producer: &FutureProducer,
    topic: &str,
    event: CanonicalEvent,
    size: usize,
    error: &KafkaError,
) -> Result<(), BusError> {
    let error = format!(
        "the event is {size} bytes, too large for {topic} ({error}); raise the producer's message.max.bytes \
         ([kafka.producer]) and the topic's max.message.bytes, then re-snapshot (`ficus run --resnapshot`) to carry it"
    );
    tracing::error!(topic, event_id = %event.id, aggregate = %event.subject, size, "event too large for Kafka: dead-lettered without its document: {error}");
    let letter = DeadLetter {
        service: "tail".into(),
        stage: Stage::Publish,
        error,
        topic: topic.to_string(),
        partition: -1,
        offset: -1,
        original: event.to_json(),
    };
    send(producer, &letter, Some(event.key().as_bytes()), None, &event.id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_reads_back_with_its_original() {
        let letter = DeadLetter {
            service: "customers_db".into(),
            stage: Stage::Transform,
            error: "customers.toml (customers): segmentation.lifetimeValue: cannot cast \"x\" to decimal".into(),
            topic: "linechatbot.customers".into(),
            partition: 3,
            offset: 41,
            original: serde_json::json!({ "id": "e1", "subject": "U1" }),
        };
        let back = DeadLetter::from_json(&letter.to_json()).unwrap();
        assert_eq!(back, letter);
        let d = back.original(Some(b"U1".to_vec()));
        assert_eq!((d.topic.as_str(), d.partition, d.offset), ("linechatbot.customers", 3, 41));
        assert_eq!(serde_json::from_slice::<Value>(&d.payload).unwrap()["id"], "e1");
        // Garbage that was not JSON is kept as text and comes back as the same bytes.
        let garbage = DeadLetter { original: Value::String("\u{1}not json".into()), stage: Stage::Decode, ..letter };
        assert_eq!(DeadLetter::from_json(&garbage.to_json()).unwrap().original(None).payload, b"\x01not json");
        assert!(DeadLetter::from_json(&serde_json::json!({ "stage": "nonsense" })).is_none());
    }
}
