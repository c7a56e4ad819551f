//! Source → Kafka: the backlog inserted and caught up over (the bare tail, then ficus's), the
//! initial snapshot, the catch-up again with the other `kafka.ce_headers` setting, and the tail
//! while documents are being inserted.

use std::time::{Duration, Instant};

use bson::Timestamp;
use serde_json::json;

use crate::Plan;
use crate::bench::Bench;
use crate::ceilings::{bare_snapshot, bare_tail};
use crate::probe::{Cpu, cpu_delta};
use crate::report::{Figures, bound_seconds, limit, mb, rate};
use crate::workload::Set;

/// The backlog, inserted while nothing tails, after a tail checkpoint; returns the checkpoint's
/// time (every catch-up starts there).
pub async fn insert_backlog(b: &Bench, fig: &mut Figures, backlog: &Set) -> Timestamp {
    let t0 = b.cluster_time().await;
    b.checkpoint_at(t0).await;
    let cpu0 = b.procs.snapshot(None);
    let ins = backlog.insert(&b.source, 1000).await;
    let cpu1 = b.procs.snapshot(None);
    fig.phase(
        "insert backlog (insert_many of 1000)",
        backlog.events,
        ins,
        &cpu_delta(&cpu0, &cpu1),
        json!({ "docs": backlog.docs, "docs_per_sec": rate(backlog.docs, ins) }),
    );
    b.say(&format!("backlog inserted: {} docs in {:.1}s", backlog.docs, ins.as_secs_f64()));
    t0
}

/// The bare tail over the backlog from `t0`: three runs (one for a large backlog), the median is
/// the ceiling. Returns it in changes/s.
pub async fn bare_catch_up(b: &Bench, fig: &mut Figures, backlog: &Set, t0: Timestamp) -> f64 {
    let repeats = if backlog.docs < 50_000 { 3 } else { 1 };
    let mut runs = Vec::new();
    let cpu0 = b.procs.snapshot(None);
    for _ in 0..repeats {
        let limit = Duration::from_secs(120 + backlog.docs / 200);
        let run = tokio::time::timeout(limit, bare_tail(b.source.clone(), b.defaults.clone(), t0, backlog.docs)).await;
        runs.push(
            run.unwrap_or_else(|_| panic!("the bare tail did not see {} changes within {limit:?}", backlog.docs)),
        );
    }
    let cpu1 = b.procs.snapshot(None);
    runs.sort();
    let bare_catchup = runs[runs.len() / 2];
    // CPU of the three runs, scaled to one.
    let bare_cpu: Cpu =
        cpu_delta(&cpu0, &cpu1).into_iter().map(|(k, v)| (k, (v / 3.0 * 100.0).round() / 100.0)).collect();
    let bare_rate = rate(backlog.docs, bare_catchup);
    let runs_s: Vec<f64> = runs.iter().map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0).collect();
    fig.phase(
        "bare tail, catching up (median of the runs)",
        backlog.docs,
        bare_catchup,
        &bare_cpu,
        json!({ "unit": "changes", "runs_s": runs_s }),
    );
    b.say(&format!("bare tail catch-up: {bare_rate:.0} changes/s"));
    bare_rate
}

/// What the tail's catch-up found, for the goals and the while-inserting verdicts.
pub struct CatchUp {
    /// The bare tail's changes/s (the ceiling) and ficus's, and whether ficus made ≥ 0.8×.
    pub bare_rate: f64,
    pub changes: f64,
    pub met: bool,
    pub peak_rss_mb: Option<f64>,
    pub cpu: Cpu,
    /// What limited it (`limit`, `bound_seconds`).
    pub limit: String,
}

