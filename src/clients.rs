//! The MongoDB clients of a process, connected once and passed down.
//!
//! A process talks to three deployments (the monolith, the service databases, ficus's own store),
//! often one and the same. Each role and command takes its clients from one [`Clients`] value made
//! at start-up, so a process holds one connection pool per deployment, whatever it runs: no role
//! opens its own, and nothing reconnects on a timer (`GET /cutover` used to, twice every 5 s).
//! Connecting is lazy (the driver's): a server that is down is found by the first operation, where
//! each role's retry loop takes over.

use mongodb::{Client, Database};

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
    source_db: String,
    store_db: String,
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
        Ok(Clients { source, target, store, source_db: cfg.source.db.clone(), store_db: cfg.store.db.clone() })
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
