//! ficus keeps per-service databases in step with a MongoDB monolith, through Kafka.
//!
//! ```text
//!  monolith (MongoDB)                                              service databases (MongoDB)
//!   │ change stream / snapshot                                               ▲
//!   ▼                                                                        │ version-guarded writes
//!  source ──► tail ──► event ──► bus (Kafka) ──► consume ──► transform ──► sink
//!            (checkpoint after ack)                (offsets after the write)
//!                              │
//!                              └──► store (archive) ──► replay, verify
//! ```
//!
//! Data flows one way. The pure cores (`event::mapping`: a change → canonical events;
//! `transform`: an event → writes, and their reverses; `sink::plan`; `tail::ack`) do no I/O;
//! adapters (`source`, `bus`, the sinks, the stores) do only I/O. Modules in dependency order:
//! each imports only the ones listed before it (`tests/architecture.rs` checks it), so the
//! foundations come first, then the flow, and the commands at the end import what they drive:
//!
//! - `op`: the kind of change a source reports, below both the topic definitions and the event.
//! - [`config`]: the configuration file, defaults and `FICUS_*` environment, and the topic
//!   definitions (`topics/`), loaded once and validated together, every problem reported.
//! - [`event`]: the canonical event (CloudEvents 1.0), ficus's control messages, versions, the
//!   pure mapping from a source change to events, and an update's description applied to the
//!   document before it.
//! - [`mongo`], `retry`, `failpoint`: shared MongoDB plumbing (connections, error classes),
//!   backoff, and the fail points tests arm to kill a step at an exact place.
//! - [`clients`]: the MongoDB clients of a process, connected once and passed down.
//! - `markers`: the `_ficus_applied` marker protocol: the documents ficus writes to tell its
//!   own writes apart (a batch's opening and closing markers, a move's fence, a release), and
//!   what a tail reads back from them.
//! - [`cutover`]: who writes each aggregate: the published routing function and each
//!   service's share over time.
//! - `source`: where changes come from: the `Source` contract and its MongoDB adapter.
//! - [`bus`]: Kafka, and everything rdkafka-specific: client configuration, publisher, group
//!   consumer, reader, dead letters, topic admin.
//! - `ops`: probes, metrics, role health, and the registry of consumer-group members.
//! - [`transform`]: declarative transforms, compiled at start-up, applied purely; their
//!   derived reverses and the lens laws.
//! - [`tail`]: the tail role: snapshot then stream, checkpoint only after Kafka acknowledges;
//!   its lease and checkpoints.
//! - `pre_images`: the change-stream pre-images reverse sync needs on both sides: where,
//!   turning them on, and finding where they are off.
//! - [`sink`]: version-guarded, idempotent writes into a service database.
//! - [`consume`]: the consume role and the one apply path (live, replay, dead-letter re-drive).
//! - `store`: the event store and the archive role.
//! - `replay`, `verify`, `lens`, [`status`]: the commands that rebuild, prove, check and
//!   report.
//! - [`daemon`]: `ficus run` as a library call: the roles built and supervised until a shutdown
//!   future completes, and what `GET /cutover` serves.
//! - [`commands`]: the commands as library calls (the cutover executor), typed outcomes and
//!   progress reported through a callback.
//! - [`cli`]: the binary's edge: arguments, signals, printing, exit codes.
//! - `testkit` (feature `testkit`): test data and in-memory implementations of the traits; it
//!   may import anything.

mod op;
pub mod config;
pub mod event;
mod retry;
pub mod mongo;
mod failpoint;
pub mod clients;
mod markers;
pub mod cutover;
mod source;
pub mod bus;
mod ops;
pub mod transform;
pub mod tail;
mod pre_images;
pub mod sink;
pub mod consume;
mod store;
mod replay;
mod verify;
mod lens;
pub mod status;
pub mod daemon;
pub mod commands;
pub mod cli;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
