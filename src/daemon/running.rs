//! What is still running, by name: the roles a daemon started that have not ended, for the
//! messages of a stop that does not finish (the supervisor's own, and the signal listener's when
//! it gives up waiting).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// The names of what is running now.
#[derive(Clone, Debug, Default)]
pub struct Running(Arc<Mutex<BTreeSet<String>>>);

/// Removes its name from [`Running`] when dropped (the task ended, or was aborted).
pub struct Entered(Running, String);

impl Running {
    /// Records `name` as running until the returned guard is dropped.
    pub fn enter(&self, name: &str) -> Entered {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
        Entered(self.clone(), name.to_string())
    }

    /// The names still running, comma-separated (`nothing` when none is).
    pub fn describe(&self) -> String {
        let names = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if names.is_empty() { "nothing".into() } else { names.iter().cloned().collect::<Vec<_>>().join(", ") }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.0.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_leaves_when_its_guard_drops() {
        let running = Running::default();
        let tail = running.enter("tail");
        let consume = running.enter("consume:customers_db");
        assert_eq!(running.describe(), "consume:customers_db, tail");
        drop(tail);
        assert_eq!(running.describe(), "consume:customers_db");
        drop(consume);
        assert_eq!(running.describe(), "nothing");
    }
}
