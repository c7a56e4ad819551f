//! The kind of change a source reports (snapshot copy, insert, update, replace, delete).
//!
//! It sits below both the topic definitions (`config::topics`), which name an event type for
//! each kind, and the canonical event (`event`), which carries one, so neither imports the
//! other's module for it. `event` re-exports it as `event::Op`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What happened to the source document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Copied by the initial snapshot.
    Snapshot,
    Insert,
    Update,
    Replace,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Snapshot => "snapshot",
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Replace => "replace",
            Op::Delete => "delete",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