/// `ficus run --roles tail` from the checkpoint before the backlog, until every event is in
/// Kafka (a failure here fails the bench).
pub fn tail_catch_up(b: &Bench, fig: &mut Figures, plan: &Plan, bare_rate: f64) -> CatchUp {
    let backlog = &plan.backlog;
    let r = b
        .tail_over_backlog("tail-catchup", &["run", "--roles", "tail"], plan)
        .unwrap_or_else(|e| panic!("ficus tail catch-up failed: {e}"));
    let changes = r.changes_per_sec(backlog);
    let events = rate(r.steady_work, r.steady);
    let met = changes >= 0.8 * bare_rate;
    fig.add(
        "source → Kafka, catching up (changes/s)",
        Some(changes),
        "changes/s",
        Some(bare_rate),
        Some(("≥ 0.8× bare loop", met)),
        json!({ "events_per_sec": events, "startup_s": (r.total - r.steady).as_secs_f64(), "peak_rss_mb": mb(r.peak_rss_mb) }),
    );
    fig.phase(
        &format!("ficus tail, catching up (ce_headers {})", if b.ce_headers { "on" } else { "off" }),
        backlog.events,
        r.steady,
        &r.cpu,
        json!({ "cpu_incl_startup_s": r.cpu_total,  "changes": backlog.docs, "peak_rss_mb": mb(r.peak_rss_mb), "rss_curve": r.rss_curve }),
    );
    let rss = r.peak_rss_mb;
    fig.add(
        &format!("peak RSS, tail catching up over {} events (MB)", backlog.events),
        rss,
        "MB",
        None,
        Some(("≤ 150 MB at 1M events", rss.is_some_and(|m| m <= 150.0))),
        json!({ "rss_curve": r.rss_curve }),
    );
    b.say(&format!("ficus tail catch-up: {changes:.0} changes/s ({events:.0} events/s), peak RSS {rss:?} MB"));
    CatchUp {
        bare_rate,
        changes,
        met,
        peak_rss_mb: rss,
        limit: format!("{}; {}", limit(&r.cpu, r.steady, b.cores), bound_seconds(&r.timeline)),
        cpu: r.cpu,
    }
}

// ---------------------------------------------------------------------------------------------
// The snapshot, the other ce_headers setting, while inserting.

/// The initial snapshot (fresh: `--resnapshot`) over the backlog's documents, against the bare
/// scan → Kafka.
pub async fn snapshot(b: &Bench, fig: &mut Figures, plan: &Plan) {
    let backlog = &plan.backlog;
    let raw_base = b.raw_records.total();
    let cpu0 = b.procs.snapshot(None);
    let bare_snap = bare_snapshot(b.source.clone(), b.defaults.clone(), backlog.docs).await;
    let cpu1 = b.procs.snapshot(None);
    assert_eq!(b.raw_records.total() - raw_base, backlog.docs);
    let bare_snap_rate = rate(backlog.docs, bare_snap);
    fig.phase(
        "bare snapshot (scan → Kafka)",
        backlog.docs,
        bare_snap,
        &cpu_delta(&cpu0, &cpu1),
        json!({ "unit": "documents" }),
    );

    let r = match b.tail_over_backlog("snapshot", &["run", "--roles", "tail", "--resnapshot"], plan) {
        Ok(r) => r,
        Err(e) => {
            fig.verdicts.push(format!("snapshot: FAILED: {e}"));
            return;
        }
    };
    let snap_docs = r.changes_per_sec(backlog);
    fig.phase(
        "ficus initial snapshot",
        backlog.events,
        r.steady,
        &r.cpu,
        json!({ "docs": backlog.docs, "peak_rss_mb": mb(r.peak_rss_mb) }),
    );
    fig.add(
        "initial snapshot (docs/s)",
        Some(snap_docs),
        "docs/s",
        Some(bare_snap_rate),
        None,
        json!({ "events_per_sec": rate(r.steady_work, r.steady), "peak_rss_mb": mb(r.peak_rss_mb) }),
    );
    b.say(&format!("ficus snapshot: {snap_docs:.0} docs/s (bare {bare_snap_rate:.0})"));
}

