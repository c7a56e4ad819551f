//! `ficus replay`: rebuilds a service database from the event store plus the live tail.
//!
//! Events go through the same transform-and-write path as live consumption
//! ([`consume::prepare`] and the [`Sink`]), so a rebuilt database is what live traffic would
//! have built, and replaying twice equals replaying once (version guards).
//!
//! By default the rebuild happens in a shadow database (`<db>_replay`): the archive is applied
//! in `sequence` order, then each partition of the live topics from just after the newest
//! archived offset up to its end, and once caught up every collection is renamed over the live
//! one (ficus's tombstones and rollup members included). The live consumer may have written to
//! the old collections meanwhile, so the live tail is applied once more after the swap; it
//! carries on from its own committed offsets, and version guards absorb the overlap.
//! `--in-place` applies to the live database directly; `--from` starts the archive at a time.
//! A service whose targets are Redis entries is rebuilt under a key prefix and swapped in key
//! by key ([`replay_redis`]).
//!
//! The collections the service writes back record pre-images (see [`crate::pre_images`]), and a
//! swap must not lose them: the shadow's are created with them on before its first write, and
//! a rename carries a collection's options with it, so the collection under the live name has
//! them from the moment it is renamed in. Each is checked right after its rename all the same,
//! and turned on at once if a server dropped them (a warning says so); a shadow replay is
//! refused once a service has owned keys, so none of its writes is written back in that
//! instant anyway.

use std::collections::{BTreeSet, HashMap};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use bson::{DateTime, Document, doc};
use futures::TryStreamExt;
use mongodb::Client;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::bus::{BusError, ReadFrom, Reader};
use crate::config::KafkaConfig;
use crate::consume::{Applied, Applier, ConsumeError, Forward, Item, Path, Rejects};
use crate::event::Origin;
use crate::mongo;
use crate::sink::{MongoSink, SinkError};
use crate::store::{Archived, EventStore, StoreError};

/// Errors of a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Apply(#[from] ConsumeError),
    #[error("target MongoDB: {}", mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
    #[error("stopped by shutdown before the rebuild was complete; the live database is untouched")]
    Interrupted,
}

/// How to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Write straight into the live database instead of a shadow.
    pub in_place: bool,
    /// Only archived events from this time on.
    pub from: Option<DateTime>,
    /// Events per write batch.
    pub batch: usize,
    pub tombstone_ttl: Duration,
}

/// What a replay did.
#[derive(Debug, Default, Clone)]
pub struct ReplayReport {
    pub database: String,
    pub from_store: u64,
    pub from_live: u64,
    /// Events a transform rejected or whose write failed permanently (they are in the DLQ from
    /// live consumption, or would be).
    pub rejected: u64,
    pub elapsed: Duration,
}

/// The shadow database a replay builds in.
pub fn shadow_name(database: &str) -> String {
    format!("{database}_replay")
}

