//! The commands other than the daemon, as library calls: each takes the process's [`Clients`]
//! and the loaded definitions, reports progress through a callback, and returns a typed outcome;
//! the binary (`cli`) prints and maps outcomes to exit codes.
//!
//! - `analysis`: what a rollout measures, and `ficus analyze --once`;
//! - `cutover`: the cutover executor (preflight, fence, drain, verify of the moving buckets,
//!   flip, observe), the forced switch and the abort;
//! - `rebuild`: `replay` and `dlq replay`, through the one apply path;
//! - `rollout`: `cutover --plan`, safe moves with holds, analysis and automatic rollback.
//!
//! [`Clients`]: crate::clients::Clients

pub mod analysis;
pub mod cutover;
pub mod rebuild;
pub mod rollout;

use std::time::Duration;

use crate::cutover::plan::Phase;

/// What a command reports while it runs.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A line for the operator.
    Info(&'a str),
    /// A warning for the operator (what is risky, what did not go as asked).
    Warning(&'a str),
    /// A step of a move begins.
    Step(Phase),
    /// A step of a move is done, in `took`, with what it found.
    StepDone { phase: Phase, took: Duration, detail: &'a str },
}

/// Why a command other than the cutover stopped.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// What was asked cannot be done.
    #[error("{0}")]
    BadInput(String),
    #[error("MongoDB: {}", crate::mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
    #[error(transparent)]
    Ownership(#[from] crate::cutover::ownership::OwnershipError),
    #[error(transparent)]
    Consume(#[from] crate::consume::ConsumeError),
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Replay(#[from] crate::replay::ReplayError),
    #[error(transparent)]
    Cutover(#[from] cutover::CutoverError),
}
