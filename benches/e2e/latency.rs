//! End-to-end latency: tail and consume in one process, caught up, while customers are
//! inserted at a steady rate; each target write timed against its source insert.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bson::{Bson, Document, doc};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::bench::Bench;
use crate::probe::{self, Cpu, Ficus, cpu_delta};
use crate::report::{Figures, limit, mb, rate};
use crate::workload::{Set, events_of};
use crate::{COLLECTION, Plan, SERVICE, TOPIC, now_ms};

/// Tail + consume in one process, caught up (the group moved to the end of the topic, the tail's
/// checkpoint to now); customers inserted at `FICUS_BENCH_RATE` events/s ([`measure_latency`]).
pub async fn latency(b: &Bench, fig: &mut Figures, plan: &Plan) {
    let lat_rate = plan.lat_rate;
    probe::skip_to_end(&b.defaults.kafka, &ficus::consume::group_id(SERVICE), TOPIC);
    b.checkpoint_at(b.cluster_time().await).await;
    let mut f = b.spawn("latency", &["run", "--roles", "tail,consume", "--service", SERVICE]);
    f.wait_log("streaming changes", Duration::from_secs(60));
    f.wait_log("partitions assigned", Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lat = measure_latency(b, plan, &mut f).await;
    f.stop();
    fig.phase(
        &format!("latency run ({lat_rate} events/s, tail + consume)"),
        lat.events,
        lat.wall,
        &lat.cpu,
        json!({ "peak_rss_mb": mb(lat.peak_rss), "consumer": lat.stats, "applied_per_sec": rate(lat.events, lat.wall) }),
    );
    let p99 = lat.exact.get(2).copied().flatten();
    let met = p99.is_some_and(|p| p <= 100.0);
    for (i, q) in ["p50", "p95", "p99"].iter().enumerate() {
        fig.add(
            &format!("end-to-end latency {q} at {lat_rate} ev/s (ms)"),
            lat.exact[i],
            "ms",
            None,
            if *q == "p99" { Some(("≤ 100 ms", met)) } else { None },
            json!({ "from_ficus_histogram_ms": lat.histogram[i], "samples": lat.samples }),
        );
    }
    if !met {
        fig.verdicts.push(format!(
            "p99 latency missed ({:?} ms): {}",
            p99.map(|p| p.round()),
            limit(&lat.cpu, lat.wall, b.cores)
        ));
    }
    b.say(&format!("latency p50/p95/p99 {:?} ms (histogram {:?}), consumer {}", lat.exact, lat.histogram, lat.stats));
}

struct Latency {
    /// p50, p95, p99 in ms: measured per target write, and from ficus's histogram.
    exact: [Option<f64>; 3],
    histogram: [Option<f64>; 3],
    samples: usize,
    events: u64,
    wall: Duration,
    cpu: Cpu,
    peak_rss: Option<f64>,
    /// The consumer's own view: batches, their sizes and time in the sink.
    stats: Value,
}

/// Inserts customers at the plan's rate for its seconds, each batch stamped with the time just
/// before its insert, and watches the target (a change stream on customers_db): a target write's
/// latency is its `wallTime` (or, without one, when the watcher saw it) minus its source insert's
/// stamp. Also reads ficus's own `ficus_end_to_end_latency_seconds` histogram.
async fn measure_latency(b: &Bench, plan: &Plan, f: &mut Ficus) -> Latency {
    let (rate_, secs) = (plan.lat_rate, plan.lat_secs);
    let set = Set::sized(4, rate_ * secs);
    let docs: Vec<Document> = set.chunks().flatten().collect();
    // Target _id → index of the source document it comes from.
    let mut keys: HashMap<String, usize> = HashMap::new();
    for (i, d) in docs.iter().enumerate() {
        keys.insert(d.get_str("user_id").unwrap().to_string(), i);
        for p in d.get_array("purchases").unwrap() {
            if let Bson::Document(p) = p {
                keys.insert(format!("purchase_made:{}", p.get_str("id").unwrap()), i);
            }
        }
    }
    let expect_writes = keys.len();
    let mut watch = b
        .target_client
        .database(SERVICE)
        .watch()
        .pipeline([doc! { "$match": { "operationType": { "$in": ["insert", "replace", "update"] } } }])
        .await
        .expect("watching the target");
    let watcher = tokio::spawn(async move {
        let mut seen: HashMap<String, i64> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(secs + 120);
        while seen.len() < expect_writes && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(1), watch.next()).await {
                Ok(Some(Ok(ev))) => {
                    let at = ev.wall_time.map(|t| t.timestamp_millis()).unwrap_or_else(now_ms);
                    if let Some(Bson::String(id)) = ev.document_key.as_ref().and_then(|k| k.get("_id")) {
                        seen.entry(id.clone()).or_insert(at);
                    }
                }
                Ok(Some(Err(e))) => panic!("target change stream: {e}"),
                Ok(None) => break,
                Err(_) => {}
            }
        }
        seen
    });

    let before = f.scrape();
    let applied0 = before.sum("ficus_events_applied_total", SERVICE) as u64;
    let cpu0 = b.procs.snapshot(Some(f.pid()));
    let coll = b.source.collection::<Document>(COLLECTION);
    let mut stamps = vec![0i64; docs.len()];
    let started = Instant::now();
    // Events before each document: document i is due once rate × elapsed reaches it.
    let mut cum = Vec::with_capacity(docs.len());
    let mut acc = 0u64;
    for d in &docs {
        cum.push(acc);
        acc += events_of(d);
    }
    let mut next = 0usize;
    while next < docs.len() {
        let budget = started.elapsed().as_secs_f64() * rate_ as f64;
        let from = next;
        while next < docs.len() && cum[next] as f64 <= budget {
            next += 1;
        }
        if next > from {
            let at = now_ms();
            for s in &mut stamps[from..next] {
                *s = at;
            }
            coll.insert_many(docs[from..next].to_vec()).await.expect("paced insert");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let insert_wall = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while f.applied() < applied0 + set.events && Instant::now() < deadline {
        f.check_alive();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wall = started.elapsed();
    let cpu1 = b.procs.snapshot(Some(f.pid()));
    let after = f.scrape();
    let stats = probe::consume_stats(&before, &after, wall);
    let seen = watcher.await.unwrap();
    let mut lat: Vec<f64> =
        seen.iter().filter_map(|(k, at)| keys.get(k).map(|&i| (*at - stamps[i]).max(0) as f64)).collect();
    lat.sort_by(f64::total_cmp);
    let hb = before.buckets("ficus_end_to_end_latency_seconds", SERVICE);
    let ha = after.buckets("ficus_end_to_end_latency_seconds", SERVICE);
    let delta: Vec<(f64, f64)> =
        ha.iter().map(|(le, c)| (*le, c - hb.iter().find(|(l, _)| l == le).map(|x| x.1).unwrap_or(0.0))).collect();
    let q = |x: f64| probe::exact_quantile(&lat, x);
    let h = |x: f64| probe::bucket_quantile(&delta, x).map(|s| (s * 1e4).round() / 10.0);
    eprintln!(
        "latency: {} of {} target writes seen; inserts took {:.1}s for {} events ({:.0}/s)",
        lat.len(),
        expect_writes,
        insert_wall.as_secs_f64(),
        set.events,
        rate(set.events, insert_wall)
    );
    Latency {
        exact: [q(0.5), q(0.95), q(0.99)],
        histogram: [h(0.5), h(0.95), h(0.99)],
        samples: lat.len(),
        events: set.events,
        wall,
        cpu: cpu_delta(&cpu0, &cpu1),
        peak_rss: f.peak_rss_mb(),
        stats,
    }
}
