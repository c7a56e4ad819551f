//! Why an event cannot be transformed: the one error of the forward half, kept apart so the
//! modules that raise it (`apply`, and `reverse` running the forward) need not import the
//! transform's top-level module for it.

use std::path::PathBuf;

/// An event a transform cannot apply. Permanent: the same event always fails the same way, so
/// the consumer dead-letters it; the message names the file, the transform, the target field
/// and the operand, e.g. ``segmentation.lifetimeValue: `ltv`: cannot cast "abc" to decimal``.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} ({transform}): {field}: {reason}", file.display())]
pub struct TransformError {
    pub file: PathBuf,
    pub transform: String,
    /// The target field (or `when`, `rollup.group`, `(event)`).
    pub field: String,
    pub reason: String,
}
