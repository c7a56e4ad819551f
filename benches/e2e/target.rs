//! Kafka → target: ficus's consumers over the backlog's events against the bare bulk loops,
//! reverse sync against forward sync of the same change, and the cutover's fence window.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bson::{Document, doc};
use serde_json::json;

use crate::bench::Bench;
use crate::ceilings::{Shape, bare_bulk};
use crate::probe::{self, Cpu, Ficus, Metrics, cpu_delta};
use crate::report::{Figures, bound_seconds, limit, mb, rate};
use crate::workload::Set;
use crate::{COLLECTION, Plan, SERVICE, TOPIC, support};

/// What the consume phase found, for replay and the goals.
pub struct Consumed {
    pub peak_rss_mb: Option<f64>,
    pub cpu: Cpu,
    /// The plain bare bulk loop's upserts/s: the ceiling of consume and replay.
    pub bulk_rate: f64,
    /// ficus's forward consume rate (events/s): the ceiling the reverse direction is held to.
    pub rate: f64,
}

/// `ficus run --roles consume --service customers_db` over the backlog's events, then the bare
/// bulk passes (the ceiling and the guard diagnostics). `None` if ficus failed (a verdict says
/// why).
pub async fn consume(b: &Bench, fig: &mut Figures, plan: &Plan) -> Option<Consumed> {
    let backlog = &plan.backlog;
    let spawned = Instant::now();
    let mut f = b.spawn("consume", &["run", "--roles", "consume", "--service", SERVICE]);
    let r = match b.measure(&mut f, spawned, backlog.events, plan.consume_timeout(), Ficus::applied) {
        Ok(r) => r,
        Err(e) => {
            f.stop();
            fig.verdicts.push(format!("consume: FAILED: {e}"));
            return None;
        }
    };
    let stats = probe::consume_stats(&Metrics::default(), &f.scrape(), r.steady);
    f.stop();
    let consume_rate = rate(r.steady_work, r.steady);
    let rss = r.peak_rss_mb;
    let consume_limit = format!("{}; {}", limit(&r.cpu, r.steady, b.cores), bound_seconds(&r.timeline));
    fig.phase(
        "ficus consume customers_db",
        backlog.events,
        r.steady,
        &r.cpu,
        json!({ "peak_rss_mb": mb(rss), "rss_curve": r.rss_curve, "consumer": stats, "timeline": r.timeline }),
    );
    b.say(&format!("ficus consume: {consume_rate:.0} events/s, peak RSS {rss:?} MB, {stats}"));

    let bulk = bare_bulks(b, fig, plan).await;
    let bulk_rate = bulk["Plain"].rate;
    for (shape, what) in
        [("GuardOr", "with the sink's `$or` version guard"), ("GuardNot", "with the guard as `$not: {$gte}`")]
    {
        fig.add(
            &format!("diagnostic: bare bulk upsert {what} (upserts/s, {} events)", bulk[shape].upserts),
            Some(bulk[shape].rate),
            "upserts/s",
            Some(bulk_rate),
            None,
            json!({ "target_cpu_us_per_upsert": bulk[shape].target_us, "plain_target_cpu_us_per_upsert": bulk["Plain"].target_us }),
        );
    }
    // The echo-tagging transaction (customers_db writes back, so every one of its forward
    // batches is a marked transaction): its cost, the guarded bulk loop with and without it.
    let (marked, unmarked) = (&bulk["GuardNotMarked"], &bulk["GuardNot"]);
    let marker_cost = 1.0 - marked.rate / unmarked.rate;
    let marker_met = marker_cost <= 0.10;
    fig.add(
        "bare guarded bulk upsert, each batch a marked transaction (upserts/s)",
        Some(marked.rate),
        "upserts/s",
        Some(unmarked.rate),
        Some(("costs ≤ 10% of the unmarked guarded loop", marker_met)),
        json!({ "cost": marker_cost, "target_cpu_us_per_upsert": marked.target_us, "unmarked_target_cpu_us_per_upsert": unmarked.target_us }),
    );
    if !marker_met {
        fig.verdicts
            .push(format!("the echo-tagging transaction costs {:.0}% of the guarded bulk loop", marker_cost * 100.0));
    }
    let met = consume_rate >= 0.8 * bulk_rate;
    fig.add(
        "Kafka → target, customers_db (events/s)",
        Some(consume_rate),
        "events/s",
        Some(bulk_rate),
        Some(("≥ 0.8× bare bulk loop", met)),
        json!({ "startup_s": (r.total - r.steady).as_secs_f64(), "peak_rss_mb": mb(rss) }),
    );
    if !met {
        fig.verdicts.push(format!("Kafka → target missed ({:.2}×): {consume_limit}", consume_rate / bulk_rate));
    }
    fig.add(
        &format!("peak RSS, consume over {} events (MB)", backlog.events),
        rss,
        "MB",
        None,
        Some(("≤ 150 MB at 1M events", rss.is_some_and(|m| m <= 150.0))),
        json!({}),
    );
    Some(Consumed { peak_rss_mb: rss, cpu: r.cpu, bulk_rate, rate: consume_rate })
}

