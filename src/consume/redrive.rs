//! `ficus dlq replay`: re-drives a service's dead letters through the one apply path, once the
//! cause (a transform, a document) is fixed.
//!
//! Each `<topic>.dlq` of the topics the service reads is read up to its end as of the start, in
//! the group `ficus.<service>.dlq`, committing as it goes, so a second run only sees what came
//! since. Dead letters of other services on the same topic are left alone. What fails again is
//! dead-lettered again (after the point this run stops at), so nothing is lost.

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::direction::Transformer;
use super::{Applier, ConsumeError, Item, Path, Rejects};
use crate::bus::{DeadLetter, DeadLetters, ReadFrom, Reader};
use crate::config::KafkaConfig;
use crate::config::topics::dlq_topic;
use crate::event::Origin;
use crate::sink::Sink;

/// What a re-drive did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RedriveReport {
    /// Dead letters of this service applied successfully now.
    pub applied: u64,
    /// Dead letters that failed again (dead-lettered anew with the new error).
    pub failed: u64,
    /// Dead letters of other services, left alone.
    pub skipped: u64,
}

/// What to re-drive: the dead letters of `topics` (the topics a direction reads), read in the
/// group `<group>.dlq`, applied through `transformer` into `sink`, marked with `origin`.
pub struct Redrive<'a, T, S> {
    pub transformer: &'a T,
    pub sink: &'a S,
    pub topics: Vec<String>,
    /// The consumer group of the direction (`ficus.<service>`, `ficus.<service>.reverse`).
    pub group: String,
    pub origin: Option<Origin>,
}

/// Re-drives a direction's dead letters.
pub async fn redrive_dead_letters<T: Transformer, S: Sink<Op = T::Op>>(
    r: Redrive<'_, T, S>,
    kafka: &KafkaConfig,
    batch: usize,
    shutdown: &CancellationToken,
) -> Result<RedriveReport, ConsumeError> {
    let service = r.transformer.service();
    let group = format!("{}.dlq", r.group);
    let reader = Reader::new(kafka, &format!("ficus-dlq-replay-{service}"), Some(&group))?;
    let dlq = DeadLetters::new(kafka, service)?;
    let applier = Applier {
        transformer: r.transformer,
        sink: r.sink,
        rejects: Rejects::DeadLetter(&dlq),
        path: Path::Redrive,
        origin: r.origin.clone(),
        judged: None,
    };
    let topics: Vec<String> = r.topics.iter().map(|t| dlq_topic(t)).collect();
    let mut report = RedriveReport::default();
    reader
        .read_to_end(
            &topics,
            |_, _| ReadFrom::Committed,
            batch,
            true,
            shutdown,
            async |letters| {
                let mut items = Vec::with_capacity(letters.len());
                for d in letters {
                    let letter =
                        serde_json::from_slice::<Value>(&d.payload).ok().and_then(|v| DeadLetter::from_json(&v));
                    match letter {
                        Some(l) if l.service == service => items.push(Item::delivered(l.original(d.key.clone()))),
                        _ => report.skipped += 1,
                    }
                }
                let done = applier.apply(&items, shutdown).await?;
                report.applied += done.applied;
                report.failed += done.rejected;
                Ok::<(), ConsumeError>(())
            },
        )
        .await?;
    Ok(report)
}
