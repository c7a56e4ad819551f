//! A member of a consumer group: the one way ficus's roles read topics with Kafka's group
//! protocol (each service's consumer group, the archive's).
//!
//! The member subscribes, takes messages in batches and stores each batch's offsets for commit
//! only when the caller says the batch is durably handed on ([`GroupConsumer::store_offsets`]).
//! Processing happens between polls, and rebalance callbacks only run inside a poll, so nothing
//! is in flight when partitions are revoked: the revoke commits what was stored, and messages
//! collected for a partition taken away meanwhile are dropped for its new owner to read from the
//! committed offset.
//!
//! Broker outages are ridden out with the same member (librdkafka reconnects and rejoins by
//! itself); only fatal errors end it. A member fenced by another process with the same
//! `group.instance.id` is reported as [`BusError::Fenced`].

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{BusError, ClientRole, GroupLag, client_config};
use crate::config::{KafkaConfig, Membership};
use crate::retry::Classify;

/// One message, owned, as taken from Kafka.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

impl Delivery {
    pub(crate) fn from_message<M: Message>(m: &M) -> Delivery {
        Delivery {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        }
    }
}

/// Commits stored offsets when partitions are revoked, tells the loop a rebalance happened, and
/// publishes librdkafka's per-partition consumer lag as `ficus_consumer_lag`.
pub struct DrainContext {
    group: String,
    rebalanced: AtomicBool,
    /// Whether any broker connection is up, as of librdkafka's last statistics (or a consumer
    /// error saying all are down since).
    connected: AtomicBool,
    /// Whether the member is admitted to its group (librdkafka's group state `up` and join state
    /// `steady`), as of the last statistics; unknown (`UNKNOWN`) before the first.
    admitted: std::sync::atomic::AtomicU8,
    /// When the group last handed the member an assignment (an empty one too): a join that
    /// completed.
    assigned: std::sync::Mutex<Option<std::time::Instant>>,
    /// Set once the member is on its way out: a revoke then commits nothing more (the close
    /// committed what was stored, and a commit against a coordinator that is gone would hold
    /// the closing thread).
    closing: AtomicBool,
}

const UNKNOWN: u8 = 2;

impl ClientContext for DrainContext {
    fn stats(&self, stats: rdkafka::Statistics) {
        // Bootstrap and learned brokers both count: a consumer is connected while any link is up.
        let up = stats.brokers.values().any(|b| b.state == "UP");
        self.connected.store(up, Ordering::SeqCst);
        if let Some(g) = &stats.cgrp {
            let admitted = g.state == "up" && g.join_state == "steady";
            self.admitted.store(u8::from(admitted), Ordering::SeqCst);
        }
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                // librdkafka's internal "unassigned" partition is -1; unknown lag is -1 too.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    let labels =
                        [("group", self.group.clone()), ("topic", topic.clone()), ("partition", partition.to_string())];
                    metrics::gauge!("ficus_consumer_lag", &labels).set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for DrainContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Everything processed has its offset stored; commit it before letting go.
            if !self.closing.load(Ordering::SeqCst)
                && let Err(e) = consumer.commit_consumer_state(CommitMode::Sync)
            {
                debug!("commit on revoke: {e}");
            }
            info!(group = %self.group, partitions = tpl.count(), "partitions revoked");
        }
        self.rebalanced.store(true, Ordering::SeqCst);
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            *self.assigned.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
            info!(group = %self.group, partitions = tpl.count(), "partitions assigned");
        }
    }
}

/// How long a member's final commit and leave may take on the way out (see
/// [`GroupConsumer::close`]).
const FINAL_COMMIT_WAIT: Duration = Duration::from_secs(10);

/// A subscribed member of one consumer group. Clones share the member (for a task that watches
/// its partitions and progress).
#[derive(Clone)]
pub struct GroupConsumer {
    consumer: Arc<Member>,
    group: String,
    topics: Vec<String>,
    instance: Option<String>,
}

/// The librdkafka consumer, destroyed off the runtime: destroying a group member closes it
/// (revoke, commit, leave), which waits on the group coordinator, for good when it is gone (a
/// broker down or wedged). Done on a runtime worker, that held the worker; with every worker so
/// held, nothing else ran, not even the signal handler (`ficus run` ignored SIGTERM for 25
/// minutes with its servers gone, issue 19). So the last owner hands it to a thread of its own,
/// which the process does not wait for.
struct Member(Option<StreamConsumer<DrainContext>>);