/// Reverse sync over the consumed documents, against forward sync of the same change:
/// first every monolith customer changed (one `updateMany` of one field), tailed onto Kafka and
/// consumed by customers_db (`ficus run --roles consume`, timed like the consume phase); then
/// `ficus cutover --to 100 --force`, every customers_db customer changed by the service (one
/// `updateMany` of the field that one maps to), and `ficus run --roles reverse` (the reverse
/// tail and the write-back consumer) until each change is a patch of its monolith document.
/// Held to ≥ 0.8× the forward rate over those same documents and the same kind of change (the
/// backlog's consume rate is per event, most of them small derived events: shown beside it).
pub async fn reverse(b: &Bench, fig: &mut Figures, plan: &Plan, backlog_rate: f64) {
    // The reverse topics exist already; this turns on pre-images in the bench's target server.
    let topics = b.run_to_end("topics", &["topics", "apply"]);
    if !topics.ok {
        fig.verdicts.push(format!("reverse: FAILED: ficus topics apply: {}", topics.log.lines().last().unwrap_or("")));
        return;
    }
    let forward_rate = match forward_updates(b, fig, plan).await {
        Ok(r) => r,
        Err(e) => {
            fig.verdicts.push(format!("reverse: FAILED: the forward run over the same documents: {e}"));
            return;
        }
    };
    let to = b.run_to_end("cutover", &["cutover", "--service", SERVICE, "--to", "100", "--force"]);
    if !to.ok {
        fig.verdicts.push(format!("reverse: FAILED: ficus cutover: {}", to.log.lines().last().unwrap_or("")));
        return;
    }
    let spawned = Instant::now();
    let mut f = b.spawn("reverse", &["run", "--roles", "reverse", "--service", SERVICE]);
    let customers = b.target_client.database(SERVICE).collection::<Document>("customers");
    let changed = customers
        .update_many(doc! {}, doc! { "$set": { "displayName": "changed by the service" } })
        .await
        .expect("service-side update")
        .modified_count;
    let r = match b.measure(&mut f, spawned, changed, plan.consume_timeout(), Ficus::applied) {
        Ok(r) => r,
        Err(e) => {
            f.stop();
            fig.verdicts.push(format!("reverse: FAILED: {e}"));
            return;
        }
    };
    f.stop();
    let reverse_rate = rate(r.steady_work, r.steady);
    let written =
        b.source.collection::<Document>(COLLECTION).count_documents(doc! { "name": "changed by the service" }).await;
    fig.phase(
        "ficus reverse customers_db (reverse tail + write-back)",
        changed,
        r.steady,
        &r.cpu,
        json!({ "peak_rss_mb": mb(r.peak_rss_mb), "timeline": r.timeline, "monolith_documents_patched": written.ok() }),
    );
    let met = reverse_rate >= 0.8 * forward_rate;
    fig.add(
        "service → monolith, customers_db (changes/s)",
        Some(reverse_rate),
        "changes/s",
        Some(forward_rate),
        Some(("≥ 0.8× forward sync of the same documents", met)),
        json!({
            "startup_s": (r.total - r.steady).as_secs_f64(),
            "peak_rss_mb": mb(r.peak_rss_mb),
            "against_backlog_consume_events_per_sec": backlog_rate,
        }),
    );
    if !met {
        fig.verdicts.push(format!("reverse missed ({:.2}× forward)", reverse_rate / forward_rate));
    }
    b.say(&format!("ficus reverse: {reverse_rate:.0} changes/s over {changed} service changes"));
}