/// Rebuilds one service database. Writes into documents the service owns merge as live
/// traffic's do (`forward` carries the ownership); an in-place replay marks its writes as
/// ficus's own, so the service's reverse tail does not take them for the service's.
pub async fn replay(
    forward: &Forward,
    store: &EventStore,
    target: &Client,
    kafka: &KafkaConfig,
    opts: &ReplayOptions,
    shutdown: &CancellationToken,
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let transforms = &forward.transforms;
    let live_name = transforms.database().to_string();
    let origin = opts.in_place.then(|| Origin { service: transforms.service().to_string(), collection: None });
    let build_name = if opts.in_place { live_name.clone() } else { shadow_name(&live_name) };
    if !opts.in_place {
        target.database(&build_name).drop().await?;
    }
    // The shadow keeps tombstones at least as long as the live database does, since it replaces it.
    let live_ttl = MongoSink::tombstone_ttl(&target.database(&live_name)).await?.unwrap_or_default();
    let ttl = opts.tombstone_ttl.max(live_ttl);
    let (collections, written_back) = (transforms.collections(), transforms.written_back());
    let sink = MongoSink::open(target.clone(), &build_name, &collections, &written_back, ttl).await?;
    let mut report = ReplayReport { database: live_name.clone(), ..Default::default() };
    let topics: Vec<String> = transforms.topics().into_iter().collect();

    let applier = Applier {
        transformer: forward,
        sink: &sink,
        rejects: Rejects::Count,
        path: Path::Replay,
        origin: origin.clone(),
        judged: None,
    };
    // 1. The archive, in commit order.
    let archived_to = from_archive(&applier, store, &topics, opts, (&build_name, &mut report), shutdown).await?;

    // 2. The live tail after the archive.
    let live = catch_up(&applier, kafka, &topics, &archived_to, opts.batch, shutdown).await?;
    report.from_live += live.applied;
    report.rejected += live.rejected;

    // 3. Swap the shadow in, then apply the live tail once more over what the live consumer
    //    may have written to the old collections meanwhile.
    if !opts.in_place {
        swap(target, &build_name, &live_name, &collections, &written_back).await?;
        let live_sink = MongoSink::open(target.clone(), &live_name, &collections, &written_back, ttl).await?;
        let origin = Some(Origin { service: transforms.service().to_string(), collection: None });
        let applier = Applier {
            transformer: forward,
            sink: &live_sink,
            rejects: Rejects::Count,
            path: Path::Replay,
            origin,
            judged: None,
        };
        let live = catch_up(&applier, kafka, &topics, &archived_to, opts.batch, shutdown).await?;
        report.from_live += live.applied;
        report.rejected += live.rejected;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Applies the archived events of `topics` in commit order; returns, per partition, the last
/// offset archived (the live tail is read after it).
async fn from_archive<T, S>(
    applier: &Applier<'_, T, S>,
    store: &EventStore,
    topics: &[String],
    opts: &ReplayOptions,
    (into, report): (&str, &mut ReplayReport),
    shutdown: &CancellationToken,
) -> Result<HashMap<(String, i32), i64>, ReplayError>
where
    T: crate::consume::Transformer,
    S: crate::sink::Sink<Op = T::Op>,
{
    let mut filter = doc! { "topic": { "$in": topics } };
    if let Some(t) = opts.from {
        filter.insert("time", doc! { "$gte": t });
    }
    let total = store.count(filter).await?;
    info!(service = %report.database, events = total, into, "replaying the event store");
    let bar = progress_bar(total);
    // A reader task reads and decodes the next batches while this one is written (two ahead at
    // most, so memory stays bounded).
    let cursor = store.scan(topics, opts.from).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<Archived>, ReplayError>>(2);
    let reader = tokio::spawn(read_batches(cursor, opts.batch, tx));
    let mut archived_to: HashMap<(String, i32), i64> = HashMap::new();
    while let Some(batch) = rx.recv().await {
        let batch = batch?;
        let mut items = Vec::with_capacity(batch.len());
        for a in batch {
            let e = archived_to.entry((a.topic.clone(), a.partition)).or_insert(-1);
            *e = (*e).max(a.offset);
            items.push(Item::archived(a.topic, a.partition, a.offset, a.message));
        }
        report.rejected += applier.apply(&items, shutdown).await?.rejected;
        report.from_store += items.len() as u64;
        bar.set_position(report.from_store);
        if shutdown.is_cancelled() {
            reader.abort();
            return Err(ReplayError::Interrupted);
        }
    }
    bar.finish_and_clear();
    Ok(archived_to)
}

/// Reads the archive cursor in batches of `size` decoded events into `tx`, until the cursor ends,
/// an error (sent on, then stop) or the receiver goes away.
async fn read_batches(
    mut cursor: mongodb::Cursor<Document>,
    size: usize,
    tx: tokio::sync::mpsc::Sender<Result<Vec<Archived>, ReplayError>>,
) {
    loop {
        let mut batch = Vec::with_capacity(size);
        let result: Result<(), ReplayError> = async {
            while batch.len() < size {
                match cursor.try_next().await.map_err(StoreError::from)? {
                    Some(d) => batch.push(EventStore::from_doc(d)?),
                    None => break,
                }
            }
            Ok(())
        }
        .await;
        let last = result.is_err() || batch.len() < size;
        let item = result.map(|()| batch);
        if (item.as_ref().is_ok_and(|b| !b.is_empty()) || item.is_err()) && tx.send(item).await.is_err() {
            return;
        }
        if last {
            return;
        }
    }
}

/// Applies every partition of `topics` from just after the archived offset up to the end it
/// has now, through the live path.
async fn catch_up<S: crate::sink::Sink<Op = crate::transform::WriteOp>>(
    applier: &Applier<'_, Forward, S>,
    kafka: &KafkaConfig,
    topics: &[String],
    archived_to: &HashMap<(String, i32), i64>,
    batch: usize,
    shutdown: &CancellationToken,
) -> Result<Applied, ReplayError> {
    let reader = Reader::new(kafka, &format!("ficus-replay-{}", applier.transformer.transforms.service()), None)?;
    let start = |topic: &str, p: i32| match archived_to.get(&(topic.to_string(), p)) {
        Some(o) => ReadFrom::Offset(o + 1),
        None => ReadFrom::Beginning,
    };
    let mut done = Applied::default();
    let outcome = reader
        .read_to_end(topics, start, batch, false, shutdown, async |deliveries| {
            let items: Vec<Item> = deliveries.into_iter().map(Item::delivered).collect();
            done += applier.apply(&items, shutdown).await?;
            Ok::<(), ReplayError>(())
        })
        .await?;
    if !outcome.complete {
        return Err(ReplayError::Interrupted);
    }
    Ok(done)
}

/// Rebuilds a service whose targets are Redis entries (see `sink::redis`): under the rebuild
/// prefix (`ficus:<service>:replay:`, cleared first), the archive then the live tail, then each
/// rebuilt key renamed over the live one (a live key as new or newer kept), live keys the
/// rebuild did not produce removed, and the live tail applied once more to the live keys.
/// `--in-place` writes the live keys directly.
pub async fn replay_redis(
    forward: &Forward,
    store: &EventStore,
    (redis, at): (&redis::aio::ConnectionManager, String),
    kafka: &KafkaConfig,
    opts: &ReplayOptions,
    pause_above: f64,
    shutdown: &CancellationToken,
) -> Result<ReplayReport, ReplayError> {
    use crate::sink::redis::{plan::Layout, rebuild};
    let started = Instant::now();
    let transforms = &forward.transforms;
    let service = transforms.service().to_string();
    let (live, shadow) = (Layout::live(&service), Layout::shadow(&service));
    let build = if opts.in_place { live.clone() } else { shadow.clone() };
    if !opts.in_place {
        rebuild::clear(redis, &shadow).await?;
    }
    let open = |layout: Layout| {
        crate::sink::RedisSink::open(
            redis.clone(),
            at.clone(),
            transforms.clone(),
            layout,
            opts.tombstone_ttl,
            pause_above,
        )
    };
    let sink = open(build.clone()).await?;
    let mut report = ReplayReport { database: format!("{service} (Redis)"), ..Default::default() };
    let topics: Vec<String> = transforms.topics().into_iter().collect();
    let applier = Applier {
        transformer: forward,
        sink: &sink,
        rejects: Rejects::Count,
        path: Path::Replay,
        origin: None,
        judged: None,
    };
    let into = if opts.in_place { "the live keys".to_string() } else { shadow.entry("*") };
    let archived_to = from_archive(&applier, store, &topics, opts, (&into, &mut report), shutdown).await?;
    let live_tail = catch_up(&applier, kafka, &topics, &archived_to, opts.batch, shutdown).await?;
    report.from_live += live_tail.applied;
    report.rejected += live_tail.rejected;
    if !opts.in_place {
        let swapped = rebuild::swap(redis, &shadow, &live).await?;
        info!(%service, moved = swapped.moved, kept = swapped.kept, removed = swapped.removed, "swapped the rebuilt keys in");
        let live_sink = open(live).await?;
        let applier = Applier { sink: &live_sink, ..applier };
        let again = catch_up(&applier, kafka, &topics, &archived_to, opts.batch, shutdown).await?;
        report.from_live += again.applied;
        report.rejected += again.rejected;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Renames every collection of the shadow over the live one, then drops live collections the
/// rebuild did not produce (their documents no longer exist in the source). The collections
/// `written_back` keep their pre-images (see the module header).
async fn swap(
    client: &Client,
    shadow: &str,
    live: &str,
    service_collections: &BTreeSet<String>,
    written_back: &[&str],
) -> Result<(), ReplayError> {
    let admin = client.database("admin");
    // The conflicts outbox and the apply markers belong to the live database, not a build.
    let kept = [crate::sink::conflicts::CONFLICTS, crate::markers::COLLECTION];
    let built: Vec<String> = client.database(shadow).list_collection_names().await?;
    for c in built.iter().filter(|c| !kept.contains(&c.as_str())) {
        admin
            .run_command(
                doc! { "renameCollection": format!("{shadow}.{c}"), "to": format!("{live}.{c}"), "dropTarget": true },
            )
            .await?;
        if written_back.contains(&c.as_str()) {
            let done = crate::pre_images::ensure(&client.database(live), c).await?;
            if done != crate::pre_images::Ensured::Already {
                tracing::warn!(%live, collection = %c, ?done, "the rename dropped the collection's pre-images; turned them on again");
            }
        }
    }
    let live_db = client.database(live);
    for c in live_db.list_collection_names().await? {
        let ours = service_collections.contains(&c) || (c.starts_with("_ficus") && !kept.contains(&c.as_str()));
        if ours && !built.contains(&c) {
            live_db.collection::<Document>(&c).drop().await?;
        }
    }
    client.database(shadow).drop().await?;
    info!(%live, "swapped the rebuilt database in");
    Ok(())
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("replay {bar:40} {pos}/{len} events {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
