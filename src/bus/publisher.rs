//! The publisher: canonical events and control messages onto their topics, keyed by aggregate,
//! with an acknowledgement per message that resolves once the broker has it durably.
//!
//! The tail hands events over one by one and keeps the acknowledgements in source order; only
//! a point whose every earlier acknowledgement resolved may be checkpointed. That contract is
//! what [`Publisher`] promises, whatever carries the events.

use std::future::Future;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{BusError, ClientRole, client_config};
use crate::config::KafkaConfig;
use crate::event::{CONTENT_TYPE, CanonicalEvent, ControlMessage};

/// A durable acknowledgement that resolves once the broker has the message (acks=all).
pub type Ack = BoxFuture<'static, Result<(), BusError>>;

/// Hands canonical events to the bus.
///
/// Contract: messages of one key are delivered in the order they were handed over; an
/// [`Ack`] resolves `Ok` only once the message is durable on the broker, and an error means
/// it may not be; nothing is dropped without an `Ack` saying so. Handing a message over may
/// wait while the client's queue is full (backpressure), never for the broker.
pub trait Publisher: Send + Sync {
    /// Queues one event for `topic`, keyed by its aggregate id.
    fn publish(&self, topic: &str, event: &CanonicalEvent) -> impl Future<Output = Result<Ack, BusError>> + Send;
    /// Queues one control message for every partition of `topic` (a marker each partition's
    /// consumer must see, in order with the events before it): `message(partition, count)`.
    fn publish_to_all_partitions(
        &self,
        topic: &str,
        message: impl Fn(i32, i32) -> ControlMessage + Send,
    ) -> impl Future<Output = Result<Vec<Ack>, BusError>> + Send;
    /// Waits until everything queued is acknowledged or `timeout` passes.
    fn flush(&self, timeout: Duration) -> Result<(), BusError>;
}

/// The rdkafka-backed publisher: an idempotent producer with acks=all.
pub struct KafkaPublisher {
    producer: FutureProducer,
    ce_headers: bool,
}

impl KafkaPublisher {
    pub fn new(cfg: &KafkaConfig, client_id: &str) -> Result<Self, BusError> {
        let producer: FutureProducer = client_config(cfg, ClientRole::Producer, client_id).create()?;
        Ok(KafkaPublisher { producer, ce_headers: cfg.ce_headers })
    }
}

impl Publisher for KafkaPublisher {
    async fn publish(&self, topic: &str, event: &CanonicalEvent) -> Result<Ack, BusError> {
        self.send(topic, None, Outgoing::Event(event)).await
    }

    async fn publish_to_all_partitions(
        &self,
        topic: &str,
        message: impl Fn(i32, i32) -> ControlMessage + Send,
    ) -> Result<Vec<Ack>, BusError> {
        let producer = self.producer.clone();
        let name = topic.to_string();
        let metadata =
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(Some(&name), Duration::from_secs(30)))
                .await
                .map_err(|e| BusError::Topic {
                    topic: topic.into(),
                    reason: format!("metadata lookup failed: {e}"),
                })??;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
        if partitions == 0 {
            return Err(BusError::Topic { topic: topic.into(), reason: "has no partitions (does it exist?)".into() });
        }
        let mut acks = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            acks.push(self.send(topic, Some(p), Outgoing::Control(&message(p, partitions))).await?);
        }
        Ok(acks)
    }

    fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        self.producer.flush(timeout).map_err(BusError::from)
    }
}

impl KafkaPublisher {
    async fn send(&self, topic: &str, partition: Option<i32>, message: Outgoing<'_>) -> Result<Ack, BusError> {
        let payload = message.encode();
        let headers = match message {
            Outgoing::Event(event) if self.ce_headers => {
                let mut h = OwnedHeaders::new_with_capacity(7);
                h = h.insert(Header { key: "content-type", value: Some(CONTENT_TYPE) });
                for (k, v) in event.ce_headers() {
                    h = h.insert(Header { key: k, value: Some(v.as_str()) });
                }
                Some(h)
            }
            _ => None,
        };
        let mut record = FutureRecord::to(topic).key(message.key()).payload(&payload);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        // What a dead letter keeps of an event too large to send: the envelope, not the images.
        let stripped = match message {
            Outgoing::Event(e) => Some((e.without_images(), payload.len())),
            Outgoing::Control(_) => None,
        };
        let fut = loop {
            match self.producer.send_result(record) {
                Ok(fut) => break fut,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) if oversized(&e) && stripped.is_some() => {
                    let producer = self.producer.clone();
                    let (topic, (event, size)) = (topic.to_string(), stripped.expect("checked"));
                    return Ok(
                        async move { super::dead_letter::oversized(&producer, &topic, event, size, &e).await }.boxed()
                    );
                }
                Err((e, _)) => {
                    return Err(BusError::Delivery {
                        id: message.id().into(),
                        topic: topic.into(),
                        error: Box::new(e),
                    });
                }
            }
        };
        let id = message.id().to_string();
        let topic = topic.to_string();
        let producer = self.producer.clone();
        drop(payload);
        Ok(async move {
            match fut.await {
                Ok(Ok(_delivery)) => Ok(()),
                Ok(Err((error, _msg))) if oversized(&error) && stripped.is_some() => {
                    let (event, size) = stripped.expect("checked");
                    super::dead_letter::oversized(&producer, &topic, event, size, &error).await
                }
                Ok(Err((error, _msg))) => Err(BusError::Delivery { id, topic, error: Box::new(error) }),
                Err(_) => Err(BusError::Cancelled { id, topic }),
            }
        }
        .boxed())
    }
}

/// A message on its way out, borrowed (events are encoded straight from the tailer's copy).
#[derive(Clone, Copy)]
enum Outgoing<'a> {
    Event(&'a CanonicalEvent),
    Control(&'a ControlMessage),
}

impl<'a> Outgoing<'a> {
    fn encode(self) -> Vec<u8> {
        match self {
            Outgoing::Event(e) => e.encode(),
            Outgoing::Control(c) => serde_json::to_vec(&c.to_json()).expect("a JSON value always serialises"),
        }
    }

    fn key(self) -> &'a str {
        match self {
            Outgoing::Event(e) => e.key(),
            Outgoing::Control(c) => c.key(),
        }
    }

    fn id(self) -> &'a str {
        match self {
            Outgoing::Event(e) => &e.id,
            Outgoing::Control(c) => &c.id,
        }
    }
}

fn oversized(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
}
