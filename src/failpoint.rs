//! Fail points: named places where a test can make ficus die as if killed, to prove a step is
//! resumable from exactly there (a kill from outside cannot be timed to land between two
//! writes). `FICUS_FAILPOINTS=cutover.flip.pending,…` names the points armed in a process; an
//! armed point ends the process at once with exit code 137 (the code of a SIGKILL), after one
//! line on standard error. Unarmed, a point costs one look at a set read once.

use std::collections::HashSet;
use std::sync::OnceLock;

/// The fail points armed in this process.
fn armed() -> &'static HashSet<String> {
    static ARMED: OnceLock<HashSet<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("FICUS_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    })
}

/// Dies here if the point `name` is armed.
pub fn hit(name: &str) {
    if armed().contains(name) {
        eprintln!("fail point {name}: exiting as if killed");
        std::process::exit(137);
    }
}
