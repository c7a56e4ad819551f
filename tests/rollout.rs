//! Progressive rollout (issue 21) against real servers: `ficus cutover --plan` moves a service
//! share by share with holds while analysis measures, completes under a workload that follows
//! the contract, and rolls back on its own when an anomaly shows during a hold.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bson::{Document, doc};
use common::{Ficus, World, eventually};
use ficus::cutover::route;
use ficus::testkit::workload::Workload;

const SERVICE: &str = "customers_db";
const CUSTOMERS: u64 = 20;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A world with customers in the monolith and `ficus run` for customers_db caught up, serving
/// its metrics address on `port`.
async fn start() -> (World, mongodb::Client, PathBuf, Ficus, u16) {
    let world = World::start();
    world.apply_topics();
    let client = world.mongo.client().await;
    client
        .database("admin")
        .run_command(doc! { "setParameter": 1, "transactionLifetimeLimitSeconds": 5 })
        .await
        .unwrap();
    let config = world.dir.path().join("ficus.toml");
    std::fs::write(&config, "[cutover]\ntransaction_lifetime_secs = 5\nview_max_age_secs = 5\n").unwrap();
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let mut w = Workload::new(CUSTOMERS);
    for i in 0..CUSTOMERS {
        monolith.insert_one(w.customer(i)).await.unwrap();
    }
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let args = ["run", "--service", SERVICE, "--metrics-addr", addr.as_str()];
    let ficus = world.spawn_ficus(&args, &[("FICUS_CONFIG", config.to_str().unwrap())]);
    let service = client.database(SERVICE).collection::<Document>("customers");
    eventually("customers_db populated", Duration::from_secs(120), || async {
        service.count_documents(doc! {}).await.unwrap() == CUSTOMERS
    })
    .await;
    (world, client, config, ficus, port)
}

/// The service's share now.
async fn share(client: &mongodb::Client) -> i32 {
    let o = client.database("ficus").collection::<Document>("ownership").find_one(doc! { "_id": SERVICE }).await;
    o.unwrap().map_or(0, |o| o.get_i32("percent").unwrap())
}

