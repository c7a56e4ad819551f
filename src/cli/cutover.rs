//! `ficus cutover`: moves a service's share of ownership.
//!
//! `--force` sets it at once: the plan's emergency switch (and rollback, `--to 0`). No fencing,
//! no draining, no verification: a write in flight at the moment of the switch may land on the
//! side that no longer owns its key. Such a write is not lost: reverse sync hands on whatever
//! the service wrote while it owned a key, and a write on the non-owner's side is merged field
//! by field, conflicts reported on `<service>.conflicts`. A running `ficus run` follows the
//! change within `reverse.ownership_poll_ms`.

use std::process::ExitCode;

use super::{BadInput, Loaded, select_services};
use crate::cutover::ownership::{OwnershipSource, OwnershipStore};

/// `ficus cutover --service NAME --to PERCENT --force`.
pub(super) async fn cutover(loaded: &Loaded, service: &str, to: u8, force: bool) -> anyhow::Result<ExitCode> {
    let chosen = select_services(&loaded.services, &[service.to_string()])?;
    let problems = chosen[0].cutover_problems();
    if !problems.is_empty() {
        return Err(anyhow::Error::new(BadInput(format!(
            "{service} cannot take over writes:\n  {}",
            problems.join("\n  ")
        ))));
    }
    if !force {
        return Err(anyhow::Error::new(BadInput(
            "only `--force` (switch at once, without fencing, draining or verification) is available".into(),
        )));
    }
    let cfg = &loaded.config;
    let store = crate::mongo::connect(&cfg.store.uri, "cutover").await?.database(&cfg.store.db);
    let monolith = crate::mongo::connect(&cfg.source.uri, "cutover").await?.database(&cfg.source.db);
    let services = crate::mongo::connect(&cfg.target_uri, "cutover").await?.database("admin");
    let source = OwnershipSource { store: OwnershipStore::new(&store), monolith, services };
    let was = source.store.get(service).await?;
    let from = was.as_ref().map_or(0, |o| o.percent);
    eprintln!(
        "WARNING: --force moves ownership of {service} from {from}% to {to}% at once: no fencing, no draining, no \
         verification. Writes in flight now may land on the side that no longer owns their keys; they are merged, \
         and where both sides changed a field the owner's value stands and both go to {service}.conflicts."
    );
    let o = source.set(service, to, true).await?;
    let step = o.history.last().expect("a step was just recorded");
    println!(
        "{service}: {to}% (epoch {}), in force from monolith time {}.{} and service time {}.{}",
        o.epoch, step.at_monolith.time, step.at_monolith.increment, step.at_service.time, step.at_service.increment
    );
    Ok(ExitCode::SUCCESS)
}