impl std::ops::Deref for Member {
    type Target = StreamConsumer<DrainContext>;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let Some(consumer) = self.0.take() else { return };
        consumer.context().closing.store(true, Ordering::SeqCst);
        let group = consumer.context().group.clone();
        let spawned = std::thread::Builder::new().name("ficus-consumer-close".into()).spawn(move || {
            drop(consumer);
            debug!(%group, "consumer closed");
        });
        if let Err(e) = spawned {
            warn!("cannot start a thread to close a consumer ({e}); it is leaked instead");
        }
    }
}

impl GroupConsumer {
    /// Creates the member and subscribes it to `topics` (it joins on the first poll).
    pub fn join(kafka: &KafkaConfig, group: &str, topics: &[String], client_id: &str) -> Result<Self, BusError> {
        let cfg = client_config(kafka, ClientRole::GroupMember { group }, client_id);
        let ctx = DrainContext {
            group: group.to_string(),
            rebalanced: AtomicBool::new(false),
            connected: AtomicBool::new(true),
            admitted: std::sync::atomic::AtomicU8::new(UNKNOWN),
            assigned: std::sync::Mutex::new(None),
            closing: AtomicBool::new(false),
        };
        let consumer: StreamConsumer<DrainContext> = cfg.create_with_context(ctx)?;
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&refs)?;
        let instance = (kafka.membership == Membership::Static).then(|| super::group_instance_id(kafka, group));
        let consumer = Arc::new(Member(Some(consumer)));
        Ok(GroupConsumer { consumer, group: group.to_string(), topics: topics.to_vec(), instance })
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Collects the next batch: waits for one message (or shutdown, then `None`), then takes
    /// more for up to `wait` or until `max`. While waiting it calls `idle(connected)` every few
    /// seconds. If a rebalance happened meanwhile, messages of partitions this member no longer
    /// owns are dropped unprocessed: their new owner reads them from the committed offset.
    /// Consumer errors librdkafka recovers from are logged and polling goes on (see
    /// `survive`); only fatal ones are returned.
    pub async fn next_batch(
        &self,
        max: usize,
        wait: Duration,
        shutdown: &CancellationToken,
        mut idle: impl FnMut(bool),
    ) -> Result<Option<Vec<Delivery>>, BusError> {
        let ctx = self.consumer.context();
        loop {
            let first = loop {
                idle(ctx.connected.load(Ordering::SeqCst));
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    m = tokio::time::timeout(Duration::from_secs(5), self.consumer.recv()) => match m {
                        Ok(Ok(m)) => break Delivery::from_message(&m),
                        Ok(Err(e)) => self.survive(e)?,
                        Err(_) => continue,
                    },
                }
            };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + wait;
            while batch.len() < max {
                match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                    Ok(Ok(m)) => batch.push(Delivery::from_message(&m)),
                    Ok(Err(e)) => self.survive(e)?,
                    Err(_) => break,
                }
            }
            if ctx.rebalanced.swap(false, Ordering::SeqCst) {
                let owned_now: HashSet<(String, i32)> = self
                    .consumer
                    .assignment()?
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                batch.retain(|d| owned_now.contains(&(d.topic.clone(), d.partition)));
            }
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
        }
    }

    /// A consumer error seen while polling. librdkafka reports broker outages, timeouts and
    /// transport failures as errors but recovers from them itself, reconnecting and rejoining
    /// the group with the same consumer: so those are logged and polling goes on. Replacing the
    /// consumer instead would leave its old member in the group whenever the broker is
    /// unreachable (the leave cannot be sent), and a coordinator that does not evict it
    /// (Tansu's) would then hold the group's partitions for good. Errors that no retry can fix
    /// end the member; being fenced by another process's `group.instance.id` says so.
    fn survive(&self, e: KafkaError) -> Result<(), BusError> {
        if let Some((code, reason)) = self.consumer.client().fatal_error()
            && code == RDKafkaErrorCode::FencedInstanceId
        {
            return Err(BusError::Fenced {
                group: self.group.clone(),
                instance: self.instance.clone().unwrap_or_default(),
                reason,
            });
        }
        let transient = matches!(e, KafkaError::MessageConsumption(_)) && BusError::Kafka(e.clone()).is_transient();
        if !transient {
            return Err(e.into());
        }
        let stage = format!("group:{}", self.group);
        metrics::counter!("ficus_errors_total", "stage" => stage.clone(), "kind" => "transient").increment(1);
        let ctx = self.consumer.context();
        // One warning per outage; the reconnect attempts that follow are logged at debug.
        let was_connected = if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            ctx.connected.swap(false, Ordering::SeqCst)
        } else {
            ctx.connected.load(Ordering::SeqCst)
        };
        if was_connected {
            warn!(%stage, error = %e, "consumer error; librdkafka reconnects by itself, polling on");
        } else {
            debug!(%stage, error = %e, "consumer error while disconnected");
        }
        Ok(())
    }

    /// Stores, for commit, the offsets after a batch that is durably handed on (per partition,
    /// the next to read).
    pub fn store_offsets(&self, batch: &[Delivery]) -> Result<(), BusError> {
        if let Err(e) = self.consumer.store_offsets(&super::reader::next_offsets(batch)?) {
            // The partition was revoked meanwhile: its new owner re-applies (a no-op by version).
            debug!(group = %self.group, "store offsets: {e}");
        }
        Ok(())
    }

    /// Partitions assigned to this member now.
    pub fn partitions(&self) -> usize {
        self.consumer.assignment().map(|a| a.count()).unwrap_or(0)
    }

    /// How the member stands with its group as of librdkafka's last statistics (every 5 s).
    pub fn standing(&self) -> Standing {
        let ctx = self.consumer.context();
        let admitted = match ctx.admitted.load(Ordering::SeqCst) {
            UNKNOWN => None,
            a => Some(a == 1),
        };
        let assigned = *ctx.assigned.lock().unwrap_or_else(|p| p.into_inner());
        Standing { connected: ctx.connected.load(Ordering::SeqCst), admitted, assigned }
    }

    /// The group's lag and committed offsets over its topics, as the broker has them. Blocking
    /// (a few requests): call it off the runtime's worker threads.
    pub fn progress(&self) -> Result<GroupLag, BusError> {
        super::reader::group_lag(&**self.consumer, &self.topics)
    }

    /// Commits what was stored and leaves the subscription (on a clean stop or an error
    /// alike). A static member's partitions stay reserved for its instance id until its session
    /// expires, so the same process slot coming back takes them at once.
    ///
    /// Both calls block on the group coordinator, which may be busy or gone (a broker mid-
    /// rebalance, or down): they run off the runtime's workers and are waited on for at most
    /// [`FINAL_COMMIT_WAIT`]. Giving up loses nothing: offsets not committed are re-read by the next member
    /// and re-applied, a no-op by version.
    ///
    /// Returns whether the final commit was made; when it was not, what the member applied since
    /// its last commit is applied again by the next member (the caller says so).
    pub async fn close(&self) -> bool {
        let within = FINAL_COMMIT_WAIT;
        let (consumer, group) = (self.consumer.clone(), self.group.clone());
        let closing = tokio::task::spawn_blocking(move || {
            let committed = match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => true,
                // Nothing stored since the last commit: nothing to lose.
                Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => true,
                Err(e) => {
                    debug!(%group, "final commit: {e}");
                    false
                }
            };
            consumer.context().closing.store(true, Ordering::SeqCst);
            consumer.unsubscribe();
            committed
        });
        match tokio::time::timeout(within, closing).await {
            Ok(Ok(committed)) => committed,
            Ok(Err(_)) => false,
            Err(_) => {
                warn!(
                    group = %self.group,
                    "the final commit did not finish within {}s; the group's next member re-reads from the last commit",
                    within.as_secs()
                );
                false
            }
        }
    }
}

/// How a member stands with its group (see [`GroupConsumer::standing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Whether any broker connection is up.
    pub connected: bool,
    /// Whether the group has admitted the member (joined and synced, not rejoining); `None`
    /// before librdkafka's first statistics.
    pub admitted: Option<bool>,
    /// When the group last handed it an assignment, an empty one too (a join that completed).
    pub assigned: Option<std::time::Instant>,
}
