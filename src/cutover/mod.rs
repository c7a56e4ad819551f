//! Cutover: a service takes over the writes of a growing share of its aggregates, and can give
//! them back, without losing a write.
//!
//! - [`route`]: the published routing function (a key's bucket);
//! - [`ownership`]: each service's share and epoch, over time, in ficus's store;
//! - [`plan`]: the safe cutover's state machine (steps, resume, abort), pure.

pub mod ownership;
pub mod plan;
pub mod route;
