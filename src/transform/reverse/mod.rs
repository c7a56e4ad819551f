//! The way back: service documents into the monolith's shape, derived from the forward
//! transforms, and the checks that the round trip holds.
//!
//! Kept apart from the forward half so that the forward (`compile`, `apply`) never depends on
//! the way back; only `compile` calls in, to plan each transform's reverse at load.
//!
//! - `invert`: at load, which target fields go back and how (the plan in `model`), checking
//!   the files' `[reverse]` entries.
//! - `lens`: one field's lens run both ways, and where the routing key is.
//! - `patch`: what a write-back says ([`Patch`]), its errors, and `$set`/`$unset` path rules.
//! - `put`: [`Reverse`], which turns a service document into a patch and rebases changes.
//! - `classify`: field by field, what goes back and how, as `ficus validate` prints it.
//! - `edits`: the edits of service documents the law check makes.
//! - `laws`: the law check ([`check_laws`], [`LensCheck`]); `report`, what it found ([`LensReport`]).

mod classify;
mod edits;
pub(super) mod invert;
mod laws;
mod lens;
mod patch;
mod put;
#[cfg(test)]
mod put_tests;
mod report;
#[cfg(test)]
mod tests;

pub use classify::{CollectionClass, FieldClass, Reversibility, render_classification};
pub use laws::{LensCheck, check_laws};
pub(super) use lens::route_field;
pub use patch::{Conflict, Disagreement, Patch, Rebased, ReverseError, set_path, unset_path};
pub use put::Reverse;
pub use report::{Law, LawFailure, LensReport, Tally};
