//! The I/O of the move's steps: waiting for readers to acknowledge, the flip, the preflight's
//! checks, the drain to a marker, the verify of the moving buckets, and the observation after
//! the flip. `mod.rs` drives them in the order of `cutover::plan`.

use std::time::{Duration, Instant};

use bson::{Document, Timestamp, doc};
use mongodb::Database;

use super::{CutoverError, Sides};
use crate::bus::Reader;
use crate::consume::{Direction, Pipeline};
use crate::cutover::moves::{DrainTo, MoveRecord};
use crate::cutover::ownership::{Drain, Ownership};
use crate::cutover::plan::{Move, Side};
use crate::cutover::views::{Held, Seen, Viewer, Views};
use crate::retry::Classify;
use crate::tail::checkpoint::{CheckpointStore, MongoCheckpoints, TailPhase};
use crate::transform::ServiceTransforms;

/// Waits until the readers of the service's ownership of a kind (applications, or ficus's
/// processes) have acknowledged what `decide` asks, printing who is awaited now and then;
/// returns who acknowledged and whether it ended by the age bound.
pub(super) async fn wait_held(
    sides: &Sides<'_>,
    reader: Viewer,
    service: &str,
    since: bson::DateTime,
    decide: impl Fn(&[Seen], bson::DateTime) -> Held,
) -> Result<(Vec<String>, bool), CutoverError> {
    let registry = Views::new(&sides.store);
    let mut told = Instant::now() - Duration::from_secs(60);
    let host = crate::config::host_name();
    loop {
        let mut seen = registry.of(reader, service, since).await?;
        // A ficus process of this host that is gone (SIGKILL) acknowledges nothing, and has no
        // batch left to commit: not waited on (one elsewhere is, up to the bound).
        if reader == Viewer::Ficus {
            seen.retain(|s| {
                let pid = s.instance.rsplit_once(':').filter(|(h, _)| *h == host).and_then(|(_, p)| p.parse().ok());
                pid.is_none_or(crate::ops::presence::process_alive)
            });
        }
        match decide(&seen, bson::DateTime::now()) {
            Held::Yes { acknowledged, by_age } => return Ok((acknowledged, by_age)),
            Held::Waiting { missing } if told.elapsed() > Duration::from_secs(5) => {
                sides.say(format!("  waiting for {} to acknowledge: {}", reader_name(reader), missing.join(", ")));
                told = Instant::now();
            }
            Held::Waiting { .. } => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `d` before `t`.
pub(super) fn earlier(t: bson::DateTime, d: Duration) -> bson::DateTime {
    bson::DateTime::from_millis(t.timestamp_millis().saturating_sub(d.as_millis().min(i64::MAX as u128) as i64))
}

fn reader_name(r: Viewer) -> &'static str {
    match r {
        Viewer::App => "applications",
        Viewer::Ficus => "ficus processes",
    }
}

/// The flip: the new share stored pending, then in force with its times and the fence lifted,
/// each one write (see `cutover::ownership`). A flip cut short is finished, never done twice.
pub(super) async fn flip(sides: &Sides<'_>, mv: &Move) -> Result<Ownership, CutoverError> {
    let service = mv.service.as_str();
    let current = sides.ownership.store.get(service).await?;
    let pending = current.as_ref().and_then(|o| o.history.iter().find(|s| s.pending)).map(|s| s.percent);
    match (&current, pending) {
        (Some(o), None) if o.percent == mv.to && o.fenced.is_none() => return Ok(o.clone()),
        (_, Some(p)) if p == mv.to => {}
        (_, Some(_)) => {
            sides.ownership.store.undo_pending(service).await?;
            sides.ownership.store.begin(service, mv.to, false).await?;
        }
        (_, None) => {
            sides.ownership.store.begin(service, mv.to, false).await?;
        }
    }
    crate::failpoint::hit("cutover.flip.pending");
    let at = sides.ownership.clocks().await?;
    let o = sides.ownership.store.resolve(service, at).await?;
    o.ok_or_else(|| CutoverError::State(format!("{service}: the ownership record vanished during the flip")))
}

/// The consumer group and topics that carry the losing side's writes to the gaining side.
pub(super) fn carriers(transforms: &ServiceTransforms, losing: Side) -> (String, Vec<String>) {
    let direction = match losing {
        Side::Monolith => Direction::Forward,
        Side::Service => Direction::Reverse,
    };
    let Pipeline { group, topics } = Pipeline::of(transforms, direction);
    (group, topics)
}

/// What stops a move before it changes anything (empty: it can go). `laws`: the lens laws are
/// checked on the monolith's documents too (an emergency move leaves them out: they read every
/// document of the service).
pub(super) async fn preflight(sides: &Sides<'_>, mv: &Move, laws: bool) -> Result<Vec<String>, CutoverError> {
    let cfg = &sides.config;
    let service = mv.service.as_str();
    let mut problems = Vec::new();
    let broken = laws
        && !crate::lens::check(
            &sides.definitions.services,
            &sides.definitions.topics,
            &sides.monolith,
            &cfg.source.name,
            Some(service),
            None,
        )
        .await?;
    if broken {
        problems.push(format!("`ficus lens check --service {service}` fails (see above)"));
    }
    let mut groups = vec![carriers(sides.transforms, Side::Monolith).0];
    if mv.gaining() == Side::Monolith {
        groups.push(carriers(sides.transforms, Side::Service).0);
    }
    for group in groups {
        let members = crate::ops::presence::live_members(&sides.store, &group).await?;
        if members.is_empty() {
            problems.push(format!("group {group} has no live member: is `ficus run` running?"));
        } else if let Some((who, m)) = members.iter().find(|(_, m)| m.stalled.is_some()) {
            problems.push(format!("group {group} is stalled ({who}: {})", m.stalled.as_deref().unwrap_or_default()));
        }
    }
    let changes = crate::config::topics::changes_topic(service);
    let reader = Reader::new(&cfg.kafka, "ficus-cutover", None)?;
    if reader.partitions(&changes)?.is_empty() {
        problems.push(format!("topic {changes} does not exist: run `ficus topics apply`"));
    }
    if let Err(e) = sides.service_db.watch().await {
        problems.push(format!("the change stream of {service} does not open: {}", crate::mongo::describe(&e)));
    }
    problems.extend(crate::pre_images::problems(sides.transforms, &sides.monolith, &sides.service_db).await?);
    Ok(problems)
}

/// Writes the fence marker into the losing side, waits for its tail to checkpoint past it,
/// records the ends of its topics then, and waits for the consumers to commit up to them.
pub(super) async fn drain(
    sides: &Sides<'_>,
    record: &mut MoveRecord,
    timeout: Duration,
) -> Result<Result<String, String>, CutoverError> {
    let deadline = Instant::now() + timeout;
    if record.drain_to.is_empty()
        && let Err(why) = mark(sides, record, timeout, deadline).await?
    {
        return Ok(Err(why));
    }
    let (group, topics) = carriers(sides.transforms, record.mv.losing());
    let reader = Reader::new(&sides.config.kafka, "ficus-cutover", Some(&group))?;
    loop {
        let Some(positions) = positions(sides, &reader, &topics, deadline).await? else {
            return Ok(Err(format!(
                "Kafka did not answer within {}s (reading the offsets of {group})",
                timeout.as_secs()
            )));
        };
        let behind: Vec<String> = record
            .drain_to
            .iter()
            .filter(|d| {
                !positions.iter().any(|p| p.topic == d.topic && p.partition == d.partition && p.consumed_to(d.offset))
            })
            .map(|d| format!("{}[{}] < {}", d.topic, d.partition, d.offset))
            .collect();
        if behind.is_empty() {
            return Ok(Ok(format!(
                "group {group} committed past the fence marker on all {} partitions",
                record.drain_to.len()
            )));
        }
        if Instant::now() > deadline {
            return Ok(Err(format!(
                "group {group} has not committed past the fence marker within {}s on: {}",
                timeout.as_secs(),
                behind.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The drain point: the fence marker written into the losing side (once: a resumed move keeps
/// its marker), its tail checkpointed past it, and the ends of its topics then recorded in the
/// move. Writes on the losing side to fenced keys after the marker are fence violations; while
/// it is being written, judges of the service's changes wait.
async fn mark(
    sides: &Sides<'_>,
    record: &mut MoveRecord,
    timeout: Duration,
    deadline: Instant,
) -> Result<Result<(), String>, CutoverError> {
    let service = record.mv.service.clone();
    let losing = record.mv.losing();
    let (db, tail) = match losing {
        Side::Monolith => (&sides.monolith, sides.config.source.name.clone()),
        Side::Service => (&sides.service_db, service.clone()),
    };
    let lifted =
        |when: &str| CutoverError::State(format!("{service}: the fence was lifted (an --abort?) {when} the drain"));
    let marker = match record.marker {
        Some(m) => m,
        None => {
            if sides.ownership.store.set_drain(&service, Drain::Pending).await?.is_none() {
                return Err(lifted("before"));
            }
            crate::failpoint::hit("cutover.drain.pending");
            let m = write_marker(db, &service, &record.mv).await?;
            record.marker = Some(m);
            sides.moves.save(record).await?;
            m
        }
    };
    if sides.ownership.store.set_drain(&service, Drain::At(marker)).await?.is_none() {
        return Err(lifted("during"));
    }
    let checkpoints = MongoCheckpoints::new(&sides.store);
    loop {
        let at = checkpoints.load(&tail).await?.and_then(|s| match s.phase {
            TailPhase::Stream(p) => Some(p.cluster_time),
            TailPhase::Snapshot(_) => None,
        });
        if at.is_some_and(|t| t >= marker) {
            break;
        }
        if Instant::now() > deadline {
            return Ok(Err(format!(
                "the tail of {losing} has not checkpointed past the fence marker (at {}.{}) within {}s: is `ficus run` \
                 running, and its tail healthy?",
                marker.time,
                marker.increment,
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Everything before the marker is on Kafka now: below these ends.
    let (_, topics) = carriers(sides.transforms, losing);
    let reader = Reader::new(&sides.config.kafka, "ficus-cutover", None)?;
    let Some(ends) = positions(sides, &reader, &topics, deadline).await? else {
        return Ok(Err(format!(
            "Kafka did not answer within {}s (reading the ends of {})",
            timeout.as_secs(),
            topics.join(", ")
        )));
    };
    record.drain_to =
        ends.into_iter().map(|p| DrainTo { topic: p.topic, partition: p.partition, offset: p.high }).collect();
    sides.moves.save(record).await?;
    Ok(Ok(()))
}

/// The positions of `topics`; a broker that does not answer (a metadata request timing out
/// under load, a broker restarting) is waited for, and retried, until `deadline` (`None` then).
async fn positions(
    sides: &Sides<'_>,
    reader: &Reader,
    topics: &[String],
    deadline: Instant,
) -> Result<Option<Vec<crate::bus::PartitionPosition>>, CutoverError> {
    loop {
        match reader.positions(topics) {
            Ok(p) => return Ok(Some(p)),
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                sides.warn(format!("  Kafka: {e}; trying again"));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) if e.is_transient() => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The fence marker: a write of ficus's own into the losing side's `_ficus_applied`, outside
/// any transaction (its tail reads it as bookkeeping, publishes nothing, and checkpoints past
/// it once everything before it is acknowledged). Returns its cluster time.
async fn write_marker(db: &Database, service: &str, mv: &Move) -> Result<Timestamp, CutoverError> {
    use futures::StreamExt;
    // The marker's time is its own change's, read off a change stream opened before the write:
    // a write's operation time may be a later cluster time (secantusd-rs answers with the
    // clock after other databases' writes, ficus's own bookkeeping among them), which the
    // losing side's tail, quiet after the marker, would never checkpoint past.
    let (id, update) = crate::markers::fence(service, mv.from, mv.to);
    let markers = db.collection::<Document>(crate::markers::COLLECTION);
    let mut changes = markers.watch().pipeline([doc! { "$match": { "documentKey._id": &id } }]).await?;
    let mut session = db.client().start_session().await?;
    markers.update_one(doc! { "_id": &id }, update).upsert(true).session(&mut session).await?;
    let written = session
        .operation_time()
        .ok_or_else(|| CutoverError::State("no operation time for the fence marker: is it a replica set?".into()))?;
    match tokio::time::timeout(MARKER_SEEN, changes.next()).await {
        Ok(Some(Ok(change))) => Ok(change.cluster_time.map_or(written, |t| t.min(written))),
        Ok(Some(Err(e))) => Err(e.into()),
        // No change seen in time: the write's own operation time, as before.
        Ok(None) | Err(_) => Ok(written),
    }
}

/// How long a fence marker's own change may take to show on a change stream.
const MARKER_SEEN: Duration = Duration::from_secs(30);

/// Every service document in the moving buckets against the forward transforms.
pub(super) async fn verify_moving(sides: &Sides<'_>, mv: &Move) -> Result<Result<String, String>, CutoverError> {
    let cfg = &sides.config;
    // Up to 30 s of re-checks: the gaining side's own writes to the moving documents (the
    // monolith's code touching customers the service owns) are in flight while it runs.
    let opts = crate::verify::VerifyOptions {
        sample: 10,
        settle: Duration::from_secs(2),
        rechecks: 15,
        buckets: Some(mv.buckets()),
        quality: false,
        memory_entries: crate::verify::MEMORY_ENTRIES,
    };
    let report = crate::verify::verify(
        sides.transforms,
        &sides.definitions.topics,
        &sides.monolith,
        &cfg.source.name,
        &sides.service_db,
        &sides.store,
        &opts,
    )
    .await?;
    let checked: u64 = report.collections.values().map(|t| t.expected).sum();
    if report.exact() {
        Ok(Ok(format!("{checked} documents in the moving buckets equal the forward transforms of the monolith")))
    } else {
        Ok(Err(format!("the moving buckets differ from the monolith:\n{}", report.render())))
    }
}

/// Lags, echoes and conflicts after the flip; moving up, waits for the reverse tail to follow.
pub(super) async fn observe(sides: &Sides<'_>, mv: &Move, timeout: Duration) -> Result<String, CutoverError> {
    let cfg = &sides.config;
    let service = mv.service.as_str();
    let mut parts = Vec::new();
    if mv.to > 0 {
        let checkpoints = MongoCheckpoints::new(&sides.store);
        let deadline = Instant::now() + timeout.min(Duration::from_secs(60));
        let following = loop {
            if checkpoints.load(service).await?.is_some() {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        parts.push(if following {
            "reverse tail following".to_string()
        } else {
            "WARNING: the reverse tail has not started (is `ficus run` running with the reverse role?)".to_string()
        });
    }
    let (fg, ft) = carriers(sides.transforms, Side::Monolith);
    let (rg, rt) = carriers(sides.transforms, Side::Service);
    for (what, group, topics) in [("forward", fg, ft), ("write-back", rg, rt)] {
        match crate::status::group_lag(&cfg.kafka, &group, &topics) {
            Ok(g) => parts.push(format!("{what} lag {}", g.lag)),
            Err(e) => parts.push(format!("{what} lag unknown ({e})")),
        }
    }
    let echoes = crate::sink::echoes_skipped(&sides.service_db, service).await?;
    parts.push(format!("{echoes} echoes skipped"));
    Ok(parts.join(", "))
}
