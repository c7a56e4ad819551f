//! Cutover: a service takes over the writes of a growing share of its aggregates, and can give
//! them back, without losing a write.
//!
//! - [`route`]: the published routing function (a key's bucket);
//! - [`ownership`]: each service's share and epoch, over time, in ficus's store;
//! - [`plan`]: the safe cutover's state machine (steps, resume, abort), pure;
//! - [`moves`]: each service's latest move and what its steps recorded, in ficus's store;
//! - [`report`]: what applications read (`GET /cutover`): share, fence, `canFlip`,
//!   `canRollback`, pure.

pub mod moves;
pub mod ownership;
pub mod plan;
pub mod report;
pub mod route;
