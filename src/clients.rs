//! The MongoDB clients of a process, and its Redis connection, connected once and passed down.
//!
//! A process talks to three deployments (the monolith, the service databases, ficus's own store),
//! often one and the same. Each role and command takes its clients from one [`Clients`] value made
//! at start-up, so a process holds one connection pool per deployment, whatever it runs: no role
//! opens its own, and nothing reconnects on a timer (`GET /cutover` used to, twice every 5 s).
//! Connecting is lazy (the driver's): a server that is down is found by the first operation, where
//! each role's retry loop takes over. Redis (for services whose targets live there, see
//! `sink::redis`) is one multiplexed connection per process, made on first use and remade by
//! the client library whenever it drops.

use std::sync::Arc;

use mongodb::{Client, Database};
use tokio::sync::OnceCell;

use crate::config::Config;

/// The monolith's, the services' and the store's clients, with the databases ficus uses in them.
#[derive(Clone, Debug)]
pub struct Clients {
    /// The monolith's deployment.
    pub source: Client,
    /// The service databases' deployment.
    pub target: Client,
    /// ficus's own store (checkpoints, leases, ownership, the event store).
    pub store: Client,
    /// Redis (`[redis] uri`), connected on first use: only services with `[redis]` targets use it.
    pub redis: RedisConnection,
    source_db: String,
    store_db: String,
}

/// The process's one Redis connection, opened on first use (a server that is down is found by
/// the first command, where the role's retry loop takes over, as with MongoDB).
#[derive(Clone)]
pub struct RedisConnection {
    uri: String,
    manager: Arc<OnceCell<redis::aio::ConnectionManager>>,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisConnection({})", crate::config::redact_uri(&self.uri))
    }
}

impl RedisConnection {
    pub fn new(uri: &str) -> Self {
        RedisConnection { uri: uri.to_string(), manager: Arc::new(OnceCell::new()) }
    }

    /// The URI, password redacted, for messages.
    pub fn describe(&self) -> String {
        crate::config::redact_uri(&self.uri)
    }

    /// The connection (a cheap handle onto the one multiplexed connection). Commands time out
    /// after 10 s and connecting after 5 s; a dropped connection is made again by the library.
    pub async fn get(&self) -> redis::RedisResult<redis::aio::ConnectionManager> {
        let open = || async {
            let client = redis::Client::open(self.uri.as_str())?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
                .set_response_timeout(Some(std::time::Duration::from_secs(10)))
                .set_number_of_retries(2);
            redis::aio::ConnectionManager::new_lazy_with_config(client, config)
        };
        self.manager.get_or_try_init(open).await.cloned()
    }
}

impl Clients {
    /// Connects to each deployment the configuration names; deployments named by the same URI
    /// share one client (one pool).
    pub async fn connect(cfg: &Config, app: &str) -> Result<Self, mongodb::error::Error> {
        let source = crate::mongo::connect(&cfg.source.uri, app).await?;
        let target = match cfg.target_uri == cfg.source.uri {
            true => source.clone(),
            false => crate::mongo::connect(&cfg.target_uri, app).await?,
        };
        let store = if cfg.store.uri == cfg.source.uri {
            source.clone()
        } else if cfg.store.uri == cfg.target_uri {
            target.clone()
        } else {
            crate::mongo::connect(&cfg.store.uri, app).await?
        };
        let redis = RedisConnection::new(&cfg.redis.uri);
        Ok(Clients { source, target, store, redis, source_db: cfg.source.db.clone(), store_db: cfg.store.db.clone() })
    }

    /// The monolith's database.
    pub fn monolith(&self) -> Database {
        self.source.database(&self.source_db)
    }

    /// ficus's store database.
    pub fn store(&self) -> Database {
        self.store.database(&self.store_db)
    }

    /// A service's database.
    pub fn service(&self, database: &str) -> Database {
        self.target.database(database)
    }
}
