//! Relays a database's conflicts outbox (see `sink::conflicts`) to `<service>.conflicts`: each
//! report's losing side is repaired first ([`Repairs`]), then the report (saying what the repair
//! did) is sent, awaited until Kafka has it, counted in `ficus_conflicts_total{service,side}`
//! (and fence violations in `ficus_fence_violations_total{service}`), and only then removed
//! from the outbox. A crash in between repeats a repair (idempotent) and a report (same key).

use bson::Bson;

use super::ConsumeError;
use super::repair::Repairs;
use crate::bus::ConflictReports;
use crate::sink::conflicts::Outbox;

/// Relays everything pending for `service`; returns how many reports went out.
pub async fn relay_conflicts(
    outbox: &Outbox,
    reports: &ConflictReports,
    service: &str,
    repairs: Option<&Repairs>,
) -> Result<u64, ConsumeError> {
    let mut sent = 0;
    loop {
        let pending = outbox.pending(service, 100).await?;
        let full = pending.len() == 100;
        let mut done = Vec::with_capacity(pending.len());
        for mut d in pending {
            let id = d.get("_id").cloned().unwrap_or(Bson::Null);
            let key = d.get_str("_id").unwrap_or_default().to_string();
            let side = d.get_str("side").unwrap_or("?").to_string();
            if let Some(repairs) = repairs
                && let Some(what) = repairs.repair(&d).await?
            {
                d.insert("repaired", what);
            }
            let violation = d.get_bool("fenceViolation").unwrap_or(false);
            let document = d.get("id").cloned().unwrap_or(Bson::Null);
            let json = Bson::Document(d).into_relaxed_extjson();
            reports.send(&key, &json).await?;
            metrics::counter!("ficus_conflicts_total", "service" => service.to_string(), "side" => side.clone())
                .increment(1);
            if violation {
                metrics::counter!("ficus_fence_violations_total", "service" => service.to_string()).increment(1);
                tracing::warn!(service, side, key = %document, conflict = %key, "fence violation: a write to a fenced key on the losing side after the drain point; merged");
            } else {
                tracing::warn!(service, side, conflict = %key, "conflict recorded; the owner's value stands on both sides");
            }
            done.push(id);
            sent += 1;
        }
        outbox.remove(done).await?;
        if !full {
            return Ok(sent);
        }
    }
}
