//! Cutover: a service takes over the writes of a growing share of its aggregates, and can give
//! them back, without losing a write.
//!
//! - [`route`]: the published routing function (a key's bucket);
//! - [`ownership`]: each service's share and epoch, over time, in ficus's store, and
//!   [`feed`]: following them in a running process;
//! - [`views`]: who has seen which epoch (applications and ficus's processes), and when a
//!   fence or a forced switch holds;
//! - [`rules`]: how a change is applied given ownership: as the owner's write, or merged
//!   (a non-owner's, a late one, a fence violation), pure;
//! - [`plan`]: the safe cutover's state machine (steps, resume, abort), pure;
//! - [`rollout`]: a progressive rollout's plan of shares with holds, and the analysis that
//!   passes, holds, stops or rolls it back, pure;
//! - [`moves`]: each service's latest move and what its steps recorded, in ficus's store;
//! - [`plans`]: the progressive rollouts under way and their analysis baselines, in ficus's store;
//! - [`log`]: the migration log, what was done to each service's ownership, in order;
//! - [`report`]: what applications read (`GET /cutover`): share, fence, `canFlip`,
//!   `canRollback`, pure.

pub mod feed;
pub mod log;
pub mod moves;
pub mod ownership;
pub mod plans;
pub mod plan;
pub mod report;
pub mod rollout;
pub mod route;
pub mod rules;
pub mod views;

pub use ownership::Side;