/// Forward sync of one change to every consumed customer: a monolith `updateMany` of one field
/// (`name`), published by `ficus run --roles tail`, then applied by `ficus run --roles consume`
/// (timed from its first write, like the consume phase). Its changes/s is what reverse sync is
/// held to.
async fn forward_updates(b: &Bench, fig: &mut Figures, plan: &Plan) -> Result<f64, String> {
    let base = b.records.total();
    let changed = b
        .source
        .collection::<Document>(COLLECTION)
        .update_many(doc! {}, doc! { "$set": { "name": "changed by the monolith" } })
        .await
        .map_err(|e| format!("monolith-side update: {e}"))?
        .modified_count;
    let spawned = Instant::now();
    let mut tail = b.spawn("forward-tail", &["run", "--roles", "tail"]);
    let published = b.measure(&mut tail, spawned, changed, plan.tail_timeout(), |_| b.records.total() - base);
    tail.stop();
    published?;
    let spawned = Instant::now();
    let mut f = b.spawn("forward-updates", &["run", "--roles", "consume", "--service", SERVICE]);
    let r = b.measure(&mut f, spawned, changed, plan.consume_timeout(), Ficus::applied);
    f.stop();
    let r = r?;
    let forward_rate = rate(r.steady_work, r.steady);
    fig.phase(
        "ficus consume customers_db, one monolith change per customer",
        changed,
        r.steady,
        &r.cpu,
        json!({ "peak_rss_mb": mb(r.peak_rss_mb), "timeline": r.timeline }),
    );
    fig.add(
        "monolith → service, customers_db, one change per customer (changes/s)",
        Some(forward_rate),
        "changes/s",
        None,
        None,
        json!({ "startup_s": (r.total - r.steady).as_secs_f64(), "changes": changed }),
    );
    b.say(&format!("ficus forward: {forward_rate:.0} changes/s over {changed} monolith changes"));
    Ok(forward_rate)
}

