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
//! adapters (`source`, `bus`, the sinks, the stores) do only I/O. Modules in flow order; each
//! imports only the ones listed before it, the commands at the end import what they drive:
//!
//! - [`config`]: the configuration file, defaults and `FICUS_*` environment, and the topic
//!   definitions (`topics/`), loaded once and validated together, every problem reported.
//! - [`event`]: the canonical event (CloudEvents 1.0), ficus's control messages, versions, the
//!   pure mapping from a source change to events, and an update's description applied to the
//!   document before it.
//! - `markers`: the `_ficus_applied` marker protocol: the documents ficus writes to tell its
//!   own writes apart (a batch's opening and closing markers, a move's fence, a release), and
//!   what a tail reads back from them.
//! - [`cutover`]: who writes each aggregate: the published routing function and each
//!   service's share over time.
//! - `source`: where changes come from: the `Source` contract and its MongoDB adapter.
//! - [`tail`]: the tail role: snapshot then stream, checkpoint only after Kafka acknowledges;
//!   its lease and checkpoints.
//! - [`bus`]: Kafka, and everything rdkafka-specific: client configuration, publisher, group
//!   consumer, reader, dead letters, topic admin.
//! - [`transform`]: declarative transforms, compiled at start-up, applied purely; their
//!   derived reverses and the lens laws.
//! - `pre_images`: the change-stream pre-images reverse sync needs on both sides: where,
//!   turning them on, and finding where they are off.
//! - [`sink`]: version-guarded, idempotent writes into a service database.
//! - [`consume`]: the consume role and the one apply path (live, replay, dead-letter re-drive).
//! - `store`: the event store and the archive role.
//! - `replay`, `verify`, `lens`, [`status`]: the commands that rebuild, prove, check and
//!   report.
//! - `ops`: probes, metrics, role health, and the registry of consumer-group members.
//! - [`mongo`], `retry`, `failpoint`: shared MongoDB plumbing (connections, error classes),
//!   backoff, and the fail points tests arm to kill a step at an exact place.
//! - [`clients`]: the MongoDB clients of a process, connected once and passed down.
//! - [`daemon`]: `ficus run` as a library call: the roles built and supervised until a shutdown
//!   future completes, and what `GET /cutover` serves.
//! - [`commands`]: the commands as library calls (the cutover executor), typed outcomes and
//!   progress reported through a callback.
//! - [`cli`]: the binary's edge: arguments, signals, printing, exit codes.
//! - `testkit` (feature `testkit`): test data and in-memory implementations of the traits.

pub mod bus;
pub mod cli;
pub mod clients;
pub mod commands;
pub mod config;
pub mod consume;
pub mod cutover;
pub mod daemon;
pub mod event;
mod failpoint;
mod lens;
mod markers;
pub mod mongo;
mod ops;
mod pre_images;
mod replay;
mod retry;
pub mod sink;
mod source;
pub mod status;
mod store;
pub mod tail;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod transform;
mod verify;
