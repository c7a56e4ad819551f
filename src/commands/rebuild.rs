//! Rebuilding what a service holds: `ficus replay` (the event store and the live tail into a
//! shadow or in place) and `ficus dlq replay` (dead letters re-driven through the one apply path,
//! forward into the service or backward into the monolith).

use tokio_util::sync::CancellationToken;

use super::CommandError;
use crate::clients::Clients;
use crate::commands::cutover::lock::MoveLock;
use crate::config::Config;
use crate::consume::{Backward, Direction, Forward, Pipeline, Redrive, RedriveReport, redrive_dead_letters};
use crate::cutover::ownership::OwnershipStore;
use crate::event::Origin;
use crate::replay::{ReplayOptions, ReplayReport};
use crate::sink::{MongoSink, MonolithSink, RedisSink};
use crate::store::EventStore;
use crate::transform::ServiceTransforms;

/// `ficus replay`: rebuilds `transforms`'s database; a service that has owned keys only in
/// place (its database holds writes of its own that the monolith's events do not have). It
/// judges ownership once, by the record as it is when it starts, so it holds the service's move
/// lock throughout (no `ficus cutover` changes ownership under it) and refuses to start while a
/// move is half-way (fenced, or a flip pending).
pub async fn replay(
    config: &Config,
    clients: &Clients,
    transforms: &std::sync::Arc<ServiceTransforms>,
    in_place: bool,
    from: Option<bson::DateTime>,
    shutdown: &CancellationToken,
) -> Result<ReplayReport, CommandError> {
    let service = transforms.service();
    let lock = match MoveLock::take(&clients.store(), service, &|_| {}).await? {
        Ok(lock) => lock,
        Err(by) => {
            return Err(CommandError::BadInput(format!(
                "{service}: a move is under way (`ficus cutover` holds its lock: {by}); replay once it has finished"
            )));
        }
    };
    let result = replay_locked(config, clients, transforms, in_place, from, shutdown).await;
    lock.release().await;
    result
}

/// [`replay`], under the move lock.
async fn replay_locked(
    config: &Config,
    clients: &Clients,
    transforms: &std::sync::Arc<ServiceTransforms>,
    in_place: bool,
    from: Option<bson::DateTime>,
    shutdown: &CancellationToken,
) -> Result<ReplayReport, CommandError> {
    let service = transforms.service();
    let ownership = OwnershipStore::new(&clients.store()).get(service).await?;
    if let Some(o) = ownership.as_ref().filter(|o| o.fenced.is_some() || o.pending()) {
        return Err(CommandError::BadInput(format!(
            "{service}: a move was left half-way (epoch {}{}); finish it with `ficus cutover --service {service}` \
             (or `--abort`), then replay",
            o.epoch,
            if o.pending() { ", a flip pending" } else { ", fenced" }
        )));
    }
    if ownership.as_ref().is_some_and(|o| o.ever_owned()) && !in_place {
        return Err(CommandError::BadInput(format!(
            "{service} has owned keys (see `ficus cutover`): its database holds writes of its own that a rebuild \
             from the monolith's events would not have, so rebuild it in place (`--in-place`), which merges into \
             the documents it owns"
        )));
    }
    let forward = Forward { transforms: transforms.clone(), ownership };
    let store = EventStore::open(&clients.store()).await?;
    let consume = &config.consume;
    let opts = ReplayOptions { in_place, from, batch: consume.batch_max, tombstone_ttl: consume.tombstone_ttl };
    if transforms.is_redis() {
        let redis = &clients.redis;
        let conn = redis.get().await.map_err(crate::sink::SinkError::from)?;
        let to = (&conn, redis.describe());
        let pause = config.redis.pause_above;
        return Ok(crate::replay::replay_redis(&forward, &store, to, &config.kafka, &opts, pause, shutdown).await?);
    }
    Ok(crate::replay::replay(&forward, &store, &clients.target, &config.kafka, &opts, shutdown).await?)
}

/// `ficus dlq replay`: the forward direction's dead letters, or (`reverse`) the write-backs'.
pub async fn redrive(
    config: &Config,
    clients: &Clients,
    transforms: &std::sync::Arc<ServiceTransforms>,
    reverse: bool,
    shutdown: &CancellationToken,
) -> Result<RedriveReport, CommandError> {
    let service = transforms.service();
    let consume = &config.consume;
    let ownership = OwnershipStore::new(&clients.store()).get(service).await?;
    let origin = Some(Origin { service: service.to_string(), collection: None });
    if reverse {
        if transforms.written_back().is_empty() {
            return Err(CommandError::BadInput(format!("{service} writes nothing back to the monolith")));
        }
        let sink = MonolithSink::new(clients.source.clone(), &config.source.db, transforms.clone());
        let backward = Backward { transforms: transforms.clone(), ownership };
        let Pipeline { group, topics } = Pipeline::of(transforms, Direction::Reverse);
        let redrive = Redrive { transformer: &backward, sink: &sink, topics, group, origin };
        return Ok(redrive_dead_letters(redrive, &config.kafka, consume.batch_max, shutdown).await?);
    }
    let forward = Forward { transforms: transforms.clone(), ownership };
    if transforms.is_redis() {
        let redis = &clients.redis;
        let conn = redis.get().await.map_err(crate::sink::SinkError::from)?;
        let layout = crate::sink::redis::plan::Layout::live(service);
        let (ttl, pause) = (consume.tombstone_ttl, config.redis.pause_above);
        let sink = RedisSink::open(conn, redis.describe(), transforms.clone(), layout, ttl, pause).await?;
        let Pipeline { group, topics } = Pipeline::of(transforms, Direction::Forward);
        let redrive = Redrive { transformer: &forward, sink: &sink, topics, group, origin: None };
        return Ok(redrive_dead_letters(redrive, &config.kafka, consume.batch_max, shutdown).await?);
    }
    let (collections, written_back) = (transforms.collections(), transforms.written_back());
    let target = clients.target.clone();
    let sink =
        MongoSink::open(target, transforms.database(), &collections, &written_back, consume.tombstone_ttl).await?;
    let origin = origin.filter(|_| !transforms.written_back().is_empty());
    let Pipeline { group, topics } = Pipeline::of(transforms, Direction::Forward);
    let redrive = Redrive { transformer: &forward, sink: &sink, topics, group, origin };
    Ok(redrive_dead_letters(redrive, &config.kafka, consume.batch_max, shutdown).await?)
}