/// The safe cutover's fence window: customers_db from 0% to 50% (`ficus cutover`, every step)
/// under `ficus run` while the monolith's customers change at 1,000 changes/s. How long writes
/// to the moving keys are held (fence → flip) against the drain inside it, which is the floor
/// (the consumers must commit past the marker: Kafka's auto-commit interval and the broker's
/// fetch wait), and the whole step.
pub async fn cutover(b: &Bench, fig: &mut Figures) {
    // `FICUS_BENCH_CUTOVER_RATE`: monolith changes per second while the move runs.
    let rate: u64 = support::env_u64("FICUS_BENCH_CUTOVER_RATE", 1_000);
    // From wherever earlier phases left ownership (the reverse phase forces 100%).
    let reset = b.run_to_end("cutover-reset", &["cutover", "--service", SERVICE, "--to", "0", "--force"]);
    if !reset.ok {
        fig.verdicts.push(format!("cutover: FAILED: reset to 0%: {}", reset.log.lines().last().unwrap_or("")));
        return;
    }
    probe::skip_to_end(&b.defaults.kafka, &ficus::consume::group_id(SERVICE), TOPIC);
    b.checkpoint_at(b.cluster_time().await).await;
    // No archive role: it would start reading every topic from the start, which Tansu 0.6.0
    // serves at about a hundred records a second while answering little else (README, caveats).
    let mut f = b.spawn("cutover-run", &["run", "--roles", "tail,consume,reverse", "--service", SERVICE]);
    f.wait_log("streaming changes", Duration::from_secs(60));
    f.wait_log("partitions assigned", Duration::from_secs(60));
    let ids: Vec<bson::Bson> = {
        use futures::TryStreamExt;
        let docs: Vec<Document> = b
            .source
            .collection::<Document>(COLLECTION)
            .find(doc! {})
            .projection(doc! { "user_id": 1 })
            .limit(5_000)
            .await
            .expect("customers")
            .try_collect()
            .await
            .expect("customers");
        docs.into_iter().filter_map(|d| d.get("user_id").cloned()).collect()
    };
    // `rate` changes/s: a twentieth of it every 50 ms, round the collection.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (coll, stop, ids) = (b.source.collection::<Document>(COLLECTION), stop.clone(), ids.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let (mut at, mut written) = (0usize, 0u64);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && !ids.is_empty() {
                tick.tick().await;
                let batch: Vec<bson::Bson> =
                    (0..(rate / 20).max(1) as usize).map(|i| ids[(at + i) % ids.len()].clone()).collect();
                at += batch.len();
                let r =
                    coll.update_many(doc! { "user_id": { "$in": batch } }, doc! { "$inc": { "stats.msgs": 1 } }).await;
                written += r.map_or(0, |r| r.modified_count);
            }
            written
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let moved = b.run_to_end("cutover-50", &["cutover", "--service", SERVICE, "--to", "50", "--timeout", "600"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.await.unwrap_or(0);
    f.stop();
    if !moved.ok {
        fig.verdicts
            .push(format!("cutover: FAILED: {}", moved.log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")));
        return;
    }
    // "[4/8] drain done in 5.2s: …", "… were held 7.9s (fence → flip)".
    let step = |name: &str| {
        moved.log.lines().find_map(|l| {
            let rest = l.split_once(&format!("] {name} done in "))?.1;
            rest.split_once('s')?.0.parse::<f64>().ok()
        })
    };
    let held = moved.log.lines().find_map(|l| {
        let rest = l.split_once("were held ")?.1;
        rest.split_once("s (fence")?.0.parse::<f64>().ok()
    });
    let (drain, verify) = (step("drain"), step("verify"));
    let total = moved.elapsed.as_secs_f64();
    let own = held.zip(drain).map(|(h, d)| h - d);
    let met = held.zip(drain).is_some_and(|(h, d)| d >= 0.5 * h);
    fig.add(
        &format!("fence window, customers_db 0 → 50% at {rate} changes/s (s)"),
        held,
        "s",
        drain,
        Some(("a few seconds, dominated by the drain", met)),
        json!({ "drain_s": drain, "verify_s": verify, "ficus_own_s": own, "monolith_changes_meanwhile": written,
                "steps": moved.log.lines().filter(|l| l.starts_with('[')).collect::<Vec<_>>() }),
    );
    fig.add(
        "whole cutover step, customers_db 0 → 50% (s)",
        Some(total),
        "s",
        None,
        None,
        json!({ "peak_rss_mb": mb(moved.peak_rss_mb), "cpu_s": moved.cpu }),
    );
    if !met {
        fig.verdicts.push(format!(
            "cutover: the fence window ({held:?} s) is not dominated by the drain ({drain:?} s; verify {verify:?} s)"
        ));
    }
    b.say(&format!(
        "cutover 0 → 50%: writes held {held:?} s (drain {drain:?} s, verify {verify:?} s), step {total:.1} s"
    ));
}

/// One bare bulk pass.
struct Bulk {
    pub rate: f64,
    /// The target server's CPU µs per upsert.
    pub target_us: f64,
    pub upserts: u64,
}

/// The bare bulk loop over the backlog's target documents, plain (the ceiling) and with the
/// sink's guard as `$not: {$gte}`, each into a database of its own; and with the old `$or`
/// guard, which makes each upsert scan the collection on secantusd (quadratic), over the first
/// `FICUS_BENCH_GUARD_EVENTS` events only. Keyed by the shape's name.
async fn bare_bulks(b: &Bench, fig: &mut Figures, plan: &Plan) -> HashMap<String, Bulk> {
    let guard_set = Set::sized(1, plan.guard_events.min(plan.backlog.events));
    let mut bulk = HashMap::new();
    for (shape, db, set) in [
        (Shape::Plain, "bench_bulk", &plan.backlog),
        (Shape::GuardNot, "bench_bulk_guard_not", &plan.backlog),
        (Shape::GuardOr, "bench_bulk_guard_or", &guard_set),
        (Shape::GuardNotMarked, "bench_bulk_guard_marked", &plan.backlog),
    ] {
        let cpu0 = b.procs.snapshot(None);
        let (time, n) = bare_bulk(&b.target_client.database(db), &b.defaults, &b.topics, b.service(), set, shape).await;
        let cpu = cpu_delta(&cpu0, &b.procs.snapshot(None));
        let r = rate(n, time);
        fig.phase(
            &format!("bare bulk upsert ({shape:?})"),
            n,
            time,
            &cpu,
            json!({ "note": "wall: the timed writes; bench CPU also computes the documents (untimed)" }),
        );
        b.say(&format!("bare bulk upsert ({shape:?}): {r:.0} upserts/s over {n}"));
        let target_us = cpu.get("mongo-target").copied().unwrap_or(0.0) * 1e6 / n as f64;
        bulk.insert(format!("{shape:?}"), Bulk { rate: r, target_us, upserts: n });
    }
    bulk
}
