//! How the daemon builds each role from the process's clients and the definitions: the tail,
//! one forward consumer per service, reverse sync for each service once it has owned keys, and
//! the archive. Every role that judges ownership follows one [`OwnershipFeed`], started once the
//! servers answer, so a `ficus cutover` takes effect without a restart.

use std::sync::Arc;

use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{DaemonError, Definitions, Role, RoleError, Running, Task};
use crate::clients::Clients;
use crate::config::Config;
use crate::consume::{Repairs, ServiceConsumer};
use crate::cutover::feed::{OwnershipFeed, OwnershipSource};
use crate::cutover::ownership::{OwnershipError, OwnershipStore};
use crate::ops::Health;
use crate::retry::Classify;
use crate::sink::conflicts::Outbox;
use crate::sink::{MongoSink, MonolithSink, RedisSink, SinkError};
use crate::store::{Archiver, EventStore, StoreError};
use crate::transform::ServiceTransforms;

/// What every role is built from.
pub(super) struct Context {
    pub config: Config,
    pub definitions: Definitions,
    pub clients: Clients,
    pub health: Health,
    pub shutdown: CancellationToken,
    pub running: Running,
}

/// Starts the roles asked for into `tasks`.
pub(super) fn spawn(
    ctx: &Context,
    roles: &[Role],
    services: &[String],
    resnapshot: bool,
    tasks: &mut Task,
) -> Result<(), DaemonError> {
    let chosen = ctx.definitions.select(services)?;
    // The services this process judges changes of: those that can write back.
    let judged: Vec<String> =
        chosen.iter().filter(|s| !s.written_back().is_empty()).map(|s| s.service().to_string()).collect();
    let feed =
        Arc::new(Feed { cell: OnceCell::new(), judged, clients: ctx.clients.clone(), config: ctx.config.clone() });
    if roles.contains(&Role::Tail) {
        let role = crate::tail::role::TailRole {
            cfg: ctx.config.clone(),
            clients: ctx.clients.clone(),
            topics: ctx.definitions.topics.clone(),
            resnapshot,
            health: ctx.health.clone(),
        };
        let token = ctx.shutdown.clone();
        start(ctx, tasks, "tail".into(), async move { role.run(token).await.map_err(RoleError::from) });
    }
    if roles.contains(&Role::Consume) {
        for service in chosen.iter().cloned() {
            let name = format!("consume:{}", service.service());
            start(ctx, tasks, name, consume(ctx, service, feed.clone()));
        }
    }
    if roles.contains(&Role::Reverse) {
        for service in chosen.iter().filter(|s| !s.written_back().is_empty()).cloned() {
            let name = format!("reverse:{}", service.service());
            start(ctx, tasks, name, reverse(ctx, service, feed.clone()));
        }
    }
    if roles.contains(&Role::Archive) {
        start(ctx, tasks, "archive".into(), archive(ctx));
    }
    Ok(())
}

/// Spawns one role, recorded as running under `name` until it ends.
fn start(
    ctx: &Context,
    tasks: &mut Task,
    name: String,
    role: impl std::future::Future<Output = Result<(), RoleError>> + Send + 'static,
) {
    let entered = ctx.running.enter(&name);
    tasks.spawn(async move {
        let _running = entered;
        (name, role.await)
    });
}

/// The process's ownership feed, started on first use once the servers answer.
struct Feed {
    cell: OnceCell<OwnershipFeed>,
    judged: Vec<String>,
    clients: Clients,
    config: Config,
}

