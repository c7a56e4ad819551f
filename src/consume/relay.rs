//! Relays a database's conflicts outbox (see `sink::conflicts`) to `<service>.conflicts`: each
//! report is sent, awaited until Kafka has it, counted in `ficus_conflicts_total{service,side}`,
//! and only then removed from the outbox.

use bson::Bson;

use super::ConsumeError;
use crate::bus::ConflictReports;
use crate::sink::conflicts::Outbox;

/// Relays everything pending for `service`; returns how many reports went out.
pub async fn relay_conflicts(outbox: &Outbox, reports: &ConflictReports, service: &str) -> Result<u64, ConsumeError> {
    let mut sent = 0;
    loop {
        let pending = outbox.pending(service, 100).await?;
        let full = pending.len() == 100;
        let mut done = Vec::with_capacity(pending.len());
        for d in pending {
            let id = d.get("_id").cloned().unwrap_or(Bson::Null);
            let key = d.get_str("_id").unwrap_or_default().to_string();
            let side = d.get_str("side").unwrap_or("?").to_string();
            let json = Bson::Document(d).into_relaxed_extjson();
            reports.send(&key, &json).await?;
            metrics::counter!("ficus_conflicts_total", "service" => service.to_string(), "side" => side.clone())
                .increment(1);
            tracing::warn!(service, side, conflict = %key, "conflict recorded; the owner's value stands");
            done.push(id);
            sent += 1;
        }
        outbox.remove(done).await?;
        if !full {
            return Ok(sent);
        }
    }
}