/// The monolith's own code counting messages of customers that never move in a 0 → 50 plan
/// (their buckets are 50 or more), so it follows the contract whatever the share.
fn workload(client: &mongodb::Client) -> (tokio::task::JoinHandle<u64>, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    let fixed: Vec<String> = (0..CUSTOMERS).map(Workload::user_id).filter(|u| route::bucket(u) >= 50).collect();
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let mut n = 0;
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            let user = &fixed[n as usize % fixed.len()];
            monolith.update_one(doc! { "user_id": user }, doc! { "$inc": { "stats.msgs": 1 } }).await.unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        n
    });
    (task, stop)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_with_holds_completes_under_a_workload_and_a_bad_plan_is_refused_up_front() {
    let (world, client, config, mut ficus, _) = start().await;
    let env = [("FICUS_CONFIG", config.to_str().unwrap())];
    // Validated up front: shares only grow going up (exit 2, nothing moved).
    let bad = world.ficus(&["cutover", "--service", SERVICE, "--plan", "10,50,30", "--dry-run"], &env);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("50% → 30%: shares only grow going up"), "{}", text(&bad));
    let dry = world.ficus(&["cutover", "--service", SERVICE, "--plan", "10,50", "--hold", "3s", "--dry-run"], &env);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(text(&dry).contains("10% → 50%") && text(&dry).contains("dead_letters"), "{}", text(&dry));
    assert_eq!(share(&client).await, 0, "a dry run moves nothing");

    let (writes, stop) = workload(&client);
    let args =
        ["cutover", "--service", SERVICE, "--plan", "10,50", "--hold", "3s", "--interval", "1s", "--timeout", "120"];
    let out = world.ficus(&args, &env);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(writes.await.unwrap() > 0);
    let t = text(&out);
    assert!(out.status.success(), "exit {:?}:\n{t}\n{}", out.status.code(), ficus.logs());
    for needle in ["holding at 10%", "analysis at 10%", "holding at 50%", "analysis at 50%", "verify_score 100"] {
        assert!(t.contains(needle), "the output should say {needle:?}:\n{t}");
    }
    assert_eq!(share(&client).await, 50);
    let left = client.database("ficus").collection::<Document>("rollouts").count_documents(doc! {}).await.unwrap();
    assert_eq!(left, 0, "a finished plan leaves no record");
    let verify = world.ficus(&["verify", "--checks", "counts,contents", "--service", SERVICE, "--settle", "2"], &env);
    assert!(verify.status.success(), "{}", text(&verify));

    // A gradual rollback killed during its first hold, then aborted: the plan walks back to the
    // share it began from (no hold finished) by the safe move, and is forgotten.
    let down = ["cutover", "--service", SERVICE, "--to", "0", "--plan", "10,0", "--hold", "10m", "--interval", "1s"];
    let mut rollback = world.spawn_ficus(&down, &env);
    eventually("the rollback at 10%", Duration::from_secs(240), || async { share(&client).await == 10 }).await;
    rollback.sigkill();
    let abort = world.ficus(&["cutover", "--service", SERVICE, "--abort", "--timeout", "120"], &env);
    assert!(abort.status.success(), "{}\n{}", text(&abort), ficus.logs());
    assert!(text(&abort).contains("plan aborted; back at 50%"), "{}", text(&abort));
    assert_eq!(share(&client).await, 50);
    let left = client.database("ficus").collection::<Document>("rollouts").count_documents(doc! {}).await.unwrap();
    assert_eq!(left, 0, "an aborted plan leaves no record");
    // The migration log tells the story, in order.
    let log = world.ficus(&["log", "--service", SERVICE], &env);
    assert!(log.status.success(), "{}", text(&log));
    let kinds: Vec<String> = String::from_utf8_lossy(&log.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .filter(|k| k != "step" && k != "analysis")
        .collect();
    // The plan up, its holds, then the rollback's plan and its first move (killed during its
    // observation or its hold: which, depends on the moment), then the abort's move back.
    let want = [
        "plan-started",
        "move-started",
        "move-done",
        "held",
        "move-started",
        "move-done",
        "held",
        "plan-done",
        "plan-started",
        "move-started",
    ];
    assert_eq!(kinds[..want.len()], want, "{}", text(&log));
    assert_eq!(kinds[kinds.len() - 3..], ["move-started", "move-done", "aborted"], "{}", text(&log));
    let json = world.ficus(&["log", "--service", SERVICE, "--json", "--limit", "3"], &env);
    let last: Vec<serde_json::Value> =
        String::from_utf8_lossy(&json.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(last.len(), 3, "{}", text(&json));
    assert_eq!(
        (last[2]["kind"].as_str(), last[2]["from"].as_u64(), last[2]["to"].as_u64()),
        (Some("aborted"), Some(10), Some(50))
    );
    let unknown = world.ficus(&["log", "--service", "nope_db"], &env);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));
    assert!(ficus.terminate().success(), "{}", ficus.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_critical_anomaly_during_a_hold_rolls_back_to_the_last_good_share() {
    let (world, client, config, mut ficus, port) = start().await;
    let env = [("FICUS_CONFIG", config.to_str().unwrap())];
    let args =
        ["cutover", "--service", SERVICE, "--plan", "10,50", "--hold", "60s", "--interval", "1s", "--timeout", "120"];
    let mut plan = world.spawn_ficus(&args, &env);
    // Once the plan holds at 50%, another producer puts a message no consumer can read on the
    // service's topic: a dead letter, a critical anomaly.
    eventually("the plan at 50%", Duration::from_secs(240), || async { share(&client).await == 50 }).await;
    // Applications and operators see the plan on GET /cutover: where it stands, the hold's
    // time left and the last measurement.
    let plan_view = || {
        let (_, body) = common::http_get(port, "/cutover");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["services"].as_array().and_then(|s| s.iter().find(|s| s["service"] == SERVICE)).map(|s| s["plan"].clone())
    };
    eventually("a measurement of the hold at 50% on /cutover", Duration::from_secs(60), || async {
        plan_view().is_some_and(|p| p["holding"] == 50 && p["analysis"].as_array().is_some_and(|a| a.len() == 6))
    })
    .await;
    let p = plan_view().unwrap();
    assert_eq!((p["shares"].clone(), p["held"].clone()), (serde_json::json!([10, 50]), serde_json::json!([10])), "{p}");
    assert!(p["holdLeftSecs"].as_u64().is_some_and(|s| s <= 60), "{p}");
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", world.kafka.brokers()).create().unwrap();
    let poison = FutureRecord::to("linechatbot.customers").key("U-poison").payload("{not json");
    producer.send(poison, Duration::from_secs(10)).await.unwrap();
    let status = plan.wait(Duration::from_secs(240)).expect("the plan ends on its own");
    let t = plan.logs();
    assert_eq!(status.code(), Some(1), "rolled back, exit 1:\n{t}");
    assert!(t.contains("rolled back to 10%") && t.contains("dead_letters = 1 (wanted ≤ 0)"), "{t}");
    assert_eq!(share(&client).await, 10, "back at the last share that finished its hold");
    let verify = world.ficus(&["verify", "--checks", "counts,contents", "--service", SERVICE, "--settle", "2"], &env);
    assert!(verify.status.success(), "{}", text(&verify));
    let log = world.ficus(&["log", "--service", SERVICE], &env);
    let log = String::from_utf8_lossy(&log.stdout).to_string();
    let rolled =
        log.lines().find(|l| l.contains("rolled-back")).unwrap_or_else(|| panic!("no rollback logged:\n{log}"));
    assert!(rolled.contains("50%→10%") && rolled.contains("dead_letters = 1"), "{rolled}");
    assert!(log.lines().any(|l| l.contains("analysis") && l.contains("dead_letters 1")), "{log}");
    // The daemon serves the log and counts what the plan recorded (it reads the log every 5 s).
    let (code, body) = common::http_get(port, "/log?service=customers_db&limit=2");
    let entries: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{code} {body}: {e}"));
    assert_eq!(entries["entries"][1]["kind"], "rolled-back", "{body}");
    eventually("the rollback counted", Duration::from_secs(30), || async {
        let (_, m) = common::http_get(port, "/metrics");
        m.contains("ficus_cutover_rollbacks_total{service=\"customers_db\"} 1")
            && m.contains(
                "ficus_cutover_analysis_total{service=\"customers_db\",metric=\"dead_letters\",result=\"fail\"} 1",
            )
    })
    .await;

    // `ficus analyze --once` for tools that gate on an exit code: the first run counts from
    // now (a pass), a new dead letter fails the next, the one after counts only what is new.
    let analyze = |env: &[(&str, &str)]| {
        let out = world.ficus(&["analyze", "--service", SERVICE, "--once", "--json"], env);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code(), v, text(&out))
    };
    let (code, v, t) = analyze(&env);
    assert_eq!((code, v["result"].as_str()), (Some(0), Some("pass")), "{t}");
    producer
        .send(FutureRecord::to("linechatbot.customers").key("U-poison-2").payload("{"), Duration::from_secs(10))
        .await
        .unwrap();
    eventually("the second dead letter", Duration::from_secs(60), || async {
        let (code, v, _) = analyze(&env);
        code == Some(1)
            && v["readings"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["metric"] == "dead_letters" && r["value"] == 1.0))
    })
    .await;
    let (code, _, t) = analyze(&env);
    assert_eq!(code, Some(0), "only what is new since the run before counts:\n{t}");
    // Kafka unreachable: inconclusive (3), never a pass and never a failure.
    let (code, v, t) = analyze(&[env[0], ("FICUS_KAFKA_BROKERS", "127.0.0.1:1")]);
    assert_eq!((code, v["result"].as_str()), (Some(3), Some("inconclusive")), "{t}");

    // The emergency rollback, under a workload that follows the contract: fenced and drained,
    // neither lens-checked nor verified first; everything the service wrote reaches the monolith.
    let (writes, stop) = workload(&client);
    let service = client.database(SERVICE).collection::<Document>("customers");
    let owned: Vec<String> = (0..CUSTOMERS).map(Workload::user_id).filter(|u| route::bucket(u) < 10).collect();
    assert!(!owned.is_empty(), "some customers are the service's at 10%");
    for u in &owned {
        service.update_one(doc! { "lineUserId": u }, doc! { "$set": { "segmentation.tier": "gold" } }).await.unwrap();
    }
    let out = world.ficus(&["cutover", "--service", SERVICE, "--to", "0", "--emergency", "--timeout", "120"], &env);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writes.await.unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}\n{}", ficus.logs());
    assert!(t.contains("skipped (--emergency)") && t.contains("lens laws not checked"), "{t}");
    assert_eq!(share(&client).await, 0);
    let monolith = client.database("linechatbot").collection::<Document>("customers");
    for u in &owned {
        let d = monolith.find_one(doc! { "user_id": u }).await.unwrap().unwrap();
        assert_eq!(d.get_str("tier").ok(), Some("gold"), "{u}: the service's write before the rollback: {d}");
    }
    let verify = world.ficus(&["verify", "--checks", "counts,contents", "--service", SERVICE, "--settle", "2"], &env);
    assert!(verify.status.success(), "{}", text(&verify));
    let log = world.ficus(&["log", "--service", SERVICE, "--limit", "20"], &env);
    assert!(String::from_utf8_lossy(&log.stdout).contains("move-started 10%→0%: emergency move"), "{}", text(&log));
    assert!(ficus.terminate().success(), "{}", ficus.logs());
}
