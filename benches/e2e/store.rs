//! The event store: the archive role filling it, `ficus replay` rebuilding from it, and
//! `ficus verify` against a bare scan.

use std::time::Instant;

use serde_json::json;

use crate::bench::Bench;
use crate::ceilings::bare_scan;
use crate::probe::Ficus;
use crate::report::{Figures, limit, mb, rate};
use crate::workload::Set;
use crate::{Plan, SERVICE};

/// `ficus run --roles archive` until the backlog's events are in the event store. False if it
/// failed (a verdict says why; replay is skipped).
pub fn archive(b: &Bench, fig: &mut Figures, plan: &Plan) -> bool {
    let backlog = &plan.backlog;
    let spawned = Instant::now();
    let mut f = b.spawn("archive", &["run", "--roles", "archive"]);
    let archived = |f: &Ficus| f.scrape().sum("ficus_events_archived_total", "") as u64;
    let r = match b.measure(&mut f, spawned, backlog.events, plan.consume_timeout(), archived) {
        Ok(r) => r,
        Err(e) => {
            f.stop();
            fig.verdicts.push(format!("replay: FAILED: {e}"));
            return false;
        }
    };
    f.stop();
    let archive_rate = rate(r.steady_work, r.steady);
    fig.phase("ficus archive", backlog.events, r.steady, &r.cpu, json!({ "peak_rss_mb": mb(r.peak_rss_mb) }));
    fig.add(
        "archive into the event store (events/s)",
        Some(archive_rate),
        "events/s",
        None,
        None,
        json!({ "peak_rss_mb": mb(r.peak_rss_mb) }),
    );
    b.say(&format!("ficus archive: {archive_rate:.0} events/s"));
    true
}

/// `ficus replay --service customers_db` (shadow build from the event store, swap), wall time,
/// against the bare bulk loop.
pub fn replay(b: &Bench, fig: &mut Figures, backlog: &Set, bulk_rate: f64) {
    let cpu0 = b.procs.snapshot(None);
    let done = b.run_to_end("replay", &["replay", "--service", SERVICE]);
    let cpu = b.cpu_with_ficus(&cpu0, &done);
    assert!(done.ok, "ficus replay failed:\n{}", done.log);
    let replay_rate = rate(backlog.events, done.elapsed);
    let replay_limit = limit(&cpu, done.elapsed, b.cores);
    let met = replay_rate >= 0.8 * bulk_rate;
    let peak = done.peak_rss_mb;
    fig.phase("ficus replay customers_db", backlog.events, done.elapsed, &cpu, json!({ "peak_rss_mb": mb(peak) }));
    fig.add(
        "replay customers_db (events/s)",
        Some(replay_rate),
        "events/s",
        Some(bulk_rate),
        Some(("≥ 0.8× bare bulk loop", met)),
        json!({ "ficus_says": done.log.lines().rev().find(|l| l.contains("events/s")).unwrap_or("").trim(), "peak_rss_mb": mb(peak) }),
    );
    if !met {
        fig.verdicts.push(format!("replay missed ({:.2}×): {replay_limit}", replay_rate / bulk_rate));
    }
    b.say(&format!("ficus replay: {replay_rate:.0} events/s"));
}

/// `ficus verify --service customers_db`, wall time in source documents per second (and whether
/// it says consistent), against a bare scan of source and target.
pub async fn verify(b: &Bench, fig: &mut Figures, backlog: &Set) {
    let collections: Vec<String> = b.service().collections().into_iter().collect();
    let (scan_time, scanned) = bare_scan(&b.source, &b.target_client.database(SERVICE), &collections).await;
    let scan_rate = rate(scanned, scan_time);
    let cpu0 = b.procs.snapshot(None);
    let done = b.run_to_end("verify", &["verify", "--service", SERVICE]);
    let cpu = b.cpu_with_ficus(&cpu0, &done);
    let (ok, peak) = (done.ok, done.peak_rss_mb);
    let verify_rate = rate(backlog.docs, done.elapsed);
    fig.phase(
        "ficus verify customers_db",
        backlog.docs,
        done.elapsed,
        &cpu,
        json!({ "unit": "source documents", "peak_rss_mb": mb(peak), "exit_ok": ok }),
    );
    fig.add(
        "verify customers_db (source docs/s)",
        Some(verify_rate),
        "docs/s",
        Some(scan_rate),
        None,
        json!({ "consistent": ok, "ceiling_is": "bare scan of source and target", "peak_rss_mb": mb(peak) }),
    );
    if !ok {
        fig.notes.push(format!("verify reported drift after consume + replay:\n{}", done.log));
    }
    b.say(&format!("ficus verify: {verify_rate:.0} docs/s (exit ok: {ok})"));
}
