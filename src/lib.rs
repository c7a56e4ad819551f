//! ficus keeps per-service databases in step with a MongoDB monolith, through Kafka.
//!
//! ```text
//!  monolith (MongoDB)                                     service databases (MongoDB)
//!   │ change stream / snapshot                                      ▲
//!   ▼                                                               │ version-guarded upserts
//!  source ──► mapping ──► event ──► bus (Kafka) ──► consumer ──► transform ──► sink
//!   (tail role; checkpoint after ack)                (consume role; offsets after the write)
//! ```
//!
//! Data flows one way. The pure cores, `mapping` (change → canonical events) and `transform`
//! (canonical event → writes), do no I/O; adapters (`source`, `bus`, `checkpoint`) do only I/O.
//!
//! - [`config`]: the TOML file, defaults and `FICUS_*` environment, validated once.
//! - [`definitions`]: collected errors with file and field, shared by every loader.
//! - [`topics`]: `topics/*.toml`, one definition per monolith collection.
//! - [`event`]: the canonical event (CloudEvents 1.0 envelope) and its ordering position.
//! - [`mapping`]: pure change → canonical events, including derived semantic events.
//! - [`source`]: MongoDB change stream and snapshot reader.
//! - [`bus`]: Kafka client configuration (one place), the publisher, topic provisioning.
//! - [`checkpoint`]: durable tail state (snapshot progress, resume token).
//! - [`tail`]: the tail role, snapshot then stream, checkpoint only after Kafka acknowledges.
//! - [`transform`]: declarative transforms, compiled at start-up, applied purely.
//! - [`sink`]: version-guarded, idempotent writes into a service database.
//! - [`consume`]: the consume role, one consumer group per service, offsets after the write,
//!   dead letters for what cannot be applied.
//! - [`store`]: the event store and the archive role (group `ficus.archive`), for replay.
//! - [`replay`]: rebuilds a service database from the store plus the live tail, through the
//!   same transform-and-write path, in a shadow database swapped in when caught up.
//! - [`verify`]: proves a service database equals the transforms applied to the source.
//! - [`lens`]: `ficus lens check`, the lens laws of the derived reverses on the monolith's documents.

//! - [`lease`]: one active tailer per source, fenced checkpoints.
//! - [`ops`]: `/metrics`, `/healthz`, `/readyz` and the roles' health registry.
//! - [`presence`]: which live process holds which consumer-group slot (static membership).
//! - [`status`]: `ficus status`, every stage's position, lag and health, read from outside.
//! - [`mongo`], [`retry`]: shared connection, error classification and backoff.
//! - [`workload`]: reference documents in the monolith's shapes, for the demo, tests and benches.
//! - [`cli`]: the binary's edge.

pub mod bus;
pub mod cli;
pub mod config;
pub mod consume;
pub mod event;
pub mod lens;
pub mod mongo;
pub mod ops;
pub mod replay;
pub mod retry;
pub mod sink;
pub mod source;
pub mod status;
pub mod store;
pub mod tail;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod transform;
pub mod verify;