/// The tail's catch-up again from `t0`, with the other `kafka.ce_headers` setting than every
/// other run's: CPU per event with headers on and off. Returns that run's CPU.
pub async fn headers(b: &Bench, fig: &mut Figures, plan: &Plan, t0: Timestamp, bare_rate: f64) -> Option<Cpu> {
    let backlog = &plan.backlog;
    b.checkpoint_at(t0).await;
    let (other, other_name) = if b.ce_headers { (&b.headers_off, "off") } else { (&b.headers_on, "on") };
    let other = other.display().to_string();
    let args = ["run", "--config", other.as_str(), "--roles", "tail"];
    let r = match b.tail_over_backlog(&format!("tail-headers-{other_name}"), &args, plan) {
        Ok(r) => r,
        Err(e) => {
            fig.verdicts.push(format!("headers: FAILED: {e}"));
            return None;
        }
    };
    let changes = r.changes_per_sec(backlog);
    fig.phase(
        &format!("ficus tail, catching up (ce_headers {other_name})"),
        backlog.events,
        r.steady,
        &r.cpu,
        json!({ "changes": backlog.docs, "peak_rss_mb": mb(r.peak_rss_mb) }),
    );
    fig.add(
        &format!("source → Kafka, catching up, ce_headers {other_name} (changes/s)"),
        Some(changes),
        "changes/s",
        Some(bare_rate),
        None,
        json!({ "events_per_sec": rate(r.steady_work, r.steady) }),
    );
    b.say(&format!("ficus tail catch-up with ce_headers {other_name}: {changes:.0} changes/s"));
    Some(r.cpu)
}

/// While inserting: a ficus tail already streaming while its set is inserted (`insert_many` of
/// 100), from the first insert to the last event in Kafka; then the bare loop over its own set,
/// inserted the same way. Also gives the source → Kafka verdicts, catching up and while
/// inserting.
pub async fn live(b: &Bench, fig: &mut Figures, plan: &Plan, catch_up: &CatchUp) {
    let (ficus_set, bare_set) = (plan.live_ficus, plan.live_bare);
    let spawned = Instant::now();
    let mut f = b.spawn("tail-live", &["run", "--roles", "tail"]);
    f.wait_log("streaming changes", Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = b.records.total();
    let insert_started = Instant::now();
    let source = b.source.clone();
    let inserter = tokio::spawn(async move { ficus_set.insert(&source, 100).await });
    let r = match b.measure(&mut f, spawned, ficus_set.events, plan.tail_timeout(), |_| b.records.total() - base) {
        Ok(r) => r,
        Err(e) => {
            f.stop();
            fig.verdicts.push(format!("live: FAILED: {e}"));
            return;
        }
    };
    let live_wall = insert_started.elapsed();
    let live_insert = inserter.await.unwrap();
    f.stop();
    let live_rate = rate(ficus_set.docs, live_wall);
    fig.phase(
        "ficus tail while inserting",
        ficus_set.events,
        live_wall,
        &r.cpu,
        json!({ "changes": ficus_set.docs, "insert_s": live_insert.as_secs_f64(), "peak_rss_mb": mb(r.peak_rss_mb) }),
    );

    let t = b.cluster_time().await;
    let cpu0 = b.procs.snapshot(None);
    let bare = tokio::spawn(bare_tail(b.source.clone(), b.defaults.clone(), t, bare_set.docs));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let insert_started = Instant::now();
    let bare_insert = bare_set.insert(&b.source, 100).await;
    bare.await.unwrap();
    let bare_live_wall = insert_started.elapsed();
    let cpu1 = b.procs.snapshot(None);
    let bare_live_rate = rate(bare_set.docs, bare_live_wall);
    fig.phase(
        "bare tail while inserting",
        bare_set.docs,
        bare_live_wall,
        &cpu_delta(&cpu0, &cpu1),
        json!({ "insert_s": bare_insert.as_secs_f64(), "note": "bench CPU includes the inserts" }),
    );
    let met_live = live_rate >= 0.8 * bare_live_rate;
    fig.add(
        "source → Kafka, while inserting (changes/s)",
        Some(live_rate),
        "changes/s",
        Some(bare_live_rate),
        Some(("≥ 0.8× bare loop", met_live)),
        json!({ "insert_only_changes_per_sec": rate(ficus_set.docs, live_insert), "events_per_sec": rate(ficus_set.events, live_wall) }),
    );
    b.say(&format!("while inserting: ficus {live_rate:.0} changes/s, bare {bare_live_rate:.0} changes/s"));
    if !catch_up.met {
        fig.verdicts.push(format!(
            "source → Kafka catching up missed ({:.2}×): {}",
            catch_up.changes / catch_up.bare_rate,
            catch_up.limit
        ));
    }
    if !met_live {
        fig.verdicts.push(format!(
            "source → Kafka while inserting missed ({:.2}×): {}",
            live_rate / bare_live_rate,
            limit(&r.cpu, live_wall, b.cores)
        ));
    }
}