impl Feed {
    /// The feed; `None` when shutdown came first.
    async fn follow(&self, shutdown: &CancellationToken) -> Result<Option<OwnershipFeed>, OwnershipError> {
        let start = || async {
            let store = self.clients.store();
            let source = OwnershipSource {
                store: OwnershipStore::new(&store),
                store_db: store,
                monolith: self.clients.monolith(),
                services: self.clients.service("admin"),
            };
            let instance = format!("{}:{}", crate::config::host_name(), std::process::id());
            let judged = (instance, self.judged.clone());
            OwnershipFeed::start(source, self.config.reverse.ownership_poll, judged, shutdown.clone()).await
        };
        let started = self
            .cell
            .get_or_try_init(|| crate::retry::with_backoff("ownership", shutdown, start, OwnershipError::is_transient))
            .await;
        match started {
            Ok(f) => Ok(Some(f.clone())),
            Err(_) if shutdown.is_cancelled() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// One service's forward consumer; a service that can write back judges ownership, records
/// conflicts and repairs them.
fn consume(
    ctx: &Context,
    service: Arc<ServiceTransforms>,
    feed: Arc<Feed>,
) -> impl std::future::Future<Output = Result<(), RoleError>> + Send + 'static {
    let (clients, config, health, token) =
        (ctx.clients.clone(), ctx.config.clone(), ctx.health.clone(), ctx.shutdown.clone());
    let topics = ctx.definitions.topics.clone();
    async move {
        if service.is_redis() {
            return consume_redis(clients, config, health, token, service).await;
        }
        let name = service.service().to_string();
        // The target may not be reachable yet: wait for it rather than exit.
        let (collections, written_back) = (service.collections(), service.written_back());
        let ttl = config.consume.tombstone_ttl;
        let open = || MongoSink::open(clients.target.clone(), service.database(), &collections, &written_back, ttl);
        let transient = |e: &SinkError| e.class() == crate::mongo::ErrorClass::Transient;
        let sink = crate::retry::with_backoff(&format!("consume:{name}"), &token, open, transient).await?;
        let writes_back = !service.written_back().is_empty();
        let ownership = match writes_back {
            true => match feed.follow(&token).await? {
                Some(feed) => Some(feed),
                None => return Ok(()), // shutdown while waiting
            },
            false => None,
        };
        let outbox = writes_back.then(|| Outbox::new(sink.database()));
        let repairs = writes_back.then(|| Repairs {
            transforms: service.clone(),
            topics: topics.clone(),
            source_name: config.source.name.clone(),
            monolith: MonolithSink::new(clients.source.clone(), &config.source.db, service.clone()),
            service: sink.clone(),
        });
        let consumer = ServiceConsumer {
            health,
            store: clients.store(),
            transforms: service,
            sink,
            kafka: config.kafka.clone(),
            settings: config.consume.clone(),
            ownership,
            outbox,
            repairs,
        };
        consumer.run(token).await.map_err(RoleError::from)
    }
}

/// The forward consumer of a service whose targets are Redis entries: the same consumer, its
/// sink the process's Redis connection. A Redis that would evict is refused here, before any
/// message is read (fatal, and `ficus run` exits 2); one not reachable yet is waited for.
async fn consume_redis(
    clients: Clients,
    config: Config,
    health: Health,
    token: CancellationToken,
    service: Arc<ServiceTransforms>,
) -> Result<(), RoleError> {
    let name = service.service().to_string();
    let redis = clients.redis.clone();
    let (ttl, pause) = (config.consume.tombstone_ttl, config.redis.pause_above);
    let layout = crate::sink::redis::plan::Layout::live(&name);
    let open = || async {
        let conn = redis.get().await?;
        RedisSink::open(conn, redis.describe(), service.clone(), layout.clone(), ttl, pause).await
    };
    let transient = |e: &SinkError| e.class() == crate::mongo::ErrorClass::Transient;
    let sink = crate::retry::with_backoff(&format!("consume:{name}"), &token, open, transient).await?;
    info!(service = %name, redis = %redis.describe(), "consuming into Redis");
    let consumer = ServiceConsumer {
        health,
        store: clients.store(),
        transforms: service,
        sink,
        kafka: config.kafka.clone(),
        settings: config.consume.clone(),
        ownership: None,
        outbox: None,
        repairs: None,
    };
    consumer.run(token).await.map_err(RoleError::from)
}

/// Reverse sync for one service: from the first time it owns keys, its write-back consumer
/// (`<service>.changes` → the monolith) runs for good, and its database's tail while it is
/// needed (see `tail::reverse`).
fn reverse(
    ctx: &Context,
    service: Arc<ServiceTransforms>,
    feed: Arc<Feed>,
) -> impl std::future::Future<Output = Result<(), RoleError>> + Send + 'static {
    let (clients, cfg, health, shutdown) =
        (ctx.clients.clone(), ctx.config.clone(), ctx.health.clone(), ctx.shutdown.clone());
    let topics = ctx.definitions.topics.clone();
    async move {
        let Some(feed) = feed.follow(&shutdown).await? else { return Ok(()) };
        let name = service.service().to_string();
        let mut changes = feed.subscribe();
        while feed.current().get(&name).is_none_or(|o| o.periods().is_empty()) {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = changes.changed() => {}
                _ = tokio::time::sleep(cfg.reverse.ownership_poll) => {}
            }
        }
        info!(service = %name, "reverse sync: the service has owned keys; writing its changes back to the monolith");
        let sink = MonolithSink::new(clients.source.clone(), &cfg.source.db, service.clone());
        let (collections, written_back) = (service.collections(), service.written_back());
        let ttl = cfg.consume.tombstone_ttl;
        let service_sink =
            MongoSink::open(clients.target.clone(), service.database(), &collections, &written_back, ttl).await?;
        let repairs = Repairs {
            transforms: service.clone(),
            topics,
            source_name: cfg.source.name.clone(),
            monolith: sink.clone(),
            service: service_sink,
        };
        let consumer = ServiceConsumer {
            transforms: service.clone(),
            health: health.clone(),
            store: clients.store(),
            outbox: Some(Outbox::new(sink.database())),
            sink,
            kafka: cfg.kafka.clone(),
            settings: cfg.consume.clone(),
            ownership: Some(feed.clone()),
            repairs: Some(repairs),
        };
        let tail = crate::tail::reverse::ReverseTailRole { cfg, clients, transforms: service, health, ownership: feed };
        let (consumed, tailed) = tokio::join!(consumer.run(shutdown.clone()), tail.run(shutdown.clone()));
        consumed?;
        tailed?;
        Ok(())
    }
}

/// The archive: every event (the monolith's, and the services' own changes) into the store.
fn archive(ctx: &Context) -> impl std::future::Future<Output = Result<(), RoleError>> + Send + 'static {
    let mut topics: Vec<String> = ctx.definitions.topics.defs.iter().map(|d| d.topic.clone()).collect();
    for s in ctx.definitions.services.iter().filter(|s| !s.written_back().is_empty()) {
        topics.push(crate::config::topics::changes_topic(s.service()));
    }
    let (db, health, token, kafka) =
        (ctx.clients.store(), ctx.health.clone(), ctx.shutdown.clone(), ctx.config.kafka.clone());
    let (batch_max, batch_wait) = (ctx.config.consume.batch_max, ctx.config.consume.batch_wait);
    async move {
        // The store may not be reachable yet: wait for it rather than exit.
        let store =
            crate::retry::with_backoff("archive", &token, || EventStore::open(&db), StoreError::is_transient).await?;
        let archiver = Archiver { health, store, db, kafka, topics, batch_max, batch_wait };
        archiver.run(token).await.map_err(RoleError::from)
    }
}
